// moa/models/decoder_layer.hpp - one Transformer decoder layer: causal self-attention, attention
// over the encoder's output, feed-forward; training (forward/backward) and incremental decoding
// (step, with KV caches).
//
// Parameter names follow fairseq: self_attn.*, encoder_attn.*, *_layer_norm.*, fc1.*, fc2.*.
#pragma once

#include "moa/attention_kernel.hpp"
#include "moa/attention_interface.hpp"
#include "moa/dropout.hpp"
#include "moa/feed_forward.hpp"
#include "moa/kv_cache.hpp"
#include "moa/layer_norm.hpp"
#include "moa/models/transformer_config.hpp"
#include "moa/parameter.hpp"
#include "moa/random.hpp"
#include "moa/sequence_batch.hpp"
#include "moa/tensor.hpp"

#include <string>

namespace moa {

template <typename Attention>
class TransformerDecoderLayer {
 public:
  using Scalar = typename Attention::Scalar;
  static_assert(is_attention_v<Attention>, "Attention must provide moa/attention_interface.hpp");

  // layer: its index in the decoder (for per-layer settings such as TransformerConfig::decoder_spans).
  TransformerDecoderLayer(const TransformerConfig& config, Rng& rng, Index layer = 0)
      : self_attn(AttentionTraits<Attention>::make(config, {QuerySide::decoder, true, layer}, rng)),
        self_attn_layer_norm(config.model_dim),
        encoder_attn(AttentionTraits<Attention>::make(config, {QuerySide::decoder, false, layer}, rng)),
        encoder_attn_layer_norm(config.model_dim),
        ffn(config.model_dim, config.ffn_dim, config.activation, rng),
        final_layer_norm(config.model_dim),
        self_dropout_(config.dropout),
        cross_dropout_(config.dropout),
        ffn_dropout_(config.dropout),
        norm_(config.norm) {}

  void set_training(bool training) {
    self_attn.set_training(training);
    encoder_attn.set_training(training);
    ffn.set_training(training);
    self_dropout_.set_training(training);
    cross_dropout_.set_training(training);
    ffn_dropout_.set_training(training);
  }
  void set_compute(const ComputePtr& compute) {
    compute_ = detail::checked_compute(compute, "TransformerDecoderLayer::set_compute");
    self_attn.set_compute(compute);
    encoder_attn.set_compute(compute);
    ffn.set_compute(compute);
    for (LayerNorm<Scalar>* norm : {&self_attn_layer_norm, &encoder_attn_layer_norm, &final_layer_norm})
      norm->set_compute(compute);
    for (Dropout<Scalar>* dropout : {&self_dropout_, &cross_dropout_, &ffn_dropout_}) dropout->set_compute(compute);
  }

  // input: [B*T, d_model] (causal), memory: [B*S, d_model] -> output: [B*T, d_model]
  Matrix<Scalar> forward(const Matrix<Scalar>& input, const SequenceBatch& batch, const Matrix<Scalar>& memory,
                         const SequenceBatch& memory_batch, Rng& rng) {
    auto self = [&](const Matrix<Scalar>& x) { return forward_self_attention(self_attn, x, batch, true, rng); };
    auto cross = [&](const Matrix<Scalar>& x) { return forward_attention(encoder_attn, x, batch, memory, memory_batch, false, rng); };
    Dropout<Scalar>* dropouts[3] = {&self_dropout_, &cross_dropout_, &ffn_dropout_};
    LayerNorm<Scalar>* norms[3] = {&self_attn_layer_norm, &encoder_attn_layer_norm, &final_layer_norm};
    auto drop = [&](int which, const Matrix<Scalar>& x) { return dropouts[which]->forward(x, rng); };
    auto norm = [&](int which, const Matrix<Scalar>& x) { return norms[which]->forward(x); };
    auto feed_forward = [&](const Matrix<Scalar>& x) { return ffn.forward(x); };
    return wire(input, self, cross, norm, feed_forward, drop);
  }

  struct Gradients {
    Matrix<Scalar> input;   // [B*T, d_model]
    Matrix<Scalar> memory;  // [B*S, d_model]
  };

  Gradients backward(const Matrix<Scalar>& grad_output) {
    Gradients grads;
    auto self_back = [&](const Matrix<Scalar>& g) { return self_attn.backward_self(g); };
    auto cross_back = [&](const Matrix<Scalar>& g) {
      AttentionGradients<Scalar> cross = encoder_attn.backward(g);
      grads.memory = std::move(cross.key_value);
      return std::move(cross.query);
    };
    const Compute& compute = *compute_;
    if (norm_ == NormPlacement::post) {
      const Matrix<Scalar> grad_third = final_layer_norm.backward(grad_output);
      const Matrix<Scalar> grad_second_out = detail::parallel_add(compute, grad_third, ffn.backward(ffn_dropout_.backward(grad_third)));
      const Matrix<Scalar> grad_second = encoder_attn_layer_norm.backward(grad_second_out);
      const Matrix<Scalar> grad_first_out = detail::parallel_add(compute, grad_second, cross_back(cross_dropout_.backward(grad_second)));
      const Matrix<Scalar> grad_first = self_attn_layer_norm.backward(grad_first_out);
      grads.input = detail::parallel_add(compute, grad_first, self_back(self_dropout_.backward(grad_first)));
      return grads;
    }
    const Matrix<Scalar> grad_second =
        detail::parallel_add(compute, grad_output, final_layer_norm.backward(ffn.backward(ffn_dropout_.backward(grad_output))));
    const Matrix<Scalar> grad_first = detail::parallel_add(
        compute, grad_second, encoder_attn_layer_norm.backward(cross_back(cross_dropout_.backward(grad_second))));
    grads.input = detail::parallel_add(compute, grad_first,
                               self_attn_layer_norm.backward(self_back(self_dropout_.backward(grad_first))));
    return grads;
  }

