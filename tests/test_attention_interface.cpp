#include "support.hpp"

#include "moa/models.hpp"

using namespace moa_test;

namespace {

// Provides everything but backward_self: not an attention kind.
struct IncompleteAttention {
  using Scalar = float;
  Index model_dim() const { return 4; }
  bool training() const { return true; }
  void set_training(bool) {}
  void set_compute(moa::ComputePtr) {}
  MatrixF forward(const MatrixF& q, const moa::SequenceBatch&, const MatrixF&, const moa::SequenceBatch&, bool) { return q; }
  MatrixF forward_self(const MatrixF& x, const moa::SequenceBatch&, bool) { return x; }
  MatrixF infer(const MatrixF& q, const moa::SequenceBatch&, const MatrixF&, const moa::SequenceBatch&, bool) const { return q; }
  moa::AttentionGradients<float> backward(const MatrixF&) { return {}; }
  moa::KVCache<float> make_self_cache(Index, Index) const { return moa::KVCache<float>(1, 1, 1); }
  moa::KVCache<float> make_cross_cache(const MatrixF&, const moa::SequenceBatch&) const { return moa::KVCache<float>(1, 1, 1); }
  MatrixF step(const MatrixF& x, moa::KVCache<float>&) const { return x; }
  float aux_loss() const { return 0; }
  double last_forward_flops() const { return 0; }
  void collect_parameters(moa::ParameterList<float>&, const std::string&) {}
};

}  // namespace

TEST_CASE("attention interface: MoA and MHA satisfy it, an incomplete kind does not", "[attention][interface]") {
  static_assert(moa::is_attention_v<moa::MixtureOfAttention<float>>);
  static_assert(moa::is_attention_v<moa::MultiHeadAttention<double>>);
  static_assert(!moa::is_attention_v<IncompleteAttention>);
  static_assert(!moa::is_attention_v<moa::Linear<float>>);
  // MoA may draw random numbers (noisy gating), MHA never: only MoA takes an Rng.
  static_assert(moa::attention_takes_rng_v<moa::MixtureOfAttention<float>>);
  static_assert(!moa::attention_takes_rng_v<moa::MultiHeadAttention<float>>);
  SUCCEED("checked at compile time");
}

TEST_CASE("for_each_attention visits every attention layer with its parameter prefix", "[transformer][interface]") {
  moa::TransformerConfig config;
  config.vocab_size = 11;
  config.model_dim = 8;
  config.ffn_dim = 16;
  config.encoder_layers = 2;
  config.decoder_layers = 1;
  config.attention = moa::AttentionSpec::parse("mha:2H4D");
  moa::Rng rng(1);
  moa::Seq2Seq<moa::MultiHeadAttention<float>> model(config, rng);
  std::vector<std::string> names;
  std::vector<bool> from_source;
  const auto parameters = moa::parameters_of(model);
  model.for_each_attention([&](const moa::AttentionSite& site, moa::MultiHeadAttention<float>& attention) {
    names.push_back(site.name);
    from_source.push_back(site.queries_from_source);
    // The prefix names the layer's own parameters.
    REQUIRE(parameters.at(site.name + ".q_proj.weight").value().data() == attention.q_proj.value.data());
  });
  REQUIRE(names == std::vector<std::string>{"encoder.layers.0.self_attn", "encoder.layers.1.self_attn",
                                            "decoder.layers.0.self_attn", "decoder.layers.0.encoder_attn"});
  REQUIRE(from_source == std::vector<bool>{true, true, false, false});
}

namespace {

// infer is evaluation's forward without state: between a forward and its backward it changes
// nothing the backward reads.
template <typename Attention>
void check_infer_keeps_state(Attention& layer, moa::Rng& rng) {
  const auto batch = moa::SequenceBatch::padded(5, {5, 3});
  const MatrixD input = random_matrix(10, layer.model_dim(), rng), other = random_matrix(10, layer.model_dim(), rng);
  const MatrixD grad_output = random_matrix(10, layer.model_dim(), rng);
  auto parameters = moa::parameters_of(layer);
  auto gradients_after = [&](bool infer_between) {
    parameters.zero_grad();
    layer.forward_self(input, batch, true);
    const double flops = layer.last_forward_flops();
    if (infer_between) {
      const Attention& frozen = layer;
      REQUIRE(frozen.infer(other, batch, other, batch, false).rows() == 10);
    }
    REQUIRE(layer.last_forward_flops() == flops);
    std::vector<MatrixD> grads{layer.backward_self(grad_output)};
    for (const auto& entry : parameters) grads.push_back(entry.grad());
    return grads;
  };
  const auto plain = gradients_after(false);
  REQUIRE(gradients_after(true) == plain);
}

}  // namespace

TEST_CASE("attention interface: infer leaves what backward reads untouched (MoA, MHA)", "[attention][interface]") {
  moa::Rng rng(3);
  moa::MixtureOfAttentionConfig moa_config;
  moa_config.model_dim = 6;
  moa_config.num_experts = 4;
  moa_config.top_k = 2;
  moa_config.head_dim = 3;
  moa::MixtureOfAttention<double> mixture(moa_config, rng);
  moa::init_normal(mixture.router.weight, rng, 0.0, 1.0);
  check_infer_keeps_state(mixture, rng);
  moa::MultiHeadAttentionConfig mha_config;
  mha_config.model_dim = 6;
  mha_config.num_heads = 2;
  mha_config.head_dim = 3;
  moa::MultiHeadAttention<double> heads(mha_config, rng);
  check_infer_keeps_state(heads, rng);
}
