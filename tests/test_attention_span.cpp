// Per-expert attention spans (moa/attention_span.hpp): the span arithmetic, the kernel's key runs,
// MixtureOfAttention with spans against a naive oracle, gradients, decoding, errors.
#include "attention_support.hpp"

#include "moa/io/attention_spans.hpp"

#include <cmath>
#include <fstream>
#include <numeric>

using namespace moa_test;

namespace {

// Full, streaming (sink 1 + window 2), elastic (sink 1 + 1.5 + 0.3 N), and a window of one.
std::vector<moa::AttentionSpan> mixed_spans() {
  return {moa::AttentionSpan::full(), moa::AttentionSpan::streaming(1, 2), moa::AttentionSpan::elastic(1, 1.5, 0.3),
          moa::AttentionSpan::streaming(0, 1)};
}

moa::MixtureOfAttentionConfig span_config(Index k, std::vector<moa::AttentionSpan> spans = mixed_spans()) {
  moa::MixtureOfAttentionConfig config;
  config.model_dim = 6;
  config.num_experts = static_cast<Index>(spans.size());
  config.top_k = k;
  config.head_dim = 3;
  config.causal_block = 2;  // several blocks, so the band moves within a sequence
  config.spans = std::move(spans);
  return config;
}

bool sees(const moa::AttentionSpan& span, Index query, Index key) {
  if (key > query) return false;
  if (span.is_full()) return true;
  const Index window = std::max<Index>(1, static_cast<Index>(std::floor(span.window + span.growth * (query + 1))));
  return key < span.sink || key > query - window;
}

// MoA token by token and expert by expert, each expert attending to the keys its span lets it see.
MatrixD naive_moa_spans(const moa::MixtureOfAttention<double>& layer, const MatrixD& input, const moa::SequenceBatch& batch) {
  const auto& config = layer.config();
  const Index experts = config.num_experts, k = config.top_k, head_dim = config.head_dim, model = config.model_dim;
  const MatrixD keys = input * layer.k_proj.value.transpose();
  const MatrixD values = input * layer.v_proj.value.transpose();
  MatrixD output = MatrixD::Zero(input.rows(), model);
  for (Index b = 0; b < batch.batch_size; ++b) {
    for (Index t = 0; t < batch.length_of(b); ++t) {
      const Index row = b * batch.length + t;
      moa::RowVector<double> p = input.row(row) * layer.router.weight.value.transpose();
      p = (p.array() - p.maxCoeff()).exp();
      p /= p.sum();
      std::vector<Index> order(static_cast<std::size_t>(experts));
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](Index a, Index c) { return p(a) > p(c); });
      double chosen = 0;
      for (Index j = 0; j < k; ++j) chosen += p(order[j]);
      for (Index j = 0; j < k; ++j) {
        const Index e = order[j];
        const moa::RowVector<double> q = input.row(row) * layer.q_proj.value.middleRows(e * head_dim, head_dim).transpose();
        std::vector<double> scores;
        std::vector<Index> seen;
        for (Index key = 0; key < batch.length_of(b); ++key)
          if (sees(config.spans[static_cast<std::size_t>(e)], t, key)) {
            seen.push_back(key);
            scores.push_back(q.dot(keys.row(b * batch.length + key)) / std::sqrt(static_cast<double>(head_dim)));
          }
        const double top = *std::max_element(scores.begin(), scores.end());
        double total = 0;
        for (double& score : scores) total += (score = std::exp(score - top));
        moa::RowVector<double> attended = moa::RowVector<double>::Zero(head_dim);
        for (std::size_t i = 0; i < seen.size(); ++i) attended += scores[i] / total * values.row(b * batch.length + seen[i]);
        output.row(row) += p(e) / chosen * (attended * layer.o_proj.value.middleRows(e * model, model).transpose());
      }
    }
  }
  return output;
}

}  // namespace

