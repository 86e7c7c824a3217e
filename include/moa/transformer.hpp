// moa/transformer.hpp - Transformer models whose attention is MoA or multi-head attention.
//
// TransformerEncoderLayer, TransformerDecoderLayer, Seq2Seq (encoder-decoder with one embedding
// table shared by source, target and output projection) and MaskedLM (encoder with the output
// projection tied to the embeddings), each templated on the attention class:
//     moa::Seq2Seq<moa::MixtureOfAttention<float>>   or   moa::Seq2Seq<moa::MultiHeadAttention<float>>
// The attention is described by a spec string: "moa:4K8E64D" (top-4 of 8 experts, head width 64)
// or "mha:4H64D" (4 heads of width 64). Every layer reads forward then backward; a model's
// aux_loss() is the sum over its MoA layers, and backward adds its gradient.
//
// Parameter names follow fairseq: embed_tokens.weight, encoder.layers.0.self_attn.q_proj.weight,
// encoder.layers.0.self_attn_layer_norm.weight, encoder.layers.0.fc1.weight, ...,
// decoder.layers.0.encoder_attn.*, decoder.layers.0.final_layer_norm.*.
#pragma once

#include "moa/attention.hpp"
#include "moa/dropout.hpp"
#include "moa/embedding.hpp"
#include "moa/error.hpp"
#include "moa/feed_forward.hpp"
#include "moa/kv_cache.hpp"
#include "moa/layer_norm.hpp"
#include "moa/mixture_of_attention.hpp"
#include "moa/multi_head_attention.hpp"
#include "moa/parameter.hpp"
#include "moa/random.hpp"
#include "moa/tensor.hpp"

#include <cctype>
#include <cmath>
#include <string>
#include <vector>

namespace moa {

// "moa:4K8E64D" or "mha:4H64D".
struct AttentionSpec {
  enum class Kind { moa, mha };
  Kind kind = Kind::moa;
  Index top_k = 0;        // moa
  Index num_experts = 0;  // moa
  Index num_heads = 0;    // mha
  Index head_dim = 0;

  static AttentionSpec parse(const std::string& text) {
    const char* function = "AttentionSpec::parse";
    const std::string expected = "expected 'moa:<k>K<E>E<d_h>D' (e.g. moa:4K8E64D) or 'mha:<h>H<d_h>D' (e.g. mha:4H64D)";
    MOA_CHECK(text.size() > 4 && (text.compare(0, 4, "moa:") == 0 || text.compare(0, 4, "mha:") == 0), function,
              "unknown attention spec '", text, "': ", expected);
    AttentionSpec spec;
    spec.kind = text.compare(0, 4, "moa:") == 0 ? Kind::moa : Kind::mha;
    const std::string letters = spec.kind == Kind::moa ? "KED" : "HD";
    std::size_t position = 4;
    for (char letter : letters) {
      std::size_t end = position;
      while (end < text.size() && std::isdigit(static_cast<unsigned char>(text[end]))) ++end;
      MOA_CHECK(end > position && end < text.size() && end - position <= 9 && text[end] == letter, function,
                "unknown attention spec '", text, "': ", expected);
      const Index value = std::stol(text.substr(position, end - position));
      MOA_CHECK(value > 0, function, "attention spec '", text, "' has a zero count");
      if (letter == 'K') spec.top_k = value;
      if (letter == 'E') spec.num_experts = value;
      if (letter == 'H') spec.num_heads = value;
      if (letter == 'D') spec.head_dim = value;
      position = end + 1;
    }
    MOA_CHECK(position == text.size(), function, "unknown attention spec '", text, "': ", expected);
    MOA_CHECK(spec.kind == Kind::mha || spec.top_k <= spec.num_experts, function, "attention spec '", text,
              "' chooses top-", spec.top_k, " of only ", spec.num_experts, " experts");
    return spec;
  }

  std::string to_string() const {
    return kind == Kind::moa ? "moa:" + std::to_string(top_k) + "K" + std::to_string(num_experts) + "E" +
                                   std::to_string(head_dim) + "D"
                             : "mha:" + std::to_string(num_heads) + "H" + std::to_string(head_dim) + "D";
  }

