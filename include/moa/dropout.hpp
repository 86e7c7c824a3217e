// moa/dropout.hpp - inverted dropout with an explicit generator.
#pragma once

#include "moa/error.hpp"
#include "moa/random.hpp"
#include "moa/tensor.hpp"

namespace moa {

template <typename S>
class Dropout {
 public:
  using Scalar = S;

  explicit Dropout(double probability) : probability_(probability) {
    MOA_CHECK(probability >= 0.0 && probability < 1.0, "Dropout", "probability must be in [0, 1), got ", probability);
  }

  double probability() const { return probability_; }
  bool training() const { return training_; }
  void set_training(bool training) { training_ = training; }

  // input: [N, D] -> output: [N, D]. In training, zeroes each entry with the given probability and
  // scales the kept ones by 1 / (1 - p), drawing from `rng`; in evaluation it is the identity.
  Matrix<Scalar> forward(const Matrix<Scalar>& input, Rng& rng) {
    if (!training_ || probability_ == 0.0) {
      mask_.resize(0, 0);
      return input;
    }
    const Scalar scale = static_cast<Scalar>(1.0 / (1.0 - probability_));
    mask_.resize(input.rows(), input.cols());
    for (Index i = 0; i < input.rows(); ++i)
      for (Index j = 0; j < input.cols(); ++j) mask_(i, j) = rng.uniform() < probability_ ? Scalar(0) : scale;
    return input.cwiseProduct(mask_);
  }

  // grad_output: [N, D] -> grad_input: [N, D], through the mask of the last forward.
  Matrix<Scalar> backward(const Matrix<Scalar>& grad_output) const {
    if (mask_.size() == 0) return grad_output;
    MOA_CHECK(grad_output.rows() == mask_.rows() && grad_output.cols() == mask_.cols(), "Dropout::backward",
              "grad_output has shape ", detail::shape_of(grad_output), ", expected ", detail::shape_of(mask_),
              " (as the last forward)");
    return grad_output.cwiseProduct(mask_);
  }

 private:
  double probability_;
  bool training_ = true;
  Matrix<Scalar> mask_;  // [N, D] of 0 or 1/(1-p); empty when the last forward was the identity
};

}  // namespace moa
