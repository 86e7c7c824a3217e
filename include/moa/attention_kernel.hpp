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
// computed and discarded.
#pragma once

#include "moa/error.hpp"
#include "moa/gemm.hpp"
#include "moa/sequence_batch.hpp"
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
  // sequence's tokens (MoH's routed heads) and position p is row_positions[p], ascending.
  const Index* row_positions = nullptr;

  // Keys visible from query position p.
  Index visible_keys(Index position) const {
    const Index absolute = (row_positions != nullptr ? row_positions[position] : position) + position_offset;
    return causal ? std::min(absolute + 1, key_length) : key_length;
  }
  // Calls visit(first_position, position_count, key_extent) for each block of query positions.
  template <typename Visit>
  void for_each_block(Visit&& visit) const {
    const Index block = causal ? std::max<Index>(block_positions, 1) : std::max<Index>(positions, 1);
    for (Index first = 0; first < positions; first += block) {
      const Index count = std::min(block, positions - first);
      visit(first, count, visible_keys(first + count - 1));
    }
  }

  // (query row, key) pairs actually attended: what the attention costs.
  Index visible_pairs() const {
    Index pairs = 0;
    for (Index p = 0; p < positions; ++p) pairs += visible_keys(p);
    return pairs * rows_per_position;
  }
};

// queries: [R, d_h], keys/values: [S, d_h] with S >= key_length, probabilities: [R, S] (only the
// computed blocks are written), output: [R, d_h] (rows past R of the layout are left alone). The
// products run on `compute` at `precision` (bf16 only for inference).
template <typename Scalar>
void attention_forward(const ConstMatrixRef<Scalar>& queries, const ConstMatrixRef<Scalar>& keys,
                       const ConstMatrixRef<Scalar>& values, const AttentionLayout& layout,
                       MatrixRef<Scalar> probabilities, MatrixRef<Scalar> output,
                       const Compute& compute = *Compute::standard(), Precision precision = Precision::f32) {
  const Scalar scale = Scalar(1) / std::sqrt(static_cast<Scalar>(queries.cols()));
  const Index rows_per_position = layout.rows_per_position;
  layout.for_each_block([&](Index first, Index count, Index extent) {
    const Index first_row = first * rows_per_position, rows = count * rows_per_position;
    auto block_output = output.middleRows(first_row, rows);  // [rows, d_h]
    if (extent == 0) {
      block_output.setZero();
      return;
    }
    auto scores = probabilities.block(first_row, 0, rows, extent);  // [rows, extent]
    gemm<Scalar>(compute, queries.middleRows(first_row, rows), Transpose::no, keys.topRows(extent), Transpose::yes,
                 scores, false, precision);
    for (Index r = 0; r < rows; ++r) {
      const Index visible = layout.visible_keys(first + r / rows_per_position);
      auto row = scores.row(r);
      if (visible == 0) {
        row.setZero();
        continue;
      }
      auto kept = row.head(visible).array();
      const Scalar max_value = kept.maxCoeff();
      kept = ((kept - max_value) * scale).exp();
      kept /= kept.sum();
      row.tail(extent - visible).setZero();
    }
    gemm<Scalar>(compute, scores, Transpose::no, values.topRows(extent), Transpose::no, block_output, false, precision);
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
  Matrix<Scalar>& grad_scores = workspace != nullptr ? *workspace : local;  // [rows, extent]
  layout.for_each_block([&](Index first, Index count, Index extent) {
    const Index first_row = first * layout.rows_per_position, rows = count * layout.rows_per_position;
    if (extent == 0) {
      grad_queries.middleRows(first_row, rows).setZero();
      return;
    }
    const auto block_probabilities = probabilities.block(first_row, 0, rows, extent);  // [rows, extent]
    const auto block_grad_output = grad_output.middleRows(first_row, rows);             // [rows, d_h]
    gemm<Scalar>(compute, block_probabilities, Transpose::yes, block_grad_output, Transpose::no,
                 grad_values.topRows(extent), true);
    grad_scores.resize(rows, extent);
    gemm<Scalar>(compute, block_grad_output, Transpose::no, values.topRows(extent), Transpose::yes, grad_scores);
    // Softmax backward; masked entries have P = 0 and so get 0.
    const ColumnVector<Scalar> dot = block_probabilities.cwiseProduct(grad_scores).rowwise().sum();  // [rows]
    grad_scores = (grad_scores.colwise() - dot).cwiseProduct(block_probabilities) * scale;
    gemm<Scalar>(compute, grad_scores, Transpose::no, keys.topRows(extent), Transpose::no,
                 grad_queries.middleRows(first_row, rows));
    gemm<Scalar>(compute, grad_scores, Transpose::yes, queries.middleRows(first_row, rows), Transpose::no,
                 grad_keys.topRows(extent), true);
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