  // Multiply-adds per token of one attention layer over `keys` keys (self or cross attention),
  // counting projections and attention; MoA adds its router. MoA with k experts and MHA with k
  // heads of the same width cost the same but for MHA's k key/value heads against MoA's one.
  double macs_per_token(Index model_dim, Index keys) const {
    const double d = static_cast<double>(model_dim), dh = static_cast<double>(head_dim), s = static_cast<double>(keys);
    if (kind == Kind::moa) return d * num_experts + 2.0 * top_k * d * dh + 2.0 * d * dh + 2.0 * top_k * s * dh;
    return 4.0 * num_heads * d * dh + 2.0 * num_heads * s * dh;
  }
};

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
  // MoA options (ignored for mha)
  GateNormalization gate_normalization = GateNormalization::renormalized;
  double load_balance_coefficient = 0.01;
  double z_loss_coefficient = 0.001;

  void validate(const char* function) const {
    MOA_CHECK(vocab_size > 0 && model_dim > 0 && ffn_dim > 0, function, "vocab_size (", vocab_size, "), model_dim (",
              model_dim, ") and ffn_dim (", ffn_dim, ") must be positive");
    MOA_CHECK(encoder_layers >= 0 && decoder_layers >= 0, function, "layer counts must be non-negative");
    MOA_CHECK(padding_index >= 0 && padding_index < vocab_size, function, "padding_index ", padding_index,
              " is outside [0, ", vocab_size, ")");
    MOA_CHECK(attention.head_dim > 0, function, "attention spec '", attention.to_string(), "' is not set");
  }
};

// How a model builds its attention layers from the spec.
template <typename Attention>
struct AttentionTraits;

template <typename S>
struct AttentionTraits<MixtureOfAttention<S>> {
  static constexpr AttentionSpec::Kind kind = AttentionSpec::Kind::moa;
  static MixtureOfAttention<S> make(const TransformerConfig& config, Rng& rng) {
    MOA_CHECK(config.attention.kind == kind, "Transformer", "a MixtureOfAttention model needs a moa: spec, got '",
              config.attention.to_string(), "'");
    MixtureOfAttentionConfig attention;
    attention.model_dim = config.model_dim;
    attention.num_experts = config.attention.num_experts;
    attention.top_k = config.attention.top_k;
    attention.head_dim = config.attention.head_dim;
    attention.gate_normalization = config.gate_normalization;
    attention.load_balance_coefficient = config.load_balance_coefficient;
    attention.z_loss_coefficient = config.z_loss_coefficient;
    return MixtureOfAttention<S>(attention, rng);
  }
};

template <typename S>
struct AttentionTraits<MultiHeadAttention<S>> {
  static constexpr AttentionSpec::Kind kind = AttentionSpec::Kind::mha;
  static MultiHeadAttention<S> make(const TransformerConfig& config, Rng& rng) {
    MOA_CHECK(config.attention.kind == kind, "Transformer", "a MultiHeadAttention model needs an mha: spec, got '",
              config.attention.to_string(), "'");
    return MultiHeadAttention<S>({config.model_dim, config.attention.num_heads, config.attention.head_dim}, rng);
  }
};

template <typename Attention>
class TransformerEncoderLayer {
 public:
  using Scalar = typename Attention::Scalar;

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
          self_attn_layer_norm.forward(input + attention_dropout_.forward(self_attn.forward_self(input, batch, false, &rng), rng));
      return final_layer_norm.forward(hidden + ffn_dropout_.forward(ffn.forward(hidden), rng));
    }
    Matrix<Scalar> hidden =
        input + attention_dropout_.forward(self_attn.forward_self(self_attn_layer_norm.forward(input), batch, false, &rng), rng);
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

template <typename Attention>
class TransformerDecoderLayer {
 public:
  using Scalar = typename Attention::Scalar;

