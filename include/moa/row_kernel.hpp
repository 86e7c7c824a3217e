// moa/row_kernel.hpp - moa's own product kernel for lists of rows: c[c_rows[i]] (+)= a[a_rows[i]] W^T.
//
// Head-routed layers multiply each expert's weight by the rows of the tokens routed to it, which
// lie scattered in the input; results go back to scattered rows too. A GEMM library takes
// contiguous matrices, so those rows were gathered into scratch before each product and scattered
// after it: 19% of an inference forward at wide8 (the copies stream megabytes through the cache),
// on top of products oneDNN runs at 130-190 GFLOP/s. This kernel reads and writes the rows where
// they are. It needs AVX-512 (checked at run time: the build needs no -mavx512f). The forward's
// products take W^T, so they need the weight packed: in inference, whose weights keep their version
// from call to call, the packed copies live in a PanelStore (one per Compute), remade when a
// weight's version changes; in training each expert's weight is packed into scratch as it is used
// (16 x 16 blocks transposed in registers: a few µs, against the gathers' copies). The backward's
// products take W itself, read as it lies (PanelView::transposed), and outer_kernel sums the weight
// gradients over the same scattered rows. Each kernel can fetch the next expert's weight (or
// gradient) into L2 while it runs (Upcoming): with 64 experts, every weight comes from L3.
//
// Layout: W [n, k] (the layer's [out, in]) as panels of 64 of its rows, each panel k-major:
// element (kk, j) of panel p is W[64 p + j][kk], so one k step of a panel is 64 contiguous floats,
// four AVX-512 registers. A tile of up to 6 rows by one panel keeps 24 sums in registers.
//
// bf16 inference (AVX512-BF16): the rows come rounded to bfloat16 and the weight is packed rounded,
// pairs of inputs interleaved, so that a step is a pair and each 32-bit lane holds the two numbers
// one dot-product instruction takes: the same tiles, 32 multiply-adds per instruction, the sums in
// float. Zen 4, wide's bf16 forward: 6.1-6.3 ms with rows gathered for oneDNN's bf16 products
// and their results added into the token rows; 5.2-5.3 ms with this kernel (185-200 GFLOP/s).
#pragma once

#include "moa/bfloat16_number.hpp"
#include "moa/tensor.hpp"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define MOA_ROW_KERNEL_X86 1
#include <cpuid.h>
#include <immintrin.h>
// The tile's loops over rows and registers unrolled at any optimisation level: at -O2, GCC kept
// the sums in memory, and the kernel ran at a quarter of its speed.
#if defined(__clang__)
#define MOA_UNROLL _Pragma("unroll")
#else
#define MOA_UNROLL _Pragma("GCC unroll 8")
#endif
#else
#define MOA_ROW_KERNEL_X86 0
#endif

namespace moa::detail {

// Columns of a panel, and the granule a product's n must be a multiple of for the kernel.
constexpr Index kPanelWidth = 64;
constexpr Index kPanelGranule = 16;

// Whether this CPU (and build) runs the row kernel: x86-64 with AVX-512F, compiled by GCC or Clang.
inline bool row_kernel_available() {
#if MOA_ROW_KERNEL_X86
  static const bool available = __builtin_cpu_supports("avx512f");
  return available;
#else
  return false;
#endif
}

// Whether a product of m rows with a weight of n rows goes to the row kernel.
inline bool row_kernel_serves(Index n) { return row_kernel_available() && n > 0 && n % kPanelGranule == 0; }

// Whether this CPU has AVX512-BF16's dot products of bfloat16 pairs (vdpbf16ps), checked at run
// time: the build needs no -mavx512bf16.
inline bool bfloat16_dot_products_available() {
#if MOA_ROW_KERNEL_X86
  static const bool available = __builtin_cpu_supports("avx512bf16");
  return available;
#else
  return false;
#endif
}

// Whether this CPU has AMX's bfloat16 tile products (CPUID leaf 7, EDX bit 22), where oneDNN's bf16
// products run at 2.6x its f32 ones (the Xeon in the README), beyond the 2x of dot products.
inline bool amx_bfloat16_available() {
#if MOA_ROW_KERNEL_X86
  static const bool available = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    return __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) != 0 && ((edx >> 22) & 1u) != 0;
  }();
  return available;
#else
  return false;
#endif
}

// Whether a bf16 product (rows rounded to bfloat16) with a weight W [n, k] goes to the row kernel:
// n as for float, k even (whole pairs), and the CPU's bf16 dot products, but no AMX (there the
// rows are gathered for the backend's tile products instead).
inline bool pair_row_kernel_serves(Index n, Index k) {
  return row_kernel_serves(n) && k > 0 && k % 2 == 0 && bfloat16_dot_products_available() && !amx_bfloat16_available();
}

