// moa/attention_kernel.hpp - the scaled dot-product attention kernel that MixtureOfAttention and
// MultiHeadAttention share.
//
// The kernel attends R query rows of ONE sequence to ONE key/value head:
//     scores = Q K^T / sqrt(d_h);  P = masked row softmax(scores);  O = P V
// Several adjacent query rows may belong to the same position (rows_per_position): MoA puts a
// token's k expert queries side by side, so its attention is multi-query attention with k query
// rows per token against the one shared K and V. Padded keys are never touched (the key extent
// stops at key_length), and with a causal mask the query positions are processed in blocks, each
// against only the keys it can see, so the upper triangle is skipped block by block instead of
// computed and discarded. An expert with a span (moa/attention_span.hpp: a sink and a window)
// computes per block only the sink's keys and the band of recent ones, so a windowed expert costs
// O(T (sink + window)) rather than O(T^2).
#pragma once

#include "moa/attention_span.hpp"
#include "moa/bfloat16.hpp"
#include "moa/error.hpp"
#include "moa/gemm.hpp"
#include "moa/sequence_batch.hpp"
#include "moa/softmax.hpp"
#include "moa/tensor.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace moa {

// Where the query rows of one sequence sit and what they may see.
struct AttentionLayout {
  Index positions = 0;          // valid query positions; the kernel reads positions * rows_per_position rows
  Index rows_per_position = 1;  // k for MoA (a token's expert queries are adjacent), 1 for one MHA head
  Index key_length = 0;         // keys [0, key_length) are real, the rest padding
  bool causal = false;          // position p sees keys [0, p + position_offset]
  Index position_offset = 0;    // absolute position of query position 0 (the cache length when decoding)
  Index block_positions = 32;   // causal block size in positions
  // Null: query position p is position p of the sequence. Otherwise the rows are a subset of the
  // sequence's tokens (MoH's heads, MoA's experts with spans) and position p is row_positions[p],
  // ascending.
  const Index* row_positions = nullptr;
  // Null or full: every key up to the causal limit. Otherwise (causal only) the sink and the band
  // of moa/attention_span.hpp: the kernel computes only the key blocks a block of rows can see.
  const AttentionSpan* span = nullptr;
  // A windowed cache's keys (KVCache::windowed): rows [0, shift_from) hold their own positions, a
  // row j past them position j + key_shift. key_length counts rows.
  Index shift_from = 0;
  Index key_shift = 0;

  // The keys query position p sees: [0, sink_end) and [band_start, end), sink_end <= band_start.
  struct Visible {
    Index sink_end = 0;
    Index band_start = 0;
    Index end = 0;
    Index count() const { return sink_end + (end - band_start); }
  };
  Index absolute_position(Index position) const {
    return (row_positions != nullptr ? row_positions[position] : position) + position_offset;
  }
  Visible visible(Index position) const {
    const Index absolute = absolute_position(position);
    // In positions first, then in rows of the keys.
    const Index end = causal ? std::min(absolute + 1, key_length + key_shift) : key_length;
    Visible keys;
    keys.end = row_of(end);
    if (span == nullptr || span->is_full()) return keys;
    const Index band_start = std::min(span->band_start(absolute), end);
    keys.band_start = row_of(band_start);
    keys.sink_end = std::min({span->sink, band_start, keys.band_start});
    if (keys.sink_end == keys.band_start) keys.sink_end = keys.band_start = 0;  // one run of keys from 0
    return keys;
  }
  // The key row of a position (a dropped position maps to the first row after the sink).
  Index row_of(Index position) const {
    return key_shift == 0 || position < shift_from ? position : std::max(shift_from, position - key_shift);
  }
  // Keys visible from query position p (the count).
  Index visible_keys(Index position) const { return visible(position).count(); }

  // Calls visit(first_position, position_count, keys) for each block of query positions, keys
  // being what the block's positions see together: [0, sink_end) and [band_start, end), each
  // position a subset of it. Positions ascend, and the band's start never moves back (growth < 1).
  // With a span, a block holds the rows within max(block_positions, window) positions of its first,
  // so its band is at most about twice the window, however sparse the rows.
  template <typename Visit>
  void for_each_block(Visit&& visit) const {
    const Index block = causal ? std::max<Index>(block_positions, 1) : std::max<Index>(positions, 1);
    const bool windowed = causal && span != nullptr && !span->is_full();
    for (Index first = 0, count = 0; first < positions; first += count) {
      count = std::min(block, positions - first);
      if (windowed) {
        const Index start = absolute_position(first);
        const Index reach = std::max(block_positions, span->window_at(start));
        count = 1;
        while (first + count < positions && absolute_position(first + count) - start < reach) ++count;
      }
      const Visible front = visible(first), back = visible(first + count - 1);
      Visible keys;
      keys.end = back.end;
      keys.band_start = front.band_start;
      keys.sink_end = std::max(front.sink_end, back.sink_end);
      if (keys.sink_end >= keys.band_start) keys.sink_end = keys.band_start = 0;
      visit(first, count, keys);
    }
  }

