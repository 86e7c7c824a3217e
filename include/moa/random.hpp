// moa/random.hpp - an explicit, seedable random generator.
//
// There is no global generator: whatever draws random numbers takes an Rng&. The generator is
// SplitMix64 with its own uniform and normal transforms, so a seed gives the same numbers with
// every compiler and standard library (std::normal_distribution is implementation-defined), and
// its whole state is one integer that a checkpoint can save.
#pragma once

#include "moa/error.hpp"
#include "moa/tensor.hpp"

#include <cmath>
#include <cstdint>

namespace moa {

class Rng {
 public:
  explicit Rng(std::uint64_t seed = 0) : state_(seed) {}

  std::uint64_t next_u64() { return mix(state_ += kIncrement); }

  // Draw i of the stream from here (i = 0: what next_u64() returns next), without drawing: the
  // draws of a stretch are independent of each other, so a loop over them vectorises.
  std::uint64_t peek(std::uint64_t i) const { return mix(state_ + (i + 1) * kIncrement); }

  // Skips `count` draws in O(1) (SplitMix64's state advances by a constant per draw): a copy
  // advanced by i draws continues the stream from draw i, so parts of it can be drawn in parallel.
  void discard(std::uint64_t count) { state_ += count * kIncrement; }

  // Uniform in [0, 1) with 53 random bits.
  double uniform() { return static_cast<double>(next_u64() >> 11) * 0x1.0p-53; }

  double uniform(double low, double high) { return low + (high - low) * uniform(); }

  // Uniform integer in [0, n).
  std::uint64_t below(std::uint64_t n) {
    MOA_CHECK(n > 0, "Rng::below", "n must be positive");
    // Rejection keeps the result unbiased.
    const std::uint64_t limit = ~std::uint64_t{0} - (~std::uint64_t{0} % n);
    std::uint64_t draw = next_u64();
    while (draw >= limit) draw = next_u64();
    return draw % n;
  }

  // Standard normal by Box-Muller; the second value is discarded so the state stays one integer.
  double normal() {
    const double u1 = 1.0 - uniform();  // (0, 1], safe for log
    const double u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }

  std::uint64_t state() const { return state_; }
  void set_state(std::uint64_t state) { state_ = state; }

 private:
  static constexpr std::uint64_t kIncrement = 0x9E3779B97F4A7C15ULL;
  static std::uint64_t mix(std::uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }

  std::uint64_t state_;
};

}  // namespace moa
