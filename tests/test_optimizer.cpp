#include "support.hpp"

#include <cmath>

using namespace moa_test;

namespace {

struct Scalar1 {
  moa::Parameter<double> theta{"theta", {1}};
  moa::ParameterList<double> list() {
    moa::ParameterList<double> parameters;
    parameters.add("", theta);
    return parameters;
  }
};

}  // namespace

TEST_CASE("Adam: the first steps match values computed by hand", "[optimizer]") {
  Scalar1 model;
  model.theta.value(0, 0) = 1.0;
  moa::Adam<double> adam(model.list(), {0.9, 0.999, 1e-8, 0.0, false});
  // Step t: m = 0.9 m + 0.1 g; v = 0.999 v + 0.001 g^2; theta -= 0.1 * m/(1-0.9^t) / (sqrt(v/(1-0.999^t)) + 1e-8)
  const double gradients[] = {2.0, -1.0, 0.5};
  const double expected[] = {0.9000000005, 0.8733662967024315, 0.8393233821389426};
  for (int t = 0; t < 3; ++t) {
    model.theta.grad(0, 0) = gradients[t];
    adam.step(0.1);
    REQUIRE(model.theta.value(0, 0) == Approx(expected[t]).epsilon(1e-12));
  }
  REQUIRE(adam.steps() == 3);
}

TEST_CASE("Adam with L2 weight decay and AdamW with decoupled decay: one step by hand", "[optimizer]") {
  Scalar1 l2, decoupled;
  l2.theta.value(0, 0) = decoupled.theta.value(0, 0) = 1.0;
  l2.theta.grad(0, 0) = decoupled.theta.grad(0, 0) = 2.0;
  moa::Adam<double> adam(l2.list(), {0.9, 0.999, 1e-8, 0.1, false});
  auto adamw = moa::make_adamw(decoupled.list(), {0.9, 0.999, 1e-8, 0.1, true});
  adam.step(0.1);
  adamw.step(0.1);
  // Adam: g = 2 + 0.1 * 1 = 2.1, first step moves by lr * g / (|g| + eps).
  REQUIRE(l2.theta.value(0, 0) == Approx(0.9000000004761904).epsilon(1e-12));
  // AdamW: theta = 1 * (1 - 0.1 * 0.1) = 0.99, then the Adam step of g = 2.
  REQUIRE(decoupled.theta.value(0, 0) == Approx(0.8900000004999999).epsilon(1e-12));
}

TEMPLATE_TEST_CASE("Adam minimises a quadratic", "[optimizer]", float, double) {
  moa::Parameter<TestType> weight("weight", {3, 2});
  moa::ParameterList<TestType> parameters;
  parameters.add("", weight);
  moa::Matrix<TestType> target(3, 2);
  target << 1, -2, 3, 0.5, -1, 2;
  moa::Adam<TestType> adam(parameters);
  double loss = 0;
  for (int step = 1; step <= 2000; ++step) {
    parameters.zero_grad();
    weight.grad = 2 * (weight.value - target);  // d/dw |w - target|^2
    adam.step(step < 1000 ? 0.05 : 0.005);
    loss = (weight.value - target).squaredNorm();
  }
  REQUIRE(loss < 1e-6);
}

TEST_CASE("InverseSqrtSchedule follows fairseq: linear warm-up then 1/sqrt(step)", "[optimizer]") {
  moa::InverseSqrtSchedule schedule(1e-3, 4000, 1e-7);
  REQUIRE(schedule(1) == Approx(1e-7 + (1e-3 - 1e-7) / 4000));
  REQUIRE(schedule(2000) == Approx(1e-7 + 2000 * (1e-3 - 1e-7) / 4000));
  REQUIRE(schedule(4000) == Approx(1e-3));
  REQUIRE(schedule(16000) == Approx(0.5e-3));
  moa::InverseSqrtSchedule no_warmup(2e-3, 0);
  REQUIRE(no_warmup(4) == Approx(1e-3));
  REQUIRE_MOA_ERROR(schedule(0), "step must be at least 1");
  REQUIRE_MOA_ERROR(moa::InverseSqrtSchedule(0.0, 10), "peak_lr must be positive");
  REQUIRE_MOA_ERROR(moa::InverseSqrtSchedule(1.0, -1), "warmup_steps must be non-negative");
}

TEST_CASE("clip_grad_norm scales by the global norm only when above the limit", "[optimizer]") {
  moa::Parameter<double> a("a", {2}), b("b", {1});
  moa::ParameterList<double> parameters;
  parameters.add("", a);
  parameters.add("", b);
  a.grad << 3, 0;
  b.grad << 4;
  REQUIRE(moa::clip_grad_norm(parameters, 10.0) == Approx(5.0));
  REQUIRE(a.grad(0, 0) == 3.0);
  REQUIRE(moa::clip_grad_norm(parameters, 1.0) == Approx(5.0));
  REQUIRE(a.grad(0, 0) == Approx(3.0 / (5.0 + 1e-6)));
  REQUIRE(b.grad(0, 0) == Approx(4.0 / (5.0 + 1e-6)));
  REQUIRE_MOA_ERROR(moa::clip_grad_norm(parameters, 0.0), "max_norm must be positive");
}

TEST_CASE("Adam: bad options throw moa::Error", "[optimizer][errors]") {
  Scalar1 model;
  REQUIRE_MOA_ERROR(moa::Adam<double>(model.list(), {1.0, 0.999, 1e-8, 0.0, false}), "beta1 must be in [0, 1)");
  REQUIRE_MOA_ERROR(moa::Adam<double>(model.list(), {0.9, 0.999, 0.0, 0.0, false}), "epsilon must be positive");
  REQUIRE_MOA_ERROR(moa::Adam<double>(model.list(), {0.9, 0.999, 1e-8, -1.0, false}), "weight_decay");
  moa::Adam<double> adam(model.list());
  REQUIRE_MOA_ERROR(adam.step(-1.0), "learning_rate must be finite and non-negative");
}
