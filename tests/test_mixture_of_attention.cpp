#include "attention_support.hpp"

#include "moa/io/safetensors.hpp"

#include <cmath>

using namespace moa_test;

namespace {

moa::MixtureOfAttentionConfig small_config(Index experts, Index k, moa::GateNormalization gates =
                                                                         moa::GateNormalization::renormalized) {
  moa::MixtureOfAttentionConfig config;
  config.model_dim = 6;
  config.num_experts = experts;
  config.top_k = k;
  config.head_dim = 3;
  config.gate_normalization = gates;
  config.causal_block = 2;  // several causal blocks even in short sequences
  return config;
}

}  // namespace

TEST_CASE("MixtureOfAttention: parameter names and shapes are those of MOA.md", "[moa]") {
  moa::Rng rng(0);
  moa::MixtureOfAttention<float> layer(small_config(4, 2), rng);
  const auto parameters = moa::parameters_of(layer, "encoder.layers.0.self_attn.");
  REQUIRE(parameters.size() == 5);
  REQUIRE(parameters.at("encoder.layers.0.self_attn.router.weight").shape == std::vector<Index>{4, 6});
  REQUIRE(parameters.at("encoder.layers.0.self_attn.q_proj.weight").shape == std::vector<Index>{4, 3, 6});
  REQUIRE(parameters.at("encoder.layers.0.self_attn.o_proj.weight").shape == std::vector<Index>{4, 6, 3});
  REQUIRE(parameters.at("encoder.layers.0.self_attn.k_proj.weight").shape == std::vector<Index>{3, 6});
  REQUIRE(parameters.at("encoder.layers.0.self_attn.v_proj.weight").shape == std::vector<Index>{3, 6});
  REQUIRE(layer.router.weight.value.isZero(0));  // uniform routing at start, as the authors' code
  auto noisy_config = small_config(4, 2);
  noisy_config.noisy_gating = true;
  moa::MixtureOfAttention<float> noisy(noisy_config, rng);
  REQUIRE(moa::parameters_of(noisy).at("router.noise_weight").shape == std::vector<Index>{4, 6});
}

TEST_CASE("MixtureOfAttention equals the naive per-token, per-expert oracle to 1e-12", "[moa][oracle]") {
  moa::Rng rng(1);
  for (const auto& gates : {moa::GateNormalization::renormalized, moa::GateNormalization::raw}) {
    for (Index k : {1, 2, 4}) {
      auto layer = make_moa_layer<double>(small_config(4, k, gates), rng);
      for (const AttentionCase& test_case : attention_cases()) {
        INFO(test_case.name << ", k = " << k);
        const MatrixD query = random_matrix(test_case.query_batch.rows(), 6, rng);
        const MatrixD memory = test_case.self ? query : random_matrix(test_case.key_batch.rows(), 6, rng);
        const MatrixD output =
            layer.forward(query, test_case.query_batch, memory, test_case.key_batch, test_case.causal);
        const MatrixD expected = naive_moa(layer, query, test_case.query_batch, memory, test_case.key_batch,
                                           test_case.causal);
        REQUIRE(expected.cwiseAbs().maxCoeff() > 1e-3);  // the comparison is not of zeros
        REQUIRE((output - expected).cwiseAbs().maxCoeff() < 1e-12);
        const auto& frozen = layer;  // the const inference path computes the same
        REQUIRE(frozen.infer(query, test_case.query_batch, memory, test_case.key_batch, test_case.causal) == output);
      }
    }
  }
}

TEST_CASE("MixtureOfAttention: padded query rows are zero and padded keys are never read", "[moa]") {
  moa::Rng rng(2);
  auto layer = make_moa_layer<double>(small_config(4, 2), rng);
  const auto batch = moa::SequenceBatch::padded(4, {4, 2});
  MatrixD input = random_matrix(8, 6, rng);
  const MatrixD output = layer.forward_self(input, batch, false);
  REQUIRE(output.row(6).isZero(0));
  REQUIRE(output.row(7).isZero(0));
  input.row(6).setConstant(1e6);  // padding content must not matter
  REQUIRE(layer.forward_self(input, batch, false) == output);
}

TEST_CASE("MixtureOfAttention: gradient check of every parameter and both inputs", "[moa][gradient]") {
  moa::Rng rng(3);
  for (const auto& gates : {moa::GateNormalization::renormalized, moa::GateNormalization::raw}) {
    for (Index k : {1, 2, 4}) {
      auto layer = make_moa_layer<double>(small_config(4, k, gates), rng);
      for (const AttentionCase& test_case : attention_cases()) {
        INFO(test_case.name << ", k = " << k << (gates == moa::GateNormalization::raw ? ", raw gates" : ""));
        REQUIRE_GRADIENTS_OK(check_attention_gradients(layer, test_case, rng));
      }
    }
  }
}

