// moa/init.hpp - weight initialisers: normal, uniform, Xavier, zeros, on matrices or Parameters.
#pragma once

#include "moa/error.hpp"
#include "moa/parameter.hpp"
#include "moa/random.hpp"
#include "moa/tensor.hpp"

#include <cmath>

namespace moa {

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
  parameter.touch();
}

template <typename Scalar>
void init_normal(Parameter<Scalar>& parameter, Rng& rng, double mean, double stddev) {
  init_normal(parameter.value, rng, mean, stddev);
  parameter.touch();
}

template <typename Scalar>
void init_zeros(Parameter<Scalar>& parameter) {
  parameter.value.setZero();
  parameter.touch();
}

}  // namespace moa
