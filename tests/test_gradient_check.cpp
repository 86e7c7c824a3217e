#include "support.hpp"

#include <cmath>

using namespace moa_test;

namespace {

// f(x, w) = sum_i w_i * x_i^2 * sin(x_i), an op whose backward we can get right or wrong on purpose.
enum class Mistake { none, sign_flipped, dropped_term, zero_gradient };

struct Fixture {
  MatrixD x, w, grad_x, grad_w;
  explicit Fixture(Mistake mistake) {
    moa::Rng rng(3);
    x = random_matrix(3, 4, rng);
    w = random_matrix(3, 4, rng);
    const auto xa = x.array();
    grad_w = (xa.square() * xa.sin()).matrix();
    // d/dx = w * (2 x sin x + x^2 cos x)
    const auto product_first = 2.0 * xa * xa.sin();
    const auto product_second = xa.square() * xa.cos();
    switch (mistake) {
      case Mistake::none: grad_x = (w.array() * (product_first + product_second)).matrix(); break;
      case Mistake::sign_flipped: grad_x = (w.array() * (product_first - product_second)).matrix(); break;
      case Mistake::dropped_term: grad_x = (w.array() * product_first).matrix(); break;
      case Mistake::zero_gradient: grad_x = MatrixD::Zero(3, 4); break;
    }
  }
  double loss() const { return (w.array() * x.array().square() * x.array().sin()).sum(); }
  moa::GradientCheckResult check() {
    return moa::check_gradients([this] { return loss(); }, {{"x", &x, &grad_x}, {"w", &w, &grad_w}});
  }
};

}  // namespace

TEST_CASE("check_gradients passes a correct backward", "[gradient_check]") {
  Fixture fixture(Mistake::none);
  const auto result = fixture.check();
  INFO(result.message);
  REQUIRE(result.passed);
  REQUIRE(result.entries_checked == 24);
  REQUIRE(result.max_relative_error < 1e-8);
}

TEST_CASE("check_gradients catches a sign-flipped term", "[gradient_check]") {
  Fixture fixture(Mistake::sign_flipped);
  const auto result = fixture.check();
  REQUIRE_FALSE(result.passed);
  REQUIRE(result.message.find("x[") != std::string::npos);
}

TEST_CASE("check_gradients catches a dropped term", "[gradient_check]") {
  Fixture fixture(Mistake::dropped_term);
  REQUIRE_FALSE(fixture.check().passed);
}

TEST_CASE("check_gradients fails an analytic zero where the numeric gradient is not", "[gradient_check]") {
  Fixture fixture(Mistake::zero_gradient);
  const auto result = fixture.check();
  REQUIRE_FALSE(result.passed);
  REQUIRE(result.max_relative_error == Approx(1.0));
}

TEST_CASE("check_gradients fails a vacuous check of a tensor the loss ignores", "[gradient_check]") {
  MatrixD x = MatrixD::Ones(2, 2), unused = MatrixD::Ones(2, 2);
  const MatrixD grad_x = 2.0 * x, grad_unused = MatrixD::Zero(2, 2);
  auto loss = [&] { return x.squaredNorm(); };
  const auto result = moa::check_gradients(loss, {{"x", &x, &grad_x}, {"unused", &unused, &grad_unused}});
  REQUIRE_FALSE(result.passed);
  REQUIRE(result.message.find("unused: the numeric gradient is zero everywhere") != std::string::npos);
  const auto allowed = moa::check_gradients(loss, {{"x", &x, &grad_x}, {"unused", &unused, &grad_unused, true}});
  REQUIRE(allowed.passed);
}

TEST_CASE("check_gradients rejects bad arguments", "[gradient_check]") {
  MatrixD x = MatrixD::Ones(2, 2);
  const MatrixD wrong = MatrixD::Ones(3, 2);
  REQUIRE_MOA_ERROR(moa::check_gradients([] { return 0.0; }, {}), "no tensors");
  REQUIRE_MOA_ERROR(moa::check_gradients([] { return 0.0; }, {{"x", &x, &wrong}}), "analytic gradient shape [3, 2]");
}
