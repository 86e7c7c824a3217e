// Microbenchmarks of moa's building blocks on the run's Compute (see bench_main.cpp).
#include "bench_support.hpp"

namespace {

using moa_bench::MatrixF;
using moa_bench::random_matrix;

// Linear forward + backward over `tokens` rows: 3 GEMMs of 2 * tokens * in * out flops.
void BM_LinearForwardBackward(benchmark::State& state) {
  const moa::Index tokens = state.range(0), width = state.range(1);
  moa::Rng rng(1);
  moa::Linear<float> linear(width, width, true, rng);
  linear.set_compute(moa_bench::compute());
  const MatrixF input = random_matrix(tokens, width, rng), grad_output = random_matrix(tokens, width, rng);
  const moa_bench::LoopClock clock;
  for (auto _ : state) {
    MatrixF output = linear.forward(input);
    MatrixF grad_input = linear.backward(grad_output);
    benchmark::DoNotOptimize(output.data());
    benchmark::DoNotOptimize(grad_input.data());
  }
  moa_bench::set_counters(state, clock, 3 * 2.0 * tokens * width * width, static_cast<double>(tokens));
}
BENCHMARK(BM_LinearForwardBackward)->Args({1024, 512})->Unit(benchmark::kMillisecond);

}  // namespace