  TransformerDecoderLayer(const TransformerConfig& config, Rng& rng)
      : self_attn(AttentionTraits<Attention>::make(config, rng)),
        self_attn_layer_norm(config.model_dim),
        encoder_attn(AttentionTraits<Attention>::make(config, rng)),
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
    self_attn.set_compute(compute);
    encoder_attn.set_compute(compute);
    ffn.set_compute(compute);
  }

  // input: [B*T, d_model] (causal), memory: [B*S, d_model] -> output: [B*T, d_model]
  Matrix<Scalar> forward(const Matrix<Scalar>& input, const SequenceBatch& batch, const Matrix<Scalar>& memory,
                         const SequenceBatch& memory_batch, Rng& rng) {
    auto self = [&](const Matrix<Scalar>& x) { return self_attn.forward_self(x, batch, true, &rng); };
    auto cross = [&](const Matrix<Scalar>& x) { return encoder_attn.forward(x, batch, memory, memory_batch, false, &rng); };
    return run(input, self, cross, rng);
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
    if (norm_ == NormPlacement::post) {
      const Matrix<Scalar> grad_third = final_layer_norm.backward(grad_output);
      const Matrix<Scalar> grad_second_out = grad_third + ffn.backward(ffn_dropout_.backward(grad_third));
      const Matrix<Scalar> grad_second = encoder_attn_layer_norm.backward(grad_second_out);
      const Matrix<Scalar> grad_first_out = grad_second + cross_back(cross_dropout_.backward(grad_second));
      const Matrix<Scalar> grad_first = self_attn_layer_norm.backward(grad_first_out);
      grads.input = grad_first + self_back(self_dropout_.backward(grad_first));
      return grads;
    }
    const Matrix<Scalar> grad_second =
        grad_output + final_layer_norm.backward(ffn.backward(ffn_dropout_.backward(grad_output)));
    const Matrix<Scalar> grad_first =
        grad_second + encoder_attn_layer_norm.backward(cross_back(cross_dropout_.backward(grad_second)));
    grads.input = grad_first + self_attn_layer_norm.backward(self_back(self_dropout_.backward(grad_first)));
    return grads;
  }

  // Incremental decoding (evaluation): input [B*n, d_model], n new tokens per sequence.
  Matrix<Scalar> step(const Matrix<Scalar>& input, KVCache<Scalar>& self_cache, KVCache<Scalar>& cross_cache, Rng& rng) {
    auto self = [&](const Matrix<Scalar>& x) { return self_attn.step(x, self_cache); };
    auto cross = [&](const Matrix<Scalar>& x) { return encoder_attn.step(x, cross_cache); };
    return run(input, self, cross, rng);
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
  template <typename Self, typename Cross>
  Matrix<Scalar> run(const Matrix<Scalar>& input, Self&& self, Cross&& cross, Rng& rng) {
    if (norm_ == NormPlacement::post) {
      const Matrix<Scalar> first = self_attn_layer_norm.forward(input + self_dropout_.forward(self(input), rng));
      const Matrix<Scalar> second = encoder_attn_layer_norm.forward(first + cross_dropout_.forward(cross(first), rng));
      return final_layer_norm.forward(second + ffn_dropout_.forward(ffn.forward(second), rng));
    }
    const Matrix<Scalar> first = input + self_dropout_.forward(self(self_attn_layer_norm.forward(input)), rng);
    const Matrix<Scalar> second = first + cross_dropout_.forward(cross(encoder_attn_layer_norm.forward(first)), rng);
    return second + ffn_dropout_.forward(ffn.forward(final_layer_norm.forward(second)), rng);
  }

  Dropout<Scalar> self_dropout_, cross_dropout_, ffn_dropout_;
  NormPlacement norm_;
};

