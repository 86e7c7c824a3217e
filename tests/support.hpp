// Helpers shared by moa's tests.
#pragma once

#if __has_include(<catch2/catch_all.hpp>)
#include <catch2/catch_all.hpp>
using Catch::Approx;
#else
#include <catch2/catch.hpp>
#endif

#include "moa/moa.hpp"
#include "moa/testing/gradient_check.hpp"

#include <unistd.h>

#include <string>
#include <vector>

namespace moa_test {

using moa::Index;
using MatrixD = moa::Matrix<double>;
using MatrixF = moa::Matrix<float>;

template <typename Scalar = double>
moa::Matrix<Scalar> random_matrix(Index rows, Index cols, moa::Rng& rng, double scale = 1.0) {
  moa::Matrix<Scalar> matrix(rows, cols);
  moa::init_normal(matrix, rng, 0.0, scale);
  return matrix;
}

// ||actual - expected|| / ||expected||
inline double relative_error(const MatrixD& actual, const MatrixD& expected) {
  const double scale = std::max(expected.norm(), 1e-30);
  return (actual - expected).norm() / scale;
}

// A path in the tests' scratch folder, unique to this process: ctest runs test cases in parallel.
inline std::string temporary_path(const std::string& name) {
  return std::string(MOA_TEST_TMPDIR) + "/" + std::to_string(::getpid()) + "_" + name;
}

// REQUIRE that a gradient check passed, printing what failed.
#define REQUIRE_GRADIENTS_OK(result)                   \
  do {                                                 \
    const auto& moa_check_result = (result);           \
    INFO(moa_check_result.message);                    \
    REQUIRE(moa_check_result.entries_checked > 0);     \
    REQUIRE(moa_check_result.passed);                  \
  } while (false)

// The message of the moa::Error that `action` throws, or a marker when it throws none. Any other
// exception propagates and fails the test.
template <typename Action>
std::string moa_error_message(Action&& action) {
  try {
    action();
  } catch (const moa::Error& error) {
    return error.what();
  }
  return "<no moa::Error thrown>";
}

// REQUIRE that an expression throws moa::Error whose message contains `fragment`.
#define REQUIRE_MOA_ERROR(expression, fragment)                                              \
  do {                                                                                       \
    const std::string moa_message = ::moa_test::moa_error_message([&] { expression; }); \
    INFO("message: " << moa_message);                                                        \
    REQUIRE(moa_message.find(fragment) != std::string::npos);                                \
  } while (false)

// Copies every parameter of `source` (double) into `target` (float), by name.
template <typename Target, typename Source>
void copy_parameters(Target& target, Source& source) {
  auto from = moa::parameters_of(source);
  auto to = moa::parameters_of(target);
  REQUIRE(from.size() == to.size());
  for (std::size_t i = 0; i < from.size(); ++i) {
    REQUIRE(from[i].name == to[i].name);
    to[i].value() = from[i].value().template cast<typename Target::Scalar>();
  }
}

// Every parameter gradient of `actual` (float) within `tolerance` of `expected` (double).
template <typename Float, typename Double>
void require_same_gradients(Float& actual, Double& expected, double tolerance) {
  auto float_parameters = moa::parameters_of(actual);
  auto double_parameters = moa::parameters_of(expected);
  for (std::size_t i = 0; i < float_parameters.size(); ++i) {
    INFO("parameter " << double_parameters[i].name);
    const MatrixD grad = float_parameters[i].grad().template cast<double>();
    REQUIRE(relative_error(grad, double_parameters[i].grad()) < tolerance);
  }
}

}  // namespace moa_test