TEST_CASE("MixtureOfAttention: gradient check with noisy gating and sampled experts", "[moa][gradient]") {
  moa::Rng rng(4);
  auto config = small_config(5, 3);
  config.noisy_gating = true;
  config.sampled_experts = 1;
  auto layer = make_moa_layer<double>(config, rng);
  REQUIRE(layer.training());
  for (const AttentionCase& test_case : attention_cases()) {
    INFO(test_case.name);
    REQUIRE_GRADIENTS_OK(check_attention_gradients(layer, test_case, rng, 1234));
  }
  // Without an Rng, training with noise cannot run; evaluation can.
  const MatrixD input = random_matrix(4, 6, rng);
  REQUIRE_MOA_ERROR(layer.forward_self(input, moa::SequenceBatch::full(1, 4), false), "draw random numbers in training: pass an Rng");
  layer.set_training(false);
  REQUIRE(layer.forward_self(input, moa::SequenceBatch::full(1, 4), false).allFinite());
}

TEST_CASE("MixtureOfAttention: the aux loss, weighted by its coefficients, is part of the gradient", "[moa][gradient]") {
  moa::Rng rng(5);
  auto config = small_config(4, 2);
  config.load_balance_coefficient = 0.5;
  config.z_loss_coefficient = 0.25;
  auto layer = make_moa_layer<double>(config, rng);
  MatrixD input = random_matrix(6, 6, rng);
  const auto batch = moa::SequenceBatch::full(2, 3);
  layer.forward_self(input, batch, true);
  REQUIRE(layer.aux_loss() > 0.0);
  // With a zero output gradient, only the aux loss drives the gradient.
  auto parameters = moa::parameters_of(layer);
  parameters.zero_grad();
  const MatrixD grad_input = layer.backward_self(MatrixD::Zero(6, 6));
  REQUIRE(parameters.at("q_proj.weight").grad().isZero(0));
  const MatrixD analytic = parameters.at("router.weight").grad();
  REQUIRE_GRADIENTS_OK(moa::check_gradients(
      [&] {
        layer.forward_self(input, batch, true);
        return layer.aux_loss();
      },
      {{"router.weight", &layer.router.weight.value, &analytic}, {"input", &input, &grad_input}}));
}

TEMPLATE_TEST_CASE("MixtureOfAttention: cached decoding equals the full causal forward", "[moa][cache]", float,
                   double) {
  moa::Rng rng(6);
  for (Index k : {1, 2, 4}) {
    auto config = small_config(4, k);
    config.model_dim = 8;
    auto layer = make_moa_layer<TestType>(config, rng);
    require_cached_decoding_matches(layer, 3, 7, rng);
  }
}

TEST_CASE("MixtureOfAttention: a beam reorder gives the cache of the reordered prefixes", "[moa][cache]") {
  moa::Rng rng(7);
  auto layer = make_moa_layer<float>(small_config(4, 2), rng);
  require_beam_reorder_matches(layer, rng);
}

TEST_CASE("MixtureOfAttention: the cross-attention cache gives the full cross-attention", "[moa][cache]") {
  moa::Rng rng(8);
  auto layer = make_moa_layer<float>(small_config(4, 2), rng);
  require_cross_cache_matches(layer, rng);
}

TEST_CASE("MixtureOfAttention: the cache holds one key and value row of width d_h per token", "[moa][cache]") {
  moa::Rng rng(9);
  moa::MixtureOfAttention<float> layer(small_config(8, 4), rng);
  const auto cache = layer.make_self_cache(2, 10);
  REQUIRE(cache.width() == 3);
  moa::MultiHeadAttention<float> mha({6, 4, 3}, rng);
  REQUIRE(mha.make_self_cache(2, 10).width() == 12);
}

TEST_CASE("MixtureOfAttention: routing statistics and each token's experts", "[moa]") {
  moa::Rng rng(10);
  auto layer = make_moa_layer<double>(small_config(4, 2), rng);
  layer.forward_self(random_matrix(10, 6, rng), moa::SequenceBatch::padded(5, {5, 3}), false);
  const auto stats = layer.routing_statistics();
  REQUIRE(std::accumulate(stats.counts.begin(), stats.counts.end(), Index{0}) == 8 * 2);
  double total = 0;
  for (double share : stats.load) total += share;
  REQUIRE(total == Approx(1.0));
  REQUIRE(stats.load_entropy > 0.0);
  REQUIRE(stats.load_entropy <= std::log(4.0) + 1e-12);
  REQUIRE(stats.mean_token_entropy > 0.0);
  const auto& experts = layer.router.experts();
  REQUIRE(experts.size() == 20);
  REQUIRE(experts[2 * 8] == -1);  // row 8 is padding
  REQUIRE(experts[0] != experts[1]);
}