// A weight W [n, k] packed into panels (see the header comment), for one version of W: in floats,
// or (for bf16 products) rounded to bfloat16 with pairs of inputs interleaved, so that each 32-bit
// lane of a step holds the two numbers one AVX512-BF16 dot product takes.
struct PanelWeight {
  std::uint64_t version = 0;
  Index n = 0, k = 0;
  std::vector<float> panels;         // [ceil(n / 64)] x [k, min(64, n - 64 p)]
  std::vector<std::uint16_t> pairs;  // bf16: [ceil(n / 64)] x [k / 2, min(64, n - 64 p), 2]

  const float* panel(Index p) const { return panels.data() + p * kPanelWidth * k; }
  Index panel_width(Index p) const { return std::min(kPanelWidth, n - p * kPanelWidth); }
};

// How the kernel reads W [n, k]: panel p (columns 64 p .. of the product) at data + p * panel_step,
// its step kk at + kk * row_step, min(64, n - 64 p) columns of kLanes contiguous numbers each. A
// packed weight has row_step 0 (each panel's own width); a float matrix M [k, n] (row-major,
// leading dimension ld) is W = M^T as it lies, with panel_step 64 and row_step ld: a backward's
// product with a weight. Element float: a step is one input; std::uint16_t (bfloat16): a pair.
template <typename Element>
struct PanelViewOf {
  static constexpr Index kLanes = sizeof(float) / sizeof(Element);  // numbers per column and step
  const Element* data = nullptr;
  Index n = 0, k = 0, panel_step = 0, row_step = 0;  // k: steps (bf16: pairs of inputs)
  const Element* end = nullptr;  // the packed buffer's end (blocks ahead are prefetched), or null

  static PanelViewOf packed(const PanelWeight& weight) {
    const auto& numbers = packed_numbers(weight);
    return {numbers.data(), weight.n, weight.k / kLanes, kPanelWidth * weight.k, 0, numbers.data() + numbers.size()};
  }
  static PanelViewOf transposed(const float* m, Index k, Index n, Index ld) { return {m, n, k, kPanelWidth, ld, nullptr}; }

  const Element* panel(Index p) const { return data + p * panel_step; }
  Index panel_width(Index p) const { return std::min(kPanelWidth, n - p * kPanelWidth); }
  Index step(Index p) const { return row_step == 0 ? kLanes * panel_width(p) : row_step; }

 private:
  static const std::vector<Element>& packed_numbers(const PanelWeight& weight) {
    if constexpr (std::is_same_v<Element, float>) return weight.panels;
    else return weight.pairs;
  }
};
using PanelView = PanelViewOf<float>;

// Memory a product fetches into L2 as it runs, a share of its cache lines with each tile: the
// weight its thread multiplies next (the next expert's). With many experts each weight comes from
// L3 once per pass, and would otherwise be waited for while nothing else runs.
struct Upcoming {
  const char* data = nullptr;
  Index lines = 0;  // 64-byte lines from data

  // A matrix [rows, cols] (rows ld apart), when it lies in one piece; otherwise nothing.
  static Upcoming of(const float* m, Index rows, Index cols, Index ld) {
    if (m == nullptr || (ld != cols && rows > 1)) return {};
    return {reinterpret_cast<const char*>(m), (rows * cols + 15) / 16};
  }

  // The lines after the first `count`.
  Upcoming beyond(Index count) const {
    const Index skipped = std::min(lines, count);
    return {data + 64 * skipped, lines - skipped};
  }

  // Shares [part, part + count) of `parts` equal shares (the last ones may be short or empty).
  Upcoming share(Index part, Index parts, Index count = 1) const {
    const Index per_part = (lines + parts - 1) / std::max<Index>(parts, 1), first = std::min(lines, part * per_part);
    return {data + 64 * first, std::min(lines, first + count * per_part) - first};
  }
};

#if MOA_ROW_KERNEL_X86
inline void fetch_into_l2(const Upcoming& lines) {
  for (Index line = 0; line < lines.lines; ++line) _mm_prefetch(lines.data + 64 * line, _MM_HINT_T1);
}

// The lanes a two-source permute takes in one round of transpose_16x16: for row i (high: row
// i + s), lanes p without bit s from row i, with it from row i + s (16 + lane).
constexpr std::array<int, 16> block_swap_lanes(int s, bool high) {
  std::array<int, 16> lanes{};
  for (int p = 0; p < 16; ++p) lanes[p] = high ? ((p & s) ? 16 + p : p + s) : ((p & s) ? 16 + p - s : p);
  return lanes;
}

