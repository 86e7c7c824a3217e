// moa/linear.hpp - fully connected layer y = x W^T + b.
#pragma once

#include "moa/error.hpp"
#include "moa/parameter.hpp"
#include "moa/random.hpp"
#include "moa/tensor.hpp"

#include <string>

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

  // input: [N, in] -> output: [N, out]. Caches the input for backward.
  Matrix<Scalar> forward(const Matrix<Scalar>& input) {
    MOA_CHECK(input.cols() == in_features(), "Linear::forward", "input has shape ", detail::shape_of(input),
              ", expected [N, ", in_features(), "]");
    input_ = input;
    Matrix<Scalar> output = input * weight.value.transpose();  // [N, out]
    if (with_bias_) output.rowwise() += bias.value.row(0);
    return output;
  }

  // grad_output: [N, out] -> grad_input: [N, in]; accumulates dW += dY^T X and db += colsum(dY).
  Matrix<Scalar> backward(const Matrix<Scalar>& grad_output) {
    MOA_CHECK(grad_output.rows() == input_.rows() && grad_output.cols() == out_features(), "Linear::backward",
              "grad_output has shape ", detail::shape_of(grad_output), ", expected [", input_.rows(), ", ",
              out_features(), "] (as the last forward)");
    weight.grad.noalias() += grad_output.transpose() * input_;
    if (with_bias_) bias.grad.row(0) += grad_output.colwise().sum();
    return grad_output * weight.value;  // [N, in]
  }

  void collect_parameters(ParameterList<Scalar>& list, const std::string& prefix = "") {
    list.add(prefix, weight);
    if (with_bias_) list.add(prefix, bias);
  }

  Parameter<Scalar> weight;  // [out, in]
  Parameter<Scalar> bias;    // [out], only with bias

 private:
  static Index checked_extent(Index extent, const char* argument) {
    MOA_CHECK(extent > 0, "Linear", argument, " must be positive, got ", extent);
    return extent;
  }

  bool with_bias_;
  Matrix<Scalar> input_;  // [N, in]
};

}  // namespace moa
