// The trainers' --backend, --threads and --precision flags, turned into the Compute a model runs on.
#pragma once

#include "moa/gemm.hpp"
#ifdef MOA_EXAMPLES_HAVE_DNNL
#include "moa/backends/dnnl_gemm.hpp"
#endif

#include "flags.hpp"  // whole_number

#include <CLI/CLI.hpp>

#include <cstdio>
#include <memory>
#include <string>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace moa_examples {

// glibc hands blocks above its mmap threshold back to the system when they are freed and trims
// the heap's top past its trim threshold, so a training step that allocates and frees the same
// megabytes every step (logits and their gradient: 12 MB in the demo) pays page faults on fresh
// memory each time, on every thread: 14% of a translate step was in the kernel, more with two
// threads. Fixed limits (which also stop glibc's own adjusting) keep freed memory for reuse.
inline void keep_freed_memory() {
#if defined(__GLIBC__)
  mallopt(M_MMAP_THRESHOLD, 32 << 20);  // glibc's largest allowed value
  mallopt(M_TRIM_THRESHOLD, 512 << 20);
#endif
}

struct ComputeOptions {
#ifdef MOA_EXAMPLES_HAVE_DNNL
  std::string backend = "onednn";
#else
  std::string backend = "eigen";
#endif
  int threads = 1;
  std::string precision = "f32";

  void add_to(CLI::App& app) {
    app.add_option("--backend", backend, "GEMM backend: onednn (when built with it) or eigen")
        ->capture_default_str()
        ->check(CLI::IsMember({"eigen", "onednn"}));
    app.add_option("--threads", threads, "threads per model")->capture_default_str()->check(whole_number(1, 1024));
    app.add_option("--precision", precision,
                   "arithmetic of evaluation (validation, decoding): f32, or bf16 on a CPU with AVX512-BF16 or AMX")
        ->capture_default_str()
        ->check(CLI::IsMember({"f32", "bf16"}));
  }

  // Throws moa::Error for a backend this build lacks; bf16 without native support falls back to
  // f32 with a note on stderr.
  moa::ComputePtr make(const char* program) const {
    std::shared_ptr<const moa::GemmBackend> gemm;
    if (backend == "eigen") gemm = std::make_shared<moa::EigenGemm>();
#ifdef MOA_EXAMPLES_HAVE_DNNL
    if (backend == "onednn") gemm = std::make_shared<moa::DnnlGemm>();
#endif
    MOA_CHECK(gemm != nullptr, program, "--backend ", backend, " is not in this build (oneDNN was not found)");
    moa::Precision chosen = precision == "bf16" ? moa::Precision::bf16 : moa::Precision::f32;
    if (chosen == moa::Precision::bf16 && !gemm->has_bf16()) {
      std::fprintf(stderr,
                   "%s: note: --precision bf16 needs native bfloat16 (oneDNN on a CPU with AVX512-BF16 or AMX); "
                   "backend %s has none here, evaluating in f32\n",
                   program, gemm->name().c_str());
      chosen = moa::Precision::f32;
    }
    return std::make_shared<moa::Compute>(gemm, threads, chosen);
  }
};

}  // namespace moa_examples
