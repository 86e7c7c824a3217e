// Gradient checks, float against double and save/load: the op table (op_table.hpp, test_ops.cpp).
#include "support.hpp"


using namespace moa_test;

TEMPLATE_TEST_CASE("FeedForward: known forward for ReLU and GELU", "[feed_forward]", float, double) {
  moa::Rng rng(0);
  for (auto activation : {moa::Activation::relu, moa::Activation::gelu}) {
    moa::FeedForward<TestType> ffn(2, 2, activation, rng);
    ffn.fc1.weight.value << 1, 0, 0, 1;
    ffn.fc1.bias.value << 0, 0;
    ffn.fc2.weight.value << 1, 1, 0, 2;
    ffn.fc2.bias.value << 0, 1;
    moa::Matrix<TestType> input(1, 2);
    input << 1, -1;
    const auto output = ffn.forward(input);
    // hidden = act([1, -1]); ReLU: [1, 0]; GELU: [0.841344746, -0.158655254]
    const double h0 = activation == moa::Activation::relu ? 1.0 : 0.8413447460685429;
    const double h1 = activation == moa::Activation::relu ? 0.0 : -0.15865525393145707;
    REQUIRE(output(0, 0) == Approx(h0 + h1));
    REQUIRE(output(0, 1) == Approx(2 * h1 + 1));
  }
}

TEST_CASE("FeedForward: bad input throws moa::Error", "[feed_forward][errors]") {
  moa::Rng rng(3);
  REQUIRE_MOA_ERROR(moa::FeedForward<float>(0, 4, moa::Activation::relu, rng), "in_features must be positive");
  moa::FeedForward<float> ffn(3, 4, moa::Activation::relu, rng);
  REQUIRE_MOA_ERROR(ffn.forward(MatrixF::Zero(2, 4)), "FeedForward::forward: input has shape [2, 4], expected [N, 3]");
  ffn.forward(MatrixF::Zero(2, 3));
  REQUIRE_MOA_ERROR(ffn.backward(MatrixF::Zero(2, 4)), "Linear::backward");
}
