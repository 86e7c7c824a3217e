// moa/kv_cache.hpp - key/value cache for incremental decoding.
//
// One cache per attention layer holds, for each of B sequences, up to `capacity` key rows and value
// rows of `width` columns: width d_h for MoA (ONE shared key and value head, whatever E and k are),
// h*d_h for multi-head attention. A self-attention cache grows by the new tokens every step; a
// cross-attention cache is filled once from the encoder output and then only read.
//
// A cache may also carry its layer's weights rounded to bfloat16 (moa/bfloat16.hpp), made once
// when the cache is made and the layer's compute allows bf16: a decoding step streams those, half
// the bytes. Copies of a cache share them. Such a cache also keeps its keys and values rounded,
// beside the float ones, for steps to stream in the same way.
#pragma once

#include "moa/attention_kernel.hpp"
#include "moa/bfloat16.hpp"
#include "moa/error.hpp"
#include "moa/tensor.hpp"

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

namespace moa {

template <typename S>
class KVCache {
 public:
  using Scalar = S;

  KVCache() = default;
  KVCache(Index batch_size, Index capacity, Index width)
      : batch_size_(batch_size), capacity_(capacity), width_(width) {
    MOA_CHECK(batch_size > 0 && capacity > 0 && width > 0, "KVCache", "batch_size ", batch_size, ", capacity ", capacity,
              " and width ", width, " must be positive");
    keys_ = Matrix<Scalar>::Zero(batch_size * capacity, width);
    values_ = Matrix<Scalar>::Zero(batch_size * capacity, width);
    key_lengths_.assign(static_cast<std::size_t>(batch_size), 0);
  }

  // A self-attention cache for a layer whose every expert sees a bounded span (a sink and a fixed
  // window, moa/attention_span.hpp): it keeps the first `sink` positions and the last
  // window - 1 + max_step, dropping older ones as new ones arrive, so its memory stays the same
  // however long decoding goes. A step appends at most max_step tokens.
  static KVCache windowed(Index batch_size, Index width, Index sink, Index window, Index max_step) {
    MOA_CHECK(sink >= 0 && window > 0 && max_step > 0, "KVCache::windowed", "sink ", sink, " must be non-negative, window ",
              window, " and max_step ", max_step, " positive");
    KVCache cache(batch_size, sink + window - 1 + max_step, width);
    cache.sink_ = sink;
    cache.max_step_ = max_step;
    cache.windowed_ = true;
    return cache;
  }

  Index batch_size() const { return batch_size_; }
  Index capacity() const { return capacity_; }  // rows kept per sequence
  bool is_windowed() const { return windowed_; }
  // A windowed cache: rows [0, sink_rows()) hold positions [0, sink_rows()); row j past them holds
  // position j + key_shift() (the positions dropped so far).
  Index sink_rows() const { return sink_; }
  Index key_shift() const { return dropped_; }
  Index width() const { return width_; }
  Index length() const { return length_; }  // positions appended so far (self-attention)
  bool frozen() const { return frozen_; }   // a cross-attention cache does not grow
  // FLOPs of the last attention step that used this cache (the layer's step is const).
  double last_step_flops() const { return last_step_flops_; }
  void set_last_step_flops(double flops) { last_step_flops_ = flops; }
  Index key_length(Index sequence) const { return key_lengths_[static_cast<std::size_t>(sequence)]; }  // rows in use

  // The layer's weights rounded to bfloat16 for this decoding, in this order (a cross-attention
  // cache needs no key and value weights); none unless the layer made them.
  using RoundedWeights = std::vector<BFloat16Weight>;
  static constexpr std::size_t kQueryWeight = 0, kOutputWeight = 1, kKeyWeight = 2, kValueWeight = 3;
  const BFloat16Weight* rounded_weight(std::size_t index) const {
    return rounded_weights_ != nullptr && index < rounded_weights_->size() ? &(*rounded_weights_)[index] : nullptr;
  }
  // Null: none (and no rounded keys and values either).
  void set_rounded_weights(std::shared_ptr<const RoundedWeights> weights) {
    rounded_weights_ = std::move(weights);
    if (rounded_weights_ == nullptr) {
      rounded_keys_.clear();
      rounded_values_.clear();
    } else {
      round_rows(0, keys_.rows());
    }
  }

