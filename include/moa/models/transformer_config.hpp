// moa/models/transformer_config.hpp - the configuration of a Transformer model and how a model
// builds its attention layers (MixtureOfAttention, MixtureOfHeads or MultiHeadAttention) from it.
#pragma once

#include "moa/attention_span.hpp"
#include "moa/error.hpp"
#include "moa/feed_forward.hpp"
#include "moa/mixture_of_attention.hpp"
#include "moa/mixture_of_heads.hpp"
#include "moa/models/attention_spec.hpp"
#include "moa/multi_head_attention.hpp"
#include "moa/random.hpp"
#include "moa/router.hpp"
#include "moa/tensor.hpp"

namespace moa {

enum class NormPlacement { post, pre };  // post-LN as in the paper, or pre-LN

struct TransformerConfig {
  Index vocab_size = 0;
  Index model_dim = 0;
  Index ffn_dim = 0;
  Index encoder_layers = 0;
  Index decoder_layers = 0;
  double dropout = 0.0;
  NormPlacement norm = NormPlacement::post;
  Activation activation = Activation::relu;
  Index padding_index = 0;
  AttentionSpec attention;
  // The routers' aux-loss coefficients, MoA's and MoH's (ignored for mha)
  double load_balance_coefficient = 0.01;
  double z_loss_coefficient = 0.001;
  // MoA only: each decoder layer's per-expert spans in its causal self-attention
  // (moa/attention_span.hpp; moa/io/attention_spans.hpp reads them from JSON); empty: all full.
  LayerSpans decoder_spans;

  void validate(const char* function) const {
    MOA_CHECK(vocab_size > 0 && model_dim > 0 && ffn_dim > 0, function, "vocab_size (", vocab_size, "), model_dim (",
              model_dim, ") and ffn_dim (", ffn_dim, ") must be positive");
    MOA_CHECK(encoder_layers >= 0 && decoder_layers >= 0, function, "layer counts must be non-negative");
    MOA_CHECK(padding_index >= 0 && padding_index < vocab_size, function, "padding_index ", padding_index,
              " is outside [0, ", vocab_size, ")");
    MOA_CHECK(attention.head_dim > 0, function, "attention spec '", attention.to_string(), "' is not set");
    MOA_CHECK(decoder_spans.empty() || static_cast<Index>(decoder_spans.size()) == decoder_layers, function,
              "decoder_spans has ", decoder_spans.size(), " layers for ", decoder_layers, " decoder layers");
    MOA_CHECK(decoder_spans.empty() || attention.kind == AttentionSpec::Kind::moa, function,
              "decoder_spans are per MoA expert; attention spec '", attention.to_string(), "' has no experts");
  }
};

// Where an attention layer's queries come from: an encoder's, each of which may see every other, or
// a decoder's, which must not depend on later ones (in self- and in cross-attention alike).
enum class QuerySide { encoder, decoder };

// Where a model puts an attention layer: its queries' side, whether it is a decoder's causal
// self-attention (where spans apply), and its layer.
struct AttentionPlace {
  QuerySide side = QuerySide::encoder;
  bool causal_self_attention = false;
  Index layer = 0;
};

// How a model builds its attention layers from the spec: a new attention kind (one that satisfies
// moa/attention_interface.hpp) adds a specialisation.
template <typename Attention>
struct AttentionTraits;

template <typename S>
struct AttentionTraits<MixtureOfAttention<S>> {
  static constexpr AttentionSpec::Kind kind = AttentionSpec::Kind::moa;
  // Expert-choice routing chooses over a whole sequence, which a decoder's queries may not see:
  // decoder layers of a moa-ec model route by token choice, encoder layers by expert choice.
  static MixtureOfAttention<S> make(const TransformerConfig& config, const AttentionPlace& place, Rng& rng) {
    MOA_CHECK(config.attention.kind == kind, "Transformer", "a MixtureOfAttention model needs a moa: spec, got '",
              config.attention.to_string(), "'");
    MixtureOfAttentionConfig attention;
    attention.model_dim = config.model_dim;
    attention.num_experts = config.attention.num_experts;
    attention.top_k = config.attention.top_k;
    attention.head_dim = config.attention.head_dim;
    attention.gate_normalization = config.attention.gates;
    attention.load_balance_coefficient = config.load_balance_coefficient;
    attention.z_loss_coefficient = config.z_loss_coefficient;
    if (place.causal_self_attention && !config.decoder_spans.empty())
      attention.spans = config.decoder_spans[static_cast<std::size_t>(place.layer)];
    if (config.attention.routing == RoutingMode::expert_choice && place.side == QuerySide::encoder) {
      attention.mode = RoutingMode::expert_choice;
      attention.capacity = config.attention.capacity;
      attention.load_balance_coefficient = attention.z_loss_coefficient = 0.0;  // balanced by construction
    }
    return MixtureOfAttention<S>(attention, rng);
  }
};

template <typename S>
struct AttentionTraits<MixtureOfHeads<S>> {
  static constexpr AttentionSpec::Kind kind = AttentionSpec::Kind::moh;
  static MixtureOfHeads<S> make(const TransformerConfig& config, const AttentionPlace&, Rng& rng) {
    MOA_CHECK(config.attention.kind == kind, "Transformer", "a MixtureOfHeads model needs a moh: spec, got '",
              config.attention.to_string(), "'");
    MixtureOfHeadsConfig attention;
    attention.model_dim = config.model_dim;
    attention.shared_heads = config.attention.shared_heads;
    attention.routed_heads = config.attention.num_heads;
    attention.top_k = config.attention.top_k;
    attention.head_dim = config.attention.head_dim;
    attention.load_balance_coefficient = config.load_balance_coefficient;
    attention.z_loss_coefficient = config.z_loss_coefficient;
    return MixtureOfHeads<S>(attention, rng);
  }
};

template <typename S>
struct AttentionTraits<MultiHeadAttention<S>> {
  static constexpr AttentionSpec::Kind kind = AttentionSpec::Kind::mha;
  static MultiHeadAttention<S> make(const TransformerConfig& config, const AttentionPlace&, Rng& rng) {
    MOA_CHECK(config.attention.kind == kind, "Transformer", "a MultiHeadAttention model needs an mha: spec, got '",
              config.attention.to_string(), "'");
    return MultiHeadAttention<S>({config.model_dim, config.attention.num_heads, config.attention.head_dim}, rng);
  }
};

}  // namespace moa
