#include "support.hpp"

#include "moa/models/decoding.hpp"
#include "moa/models.hpp"
#include "moa/text.hpp"

#include <cmath>
#include <limits>

using namespace moa_test;

namespace {

template <typename Attention>
moa::Seq2Seq<Attention> trained_reverser(const std::string& spec, moa::Rng& rng, const moa::LayerSpans& spans = {}) {
  moa::TransformerConfig config;
  config.vocab_size = 10;
  config.model_dim = 16;
  config.ffn_dim = 32;
  config.encoder_layers = 1;
  config.decoder_layers = 2;
  config.attention = moa::AttentionSpec::parse(spec);
  config.decoder_spans = spans;
  moa::Seq2Seq<Attention> model(config, rng);
  for (const auto& entry : moa::parameters_of(model))
    if (entry.name.find("router.weight") != std::string::npos) {
      auto value = entry.value();
      moa::init_normal(value, rng, 0.0, 0.5);
    }
  // A few steps, so that the outputs are neither constant nor all EOS.
  const auto pairs = moa::synthetic_reverse_task(200, 10, 2, 5, rng);
  auto parameters = moa::parameters_of(model);
  moa::Adam<double> adam(parameters);
  moa::CrossEntropyLoss<double> loss(0.0, moa::kPadId);
  for (int step = 0; step < 30; ++step) {
    const auto batch = moa::make_seq2seq_batch(pairs, {std::size_t(step % 100), std::size_t(step % 100 + 100)});
    loss.forward(model.forward(batch.source, batch.source_batch, batch.target_input, batch.target_batch, rng),
                 batch.target_output);
    parameters.zero_grad();
    model.backward(loss.backward());
    adam.step(1e-2);
  }
  model.set_training(false);
  return model;
}

template <typename Attention>
void check_decoders(const std::string& spec, const moa::LayerSpans& spans = {}) {
  moa::Rng rng(1);
  auto model = trained_reverser<Attention>(spec, rng, spans);
  const moa::Seq2Seq<Attention>& frozen = model;  // decoding is const over the model
  const std::vector<moa::TokenPair> pairs{{{4, 5, 6}, {}}, {{7, 8, 9, 4, 5}, {}}, {{6}, {}}};
  const auto batch = moa::make_seq2seq_batch(pairs, {0, 1, 2});
  const auto cached = moa::greedy_decode(frozen, batch.source, batch.source_batch, 8);
  const auto uncached = moa::greedy_decode_uncached(frozen, batch.source, batch.source_batch, 8);
  REQUIRE(cached == uncached);
  std::size_t produced = 0;
  for (const auto& output : cached) produced += output.size();
  REQUIRE(produced > 0);
  moa::BeamSearchOptions one;
  one.beam_size = 1;
  one.max_length = 8;
  REQUIRE(moa::beam_search(model, batch.source, batch.source_batch, one) == cached);
  moa::BeamSearchOptions four;
  four.max_length = 8;
  const auto beams = moa::beam_search(frozen, batch.source, batch.source_batch, four);
  REQUIRE(beams.size() == 3);
  REQUIRE_MOA_ERROR(moa::greedy_decode(model, batch.source, batch.source_batch, 0), "max_length must be positive");
  four.beam_size = 0;
  REQUIRE_MOA_ERROR(moa::beam_search(model, batch.source, batch.source_batch, four), "beam_size must be positive");
  // Decoding changes only its state: two states do not interfere.
  const auto memory = frozen.encode(batch.source, batch.source_batch);
  auto first = frozen.start_decoding(memory, batch.source_batch, 4), second = first;
  const moa::TokenIds bos(3, moa::kBosId);
  const MatrixD logits = frozen.step(bos, first);
  frozen.step({5, 6, 7}, first);
  REQUIRE(frozen.step(bos, second) == logits);
  // Decoding is evaluation: a model left in training mode is refused, not silently switched.
  model.set_training(true);
  REQUIRE_MOA_ERROR(moa::greedy_decode(model, batch.source, batch.source_batch, 8),
                    "Seq2Seq::encode: encoding without an Rng is for evaluation: call set_training(false) first");
  REQUIRE_MOA_ERROR(moa::greedy_decode_uncached(model, batch.source, batch.source_batch, 8), "call set_training(false)");
  REQUIRE(model.training());
}

}  // namespace