  // (query row, key) pairs actually attended: what the attention costs.
  Index visible_pairs() const {
    Index pairs = 0;
    for (Index p = 0; p < positions; ++p) pairs += visible_keys(p);
    return pairs * rows_per_position;
  }
};

namespace detail {

// The runs of keys [first, first + count) a block computes: the sink and the band, or one run.
struct KeyRun {
  Index first;
  Index count;
};
inline int key_runs(const AttentionLayout::Visible& keys, KeyRun (&runs)[2]) {
  int used = 0;
  if (keys.sink_end > 0) runs[used++] = {0, keys.sink_end};
  if (keys.end > keys.band_start) runs[used++] = {keys.band_start, keys.end - keys.band_start};
  return used;
}

}  // namespace detail

namespace detail {

// The kernel over any key/value storage: scores(first_row, rows, run, block) writes the scores of
// query rows [first_row, first_row + rows) against the run's keys into block [rows, run.count];
// weigh(probabilities, run, output, accumulate) writes (or adds) probabilities [rows, run.count]
// times the run's values into output [rows, d_h].
template <typename Scalar, typename Scores, typename Weigh>
void attention_forward_with(Index head_dim, const AttentionLayout& layout, MatrixRef<Scalar> probabilities,
                            MatrixRef<Scalar> output, Scores&& scores, Weigh&& weigh) {
  const Scalar scale = Scalar(1) / std::sqrt(static_cast<Scalar>(head_dim));
  const Index rows_per_position = layout.rows_per_position;
  layout.for_each_block([&](Index first, Index count, const AttentionLayout::Visible& block_keys) {
    const Index first_row = first * rows_per_position, rows = count * rows_per_position;
    auto block_output = output.middleRows(first_row, rows);  // [rows, d_h]
    KeyRun runs[2];
    const int run_count = key_runs(block_keys, runs);
    if (run_count == 0) {
      block_output.setZero();
      return;
    }
    for (int i = 0; i < run_count; ++i)  // scores of each run: [rows, run]
      scores(first_row, rows, runs[i], probabilities.block(first_row, runs[i].first, rows, runs[i].count));
    for (Index r = 0; r < rows; ++r) {
      const AttentionLayout::Visible visible = layout.visible(first + r / rows_per_position);
      auto row = probabilities.row(first_row + r);
      // Keys of the runs this row may not see get 0.
      const auto hide = [&](Index from, Index to) {
        for (int i = 0; i < run_count; ++i) {
          const Index low = std::max(from, runs[i].first), high = std::min(to, runs[i].first + runs[i].count);
          if (low < high) row.segment(low, high - low).setZero();
        }
      };
      auto sink = row.head(visible.sink_end);
      auto band = row.segment(visible.band_start, visible.end - visible.band_start);
      hide(visible.sink_end, visible.band_start);
      hide(visible.end, block_keys.end);
      if (visible.count() == 0) continue;
      const Scalar max_value = std::max(row_max(sink.data(), sink.size()), row_max(band.data(), band.size()));
      const Scalar total = exp_shifted_inplace(sink.data(), sink.size(), max_value, scale) +
                           exp_shifted_inplace(band.data(), band.size(), max_value, scale);
      const Scalar inverse = Scalar(1) / total;
      sink *= inverse;
      band *= inverse;
    }
    for (int i = 0; i < run_count; ++i)
      weigh(probabilities.block(first_row, runs[i].first, rows, runs[i].count), runs[i], block_output, i > 0);
  });
}

// Where a layer's forward puts its attention probabilities: into `kept` ([rows, keys], every row,
// for backward), or with kept null (inference) into one buffer per thread, reused from part to part
// so that it stays in cache (the probabilities of a batch can be far larger than the batch).
template <typename Scalar>
class AttentionProbabilities {
 public:
  AttentionProbabilities(Matrix<Scalar>* kept, Index rows, Index keys, int threads)
      : kept_(kept), keys_(keys), per_thread_(kept != nullptr ? 0 : static_cast<std::size_t>(threads)) {
    if (kept_ != nullptr) kept_->resize(rows, keys);
  }
  // Rows [first, first + count) for a part on `thread`: [count, keys].
  MatrixRef<Scalar> rows(Index first, Index count, int thread) {
    if (kept_ != nullptr) return kept_->middleRows(first, count);
    Matrix<Scalar>& buffer = per_thread_[static_cast<std::size_t>(thread)];
    if (buffer.rows() < count) buffer.resize(count, keys_);
    return buffer.topRows(count);
  }

