// Microbenchmarks of moa's building blocks, each against plain SGEMM measured in the same run.
#include "moa/moa.hpp"

#include <benchmark/benchmark.h>

namespace {

using MatrixF = moa::Matrix<float>;

MatrixF random_matrix(moa::Index rows, moa::Index cols, moa::Rng& rng) {
  MatrixF matrix(rows, cols);
  moa::init_normal(matrix, rng, 0.0, 1.0);
  return matrix;
}

void set_flop_counters(benchmark::State& state, double flops_per_iteration, double tokens_per_iteration) {
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops_per_iteration * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["tokens/s"] = benchmark::Counter(tokens_per_iteration, benchmark::Counter::kIsIterationInvariantRate);
}

// The machine's yardstick: C = A B with A, B [n, n], 2 n^3 flops.
void BM_Sgemm(benchmark::State& state) {
  const moa::Index n = state.range(0);
  moa::Rng rng(0);
  const MatrixF a = random_matrix(n, n, rng), b = random_matrix(n, n, rng);
  MatrixF c(n, n);
  for (auto _ : state) {
    c.noalias() = a * b;
    benchmark::DoNotOptimize(c.data());
  }
  set_flop_counters(state, 2.0 * n * n * n, 0);
}
BENCHMARK(BM_Sgemm)->Arg(1024)->Unit(benchmark::kMillisecond);

// Linear forward + backward over `tokens` rows: 3 GEMMs of 2 * tokens * in * out flops.
void BM_LinearForwardBackward(benchmark::State& state) {
  const moa::Index tokens = state.range(0), width = state.range(1);
  moa::Rng rng(1);
  moa::Linear<float> linear(width, width, true, rng);
  const MatrixF input = random_matrix(tokens, width, rng), grad_output = random_matrix(tokens, width, rng);
  for (auto _ : state) {
    MatrixF output = linear.forward(input);
    MatrixF grad_input = linear.backward(grad_output);
    benchmark::DoNotOptimize(output.data());
    benchmark::DoNotOptimize(grad_input.data());
  }
  set_flop_counters(state, 3 * 2.0 * tokens * width * width, static_cast<double>(tokens));
}
BENCHMARK(BM_LinearForwardBackward)->Args({1024, 512})->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