// One round: rows i and i + s (bit s of i clear) swap their blocks of s columns across the diagonal.
template <int S>
__attribute__((target("avx512f"))) inline void swap_blocks(__m512* r) {
  static constexpr std::array<int, 16> low = block_swap_lanes(S, false), high = block_swap_lanes(S, true);
  const __m512i take_low = _mm512_loadu_si512(low.data()), take_high = _mm512_loadu_si512(high.data());
  MOA_UNROLL for (int i = 0; i < 16; ++i) {
    if (i & S) continue;
    const __m512 upper = r[i], lower = r[i + S];
    r[i] = _mm512_permutex2var_ps(upper, take_low, lower);
    r[i + S] = _mm512_permutex2var_ps(upper, take_high, lower);
  }
}

// target[kk * target_ld + j] = source[j * ld + kk] for j, kk < 16: a 16 x 16 block transposed in
// registers, in four rounds of two-source permutes. (GCC 12 warns falsely inside the unpack and
// shuffle intrinsics, whose merge source is left undefined.)
__attribute__((target("avx512f"))) inline void transpose_16x16(const float* source, Index ld, float* target,
                                                               Index target_ld) {
  __m512 r[16];
  MOA_UNROLL for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(source + i * ld);
  swap_blocks<8>(r);
  swap_blocks<4>(r);
  swap_blocks<2>(r);
  swap_blocks<1>(r);
  MOA_UNROLL for (int i = 0; i < 16; ++i) _mm512_storeu_ps(target + i * target_ld, r[i]);
}
#endif

// W [n, k] (rows ld apart) packed into `into` (see the header comment). Blocks of 16 x 16 are
// transposed in registers where the CPU has AVX-512, the edges element by element.
inline void pack_weight(const float* weight, Index n, Index k, Index ld, PanelWeight& into) {
  into.n = n;
  into.k = k;
  into.panels.resize(static_cast<std::size_t>(n * k));
  for (Index p = 0; p * kPanelWidth < n; ++p) {
    const float* rows = weight + p * kPanelWidth * ld;
    float* panel = into.panels.data() + p * kPanelWidth * k;
    const Index width = into.panel_width(p);
    Index blocked_width = 0, blocked_k = 0;
#if MOA_ROW_KERNEL_X86
    if (row_kernel_available()) {
      blocked_width = width / 16 * 16;
      blocked_k = k / 16 * 16;
      for (Index kk = 0; kk < blocked_k; kk += 16)
        for (Index j = 0; j < blocked_width; j += 16) transpose_16x16(rows + j * ld + kk, ld, panel + kk * width + j, width);
    }
#endif
    for (Index kk = 0; kk < k; ++kk)
      for (Index j = kk < blocked_k ? blocked_width : 0; j < width; ++j) panel[kk * width + j] = rows[j * ld + kk];
  }
}

// W [n, k] (rows ld apart, k even) rounded to bfloat16 and packed into `into`'s pairs (see
// PanelWeight). Once per version of an inference weight, so element by element.
inline void pack_weight_pairs(const float* weight, Index n, Index k, Index ld, PanelWeight& into) {
  into.n = n;
  into.k = k;
  into.pairs.resize(static_cast<std::size_t>(n * k));
  for (Index p = 0; p * kPanelWidth < n; ++p) {
    const float* rows = weight + p * kPanelWidth * ld;
    std::uint16_t* panel = into.pairs.data() + p * kPanelWidth * k;
    const Index width = into.panel_width(p);
    for (Index kk = 0; kk < k; ++kk)
      for (Index j = 0; j < width; ++j) panel[((kk / 2) * width + j) * 2 + kk % 2] = round_to_bfloat16(rows[j * ld + kk]);
  }
}

// Packed copies of weights, by place (pointer, shape, stride), kind (floats or bfloat16 pairs) and
// version. Thread-safe: experts running on different threads fetch their own weights.
class PanelStore {
 public:
  std::shared_ptr<const PanelWeight> get(const float* weight, Index n, Index k, Index ld, std::uint64_t version,
                                         bool pairs = false) const {
    const Key key{weight, n, k, ld, pairs};
    const std::size_t size = static_cast<std::size_t>(n * k) * (pairs ? sizeof(std::uint16_t) : sizeof(float));
    std::lock_guard<std::mutex> lock(mutex_);
    auto& slot = packed_[key];
    if (slot && slot->version == version) return slot;
    if (slot) bytes_ -= size;
    if (bytes_ + size > kMaxBytes) {  // start afresh (copies in use live on)
      packed_.clear();
      bytes_ = 0;
    }
    auto made = std::make_shared<PanelWeight>();
    made->version = version;
    if (pairs) pack_weight_pairs(weight, n, k, ld, *made);
    else pack_weight(weight, n, k, ld, *made);
    bytes_ += size;
    packed_[key] = made;
    return made;
  }

