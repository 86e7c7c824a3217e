// moa/feed_forward.hpp - position-wise feed-forward block fc2(activation(fc1(x))).
#pragma once

#include "moa/error.hpp"
#include "moa/linear.hpp"
#include "moa/parameter.hpp"
#include "moa/random.hpp"
#include "moa/tensor.hpp"

#include <cmath>
#include <string>

namespace moa {

enum class Activation { relu, gelu };

namespace detail {

// GELU in its exact form x * Phi(x), as PyTorch's default.
template <typename Scalar>
Scalar gelu(Scalar x) {
  return Scalar(0.5) * x * (Scalar(1) + std::erf(x * Scalar(0.70710678118654752440)));
}

template <typename Scalar>
Scalar gelu_derivative(Scalar x) {
  const Scalar cdf = Scalar(0.5) * (Scalar(1) + std::erf(x * Scalar(0.70710678118654752440)));
  const Scalar pdf = Scalar(0.39894228040143267794) * std::exp(Scalar(-0.5) * x * x);
  return cdf + x * pdf;
}

}  // namespace detail

template <typename S>
class FeedForward {
 public:
  using Scalar = S;

  FeedForward(Index model_dim, Index hidden_dim, Activation activation, Rng& rng)
      : fc1(model_dim, hidden_dim, true, rng), fc2(hidden_dim, model_dim, true, rng), activation_(activation) {}

  Index model_dim() const { return fc1.in_features(); }
  Index hidden_dim() const { return fc1.out_features(); }
  Activation activation() const { return activation_; }

  void set_compute(const ComputePtr& compute) {
    MOA_CHECK(compute != nullptr, "FeedForward::set_compute", "compute is null");
    fc1.set_compute(compute);
    fc2.set_compute(compute);
  }
  void set_training(bool training) {
    fc1.set_training(training);
    fc2.set_training(training);
  }

  // input: [N, d_model] -> output: [N, d_model]. Caches the pre-activation for backward.
  Matrix<Scalar> forward(const Matrix<Scalar>& input) {
    MOA_CHECK(input.cols() == model_dim(), "FeedForward::forward", "input has shape ", detail::shape_of(input),
              ", expected [N, ", model_dim(), "]");
    pre_activation_ = fc1.forward(input);  // [N, d_ff]
    return fc2.forward(activated(pre_activation_));
  }

  // The same output for inference, caching nothing.
  Matrix<Scalar> infer(const Matrix<Scalar>& input) const {
    MOA_CHECK(input.cols() == model_dim(), "FeedForward::infer", "input has shape ", detail::shape_of(input),
              ", expected [N, ", model_dim(), "]");
    return fc2.infer(activated(fc1.infer(input)));
  }

  // grad_output: [N, d_model] -> grad_input: [N, d_model].
  Matrix<Scalar> backward(const Matrix<Scalar>& grad_output) {
    Matrix<Scalar> grad_hidden = fc2.backward(grad_output);  // [N, d_ff], then d(pre-activation)
    parallel_ranges(fc1.compute(), grad_hidden.rows(), kRowGrain, [&](Index first, Index rows, int) {
      for (Index i = first; i < first + rows; ++i)
        grad_hidden.row(i) = grad_hidden.row(i).cwiseProduct(
            pre_activation_.row(i).unaryExpr([this](Scalar x) { return activate_derivative(x); }));
    });
    return fc1.backward(grad_hidden);
  }

  void collect_parameters(ParameterList<Scalar>& list, const std::string& prefix = "") {
    fc1.collect_parameters(list, prefix + "fc1.");
    fc2.collect_parameters(list, prefix + "fc2.");
  }

  Linear<Scalar> fc1;  // d_model -> d_ff
  Linear<Scalar> fc2;  // d_ff -> d_model

 private:
  // activation(pre): [N, d_ff], rows spread over the threads (the GELU's erf is costly).
  Matrix<Scalar> activated(const Matrix<Scalar>& pre) const {
    Matrix<Scalar> hidden(pre.rows(), pre.cols());  // [N, d_ff]
    parallel_ranges(fc1.compute(), pre.rows(), kRowGrain, [&](Index first, Index rows, int) {
      hidden.middleRows(first, rows) = pre.middleRows(first, rows).unaryExpr([this](Scalar x) { return activate(x); });
    });
    return hidden;
  }
  Scalar activate(Scalar x) const {
    return activation_ == Activation::relu ? (x > Scalar(0) ? x : Scalar(0)) : detail::gelu(x);
  }
  Scalar activate_derivative(Scalar x) const {
    return activation_ == Activation::relu ? (x > Scalar(0) ? Scalar(1) : Scalar(0)) : detail::gelu_derivative(x);
  }

  static constexpr Index kRowGrain = 64;  // rows per thread at least: below, waking one costs more

  Activation activation_;
  Matrix<Scalar> pre_activation_;  // [N, d_ff]
};

}  // namespace moa
