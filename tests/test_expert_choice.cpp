// Expert-choice routing (moa/router.hpp, RoutingMode::expert_choice) in the router and in the
// Mixture-of-Attention layer: known values, the naive oracle, gradients, errors, the models.
#include "attention_support.hpp"

#include "moa/io/safetensors.hpp"
#include "moa/models/masked_lm.hpp"
#include "moa/models/seq2seq.hpp"

#include <numeric>

using namespace moa_test;

namespace {

moa::MixtureOfAttentionConfig expert_choice_config(Index experts, Index k, double capacity_factor = 1.0,
                                                   moa::ExpertCapacity capacity = moa::ExpertCapacity::fixed) {
  moa::MixtureOfAttentionConfig config;
  config.model_dim = 6;
  config.num_experts = experts;
  config.top_k = k;
  config.head_dim = 3;
  config.mode = moa::RoutingMode::expert_choice;
  config.capacity_factor = capacity_factor;
  config.capacity = capacity;
  config.load_balance_coefficient = 0.0;
  config.z_loss_coefficient = 0.0;
  return config;
}

// The non-causal cases of attention_cases(): expert choice is defined only there.
std::vector<AttentionCase> non_causal_cases() {
  std::vector<AttentionCase> cases;
  for (const AttentionCase& test_case : attention_cases())
    if (!test_case.causal) cases.push_back(test_case);
  return cases;
}

// Experts in order of decreasing p (a stable sort: ties to the lower index).
std::vector<Index> ranked(const moa::RowVector<double>& p) {
  std::vector<Index> order(static_cast<std::size_t>(p.size()));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](Index a, Index c) { return p(a) > p(c); });
  return order;
}

// From the formulas: in each sequence, expert e takes the C tokens of largest p_{e,t} (a stable
// sort, so ties go to the earlier token) and adds p_{e,t} attend(x_t Wq_e^T) Wo_e^T to their rows.
// C is fixed, round(capacity_factor * T * k / E) in [1, T], or the largest load: the most tokens of
// a sequence with one expert among their top k, at most 60% of T, at least 1.
MatrixD naive_expert_choice(const moa::MixtureOfAttention<double>& layer, const MatrixD& query,
                            const moa::SequenceBatch& query_batch, const MatrixD& key_value,
                            const moa::SequenceBatch& key_batch) {
  const auto& config = layer.config();
  const Index head_dim = config.head_dim, model = config.model_dim;
  const MatrixD keys = key_value * layer.k_proj.value.transpose();
  const MatrixD values = key_value * layer.v_proj.value.transpose();
  MatrixD probabilities = query * layer.router.weight.value.transpose();
  for (Index row = 0; row < probabilities.rows(); ++row) {
    probabilities.row(row) = (probabilities.row(row).array() - probabilities.row(row).maxCoeff()).exp();
    probabilities.row(row) /= probabilities.row(row).sum();
  }
  Index largest_load = 0;
  for (Index b = 0; b < query_batch.batch_size; ++b) {
    std::vector<Index> loads(static_cast<std::size_t>(config.num_experts), 0);
    for (Index t = 0; t < query_batch.length_of(b); ++t) {
      const std::vector<Index> order = ranked(probabilities.row(b * query_batch.length + t));
      for (Index j = 0; j < config.top_k; ++j)
        largest_load = std::max(largest_load, ++loads[static_cast<std::size_t>(order[static_cast<std::size_t>(j)])]);
    }
  }
  MatrixD output = MatrixD::Zero(query.rows(), model);
  for (Index b = 0; b < query_batch.batch_size; ++b) {
    const Index length = query_batch.length_of(b), first = b * query_batch.length;
    if (length == 0) continue;
    const Index wanted = config.capacity == moa::ExpertCapacity::fixed
                             ? static_cast<Index>(std::round(config.capacity_factor * static_cast<double>(length * config.top_k) /
                                                             static_cast<double>(config.num_experts)))
                             : std::min(largest_load, static_cast<Index>(std::floor(0.6 * static_cast<double>(length))));
    const Index capacity = std::clamp<Index>(wanted, 1, length);
    for (Index e = 0; e < config.num_experts; ++e) {
      std::vector<Index> order(static_cast<std::size_t>(length));
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(),
                       [&](Index a, Index c) { return probabilities(first + a, e) > probabilities(first + c, e); });
      for (Index j = 0; j < capacity; ++j) {
        const Index row = first + order[static_cast<std::size_t>(j)];
        const moa::RowVector<double> q = query.row(row) * layer.q_proj.value.middleRows(e * head_dim, head_dim).transpose();
        const moa::RowVector<double> a = naive_attend(q, keys, values, b * key_batch.length, key_batch.length_of(b));
        output.row(row) += probabilities(row, e) * (a * layer.o_proj.value.middleRows(e * model, model).transpose());
      }
    }
  }
  return output;
}

}  // namespace

