// moa/random.hpp - an explicit, seedable random generator and the weight initialisers.
//
// There is no global generator: whatever draws random numbers takes an Rng&. The generator is
// SplitMix64 with its own uniform and normal transforms, so a seed gives the same numbers with
// every compiler and standard library (std::normal_distribution is implementation-defined), and
// its whole state is one integer that a checkpoint can save.
#pragma once

#include "moa/error.hpp"
#include "moa/parameter.hpp"
#include "moa/tensor.hpp"

#include <cmath>
#include <cstdint>

namespace moa {

class Rng {
 public:
  explicit Rng(std::uint64_t seed = 0) : state_(seed) {}

  std::uint64_t next_u64() {
    std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }

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
  std::uint64_t state_;
};

template <typename Derived>
void init_normal(Eigen::MatrixBase<Derived>& matrix, Rng& rng, double mean, double stddev) {
  MOA_CHECK(stddev >= 0.0, "init_normal", "stddev must be non-negative, got ", stddev);
  using Scalar = typename Derived::Scalar;
  for (Index r = 0; r < matrix.rows(); ++r)
    for (Index c = 0; c < matrix.cols(); ++c) matrix(r, c) = static_cast<Scalar>(mean + stddev * rng.normal());
}

template <typename Derived>
void init_uniform(Eigen::MatrixBase<Derived>& matrix, Rng& rng, double low, double high) {
  MOA_CHECK(low <= high, "init_uniform", "low (", low, ") must not exceed high (", high, ")");
  using Scalar = typename Derived::Scalar;
  for (Index r = 0; r < matrix.rows(); ++r)
    for (Index c = 0; c < matrix.cols(); ++c) matrix(r, c) = static_cast<Scalar>(rng.uniform(low, high));
}

// Xavier (Glorot) uniform: U(-a, a), a = gain * sqrt(6 / (fan_in + fan_out)).
template <typename Derived>
void init_xavier_uniform(Eigen::MatrixBase<Derived>& matrix, Rng& rng, Index fan_in, Index fan_out, double gain = 1.0) {
  MOA_CHECK(fan_in > 0 && fan_out > 0, "init_xavier_uniform", "fans must be positive, got fan_in ", fan_in,
            ", fan_out ", fan_out);
  const double bound = gain * std::sqrt(6.0 / static_cast<double>(fan_in + fan_out));
  init_uniform(matrix, rng, -bound, bound);
}

// Parameter overloads; for a weight [out, in] the fans are in and out, for a 3-d expert weight
// [E, out, in] they are those of one expert's matrix.
template <typename Scalar>
void init_xavier_uniform(Parameter<Scalar>& parameter, Rng& rng, double gain = 1.0) {
  MOA_CHECK(parameter.shape.size() >= 2, "init_xavier_uniform", "parameter '", parameter.name,
            "' needs at least 2 dimensions");
  const Index fan_in = parameter.shape[parameter.shape.size() - 1];
  const Index fan_out = parameter.shape[parameter.shape.size() - 2];
  init_xavier_uniform(parameter.value, rng, fan_in, fan_out, gain);
}

template <typename Scalar>
void init_normal(Parameter<Scalar>& parameter, Rng& rng, double mean, double stddev) {
  init_normal(parameter.value, rng, mean, stddev);
}

template <typename Scalar>
void init_zeros(Parameter<Scalar>& parameter) {
  parameter.value.setZero();
}

}  // namespace moa