  std::size_t bytes() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return bytes_;
  }

 private:
  using Key = std::tuple<const float*, Index, Index, Index, bool>;
  static constexpr std::size_t kMaxBytes = std::size_t{1} << 30;
  mutable std::mutex mutex_;
  mutable std::map<Key, std::shared_ptr<const PanelWeight>> packed_;
  mutable std::size_t bytes_ = 0;
};

#if MOA_ROW_KERNEL_X86

// The end of a tile: rows [0, R) of its sums, times scale[r] (a null scale: 1), stored into (or
// added to) c_row[r][0, 16 V). Each row is stored (or loaded, added and stored) before the next, so
// two rows of a tile that name the same row of c both land. Inlined always, so the sums stay in
// registers.
template <int R, int V>
__attribute__((target("avx512f"), always_inline)) inline void store_tile(__m512 (&sum)[R][V], float* const* c_row,
                                                                         bool accumulate, const float* scale) {
  if (scale != nullptr)
    MOA_UNROLL for (int r = 0; r < R; ++r) {
      const __m512 factor = _mm512_set1_ps(scale[r]);
      MOA_UNROLL for (int v = 0; v < V; ++v) sum[r][v] = _mm512_mul_ps(sum[r][v], factor);
    }
  MOA_UNROLL for (int r = 0; r < R; ++r)
    MOA_UNROLL for (int v = 0; v < V; ++v) {
      float* target = c_row[r] + 16 * v;
      _mm512_storeu_ps(target, accumulate ? _mm512_add_ps(_mm512_loadu_ps(target), sum[r][v]) : sum[r][v]);
    }
}

// One step of a tile: sum[r][v] += a_row[r][kk] panel[kk][16 v, 16 v + 16).
template <int R, int V>
__attribute__((target("avx512f"), always_inline)) inline void tile_step(__m512 (&sum)[R][V], const float* const* a_row,
                                                                        const float* panel, Index step, Index kk) {
  __m512 b[V];
  MOA_UNROLL for (int v = 0; v < V; ++v) b[v] = _mm512_loadu_ps(panel + kk * step + 16 * v);
  MOA_UNROLL for (int r = 0; r < R; ++r) {
    const __m512 x = _mm512_set1_ps(a_row[r][kk]);
    MOA_UNROLL for (int v = 0; v < V; ++v) sum[r][v] = _mm512_fmadd_ps(x, b[v], sum[r][v]);
  }
}

// Rows [0, R) of a tile: c_row[r][0, 16 V) (+)= scale[r] sum over kk of a_row[r][kk] panel[kk][0,
// 16 V) (a null scale: 1; stored as store_tile says). The lines of `first` and `second` (up to k
// of each) are fetched into L2 one per step: issued all at once before the tile, 50-80 fetches
// filled the queue of misses, and the tile's own loads waited behind them (E = 64's projections,
// one thread: 1.94-2.00 -> 1.74-1.79 ms). Only the first steps fetch (a few dozen of 128): the
// rest run in a loop of their own, since the fetches' tests in every step cost 4% of a tile's
// time with everything in L1 (Zen 4: 108 -> 112 GFLOP/s).
template <int R, int V>
__attribute__((target("avx512f"))) inline void row_tile(const float* const* a_row, const float* panel, Index step,
                                                        Index k, float* const* c_row, bool accumulate,
                                                        const float* scale, const Upcoming& first = {},
                                                        const Upcoming& second = {}) {
  __m512 sum[R][V];
  MOA_UNROLL for (int r = 0; r < R; ++r)
    MOA_UNROLL for (int v = 0; v < V; ++v) sum[r][v] = _mm512_setzero_ps();
  const Index fetching = std::min(k, std::max(first.lines, second.lines));
  Index kk = 0;
  for (; kk < fetching; ++kk) {
    if (kk < first.lines) _mm_prefetch(first.data + 64 * kk, _MM_HINT_T1);
    if (kk < second.lines) _mm_prefetch(second.data + 64 * kk, _MM_HINT_T1);
    tile_step<R, V>(sum, a_row, panel, step, kk);
  }
  for (; kk < k; ++kk) tile_step<R, V>(sum, a_row, panel, step, kk);
  store_tile<R, V>(sum, c_row, accumulate, scale);
}

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"  // see dot_block in moa/gemm.hpp
#endif
// One step of a bf16 tile: a pair of inputs per row, one dot product of pairs per register.
template <int R, int V>
__attribute__((target("avx512f,avx512bf16"), always_inline)) inline void tile_step(__m512 (&sum)[R][V],
                                                                                   const std::uint16_t* const* a_row,
                                                                                   const std::uint16_t* panel,
                                                                                   Index step, Index kk) {
  __m512bh b[V];
  MOA_UNROLL for (int v = 0; v < V; ++v) b[v] = (__m512bh)_mm512_loadu_si512(panel + kk * step + 32 * v);
  MOA_UNROLL for (int r = 0; r < R; ++r) {
    std::uint32_t pair;
    std::memcpy(&pair, a_row[r] + 2 * kk, sizeof pair);
    const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
    MOA_UNROLL for (int v = 0; v < V; ++v) sum[r][v] = _mm512_dpbf16_ps(sum[r][v], b[v], x);
  }
}

