// Gradient checks, float against double and save/load: the op table (op_table.hpp, test_ops.cpp).
#include "support.hpp"


using namespace moa_test;

TEMPLATE_TEST_CASE("Linear: known forward", "[linear]", float, double) {
  moa::Rng rng(0);
  moa::Linear<TestType> linear(2, 3, true, rng);
  linear.weight.value << 1, 2, 3, 4, 5, 6;
  linear.bias.value << 1, -1, 0.5;
  moa::Matrix<TestType> input(2, 2);
  input << 1, 1, 2, -1;
  const auto output = linear.forward(input);
  REQUIRE(output.rows() == 2);
  REQUIRE(output.cols() == 3);
  REQUIRE(output(0, 0) == Approx(4));
  REQUIRE(output(0, 1) == Approx(6));
  REQUIRE(output(0, 2) == Approx(11.5));
  REQUIRE(output(1, 0) == Approx(1));
  REQUIRE(output(1, 2) == Approx(4.5));
}

TEST_CASE("Linear: backward accumulates parameter gradients", "[linear]") {
  moa::Rng rng(2);
  moa::Linear<double> linear(3, 2, true, rng);
  const MatrixD input = random_matrix(4, 3, rng), grad_output = random_matrix(4, 2, rng);
  linear.forward(input);
  linear.backward(grad_output);
  const MatrixD once = linear.weight.grad;
  linear.backward(grad_output);
  REQUIRE(linear.weight.grad.isApprox(2 * once));
}

TEST_CASE("Linear: bad input throws moa::Error", "[linear][errors]") {
  moa::Rng rng(4);
  REQUIRE_MOA_ERROR(moa::Linear<float>(0, 3, true, rng), "Linear: in_features must be positive, got 0");
  REQUIRE_MOA_ERROR(moa::Linear<float>(3, -1, true, rng), "out_features must be positive");
  moa::Linear<float> linear(3, 2, true, rng);
  REQUIRE_MOA_ERROR(linear.forward(MatrixF::Zero(4, 5)), "Linear::forward: input has shape [4, 5], expected [N, 3]");
  linear.forward(MatrixF::Zero(4, 3));
  REQUIRE_MOA_ERROR(linear.backward(MatrixF::Zero(3, 2)), "Linear::backward: grad_output has shape [3, 2]");
}
