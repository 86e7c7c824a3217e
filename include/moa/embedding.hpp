// moa/embedding.hpp - token embedding table (with a padding index) and sinusoidal positions.
#pragma once

#include "moa/error.hpp"
#include "moa/gemm.hpp"
#include "moa/init.hpp"
#include "moa/parameter.hpp"
#include "moa/random.hpp"
#include "moa/tensor.hpp"

#include <cmath>
#include <string>

namespace moa {

template <typename S>
class Embedding {
 public:
  using Scalar = S;
  static constexpr Index kNoPadding = -1;

  // Weights ~ N(0, embedding_dim^-1/2) as in fairseq's Transformer. A padding token embeds as
  // zeros whatever its row holds, and that row gets no gradient.
  Embedding(Index num_embeddings, Index embedding_dim, Rng& rng, Index padding_index = kNoPadding)
      : weight("weight", {num_embeddings, embedding_dim}), padding_index_(padding_index) {
    MOA_CHECK(padding_index == kNoPadding || (padding_index >= 0 && padding_index < num_embeddings),
              "Embedding", "padding_index ", padding_index, " is outside [0, ", num_embeddings, ")");
    init_normal(weight, rng, 0.0, 1.0 / std::sqrt(static_cast<double>(embedding_dim)));
    if (padding_index_ != kNoPadding) weight.value.row(padding_index_).setZero();
  }

  Index num_embeddings() const { return weight.shape[0]; }
  Index embedding_dim() const { return weight.shape[1]; }
  Index padding_index() const { return padding_index_; }

  // ids: N token ids -> output: [N, embedding_dim]. Caches the ids for backward.
  Matrix<Scalar> forward(const TokenIds& ids) {
    Matrix<Scalar> output = lookup(ids);
    ids_ = ids;
    return output;
  }

  // grad_output: [N, embedding_dim]; scatters rows into the weight gradient. Ids have no gradient.
  void backward(const Matrix<Scalar>& grad_output) { accumulate_grad(ids_, grad_output); }

  // The rows of `ids` without caching anything, for a table used in several places (shared
  // source and target embeddings); pair with accumulate_grad. output: [N, embedding_dim]
  Matrix<Scalar> lookup(const TokenIds& ids) const {
    for (std::size_t i = 0; i < ids.size(); ++i) {
      MOA_CHECK(ids[i] >= 0 && ids[i] < num_embeddings(), "Embedding::forward", "ids[", i, "] = ", ids[i],
                " is outside [0, ", num_embeddings(), ")");
    }
    Matrix<Scalar> output(static_cast<Index>(ids.size()), embedding_dim());  // [N, D]
    for (std::size_t i = 0; i < ids.size(); ++i) {
      if (ids[i] == padding_index_) {
        output.row(static_cast<Index>(i)).setZero();
      } else {
        output.row(static_cast<Index>(i)) = weight.value.row(ids[i]);
      }
    }
    return output;
  }

  void accumulate_grad(const TokenIds& ids, const Matrix<Scalar>& grad_output) {
    MOA_CHECK(grad_output.rows() == static_cast<Index>(ids.size()) && grad_output.cols() == embedding_dim(),
              "Embedding::backward", "grad_output has shape ", detail::shape_of(grad_output), ", expected [",
              ids.size(), ", ", embedding_dim(), "] (as the ids)");
    // Columns spread over the threads, each added in the order of the ids (a repeated id's rows
    // sum the same way for any thread count).
    const bool parallel = static_cast<double>(grad_output.size()) >= kParallelAdditions;
    parallel_ranges(*compute_, embedding_dim(), parallel ? 16 : embedding_dim(), [&](Index first, Index count, int) {
      for (std::size_t i = 0; i < ids.size(); ++i) {
        if (ids[i] != padding_index_)
          weight.grad.row(ids[i]).segment(first, count) += grad_output.row(static_cast<Index>(i)).segment(first, count);
      }
    });
  }

  // The backend and threads of the tied output projection.
  void set_compute(ComputePtr compute) {
    compute_ = detail::checked_compute(std::move(compute), "Embedding::set_compute");
  }
  const Compute& compute() const { return *compute_; }

  // Output projection tied to the table: logits = x W^T. input: [N, D] -> logits: [N, V].
  // precision: bf16 is for inference only.
  Matrix<Scalar> project(const Matrix<Scalar>& input, Precision precision = Precision::f32) const {
    MOA_CHECK(input.cols() == embedding_dim(), "Embedding::project", "input has shape ", detail::shape_of(input),
              ", expected [N, ", embedding_dim(), "]");
    return linear_product<Scalar>(*compute_, input, weight.value, precision);
  }

  // Backward of project: accumulates dW += dlogits^T x and returns dx: [N, D].
  Matrix<Scalar> project_backward(const Matrix<Scalar>& input, const Matrix<Scalar>& grad_logits) {
    MOA_CHECK(grad_logits.rows() == input.rows() && grad_logits.cols() == num_embeddings(),
              "Embedding::project_backward", "grad_logits has shape ", detail::shape_of(grad_logits), ", expected [",
              input.rows(), ", ", num_embeddings(), "]");
    gemm<Scalar>(*compute_, grad_logits, Transpose::yes, input, Transpose::no, weight.grad, true);
    Matrix<Scalar> grad_input(input.rows(), embedding_dim());  // [N, D]
    gemm<Scalar>(*compute_, grad_logits, Transpose::no, weight.value, Transpose::no, grad_input);
    return grad_input;
  }

  void collect_parameters(ParameterList<Scalar>& list, const std::string& prefix = "") { list.add(prefix, weight); }

  Parameter<Scalar> weight;  // [V, D]

 private:
  Index padding_index_;
  static constexpr double kParallelAdditions = 1 << 16;  // below, a second thread costs more than it saves

  ComputePtr compute_ = Compute::standard();
  TokenIds ids_;  // N
};

// Sinusoidal position encodings for positions first_position .. first_position + length - 1, in
// fairseq's layout: sin of every frequency in the first half of the columns, cos in the second
// half (a zero last column when embedding_dim is odd). positions: [length, embedding_dim]
template <typename Scalar>
Matrix<Scalar> sinusoidal_positions(Index length, Index embedding_dim, Index first_position = 0) {
  MOA_CHECK(length >= 0, "sinusoidal_positions", "length must be non-negative, got ", length);
  MOA_CHECK(embedding_dim >= 2, "sinusoidal_positions", "embedding_dim must be at least 2, got ", embedding_dim);
  MOA_CHECK(first_position >= 0, "sinusoidal_positions", "first_position must be non-negative, got ", first_position);
  const Index half = embedding_dim / 2;
  const double step = std::log(10000.0) / static_cast<double>(half > 1 ? half - 1 : 1);
  Matrix<Scalar> positions = Matrix<Scalar>::Zero(length, embedding_dim);
  for (Index t = 0; t < length; ++t) {
    const double position = static_cast<double>(first_position + t);
    for (Index i = 0; i < half; ++i) {
      const double angle = position * std::exp(-step * static_cast<double>(i));
      positions(t, i) = static_cast<Scalar>(std::sin(angle));
      positions(t, half + i) = static_cast<Scalar>(std::cos(angle));
    }
  }
  return positions;
}

}  // namespace moa
