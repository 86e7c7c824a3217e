#include <moa/io.hpp>
#include <moa/models.hpp>
#include <moa/moa.hpp>
#include <moa/text.hpp>
#ifdef CONSUMER_HAVE_TOKENIZER
#include <moa/text/tokenizer.hpp>
#endif
#ifdef CONSUMER_HAVE_DNNL
#include <moa/backends/dnnl_gemm.hpp>
#endif

#include <cstdio>

int main() {
  moa::Rng rng(42);
  moa::Linear<float> layer(8, 4, true, rng);
  moa::Matrix<float> x(3, 8);
  moa::init_normal(x, rng, 0.0, 1.0);
  const moa::Matrix<float> y = layer.forward(x);
  layer.backward(moa::Matrix<float>::Ones(3, 4));
  moa::save_safetensors("consumer.safetensors", moa::parameters_of(layer, "layer."));
  moa::Linear<float> copy(8, 4, true, rng);
  moa::load_safetensors("consumer.safetensors", moa::parameters_of(copy, "layer."));
  bool ok = copy.forward(x) == y;
  // The models and text layers: a tiny masked language model over one padded batch, and BLEU.
  moa::TransformerConfig config;
  config.vocab_size = 12;
  config.model_dim = 8;
  config.ffn_dim = 16;
  config.encoder_layers = 1;
  config.attention = moa::AttentionSpec::parse("moa:2K4E4D");
  moa::MaskedLM<moa::MixtureOfAttention<float>> model(config, rng);
  const moa::TokenIds ids{moa::kFirstRegularId, 5, 6, moa::kFirstRegularId, moa::kPadId, moa::kPadId};
  const moa::Matrix<float> logits = model.forward(ids, moa::SequenceBatch::padded(3, {3, 1}), rng);
  ok = ok && logits.rows() == 6 && logits.cols() == 12 && logits.allFinite();
  ok = ok && moa::corpus_bleu({"the cat sat on the mat"}, {"the cat sat on the mat"}) > 99.9;
  const char* backend = "eigen";
#ifdef CONSUMER_HAVE_DNNL
  // The same layer on oneDNN and two threads: the same output to float rounding.
  copy.set_compute(std::make_shared<moa::Compute>(std::make_shared<moa::DnnlGemm>(), 2));
  moa::Matrix<float> wide(300, 8);
  moa::init_normal(wide, rng, 0.0, 1.0);
  moa::Linear<float> reference = copy;
  reference.set_compute(moa::Compute::standard());
  ok = ok && copy.forward(wide).isApprox(reference.forward(wide), 1e-5f);
  backend = "onednn";
#endif
  std::printf("consumer: output [%lld, %lld], reload and %s backend %s\n", static_cast<long long>(y.rows()),
              static_cast<long long>(y.cols()), backend, ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