TEST_CASE("AttentionSpan: windows, bands, and what the kernel's blocks compute", "[span]") {
  const auto streaming = moa::AttentionSpan::streaming(2, 3);
  REQUIRE(streaming.bounded());
  REQUIRE(streaming.window_at(100) == 3);
  REQUIRE(streaming.band_start(100) == 98);  // keys 98, 99, 100
  REQUIRE(streaming.band_start(1) == 0);
  const auto elastic = moa::AttentionSpan::elastic(1, 2.0, 0.5);
  REQUIRE_FALSE(elastic.bounded());
  REQUIRE(elastic.window_at(9) == 7);  // 2 + 0.5 * 10
  REQUIRE(moa::AttentionSpan::full().band_start(50) == 0);
  REQUIRE(streaming.to_string() == "sink 2 + window 3");
  REQUIRE(elastic.to_string() == "sink 1 + window 2 + 0.5 N");
  // A layout with the streaming span: position 10 sees [0, 2) and [8, 11).
  moa::AttentionLayout layout;
  layout.positions = 16;
  layout.key_length = 16;
  layout.causal = true;
  layout.block_positions = 4;
  layout.span = &streaming;
  const auto keys = layout.visible(10);
  REQUIRE((keys.sink_end == 2 && keys.band_start == 8 && keys.end == 11));
  REQUIRE(layout.visible_keys(1) == 2);  // sink and band meet: one run [0, 2)
  REQUIRE(layout.visible(1).band_start == 0);
  // Each block of 4 positions computes the sink and a band of window + 3 keys, never more.
  Index blocks = 0;
  layout.for_each_block([&](Index first, Index count, const moa::AttentionLayout::Visible& block) {
    ++blocks;
    REQUIRE(count == 4);
    REQUIRE(block.count() <= 2 + 3 + 3);
    for (Index p = first; p < first + count; ++p) {
      const auto row = layout.visible(p);
      // The row's keys lie within the block's runs: [0, block.sink_end) and [block.band_start, block.end).
      REQUIRE(row.end <= block.end);
      if (block.sink_end > 0) {
        REQUIRE(row.sink_end <= block.sink_end);
        REQUIRE(row.band_start >= block.band_start);
      }
    }
  });
  REQUIRE(blocks == 4);
  REQUIRE(layout.visible_pairs() == 1 + 2 + 3 + 4 + 5 * 12);
  REQUIRE_MOA_ERROR(moa::AttentionSpan::elastic(0, 2.0, 1.0).validate("f", "spans[0]"), "growth in [0, 1)");
  REQUIRE_MOA_ERROR(moa::AttentionSpan::streaming(-1, 2).validate("f", "spans[0]"), "f: spans[0] has sink -1");
  REQUIRE_MOA_ERROR(moa::AttentionSpan::elastic(3, 0.0, 0.0).validate("f", "spans[2]"), "has no window");
}

// One span for all experts (a token's rows stay side by side) and a mix (rows grouped by expert).
std::vector<std::vector<moa::AttentionSpan>> span_sets() {
  return {mixed_spans(), std::vector<moa::AttentionSpan>(4, moa::AttentionSpan::elastic(1, 1.5, 0.3))};
}

TEST_CASE("MixtureOfAttention with spans equals the naive per-expert oracle to 1e-12", "[span][oracle]") {
  moa::Rng rng(1);
  for (const auto& spans : span_sets())
  for (Index k : {1, 2, 4}) {
    auto layer = make_moa_layer<double>(span_config(k, spans), rng);
    for (const auto& batch : {moa::SequenceBatch::full(2, 9), moa::SequenceBatch::padded(7, {7, 3, 5})}) {
      INFO("k = " << k << ", length " << batch.length);
      const MatrixD input = random_matrix(batch.rows(), 6, rng);
      const MatrixD output = layer.forward_self(input, batch, true);
      const MatrixD expected = naive_moa_spans(layer, input, batch);
      REQUIRE(expected.cwiseAbs().maxCoeff() > 1e-3);
      REQUIRE((output - expected).cwiseAbs().maxCoeff() < 1e-12);
      const auto& frozen = layer;
      REQUIRE(frozen.infer(input, batch, input, batch, true) == output);
    }
  }
  // All spans full: the same numbers as a layer without spans.
  auto full = span_config(2, std::vector<moa::AttentionSpan>(4, moa::AttentionSpan::full()));
  moa::Rng first(3), second(3);
  auto with_spans = make_moa_layer<double>(full, first);
  full.spans.clear();
  auto without = make_moa_layer<double>(full, second);
  const auto batch = moa::SequenceBatch::padded(6, {6, 4});
  const MatrixD input = random_matrix(batch.rows(), 6, rng);
  REQUIRE(with_spans.forward_self(input, batch, true) == without.forward_self(input, batch, true));
}

TEST_CASE("MixtureOfAttention with spans: gradient check of every parameter and the input", "[span][gradient]") {
  moa::Rng rng(2);
  for (const auto& spans : span_sets())
  for (Index k : {1, 3}) {
    auto layer = make_moa_layer<double>(span_config(k, spans), rng);
    for (const AttentionCase& test_case : attention_cases()) {
      if (!test_case.causal) continue;
      INFO(test_case.name << ", k = " << k);
      REQUIRE_GRADIENTS_OK(check_attention_gradients(layer, test_case, rng));
    }
  }
}

