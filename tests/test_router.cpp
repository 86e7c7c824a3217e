#include "attention_support.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

using namespace moa_test;

namespace {

moa::RouterConfig router_config(Index model, Index experts, Index k) {
  moa::RouterConfig config;
  config.model_dim = model;
  config.num_experts = experts;
  config.top_k = k;
  return config;
}

std::vector<char> all_routed(Index rows) { return std::vector<char>(static_cast<std::size_t>(rows), 1); }

}  // namespace

TEST_CASE("top_k_indices: largest first, ties toward the lower index", "[router]") {
  const double values[] = {1, 3, 3, 0, 3};
  Index chosen[3];
  moa::top_k_indices(values, 5, 3, chosen);
  REQUIRE(chosen[0] == 1);
  REQUIRE(chosen[1] == 2);
  REQUIRE(chosen[2] == 4);
  REQUIRE_MOA_ERROR(moa::top_k_indices(values, 5, 6, chosen), "k = 6 must be in [1, 5]");
}

// The k largest by a stable sort: largest first, equal values in index order.
template <typename Scalar>
std::vector<Index> sorted_top_k(const std::vector<Scalar>& values, Index k) {
  std::vector<Index> order(values.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = static_cast<Index>(i);
  std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) { return values[a] > values[b]; });
  order.resize(static_cast<std::size_t>(k));
  return order;
}

TEMPLATE_TEST_CASE("top_k_indices equals a stable sort on finite rows of every length, with and without ties",
                   "[router]", float, double) {
  // Rows of up to 300 values and k up to 12 take both ways through top_k_indices (the passes over
  // router-sized rows, the insertion elsewhere); values drawn from 4 levels make ties common.
  moa::Rng rng(5);
  for (const bool ties : {false, true}) {
    for (Index length = 1; length <= 300; length += length < 40 ? 1 : 37) {
      for (Index k = 1; k <= std::min<Index>(length, 12); ++k) {
        std::vector<TestType> values(static_cast<std::size_t>(length));
        for (auto& value : values)
          value = ties ? static_cast<TestType>(rng.next_u64() % 4) - TestType(1.5) : static_cast<TestType>(rng.normal());
        std::vector<Index> chosen(static_cast<std::size_t>(k));
        moa::top_k_indices(values.data(), length, k, chosen.data());
        INFO("length " << length << ", k " << k << (ties ? ", with ties" : ""));
        REQUIRE(chosen == sorted_top_k(values, k));
      }
    }
  }
}

TEST_CASE("top_k_indices: rows with NaN or infinities keep the insertion's order", "[router]") {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  // 12 values, k = 2: the size where finite rows take the passes.
  std::vector<float> values = {0.1f, 0.5f, -inf, 0.2f, inf, 0.3f, 0.0f, 0.4f, 0.6f, -0.1f, 0.05f, 0.7f};
  Index chosen[2];
  moa::top_k_indices(values.data(), 12, 2, chosen);
  REQUIRE(chosen[0] == 4);
  REQUIRE(chosen[1] == 11);
  values[4] = nan;  // NaN never enters the list once it is full, nor moves ahead of a value
  moa::top_k_indices(values.data(), 12, 2, chosen);
  REQUIRE(chosen[0] == 11);
  REQUIRE(chosen[1] == 8);
  values[0] = nan;  // ... but the first k values fill it whatever they are, and nothing passes a NaN
  moa::top_k_indices(values.data(), 12, 2, chosen);
  REQUIRE(chosen[0] == 0);
  REQUIRE(chosen[1] == 11);
}

TEST_CASE("DispatchPlan groups assignments by expert with counts and offsets", "[router]") {
  // k = 2: token 0 -> (2, 0), token 1 -> (1, 2), token 2 is padding, token 3 -> (0, 2)
  const auto plan = moa::DispatchPlan::build({2, 0, 1, 2, -1, -1, 0, 2}, 4, 2);
  REQUIRE(plan.offsets == std::vector<Index>{0, 2, 3, 6, 6});
  REQUIRE(plan.order == std::vector<Index>{1, 6, 2, 0, 3, 7});
  REQUIRE(plan.count(3) == 0);
  REQUIRE_MOA_ERROR(moa::DispatchPlan::build({0, 4}, 4, 2), "expert 4 is outside [0, 4)");
  REQUIRE_MOA_ERROR(moa::DispatchPlan::build({0, 1, 2}, 4, 2), "not a multiple of top_k = 2");
}

