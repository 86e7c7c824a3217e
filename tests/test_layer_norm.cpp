// Gradient checks, float against double and save/load: the op table (op_table.hpp, test_ops.cpp).
#include "support.hpp"


#include <cmath>

using namespace moa_test;

TEMPLATE_TEST_CASE("LayerNorm: known forward", "[layer_norm]", float, double) {
  moa::LayerNorm<TestType> norm(4);
  moa::Matrix<TestType> input(1, 4);
  input << 1, 2, 3, 4;
  norm.weight.value << 1, 2, 1, 1;
  norm.bias.value << 0, 0, 0, 1;
  const auto output = norm.forward(input);
  const double inverse_std = 1.0 / std::sqrt(1.25 + 1e-5);
  REQUIRE(output(0, 0) == Approx(-1.5 * inverse_std));
  REQUIRE(output(0, 1) == Approx(-1.0 * inverse_std));
  REQUIRE(output(0, 2) == Approx(0.5 * inverse_std));
  REQUIRE(output(0, 3) == Approx(1.5 * inverse_std + 1));
}

TEST_CASE("LayerNorm: bad input throws moa::Error", "[layer_norm][errors]") {
  REQUIRE_MOA_ERROR(moa::LayerNorm<float>(0), "LayerNorm: features must be positive");
  REQUIRE_MOA_ERROR(moa::LayerNorm<float>(3, 0.0), "epsilon must be positive");
  moa::LayerNorm<float> norm(3);
  REQUIRE_MOA_ERROR(norm.forward(MatrixF::Zero(2, 4)), "LayerNorm::forward: input has shape [2, 4], expected [N, 3]");
  norm.forward(MatrixF::Zero(2, 3));
  REQUIRE_MOA_ERROR(norm.backward(MatrixF::Zero(2, 2)), "LayerNorm::backward");
}