// The same for bf16 products: a_row's rows and the panel are bfloat16, a step is a pair of inputs
// (k pairs), and each step of a column is one AVX512-BF16 dot product of two pairs, 32
// multiply-adds per instruction where a float step has 16.
template <int R, int V>
__attribute__((target("avx512f,avx512bf16"))) inline void row_tile(const std::uint16_t* const* a_row,
                                                                   const std::uint16_t* panel, Index step, Index k,
                                                                   float* const* c_row, bool accumulate,
                                                                   const float* scale, const Upcoming& first = {},
                                                                   const Upcoming& second = {}) {
  __m512 sum[R][V];
  MOA_UNROLL for (int r = 0; r < R; ++r)
    MOA_UNROLL for (int v = 0; v < V; ++v) sum[r][v] = _mm512_setzero_ps();
  const Index fetching = std::min(k, std::max(first.lines, second.lines));
  Index kk = 0;
  for (; kk < fetching; ++kk) {
    if (kk < first.lines) _mm_prefetch(first.data + 64 * kk, _MM_HINT_T1);
    if (kk < second.lines) _mm_prefetch(second.data + 64 * kk, _MM_HINT_T1);
    tile_step<R, V>(sum, a_row, panel, step, kk);
  }
  for (; kk < k; ++kk) tile_step<R, V>(sum, a_row, panel, step, kk);
  store_tile<R, V>(sum, c_row, accumulate, scale);
}
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

// Rows [0, m) times one depth block of a panel. Meanwhile the cache lines of `next` (the block
// after this one) and of `upcoming` (a share of the next weight's) are fetched into L2, a few
// with each whole tile: with many experts, each weight comes from memory once per call, and the first
// tile of a block would wait on it (wide64's forward: 7.2-8.0 -> 6.5-7.6 ms).
template <int V, typename Element>
__attribute__((target("avx512f"))) inline void row_panel(Index m, const Element* const* a_row, const Element* panel,
                                                         Index step, Index k, float* const* c_row, bool accumulate,
                                                         const float* scale, const Upcoming& next,
                                                         const Upcoming& upcoming) {
  // Fetches only before whole tiles: with fewer than 6 rows (decoding steps) the weight streams
  // from memory as it is read, and fetching the next block beside it made wide's decoding step 30%
  // slower.
  const Index tiles = (m + 5) / 6, whole_tiles = m / 6;
  for (Index tile = 0; tile < tiles; ++tile) {
    Upcoming first, second;  // fetched by the tile, one line per step (lines beyond its depth now)
    if (tile < whole_tiles) {
      first = next.share(tile, whole_tiles);
      second = upcoming.share(tile, whole_tiles);
      fetch_into_l2(first.beyond(k));
      fetch_into_l2(second.beyond(k));
    }
    const Index i = 6 * tile;
    // The next tile's rows, which lie scattered (no hardware prefetcher follows them): its slices
    // of a, and of c when they are read too.
    for (Index r = i + 6; r < std::min(m, i + 12); ++r) {
      for (Index byte = 0; byte < k * Index{sizeof(float)}; byte += 64)  // k steps of 4 bytes (a float or a pair)
        _mm_prefetch(reinterpret_cast<const char*>(a_row[r]) + byte, _MM_HINT_T1);
      if (accumulate)
        for (Index v = 0; v < V; ++v) _mm_prefetch(reinterpret_cast<const char*>(c_row[r] + 16 * v), _MM_HINT_T0);
    }
    const float* tile_scale = scale != nullptr ? scale + i : nullptr;
    switch (std::min<Index>(6, m - i)) {
      case 6: row_tile<6, V>(a_row + i, panel, step, k, c_row + i, accumulate, tile_scale, first, second); break;
      case 5: row_tile<5, V>(a_row + i, panel, step, k, c_row + i, accumulate, tile_scale); break;
      case 4: row_tile<4, V>(a_row + i, panel, step, k, c_row + i, accumulate, tile_scale); break;
      case 3: row_tile<3, V>(a_row + i, panel, step, k, c_row + i, accumulate, tile_scale); break;
      case 2: row_tile<2, V>(a_row + i, panel, step, k, c_row + i, accumulate, tile_scale); break;
      default: row_tile<1, V>(a_row + i, panel, step, k, c_row + i, accumulate, tile_scale); break;
    }
  }
}

