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

// A path in the tests' scratch folder, unique to this process: ctest runs test cases in parallel.
inline std::string temporary_path(const std::string& name) {
  return std::string(MOA_TEST_TMPDIR) + "/" + std::to_string(::getpid()) + "_" + name;
}

// Gradient check of a layer with Matrix forward(const Matrix&) and Matrix backward(const Matrix&):
// loss = sum(forward(input) .* R) for a fixed random R, checked for the input and every parameter.
template <typename Layer>
moa::GradientCheckResult check_layer_gradients(Layer& layer, MatrixD input, moa::Rng& rng,
                                               const moa::GradientCheckOptions& options = {}) {
  const MatrixD output = layer.forward(input);
  const MatrixD output_weights = random_matrix(output.rows(), output.cols(), rng);  // R
  auto parameters = moa::parameters_of(layer);
  parameters.zero_grad();
  const MatrixD grad_input = layer.backward(output_weights);
  std::vector<MatrixD> analytic;
  for (const auto& entry : parameters) analytic.push_back(entry.grad());
  std::vector<moa::GradientCheckTensor> tensors{{"input", &input, &grad_input}};
  for (std::size_t i = 0; i < parameters.size(); ++i)
    tensors.push_back({parameters[i].name, parameters[i].value(), &analytic[i]});
  return moa::check_gradients([&] { return layer.forward(input).cwiseProduct(output_weights).sum(); }, tensors,
                              options);
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

}  // namespace moa_test