TEST_CASE("Router: a hand-computed case of gates, L_a and L_z", "[router]") {
  moa::Rng rng(0);
  for (auto gates : {moa::GateNormalization::renormalized, moa::GateNormalization::raw}) {
    auto config = router_config(1, 3, 1);
    config.gate_normalization = gates;
    moa::Router<double> router(config, rng);
    router.weight.value << 0, std::log(2.0), std::log(3.0);
    MatrixD input(3, 1);
    input << 1, -1, 5;
    router.forward(input, {1, 1, 0});  // the third token is padding
    // Token 0: p = [1, 2, 3] / 6 -> expert 2. Token 1: p = [6, 3, 2] / 11 -> expert 0.
    REQUIRE(router.experts() == std::vector<Index>{2, 0, -1});
    const bool raw = gates == moa::GateNormalization::raw;
    REQUIRE(router.gates()(0, 0) == Approx(raw ? 0.5 : 1.0));
    REQUIRE(router.gates()(1, 0) == Approx(raw ? 6.0 / 11 : 1.0));
    // f = [1/2, 0, 1/2], P = [(1/6 + 6/11)/2, ., (1/2 + 2/11)/2]: L_a = 3 (47/264 + 45/264)
    REQUIRE(router.load_balance_loss() == Approx(3.0 * 92.0 / 264.0));
    const double lse0 = std::log(6.0), lse1 = std::log(11.0 / 6.0);
    REQUIRE(router.z_loss() == Approx((lse0 * lse0 + lse1 * lse1) / 2));
    REQUIRE(router.aux_loss() == Approx(0.01 * 3.0 * 92.0 / 264.0 + 0.001 * (lse0 * lse0 + lse1 * lse1) / 2));
    REQUIRE(router.routed_tokens() == 2);
  }
}

TEST_CASE("Router: a uniform router gives L_a = 1 and L_z = (log E)^2; ties go to the lowest experts", "[router]") {
  moa::Rng rng(1);
  for (Index k : {1, 2, 3}) {
    moa::Router<double> router(router_config(4, 5, k), rng);  // zero weights
    router.forward(random_matrix(7, 4, rng), all_routed(7));
    REQUIRE(router.load_balance_loss() == Approx(1.0));
    REQUIRE(router.z_loss() == Approx(std::log(5.0) * std::log(5.0)));
    for (Index t = 0; t < 7; ++t)
      for (Index j = 0; j < k; ++j) REQUIRE(router.experts()[t * k + j] == j);
  }
}

TEST_CASE("Router: with k = E, L_a is constant and only the z-loss acts", "[router][gradient]") {
  moa::Rng rng(2);
  auto config = router_config(4, 3, 3);
  config.z_loss_coefficient = 0.0;
  moa::Router<double> router(config, rng);
  moa::init_normal(router.weight, rng, 0.0, 1.0);
  const MatrixD input = random_matrix(6, 4, rng);
  router.forward(input, all_routed(6));
  REQUIRE(router.load_balance_loss() == Approx(1.0));
  router.weight.zero_grad();
  router.backward(MatrixD::Zero(6, 3));
  REQUIRE(router.weight.grad.cwiseAbs().maxCoeff() < 1e-15);
}

TEST_CASE("Router: gradient check of gates and aux losses, with noise and sampling", "[router][gradient]") {
  moa::Rng rng(3);
  for (int variant = 0; variant < 4; ++variant) {
    auto config = router_config(5, 6, 3);
    config.gate_normalization = variant % 2 ? moa::GateNormalization::raw : moa::GateNormalization::renormalized;
    config.noisy_gating = variant >= 2;
    config.sampled_experts = variant == 3 ? 2 : 0;
    config.load_balance_coefficient = 0.3;
    config.z_loss_coefficient = 0.2;
    moa::Router<double> router(config, rng);
    moa::init_normal(router.weight, rng, 0.0, 1.0);
    MatrixD input = random_matrix(8, 5, rng);
    const std::vector<char> routed{1, 1, 0, 1, 1, 1, 1, 0};
    const MatrixD gate_weights = random_matrix(8, 3, rng);
    auto run = [&] {
      moa::Rng noise(5);
      router.forward(input, routed, noise);
      return router.gates().cwiseProduct(gate_weights).sum() + router.aux_loss();
    };
    run();
    auto parameters = moa::parameters_of(router);
    parameters.zero_grad();
    const MatrixD grad_input = router.backward(gate_weights);
    REQUIRE(grad_input.row(2).isZero(0));  // padding
    std::vector<moa::GradientCheckTensor> tensors{{"input", &input, &grad_input}};
    std::vector<MatrixD> analytic;
    for (const auto& entry : parameters) analytic.push_back(entry.grad());
    for (std::size_t i = 0; i < parameters.size(); ++i)
      tensors.push_back({parameters[i].name, parameters[i].value(), &analytic[i]});
    INFO("variant " << variant);
    REQUIRE_GRADIENTS_OK(moa::check_gradients(run, tensors));
  }
}

