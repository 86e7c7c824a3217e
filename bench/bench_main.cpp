// moa_bench's main: reads moa's own flags before Google Benchmark's, measures the yardsticks, and
// runs the benchmarks.
//   --threads=N              threads for the layers and the yardsticks (default 1)
//   --precision=f32|bf16     what evaluation forwards and decode steps use (default f32)
//   --backend=onednn|eigen   the GEMM backend (default onednn when built with it)
//
// Yardsticks, all in this binary: C = A B at 1024^3 (BM_Sgemm.../1024) and C = A W^T at a
// per-expert shape (BM_Sgemm.../256x64x512), by Eigen, by OpenBLAS (cblas_sgemm) and by oneDNN (f32, and bf16 where the CPU
// has it). The fastest f32 one is the run's "best f32 GEMM": every layer benchmark reports its
// GFLOP/s as %best of it.
#include "bench_support.hpp"

#ifdef MOA_BENCH_HAVE_DNNL
#include "moa/backends/dnnl_gemm.hpp"
#endif
#ifdef MOA_BENCH_HAVE_OPENBLAS
#include <cblas.h>
#endif

#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace moa_bench {

Settings& settings() {
  static Settings instance;
  return instance;
}

namespace {

std::shared_ptr<const moa::GemmBackend> make_backend(const std::string& name) {
#ifdef MOA_BENCH_HAVE_DNNL
  if (name == "onednn") return std::make_shared<moa::DnnlGemm>();
#endif
  if (name == "eigen") return std::make_shared<moa::EigenGemm>();
  throw moa::Error("moa_bench: --backend must be eigen" +
                   std::string(
#ifdef MOA_BENCH_HAVE_DNNL
                       " or onednn"
#else
                       " (this build has no oneDNN)"
#endif
                       ) +
                   ", got '" + name + "'");
}

moa::ComputePtr& compute_slot() {
  static moa::ComputePtr instance;
  return instance;
}

// The two yardstick shapes: m x n x k with B given as [k, n] or as W [n, k] (transposed).
struct GemmShape {
  const char* name;
  moa::Index m, n, k;
  moa::Transpose transpose_b;
};
const GemmShape kShapes[] = {{"1024", 1024, 1024, 1024, moa::Transpose::no},
                             {"256x64x512", 256, 64, 512, moa::Transpose::yes}};

struct Operands {
  MatrixF a, b, c;
  explicit Operands(const GemmShape& shape) {
    moa::Rng rng(0);
    a = random_matrix(shape.m, shape.k, rng);
    b = shape.transpose_b == moa::Transpose::no ? random_matrix(shape.k, shape.n, rng)
                                                : random_matrix(shape.n, shape.k, rng);
    c = MatrixF::Zero(shape.m, shape.n);
  }
};

using GemmRunner = std::function<void(const GemmShape&, Operands&)>;

void run_moa_gemm(const moa::Compute& compute, const GemmShape& shape, Operands& operands,
                  moa::Precision precision) {
  moa::gemm<float>(compute, operands.a, moa::Transpose::no, operands.b, shape.transpose_b, operands.c, false,
                   precision);
}

#ifdef MOA_BENCH_HAVE_OPENBLAS
void run_openblas(const GemmShape& shape, Operands& operands) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, shape.transpose_b == moa::Transpose::no ? CblasNoTrans : CblasTrans,
              static_cast<int>(shape.m), static_cast<int>(shape.n), static_cast<int>(shape.k), 1.0f,
              operands.a.data(), static_cast<int>(shape.k), operands.b.data(),
              static_cast<int>(operands.b.cols()), 0.0f, operands.c.data(), static_cast<int>(shape.n));
}
#endif

struct Yardstick {
  std::string name;  // benchmark name: BM_Sgemm<name>/<shape>
  bool f32;          // counts for the best f32 GEMM
  GemmRunner run;
};

std::vector<Yardstick> yardsticks() {
  std::vector<Yardstick> list;
  static const moa::ComputePtr eigen =
      std::make_shared<moa::Compute>(std::make_shared<moa::EigenGemm>(), settings().threads);
  list.push_back({"", true, [](const GemmShape& s, Operands& o) { run_moa_gemm(*eigen, s, o, moa::Precision::f32); }});
#ifdef MOA_BENCH_HAVE_OPENBLAS
  list.push_back({"OpenBLAS", true, run_openblas});
#endif
#ifdef MOA_BENCH_HAVE_DNNL
  static const auto dnnl_backend = std::make_shared<moa::DnnlGemm>();
  static const moa::ComputePtr dnnl = std::make_shared<moa::Compute>(dnnl_backend, settings().threads);
  list.push_back({"OneDNN", true, [](const GemmShape& s, Operands& o) { run_moa_gemm(*dnnl, s, o, moa::Precision::f32); }});
  if (dnnl_backend->has_bf16()) {
    static const moa::ComputePtr dnnl_bf16 =
        std::make_shared<moa::Compute>(dnnl_backend, settings().threads, moa::Precision::bf16);
    list.push_back({"OneDNNBf16", false,
                    [](const GemmShape& s, Operands& o) { run_moa_gemm(*dnnl_bf16, s, o, moa::Precision::bf16); }});
  }
#endif
  return list;
}

