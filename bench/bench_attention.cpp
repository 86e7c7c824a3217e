// MoA, MoH and MHA forward, forward+backward and decoding, float, at the shapes of the project's
// targets, on the run's Compute (--threads, --precision, --backend; see bench_main.cpp). Forwards
// are inference (infer: evaluation mode, so --precision=bf16 applies, and nothing kept for a
// backward), forward+backward is training.
//
// FLOPs are counted by the layers (last_forward_flops: router, projections, and attention over
// the keys each query really sees); forward+backward counts 3x the forward, the usual estimate
// (backward computes two products for each one of the forward).
#include "bench_support.hpp"

#include <cmath>

namespace {

using moa_bench::MatrixF;
using moa_bench::random_matrix;
using moa_bench::set_counters;

struct Shape {
  moa::Index batch, length, model, experts, top_k, head_dim;
};

// (B, T=S, d_model, E, k, d_h)
const Shape kToy{32, 32, 256, 8, 2, 64};
const Shape kBase{8, 128, 512, 8, 8, 128};
const Shape kWide8{8, 128, 512, 8, 4, 64};
const Shape kWide{8, 128, 512, 32, 4, 64};
const Shape kWide64{8, 128, 512, 64, 4, 64};
const Shape kCausal{8, 256, 512, 16, 4, 64};

moa::MixtureOfAttention<float> make_moa(const Shape& shape, moa::Rng& rng,
                                        moa::RoutingMode mode = moa::RoutingMode::token_choice) {
  moa::MixtureOfAttentionConfig config;
  config.model_dim = shape.model;
  config.num_experts = shape.experts;
  config.top_k = shape.top_k;
  config.head_dim = shape.head_dim;
  if (mode == moa::RoutingMode::expert_choice) {  // C = T k / E tokens per expert: k per token on average
    config.mode = mode;
    config.load_balance_coefficient = config.z_loss_coefficient = 0.0;
  }
  moa::MixtureOfAttention<float> layer(config, rng);
  layer.set_compute(moa_bench::compute());
  // A trained router spreads tokens over the experts; a zero one would send all to the first k.
  moa::init_normal(layer.router.weight, rng, 0.0, 1.0 / std::sqrt(static_cast<double>(shape.model)));
  return layer;
}

// The MHA of the same attention compute: k heads of width d_h.
moa::MultiHeadAttention<float> make_mha(const Shape& shape, moa::Rng& rng) {
  moa::MultiHeadAttention<float> layer({shape.model, shape.top_k, shape.head_dim}, rng);
  layer.set_compute(moa_bench::compute());
  return layer;
}

// MoH with as many heads per token as MoA's k and MHA's heads: k/2 shared and top-k/2 of E routed
// (one shared and top-1 for k = 2). Every one of its h_s + E heads has its own keys and values.
moa::MixtureOfHeads<float> make_moh(const Shape& shape, moa::Rng& rng) {
  moa::MixtureOfHeadsConfig config;
  config.model_dim = shape.model;
  config.shared_heads = shape.top_k / 2;
  config.routed_heads = shape.experts;
  config.top_k = shape.top_k - config.shared_heads;
  config.head_dim = shape.head_dim;
  moa::MixtureOfHeads<float> layer(config, rng);
  layer.set_compute(moa_bench::compute());
  const double scale = 1.0 / std::sqrt(static_cast<double>(shape.model));
  moa::init_normal(layer.router.weight, rng, 0.0, scale);
  if (config.shared_heads > 1) moa::init_normal(layer.shared_router, rng, 0.0, scale);
  moa::init_normal(layer.group_router, rng, 0.0, scale);
  return layer;
}

template <typename Layer>
void run_layer(benchmark::State& state, Layer& layer, const Shape& shape, bool causal, bool with_backward) {
  moa::Rng rng(7);
  const auto batch = moa::SequenceBatch::full(shape.batch, shape.length);
  const MatrixF input = random_matrix(batch.rows(), shape.model, rng);
  const MatrixF grad_output = random_matrix(batch.rows(), shape.model, rng);
  layer.set_training(with_backward);
  // untimed: creates the backend's kernels for these shapes and counts the FLOPs
  layer.forward_self(input, batch, causal);
  auto iteration = [&] {
    if (with_backward) {
      MatrixF output = layer.forward_self(input, batch, causal);
      benchmark::DoNotOptimize(output.data());
      MatrixF grad_input = layer.backward_self(grad_output);
      benchmark::DoNotOptimize(grad_input.data());
    } else {  // inference: keeps nothing for a backward, as PyTorch's forward under no_grad
      MatrixF output = layer.infer(input, batch, input, batch, causal);
      benchmark::DoNotOptimize(output.data());
    }
  };
  iteration();
  const moa_bench::LoopClock clock;
  for (auto _ : state) iteration();
  set_counters(state, clock, layer.last_forward_flops() * (with_backward ? 3.0 : 1.0), static_cast<double>(batch.rows()));
}

void BM_MoA(benchmark::State& state, Shape shape, bool causal, bool with_backward) {
  moa::Rng rng(1);
  auto layer = make_moa(shape, rng);
  run_layer(state, layer, shape, causal, with_backward);
}

// Every expert streaming (a sink of 4 and the last `window` keys), causal: the attention costs
// O(T (4 + window)) instead of O(T^2); the projections are unchanged.
void BM_MoASpans(benchmark::State& state, Shape shape, moa::Index window, bool with_backward) {
  moa::Rng rng(1);
  moa::MixtureOfAttentionConfig config;
  config.model_dim = shape.model;
  config.num_experts = shape.experts;
  config.top_k = shape.top_k;
  config.head_dim = shape.head_dim;
  config.spans.assign(static_cast<std::size_t>(shape.experts), moa::AttentionSpan::streaming(4, window));
  moa::MixtureOfAttention<float> layer(config, rng);
  layer.set_compute(moa_bench::compute());
  moa::init_normal(layer.router.weight, rng, 0.0, 1.0 / std::sqrt(static_cast<double>(shape.model)));
  run_layer(state, layer, shape, true, with_backward);
}

void BM_MoAExpertChoice(benchmark::State& state, Shape shape, bool with_backward) {
  moa::Rng rng(1);
  auto layer = make_moa(shape, rng, moa::RoutingMode::expert_choice);
  run_layer(state, layer, shape, false, with_backward);
}

void BM_MoH(benchmark::State& state, Shape shape, bool causal, bool with_backward) {
  moa::Rng rng(1);
  auto layer = make_moh(shape, rng);
  run_layer(state, layer, shape, causal, with_backward);
  // The share of (sequence, routed head) pairs that no token of the sequence chose: the key and
  // value work that computing them per sequence, only where needed, could save.
  const std::vector<moa::Index>& experts = layer.router.experts();
  const moa::Index per_sequence = shape.length * layer.config().top_k;
  double idle = 0;
  for (moa::Index b = 0; b < shape.batch; ++b) {
    std::vector<char> chosen(static_cast<std::size_t>(shape.experts), 0);
    for (moa::Index a = b * per_sequence; a < (b + 1) * per_sequence; ++a) chosen[static_cast<std::size_t>(experts[a])] = 1;
    for (char used : chosen) idle += used ? 0.0 : 1.0;
  }
  state.counters["idle_routed_kv"] = idle / static_cast<double>(shape.batch * shape.experts);
}

// What the published MoH code computes: every one of the h_s + E heads (then weighted by gates
// that are 0 for the unchosen), as multi-head attention with h_s + E heads.
void BM_MoHAllHeads(benchmark::State& state, Shape shape, bool causal, bool with_backward) {
  moa::Rng rng(1);
  moa::MultiHeadAttention<float> layer({shape.model, shape.top_k / 2 + shape.experts, shape.head_dim}, rng);
  layer.set_compute(moa_bench::compute());
  run_layer(state, layer, shape, causal, with_backward);
}

void BM_MHA(benchmark::State& state, Shape shape, bool causal, bool with_backward) {
  moa::Rng rng(1);
  auto layer = make_mha(shape, rng);
  run_layer(state, layer, shape, causal, with_backward);
}

// One decoding step of every sequence against a cache of `cached` tokens.
template <typename Layer>
void run_decode(benchmark::State& state, Layer& layer, const Shape& shape, moa::Index cached) {
  moa::Rng rng(7);
  layer.set_training(false);
  auto cache = layer.make_self_cache(shape.batch, cached + 1);
  layer.step(random_matrix(shape.batch * cached, shape.model, rng), cache);
  const MatrixF token = random_matrix(shape.batch, shape.model, rng);
  layer.step(token, cache);  // untimed: creates the backend's kernels for these shapes
  cache.truncate(cached);
  const moa_bench::LoopClock clock;
  for (auto _ : state) {
    MatrixF output = layer.step(token, cache);
    benchmark::DoNotOptimize(output.data());
    cache.truncate(cached);
  }
  set_counters(state, clock, cache.last_step_flops(), static_cast<double>(shape.batch));
}

void BM_MoADecode(benchmark::State& state, Shape shape) {
  moa::Rng rng(1);
  auto layer = make_moa(shape, rng);
  run_decode(state, layer, shape, 256);
}

void BM_MoHDecode(benchmark::State& state, Shape shape) {
  moa::Rng rng(1);
  auto layer = make_moh(shape, rng);
  run_decode(state, layer, shape, 256);
}

void BM_MHADecode(benchmark::State& state, Shape shape) {
  moa::Rng rng(1);
  auto layer = make_mha(shape, rng);
  run_decode(state, layer, shape, 256);
}

// The attention kernel alone for one sequence of the causal shape: T*k query rows against one
// shared K and V. Causal masking skips the upper triangle block by block, so only this part of
// the layer gets cheaper; the projections cost the same either way.
void BM_AttentionKernel(benchmark::State& state, bool causal) {
  const Shape shape = kCausal;
  moa::Rng rng(3);
  const MatrixF queries = random_matrix(shape.length * shape.top_k, shape.head_dim, rng);
  const MatrixF keys = random_matrix(shape.length, shape.head_dim, rng);
  const MatrixF values = random_matrix(shape.length, shape.head_dim, rng);
  MatrixF probabilities(queries.rows(), shape.length), output(queries.rows(), shape.head_dim);
  moa::AttentionLayout layout;
  layout.positions = shape.length;
  layout.rows_per_position = shape.top_k;
  layout.key_length = shape.length;
  layout.causal = causal;
  const moa::Compute& compute = *moa_bench::compute();
  const moa::Precision precision = moa::product_precision(compute, false);
  const moa_bench::LoopClock clock;
  for (auto _ : state) {
    moa::attention_forward<float>(queries, keys, values, layout, probabilities, output, compute, precision);
    benchmark::DoNotOptimize(output.data());
  }
  double pairs = 0;
  for (moa::Index p = 0; p < shape.length; ++p) pairs += static_cast<double>(layout.visible_keys(p) * shape.top_k);
  set_counters(state, clock, 4.0 * pairs * shape.head_dim, static_cast<double>(shape.length));
}
BENCHMARK_CAPTURE(BM_AttentionKernel, causal, true)->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_AttentionKernel, noncausal, false)->Unit(benchmark::kMicrosecond);

