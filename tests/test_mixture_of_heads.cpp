// MixtureOfHeads (MoH): names and shapes, the naive oracle from the formulas, gradients, decoding,
// save/load, errors. The op table (test_ops.cpp) adds float against double and determinism.
#include "attention_support.hpp"

#include "moa/io/safetensors.hpp"
#include "moa/models.hpp"

#include <cmath>
#include <numeric>

using namespace moa_test;

namespace {

moa::MixtureOfHeadsConfig small_config(Index shared, Index routed, Index k) {
  moa::MixtureOfHeadsConfig config;
  config.model_dim = 6;
  config.shared_heads = shared;
  config.routed_heads = routed;
  config.top_k = k;
  config.head_dim = 3;
  config.causal_block = 2;  // several causal blocks even in short sequences
  return config;
}

moa::RowVector<double> softmax(const moa::RowVector<double>& logits) {
  moa::RowVector<double> p = (logits.array() - logits.maxCoeff()).exp();
  return p / p.sum();
}

// Token by token, head by head, from the formulas at the top of moa/mixture_of_heads.hpp: every
// head computed, the unchosen ones weighted 0, as the published code does.
MatrixD naive_moh(const moa::MixtureOfHeads<double>& layer, const MatrixD& query, const moa::SequenceBatch& query_batch,
                  const MatrixD& key_value, const moa::SequenceBatch& key_batch, bool causal) {
  const auto& config = layer.config();
  const Index shared = config.shared_heads, routed = config.routed_heads, k = config.top_k;
  const Index head_dim = config.head_dim, model = config.model_dim;
  MatrixD output = MatrixD::Zero(query.rows(), model);
  for (Index b = 0; b < query_batch.batch_size; ++b) {
    for (Index t = 0; t < query_batch.length_of(b); ++t) {
      const Index row = b * query_batch.length + t;
      const moa::RowVector<double> x = query.row(row);
      std::vector<double> gates(static_cast<std::size_t>(shared + routed), 0.0);
      const moa::RowVector<double> r = softmax(x * layer.router.weight.value.transpose());
      std::vector<Index> order(static_cast<std::size_t>(routed));
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](Index a, Index c) { return r(a) > r(c); });
      double chosen_sum = 0;
      for (Index j = 0; j < k; ++j) chosen_sum += r(order[j]);
      double shared_weight = 0, routed_weight = 1;
      if (shared > 0) {
        const moa::RowVector<double> w = softmax(x * layer.group_router.value.transpose());
        shared_weight = 2 * w(0);
        routed_weight = 2 * w(1);
      }
      moa::RowVector<double> s = moa::RowVector<double>::Ones(std::max<Index>(shared, 1));
      if (shared > 1) s = softmax(x * layer.shared_router.value.transpose());
      for (Index i = 0; i < shared; ++i) gates[i] = shared_weight * shared * s(i);
      for (Index j = 0; j < k; ++j) gates[shared + order[j]] = routed_weight * k * r(order[j]) / chosen_sum;
      const Index visible = causal ? std::min(t + 1, key_batch.length_of(b)) : key_batch.length_of(b);
      for (Index h = 0; h < shared + routed; ++h) {
        const MatrixD keys = key_value * layer.k_proj.value.middleRows(h * head_dim, head_dim).transpose();
        const MatrixD values = key_value * layer.v_proj.value.middleRows(h * head_dim, head_dim).transpose();
        const moa::RowVector<double> q = x * layer.q_proj.value.middleRows(h * head_dim, head_dim).transpose();
        const moa::RowVector<double> a = naive_attend(q, keys, values, b * key_batch.length, visible);
        output.row(row) += gates[h] * (a * layer.o_proj.value.middleRows(h * model, model).transpose());
      }
    }
  }
  return output;
}

struct HeadCounts {
  Index shared, routed, k;
};
const std::vector<HeadCounts> kHeadCounts{{2, 4, 2}, {1, 3, 1}, {0, 4, 3}, {3, 2, 2}};

}  // namespace