  // Rows of sequence b: [capacity, width] each.
  auto keys(Index sequence) const { return keys_.middleRows(sequence * capacity_, capacity_); }
  auto values(Index sequence) const { return values_.middleRows(sequence * capacity_, capacity_); }
  // The same rounded to bfloat16, when the cache carries rounded weights: keys transposed,
  // [width, capacity], values [capacity, width].
  bool has_rounded_rows() const { return !rounded_keys_.empty(); }
  BFloat16Rows rounded_keys(Index sequence) const {
    check_rounded();
    return {rounded_keys_.data() + sequence * width_ * capacity_, width_, capacity_, capacity_};
  }
  BFloat16Rows rounded_values(Index sequence) const {
    check_rounded();
    return {rounded_values_.data() + sequence * capacity_ * width_, capacity_, width_, width_};
  }

  // new_keys, new_values: [B*n, width], n new tokens per sequence, sequence-major.
  void append(const Matrix<Scalar>& new_keys, const Matrix<Scalar>& new_values) {
    const char* function = "KVCache::append";
    MOA_CHECK(!frozen_, function, "the cache holds cross-attention keys and cannot grow");
    MOA_CHECK(new_keys.rows() == new_values.rows() && new_keys.cols() == width_ && new_values.cols() == width_ &&
                  new_keys.rows() % batch_size_ == 0,
              function, "new_keys ", detail::shape_of(new_keys), " and new_values ", detail::shape_of(new_values),
              " must both be [batch_size * n, ", width_, "] with batch_size ", batch_size_);
    const Index steps = new_keys.rows() / batch_size_;
    Index stored = length_ - dropped_;
    if (windowed_) {
      MOA_CHECK(steps <= max_step_, function, "a windowed cache takes at most ", max_step_,
                " tokens a step (the widest window): feed longer inputs in parts");
      // Drop the oldest positions past the sink, keeping window - 1 + max_step - steps before the new ones.
      const Index drop = std::max<Index>(0, stored + steps - capacity_);
      for (Index b = 0; b < batch_size_; ++b)
        for (Index row = sink_; row + drop < stored; ++row) {
          keys_.row(b * capacity_ + row) = keys_.row(b * capacity_ + row + drop);
          values_.row(b * capacity_ + row) = values_.row(b * capacity_ + row + drop);
        }
      dropped_ += drop;
      stored -= drop;
      if (drop > 0)
        for (Index b = 0; b < batch_size_; ++b) round_rows(b * capacity_ + sink_, stored - sink_);
    }
    MOA_CHECK(stored + steps <= capacity_, function, "appending ", steps, " steps to ", length_,
              " cached would exceed the capacity of ", capacity_);
    for (Index b = 0; b < batch_size_; ++b) {
      keys_.middleRows(b * capacity_ + stored, steps) = new_keys.middleRows(b * steps, steps);
      values_.middleRows(b * capacity_ + stored, steps) = new_values.middleRows(b * steps, steps);
      round_rows(b * capacity_ + stored, steps);
    }
    length_ += steps;
    key_lengths_.assign(static_cast<std::size_t>(batch_size_), length_ - dropped_);
  }

  // Forgets the steps after the first `length` (e.g. to retry a step, or drop rejected tokens).
  void truncate(Index length) {
    MOA_CHECK(!frozen_, "KVCache::truncate", "the cache holds cross-attention keys");
    MOA_CHECK(length >= 0 && length <= length_, "KVCache::truncate", "length ", length, " is outside [0, ", length_, "]");
    MOA_CHECK(dropped_ == 0 || length >= sink_ + dropped_, "KVCache::truncate", "length ", length,
              " would need positions this windowed cache has dropped (it keeps ", sink_ + dropped_, " onwards)");
    length_ = length;
    key_lengths_.assign(static_cast<std::size_t>(batch_size_), length_ - dropped_);
  }