TEST_CASE("Router: sampled experts are distinct and follow the probabilities", "[router]") {
  moa::Rng rng(4);
  auto config = router_config(2, 4, 2);
  config.sampled_experts = 1;
  moa::Router<double> router(config, rng);
  router.weight.value << 3, 0, 0, 0, 0, 0, -30, 0;  // expert 0 first, 1 and 2 alike, 3 almost never
  const MatrixD input = MatrixD::Constant(2000, 2, 1.0);
  moa::Rng sampler(6);
  router.forward(input, all_routed(2000), sampler);
  std::vector<int> second(4, 0);
  for (Index t = 0; t < 2000; ++t) {
    REQUIRE(router.experts()[t * 2] == 0);
    second[router.experts()[t * 2 + 1]]++;
  }
  REQUIRE(second[0] == 0);
  REQUIRE(second[3] == 0);
  REQUIRE(second[1] == Approx(1000).margin(120));
  REQUIRE(second[2] == Approx(1000).margin(120));
  router.set_training(false);  // evaluation takes the top k: experts 0 and 1
  router.forward(input.topRows(1), all_routed(1));
  REQUIRE(router.experts() == std::vector<Index>{0, 1});
}

TEST_CASE("Router: bad input throws moa::Error", "[router][errors]") {
  moa::Rng rng(5);
  REQUIRE_MOA_ERROR(moa::Router<float>(router_config(4, 0, 1), rng), "Router: num_experts must be positive");
  moa::Router<float> router(router_config(4, 3, 2), rng);
  REQUIRE_MOA_ERROR(router.forward(MatrixF::Zero(2, 5), all_routed(2)),
                    "Router::forward: input has shape [2, 5], expected [N, 4]");
  REQUIRE_MOA_ERROR(router.forward(MatrixF::Zero(2, 4), all_routed(3)), "routed has 3 flags for 2 input rows");
  router.forward(MatrixF::Zero(2, 4), all_routed(2));
  REQUIRE_MOA_ERROR(router.backward(MatrixF::Zero(2, 3)), "Router::backward: grad_gates has shape [2, 3], expected [2, 2]");
}

TEST_CASE("Router::route gives evaluation's experts and gates and leaves the forward state alone", "[router]") {
  moa::Rng rng(8);
  auto config = router_config(4, 6, 2);
  config.noisy_gating = true;
  for (auto normalization : {moa::GateNormalization::renormalized, moa::GateNormalization::raw}) {
    config.gate_normalization = normalization;
    moa::Router<double> router(config, rng);
    moa::init_normal(router.weight.value, rng, 0.0, 1.0);
    const MatrixD input = random_matrix(5, 4, rng);
    router.forward(input, all_routed(5), rng);  // training, noisy: what backward will use
    const std::vector<Index> trained_experts = router.experts();
    const MatrixD trained_gates = router.gates();
    const auto routing = router.route(input);
    REQUIRE(router.experts() == trained_experts);
    REQUIRE(router.gates() == trained_gates);
    REQUIRE(router.training());
    router.set_training(false);
    router.forward(input, all_routed(5));
    REQUIRE(routing.experts == router.experts());
    REQUIRE(routing.gates == router.gates());
    // With padding flags: padding rows are not routed, as in forward.
    const std::vector<char> routed{1, 0, 1, 1, 0};
    router.forward(input, routed);
    const auto padded = router.route(input, routed);
    REQUIRE(padded.experts == router.experts());
    REQUIRE(padded.gates == router.gates());
    REQUIRE(padded.experts[2] == -1);
    REQUIRE(padded.gates.row(4).isZero(0));
  }
  REQUIRE_MOA_ERROR(moa::Router<float>(router_config(4, 6, 2), rng).route(MatrixF::Zero(2, 3)),
                    "Router::route: input has shape [2, 3], expected [N, 4]");
  REQUIRE_MOA_ERROR(moa::Router<float>(router_config(4, 6, 2), rng).route(MatrixF::Zero(2, 4), std::vector<char>{1}),
                    "Router::route: routed has 1 flags for 2 input rows");
}
