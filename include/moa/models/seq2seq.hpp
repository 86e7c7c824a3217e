// moa/models/seq2seq.hpp - an encoder-decoder Transformer with one embedding table for source,
// target and output projection, for translation:
//     moa::Seq2Seq<moa::MixtureOfAttention<float>>   or   moa::Seq2Seq<moa::MultiHeadAttention<float>>
// Training: forward (teacher forcing) then backward. Decoding: encode, start_decoding, then step
// one token at a time with the KV caches of the DecoderState (see moa/models/decoding.hpp).
//
// Parameter names follow fairseq: embed_tokens.weight, encoder.layers.<i>.*, encoder.layer_norm.*,
// decoder.layers.<i>.{self_attn,encoder_attn,...}.*, decoder.layer_norm.*.
#pragma once

#include "moa/dropout.hpp"
#include "moa/embedding.hpp"
#include "moa/error.hpp"
#include "moa/gemm.hpp"
#include "moa/kv_cache.hpp"
#include "moa/layer_norm.hpp"
#include "moa/models/attention_site.hpp"
#include "moa/models/decoder_layer.hpp"
#include "moa/models/transformer_config.hpp"
#include "moa/models/transformer_encoder.hpp"
#include "moa/parameter.hpp"
#include "moa/random.hpp"
#include "moa/sequence_batch.hpp"
#include "moa/tensor.hpp"

#include <string>
#include <utility>
#include <vector>

namespace moa {

// Encoder-decoder Transformer with one embedding table for source, target and output projection.
template <typename Attention>
class Seq2Seq {
 public:
  using Scalar = typename Attention::Scalar;
  using DecoderLayer = TransformerDecoderLayer<Attention>;

  Seq2Seq(const TransformerConfig& config, Rng& rng)
      : embed_tokens((config.validate("Seq2Seq"), config.vocab_size), config.model_dim, rng, config.padding_index),
        encoder((check_layers(config), config), rng),
        decoder_norm(config.model_dim),
        config_(config),
        decoder_dropout_(config.dropout) {
    decoder_layers.reserve(static_cast<std::size_t>(config.decoder_layers));
    for (Index i = 0; i < config.decoder_layers; ++i) decoder_layers.emplace_back(config, rng, i);
    pack_parameters(*this);  // one block: see moa/parameter.hpp
  }

  const TransformerConfig& config() const { return config_; }

  void set_training(bool training) {
    training_ = training;
    encoder.set_training(training);
    for (auto& layer : decoder_layers) layer.set_training(training);
    decoder_dropout_.set_training(training);
  }

  // The backend, threads and inference precision of every layer.
  void set_compute(const ComputePtr& compute) {
    compute_ = detail::checked_compute(compute, "Seq2Seq::set_compute");
    embed_tokens.set_compute(compute);
    encoder.set_compute(compute);
    for (auto& layer : decoder_layers) layer.set_compute(compute);
    decoder_norm.set_compute(compute);
    decoder_dropout_.set_compute(compute);
  }
  const Compute& compute() const { return *compute_; }

  // source: B*S ids, target_input: B*T ids (the target shifted right, starting with BOS).
  // Returns logits: [B*T, V].
  Matrix<Scalar> forward(const TokenIds& source, const SequenceBatch& source_batch, const TokenIds& target_input,
                         const SequenceBatch& target_batch, Rng& rng) {
    const char* function = "Seq2Seq::forward";
    source_batch.validate(function, "source", static_cast<Index>(source.size()));
    target_batch.validate(function, "target_input", static_cast<Index>(target_input.size()));
    MOA_CHECK(source_batch.batch_size == target_batch.batch_size, function, "source has ", source_batch.batch_size,
              " sequences but target_input has ", target_batch.batch_size);
    target_ = target_input;
    memory_ = encode(source, source_batch, rng);
    Matrix<Scalar> hidden = decoder_dropout_.forward(embed_sequence(embed_tokens, target_input, target_batch), rng);
    for (auto& layer : decoder_layers) hidden = layer.forward(hidden, target_batch, memory_, source_batch, rng);
    if (config_.norm == NormPlacement::pre) hidden = decoder_norm.forward(hidden);
    decoder_output_ = std::move(hidden);
    return embed_tokens.project(decoder_output_, product_precision(*compute_, training_));
  }