// Best of a few 0.2 s timings: the calibration the %best counters divide by.
double measure_gflops(const GemmShape& shape, const GemmRunner& run) {
  Operands operands(shape);
  run(shape, operands);
  double best = 0.0;
  for (int repeat = 0; repeat < 3; ++repeat) {
    const auto start = std::chrono::steady_clock::now();
    int iterations = 0;
    double seconds = 0.0;
    do {
      run(shape, operands);
      ++iterations;
      seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    } while (seconds < 0.2);
    best = std::max(best, 2.0 * shape.m * shape.n * shape.k * iterations / seconds * 1e-9);
  }
  return best;
}

void register_yardsticks() {
  for (const Yardstick& yardstick : yardsticks()) {
    for (const GemmShape& shape : kShapes) {
      if (yardstick.f32) {
        const double gflops = measure_gflops(shape, yardstick.run);
        if (gflops > settings().best_f32_gflops) {
          settings().best_f32_gflops = gflops;
          settings().best_f32_name = "BM_Sgemm" + yardstick.name + "/" + shape.name;
        }
      }
      const std::string name = "BM_Sgemm" + yardstick.name + "/" + shape.name;
      const GemmRunner run = yardstick.run;
      benchmark::RegisterBenchmark(name.c_str(), [shape, run](benchmark::State& state) {
        Operands operands(shape);
        const moa_bench::LoopClock clock;
  for (auto _ : state) {
          run(shape, operands);
          benchmark::DoNotOptimize(operands.c.data());
        }
        set_counters(state, clock, 2.0 * shape.m * shape.n * shape.k, 0);
      })->Unit(benchmark::kMillisecond);
    }
  }
}

bool take_flag(const char* argument, const char* name, std::string& value) {
  const std::size_t length = std::strlen(name);
  if (std::strncmp(argument, name, length) != 0 || argument[length] != '=') return false;
  value = argument + length + 1;
  return true;
}

void parse_flags(int& argc, char** argv) {
  Settings& run = settings();
#ifdef MOA_BENCH_HAVE_DNNL
  run.backend = "onednn";
#else
  run.backend = "eigen";
#endif
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    std::string value;
    if (take_flag(argv[i], "--threads", value)) {
      char* end = nullptr;
      const long threads = std::strtol(value.c_str(), &end, 10);
      if (value.empty() || *end != '\0' || threads < 1 || threads > 1024)
        throw moa::Error("moa_bench: --threads must be an integer in [1, 1024], got '" + value + "'");
      run.threads = static_cast<int>(threads);
    } else if (take_flag(argv[i], "--precision", value)) {
      if (value != "f32" && value != "bf16")
        throw moa::Error("moa_bench: --precision must be f32 or bf16, got '" + value + "'");
      run.precision = value == "bf16" ? moa::Precision::bf16 : moa::Precision::f32;
    } else if (take_flag(argv[i], "--backend", value)) {
      run.backend = value;
    } else {
      argv[kept++] = argv[i];
    }
  }
  argc = kept;
  const auto backend = make_backend(run.backend);
  if (run.precision == moa::Precision::bf16 && !backend->has_bf16()) {
    std::fprintf(stderr,
                 "moa_bench: --precision=bf16 needs native bfloat16 (oneDNN on a CPU with AVX512-BF16 or AMX); "
                 "backend '%s' has none here, so this run is f32\n",
                 backend->name().c_str());
    run.precision = moa::Precision::f32;
  }
#ifdef MOA_BENCH_HAVE_OPENBLAS
  openblas_set_num_threads(run.threads);
#endif
  compute_slot() = std::make_shared<moa::Compute>(backend, run.threads, run.precision);
}

}  // namespace

const moa::ComputePtr& compute() { return compute_slot(); }

}  // namespace moa_bench

int main(int argc, char** argv) {
#if defined(__GLIBC__)
  // As the trainers do (examples/common/compute_options.hpp): freed blocks stay with the process,
  // so a training step does not fault in fresh pages for the buffers it frees and allocates again.
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 512 << 20);
#endif
  try {
    moa_bench::parse_flags(argc, argv);
    moa_bench::register_yardsticks();
  } catch (const std::exception& error) {
    std::fprintf(stderr, "%s\n", error.what());
    return 2;
  }
  const moa_bench::Settings& run = moa_bench::settings();
  benchmark::AddCustomContext("moa.backend", run.backend);
  benchmark::AddCustomContext("moa.threads", std::to_string(run.threads));
  benchmark::AddCustomContext("moa.precision", moa::to_string(run.precision));
  benchmark::AddCustomContext("moa.best_f32_gemm",
                              run.best_f32_name + " " + std::to_string(run.best_f32_gflops) + " GFLOP/s");
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