 private:
  Matrix<Scalar>* kept_;
  Index keys_;
  std::vector<Matrix<Scalar>> per_thread_;
};

}  // namespace detail

// queries: [R, d_h], keys/values: [S, d_h] with S >= key_length, probabilities: [R, S] (only the
// computed key runs are written), output: [R, d_h] (rows past R of the layout are left alone). The
// products run on `compute` at `precision` (bf16 only for inference).
template <typename Scalar>
void attention_forward(const ConstMatrixRef<Scalar>& queries, const ConstMatrixRef<Scalar>& keys,
                       const ConstMatrixRef<Scalar>& values, const AttentionLayout& layout,
                       MatrixRef<Scalar> probabilities, MatrixRef<Scalar> output,
                       const Compute& compute = *Compute::standard(), Precision precision = Precision::f32) {
  detail::attention_forward_with<Scalar>(
      queries.cols(), layout, probabilities, output,
      [&](Index first_row, Index rows, const detail::KeyRun& run, MatrixRef<Scalar> block) {
        gemm<Scalar>(compute, queries.middleRows(first_row, rows), Transpose::no, keys.middleRows(run.first, run.count),
                     Transpose::yes, block, false, precision);
      },
      [&](const ConstMatrixRef<Scalar>& weights, const detail::KeyRun& run, MatrixRef<Scalar> target, bool accumulate) {
        gemm<Scalar>(compute, weights, Transpose::no, values.middleRows(run.first, run.count), Transpose::no, target,
                     accumulate, precision);
      });
}

// The same with keys and values rounded to bfloat16 (a decoding cache's, KVCache::rounded_keys),
// for few query rows. keys_transposed: [d_h, S], values: [S, d_h]. With the keys transposed, the
// scores of a block of up to 4 rows are rows of multiply-adds over all keys at once (no sums across
// a vector), and each block streams the keys and values once, at half the bytes.
inline void attention_forward(const ConstMatrixRef<float>& queries, const BFloat16Rows& keys_transposed,
                              const BFloat16Rows& values, const AttentionLayout& layout, MatrixRef<float> probabilities,
                              MatrixRef<float> output) {
  MOA_CHECK(keys_transposed.rows == queries.cols() && values.cols == queries.cols() &&
                values.rows == keys_transposed.cols && layout.key_length <= values.rows,
            "moa::attention_forward", "queries are [", queries.rows(), ", ", queries.cols(),
            "], rounded keys (transposed) [", keys_transposed.rows, ", ", keys_transposed.cols, "] and values [",
            values.rows, ", ", values.cols, "] for ", layout.key_length, " keys");
  const Index head_dim = queries.cols();
  detail::attention_forward_with<float>(
      head_dim, layout, probabilities, output,
      [&](Index first_row, Index rows, const detail::KeyRun& run, MatrixRef<float> block) {
        block.setZero();
        detail::few_rows_times_bfloat16(rows, run.count, head_dim, queries.row(first_row).data(), queries.outerStride(),
                                        keys_transposed.data + run.first, keys_transposed.stride, block.data(),
                                        block.outerStride());
      },
      [&](const ConstMatrixRef<float>& weights, const detail::KeyRun& run, MatrixRef<float> target, bool accumulate) {
        if (!accumulate) target.setZero();
        detail::few_rows_times_bfloat16(weights.rows(), head_dim, run.count, weights.data(), weights.outerStride(),
                                        values.data + run.first * values.stride, values.stride, target.data(),
                                        target.outerStride());
      });
}