TEST_CASE("MixtureOfHeads: parameter names and shapes; gates of 1 at initialisation", "[moh]") {
  moa::Rng rng(0);
  moa::MixtureOfHeads<double> layer(small_config(2, 4, 2), rng);
  const auto parameters = moa::parameters_of(layer, "attn.");
  REQUIRE(parameters.size() == 7);
  REQUIRE(parameters.at("attn.router.weight").shape == std::vector<Index>{4, 6});
  REQUIRE(parameters.at("attn.shared_router.weight").shape == std::vector<Index>{2, 6});
  REQUIRE(parameters.at("attn.group_router.weight").shape == std::vector<Index>{2, 6});
  REQUIRE(parameters.at("attn.q_proj.weight").shape == std::vector<Index>{6, 3, 6});
  REQUIRE(parameters.at("attn.k_proj.weight").shape == std::vector<Index>{6, 3, 6});
  REQUIRE(parameters.at("attn.v_proj.weight").shape == std::vector<Index>{6, 3, 6});
  REQUIRE(parameters.at("attn.o_proj.weight").shape == std::vector<Index>{6, 6, 3});
  // One shared head needs no shared router; none needs no group router either.
  moa::MixtureOfHeads<double> one_shared(small_config(1, 4, 2), rng), none_shared(small_config(0, 4, 2), rng);
  REQUIRE(moa::parameters_of(one_shared).size() == 6);
  REQUIRE(moa::parameters_of(none_shared).size() == 5);
  // Zero routers: every gate is 1 and the routed ties go to the first heads, so the layer is the
  // plain sum of heads 0 .. h_s + k_r - 1: multi-head attention with those heads.
  const auto batch = moa::SequenceBatch::padded(4, {4, 2});
  const MatrixD input = random_matrix(batch.rows(), 6, rng);
  moa::MultiHeadAttention<double> heads({6, 4, 3}, rng);
  heads.q_proj.value = layer.q_proj.value.topRows(12);
  heads.k_proj.value = layer.k_proj.value.topRows(12);
  heads.v_proj.value = layer.v_proj.value.topRows(12);
  for (Index h = 0; h < 4; ++h) heads.o_proj.value.middleCols(h * 3, 3) = layer.o_proj.value.middleRows(h * 6, 6);
  const MatrixD expected = heads.forward_self(input, batch, true);
  REQUIRE(expected.cwiseAbs().maxCoeff() > 1e-3);
  REQUIRE((layer.forward_self(input, batch, true) - expected).cwiseAbs().maxCoeff() < 1e-12);
}

TEST_CASE("MixtureOfHeads equals the naive every-head oracle to 1e-12", "[moh][oracle]") {
  moa::Rng rng(1);
  for (const HeadCounts& counts : kHeadCounts) {
    auto layer = make_moh_layer<double>(small_config(counts.shared, counts.routed, counts.k), rng);
    for (const AttentionCase& test_case : attention_cases()) {
      INFO(test_case.name << ", " << counts.shared << " shared, top-" << counts.k << " of " << counts.routed);
      const MatrixD query = random_matrix(test_case.query_batch.rows(), 6, rng);
      const MatrixD memory = test_case.self ? query : random_matrix(test_case.key_batch.rows(), 6, rng);
      const MatrixD output = test_case.self
                                 ? layer.forward_self(query, test_case.query_batch, test_case.causal)
                                 : layer.forward(query, test_case.query_batch, memory, test_case.key_batch, false);
      const MatrixD expected =
          naive_moh(layer, query, test_case.query_batch, memory, test_case.key_batch, test_case.causal);
      REQUIRE(expected.cwiseAbs().maxCoeff() > 1e-3);
      REQUIRE((output - expected).cwiseAbs().maxCoeff() < 1e-12);
      const auto& frozen = layer;
      REQUIRE(frozen.infer(query, test_case.query_batch, memory, test_case.key_batch, test_case.causal) == output);
    }
  }
}