// rows x width floats (width a multiple of 16) from rows `step` apart into contiguous rows.
__attribute__((target("avx512f"))) inline void copy_rows(Index rows, Index width, const float* source, Index step,
                                                         float* target) {
  for (Index r = 0; r < rows; ++r)
    for (Index j = 0; j < width; j += 16) _mm512_storeu_ps(target + r * width + j, _mm512_loadu_ps(source + r * step + j));
}

// One row of a weight gradient's tile: sum[r][v] += g[r] x[16 v, 16 v + 16).
template <int R, int V>
__attribute__((target("avx512f"), always_inline)) inline void outer_step(__m512 (&sum)[R][V], const float* g,
                                                                         const float* x) {
  __m512 b[V];
  MOA_UNROLL for (int v = 0; v < V; ++v) b[v] = _mm512_loadu_ps(x + 16 * v);
  MOA_UNROLL for (int r = 0; r < R; ++r) {
    const __m512 value = _mm512_set1_ps(g[r]);
    MOA_UNROLL for (int v = 0; v < V; ++v) sum[r][v] = _mm512_fmadd_ps(value, b[v], sum[r][v]);
  }
}

// Rows [0, R) of a weight gradient's tile: w_row[r][0, 16 V) += sum over i < m of g_row[i][r]
// x[i xs + (0, 16 V)], the sums over i in order. g_row: m rows of the gradient, each read at the
// tile's first column; x: m rows of a panel, xs apart. The lines of `fetch` (up to m) are fetched
// into L2 one per row, as in row_tile.
template <int R, int V>
__attribute__((target("avx512f"))) inline void outer_tile(Index m, const float* const* g_row, Index g_column,
                                                          const float* x, Index xs, float* const* w_row,
                                                          const Upcoming& fetch = {}) {
  __m512 sum[R][V];
  MOA_UNROLL for (int r = 0; r < R; ++r)
    MOA_UNROLL for (int v = 0; v < V; ++v) {
      _mm_prefetch(reinterpret_cast<const char*>(w_row[r] + 16 * v), _MM_HINT_T0);
      sum[r][v] = _mm512_setzero_ps();
    }
  // As in row_tile, the rows that fetch run apart from the rest.
  const Index fetching = std::min(m, fetch.lines);
  Index i = 0;
  for (; i < fetching; ++i) {
    _mm_prefetch(fetch.data + 64 * i, _MM_HINT_T1);
    outer_step<R, V>(sum, g_row[i] + g_column, x + i * xs);
  }
  for (; i < m; ++i) outer_step<R, V>(sum, g_row[i] + g_column, x + i * xs);
  MOA_UNROLL for (int r = 0; r < R; ++r)
    MOA_UNROLL for (int v = 0; v < V; ++v) {
      float* target = w_row[r] + 16 * v;
      _mm512_storeu_ps(target, _mm512_add_ps(_mm512_loadu_ps(target), sum[r][v]));
    }
}

// Rows [0, n) of w's panel (rows ldw apart) += G^T X: G's m rows g_row, X [m, 16 V] (rows xs apart).
// upcoming's lines go into L2 meanwhile, a share with each tile.
template <int V>
__attribute__((target("avx512f"))) inline void outer_panel(Index m, const float* const* g_row, Index n, const float* x,
                                                           Index xs, float* w, Index ldw, const Upcoming& upcoming) {
  const Index tiles = (n + 5) / 6;
  for (Index j0 = 0; j0 < n; j0 += 6) {
    const Upcoming fetch = upcoming.share(j0 / 6, tiles);  // by the tile, one line per row (as row_tile)
    fetch_into_l2(fetch.beyond(m));
    float* w_row[6];
    const Index tile = std::min<Index>(6, n - j0);
    for (Index r = 0; r < tile; ++r) w_row[r] = w + (j0 + r) * ldw;
    switch (tile) {
      case 6: outer_tile<6, V>(m, g_row, j0, x, xs, w_row, fetch); break;
      case 5: outer_tile<5, V>(m, g_row, j0, x, xs, w_row, fetch); break;
      case 4: outer_tile<4, V>(m, g_row, j0, x, xs, w_row, fetch); break;
      case 3: outer_tile<3, V>(m, g_row, j0, x, xs, w_row, fetch); break;
      case 2: outer_tile<2, V>(m, g_row, j0, x, xs, w_row, fetch); break;
      default: outer_tile<1, V>(m, g_row, j0, x, xs, w_row, fetch); break;
    }
  }
}