  // The same logits as forward in evaluation, const over the model: nothing drawn, nothing kept
  // for backward.
  Matrix<Scalar> infer(const TokenIds& source, const SequenceBatch& source_batch, const TokenIds& target_input,
                       const SequenceBatch& target_batch) const {
    const char* function = "Seq2Seq::infer";
    MOA_CHECK(!training_, function, "inference is evaluation: call set_training(false) first");
    target_batch.validate(function, "target_input", static_cast<Index>(target_input.size()));
    MOA_CHECK(source_batch.batch_size == target_batch.batch_size, function, "source has ", source_batch.batch_size,
              " sequences but target_input has ", target_batch.batch_size);
    const Matrix<Scalar> memory = encode(source, source_batch);  // [B*S, d_model]
    Matrix<Scalar> hidden = embed_sequence(embed_tokens, target_input, target_batch);
    for (const auto& layer : decoder_layers) hidden = layer.infer(hidden, target_batch, memory, source_batch);
    if (config_.norm == NormPlacement::pre) hidden = decoder_norm.infer(hidden);
    return embed_tokens.project(hidden, product_precision(*compute_, false));
  }

  // grad_logits: [B*T, V]; accumulates every parameter gradient, the aux losses' included.
  void backward(const Matrix<Scalar>& grad_logits) {
    Matrix<Scalar> grad = embed_tokens.project_backward(decoder_output_, grad_logits);  // [B*T, d_model]
    if (config_.norm == NormPlacement::pre) grad = decoder_norm.backward(grad);
    Matrix<Scalar> grad_memory;  // [B*S, d_model] the sum over the decoder layers
    for (auto layer = decoder_layers.rbegin(); layer != decoder_layers.rend(); ++layer) {
      auto grads = layer->backward(grad);
      grad = std::move(grads.input);
      grad_memory = layer == decoder_layers.rbegin() ? std::move(grads.memory)
                                                     : detail::parallel_add(*compute_, grad_memory, std::move(grads.memory));
    }
    if (decoder_layers.empty()) grad_memory = Matrix<Scalar>::Zero(memory_.rows(), memory_.cols());
    embed_tokens.accumulate_grad(target_, decoder_dropout_.backward(grad) * embedding_scale<Scalar>(config_.model_dim));
    encoder.backward(std::move(grad_memory), embed_tokens);
  }

  Scalar aux_loss() const {
    Scalar total = encoder.aux_loss();
    for (const auto& layer : decoder_layers) total += layer.aux_loss();
    return total;
  }

  bool training() const { return training_; }

  // memory: [B*S, d_model]. Without an Rng, for decoding: evaluation only, const over the model
  // (nothing drawn, nothing kept for backward).
  Matrix<Scalar> encode(const TokenIds& source, const SequenceBatch& source_batch) const {
    MOA_CHECK(!training_, "Seq2Seq::encode", "encoding without an Rng is for evaluation: call set_training(false) first");
    source_batch.validate("Seq2Seq::encode", "source", static_cast<Index>(source.size()));
    return encoder.infer(embed_tokens, source, source_batch);
  }
  Matrix<Scalar> encode(const TokenIds& source, const SequenceBatch& source_batch, Rng& rng) {
    source_batch.validate("Seq2Seq::encode", "source", static_cast<Index>(source.size()));
    return encoder.forward(embed_tokens, source, source_batch, rng);
  }

  // Incremental decoding state: per decoder layer a self-attention cache and a cross cache. All a
  // decoding changes is here: step is const over the model.
  struct DecoderState {
    std::vector<KVCache<Scalar>> self_caches;
    std::vector<KVCache<Scalar>> cross_caches;
    Index length = 0;  // target tokens consumed
    Index batch_size() const { return self_caches.front().batch_size(); }
    void reorder(const std::vector<Index>& order) {
      for (auto& cache : self_caches) cache.reorder(order);
      for (auto& cache : cross_caches) cache.reorder(order);
    }
  };