TEST_CASE("MixtureOfHeads: only the chosen heads are computed, and the aux loss is MoH's", "[moh]") {
  moa::Rng rng(2);
  auto config = small_config(2, 4, 1);
  config.z_loss_coefficient = 0.0;
  auto layer = make_moh_layer<double>(config, rng);
  // Routed head 3 ties with head 2 for every token, and ties go to the lower index: no token
  // chooses it.
  layer.router.weight.value.row(3) = layer.router.weight.value.row(2);
  const auto batch = moa::SequenceBatch::padded(5, {5, 3});
  const MatrixD input = random_matrix(batch.rows(), 6, rng);
  layer.forward_self(input, batch, false);
  // 8 tokens, each 2 shared heads and 1 routed: 24 (token, head) pairs of Q and O, 6 heads of K and
  // V over all 10 rows, the three routers (4 + 2 + 2 outputs), and attention over 5 or 3 keys.
  const double expected = moa::cost::linear(10, 6, 8) + 2 * moa::cost::linear(10, 6, 18) +
                          2 * moa::cost::linear(24, 6, 3) + moa::cost::attention(24.0 * 5 / 8 * 5 + 24.0 * 3 / 8 * 3, 3);
  REQUIRE(layer.last_forward_flops() == Approx(expected).epsilon(1e-12));
  // A routed head no token chose gets no gradient in its own projections.
  const auto statistics = layer.routing_statistics();
  auto parameters = moa::parameters_of(layer);
  parameters.zero_grad();
  layer.backward_self(random_matrix(batch.rows(), 6, rng));
  Index unused = 0;
  for (Index j = 0; j < 4; ++j) {
    const Index head = 2 + j;
    const bool chosen = statistics.counts[static_cast<std::size_t>(j)] > 0;
    unused += chosen ? 0 : 1;
    REQUIRE(layer.q_proj.grad.middleRows(head * 3, 3).isZero(0) == !chosen);
    REQUIRE(layer.o_proj.grad.middleRows(head * 6, 6).isZero(0) == !chosen);
  }
  REQUIRE(unused >= 1);
  // aux = 0.01 * h_r * sum_j f_j P_j, f_j the share of the 8 tokens choosing j.
  const MatrixD probabilities = layer.router.probabilities();
  double loss = 0;
  for (Index j = 0; j < 4; ++j) {
    double mean = 0;
    for (Index row = 0; row < batch.rows(); ++row) mean += batch.is_token(row) ? probabilities(row, j) / 8 : 0.0;
    loss += static_cast<double>(statistics.counts[static_cast<std::size_t>(j)]) / 8 * mean;
  }
  REQUIRE(layer.aux_loss() == Approx(0.01 * 4 * loss).epsilon(1e-12));
}

TEST_CASE("MixtureOfHeads: gradient check of every parameter and both inputs", "[moh][gradient]") {
  moa::Rng rng(3);
  // The output adds up to h_s + k_r heads with gates up to 2 h_s, so the loss is larger than a
  // single head's, and the rounding of a central difference (eps |loss| / step) reaches 2e-10,
  // 2e-6 of the floor: the tolerance leaves room for it.
  moa::GradientCheckOptions options;
  options.tolerance = 1e-5;
  for (const HeadCounts& counts : kHeadCounts) {
    auto config = small_config(counts.shared, counts.routed, counts.k);
    config.z_loss_coefficient = 0.01;
    auto layer = make_moh_layer<double>(config, rng);
    for (const AttentionCase& test_case : attention_cases()) {
      INFO(test_case.name << ", " << counts.shared << " shared, top-" << counts.k << " of " << counts.routed);
      REQUIRE_GRADIENTS_OK(check_attention_gradients(layer, test_case, rng, 99, options));
    }
  }
}

TEST_CASE("MixtureOfHeads: cached decoding equals the full forward (self, beam reorder, cross)", "[moh][kv_cache]") {
  moa::Rng rng(4);
  for (const HeadCounts& counts : kHeadCounts) {
    INFO(counts.shared << " shared, top-" << counts.k << " of " << counts.routed);
    auto layer = make_moh_layer<float>(small_config(counts.shared, counts.routed, counts.k), rng);
    require_cached_decoding_matches(layer, 3, 7, rng);
    require_beam_reorder_matches(layer, rng);
    require_cross_cache_matches(layer, rng);
    // Every head's keys and values are cached: a later token may choose a head no earlier one did.
    REQUIRE(layer.make_self_cache(2, 4).width() == (counts.shared + counts.routed) * 3);
  }
}

TEST_CASE("MixtureOfHeads: safetensors round trip", "[moh][safetensors]") {
  moa::Rng rng(5);
  auto layer = make_moh_layer<float>(small_config(2, 4, 2), rng);
  const std::string path = temporary_path("moh.safetensors");
  moa::save_safetensors(path, moa::parameters_of(layer, "attn."));
  moa::MixtureOfHeads<float> loaded(small_config(2, 4, 2), rng);
  moa::load_safetensors(path, moa::parameters_of(loaded, "attn."));
  const auto batch = moa::SequenceBatch::padded(5, {5, 3});
  const MatrixF input = random_matrix<float>(batch.rows(), 6, rng);
  REQUIRE(loaded.forward_self(input, batch, true) == layer.forward_self(input, batch, true));
  moa::MixtureOfHeads<float> other_shape(small_config(1, 4, 2), rng);
  REQUIRE_THROWS_AS(moa::load_safetensors(path, moa::parameters_of(other_shape, "attn.")), moa::Error);
}