TEST_CASE("expert choice: capacity C = round(capacity_factor * T * k / E), at least 1, at most T", "[expert_choice]") {
  auto config = expert_choice_config(8, 2, 1.25);
  REQUIRE(config.fixed_capacity(10) == 3);  // 3.125
  REQUIRE(config.fixed_capacity(12) == 4);  // 3.75
  REQUIRE(config.fixed_capacity(1) == 1);   // 0.3125, but every expert takes a token
  REQUIRE(config.fixed_capacity(0) == 0);
  config.capacity_factor = 10.0;
  REQUIRE(config.fixed_capacity(5) == 5);  // never more than the sequence
}

TEST_CASE("expert choice: a hand-computed routing, with ties, padding and tokens of 0 and 2 experts", "[expert_choice]") {
  moa::Rng rng(0);
  moa::RouterConfig config;
  config.model_dim = 2;
  config.num_experts = 2;
  config.top_k = 1;
  config.mode = moa::RoutingMode::expert_choice;
  config.load_balance_coefficient = config.z_loss_coefficient = 0.0;
  moa::Router<double> router(config, rng);
  router.weight.value << 1, 0, 0, 1;  // logits = x
  // Sequence 0 (4 tokens, C = 2): p_0 = sigmoid(x0 - x1) = .95, .27, .88, .5: expert 0 takes
  // tokens 0 and 2, expert 1 the other two. Sequence 1 (3 of 4 tokens, C = round(1.5) = 2): equal
  // probabilities, so both experts take tokens 0 and 1; token 2 gets none; row 7 is padding.
  MatrixD input(8, 2);
  input << 3, 0, -1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9, 9;
  const auto batch = moa::SequenceBatch::padded(4, {4, 3});
  router.forward(input, batch, nullptr);
  REQUIRE(router.experts() == std::vector<Index>{0, 1, 0, 1, 0, 1, 0, 1});
  REQUIRE(router.tokens() == std::vector<Index>{0, 1, 2, 3, 4, 4, 5, 5});
  REQUIRE(router.routing().sequence_rows == std::vector<Index>{0, 4, 8});
  const auto sigmoid = [](double x) { return 1.0 / (1.0 + std::exp(-x)); };
  const std::vector<double> gates{sigmoid(3), sigmoid(1), sigmoid(2), 0.5, 0.5, 0.5, 0.5, 0.5};
  REQUIRE(router.gates().rows() == 8);
  REQUIRE(router.gates().cols() == 1);
  for (Index a = 0; a < 8; ++a) REQUIRE(router.gates()(a, 0) == Approx(gates[static_cast<std::size_t>(a)]).epsilon(1e-15));
  REQUIRE(router.aux_loss() == 0.0);
  const moa::RoutingStatistics stats = router.statistics();
  REQUIRE(stats.counts == std::vector<Index>{4, 4});
  // route() gives the same without touching the forward state.
  const auto routing = router.route(input, batch);
  REQUIRE(routing.experts == router.experts());
  REQUIRE(routing.tokens == router.tokens());
  REQUIRE(routing.gates == router.gates());
  // Largest load: top-1 choices are 0, 1, 0, 0 (a tie to the lower expert) and 0, 0, 0, so the
  // largest load is 3; C = min(3, 60% of T) = 2 in sequence 0, 1 in sequence 1.
  router = moa::Router<double>([&] {
    auto largest = config;
    largest.capacity = moa::ExpertCapacity::largest_load;
    return largest;
  }(), rng);
  router.weight.value << 1, 0, 0, 1;
  router.forward(input, batch, nullptr);
  REQUIRE(router.experts() == std::vector<Index>{0, 1, 0, 1, 0, 1});
  REQUIRE(router.tokens() == std::vector<Index>{0, 1, 2, 3, 4, 4});
  REQUIRE(router.routing().sequence_rows == std::vector<Index>{0, 4, 6});
}