  // Encodes nothing itself: memory and memory_batch are encode()'s output, capacity the longest
  // target. Call in evaluation mode.
  DecoderState start_decoding(const Matrix<Scalar>& memory, const SequenceBatch& memory_batch, Index capacity) const {
    DecoderState state;
    for (const auto& layer : decoder_layers) {
      state.self_caches.push_back(layer.self_attn.make_self_cache(memory_batch.batch_size, capacity));
      state.cross_caches.push_back(layer.encoder_attn.make_cross_cache(memory, memory_batch));
    }
    return state;
  }

  // tokens: one id per sequence of the state -> logits: [B, V] for the next token. Evaluation mode.
  Matrix<Scalar> step(const TokenIds& tokens, DecoderState& state) const {
    MOA_CHECK(!training_, "Seq2Seq::step", "decoding is for evaluation: call set_training(false) first");
    MOA_CHECK(static_cast<Index>(tokens.size()) == state.batch_size(), "Seq2Seq::step", "got ", tokens.size(),
              " tokens for ", state.batch_size(), " sequences");
    Matrix<Scalar> hidden = embed_tokens.lookup(tokens) * embedding_scale<Scalar>(config_.model_dim);
    const Matrix<Scalar> position = sinusoidal_positions<Scalar>(1, config_.model_dim, state.length);
    for (Index b = 0; b < hidden.rows(); ++b)
      if (tokens[static_cast<std::size_t>(b)] != embed_tokens.padding_index()) hidden.row(b) += position.row(0);
    for (std::size_t i = 0; i < decoder_layers.size(); ++i)
      hidden = decoder_layers[i].step(hidden, state.self_caches[i], state.cross_caches[i]);
    if (config_.norm == NormPlacement::pre) hidden = decoder_norm.infer(hidden);
    ++state.length;
    return embed_tokens.project(hidden, product_precision(*compute_, false));
  }

  void collect_parameters(ParameterList<Scalar>& list, const std::string& prefix = "") {
    embed_tokens.collect_parameters(list, prefix + "embed_tokens.");
    encoder.collect_parameters(list, prefix + "encoder.");
    for (std::size_t i = 0; i < decoder_layers.size(); ++i)
      decoder_layers[i].collect_parameters(list, prefix + "decoder.layers." + std::to_string(i) + ".");
    if (config_.norm == NormPlacement::pre) decoder_norm.collect_parameters(list, prefix + "decoder.layer_norm.");
  }

  // visit(const AttentionSite&, Attention&) for every attention layer, encoder first.
  template <typename Visitor>
  void for_each_attention(Visitor&& visit) {
    encoder.for_each_attention("encoder.", visit);
    for (std::size_t i = 0; i < decoder_layers.size(); ++i) {
      const std::string prefix = "decoder.layers." + std::to_string(i) + ".";
      visit(AttentionSite{prefix + "self_attn", false}, decoder_layers[i].self_attn);
      visit(AttentionSite{prefix + "encoder_attn", false}, decoder_layers[i].encoder_attn);
    }
  }

  Embedding<Scalar> embed_tokens;
  TransformerEncoder<Attention> encoder;
  std::vector<DecoderLayer> decoder_layers;
  LayerNorm<Scalar> decoder_norm;  // pre-LN only

 private:
  static void check_layers(const TransformerConfig& config) {
    MOA_CHECK(config.encoder_layers > 0 && config.decoder_layers > 0, "Seq2Seq", "needs encoder and decoder layers, got ",
              config.encoder_layers, " and ", config.decoder_layers);
  }

  TransformerConfig config_;
  bool training_ = true;
  ComputePtr compute_ = Compute::standard();
  Dropout<Scalar> decoder_dropout_;
  TokenIds target_;
  Matrix<Scalar> memory_;          // [B*S, d_model]
  Matrix<Scalar> decoder_output_;  // [B*T, d_model]
};

}  // namespace moa