TEST_CASE("MixtureOfHeads: bad input and bad configurations", "[moh][errors]") {
  moa::Rng rng(6);
  auto layer = make_moh_layer<float>(small_config(2, 4, 2), rng);
  require_attention_bad_input_throws(layer, "MixtureOfHeads");
  REQUIRE_MOA_ERROR(moa::MixtureOfHeads<float>(small_config(2, 4, 5), rng),
                    "MixtureOfHeads: top_k must be in [1, routed_heads = 4], got 5");
  REQUIRE_MOA_ERROR(moa::MixtureOfHeads<float>(small_config(2, 0, 0), rng), "routed_heads must be positive, got 0");
  REQUIRE_MOA_ERROR(moa::MixtureOfHeads<float>(small_config(-1, 4, 2), rng), "shared_heads must be non-negative");
  auto config = small_config(2, 4, 2);
  config.head_dim = 0;
  REQUIRE_MOA_ERROR(moa::MixtureOfHeads<float>(config, rng), "head_dim must be positive");
  config = small_config(2, 4, 2);
  config.load_balance_coefficient = -1;
  REQUIRE_MOA_ERROR(moa::MixtureOfHeads<float>(config, rng), "aux coefficients must be non-negative");
}

TEST_CASE("MixtureOfHeads: the moh spec, its cost per token, and the models built from it", "[moh][transformer]") {
  const auto spec = moa::AttentionSpec::parse("moh:2S4K8H32D");
  REQUIRE(spec.kind == moa::AttentionSpec::Kind::moh);
  REQUIRE(spec.shared_heads == 2);
  REQUIRE(spec.top_k == 4);
  REQUIRE(spec.num_heads == 8);
  REQUIRE(spec.head_dim == 32);
  REQUIRE(spec.to_string() == "moh:2S4K8H32D");
  REQUIRE(spec.kind_name() == "MoH");
  REQUIRE(spec.active_heads() == 6);
  REQUIRE(moa::AttentionSpec::parse("moh:0S2K4H16D").to_string() == "moh:0S2K4H16D");
  // Routers (8 + 2 + 2 outputs), K and V of all 10 heads, Q and O of the 6 it uses, attention over 10 keys.
  REQUIRE(spec.flops_per_token(512, 10) ==
          2.0 * (512.0 * 12 + 2.0 * 512 * 10 * 32 + 2.0 * 6 * 512 * 32 + 2.0 * 6 * 10 * 32));
  REQUIRE_MOA_ERROR(moa::AttentionSpec::parse("moh:2S9K8H32D"), "chooses top-9 of only 8 routed heads");
  for (const char* bad : {"moh:2S4K8H", "moh:4K8H32D", "moh:2S0K8H32D", "moh:2S4K0H32D", "moh:2S4K8H32D:raw",
                          "moh:2s4k8h32d"}) {
    INFO(bad);
    REQUIRE_MOA_ERROR(moa::AttentionSpec::parse(bad), "AttentionSpec::parse");
  }
  moa::TransformerConfig config;
  config.vocab_size = 12;
  config.model_dim = 8;
  config.ffn_dim = 16;
  config.encoder_layers = 1;
  config.decoder_layers = 1;
  config.attention = moa::AttentionSpec::parse("moh:1S2K3H4D");
  moa::Rng rng(7);
  moa::Seq2Seq<moa::MixtureOfHeads<float>> translator(config, rng);
  Index sites = 0;
  translator.for_each_attention([&](const moa::AttentionSite&, moa::MixtureOfHeads<float>& attention) {
    REQUIRE(attention.config().shared_heads == 1);
    REQUIRE(attention.config().routed_heads == 3);
    REQUIRE(attention.config().top_k == 2);
    REQUIRE(attention.router.config().load_balance_coefficient == Approx(0.01 * 2));
    ++sites;
  });
  REQUIRE(sites == 3);
  config.attention = moa::AttentionSpec::parse("moa:2K3E4D");
  REQUIRE_MOA_ERROR(moa::Seq2Seq<moa::MixtureOfHeads<float>>(config, rng), "a MixtureOfHeads model needs a moh: spec");
}
