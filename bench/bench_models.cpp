// One training step of the translate trainer's model (the demo configuration: d_model 128, FFN
// 256, 2+2 post-LN layers, vocabulary 2000, dropout 0.1, label smoothing 0.1, aux losses, clipping
// at 1, Adam) on a fixed batch of 96 source and target sequences of 16 tokens: forward, loss,
// backward, clipping and the optimizer step, as the trainer does. tokens/s counts target tokens.
// bench/compare_torch.py times the same step in PyTorch.
#include "bench_support.hpp"

#include "moa/models.hpp"

namespace {

constexpr moa::Index kBatch = 96, kLength = 16, kVocab = 2000;

template <typename Attention>
void run_translate_step(benchmark::State& state, const char* spec) {
  moa::TransformerConfig config;
  config.vocab_size = kVocab;
  config.model_dim = 128;
  config.ffn_dim = 256;
  config.encoder_layers = 2;
  config.decoder_layers = 2;
  config.dropout = 0.1;
  config.attention = moa::AttentionSpec::parse(spec);
  moa::Rng rng(1);
  moa::Seq2Seq<Attention> model(config, rng);
  model.set_compute(moa_bench::compute());
  auto parameters = moa::parameters_of(model);
  moa::Adam<float> adam(parameters, {0.9, 0.98, 1e-9, 0.0, false});
  adam.set_compute(moa_bench::compute());
  moa::CrossEntropyLoss<float> loss(0.1, 0);
  loss.set_compute(moa_bench::compute());
  const auto batch = moa::SequenceBatch::full(kBatch, kLength);
  moa::TokenIds source, target_input, target_output;
  for (moa::Index i = 0; i < batch.rows(); ++i) {
    source.push_back(4 + static_cast<moa::Index>(rng.next_u64() % (kVocab - 4)));
    target_input.push_back(4 + static_cast<moa::Index>(rng.next_u64() % (kVocab - 4)));
    target_output.push_back(4 + static_cast<moa::Index>(rng.next_u64() % (kVocab - 4)));
  }
  model.set_training(true);
  auto step = [&] {
    moa::zero_grad(parameters, *moa_bench::compute());
    const moa_bench::MatrixF logits = model.forward(source, batch, target_input, batch, rng);
    benchmark::DoNotOptimize(loss.forward(logits, target_output) + model.aux_loss());
    model.backward(loss.backward());
    moa::clip_grad_norm(parameters, 1.0, *moa_bench::compute());
    adam.step(1e-4);
  };
  step();  // untimed: creates the backend's kernels for these shapes
  for (auto _ : state) step();
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(batch.rows()), benchmark::Counter::kIsIterationInvariantRate);
}

void BM_TranslateStep_moa(benchmark::State& state) {
  run_translate_step<moa::MixtureOfAttention<float>>(state, "moa:4K8E48D");
}
void BM_TranslateStep_mha(benchmark::State& state) {
  run_translate_step<moa::MultiHeadAttention<float>>(state, "mha:4H32D");
}
BENCHMARK(BM_TranslateStep_moa)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_TranslateStep_mha)->Unit(benchmark::kMillisecond);

}  // namespace
