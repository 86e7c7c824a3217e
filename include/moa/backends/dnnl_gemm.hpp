// moa/backends/dnnl_gemm.hpp - the oneDNN GEMM backend (optional: link the target moa::dnnl).
//
//     auto compute = std::make_shared<moa::Compute>(std::make_shared<moa::DnnlGemm>(), threads);
//     model.set_compute(compute);
//
// oneDNN's matmul primitives are fast (its brgemm kernels reach the core's peak at per-expert
// shapes) but costly to create (about 0.1 ms each), and MoA's per-expert row counts change every
// call (and batches change token counts). So primitives are cached by exact shape, and each
// dimension of a product is cut into a few pieces of sizes {1, 1.25, 1.5, 1.75} x 2^e (multiples
// of 16) and a remainder below 16: whatever the sizes, few shapes are ever created, and the cache
// is bounded. Products too small to repay oneDNN's
// fixed cost per call go to Eigen. Each primitive runs on the calling thread alone (oneDNN's own
// OpenMP threads are not used); moa's ThreadPool splits work across threads instead, so the thread
// count stays the Compute's.
//
// bf16: where the CPU has AVX512-BF16 or AMX, a product the caller allows (evaluation forwards)
// converts its inputs to bfloat16 and accumulates in f32.
//
// Packed weights: a call that gives B's version (GemmCall::b_version: inference with a layer's
// weight) reuses B reordered into the layout the primitive's kernel reads, kept until the version
// changes. Otherwise oneDNN copies B into that layout on every call (and row piece), which for
// narrow experts (64 experts of about 64 rows) took 13% of an inference forward.
#pragma once

#include "moa/bfloat16.hpp"
#include "moa/error.hpp"
#include "moa/gemm.hpp"

#include <oneapi/dnnl/dnnl.hpp>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace moa {

class DnnlGemm final : public GemmBackend {
 public:
  DnnlGemm() {
    const dnnl::cpu_isa isa = dnnl::get_effective_cpu_isa();
    has_bf16_ = isa == dnnl::cpu_isa::avx512_core_bf16 || isa == dnnl::cpu_isa::avx512_core_amx;
  }

  std::string name() const override { return "onednn"; }
  // Bytes of packed weight copies held (see "Packed weights" above).
  std::size_t packed_bytes() const {
    std::lock_guard<std::mutex> lock(packed_mutex_);
    return packed_bytes_;
  }
  bool has_bf16() const override { return has_bf16_; }

