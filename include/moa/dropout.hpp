// moa/dropout.hpp - inverted dropout with an explicit generator.
#pragma once

#include "moa/error.hpp"
#include "moa/gemm.hpp"
#include "moa/random.hpp"
#include "moa/tensor.hpp"

#include <cmath>
#include <cstdint>

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
  // The threads the mask is drawn and applied on; the mask is the same on any number.
  void set_compute(ComputePtr compute) { compute_ = detail::checked_compute(std::move(compute), "Dropout::set_compute"); }

  // input: [N, D] -> output: [N, D]. In training, zeroes each entry with the given probability and
  // scales the kept ones by 1 / (1 - p), drawing from `rng`; in evaluation it is the identity.
  Matrix<Scalar> forward(const Matrix<Scalar>& input, Rng& rng) {
    if (!training_ || probability_ == 0.0) {
      mask_.resize(0, 0);
      return input;
    }
    const Scalar scale = static_cast<Scalar>(1.0 / (1.0 - probability_));
    const Index cols = input.cols();
    mask_.resize(input.rows(), cols);
    Matrix<Scalar> output(input.rows(), cols);  // [N, D]
    // Entry (i, j) takes draw i*D + j of rng's stream, whichever thread draws it.
    const Rng start = rng;
    rng.discard(static_cast<std::uint64_t>(input.size()));
    parallel_ranges(*compute_, input.rows(), kRowGrain, [&](Index first, Index rows, int) {
      draw_mask(start, first * cols, rows * cols, scale, mask_.data() + first * cols);
      output.middleRows(first, rows) = input.middleRows(first, rows).cwiseProduct(mask_.middleRows(first, rows));
    });
    return output;
  }

  // grad_output: [N, D] -> grad_input: [N, D], through the mask of the last forward.
  Matrix<Scalar> backward(const Matrix<Scalar>& grad_output) const {
    if (mask_.size() == 0) return grad_output;
    MOA_CHECK(grad_output.rows() == mask_.rows() && grad_output.cols() == mask_.cols(), "Dropout::backward",
              "grad_output has shape ", detail::shape_of(grad_output), ", expected ", detail::shape_of(mask_),
              " (as the last forward)");
    Matrix<Scalar> grad_input(grad_output.rows(), grad_output.cols());  // [N, D]
    parallel_ranges(*compute_, grad_output.rows(), kRowGrain, [&](Index first, Index rows, int) {
      grad_input.middleRows(first, rows) = grad_output.middleRows(first, rows).cwiseProduct(mask_.middleRows(first, rows));
    });
    return grad_input;
  }

 private:
  // mask[0, count): draws first... of the stream that starts at `stream`. An entry is dropped
  // when uniform() < p, tested in integers as uniform() makes it of the draw's top 53 bits:
  // (draw >> 11) < ceil(p 2^53), the same masks, in a loop the compiler vectorises (AVX2 has no
  // conversion of 64-bit integers to double; measured on a Zen 3 core, 3.8 -> 1.3 ns a draw).
  void draw_mask(Rng stream, Index first, Index count, Scalar scale, Scalar* mask) const {
    stream.discard(static_cast<std::uint64_t>(first));
    const std::uint64_t threshold = static_cast<std::uint64_t>(std::ceil(std::ldexp(probability_, 53)));
    for (Index i = 0; i < count; ++i)
      mask[i] = (stream.peek(static_cast<std::uint64_t>(i)) >> 11) < threshold ? Scalar(0) : scale;
  }

  static constexpr Index kRowGrain = 64;  // rows per thread at least: below, waking one costs more

  double probability_;
  bool training_ = true;
  ComputePtr compute_ = Compute::standard();
  Matrix<Scalar> mask_;  // [N, D] of 0 or 1/(1-p); empty when the last forward was the identity
};

}  // namespace moa
