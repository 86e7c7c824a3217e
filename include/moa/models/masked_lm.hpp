// moa/models/masked_lm.hpp - a Transformer encoder with the output projection tied to the token
// embeddings, for masked language modelling:
//     moa::MaskedLM<moa::MixtureOfAttention<float>>   or   moa::MaskedLM<moa::MultiHeadAttention<float>>
//
// Parameter names follow fairseq: embed_tokens.weight, encoder.layers.<i>.*, encoder.layer_norm.*.
#pragma once

#include "moa/embedding.hpp"
#include "moa/error.hpp"
#include "moa/gemm.hpp"
#include "moa/models/attention_site.hpp"
#include "moa/models/transformer_config.hpp"
#include "moa/models/transformer_encoder.hpp"
#include "moa/parameter.hpp"
#include "moa/random.hpp"
#include "moa/sequence_batch.hpp"
#include "moa/tensor.hpp"

#include <string>

namespace moa {

template <typename Attention>
class MaskedLM {
 public:
  using Scalar = typename Attention::Scalar;

  MaskedLM(const TransformerConfig& config, Rng& rng)
      : embed_tokens((config.validate("MaskedLM"), config.vocab_size), config.model_dim, rng, config.padding_index),
        encoder((check_layers(config), config), rng),
        config_(config) {
    pack_parameters(*this);  // one block: see moa/parameter.hpp
  }

  const TransformerConfig& config() const { return config_; }

  void set_training(bool training) {
    training_ = training;
    encoder.set_training(training);
  }

  // The backend, threads and inference precision of every layer.
  void set_compute(const ComputePtr& compute) {
    compute_ = detail::checked_compute(compute, "MaskedLM::set_compute");
    embed_tokens.set_compute(compute);
    encoder.set_compute(compute);
  }
  const Compute& compute() const { return *compute_; }

  // ids: B*T -> logits: [B*T, V]
  Matrix<Scalar> forward(const TokenIds& ids, const SequenceBatch& batch, Rng& rng) {
    batch.validate("MaskedLM::forward", "ids", static_cast<Index>(ids.size()));
    hidden_ = encoder.forward(embed_tokens, ids, batch, rng);
    return embed_tokens.project(hidden_, product_precision(*compute_, training_));
  }

  // The same logits as forward in evaluation, const over the model: nothing drawn, nothing kept
  // for backward.
  Matrix<Scalar> infer(const TokenIds& ids, const SequenceBatch& batch) const {
    MOA_CHECK(!training_, "MaskedLM::infer", "inference is evaluation: call set_training(false) first");
    batch.validate("MaskedLM::infer", "ids", static_cast<Index>(ids.size()));
    return embed_tokens.project(encoder.infer(embed_tokens, ids, batch), product_precision(*compute_, false));
  }

  // grad_logits: [B*T, V]; accumulates every parameter gradient, the aux losses' included.
  void backward(const Matrix<Scalar>& grad_logits) {
    encoder.backward(embed_tokens.project_backward(hidden_, grad_logits), embed_tokens);
  }

  Scalar aux_loss() const { return encoder.aux_loss(); }

  // visit(const AttentionSite&, Attention&) for every attention layer.
  template <typename Visitor>
  void for_each_attention(Visitor&& visit) {
    encoder.for_each_attention("encoder.", visit);
  }

  void collect_parameters(ParameterList<Scalar>& list, const std::string& prefix = "") {
    embed_tokens.collect_parameters(list, prefix + "embed_tokens.");
    encoder.collect_parameters(list, prefix + "encoder.");
  }

  Embedding<Scalar> embed_tokens;
  TransformerEncoder<Attention> encoder;

 private:
  static void check_layers(const TransformerConfig& config) {
    MOA_CHECK(config.encoder_layers > 0, "MaskedLM", "needs encoder layers, got ", config.encoder_layers);
  }

  TransformerConfig config_;
  bool training_ = true;
  ComputePtr compute_ = Compute::standard();
  Matrix<Scalar> hidden_;  // [B*T, d_model]
};

}  // namespace moa
