// moa/layer_norm.hpp - layer normalisation over the feature dimension.
#pragma once

#include "moa/error.hpp"
#include "moa/gemm.hpp"
#include "moa/parameter.hpp"
#include "moa/tensor.hpp"

#include <cmath>
#include <string>

namespace moa {

template <typename S>
class LayerNorm {
 public:
  using Scalar = S;

  explicit LayerNorm(Index features, double epsilon = 1e-5)
      : weight("weight", {checked_features(features)}), bias("bias", {features}), epsilon_(epsilon) {
    MOA_CHECK(epsilon > 0.0, "LayerNorm", "epsilon must be positive, got ", epsilon);
    weight.value.setOnes();
  }

  Index features() const { return weight.shape[0]; }
  // The threads rows are normalised on (each row alone: the same result on any number).
  void set_compute(ComputePtr compute) {
    compute_ = detail::checked_compute(std::move(compute), "LayerNorm::set_compute");
  }

  // input: [N, D] -> output: [N, D]. Caches the normalised input and the inverse deviations.
  Matrix<Scalar> forward(const Matrix<Scalar>& input) {
    MOA_CHECK(input.cols() == features(), "LayerNorm::forward", "input has shape ", detail::shape_of(input),
              ", expected [N, ", features(), "]");
    return apply(input, normalized_, inverse_std_);
  }

  // The same output for inference, caching nothing.
  Matrix<Scalar> infer(const Matrix<Scalar>& input) const {
    MOA_CHECK(input.cols() == features(), "LayerNorm::infer", "input has shape ", detail::shape_of(input),
              ", expected [N, ", features(), "]");
    Matrix<Scalar> normalized;
    ColumnVector<Scalar> inverse_std;
    return apply(input, normalized, inverse_std);
  }

  // grad_output: [N, D] -> grad_input: [N, D].
  // dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), with g = dy * weight.
  Matrix<Scalar> backward(const Matrix<Scalar>& grad_output) {
    MOA_CHECK(grad_output.rows() == normalized_.rows() && grad_output.cols() == features(), "LayerNorm::backward",
              "grad_output has shape ", detail::shape_of(grad_output), ", expected [", normalized_.rows(), ", ",
              features(), "] (as the last forward)");
    add_column_sums(*compute_, grad_output.cwiseProduct(normalized_), weight.grad.row(0));
    add_column_sums(*compute_, grad_output, bias.grad.row(0));
    Matrix<Scalar> grad_input(grad_output.rows(), features());  // [N, D]
    parallel_ranges(*compute_, grad_output.rows(), kRowGrain, [&](Index first, Index rows, int) {
      for (Index i = first; i < first + rows; ++i) {
        const RowVector<Scalar> scaled = grad_output.row(i).cwiseProduct(weight.value.row(0));  // [D]
        const Scalar mean_scaled = scaled.mean();
        const Scalar mean_scaled_normalized = scaled.cwiseProduct(normalized_.row(i)).mean();
        grad_input.row(i) =
            (scaled.array() - mean_scaled - normalized_.row(i).array() * mean_scaled_normalized) * inverse_std_(i);
      }
    });
    return grad_input;
  }

  void collect_parameters(ParameterList<Scalar>& list, const std::string& prefix = "") {
    list.add(prefix, weight);
    list.add(prefix, bias);
  }

  Parameter<Scalar> weight;  // [D], initialised to ones
  Parameter<Scalar> bias;    // [D], initialised to zeros

 private:
  // normalized: [N, D] and inverse_std: [N] are filled (what backward needs).
  Matrix<Scalar> apply(const Matrix<Scalar>& input, Matrix<Scalar>& normalized, ColumnVector<Scalar>& inverse_std) const {
    const Index rows = input.rows();
    normalized.resize(rows, features());
    inverse_std.resize(rows);
    Matrix<Scalar> output(rows, features());  // [N, D]
    parallel_ranges(*compute_, rows, kRowGrain, [&](Index first, Index count, int) {
      for (Index i = first; i < first + count; ++i) {
        const Scalar mean = input.row(i).mean();
        const Scalar variance = (input.row(i).array() - mean).square().mean();
        inverse_std(i) = Scalar(1) / std::sqrt(variance + static_cast<Scalar>(epsilon_));
        normalized.row(i) = (input.row(i).array() - mean) * inverse_std(i);
        output.row(i) = normalized.row(i).array() * weight.value.row(0).array() + bias.value.row(0).array();
      }
    });
    return output;
  }

  static Index checked_features(Index features) {
    MOA_CHECK(features > 0, "LayerNorm", "features must be positive, got ", features);
    return features;
  }

  static constexpr Index kRowGrain = 64;  // rows per thread at least: below, waking one costs more

  double epsilon_;
  ComputePtr compute_ = Compute::standard();
  Matrix<Scalar> normalized_;          // [N, D]
  ColumnVector<Scalar> inverse_std_;   // [N]
};

}  // namespace moa
