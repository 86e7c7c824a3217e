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

// The products of attention within one short sequence (the translate trainer's: 16 tokens, MoA's
// k = 4 queries per token of width 48; MHA's heads of width 32), as the layers compute them with
// moa::gemm (below 2^17 multiply-adds: moa's small-product kernel), against Eigen's own product
// of the same operands. Args: m, n, k, transpose a, transpose b, and 1 for moa::gemm, 0 for Eigen.
void BM_SmallProduct(benchmark::State& state) {
  const moa::Index m = state.range(0), n = state.range(1), k = state.range(2);
  const bool transpose_a = state.range(3) != 0, transpose_b = state.range(4) != 0, with_moa = state.range(5) != 0;
  moa::Rng rng(1);
  const MatrixF a = transpose_a ? random_matrix(k, m, rng) : random_matrix(m, k, rng);
  const MatrixF b = transpose_b ? random_matrix(n, k, rng) : random_matrix(k, n, rng);
  MatrixF c(m, n);  // [m, n]
  const moa::Compute& compute = *moa_bench::compute();
  const moa_bench::LoopClock clock;
  for (auto _ : state) {
    if (with_moa) {
      moa::gemm<float>(compute, a, transpose_a ? moa::Transpose::yes : moa::Transpose::no, b,
                       transpose_b ? moa::Transpose::yes : moa::Transpose::no, c);
    } else if (transpose_a) {
      c.noalias() = a.transpose() * b;
    } else if (transpose_b) {
      c.noalias() = a * b.transpose();
    } else {
      c.noalias() = a * b;
    }
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  moa_bench::set_counters(state, clock, 2.0 * static_cast<double>(m * n * k), static_cast<double>(m));
}
BENCHMARK(BM_SmallProduct)
    ->ArgNames({"m", "n", "k", "ta", "tb", "moa"})
    ->ArgsProduct({{64}, {16}, {48}, {0}, {1}, {1, 0}})   // MoA scores: queries [64, 48] x keys^T
    ->ArgsProduct({{64}, {48}, {16}, {0}, {0}, {1, 0}})   // MoA probabilities [64, 16] x values [16, 48]
    ->ArgsProduct({{16}, {48}, {64}, {1}, {0}, {1, 0}})   // MoA value gradient: P^T x dO
    ->ArgsProduct({{16}, {16}, {32}, {0}, {1}, {1, 0}})   // MHA scores per head
    ->ArgsProduct({{16}, {32}, {16}, {0}, {0}, {1, 0}})   // MHA probabilities x values per head
    ->Unit(benchmark::kMicrosecond);

}  // namespace