TEST_CASE("expert choice: MixtureOfAttention equals the naive oracle to 1e-12", "[expert_choice][oracle]") {
  moa::Rng rng(1);
  for (double capacity_factor : {1.0, 2.0, 0.5, 0.0}) {  // 0: the largest load
    for (Index k : {1, 2}) {
      auto layer = make_moa_layer<double>(
          capacity_factor > 0 ? expert_choice_config(4, k, capacity_factor)
                              : expert_choice_config(4, k, 1.0, moa::ExpertCapacity::largest_load),
          rng);
      for (const AttentionCase& test_case : non_causal_cases()) {
        INFO(test_case.name << ", k = " << k << ", capacity factor " << capacity_factor);
        const MatrixD query = random_matrix(test_case.query_batch.rows(), 6, rng);
        const MatrixD memory = test_case.self ? query : random_matrix(test_case.key_batch.rows(), 6, rng);
        const MatrixD output = layer.forward(query, test_case.query_batch, memory, test_case.key_batch, false);
        const MatrixD expected = naive_expert_choice(layer, query, test_case.query_batch, memory, test_case.key_batch);
        REQUIRE(expected.cwiseAbs().maxCoeff() > 1e-3);
        REQUIRE((output - expected).cwiseAbs().maxCoeff() < 1e-12);
        const auto& frozen = layer;
        REQUIRE(frozen.infer(query, test_case.query_batch, memory, test_case.key_batch, false) == output);
      }
    }
  }
}

TEST_CASE("expert choice: gradient check of every parameter and both inputs", "[expert_choice][gradient]") {
  moa::Rng rng(3);
  for (const auto capacity : {moa::ExpertCapacity::fixed, moa::ExpertCapacity::largest_load}) {
    for (Index k : {1, 3}) {
      auto layer = make_moa_layer<double>(expert_choice_config(4, k, 1.5, capacity), rng);
      for (const AttentionCase& test_case : non_causal_cases()) {
        INFO(test_case.name << ", k = " << k << (capacity == moa::ExpertCapacity::fixed ? "" : ", largest load"));
        REQUIRE_GRADIENTS_OK(check_attention_gradients(layer, test_case, rng));
      }
    }
  }
}

TEST_CASE("expert choice: a token's output depends on the other tokens of its sequence", "[expert_choice]") {
  // Why causal attention is refused: raising a later token's score for an expert pushes an earlier
  // token out of that expert's choice.
  moa::Rng rng(5);
  moa::MixtureOfAttention<double> layer(expert_choice_config(2, 1), rng);
  layer.router.weight.value.setZero();
  layer.router.weight.value(0, 0) = 1.0;  // expert 0 prefers a large first feature
  MatrixD input = random_matrix(4, 6, rng);
  input.col(0) << 2, 1, 0, 0;  // expert 0 (C = 2) takes tokens 0 and 1
  const auto batch = moa::SequenceBatch::full(1, 4);
  const MatrixD before = layer.forward_self(input, batch, false);
  input(3, 0) = 5;  // now token 3 outbids token 1 for expert 0
  const MatrixD after = layer.forward_self(input, batch, false);
  REQUIRE(std::find(layer.router.tokens().begin(), layer.router.tokens().end(), 3) != layer.router.tokens().end());
  REQUIRE((after.row(1) - before.row(1)).norm() > 1e-3);
}

TEST_CASE("expert choice: safetensors round trip and a known forward after loading", "[expert_choice][safetensors]") {
  moa::Rng rng(6);
  auto layer = make_moa_layer<float>(expert_choice_config(4, 2), rng);
  const std::string path = temporary_path("expert_choice.safetensors");
  moa::save_safetensors(path, moa::parameters_of(layer, "attn."));
  moa::MixtureOfAttention<float> loaded(expert_choice_config(4, 2), rng);
  moa::load_safetensors(path, moa::parameters_of(loaded, "attn."));
  const auto batch = moa::SequenceBatch::padded(5, {5, 3});
  const MatrixF input = random_matrix<float>(batch.rows(), 6, rng);
  REQUIRE(loaded.forward_self(input, batch, false) == layer.forward_self(input, batch, false));
}