  // Fills a cross-attention cache: keys, values [B*S, width] with S = capacity, and the true
  // length of each sequence. The cache is then frozen.
  void fill(const Matrix<Scalar>& keys, const Matrix<Scalar>& values, const std::vector<Index>& key_lengths) {
    const char* function = "KVCache::fill";
    MOA_CHECK(keys.rows() == batch_size_ * capacity_ && keys.cols() == width_ && values.rows() == keys.rows() &&
                  values.cols() == width_,
              function, "keys ", detail::shape_of(keys), " and values ", detail::shape_of(values), " must be [",
              batch_size_ * capacity_, ", ", width_, "]");
    MOA_CHECK(static_cast<Index>(key_lengths.size()) == batch_size_, function, "key_lengths has ", key_lengths.size(),
              " entries for batch_size ", batch_size_);
    for (Index length : key_lengths)
      MOA_CHECK(length >= 0 && length <= capacity_, function, "key length ", length, " is outside [0, ", capacity_, "]");
    keys_ = keys;
    values_ = values;
    round_rows(0, keys_.rows());
    key_lengths_ = key_lengths;
    length_ = capacity_;
    frozen_ = true;
  }

  // Beam reordering: the new sequence i is the old sequence order[i]. The batch size becomes
  // order.size(), so this also selects (drops or duplicates) sequences.
  void reorder(const std::vector<Index>& order) {
    MOA_CHECK(!order.empty(), "KVCache::reorder", "order is empty");
    for (std::size_t i = 0; i < order.size(); ++i)
      MOA_CHECK(order[i] >= 0 && order[i] < batch_size_, "KVCache::reorder", "order[", i, "] = ", order[i],
                " is outside [0, ", batch_size_, ")");
    const Index new_batch = static_cast<Index>(order.size());
    Matrix<Scalar> keys(new_batch * capacity_, width_), values(new_batch * capacity_, width_);  // [B'*cap, width]
    std::vector<Index> key_lengths(order.size());
    for (Index i = 0; i < new_batch; ++i) {
      keys.middleRows(i * capacity_, capacity_) = keys_.middleRows(order[i] * capacity_, capacity_);
      values.middleRows(i * capacity_, capacity_) = values_.middleRows(order[i] * capacity_, capacity_);
      key_lengths[static_cast<std::size_t>(i)] = key_lengths_[static_cast<std::size_t>(order[i])];
    }
    keys_.swap(keys);
    values_.swap(values);
    key_lengths_.swap(key_lengths);
    batch_size_ = new_batch;
    round_rows(0, keys_.rows());
  }

 private:
  // Rounds rows [first, first + count) of the keys and values into their bfloat16 copies, when the
  // cache keeps them (sized here to the float ones).
  void round_rows(Index first, Index count) {
    if (rounded_weights_ == nullptr) return;
    rounded_keys_.resize(static_cast<std::size_t>(keys_.size()));
    rounded_values_.resize(static_cast<std::size_t>(values_.size()));
    for (Index row = first; row < first + count; ++row) {
      const Index sequence = row / capacity_, position = row % capacity_;
      for (Index c = 0; c < width_; ++c) {
        rounded_keys_[static_cast<std::size_t>((sequence * width_ + c) * capacity_ + position)] =
            round_to_bfloat16(static_cast<float>(keys_(row, c)));
        rounded_values_[static_cast<std::size_t>(row * width_ + c)] = round_to_bfloat16(static_cast<float>(values_(row, c)));
      }
    }
  }
  void check_rounded() const {
    MOA_CHECK(has_rounded_rows(), "KVCache::rounded_keys", "the cache keeps no rounded keys and values");
  }

