// moa/models/transformer_encoder.hpp - the encoder stack that Seq2Seq and MaskedLM share: token
// embeddings scaled by sqrt(d_model) plus sinusoidal positions (fairseq's Transformer), dropout,
// the encoder layers, and with pre-LN a final layer norm.
//
// The embedding table is the model's (Seq2Seq shares one table between source, target and output
// projection), so it is passed to forward and backward rather than owned. Parameter names, under
// the model's prefix "encoder.": layers.<i>.*, layer_norm.* (pre-LN only).
#pragma once

#include "moa/dropout.hpp"
#include "moa/embedding.hpp"
#include "moa/error.hpp"
#include "moa/gemm.hpp"
#include "moa/layer_norm.hpp"
#include "moa/models/attention_site.hpp"
#include "moa/models/encoder_layer.hpp"
#include "moa/models/transformer_config.hpp"
#include "moa/parameter.hpp"
#include "moa/random.hpp"
#include "moa/sequence_batch.hpp"
#include "moa/tensor.hpp"

#include <cmath>
#include <string>
#include <vector>

namespace moa {

// The factor on token embeddings, sqrt(d_model), so they match the positions' scale.
template <typename Scalar>
Scalar embedding_scale(Index model_dim) {
  return std::sqrt(static_cast<Scalar>(model_dim));
}

// Token embeddings times sqrt(d_model) plus the sinusoidal positions of rows first_position...;
// padding rows stay zero. output: [B*T, d_model]
template <typename Scalar>
Matrix<Scalar> embed_sequence(const Embedding<Scalar>& table, const TokenIds& ids, const SequenceBatch& batch,
                              Index first_position = 0) {
  batch.validate("embed_sequence", "ids", static_cast<Index>(ids.size()));
  Matrix<Scalar> output = table.lookup(ids) * embedding_scale<Scalar>(table.embedding_dim());
  const Matrix<Scalar> positions = sinusoidal_positions<Scalar>(batch.length, table.embedding_dim(), first_position);
  for (Index row = 0; row < output.rows(); ++row)
    if (batch.is_token(row) && ids[static_cast<std::size_t>(row)] != table.padding_index())
      output.row(row) += positions.row(row % batch.length);
  return output;
}

template <typename Attention>
class TransformerEncoder {
 public:
  using Scalar = typename Attention::Scalar;
  static_assert(is_attention_v<Attention>, "Attention must provide moa/attention_interface.hpp");
  using Layer = TransformerEncoderLayer<Attention>;

  TransformerEncoder(const TransformerConfig& config, Rng& rng)
      : layer_norm(config.model_dim), norm_(config.norm), dropout_(config.dropout) {
    layers.reserve(static_cast<std::size_t>(config.encoder_layers));
    for (Index i = 0; i < config.encoder_layers; ++i) layers.emplace_back(config, rng);
  }

  void set_training(bool training) {
    for (auto& layer : layers) layer.set_training(training);
    dropout_.set_training(training);
  }
  void set_compute(const ComputePtr& compute) {
    for (auto& layer : layers) layer.set_compute(compute);
    layer_norm.set_compute(compute);
    dropout_.set_compute(compute);
  }

  // ids: B*T -> output: [B*T, d_model]
  Matrix<Scalar> forward(const Embedding<Scalar>& table, const TokenIds& ids, const SequenceBatch& batch, Rng& rng) {
    ids_ = ids;
    Matrix<Scalar> hidden = dropout_.forward(embed_sequence(table, ids, batch), rng);
    for (auto& layer : layers) hidden = layer.forward(hidden, batch, rng);
    if (norm_ == NormPlacement::pre) hidden = layer_norm.forward(hidden);
    return hidden;
  }

  // The same output as forward in evaluation, keeping nothing for backward.
  Matrix<Scalar> infer(const Embedding<Scalar>& table, const TokenIds& ids, const SequenceBatch& batch) const {
    Matrix<Scalar> hidden = embed_sequence(table, ids, batch);
    for (const auto& layer : layers) hidden = layer.infer(hidden, batch);
    if (norm_ == NormPlacement::pre) hidden = layer_norm.infer(hidden);
    return hidden;
  }

  // grad_output: [B*T, d_model]; accumulates the layers' gradients and the table's rows of the ids.
  void backward(Matrix<Scalar> grad, Embedding<Scalar>& table) {
    if (norm_ == NormPlacement::pre) grad = layer_norm.backward(grad);
    for (auto layer = layers.rbegin(); layer != layers.rend(); ++layer) grad = layer->backward(grad);
    table.accumulate_grad(ids_, dropout_.backward(grad) * embedding_scale<Scalar>(table.embedding_dim()));
  }

  Scalar aux_loss() const {
    Scalar total = 0;
    for (const auto& layer : layers) total += layer.aux_loss();
    return total;
  }

  // visit(const AttentionSite&, Attention&) for each layer's self-attention.
  template <typename Visitor>
  void for_each_attention(const std::string& prefix, Visitor&& visit) {
    for (std::size_t i = 0; i < layers.size(); ++i)
      visit(AttentionSite{prefix + "layers." + std::to_string(i) + ".self_attn", true}, layers[i].self_attn);
  }

  void collect_parameters(ParameterList<Scalar>& list, const std::string& prefix) {
    for (std::size_t i = 0; i < layers.size(); ++i)
      layers[i].collect_parameters(list, prefix + "layers." + std::to_string(i) + ".");
    if (norm_ == NormPlacement::pre) layer_norm.collect_parameters(list, prefix + "layer_norm.");
  }

  std::vector<Layer> layers;
  LayerNorm<Scalar> layer_norm;  // pre-LN only

 private:
  NormPlacement norm_;
  Dropout<Scalar> dropout_;
  TokenIds ids_;  // B*T, for the embedding gradient
};

}  // namespace moa
