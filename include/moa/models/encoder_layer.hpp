// moa/models/encoder_layer.hpp - one Transformer encoder layer: self-attention and feed-forward,
// each with dropout, a residual connection and layer norm (post-LN as in the paper, or pre-LN).
//
// Parameter names follow fairseq: self_attn.*, self_attn_layer_norm.*, fc1.*, fc2.*,
// final_layer_norm.*.
#pragma once

#include "moa/attention_interface.hpp"
#include "moa/dropout.hpp"
#include "moa/feed_forward.hpp"
#include "moa/layer_norm.hpp"
#include "moa/models/transformer_config.hpp"
#include "moa/parameter.hpp"
#include "moa/random.hpp"
#include "moa/sequence_batch.hpp"
#include "moa/tensor.hpp"

#include <string>

namespace moa {

template <typename Attention>
class TransformerEncoderLayer {
 public:
  using Scalar = typename Attention::Scalar;
  static_assert(is_attention_v<Attention>, "Attention must provide moa/attention_interface.hpp");

  TransformerEncoderLayer(const TransformerConfig& config, Rng& rng)
      : self_attn(AttentionTraits<Attention>::make(config, {QuerySide::encoder, false, 0}, rng)),
        self_attn_layer_norm(config.model_dim),
        ffn(config.model_dim, config.ffn_dim, config.activation, rng),
        final_layer_norm(config.model_dim),
        attention_dropout_(config.dropout),
        ffn_dropout_(config.dropout),
        norm_(config.norm) {}

  void set_training(bool training) {
    self_attn.set_training(training);
    ffn.set_training(training);
    attention_dropout_.set_training(training);
    ffn_dropout_.set_training(training);
  }
  void set_compute(const ComputePtr& compute) {
    compute_ = detail::checked_compute(compute, "TransformerEncoderLayer::set_compute");
    self_attn.set_compute(compute);
    ffn.set_compute(compute);
    self_attn_layer_norm.set_compute(compute);
    final_layer_norm.set_compute(compute);
    attention_dropout_.set_compute(compute);
    ffn_dropout_.set_compute(compute);
  }

  // input: [B*T, d_model] -> output: [B*T, d_model]
  Matrix<Scalar> forward(const Matrix<Scalar>& input, const SequenceBatch& batch, Rng& rng) {
    auto self = [&](const Matrix<Scalar>& x) { return forward_self_attention(self_attn, x, batch, false, rng); };
    Dropout<Scalar>* dropouts[2] = {&attention_dropout_, &ffn_dropout_};
    LayerNorm<Scalar>* norms[2] = {&self_attn_layer_norm, &final_layer_norm};
    auto drop = [&](int which, const Matrix<Scalar>& x) { return dropouts[which]->forward(x, rng); };
    auto norm = [&](int which, const Matrix<Scalar>& x) { return norms[which]->forward(x); };
    auto feed_forward = [&](const Matrix<Scalar>& x) { return ffn.forward(x); };
    return wire(input, self, norm, feed_forward, drop);
  }

  // The same output as forward in evaluation (no dropout, routing as in evaluation), keeping
  // nothing for backward: the layer is not changed.
  Matrix<Scalar> infer(const Matrix<Scalar>& input, const SequenceBatch& batch) const {
    auto self = [&](const Matrix<Scalar>& x) { return self_attn.infer(x, batch, x, batch, false); };
    const LayerNorm<Scalar>* norms[2] = {&self_attn_layer_norm, &final_layer_norm};
    auto norm = [&](int which, const Matrix<Scalar>& x) { return norms[which]->infer(x); };
    auto feed_forward = [&](const Matrix<Scalar>& x) { return ffn.infer(x); };
    auto keep = [](int, Matrix<Scalar> x) { return x; };
    return wire(input, self, norm, feed_forward, keep);
  }

  // grad_output: [B*T, d_model] -> grad_input: [B*T, d_model]
  Matrix<Scalar> backward(const Matrix<Scalar>& grad_output) {
    const Compute& compute = *compute_;
    if (norm_ == NormPlacement::post) {
      const Matrix<Scalar> grad_sum = final_layer_norm.backward(grad_output);
      const Matrix<Scalar> grad_hidden = detail::parallel_add(compute, grad_sum, ffn.backward(ffn_dropout_.backward(grad_sum)));
      const Matrix<Scalar> grad_first = self_attn_layer_norm.backward(grad_hidden);
      return detail::parallel_add(compute, grad_first, self_attn.backward_self(attention_dropout_.backward(grad_first)));
    }
    const Matrix<Scalar> grad_hidden =
        detail::parallel_add(compute, grad_output, final_layer_norm.backward(ffn.backward(ffn_dropout_.backward(grad_output))));
    return detail::parallel_add(compute, grad_hidden,
                        self_attn_layer_norm.backward(self_attn.backward_self(attention_dropout_.backward(grad_hidden))));
  }

  Scalar aux_loss() const { return self_attn.aux_loss(); }

  void collect_parameters(ParameterList<Scalar>& list, const std::string& prefix = "") {
    self_attn.collect_parameters(list, prefix + "self_attn.");
    self_attn_layer_norm.collect_parameters(list, prefix + "self_attn_layer_norm.");
    ffn.collect_parameters(list, prefix);
    final_layer_norm.collect_parameters(list, prefix + "final_layer_norm.");
  }

  Attention self_attn;
  LayerNorm<Scalar> self_attn_layer_norm;
  FeedForward<Scalar> ffn;
  LayerNorm<Scalar> final_layer_norm;

 private:
  // The layer's wiring, shared by forward (training: caching, dropout) and infer: norm(i, x) is
  // the i-th layer norm (self-attention, final), drop(i, x) the i-th dropout.
  template <typename Self, typename Norm, typename FeedForwardBlock, typename Drop>
  Matrix<Scalar> wire(const Matrix<Scalar>& input, Self&& self, Norm&& norm, FeedForwardBlock&& feed_forward,
                      Drop&& drop) const {
    const Compute& compute = *compute_;
    if (norm_ == NormPlacement::post) {
      const Matrix<Scalar> hidden = norm(0, detail::parallel_add(compute, input, drop(0, self(input))));
      return norm(1, detail::parallel_add(compute, hidden, drop(1, feed_forward(hidden))));
    }
    const Matrix<Scalar> hidden = detail::parallel_add(compute, input, drop(0, self(norm(0, input))));
    return detail::parallel_add(compute, hidden, drop(1, feed_forward(norm(1, hidden))));
  }

  Dropout<Scalar> attention_dropout_, ffn_dropout_;
  NormPlacement norm_;
  ComputePtr compute_ = Compute::standard();  // for the residual sums
};

}  // namespace moa