namespace detail {

// Token embeddings scaled by sqrt(d_model) plus sinusoidal positions (fairseq's Transformer);
// padding rows stay zero. output: [B*T, d_model]
template <typename Scalar>
Matrix<Scalar> embed_sequence(const Embedding<Scalar>& table, const TokenIds& ids, const SequenceBatch& batch,
                              Index first_position) {
  Matrix<Scalar> output = table.lookup(ids) * std::sqrt(static_cast<Scalar>(table.embedding_dim()));
  const Matrix<Scalar> positions = sinusoidal_positions<Scalar>(batch.length, table.embedding_dim(), first_position);
  for (Index row = 0; row < output.rows(); ++row)
    if (batch.is_token(row) && ids[static_cast<std::size_t>(row)] != table.padding_index())
      output.row(row) += positions.row(row % batch.length);
  return output;
}

}  // namespace detail

// Encoder-decoder Transformer with one embedding table for source, target and output projection.
template <typename Attention>
class Seq2Seq {
 public:
  using Scalar = typename Attention::Scalar;
  using EncoderLayer = TransformerEncoderLayer<Attention>;
  using DecoderLayer = TransformerDecoderLayer<Attention>;

  Seq2Seq(const TransformerConfig& config, Rng& rng)
      : embed_tokens((config.validate("Seq2Seq"), config.vocab_size), config.model_dim, rng, config.padding_index),
        encoder_norm(config.model_dim),
        decoder_norm(config.model_dim),
        config_(config),
        encoder_dropout_(config.dropout),
        decoder_dropout_(config.dropout) {
    MOA_CHECK(config.encoder_layers > 0 && config.decoder_layers > 0, "Seq2Seq", "needs encoder and decoder layers, got ",
              config.encoder_layers, " and ", config.decoder_layers);
    encoder_layers.reserve(static_cast<std::size_t>(config.encoder_layers));
    for (Index i = 0; i < config.encoder_layers; ++i) encoder_layers.emplace_back(config, rng);
    decoder_layers.reserve(static_cast<std::size_t>(config.decoder_layers));
    for (Index i = 0; i < config.decoder_layers; ++i) decoder_layers.emplace_back(config, rng);
  }

  const TransformerConfig& config() const { return config_; }

  void set_training(bool training) {
    training_ = training;
    for (auto& layer : encoder_layers) layer.set_training(training);
    for (auto& layer : decoder_layers) layer.set_training(training);
    encoder_dropout_.set_training(training);
    decoder_dropout_.set_training(training);
  }

  // The backend, threads and inference precision of every layer.
  void set_compute(const ComputePtr& compute) {
    compute_ = detail::checked_compute(compute, "Seq2Seq::set_compute");
    embed_tokens.set_compute(compute);
    for (auto& layer : encoder_layers) layer.set_compute(compute);
    for (auto& layer : decoder_layers) layer.set_compute(compute);
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
    source_ = source;
    target_ = target_input;
    source_batch_ = source_batch;
    target_batch_ = target_batch;
    memory_ = encode(source, source_batch, rng);
    Matrix<Scalar> hidden = decoder_dropout_.forward(detail::embed_sequence(embed_tokens, target_input, target_batch, 0), rng);
    for (auto& layer : decoder_layers) hidden = layer.forward(hidden, target_batch, memory_, source_batch, rng);
    if (config_.norm == NormPlacement::pre) hidden = decoder_norm.forward(hidden);
    decoder_output_ = hidden;
    return embed_tokens.project(hidden, product_precision(*compute_, training_));
  }

  // grad_logits: [B*T, V]; accumulates every parameter gradient, the aux losses' included.
  void backward(const Matrix<Scalar>& grad_logits) {
    Matrix<Scalar> grad = embed_tokens.project_backward(decoder_output_, grad_logits);  // [B*T, d_model]
    if (config_.norm == NormPlacement::pre) grad = decoder_norm.backward(grad);
    Matrix<Scalar> grad_memory = Matrix<Scalar>::Zero(memory_.rows(), memory_.cols());  // [B*S, d_model]
    for (auto layer = decoder_layers.rbegin(); layer != decoder_layers.rend(); ++layer) {
      auto grads = layer->backward(grad);
      grad = std::move(grads.input);
      grad_memory += grads.memory;
    }
    embed_tokens.accumulate_grad(target_, decoder_dropout_.backward(grad) * embedding_scale());
    backward_encoder(grad_memory);
  }

