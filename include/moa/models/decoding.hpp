// moa/models/decoding.hpp - greedy and beam-search decoding of a Seq2Seq model with its KV caches.
//
// Outputs are token ids without BOS and EOS. Call with the model in evaluation mode
// (model.set_training(false); otherwise a moa::Error): decoding draws nothing, so it takes no Rng,
// and is const over the model (the decoder state holds all it changes). greedy_decode_uncached
// recomputes the whole prefix each step (Model::infer); it exists to check the cached path.
#pragma once

#include "moa/error.hpp"
#include "moa/random.hpp"
#include "moa/sequence_batch.hpp"
#include "moa/softmax.hpp"
#include "moa/tensor.hpp"
#include "moa/text/special_ids.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace moa {

namespace detail {

// One greedy step: row_of(b) is sequence b's row of logits. Appends each unfinished sequence's
// argmax (ties to the lower id) to its output unless it is EOS, which finishes it; writes the
// chosen ids to `chosen`. Returns whether every sequence has finished.
template <typename Logits, typename RowOf>
bool greedy_step(const Logits& logits, RowOf&& row_of, std::vector<TokenIds>& outputs, std::vector<char>& finished,
                 TokenIds& chosen) {
  bool all_finished = true;
  for (std::size_t b = 0; b < outputs.size(); ++b) {
    Index next = 0;
    logits.row(row_of(static_cast<Index>(b))).maxCoeff(&next);
    chosen[b] = next;
    if (finished[b]) continue;
    if (next == kEosId) {
      finished[b] = 1;
    } else {
      outputs[b].push_back(next);
      all_finished = false;
    }
  }
  return all_finished;
}

}  // namespace detail

template <typename Model>
std::vector<TokenIds> greedy_decode(const Model& model, const TokenIds& source, const SequenceBatch& source_batch,
                                    Index max_length) {
  MOA_CHECK(max_length > 0, "greedy_decode", "max_length must be positive, got ", max_length);
  const auto memory = model.encode(source, source_batch);
  auto state = model.start_decoding(memory, source_batch, max_length);
  const Index batch_size = source_batch.batch_size;
  std::vector<TokenIds> outputs(static_cast<std::size_t>(batch_size));
  std::vector<char> finished(static_cast<std::size_t>(batch_size), 0);
  TokenIds tokens(static_cast<std::size_t>(batch_size), kBosId);
  for (Index t = 0; t < max_length; ++t) {
    const auto logits = model.step(tokens, state);  // [B, V]
    if (detail::greedy_step(logits, [](Index b) { return b; }, outputs, finished, tokens)) break;
  }
  return outputs;
}

// The same as greedy_decode without caches: every step runs the full decoder over the prefix.
template <typename Model>
std::vector<TokenIds> greedy_decode_uncached(const Model& model, const TokenIds& source, const SequenceBatch& source_batch,
                                             Index max_length) {
  MOA_CHECK(!model.training(), "greedy_decode_uncached", "decoding is for evaluation: call set_training(false) first");
  const Index batch_size = source_batch.batch_size;
  std::vector<TokenIds> prefixes(static_cast<std::size_t>(batch_size), TokenIds{kBosId});
  std::vector<TokenIds> outputs(static_cast<std::size_t>(batch_size));
  std::vector<char> finished(static_cast<std::size_t>(batch_size), 0);
  for (Index t = 0; t < max_length; ++t) {
    TokenIds input;
    for (const auto& prefix : prefixes) input.insert(input.end(), prefix.begin(), prefix.end());
    const auto logits = model.infer(source, source_batch, input, SequenceBatch::full(batch_size, t + 1));
    TokenIds next(static_cast<std::size_t>(batch_size));
    const bool all_finished =
        detail::greedy_step(logits, [t](Index b) { return b * (t + 1) + t; }, outputs, finished, next);
    for (Index b = 0; b < batch_size; ++b) prefixes[b].push_back(next[b]);
    if (all_finished) break;
  }
  return outputs;
}

struct BeamSearchOptions {
  Index beam_size = 4;
  Index max_length = 64;
  double length_penalty = 0.6;  // a finished hypothesis scores log p / length^length_penalty
};

