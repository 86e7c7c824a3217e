// Gradient checks, float against double and save/load: the op table (op_table.hpp, test_ops.cpp).
#include "support.hpp"

using namespace moa_test;

TEMPLATE_TEST_CASE("Dropout: identity in evaluation, scaled mask in training", "[dropout]", float, double) {
  moa::Rng rng(0);
  moa::Dropout<TestType> dropout(0.25);
  const moa::Matrix<TestType> input = moa::Matrix<TestType>::Ones(100, 100);
  dropout.set_training(false);
  REQUIRE(dropout.forward(input, rng) == input);
  REQUIRE(dropout.backward(input) == input);
  dropout.set_training(true);
  const auto output = dropout.forward(input, rng);
  const double dropped = (output.array() == TestType(0)).template cast<double>().mean();
  REQUIRE(dropped == Approx(0.25).margin(0.02));
  for (moa::Index i = 0; i < output.size(); ++i) {
    const TestType value = output.data()[i];
    REQUIRE((value == TestType(0) || value == Approx(1 / 0.75)));
  }
}

TEST_CASE("Dropout: the same seed gives the same mask", "[dropout]") {
  moa::Dropout<float> dropout(0.5);
  moa::Rng first(9), second(9);
  const MatrixF input = MatrixF::Ones(8, 8);
  REQUIRE(dropout.forward(input, first) == dropout.forward(input, second));
}

TEST_CASE("Dropout: entry i is dropped when draw i of the stream gives uniform() < p", "[dropout]") {
  // The mask tests the draws in integers; this is the definition it must agree with, at
  // probabilities that are not multiples of 2^-53 (ceil rounds them up) and at a tiny one.
  for (double probability : {0.1, 0.3, 0.5, 1.0 / 3.0, 0.999, 1e-17}) {
    moa::Dropout<float> dropout(probability);
    moa::Rng rng(123), reference(123);
    const MatrixF input = MatrixF::Ones(37, 29);
    const MatrixF output = dropout.forward(input, rng);
    const float scale = static_cast<float>(1.0 / (1.0 - probability));
    for (moa::Index i = 0; i < output.size(); ++i) {
      const float expected = reference.uniform() < probability ? 0.0f : scale;
      REQUIRE(output.data()[i] == expected);
    }
    REQUIRE(rng.state() == reference.state());  // the forward took one draw per entry
  }
}

TEST_CASE("Dropout: bad input throws moa::Error", "[dropout][errors]") {
  REQUIRE_MOA_ERROR(moa::Dropout<float>(1.0), "Dropout: probability must be in [0, 1), got 1");
  REQUIRE_MOA_ERROR(moa::Dropout<float>(-0.1), "probability must be in [0, 1)");
  moa::Dropout<float> dropout(0.5);
  moa::Rng rng(1);
  dropout.forward(MatrixF::Ones(2, 3), rng);
  REQUIRE_MOA_ERROR(dropout.backward(MatrixF::Ones(3, 2)), "Dropout::backward: grad_output has shape [3, 2]");
}
