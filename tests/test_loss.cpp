#include "support.hpp"

#include <cmath>
#include <limits>

using namespace moa_test;

TEMPLATE_TEST_CASE("CrossEntropyLoss: known values with smoothing and ignore index", "[loss]", float, double) {
  moa::Matrix<TestType> logits(3, 2);
  logits << 0, 0, std::log(1.0), std::log(3.0), 5, -5;
  moa::CrossEntropyLoss<TestType> plain;
  REQUIRE(plain.forward(logits.topRows(1), {0}) == Approx(std::log(2.0)));
  // p = [0.25, 0.75], target 1, eps = 0.1: 0.9 * -log 0.75 + 0.1 * -(log 0.25 + log 0.75) / 2
  moa::CrossEntropyLoss<TestType> smoothed(0.1, -100);
  moa::Matrix<TestType> second = logits.middleRows(1, 1);
  REQUIRE(smoothed.forward(second, {1}) == Approx(0.3426126868851864));
  REQUIRE(smoothed.nll() == Approx(-std::log(0.75)));
  // The third row is ignored: the mean is over the two counted rows.
  moa::CrossEntropyLoss<TestType> ignoring(0.0, -100);
  const TestType loss = ignoring.forward(logits, {0, 1, -100});
  REQUIRE(ignoring.counted() == 2);
  REQUIRE(loss == Approx((std::log(2.0) - std::log(0.75)) / 2));
  REQUIRE(ignoring.backward().row(2).isZero(0));
}

TEST_CASE("CrossEntropyLoss: all tokens ignored gives 0 and no NaN", "[loss]") {
  moa::CrossEntropyLoss<double> loss(0.1, 3);
  REQUIRE(loss.forward(MatrixD::Ones(2, 4), {3, 3}) == 0.0);
  REQUIRE(loss.backward().isZero(0));
}

TEST_CASE("CrossEntropyLoss: a NaN logit gives a NaN loss and gradient, never 0", "[loss]") {
  MatrixD logits = MatrixD::Zero(2, 4);
  logits(1, 2) = std::numeric_limits<double>::quiet_NaN();
  moa::CrossEntropyLoss<double> loss(0.1, -100);
  REQUIRE(std::isnan(loss.forward(logits, {0, 1})));
  REQUIRE(std::isnan(loss.nll()));
  const MatrixD grad = loss.backward();
  REQUIRE(grad.row(0).allFinite());
  REQUIRE(std::isnan(grad(1, 0)));
  // A row of -inf logits is no distribution: NaN too, not a loss of 0.
  logits.row(1).setConstant(-std::numeric_limits<double>::infinity());
  REQUIRE(std::isnan(loss.forward(logits, {0, 1})));
}

TEST_CASE("CrossEntropyLoss: gradient check with smoothing and an ignored row", "[loss][gradient]") {
  moa::Rng rng(4);
  MatrixD logits = random_matrix(5, 6, rng);
  const moa::TokenIds targets{0, 5, 0, 2, 3};
  moa::CrossEntropyLoss<double> loss(0.2, 0);
  loss.forward(logits, targets);
  const MatrixD analytic = loss.backward(2.5);  // d(2.5 * loss)
  REQUIRE(analytic.row(0).isZero(0));
  REQUIRE_GRADIENTS_OK(moa::check_gradients([&] { return 2.5 * loss.forward(logits, targets); },
                                            {{"logits", &logits, &analytic}}));
}

TEST_CASE("CrossEntropyLoss: bad input throws moa::Error", "[loss][errors]") {
  REQUIRE_MOA_ERROR(moa::CrossEntropyLoss<float>(1.5), "label_smoothing must be in [0, 1]");
  moa::CrossEntropyLoss<float> loss(0.0, -100);
  REQUIRE_MOA_ERROR(loss.forward(MatrixF::Zero(2, 3), {0}), "targets has 1 entries but logits have shape [2, 3]");
  REQUIRE_MOA_ERROR(loss.forward(MatrixF::Zero(2, 3), {0, 3}), "targets[1] = 3 is outside [0, 3)");
  REQUIRE_MOA_ERROR(loss.forward(MatrixF::Zero(1, 0), {0}), "expected at least one class");
}