// Beam search per sequence, batched over sequences and beams in the caches (B*K rows); returns the
// best finished hypothesis of each sequence. With beam_size 1 it equals greedy_decode.
template <typename Model>
std::vector<TokenIds> beam_search(const Model& model, const TokenIds& source, const SequenceBatch& source_batch,
                                  const BeamSearchOptions& options) {
  const char* function = "beam_search";
  MOA_CHECK(options.beam_size > 0, function, "beam_size must be positive, got ", options.beam_size);
  MOA_CHECK(options.max_length > 0, function, "max_length must be positive, got ", options.max_length);
  const Index batch_size = source_batch.batch_size, beams = options.beam_size;
  const auto memory = model.encode(source, source_batch);
  auto state = model.start_decoding(memory, source_batch, options.max_length);
  std::vector<Index> expand;
  for (Index b = 0; b < batch_size; ++b)
    for (Index j = 0; j < beams; ++j) expand.push_back(b);
  state.reorder(expand);  // row b*K + j is beam j of sequence b

  const double negative_infinity = -std::numeric_limits<double>::infinity();
  std::vector<double> scores(static_cast<std::size_t>(batch_size * beams), negative_infinity);
  for (Index b = 0; b < batch_size; ++b) scores[static_cast<std::size_t>(b * beams)] = 0.0;  // one live beam at start
  std::vector<TokenIds> beam_tokens(static_cast<std::size_t>(batch_size * beams));
  struct Finished {
    double score = -std::numeric_limits<double>::infinity();
    TokenIds tokens;
    Index count = 0;
  };
  std::vector<Finished> finished(static_cast<std::size_t>(batch_size));
  std::vector<char> done(static_cast<std::size_t>(batch_size), 0);
  TokenIds inputs(static_cast<std::size_t>(batch_size * beams), kBosId);
  auto finish = [&](Index b, const TokenIds& tokens, double log_probability) {
    const double length = static_cast<double>(tokens.size() + 1);  // EOS counts
    const double score = log_probability / std::pow(length, options.length_penalty);
    Finished& best = finished[static_cast<std::size_t>(b)];
    if (score > best.score) {
      best.score = score;
      best.tokens = tokens;
    }
    ++best.count;
  };

  struct Candidate {
    double score;
    Index beam;
    Index token;
  };
  for (Index t = 0; t < options.max_length; ++t) {
    const Matrix<double> log_probabilities = log_softmax_rows<double>(model.step(inputs, state).template cast<double>());
    const Index vocab = log_probabilities.cols();
    std::vector<Index> origin(static_cast<std::size_t>(batch_size * beams));
    std::vector<double> next_scores(scores.size(), negative_infinity);
    std::vector<TokenIds> next_tokens(beam_tokens.size());
    for (Index b = 0; b < batch_size; ++b) {
      for (Index j = 0; j < beams; ++j) origin[b * beams + j] = b * beams;  // harmless filler for done sequences
      if (done[b]) continue;
      std::vector<Candidate> candidates;
      for (Index j = 0; j < beams; ++j) {
        const double base = scores[static_cast<std::size_t>(b * beams + j)];
        if (base == negative_infinity) continue;
        for (Index v = 0; v < vocab; ++v) candidates.push_back({base + log_probabilities(b * beams + j, v), j, v});
      }
      const std::size_t keep = std::min<std::size_t>(candidates.size(), static_cast<std::size_t>(2 * beams));
      std::partial_sort(candidates.begin(), candidates.begin() + static_cast<std::ptrdiff_t>(keep), candidates.end(),
                        [](const Candidate& x, const Candidate& y) {
                          if (x.score != y.score) return x.score > y.score;
                          return x.beam != y.beam ? x.beam < y.beam : x.token < y.token;
                        });
      Index filled = 0;
      for (std::size_t c = 0; c < keep && filled < beams; ++c) {
        const Candidate& candidate = candidates[c];
        const TokenIds& prefix = beam_tokens[static_cast<std::size_t>(b * beams + candidate.beam)];
        if (candidate.token == kEosId) {
          if (finished[b].count < beams) finish(b, prefix, candidate.score);
          continue;
        }
        const Index row = b * beams + filled++;
        origin[row] = b * beams + candidate.beam;
        next_scores[static_cast<std::size_t>(row)] = candidate.score;
        next_tokens[static_cast<std::size_t>(row)] = prefix;
        next_tokens[static_cast<std::size_t>(row)].push_back(candidate.token);
      }
      if (finished[b].count >= beams || filled == 0) done[b] = 1;
    }
    scores.swap(next_scores);
    beam_tokens.swap(next_tokens);
    if (std::all_of(done.begin(), done.end(), [](char d) { return d != 0; })) break;
    state.reorder(origin);
    for (std::size_t row = 0; row < inputs.size(); ++row)
      inputs[row] = beam_tokens[row].empty() ? kEosId : beam_tokens[row].back();
  }
  // Sequences that reached max_length: their live beams count as hypotheses too.
  for (Index b = 0; b < batch_size; ++b) {
    if (done[b]) continue;
    for (Index j = 0; j < beams; ++j) {
      const double score = scores[static_cast<std::size_t>(b * beams + j)];
      if (score != negative_infinity) finish(b, beam_tokens[static_cast<std::size_t>(b * beams + j)], score);
    }
  }
  std::vector<TokenIds> outputs;
  for (const Finished& best : finished) outputs.push_back(best.tokens);
  return outputs;
}

}  // namespace moa