TEST_CASE("MixtureOfAttention: the cost of a forward grows with k, not E", "[moa]") {
  moa::Rng rng(11);
  const auto batch = moa::SequenceBatch::full(2, 8);
  auto flops_for = [&](Index experts, Index k) {
    auto config = small_config(experts, k);
    auto layer = make_moa_layer<float>(config, rng);
    layer.forward_self(random_matrix<float>(16, 6, rng), batch, false);
    return layer.last_forward_flops() - 2.0 * 16 * 6 * experts;  // without the router's E-wide logits
  };
  REQUIRE(flops_for(4, 2) == flops_for(64, 2));
  REQUIRE(flops_for(4, 4) > flops_for(4, 2));
}

TEST_CASE("MixtureOfAttention: safetensors round trip", "[moa][safetensors]") {
  moa::Rng rng(12);
  auto saved = make_moa_layer<float>(small_config(4, 2), rng);
  moa::MixtureOfAttention<float> loaded(small_config(4, 2), rng);
  const std::string path = temporary_path("moa.safetensors");
  moa::save_safetensors(path, moa::parameters_of(saved, "attn."));
  moa::load_safetensors(path, moa::parameters_of(loaded, "attn."));
  const MatrixF input = random_matrix<float>(6, 6, rng);
  const auto batch = moa::SequenceBatch::full(2, 3);
  REQUIRE(loaded.forward_self(input, batch, true) == saved.forward_self(input, batch, true));
  moa::MixtureOfAttention<float> other(small_config(8, 2), rng);
  REQUIRE_MOA_ERROR(moa::load_safetensors(path, moa::parameters_of(other, "attn.")),
                    "tensor 'attn.router.weight' has shape [4, 6] but the parameter has shape [8, 6]");
}

TEST_CASE("MixtureOfAttention: a tiny layer learns to imitate a teacher", "[moa][convergence]") {
  moa::Rng rng(13);
  auto config = small_config(4, 2);
  auto teacher = make_moa_layer<float>(config, rng);
  moa::MixtureOfAttention<float> student(config, rng);
  auto parameters = moa::parameters_of(student);
  moa::Adam<float> adam(parameters);
  const auto batch = moa::SequenceBatch::full(4, 6);
  float first_loss = 0, loss = 0;
  for (int step = 0; step < 400; ++step) {
    const MatrixF input = random_matrix<float>(batch.rows(), 6, rng);
    const MatrixF target = teacher.forward_self(input, batch, true);
    const MatrixF output = student.forward_self(input, batch, true);
    loss = (output - target).squaredNorm() / static_cast<float>(output.size());
    if (step == 0) first_loss = loss;
    parameters.zero_grad();
    student.backward_self(2.0f * (output - target) / static_cast<float>(output.size()));
    adam.step(1e-2);
  }
  INFO("first loss " << first_loss << ", last loss " << loss);
  REQUIRE(loss < 0.1f * first_loss);
}

TEST_CASE("MixtureOfAttention: bad configuration and input throw moa::Error", "[moa][errors]") {
  moa::Rng rng(14);
  auto config = small_config(4, 2);
  config.top_k = 5;
  REQUIRE_MOA_ERROR(moa::MixtureOfAttention<float>(config, rng), "MixtureOfAttention: top_k must be in [1, num_experts = 4], got 5");
  config.top_k = 0;
  REQUIRE_MOA_ERROR(moa::MixtureOfAttention<float>(config, rng), "top_k must be in [1, num_experts = 4], got 0");
  config = small_config(4, 2);
  config.head_dim = 0;
  REQUIRE_MOA_ERROR(moa::MixtureOfAttention<float>(config, rng), "head_dim must be positive, got 0");
  config = small_config(4, 2);
  config.model_dim = -1;
  REQUIRE_MOA_ERROR(moa::MixtureOfAttention<float>(config, rng), "model_dim must be positive");
  config = small_config(4, 2);
  config.sampled_experts = 3;
  REQUIRE_MOA_ERROR(moa::MixtureOfAttention<float>(config, rng), "sampled_experts must be in [0, top_k = 2], got 3");
  config = small_config(4, 2);
  config.z_loss_coefficient = -1;
  REQUIRE_MOA_ERROR(moa::MixtureOfAttention<float>(config, rng), "aux coefficients must be non-negative");
  moa::MixtureOfAttention<float> layer(small_config(4, 2), rng);
  require_attention_bad_input_throws(layer, "MixtureOfAttention");
}