  Index batch_size_ = 0;
  Index capacity_ = 0;
  Index width_ = 0;
  Index length_ = 0;
  bool frozen_ = false;
  bool windowed_ = false;
  Index sink_ = 0;      // windowed: positions always kept
  Index max_step_ = 0;  // windowed: most tokens a step
  Index dropped_ = 0;   // windowed: positions dropped so far, past the sink
  double last_step_flops_ = 0.0;
  Matrix<Scalar> keys_;             // [B*capacity, width]
  Matrix<Scalar> values_;           // [B*capacity, width]
  std::vector<Index> key_lengths_;  // [B]
  std::shared_ptr<const RoundedWeights> rounded_weights_;
  std::vector<std::uint16_t> rounded_keys_;    // [B, width, capacity] with rounded weights (keys transposed)
  std::vector<std::uint16_t> rounded_values_;  // [B*capacity, width] with rounded weights
};

// Attention of query rows [R, d_h] against columns [first_column, first_column + d_h) of sequence
// b's keys and values in a cache (a head of a multi-head cache, or all of MoA's one head): from the
// rounded keys and values when the cache keeps them and the rows are few (a decoding step), else
// from the float ones on `compute`. probabilities: [R, capacity]; output: [R, d_h].
template <typename Scalar>
void attention_over_cache(const ConstMatrixRef<Scalar>& queries, const KVCache<Scalar>& cache, Index sequence,
                          Index first_column, const AttentionLayout& layout, MatrixRef<Scalar> probabilities,
                          MatrixRef<Scalar> output, const Compute& compute, Precision precision) {
  const Index head_dim = queries.cols();
  MOA_CHECK(sequence >= 0 && sequence < cache.batch_size() && first_column >= 0 &&
                first_column + head_dim <= cache.width(),
            "moa::attention_over_cache", "sequence ", sequence, " and columns [", first_column, ", ",
            first_column + head_dim, ") for a cache of ", cache.batch_size(), " sequences of width ", cache.width());
  if constexpr (std::is_same_v<Scalar, float>) {
    if (cache.has_rounded_rows() && queries.rows() <= kRoundedWeightRows) {
      attention_forward(queries, cache.rounded_keys(sequence).middle_rows(first_column, head_dim),
                        cache.rounded_values(sequence).middle_cols(first_column, head_dim), layout, probabilities,
                        output);
      return;
    }
  }
  attention_forward<Scalar>(queries, cache.keys(sequence).middleCols(first_column, head_dim),
                            cache.values(sequence).middleCols(first_column, head_dim), layout, probabilities, output,
                            compute, precision);
}

// Checks a decoding step's input [B*n, model_dim] against a cache of B sequences and `width`
// columns; returns n, the new tokens per sequence.
template <typename Scalar>
Index check_step_input(const Matrix<Scalar>& input, const KVCache<Scalar>& cache, Index model_dim, Index width,
                       const char* function) {
  MOA_CHECK(cache.width() == width, function, "cache has width ", cache.width(), ", expected ", width);
  MOA_CHECK(input.cols() == model_dim && input.rows() > 0 && input.rows() % cache.batch_size() == 0, function,
            "input has shape ", detail::shape_of(input), ", expected [batch_size * n, ", model_dim,
            "] with batch_size ", cache.batch_size());
  return input.rows() / cache.batch_size();
}

// A frozen cross-attention cache of memory: [B*S, d_model] projected by key_weight and
// value_weight ([width, d_model] each), with memory_batch's true lengths.
template <typename Scalar>
KVCache<Scalar> make_cross_attention_cache(const Matrix<Scalar>& memory, const SequenceBatch& memory_batch,
                                           const ConstMatrixRef<Scalar>& key_weight, const ConstMatrixRef<Scalar>& value_weight,
                                           const char* function, const Compute& compute = *Compute::standard(),
                                           Precision precision = Precision::f32) {
  MOA_CHECK(memory.cols() == key_weight.cols(), function, "memory has shape ", detail::shape_of(memory),
            ", expected [N, ", key_weight.cols(), "]");
  memory_batch.validate(function, "memory", memory.rows());
  KVCache<Scalar> cache(memory_batch.batch_size, memory_batch.length, key_weight.rows());
  std::vector<Index> lengths;
  for (Index b = 0; b < memory_batch.batch_size; ++b) lengths.push_back(memory_batch.length_of(b));
  cache.fill(linear_product<Scalar>(compute, memory, key_weight, precision),
             linear_product<Scalar>(compute, memory, value_weight, precision), lengths);
  return cache;
}

}  // namespace moa
