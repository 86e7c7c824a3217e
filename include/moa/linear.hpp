// moa/linear.hpp - fully connected layer y = x W^T + b.
#pragma once

#include "moa/error.hpp"
#include "moa/gemm.hpp"
#include "moa/init.hpp"
#include "moa/parameter.hpp"
#include "moa/random.hpp"
#include "moa/tensor.hpp"

#include <string>
#include <utility>

namespace moa {

template <typename S>
class Linear {
 public:
  using Scalar = S;

  // Xavier-uniform weight (as fairseq's Transformer), zero bias.
  Linear(Index in_features, Index out_features, bool with_bias, Rng& rng)
      : weight("weight", {checked_extent(out_features, "out_features"), checked_extent(in_features, "in_features")}),
        with_bias_(with_bias) {
    if (with_bias_) bias = Parameter<Scalar>("bias", {out_features});
    init_xavier_uniform(weight, rng);
  }

  Index in_features() const { return weight.shape[1]; }
  Index out_features() const { return weight.shape[0]; }
  bool has_bias() const { return with_bias_; }

  // The backend and threads its products run on; in evaluation (training false) they may use the
  // compute's inference precision.
  void set_compute(ComputePtr compute) {
    compute_ = detail::checked_compute(std::move(compute), "Linear::set_compute");
  }
  const Compute& compute() const { return *compute_; }
  bool training() const { return training_; }
  void set_training(bool training) { training_ = training; }

  // input: [N, in] -> output: [N, out]. Caches the input for backward (a temporary is moved in).
  Matrix<Scalar> forward(const Matrix<Scalar>& input) {
    check_input(input, "Linear::forward");
    detail::parallel_assign(*compute_, input_, input);
    return apply(input_, product_precision(*compute_, training_));
  }
  Matrix<Scalar> forward(Matrix<Scalar>&& input) {
    check_input(input, "Linear::forward");
    input_ = std::move(input);
    return apply(input_, product_precision(*compute_, training_));
  }

  // The same output for inference, caching nothing.
  Matrix<Scalar> infer(const Matrix<Scalar>& input) const {
    check_input(input, "Linear::infer");
    return apply(input, product_precision(*compute_, false));
  }

  // grad_output: [N, out] -> grad_input: [N, in]; accumulates dW += dY^T X and db += colsum(dY).
  Matrix<Scalar> backward(const Matrix<Scalar>& grad_output) {
    MOA_CHECK(grad_output.rows() == input_.rows() && grad_output.cols() == out_features(), "Linear::backward",
              "grad_output has shape ", detail::shape_of(grad_output), ", expected [", input_.rows(), ", ",
              out_features(), "] (as the last forward)");
    gemm<Scalar>(*compute_, grad_output, Transpose::yes, input_, Transpose::no, weight.grad, true);
    if (with_bias_) add_column_sums(*compute_, grad_output, bias.grad.row(0));
    Matrix<Scalar> grad_input(input_.rows(), in_features());  // [N, in]
    gemm<Scalar>(*compute_, grad_output, Transpose::no, weight.value, Transpose::no, grad_input);
    return grad_input;
  }

  void collect_parameters(ParameterList<Scalar>& list, const std::string& prefix = "") {
    list.add(prefix, weight);
    if (with_bias_) list.add(prefix, bias);
  }

  Parameter<Scalar> weight;  // [out, in]
  Parameter<Scalar> bias;    // [out], only with bias

 private:
  void check_input(const Matrix<Scalar>& input, const char* function) const {
    MOA_CHECK(input.cols() == in_features(), function, "input has shape ", detail::shape_of(input), ", expected [N, ",
              in_features(), "]");
  }

  Matrix<Scalar> apply(const Matrix<Scalar>& input, Precision precision) const {
    Matrix<Scalar> output = linear_product<Scalar>(*compute_, input, weight.value, precision);  // [N, out]
    if (with_bias_) {
      parallel_ranges(*compute_, output.rows(), kRowGrain, [&](Index first, Index rows, int) {
        output.middleRows(first, rows).rowwise() += bias.value.row(0);
      });
    }
    return output;
  }

  static Index checked_extent(Index extent, const char* argument) {
    MOA_CHECK(extent > 0, "Linear", argument, " must be positive, got ", extent);
    return extent;
  }

  static constexpr Index kRowGrain = 64;  // rows per thread at least: below, waking one costs more

  bool with_bias_;
  bool training_ = true;
  ComputePtr compute_ = Compute::standard();
  Matrix<Scalar> input_;  // [N, in]
};

}  // namespace moa