  void sgemm(const GemmCall& call) const override {
    const bool rounded_a = call.a_bf16 != nullptr;  // A given in bf16: the product is bf16
    MOA_CHECK(!rounded_a || (has_bf16_ && call.precision == Precision::bf16), "DnnlGemm::sgemm",
              "A is given rounded to bfloat16 but the product is ", to_string(call.precision),
              has_bf16_ ? "" : " and this CPU has no bf16 instructions");
    // bf16 converts the operands on every call: for a few rows that costs more than it saves.
    const bool bf16 = rounded_a || (call.precision == Precision::bf16 && has_bf16_ && call.m >= kMinBf16Rows);
    const bool few_rows = call.m <= detail::kMatrixVectorRows;  // streaming the weight once is all it takes
    if (!bf16 && (few_rows || static_cast<double>(call.m) * static_cast<double>(call.n) * static_cast<double>(call.k) < kSmallProduct)) {
      // oneDNN's fixed cost per call (a few microseconds) exceeds such a product's own time.
      detail::eigen_gemm<float>(call.transpose_a, call.transpose_b, call.m, call.n, call.k, call.a, call.lda, call.b,
                                call.ldb, call.c, call.ldc, call.accumulate);
      return;
    }
    const SingleThreaded single;
    const bool packed = call.b_version != 0;  // B is read from its packed copy (reordered from the floats)
    Index lda = call.lda, ldb = call.ldb;
    thread_local std::vector<std::uint16_t> a_bf16, b_bf16;
    if (bf16) {  // contiguous bf16 copies in the same orientation
      if (!rounded_a) {
        const Index a_rows = call.transpose_a == Transpose::no ? call.m : call.k;
        const Index a_cols = call.transpose_a == Transpose::no ? call.k : call.m;
        to_bf16(call.a, a_rows, a_cols, call.lda, a_bf16);
        lda = a_cols;
      }
      if (!packed) {
        const Index b_rows = call.transpose_b == Transpose::no ? call.k : call.n;
        const Index b_cols = call.transpose_b == Transpose::no ? call.n : call.k;
        to_bf16(call.b, b_rows, b_cols, call.ldb, b_bf16);
        ldb = b_cols;
      }
    }
    const bool b_bf16_copy = bf16 && !packed;
    const void* a_data = rounded_a ? static_cast<const void*>(call.a_bf16)
                         : bf16    ? static_cast<const void*>(a_bf16.data())
                                   : static_cast<const void*>(call.a);
    const void* b_data = b_bf16_copy ? static_cast<const void*>(b_bf16.data()) : static_cast<const void*>(call.b);
    const std::size_t a_element = bf16 ? sizeof(std::uint16_t) : sizeof(float);
    const std::size_t b_element = b_bf16_copy ? sizeof(std::uint16_t) : sizeof(float);
    // Every dimension in pieces of few sizes (see piece()), so changing row counts (experts,
    // batches) and token counts inside weight gradients reuse few primitives. Pieces of the inner
    // dimension accumulate into C one after another.
    for (Index k0 = 0; k0 < call.k;) {
      const Index k_size = piece(call.k - k0);
      for (Index n0 = 0; n0 < call.n;) {
        const Index n_size = piece(call.n - n0);
        for (Index m0 = 0; m0 < call.m;) {
          const Index m_size = piece(call.m - m0);
          GemmCall part = call;
          part.m = m_size;
          part.n = n_size;
          part.k = k_size;
          part.accumulate = call.accumulate || k0 > 0;
          const Index a_offset = call.transpose_a == Transpose::no ? m0 * lda + k0 : k0 * lda + m0;
          const Index b_offset = call.transpose_b == Transpose::no ? k0 * ldb + n0 : n0 * ldb + k0;
          if (!bf16 && std::min(n_size, k_size) < kQuantum) {
            // A column or inner remainder below 16: with MoH's heads and spanned experts, whose row
            // counts and key extents both take any value, primitives for every pair of remainders
            // would overflow the cache and be created again and again. Row remainders (MoA's
            // per-expert counts) keep theirs: oneDNN is faster there.
            detail::eigen_gemm<float>(call.transpose_a, call.transpose_b, m_size, n_size, k_size, call.a + a_offset, lda,
                                      call.b + b_offset, ldb, call.c + m0 * call.ldc + n0, call.ldc, part.accumulate);
          } else {
            run_piece(part, bf16, static_cast<const char*>(a_data) + a_offset * a_element, lda,
                      static_cast<const char*>(b_data) + b_offset * b_element, ldb, call.c + m0 * call.ldc + n0);
          }
          m0 += m_size;
        }
        n0 += n_size;
      }
      k0 += k_size;
    }
  }

 private:
  // oneDNN (OpenMP build) uses omp_get_max_threads() threads: one, while a product runs here.
  struct SingleThreaded {
    int previous = omp_get_max_threads();
    SingleThreaded() {
      if (previous != 1) omp_set_num_threads(1);
    }
    ~SingleThreaded() {
      if (previous != 1) omp_set_num_threads(previous);
    }
  };

  static constexpr Index kQuantum = 16;

  // The next piece of a dimension with `left` elements to go: the largest size of the form
  // {1, 1.25, 1.5, 1.75} x 2^e that is a multiple of 16 and not above `left`, or `left` below 16.
  // So any size is a few pieces (a power of two is one), from about 4 sizes per octave.
  static Index piece(Index left) {
    if (left < kQuantum) return left;
    Index power = kQuantum;
    while (power * 2 <= left) power *= 2;
    for (Index quarters = 7; quarters >= 5; --quarters) {
      const Index candidate = power * quarters / 4;
      if (candidate <= left && candidate % kQuantum == 0) return candidate;
    }
    return power;
  }
  // Primitives kept at most (about 0.25 MB each; the translate trainer uses a few hundred); past
  // this the cache starts afresh. Without a bound, batches of ever new shapes would grow it forever.
  static constexpr std::size_t kMaxPrimitives = 1024;
  // Products of fewer multiply-adds go to Eigen (measured break-even: about 1e5).
  static constexpr double kSmallProduct = 1 << 17;
  // Fewer rows than this multiply in f32 even when bf16 is allowed (decoding steps, measured).
  static constexpr Index kMinBf16Rows = 32;