TEST_CASE("MixtureOfAttention with spans: windowed experts cost their window, not the sequence", "[span]") {
  moa::Rng rng(4);
  auto narrow = make_moa_layer<float>(span_config(2, std::vector<moa::AttentionSpan>(4, moa::AttentionSpan::streaming(4, 8))), rng);
  auto full = make_moa_layer<float>(span_config(2, std::vector<moa::AttentionSpan>(4, moa::AttentionSpan::full())), rng);
  const auto batch = moa::SequenceBatch::full(2, 256);
  const MatrixF input = random_matrix<float>(batch.rows(), 6, rng);
  narrow.forward_self(input, batch, true);
  full.forward_self(input, batch, true);
  // Projections alike; attention over at most 12 keys a row instead of (t + 1).
  const double projections = moa::cost::moa_projections(6, 3, 4, 512, 512, 1024);
  REQUIRE(narrow.last_forward_flops() - projections <= moa::cost::attention(1024.0 * 12, 3));
  REQUIRE(full.last_forward_flops() - projections == Approx(moa::cost::attention(2.0 * 2 * 256 * 257 / 2, 3)));
}

TEST_CASE("MixtureOfAttention with spans: cached decoding equals the full forward", "[span][kv_cache]") {
  moa::Rng rng(5);
  for (const auto& spans : span_sets())
  for (Index k : {1, 2}) {
    INFO("k = " << k);
    auto layer = make_moa_layer<float>(span_config(k, spans), rng);
    require_cached_decoding_matches(layer, 3, 9, rng);
    require_beam_reorder_matches(layer, rng);
  }
}

TEST_CASE("MixtureOfAttention with spans: refused where undefined, bad spans named", "[span][errors]") {
  moa::Rng rng(6);
  auto layer = make_moa_layer<float>(span_config(2), rng);
  const auto batch = moa::SequenceBatch::full(2, 3);
  const MatrixF input = random_matrix<float>(6, 6, rng);
  REQUIRE_MOA_ERROR(layer.forward_self(input, batch, false),
                    "MixtureOfAttention::forward: attention spans (a sink and a window of earlier keys) are defined "
                    "for causal attention only");
  REQUIRE_MOA_ERROR(layer.infer(input, batch, input, batch, false), "MixtureOfAttention::infer: attention spans");
  const MatrixF memory = random_matrix<float>(8, 6, rng);
  auto cross = layer.make_cross_cache(memory, moa::SequenceBatch::full(2, 4));
  REQUIRE_MOA_ERROR(layer.step(input.topRows(2), cross), "not a cross-attention cache");
  auto config = span_config(2);
  config.spans.pop_back();
  REQUIRE_MOA_ERROR(moa::MixtureOfAttention<float>(config, rng), "spans has 3 entries for 4 experts");
  config = span_config(2);
  config.spans[2].growth = 1.5;
  REQUIRE_MOA_ERROR(moa::MixtureOfAttention<float>(config, rng), "spans[2] has sink 1, window 1.5 and growth 1.5");
  config = span_config(2);
  config.mode = moa::RoutingMode::expert_choice;
  config.load_balance_coefficient = config.z_loss_coefficient = 0.0;
  REQUIRE_MOA_ERROR(moa::MixtureOfAttention<float>(config, rng), "attention spans are for causal attention");
}

