// What moa_bench's files share: the run's settings (--threads, --precision, --backend), the
// Compute every layer benchmark runs on, and the best f32 GEMM of the machine, measured once at
// start-up in the same binary, against which every layer benchmark reports its GFLOP/s.
#pragma once

#include "moa/moa.hpp"

#include <benchmark/benchmark.h>

#include <chrono>
#include <string>

namespace moa_bench {

using MatrixF = moa::Matrix<float>;

struct Settings {
  int threads = 1;
  moa::Precision precision = moa::Precision::f32;
  std::string backend;             // "onednn" when built with it, else "eigen"
  double best_f32_gflops = 0.0;    // the fastest f32 GEMM yardstick of this run
  std::string best_f32_name;
};

Settings& settings();
// The Compute the layer benchmarks use (backend, threads, precision of the run).
const moa::ComputePtr& compute();

inline MatrixF random_matrix(moa::Index rows, moa::Index cols, moa::Rng& rng) {
  MatrixF matrix(rows, cols);
  moa::init_normal(matrix, rng, 0.0, 1.0);
  return matrix;
}

// Started just before a benchmark's loop: "%best" needs the loop's time as a plain number (Google
// Benchmark's rate counters would print it as a rate, "/s").
class LoopClock {
 public:
  double seconds() const { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count(); }

 private:
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
};

// GFLOP/s, tokens/s, and the GFLOP/s as a share of the run's best f32 GEMM ("%best").
inline void set_counters(benchmark::State& state, const LoopClock& clock, double flops_per_iteration,
                         double tokens_per_iteration) {
  const double seconds = clock.seconds();
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops_per_iteration * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["tokens/s"] = benchmark::Counter(tokens_per_iteration, benchmark::Counter::kIsIterationInvariantRate);
  if (settings().best_f32_gflops > 0 && seconds > 0)
    state.counters["%best"] = flops_per_iteration * static_cast<double>(state.iterations()) / seconds * 1e-9 * 100.0 /
                              settings().best_f32_gflops;
}

}  // namespace moa_bench