#define MOA_SHAPE_BENCHMARKS(name, shape, causal)                                                        \
  BENCHMARK_CAPTURE(BM_MoA, name##_forward, shape, causal, false)->Unit(benchmark::kMillisecond);         \
  BENCHMARK_CAPTURE(BM_MoA, name##_forward_backward, shape, causal, true)->Unit(benchmark::kMillisecond); \
  BENCHMARK_CAPTURE(BM_MHA, name##_forward, shape, causal, false)->Unit(benchmark::kMillisecond);         \
  BENCHMARK_CAPTURE(BM_MHA, name##_forward_backward, shape, causal, true)->Unit(benchmark::kMillisecond)

MOA_SHAPE_BENCHMARKS(toy, kToy, false);
MOA_SHAPE_BENCHMARKS(base, kBase, false);
MOA_SHAPE_BENCHMARKS(wide8, kWide8, false);
MOA_SHAPE_BENCHMARKS(wide, kWide, false);
MOA_SHAPE_BENCHMARKS(wide64, kWide64, false);
MOA_SHAPE_BENCHMARKS(causal, kCausal, true);
MOA_SHAPE_BENCHMARKS(noncausal, kCausal, false);
// Expert choice is defined for non-causal attention only.
#define MOA_EXPERT_CHOICE_BENCHMARKS(name, shape)                                                                \
  BENCHMARK_CAPTURE(BM_MoAExpertChoice, name##_forward, shape, false)->Unit(benchmark::kMillisecond); \
  BENCHMARK_CAPTURE(BM_MoAExpertChoice, name##_forward_backward, shape, true)->Unit(benchmark::kMillisecond)

MOA_EXPERT_CHOICE_BENCHMARKS(toy, kToy);
MOA_EXPERT_CHOICE_BENCHMARKS(base, kBase);
MOA_EXPERT_CHOICE_BENCHMARKS(wide, kWide);
MOA_EXPERT_CHOICE_BENCHMARKS(wide64, kWide64);
MOA_EXPERT_CHOICE_BENCHMARKS(noncausal, kCausal);
// The causal shape at T = 256 and at T = 1024 (2 sequences), full experts against windows of 64.
const Shape kLong{2, 1024, 512, 16, 4, 64};
BENCHMARK_CAPTURE(BM_MoA, long_forward, kLong, true, false)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_MoA, long_forward_backward, kLong, true, true)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_MoASpans, causal_window64_forward, kCausal, 64, false)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_MoASpans, causal_window64_forward_backward, kCausal, 64, true)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_MoASpans, long_window64_forward, kLong, 64, false)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_MoASpans, long_window64_forward_backward, kLong, 64, true)->Unit(benchmark::kMillisecond);

#define MOA_MOH_BENCHMARKS(name, shape, causal)                                                           \
  BENCHMARK_CAPTURE(BM_MoH, name##_forward, shape, causal, false)->Unit(benchmark::kMillisecond); \
  BENCHMARK_CAPTURE(BM_MoH, name##_forward_backward, shape, causal, true)->Unit(benchmark::kMillisecond); \
  BENCHMARK_CAPTURE(BM_MoHAllHeads, name##_forward, shape, causal, false)->Unit(benchmark::kMillisecond)

MOA_MOH_BENCHMARKS(toy, kToy, false);
MOA_MOH_BENCHMARKS(base, kBase, false);
MOA_MOH_BENCHMARKS(wide, kWide, false);
MOA_MOH_BENCHMARKS(wide64, kWide64, false);
MOA_MOH_BENCHMARKS(causal, kCausal, true);
BENCHMARK_CAPTURE(BM_MoADecode, wide_cache256, kWide)->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_MoHDecode, wide_cache256, kWide)->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_MHADecode, wide_cache256, kWide)->Unit(benchmark::kMicrosecond);

}  // namespace