#endif

// For i < m: row c_rows[i] of c (+)= row a_rows[i] of a times W^T, W read through `weight`
// (row_kernel_serves(weight.n)). a: rows of weight.k floats with stride lda; c: rows of weight.n
// floats with stride ldc; a null row list means rows 0, 1, ... in order. Rows of c may repeat
// when accumulating (each adds in turn). `upcoming` is fetched into L2 meanwhile. With scales,
// row i's product is multiplied by scales[i] before it is stored or added (MoA's gates: no scaled
// copy of the rows first). Element std::uint16_t: a bf16 product (pair_row_kernel_serves), a's
// rows and the packed weight in bfloat16 (lda in numbers, weight.k in pairs), the sums in float.
template <typename Element>
void row_kernel(Index m, const Element* a, Index lda, const Index* a_rows, const PanelViewOf<Element>& weight, float* c,
                Index ldc, const Index* c_rows, bool accumulate, const Upcoming& upcoming = {},
                const float* scales = nullptr) {
#if MOA_ROW_KERNEL_X86
  constexpr Index kLanes = PanelViewOf<Element>::kLanes;
  constexpr Index kBlock = 96;  // rows whose pointers are found at once
  // The depth of a panel read in one pass over the rows: 128 steps x 64 columns (32 KB) stay in
  // the L1 cache; a whole panel of a query projection (512 deep, 128 KB) would come from L2 at
  // every tile.
  constexpr Index kDepthBlock = 128;
  const Element* a_row[kBlock];
  float* c_row[kBlock];
  alignas(64) float local[kDepthBlock * kPanelWidth];  // a block of a float weight read as it lies
  // upcoming's lines in equal shares over the passes of row_panel.
  const Index panels = (weight.n + kPanelWidth - 1) / kPanelWidth;
  const Index passes = (m + kBlock - 1) / kBlock * panels * ((weight.k + kDepthBlock - 1) / kDepthBlock);
  Index pass = 0;
  for (Index first = 0; first < m; first += kBlock) {
    const Index rows = std::min(kBlock, m - first);
    for (Index i = 0; i < rows; ++i) {
      a_row[i] = a + (a_rows ? a_rows[first + i] : first + i) * lda;
      c_row[i] = c + (c_rows ? c_rows[first + i] : first + i) * ldc;
    }
    for (Index p = 0; p * kPanelWidth < weight.n; ++p) {
      float* c_panel[kBlock];
      for (Index i = 0; i < rows; ++i) c_panel[i] = c_row[i] + p * kPanelWidth;
      const Index width = weight.panel_width(p), step = weight.step(p);
      for (Index k0 = 0; k0 < weight.k; k0 += kDepthBlock) {
        const Index depth = std::min(kDepthBlock, weight.k - k0);
        const Element* panel = weight.panel(p) + k0 * step;
        // A packed weight's next block (of this panel or the next one) is the memory after this one.
        const Element* next = panel + depth * step;
        Index read_step = step;
        if constexpr (std::is_same_v<Element, float>) {
          if (step != width) {  // a weight as it lies: its block's rows, a layer's width apart, copied together
            copy_rows(depth, width, panel, step, local);
            // The next block (deeper in this panel, else the next panel) into L2 while this one runs.
            const bool deeper = k0 + depth < weight.k;
            if (deeper || (p + 1) * kPanelWidth < weight.n) {
              const float* upcoming = deeper ? panel + depth * step : weight.panel(p + 1);
              const Index upcoming_rows = deeper ? std::min(kDepthBlock, weight.k - k0 - depth) : std::min(kDepthBlock, weight.k);
              for (Index kk = 0; kk < upcoming_rows; ++kk)
                for (Index j = 0; j < weight.panel_width(deeper ? p : p + 1); j += 16)
                  _mm_prefetch(reinterpret_cast<const char*>(upcoming + kk * step + j), _MM_HINT_T1);
            }
            panel = local;
            read_step = width;
          }
        }
        const Upcoming ahead{reinterpret_cast<const char*>(next),
                             weight.end ? std::min<Index>(weight.end - next, kDepthBlock * kPanelWidth * kLanes) /
                                              (16 * kLanes)
                                        : 0};
        const Upcoming share = upcoming.share(pass++, passes);
        const Element* a_block[kBlock];
        for (Index i = 0; i < rows; ++i) a_block[i] = a_row[i] + kLanes * k0;
        const bool add = accumulate || k0 > 0;
        const float* block_scales = scales != nullptr ? scales + first : nullptr;
        switch (width / 16) {
          case 4: row_panel<4>(rows, a_block, panel, read_step, depth, c_panel, add, block_scales, ahead, share); break;
          case 3: row_panel<3>(rows, a_block, panel, read_step, depth, c_panel, add, block_scales, ahead, share); break;
          case 2: row_panel<2>(rows, a_block, panel, read_step, depth, c_panel, add, block_scales, ahead, share); break;
          default: row_panel<1>(rows, a_block, panel, read_step, depth, c_panel, add, block_scales, ahead, share); break;
        }
      }
    }
  }
#else
  (void)m, (void)a, (void)lda, (void)a_rows, (void)weight, (void)c, (void)ldc, (void)c_rows, (void)accumulate,
      (void)upcoming, (void)scales;
#endif
}