  struct Key {
    bool transpose_a, transpose_b, accumulate, bf16, packed;  // packed: B in the kernel's layout (ldb 0)
    Index m, n, k, lda, ldb, ldc;
    bool operator==(const Key& other) const {
      return transpose_a == other.transpose_a && transpose_b == other.transpose_b && accumulate == other.accumulate &&
             bf16 == other.bf16 && packed == other.packed && m == other.m && n == other.n && k == other.k &&
             lda == other.lda && ldb == other.ldb && ldc == other.ldc;
    }
  };
  struct KeyHash {
    std::size_t operator()(const Key& key) const {
      std::size_t hash = static_cast<std::size_t>(key.transpose_a) | static_cast<std::size_t>(key.transpose_b) << 1 |
                         static_cast<std::size_t>(key.accumulate) << 2 | static_cast<std::size_t>(key.bf16) << 3 |
                         static_cast<std::size_t>(key.packed) << 4;
      for (const Index value : {key.m, key.n, key.k, key.lda, key.ldb, key.ldc})
        hash = hash * 1000003u ^ static_cast<std::size_t>(value);
      return hash;
    }
  };
  struct Entry {
    std::uint64_t id = 0;  // unique in the process: keys each thread's bound memory objects
    dnnl::matmul primitive;
    dnnl::memory::desc a, b, c, scratch;
  };
  // An entry's memory objects on one thread, re-pointed at each call's data.
  struct Bound {
    dnnl::memory a, b, c, scratch;
  };

  static void to_bf16(const float* source, Index rows, Index cols, Index ld, std::vector<std::uint16_t>& target) {
    target.resize(static_cast<std::size_t>(rows * cols));
    for (Index r = 0; r < rows; ++r) detail::round_to_bfloat16(source + r * ld, cols, target.data() + r * cols);
  }

  std::shared_ptr<const Entry> entry(const GemmCall& call, bool bf16, Index lda, Index ldb) const {
    const Index rows = call.m;
    const bool packed = call.b_version != 0;
    const Key key{call.transpose_a == Transpose::yes, call.transpose_b == Transpose::yes, call.accumulate, bf16, packed,
                  rows, call.n, call.k, lda, packed ? 0 : ldb, call.ldc};
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = cache_.find(key);
    if (found != cache_.end()) return found->second;
    if (cache_.size() >= kMaxPrimitives) cache_.clear();  // entries in use elsewhere live on (shared)
    using dt = dnnl::memory::data_type;
    const dt input_type = bf16 ? dt::bf16 : dt::f32;
    const dnnl::memory::dims a_strides = call.transpose_a == Transpose::no ? dnnl::memory::dims{lda, 1}
                                                                            : dnnl::memory::dims{1, lda};
    const dnnl::memory::dims b_strides = call.transpose_b == Transpose::no ? dnnl::memory::dims{ldb, 1}
                                                                            : dnnl::memory::dims{1, ldb};
    static std::atomic<std::uint64_t> next_id{1};
    auto created = std::make_shared<Entry>();
    created->id = next_id.fetch_add(1);
    created->a = dnnl::memory::desc({rows, call.k}, input_type, a_strides);
    created->b = packed ? dnnl::memory::desc({call.k, call.n}, input_type, dnnl::memory::format_tag::any)
                        : dnnl::memory::desc({call.k, call.n}, input_type, b_strides);
    created->c = dnnl::memory::desc({rows, call.n}, dt::f32, dnnl::memory::dims{call.ldc, 1});
    dnnl::primitive_attr attributes;
    attributes.set_scratchpad_mode(dnnl::scratchpad_mode::user);  // per-thread scratch: safe across threads
    if (call.accumulate) {
      dnnl::post_ops sum;
      sum.append_sum(1.0f);
      attributes.set_post_ops(sum);
    }
    const dnnl::matmul::primitive_desc descriptor(dnnl::matmul::desc(created->a, created->b, created->c), attributes,
                                                  engine_);
    created->primitive = dnnl::matmul(descriptor);
    if (packed) created->b = descriptor.weights_desc();  // the layout the kernel chose
    created->scratch = descriptor.scratchpad_desc();
    cache_.emplace(key, created);
    return created;
  }

  // A weight reordered into a kernel's layout, for one version of it.
  struct Packed {
    std::uint64_t version = 0;
    dnnl::memory::desc layout;
    std::vector<char> bytes;  // 64 more than the layout needs, for alignment
    const void* data() const {
      const auto address = reinterpret_cast<std::uintptr_t>(bytes.data());
      return bytes.data() + ((64 - address % 64) % 64);
    }
  };
  // B's place (pointer, orientation, extent, stride), with the inputs' type.
  using PackedKey = std::tuple<const void*, bool, bool, Index, Index, Index>;
  // Packed copies kept at most, in bytes; past this the store starts afresh (a copy in use lives on).
  static constexpr std::size_t kMaxPackedBytes = std::size_t{1} << 30;