// Mirrors attention_forward. grad_queries: [R, d_h] (overwritten); grad_keys and grad_values:
// [S, d_h] (accumulated). `workspace` (optional) is reused for the score gradients, so repeated
// calls need not allocate.
template <typename Scalar>
void attention_backward(const ConstMatrixRef<Scalar>& queries, const ConstMatrixRef<Scalar>& keys,
                        const ConstMatrixRef<Scalar>& values, const ConstMatrixRef<Scalar>& probabilities,
                        const ConstMatrixRef<Scalar>& grad_output, const AttentionLayout& layout,
                        MatrixRef<Scalar> grad_queries, MatrixRef<Scalar> grad_keys, MatrixRef<Scalar> grad_values,
                        Matrix<Scalar>* workspace = nullptr, const Compute& compute = *Compute::standard()) {
  const Scalar scale = Scalar(1) / std::sqrt(static_cast<Scalar>(queries.cols()));
  Matrix<Scalar> local;
  Matrix<Scalar>& grad_scores = workspace != nullptr ? *workspace : local;  // [rows, keys of the runs]
  layout.for_each_block([&](Index first, Index count, const AttentionLayout::Visible& block_keys) {
    const Index first_row = first * layout.rows_per_position, rows = count * layout.rows_per_position;
    detail::KeyRun runs[2];
    const int run_count = detail::key_runs(block_keys, runs);
    if (run_count == 0) {
      grad_queries.middleRows(first_row, rows).setZero();
      return;
    }
    const auto block_grad_output = grad_output.middleRows(first_row, rows);  // [rows, d_h]
    Index width = 0;
    for (int i = 0; i < run_count; ++i) width += runs[i].count;
    grad_scores.resize(rows, width);
    // The runs side by side in grad_scores: run i at columns [offset_i, offset_i + count_i).
    Index offset = 0;
    ColumnVector<Scalar> dot = ColumnVector<Scalar>::Zero(rows);  // [rows]
    for (int i = 0; i < run_count; ++i) {
      const auto run_probabilities = probabilities.block(first_row, runs[i].first, rows, runs[i].count);
      gemm<Scalar>(compute, run_probabilities, Transpose::yes, block_grad_output, Transpose::no,
                   grad_values.middleRows(runs[i].first, runs[i].count), true);
      auto run_grad = grad_scores.middleCols(offset, runs[i].count);
      gemm<Scalar>(compute, block_grad_output, Transpose::no, values.middleRows(runs[i].first, runs[i].count),
                   Transpose::yes, run_grad);
      dot += run_probabilities.cwiseProduct(run_grad).rowwise().sum();
      offset += runs[i].count;
    }
    // Softmax backward; masked entries have P = 0 and so get 0.
    offset = 0;
    for (int i = 0; i < run_count; ++i) {
      const auto run_probabilities = probabilities.block(first_row, runs[i].first, rows, runs[i].count);
      auto run_grad = grad_scores.middleCols(offset, runs[i].count);
      run_grad = (run_grad.colwise() - dot).cwiseProduct(run_probabilities) * scale;
      gemm<Scalar>(compute, run_grad, Transpose::no, keys.middleRows(runs[i].first, runs[i].count), Transpose::no,
                   grad_queries.middleRows(first_row, rows), i > 0);
      gemm<Scalar>(compute, run_grad, Transpose::yes, queries.middleRows(first_row, rows), Transpose::no,
                   grad_keys.middleRows(runs[i].first, runs[i].count), true);
      offset += runs[i].count;
    }
  });
}

}  // namespace moa

namespace moa {

// What an attention layer's backward returns: the gradient of the query input and of the
// key/value input (for self-attention, the two are the same tensor: add them, or use
// backward_self).
template <typename Scalar>
struct AttentionGradients {
  Matrix<Scalar> query;      // [B*Tq, d_model]
  Matrix<Scalar> key_value;  // [B*Tk, d_model]
};

namespace detail {

inline void validate_attention_batches(const char* function, Index model_dim, Index query_rows, Index query_cols,
                                       const SequenceBatch& query_batch, Index key_rows, Index key_cols,
                                       const SequenceBatch& key_batch, bool causal) {
  MOA_CHECK(query_cols == model_dim, function, "query has shape [", query_rows, ", ", query_cols, "], expected [N, ",
            model_dim, "]");
  MOA_CHECK(key_cols == model_dim, function, "key_value has shape [", key_rows, ", ", key_cols, "], expected [N, ",
            model_dim, "]");
  query_batch.validate(function, "query", query_rows);
  key_batch.validate(function, "key_value", key_rows);
  MOA_CHECK(query_batch.batch_size == key_batch.batch_size, function, "query batch has ", query_batch.batch_size,
            " sequences but key_value batch has ", key_batch.batch_size);
  MOA_CHECK(!causal || query_batch.length == key_batch.length, function,
            "causal attention needs query and key_value batches of one length, got ", query_batch.length, " and ",
            key_batch.length);
}

}  // namespace detail

}  // namespace moa