TEST_CASE("Decoding: cached greedy equals uncached, beam 1 equals greedy (MoA)", "[decoding]") {
  check_decoders<moa::MixtureOfAttention<double>>("moa:2K4E8D");
}

TEST_CASE("Decoding: cached greedy equals uncached, beam 1 equals greedy (MoA, expert choice in the encoder)",
          "[decoding]") {
  check_decoders<moa::MixtureOfAttention<double>>("moa-ec:2K4E8D");
}

TEST_CASE("Decoding: cached greedy equals uncached, beam 1 equals greedy (MoA with per-expert spans)",
          "[decoding][span]") {
  const std::vector<moa::AttentionSpan> spans{moa::AttentionSpan::streaming(1, 2), moa::AttentionSpan::full(),
                                              moa::AttentionSpan::elastic(0, 1.5, 0.25), moa::AttentionSpan::streaming(0, 1)};
  check_decoders<moa::MixtureOfAttention<double>>("moa:2K4E8D", {spans, spans});
}

TEST_CASE("Decoding: cached greedy equals uncached, beam 1 equals greedy (MoH)", "[decoding]") {
  check_decoders<moa::MixtureOfHeads<double>>("moh:1S2K3H8D");
}

TEST_CASE("Decoding: cached greedy equals uncached, beam 1 equals greedy (MHA)", "[decoding]") {
  check_decoders<moa::MultiHeadAttention<double>>("mha:2H8D");
}

TEST_CASE("Beam search with a beam wider than every prefix finds the exhaustive search's best", "[decoding]") {
  moa::Rng rng(3);
  auto model = trained_reverser<moa::MixtureOfAttention<double>>("moa:2K4E8D", rng);
  const std::vector<moa::TokenPair> pairs{{{4, 5, 6}, {}}, {{7, 8, 9, 4, 5}, {}}, {{6}, {}}};
  const auto batch = moa::make_seq2seq_batch(pairs, {0, 1, 2});
  moa::BeamSearchOptions options;
  options.max_length = 3;
  options.beam_size = 1000;  // 10^3 > every prefix of 3 tokens: nothing is pruned
  options.length_penalty = 0.6;
  const auto found = moa::beam_search(model, batch.source, batch.source_batch, options);
  REQUIRE(found.size() == 3);
  const Index vocab = model.config().vocab_size;
  for (std::size_t sentence = 0; sentence < pairs.size(); ++sentence) {
    INFO("sentence " << sentence);
    const auto one = moa::make_seq2seq_batch(pairs, {sentence});
    // Every hypothesis: tokens then EOS within max_length, or max_length tokens without EOS,
    // scored log p / (length + 1)^penalty as the beam search scores them.
    double best_score = -std::numeric_limits<double>::infinity();
    moa::TokenIds best;
    std::vector<std::pair<moa::TokenIds, double>> prefixes{{{}, 0.0}};
    for (Index length = 0; length <= options.max_length; ++length) {
      std::vector<std::pair<moa::TokenIds, double>> longer;
      for (const auto& [prefix, log_p] : prefixes) {
        const double penalty = std::pow(static_cast<double>(prefix.size() + 1), options.length_penalty);
        if (length == options.max_length) {
          if (log_p / penalty > best_score) best_score = log_p / penalty, best = prefix;
          continue;
        }
        moa::TokenIds input{moa::kBosId};
        input.insert(input.end(), prefix.begin(), prefix.end());
        const auto logits = model.forward(one.source, one.source_batch, input,
                                          moa::SequenceBatch::full(1, static_cast<Index>(input.size())), rng);
        const MatrixD log_probabilities = moa::log_softmax_rows<double>(logits).bottomRows(1);
        for (Index token = 0; token < vocab; ++token) {
          const double next = log_p + log_probabilities(0, token);
          if (token == moa::kEosId) {
            if (next / penalty > best_score) best_score = next / penalty, best = prefix;
            continue;
          }
          moa::TokenIds extended = prefix;
          extended.push_back(token);
          longer.push_back({extended, next});
        }
      }
      prefixes.swap(longer);
    }
    REQUIRE(found[sentence] == best);
  }
}
