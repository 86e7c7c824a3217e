// moa/text/batching.hpp - token pairs, padded batches, token-budget batching and a synthetic task.
#pragma once

#include "moa/error.hpp"
#include "moa/random.hpp"
#include "moa/sequence_batch.hpp"
#include "moa/tensor.hpp"
#include "moa/text/special_ids.hpp"

#include <algorithm>
#include <numeric>
#include <vector>

namespace moa {

struct TokenPair {
  TokenIds source;  // without BOS/EOS
  TokenIds target;  // without BOS/EOS
};

// A padded batch for teacher forcing: source + EOS; target input BOS + target; target output
// target + EOS (padding ids where a sequence is shorter).
struct Seq2SeqBatch {
  TokenIds source;          // B*S
  SequenceBatch source_batch;
  TokenIds target_input;    // B*T
  TokenIds target_output;   // B*T, kPadId at padding (the loss's ignore index)
  SequenceBatch target_batch;
  Index target_tokens = 0;  // real target tokens, EOS included
};

inline Seq2SeqBatch make_seq2seq_batch(const std::vector<TokenPair>& pairs, const std::vector<std::size_t>& indices) {
  MOA_CHECK(!indices.empty(), "make_seq2seq_batch", "indices is empty");
  Seq2SeqBatch batch;
  Index source_length = 0, target_length = 0;
  std::vector<Index> source_lengths, target_lengths;
  for (std::size_t index : indices) {
    MOA_CHECK(index < pairs.size(), "make_seq2seq_batch", "index ", index, " is outside [0, ", pairs.size(), ")");
    source_lengths.push_back(static_cast<Index>(pairs[index].source.size()) + 1);
    target_lengths.push_back(static_cast<Index>(pairs[index].target.size()) + 1);
    source_length = std::max(source_length, source_lengths.back());
    target_length = std::max(target_length, target_lengths.back());
  }
  batch.source_batch = SequenceBatch::padded(source_length, source_lengths);
  batch.target_batch = SequenceBatch::padded(target_length, target_lengths);
  for (std::size_t i = 0; i < indices.size(); ++i) {
    const TokenPair& pair = pairs[indices[i]];
    TokenIds source = pair.source;
    source.push_back(kEosId);
    source.resize(static_cast<std::size_t>(source_length), kPadId);
    batch.source.insert(batch.source.end(), source.begin(), source.end());
    TokenIds input{kBosId}, output = pair.target;
    input.insert(input.end(), pair.target.begin(), pair.target.end());
    output.push_back(kEosId);
    input.resize(static_cast<std::size_t>(target_length), kPadId);
    output.resize(static_cast<std::size_t>(target_length), kPadId);
    batch.target_input.insert(batch.target_input.end(), input.begin(), input.end());
    batch.target_output.insert(batch.target_output.end(), output.begin(), output.end());
    batch.target_tokens += target_lengths[i];
  }
  return batch;
}

// Groups pair indices into batches of at most max_tokens padded tokens (source or target, the
// larger), similar lengths together, then shuffles the batch order with `rng`.
inline std::vector<std::vector<std::size_t>> make_token_batches(const std::vector<TokenPair>& pairs, Index max_tokens,
                                                               Rng& rng) {
  MOA_CHECK(max_tokens > 0, "make_token_batches", "max_tokens must be positive, got ", max_tokens);
  std::vector<std::size_t> order(pairs.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  auto length = [&](std::size_t i) {
    return static_cast<Index>(std::max(pairs[i].source.size(), pairs[i].target.size())) + 1;
  };
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return length(a) < length(b); });
  std::vector<std::vector<std::size_t>> batches;
  std::vector<std::size_t> current;
  Index longest = 0;
  for (std::size_t index : order) {
    const Index candidate = std::max(longest, length(index));
    if (!current.empty() && candidate * static_cast<Index>(current.size() + 1) > max_tokens) {
      batches.push_back(std::move(current));
      current.clear();
      longest = 0;
    }
    current.push_back(index);
    longest = std::max(longest, length(index));
  }
  if (!current.empty()) batches.push_back(std::move(current));
  for (std::size_t i = batches.size(); i > 1; --i) std::swap(batches[i - 1], batches[rng.below(i)]);
  return batches;
}

// The built-in synthetic task, which needs no files: the target is the source reversed. Tokens are
// drawn from the regular ids [kFirstRegularId, vocab_size).
inline std::vector<TokenPair> synthetic_reverse_task(Index count, Index vocab_size, Index min_length, Index max_length,
                                                     Rng& rng) {
  MOA_CHECK(count >= 0, "synthetic_reverse_task", "count must be non-negative, got ", count);
  MOA_CHECK(vocab_size > kFirstRegularId, "synthetic_reverse_task", "vocab_size must exceed ", kFirstRegularId,
            ", got ", vocab_size);
  MOA_CHECK(min_length > 0 && min_length <= max_length, "synthetic_reverse_task", "lengths must satisfy 0 < ",
            min_length, " <= ", max_length);
  std::vector<TokenPair> pairs(static_cast<std::size_t>(count));
  for (TokenPair& pair : pairs) {
    const Index length = min_length + static_cast<Index>(rng.below(static_cast<std::uint64_t>(max_length - min_length + 1)));
    for (Index t = 0; t < length; ++t)
      pair.source.push_back(kFirstRegularId +
                            static_cast<Index>(rng.below(static_cast<std::uint64_t>(vocab_size - kFirstRegularId))));
    pair.target.assign(pair.source.rbegin(), pair.source.rend());
  }
  return pairs;
}

}  // namespace moa
