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
      : self_attn(AttentionTraits<Attention>::make(config, rng)),
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
    self_attn.set_compute(compute);
    ffn.set_compute(compute);
  }

  // input: [B*T, d_model] -> output: [B*T, d_model]
  Matrix<Scalar> forward(const Matrix<Scalar>& input, const SequenceBatch& batch, Rng& rng) {
    if (norm_ == NormPlacement::post) {
      Matrix<Scalar> hidden =
          self_attn_layer_norm.forward(input + attention_dropout_.forward(forward_self_attention(self_attn, input, batch, false, rng), rng));
      return final_layer_norm.forward(hidden + ffn_dropout_.forward(ffn.forward(hidden), rng));
    }
    Matrix<Scalar> hidden =
        input + attention_dropout_.forward(forward_self_attention(self_attn, self_attn_layer_norm.forward(input), batch, false, rng), rng);
    return hidden + ffn_dropout_.forward(ffn.forward(final_layer_norm.forward(hidden)), rng);
  }

  // grad_output: [B*T, d_model] -> grad_input: [B*T, d_model]
  Matrix<Scalar> backward(const Matrix<Scalar>& grad_output) {
    if (norm_ == NormPlacement::post) {
      const Matrix<Scalar> grad_sum = final_layer_norm.backward(grad_output);
      const Matrix<Scalar> grad_hidden = grad_sum + ffn.backward(ffn_dropout_.backward(grad_sum));
      const Matrix<Scalar> grad_first = self_attn_layer_norm.backward(grad_hidden);
      return grad_first + self_attn.backward_self(attention_dropout_.backward(grad_first));
    }
    const Matrix<Scalar> grad_hidden = grad_output + final_layer_norm.backward(ffn.backward(ffn_dropout_.backward(grad_output)));
    return grad_hidden + self_attn_layer_norm.backward(self_attn.backward_self(attention_dropout_.backward(grad_hidden)));
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
  Dropout<Scalar> attention_dropout_, ffn_dropout_;
  NormPlacement norm_;
};

}  // namespace moa