  // The packed copy of B (float, as the caller gave it: b, ldb) in `layout`, made now if the store
  // has none for this version and layout.
  std::shared_ptr<const Packed> packed_weight(const GemmCall& call, bool bf16, const dnnl::memory::desc& layout,
                                              const void* b, Index ldb) const {
    const PackedKey key{b, call.transpose_b == Transpose::yes, bf16, call.k, call.n, ldb};
    std::lock_guard<std::mutex> lock(packed_mutex_);
    auto& variants = packed_[key];  // one per layout (primitives of different row counts may differ)
    for (const auto& variant : variants)
      if (variant->version == call.b_version && variant->layout == layout) return variant;
    for (const auto& variant : variants)
      if (variant->version != call.b_version) packed_bytes_ -= variant->bytes.size();
    variants.erase(std::remove_if(variants.begin(), variants.end(),
                                  [&](const auto& variant) { return variant->version != call.b_version; }),
                   variants.end());
    if (packed_bytes_ + layout.get_size() > kMaxPackedBytes) {
      packed_.clear();
      packed_bytes_ = 0;
    }
    auto made = std::make_shared<Packed>();
    made->version = call.b_version;
    made->layout = layout;
    made->bytes.resize(layout.get_size() + 64);
    const dnnl::memory::dims strides = call.transpose_b == Transpose::no ? dnnl::memory::dims{ldb, 1}
                                                                          : dnnl::memory::dims{1, ldb};
    dnnl::memory source(dnnl::memory::desc({call.k, call.n}, dnnl::memory::data_type::f32, strides), engine_,
                        const_cast<void*>(b));
    dnnl::memory target(layout, engine_, const_cast<void*>(made->data()));
    dnnl::stream stream(engine_);
    dnnl::reorder(source, target).execute(stream, source, target);
    stream.wait();
    packed_bytes_ += made->bytes.size();
    packed_[key].push_back(made);
    return made;
  }

  void run_piece(const GemmCall& call, bool bf16, const void* a, Index lda, const void* b, Index ldb, float* c) const {
    const std::shared_ptr<const Entry> held = entry(call, bf16, lda, ldb);
    const Entry& chosen = *held;
    std::shared_ptr<const Packed> packed;  // held while the primitive reads it
    if (call.b_version != 0) {
      packed = packed_weight(call, bf16, chosen.b, b, ldb);
      b = packed->data();
    }
    thread_local std::vector<char> scratch;
    thread_local std::unordered_map<std::uint64_t, Bound> bound;
    thread_local dnnl::stream stream(engine_);
    const std::size_t scratch_bytes = chosen.scratch.get_size();
    if (scratch.size() < scratch_bytes) scratch.resize(scratch_bytes);
    auto found = bound.find(chosen.id);
    if (found == bound.end()) {
      if (bound.size() >= 2 * kMaxPrimitives) bound.clear();  // mostly entries the cache has dropped
      Bound memories{dnnl::memory(chosen.a, engine_, DNNL_MEMORY_NONE), dnnl::memory(chosen.b, engine_, DNNL_MEMORY_NONE),
                     dnnl::memory(chosen.c, engine_, DNNL_MEMORY_NONE),
                     dnnl::memory(chosen.scratch, engine_, DNNL_MEMORY_NONE)};
      found = bound.emplace(chosen.id, std::move(memories)).first;
    }
    Bound& memories = found->second;
    memories.a.set_data_handle(const_cast<void*>(a));
    memories.b.set_data_handle(const_cast<void*>(b));
    memories.c.set_data_handle(c);
    std::unordered_map<int, dnnl::memory> arguments{
        {DNNL_ARG_SRC, memories.a}, {DNNL_ARG_WEIGHTS, memories.b}, {DNNL_ARG_DST, memories.c}};
    if (scratch_bytes > 0) {
      memories.scratch.set_data_handle(scratch.data());
      arguments.emplace(DNNL_ARG_SCRATCHPAD, memories.scratch);
    }
    chosen.primitive.execute(stream, arguments);
    stream.wait();
  }

  // One CPU engine for the process, so that each thread's stream serves every DnnlGemm.
  static const dnnl::engine& cpu_engine() {
    static const dnnl::engine engine(dnnl::engine::kind::cpu, 0);
    return engine;
  }

  const dnnl::engine& engine_ = cpu_engine();
  bool has_bf16_ = false;
  mutable std::mutex mutex_;
  mutable std::unordered_map<Key, std::shared_ptr<const Entry>, KeyHash> cache_;
  mutable std::mutex packed_mutex_;
  mutable std::map<PackedKey, std::vector<std::shared_ptr<const Packed>>> packed_;
  mutable std::size_t packed_bytes_ = 0;
};

}  // namespace moa
