#include "attention_support.hpp"

#include "moa/io/safetensors.hpp"

using namespace moa_test;

namespace {
const moa::MultiHeadAttentionConfig kConfig{6, 2, 3, 2};
}

TEST_CASE("MultiHeadAttention: parameter names and shapes", "[mha]") {
  moa::Rng rng(0);
  moa::MultiHeadAttention<float> layer(kConfig, rng);
  const auto parameters = moa::parameters_of(layer, "attn.");
  REQUIRE(parameters.size() == 4);
  REQUIRE(parameters.at("attn.q_proj.weight").shape == std::vector<Index>{6, 6});
  REQUIRE(parameters.at("attn.o_proj.weight").shape == std::vector<Index>{6, 6});
  REQUIRE(layer.aux_loss() == 0.0f);
}

TEST_CASE("MultiHeadAttention equals the naive per-token, per-head oracle to 1e-12", "[mha][oracle]") {
  moa::Rng rng(1);
  moa::MultiHeadAttention<double> layer(kConfig, rng);
  for (const AttentionCase& test_case : attention_cases()) {
    INFO(test_case.name);
    const MatrixD query = random_matrix(test_case.query_batch.rows(), 6, rng);
    const MatrixD memory = test_case.self ? query : random_matrix(test_case.key_batch.rows(), 6, rng);
    const MatrixD output = layer.forward(query, test_case.query_batch, memory, test_case.key_batch, test_case.causal);
    const MatrixD expected = naive_mha(layer, query, test_case.query_batch, memory, test_case.key_batch, test_case.causal);
    REQUIRE(expected.cwiseAbs().maxCoeff() > 1e-3);
    REQUIRE((output - expected).cwiseAbs().maxCoeff() < 1e-12);
    const auto& frozen = layer;  // the const inference path computes the same
    REQUIRE(frozen.infer(query, test_case.query_batch, memory, test_case.key_batch, test_case.causal) == output);
  }
}

TEST_CASE("MultiHeadAttention: gradient check of every parameter and both inputs", "[mha][gradient]") {
  moa::Rng rng(2);
  moa::MultiHeadAttention<double> layer(kConfig, rng);
  for (const AttentionCase& test_case : attention_cases()) {
    INFO(test_case.name);
    REQUIRE_GRADIENTS_OK(check_attention_gradients(layer, test_case, rng));
  }
}

TEMPLATE_TEST_CASE("MultiHeadAttention: cached decoding equals the full causal forward", "[mha][cache]", float, double) {
  moa::Rng rng(3);
  moa::MultiHeadAttention<TestType> layer({8, 2, 4, 2}, rng);
  require_cached_decoding_matches(layer, 3, 7, rng);
}

TEST_CASE("MultiHeadAttention: beam reorder and cross-attention cache", "[mha][cache]") {
  moa::Rng rng(4);
  moa::MultiHeadAttention<float> layer(kConfig, rng);
  require_beam_reorder_matches(layer, rng);
  require_cross_cache_matches(layer, rng);
}

TEST_CASE("MultiHeadAttention: safetensors round trip", "[mha][safetensors]") {
  moa::Rng rng(5);
  moa::MultiHeadAttention<float> saved(kConfig, rng), loaded(kConfig, rng);
  const std::string path = temporary_path("mha.safetensors");
  moa::save_safetensors(path, moa::parameters_of(saved));
  moa::load_safetensors(path, moa::parameters_of(loaded));
  const MatrixF input = random_matrix<float>(6, 6, rng);
  const auto batch = moa::SequenceBatch::full(2, 3);
  REQUIRE(loaded.forward_self(input, batch, true) == saved.forward_self(input, batch, true));
}

TEST_CASE("MultiHeadAttention: bad configuration and input throw moa::Error", "[mha][errors]") {
  moa::Rng rng(6);
  REQUIRE_MOA_ERROR(moa::MultiHeadAttention<float>({6, 0, 3}, rng), "MultiHeadAttention: num_heads must be positive");
  REQUIRE_MOA_ERROR(moa::MultiHeadAttention<float>({6, 2, 0}, rng), "head_dim must be positive, got 0");
  moa::MultiHeadAttention<float> layer(kConfig, rng);
  require_attention_bad_input_throws(layer, "MultiHeadAttention");
}