// The weight gradient of an expert's rows, in place: w [n, k] (rows ldw apart) += G^T X, where
// row i of G [m, n] is row g_rows[i] of g (stride ldg) and row i of X [m, k] is row x_rows[i] of x
// (stride ldx); null lists mean rows in order. k a multiple of 16 (row_kernel_serves(k)). Each
// element sums over the rows in order, whatever range of w's rows a call is given. `upcoming` is
// fetched into L2 meanwhile.
inline void outer_kernel(Index m, const float* g, Index ldg, const Index* g_rows, const float* x, Index ldx,
                         const Index* x_rows, Index n, Index k, float* w, Index ldw, const Upcoming& upcoming = {}) {
#if MOA_ROW_KERNEL_X86
  // A pass takes kBlock rows. X's rows are read in place when they lie one panel wide and in order;
  // otherwise a panel of their slices is copied together first, since rows of a layer's width
  // (2 KB apart at d_model 512) fall into a few L1 sets and would evict one another between tiles.
  constexpr Index kBlock = 64;
  alignas(64) float x_local[kBlock * kPanelWidth];
  const float* g_row[kBlock];
  const float* x_row[kBlock];
  const bool x_in_place = x_rows == nullptr && ldx == k && k <= kPanelWidth;
  const Index passes = (m + kBlock - 1) / kBlock * ((k + kPanelWidth - 1) / kPanelWidth);
  Index pass = 0;
  for (Index first = 0; first < m; first += kBlock) {
    const Index rows = std::min(kBlock, m - first);
    for (Index i = 0; i < rows; ++i) {
      g_row[i] = g + (g_rows ? g_rows[first + i] : first + i) * ldg;
      x_row[i] = x + (x_rows ? x_rows[first + i] : first + i) * ldx;
    }
    for (Index p = 0; p * kPanelWidth < k; ++p) {
      const Index width = std::min(kPanelWidth, k - p * kPanelWidth);
      const float* panel = x_row[0];
      Index step = ldx;
      if (!x_in_place) {
        for (Index i = 0; i < rows; ++i) copy_rows(1, width, x_row[i] + p * kPanelWidth, 0, x_local + i * width);
        // The rows' next slices into L2 while this panel runs: scattered rows defeat the prefetchers.
        if ((p + 1) * kPanelWidth < k)
          for (Index i = 0; i < rows; ++i)
            for (Index j = (p + 1) * kPanelWidth; j < std::min(k, (p + 2) * kPanelWidth); j += 16)
              _mm_prefetch(reinterpret_cast<const char*>(x_row[i] + j), _MM_HINT_T1);
        panel = x_local;
        step = width;
      }
      float* w_panel = w + p * kPanelWidth;
      const Upcoming share = upcoming.share(pass++, passes);
      switch (width / 16) {
        case 4: outer_panel<4>(rows, g_row, n, panel, step, w_panel, ldw, share); break;
        case 3: outer_panel<3>(rows, g_row, n, panel, step, w_panel, ldw, share); break;
        case 2: outer_panel<2>(rows, g_row, n, panel, step, w_panel, ldw, share); break;
        default: outer_panel<1>(rows, g_row, n, panel, step, w_panel, ldw, share); break;
      }
    }
  }
#else
  (void)m, (void)g, (void)ldg, (void)g_rows, (void)x, (void)ldx, (void)x_rows, (void)n, (void)k, (void)w, (void)ldw,
      (void)upcoming;
#endif
}

}  // namespace moa::detail