  // Incremental decoding (evaluation: no dropout, nothing random): input [B*n, d_model], n new
  // tokens per sequence.
  // The layer is not changed: the caches are the decoding state.
  Matrix<Scalar> step(const Matrix<Scalar>& input, KVCache<Scalar>& self_cache, KVCache<Scalar>& cross_cache) const {
    auto self = [&](const Matrix<Scalar>& x) { return self_attn.step(x, self_cache); };
    auto cross = [&](const Matrix<Scalar>& x) { return encoder_attn.step(x, cross_cache); };
    const LayerNorm<Scalar>* norms[3] = {&self_attn_layer_norm, &encoder_attn_layer_norm, &final_layer_norm};
    auto norm = [&](int which, const Matrix<Scalar>& x) { return norms[which]->infer(x); };
    auto feed_forward = [&](const Matrix<Scalar>& x) { return ffn.infer(x); };
    auto keep = [](int, Matrix<Scalar> x) { return x; };
    return wire(input, self, cross, norm, feed_forward, keep);
  }

  // The same output as forward in evaluation over whole sequences, keeping nothing for backward.
  Matrix<Scalar> infer(const Matrix<Scalar>& input, const SequenceBatch& batch, const Matrix<Scalar>& memory,
                       const SequenceBatch& memory_batch) const {
    auto self = [&](const Matrix<Scalar>& x) { return self_attn.infer(x, batch, x, batch, true); };
    auto cross = [&](const Matrix<Scalar>& x) { return encoder_attn.infer(x, batch, memory, memory_batch, false); };
    const LayerNorm<Scalar>* norms[3] = {&self_attn_layer_norm, &encoder_attn_layer_norm, &final_layer_norm};
    auto norm = [&](int which, const Matrix<Scalar>& x) { return norms[which]->infer(x); };
    auto feed_forward = [&](const Matrix<Scalar>& x) { return ffn.infer(x); };
    auto keep = [](int, Matrix<Scalar> x) { return x; };
    return wire(input, self, cross, norm, feed_forward, keep);
  }

  Scalar aux_loss() const { return self_attn.aux_loss() + encoder_attn.aux_loss(); }

  void collect_parameters(ParameterList<Scalar>& list, const std::string& prefix = "") {
    self_attn.collect_parameters(list, prefix + "self_attn.");
    self_attn_layer_norm.collect_parameters(list, prefix + "self_attn_layer_norm.");
    encoder_attn.collect_parameters(list, prefix + "encoder_attn.");
    encoder_attn_layer_norm.collect_parameters(list, prefix + "encoder_attn_layer_norm.");
    ffn.collect_parameters(list, prefix);
    final_layer_norm.collect_parameters(list, prefix + "final_layer_norm.");
  }

  Attention self_attn;
  LayerNorm<Scalar> self_attn_layer_norm;
  Attention encoder_attn;
  LayerNorm<Scalar> encoder_attn_layer_norm;
  FeedForward<Scalar> ffn;
  LayerNorm<Scalar> final_layer_norm;

 private:
  // The layer's wiring, shared by forward (training: caching, dropout), infer and step:
  // self and cross are the two attentions, norm(i, x) the i-th layer norm (self, cross, final),
  // drop(i, x) the i-th dropout.
  template <typename Self, typename Cross, typename Norm, typename FeedForwardBlock, typename Drop>
  Matrix<Scalar> wire(const Matrix<Scalar>& input, Self&& self, Cross&& cross, Norm&& norm, FeedForwardBlock&& feed_forward,
                      Drop&& drop) const {
    const Compute& compute = *compute_;
    if (norm_ == NormPlacement::post) {
      const Matrix<Scalar> first = norm(0, detail::parallel_add(compute, input, drop(0, self(input))));
      const Matrix<Scalar> second = norm(1, detail::parallel_add(compute, first, drop(1, cross(first))));
      return norm(2, detail::parallel_add(compute, second, drop(2, feed_forward(second))));
    }
    const Matrix<Scalar> first = detail::parallel_add(compute, input, drop(0, self(norm(0, input))));
    const Matrix<Scalar> second = detail::parallel_add(compute, first, drop(1, cross(norm(1, first))));
    return detail::parallel_add(compute, second, drop(2, feed_forward(norm(2, second))));
  }

  Dropout<Scalar> self_dropout_, cross_dropout_, ffn_dropout_;
  NormPlacement norm_;
  ComputePtr compute_ = Compute::standard();  // for the residual sums
};

}  // namespace moa