  Scalar aux_loss() const {
    Scalar total = 0;
    for (const auto& layer : encoder_layers) total += layer.aux_loss();
    for (const auto& layer : decoder_layers) total += layer.aux_loss();
    return total;
  }

  // memory: [B*S, d_model]
  Matrix<Scalar> encode(const TokenIds& source, const SequenceBatch& source_batch, Rng& rng) {
    source_batch.validate("Seq2Seq::encode", "source", static_cast<Index>(source.size()));
    Matrix<Scalar> hidden = encoder_dropout_.forward(detail::embed_sequence(embed_tokens, source, source_batch, 0), rng);
    for (auto& layer : encoder_layers) hidden = layer.forward(hidden, source_batch, rng);
    if (config_.norm == NormPlacement::pre) hidden = encoder_norm.forward(hidden);
    return hidden;
  }

  // Incremental decoding state: per decoder layer a self-attention cache and a cross cache.
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

  // tokens: one id per sequence of the state -> logits: [B, V] for the next token.
  Matrix<Scalar> step(const TokenIds& tokens, DecoderState& state, Rng& rng) {
    MOA_CHECK(static_cast<Index>(tokens.size()) == state.batch_size(), "Seq2Seq::step", "got ", tokens.size(),
              " tokens for ", state.batch_size(), " sequences");
    Matrix<Scalar> hidden = embed_tokens.lookup(tokens) * embedding_scale();
    const Matrix<Scalar> position = sinusoidal_positions<Scalar>(1, config_.model_dim, state.length);
    for (Index b = 0; b < hidden.rows(); ++b)
      if (tokens[static_cast<std::size_t>(b)] != embed_tokens.padding_index()) hidden.row(b) += position.row(0);
    for (std::size_t i = 0; i < decoder_layers.size(); ++i)
      hidden = decoder_layers[i].step(hidden, state.self_caches[i], state.cross_caches[i], rng);
    if (config_.norm == NormPlacement::pre) hidden = decoder_norm.forward(hidden);
    ++state.length;
    return embed_tokens.project(hidden, product_precision(*compute_, false));
  }

  void collect_parameters(ParameterList<Scalar>& list, const std::string& prefix = "") {
    embed_tokens.collect_parameters(list, prefix + "embed_tokens.");
    for (std::size_t i = 0; i < encoder_layers.size(); ++i)
      encoder_layers[i].collect_parameters(list, prefix + "encoder.layers." + std::to_string(i) + ".");
    for (std::size_t i = 0; i < decoder_layers.size(); ++i)
      decoder_layers[i].collect_parameters(list, prefix + "decoder.layers." + std::to_string(i) + ".");
    if (config_.norm == NormPlacement::pre) {
      encoder_norm.collect_parameters(list, prefix + "encoder.layer_norm.");
      decoder_norm.collect_parameters(list, prefix + "decoder.layer_norm.");
    }
  }

  Embedding<Scalar> embed_tokens;
  std::vector<EncoderLayer> encoder_layers;
  std::vector<DecoderLayer> decoder_layers;
  LayerNorm<Scalar> encoder_norm;  // pre-LN only
  LayerNorm<Scalar> decoder_norm;  // pre-LN only

 private:
  Scalar embedding_scale() const { return std::sqrt(static_cast<Scalar>(config_.model_dim)); }

  void backward_encoder(Matrix<Scalar> grad) {
    if (config_.norm == NormPlacement::pre) grad = encoder_norm.backward(grad);
    for (auto layer = encoder_layers.rbegin(); layer != encoder_layers.rend(); ++layer) grad = layer->backward(grad);
    embed_tokens.accumulate_grad(source_, encoder_dropout_.backward(grad) * embedding_scale());
  }