TEST_CASE("expert choice: refused where it is not defined, and bad configurations", "[expert_choice][errors]") {
  moa::Rng rng(7);
  auto layer = make_moa_layer<float>(expert_choice_config(4, 2), rng);
  const auto batch = moa::SequenceBatch::full(2, 3);
  const MatrixF input = random_matrix<float>(6, 6, rng);
  REQUIRE_MOA_ERROR(layer.forward_self(input, batch, true),
                    "MixtureOfAttention::forward: expert-choice routing is not defined for causal attention");
  REQUIRE_MOA_ERROR(layer.infer(input, batch, input, batch, true),
                    "MixtureOfAttention::infer: expert-choice routing is not defined for causal attention");
  auto cache = layer.make_self_cache(2, 4);
  REQUIRE_MOA_ERROR(layer.step(input.topRows(2), cache), "MixtureOfAttention::step: expert-choice routing");
  REQUIRE_MOA_ERROR(layer.router.forward(input, std::vector<char>(6, 1)),
                    "Router::forward: expert-choice routing chooses among the tokens of a sequence");
  REQUIRE_MOA_ERROR(layer.router.route(input), "Router::route: expert-choice routing");
  auto config = expert_choice_config(4, 2);
  config.load_balance_coefficient = 0.01;
  REQUIRE_MOA_ERROR(moa::MixtureOfAttention<float>(config, rng), "has no auxiliary loss");
  config = expert_choice_config(4, 2, 0.0);
  REQUIRE_MOA_ERROR(moa::MixtureOfAttention<float>(config, rng), "capacity_factor must be positive, got 0");
  config = expert_choice_config(4, 2, std::nan(""));
  REQUIRE_MOA_ERROR(moa::MixtureOfAttention<float>(config, rng), "capacity_factor must be positive");
  config = expert_choice_config(4, 2);
  config.noisy_gating = true;
  REQUIRE_MOA_ERROR(moa::MixtureOfAttention<float>(config, rng), "no noisy gating or sampled experts");
  // The shape checks of every attention kind still hold.
  layer.forward_self(input, batch, false);
  REQUIRE_MOA_ERROR(layer.backward(MatrixF::Zero(5, 6)), "MixtureOfAttention::backward: grad_output has shape [5, ");
  REQUIRE_MOA_ERROR(layer.forward_self(MatrixF::Zero(5, 6), batch, false), "query has 5 rows");
}

TEST_CASE("expert choice: the moa-ec spec routes encoder layers by expert choice, decoder layers by token choice",
          "[expert_choice][transformer]") {
  const auto spec = moa::AttentionSpec::parse("moa-ec:2K4E8D");
  REQUIRE(spec.routing == moa::RoutingMode::expert_choice);
  REQUIRE(spec.to_string() == "moa-ec:2K4E8D");
  REQUIRE(spec.flops_per_token(32, 10) == moa::AttentionSpec::parse("moa:2K4E8D").flops_per_token(32, 10));
  REQUIRE_MOA_ERROR(moa::AttentionSpec::parse("moa-ec:2K4E8D:raw"), "unknown attention spec");
  REQUIRE_MOA_ERROR(moa::AttentionSpec::parse("moa:2K4E8D:largest"), "unknown attention spec");
  const auto largest = moa::AttentionSpec::parse("moa-ec:2K4E8D:largest");
  REQUIRE(largest.capacity == moa::ExpertCapacity::largest_load);
  REQUIRE(largest.to_string() == "moa-ec:2K4E8D:largest");
  REQUIRE_MOA_ERROR(moa::AttentionSpec::parse("moa-ec:"), "unknown attention spec");
  moa::TransformerConfig config;
  config.vocab_size = 12;
  config.model_dim = 8;
  config.ffn_dim = 16;
  config.encoder_layers = 1;
  config.decoder_layers = 1;
  config.attention = spec;
  moa::Rng rng(8);
  moa::Seq2Seq<moa::MixtureOfAttention<float>> translator(config, rng);
  std::vector<std::string> expert_choice_sites;
  translator.for_each_attention([&](const moa::AttentionSite& site, moa::MixtureOfAttention<float>& attention) {
    const auto& router = attention.router.config();
    if (router.mode == moa::RoutingMode::expert_choice) expert_choice_sites.push_back(site.name);
    REQUIRE(router.load_balance_coefficient == (router.mode == moa::RoutingMode::expert_choice ? 0.0 : 0.01));
  });
  REQUIRE(expert_choice_sites == std::vector<std::string>{"encoder.layers.0.self_attn"});
  config.attention = largest;
  moa::MaskedLM<moa::MixtureOfAttention<float>> language_model(config, rng);
  Index sites = 0;
  language_model.for_each_attention([&](const moa::AttentionSite&, moa::MixtureOfAttention<float>& attention) {
    REQUIRE(attention.router.config().mode == moa::RoutingMode::expert_choice);
    REQUIRE(attention.router.config().capacity == moa::ExpertCapacity::largest_load);
    ++sites;
  });
  REQUIRE(sites == 1);
}