TEST_CASE("MixtureOfAttention with windowed experts: a constant-size cache decodes as the full forward does",
          "[span][kv_cache]") {
  moa::Rng rng(7);
  // Experts of different windows (rows grouped by expert), and one window for all (rows side by side).
  for (const auto& spans : {std::vector<moa::AttentionSpan>{moa::AttentionSpan::streaming(2, 3), moa::AttentionSpan::streaming(0, 1),
                                                             moa::AttentionSpan::streaming(1, 4), moa::AttentionSpan::streaming(2, 2)},
                            std::vector<moa::AttentionSpan>(4, moa::AttentionSpan::streaming(2, 4))})
  for (Index k : {1, 2}) {
    INFO("k = " << k << ", " << spans[0].to_string());
    auto layer = make_moa_layer<double>(span_config(k, spans), rng);
    const Index batch_size = 2, length = 40;
    const MatrixD input = random_matrix(batch_size * length, 6, rng);
    const MatrixD full = layer.forward_self(input, moa::SequenceBatch::full(batch_size, length), true);
    auto cache = layer.make_self_cache(batch_size, length);
    REQUIRE(cache.is_windowed());
    REQUIRE(cache.capacity() == 2 + 3 + 4);  // the widest sink, window - 1, and a step of up to 4 tokens
    // A prefill of 3 tokens, then one a step, far past the window.
    Index t = 0;
    for (const Index steps : std::vector<Index>(1, 3)) {
      MatrixD first(batch_size * steps, 6);
      for (Index b = 0; b < batch_size; ++b) first.middleRows(b * steps, steps) = input.middleRows(b * length, steps);
      const MatrixD output = layer.step(first, cache);
      for (Index b = 0; b < batch_size; ++b)
        REQUIRE((output.middleRows(b * steps, steps) - full.middleRows(b * length, steps)).cwiseAbs().maxCoeff() < 1e-12);
      t = steps;
    }
    for (; t < length; ++t) {
      MatrixD token(batch_size, 6);
      for (Index b = 0; b < batch_size; ++b) token.row(b) = input.row(b * length + t);
      const MatrixD output = layer.step(token, cache);
      for (Index b = 0; b < batch_size; ++b) {
        INFO("sequence " << b << ", position " << t);
        REQUIRE((output.row(b) - full.row(b * length + t)).cwiseAbs().maxCoeff() < 1e-12);
      }
      REQUIRE(cache.capacity() == 9);
      REQUIRE(cache.key_length(0) <= 9);
    }
    REQUIRE(cache.length() == length);
    REQUIRE(cache.key_shift() == length - 9);  // of the 40 positions, 9 rows kept
    REQUIRE_MOA_ERROR(layer.step(MatrixD::Zero(batch_size * 5, 6), cache), "at most 4 tokens a step");
    REQUIRE_MOA_ERROR(cache.truncate(5), "would need positions this windowed cache has dropped");
  }
  // A full expert among them: the cache keeps everything.
  auto mixed = make_moa_layer<float>(span_config(2), rng);
  REQUIRE_FALSE(mixed.make_self_cache(2, 16).is_windowed());
}

TEST_CASE("Attention spans from JSON: literal files, and malformed ones refused by name", "[span][io]") {
  const auto spans = moa::parse_attention_spans(
      R"({"layers": [[{"sink": 4, "alpha": 64}, {"alpha": 0}, {"sink": 2, "alpha": 16, "beta": 0.25}],
                     [{"alpha": 8}]]})");
  REQUIRE(spans.size() == 2);
  REQUIRE(spans[0] == std::vector<moa::AttentionSpan>{moa::AttentionSpan::streaming(4, 64), moa::AttentionSpan::full(),
                                                      moa::AttentionSpan::elastic(2, 16, 0.25)});
  REQUIRE(spans[1] == std::vector<moa::AttentionSpan>{moa::AttentionSpan::streaming(0, 8)});
  const std::string path = temporary_path("spans.json");
  {
    std::ofstream file(path);
    file << R"({"layers": [[{"alpha": 2}]]})";
  }
  REQUIRE(moa::load_attention_spans(path) == moa::LayerSpans{{moa::AttentionSpan::streaming(0, 2)}});
  REQUIRE_MOA_ERROR(moa::load_attention_spans(path + ".missing"), "load_attention_spans: cannot open");
  const std::vector<std::pair<std::string, std::string>> bad{
      {"{", "is not JSON"},
      {"[]", "expected an object with an array \"layers\""},
      {R"({"layers": {}})", "expected an object with an array \"layers\""},
      {R"({"layers": [[]]})", "spans layer 0: expected a non-empty array of experts"},
      {R"({"layers": [[{"alpha": 4}, 3]]})", "spans layer 0 expert 1: expected an object"},
      {R"({"layers": [[{"sink": 1}]]})", "\"alpha\" (the window, 0 for full attention) must be a number"},
      {R"({"layers": [[{"alpha": "wide"}]]})", "\"alpha\" (the window, 0 for full attention) must be a number"},
      {R"({"layers": [[{"alpha": 4, "window": 3}]]})", "unknown key \"window\""},
      {R"({"layers": [[{"alpha": 4, "sink": 1.5}]]})", "\"sink\" must be an integer"},
      {R"({"layers": [[{"alpha": 4, "beta": 2}]]})", "spans layer 0 expert 0 has sink 0, window 4 and growth 2"},
      {R"({"layers": [[{"alpha": -1}]]})", "window -1"},
      {R"({"layers": [[{"alpha": 0, "sink": 3}]]})", "has no window (full attention) but a sink"},
  };
  for (const auto& [text, message] : bad) {
    INFO(text);
    REQUIRE_MOA_ERROR(moa::parse_attention_spans(text), message);
  }
}