  TransformerConfig config_;
  bool training_ = true;
  ComputePtr compute_ = Compute::standard();
  Dropout<Scalar> encoder_dropout_, decoder_dropout_;
  TokenIds source_, target_;
  SequenceBatch source_batch_, target_batch_;
  Matrix<Scalar> memory_;          // [B*S, d_model]
  Matrix<Scalar> decoder_output_;  // [B*T, d_model]
};

// Encoder with the output projection tied to the embeddings, for masked language modelling.
template <typename Attention>
class MaskedLM {
 public:
  using Scalar = typename Attention::Scalar;
  using EncoderLayer = TransformerEncoderLayer<Attention>;

  MaskedLM(const TransformerConfig& config, Rng& rng)
      : embed_tokens((config.validate("MaskedLM"), config.vocab_size), config.model_dim, rng, config.padding_index),
        encoder_norm(config.model_dim),
        config_(config),
        dropout_(config.dropout) {
    MOA_CHECK(config.encoder_layers > 0, "MaskedLM", "needs encoder layers, got ", config.encoder_layers);
    encoder_layers.reserve(static_cast<std::size_t>(config.encoder_layers));
    for (Index i = 0; i < config.encoder_layers; ++i) encoder_layers.emplace_back(config, rng);
  }

  const TransformerConfig& config() const { return config_; }

  void set_training(bool training) {
    training_ = training;
    for (auto& layer : encoder_layers) layer.set_training(training);
    dropout_.set_training(training);
  }

  // The backend, threads and inference precision of every layer.
  void set_compute(const ComputePtr& compute) {
    compute_ = detail::checked_compute(compute, "MaskedLM::set_compute");
    embed_tokens.set_compute(compute);
    for (auto& layer : encoder_layers) layer.set_compute(compute);
  }
  const Compute& compute() const { return *compute_; }

  // ids: B*T -> logits: [B*T, V]
  Matrix<Scalar> forward(const TokenIds& ids, const SequenceBatch& batch, Rng& rng) {
    batch.validate("MaskedLM::forward", "ids", static_cast<Index>(ids.size()));
    ids_ = ids;
    Matrix<Scalar> hidden = dropout_.forward(detail::embed_sequence(embed_tokens, ids, batch, 0), rng);
    for (auto& layer : encoder_layers) hidden = layer.forward(hidden, batch, rng);
    if (config_.norm == NormPlacement::pre) hidden = encoder_norm.forward(hidden);
    hidden_ = hidden;
    return embed_tokens.project(hidden, product_precision(*compute_, training_));
  }

  void backward(const Matrix<Scalar>& grad_logits) {
    Matrix<Scalar> grad = embed_tokens.project_backward(hidden_, grad_logits);
    if (config_.norm == NormPlacement::pre) grad = encoder_norm.backward(grad);
    for (auto layer = encoder_layers.rbegin(); layer != encoder_layers.rend(); ++layer) grad = layer->backward(grad);
    embed_tokens.accumulate_grad(ids_, dropout_.backward(grad) * std::sqrt(static_cast<Scalar>(config_.model_dim)));
  }

  Scalar aux_loss() const {
    Scalar total = 0;
    for (const auto& layer : encoder_layers) total += layer.aux_loss();
    return total;
  }

  void collect_parameters(ParameterList<Scalar>& list, const std::string& prefix = "") {
    embed_tokens.collect_parameters(list, prefix + "embed_tokens.");
    for (std::size_t i = 0; i < encoder_layers.size(); ++i)
      encoder_layers[i].collect_parameters(list, prefix + "encoder.layers." + std::to_string(i) + ".");
    if (config_.norm == NormPlacement::pre) encoder_norm.collect_parameters(list, prefix + "encoder.layer_norm.");
  }

  Embedding<Scalar> embed_tokens;
  std::vector<EncoderLayer> encoder_layers;
  LayerNorm<Scalar> encoder_norm;  // pre-LN only

 private:
  TransformerConfig config_;
  bool training_ = true;
  ComputePtr compute_ = Compute::standard();
  Dropout<Scalar> dropout_;
  TokenIds ids_;
  Matrix<Scalar> hidden_;  // [B*T, d_model]
};

}  // namespace moa
