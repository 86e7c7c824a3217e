// moa/gemm.hpp - the one interface every matrix product of moa's layers goes through.
//
//     C = op(A) op(B)   or   C += op(A) op(B)        (row-major, op = identity or transpose)
//
// A GemmBackend computes float products; Eigen's (header-only, the default) is defined here, and
// oneDNN's lives in moa/backends/dnnl_gemm.hpp (optional target moa::dnnl). Double products always use
// Eigen: they serve the gradient checks, where oneDNN has no f64 matmul.
//
// One kind of product skips the backend: an inference product of lists of scattered rows (the
// tokens routed to an expert) with a layer's weight, which no GEMM library takes without copying
// the rows out and back. moa's own row kernel (moa/row_kernel.hpp, AVX-512) reads and writes them
// in place: see detail::rows_times_weight.
//
// A Compute bundles what a layer needs to run: the backend, a thread pool and the precision
// allowed for inference. Layers hold a shared Compute (set_compute on a model reaches all its
// layers); without one they use Compute::standard(): Eigen, one thread, f32.
#pragma once

#include "moa/error.hpp"
#include "moa/row_kernel.hpp"
#include "moa/tensor.hpp"
#include "moa/thread_pool.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>  // only in programs compiled with OpenMP: see OneOpenMPThread
#endif

namespace moa {

enum class Transpose { no, yes };

// The arithmetic of inference products: f32, or bfloat16 inputs with f32 accumulation.
enum class Precision { f32, bf16 };

inline const char* to_string(Precision precision) { return precision == Precision::bf16 ? "bf16" : "f32"; }

// One product C[m, n] (+)= op(A)[m, k] op(B)[k, n] on row-major storage with leading dimensions.
struct GemmCall {
  Transpose transpose_a = Transpose::no, transpose_b = Transpose::no;
  Index m = 0, n = 0, k = 0;
  const float* a = nullptr;
  Index lda = 0;
  const float* b = nullptr;
  Index ldb = 0;
  float* c = nullptr;
  Index ldc = 0;
  bool accumulate = false;
  Precision precision = Precision::f32;  // bf16 only where the caller allows it and the backend has it
  // A version of b's values that changes whenever they do (a Parameter's version()), or 0 when
  // unknown: while it holds, a backend may reuse b repacked for its kernels.
  std::uint64_t b_version = 0;
  // A already rounded to bfloat16, in place of `a` (then null; lda is this one's): an operand that
  // several products read is rounded once. Only with precision bf16, on a backend with bf16.
  const std::uint16_t* a_bf16 = nullptr;
};

class GemmBackend {
 public:
  virtual ~GemmBackend() = default;
  virtual std::string name() const = 0;
  // True when the CPU and the backend compute bf16 products natively.
  virtual bool has_bf16() const { return false; }
  virtual void sgemm(const GemmCall& call) const = 0;
};

namespace detail {

template <typename Scalar>
using StridedMap = Eigen::Map<Matrix<Scalar>, 0, Eigen::OuterStride<>>;
template <typename Scalar>
using ConstStridedMap = Eigen::Map<const Matrix<Scalar>, 0, Eigen::OuterStride<>>;

// Up to this many rows, a product is computed row by row as vector-matrix products.
constexpr Index kMatrixVectorRows = 4;

// Eigen's packet types carry vector attributes that GCC warns about dropping as template arguments
// (Eigen's own headers, included as system headers, are spared the same warning).
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif
// totals[j] = the sum of the lanes of packets[j], for `count` packets.
template <typename Scalar, int count, typename Packet>
EIGEN_ALWAYS_INLINE void reduce_packets(const Packet* packets, Scalar* totals) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<Packet, __m512> && count == 16) {
    // Sixteen sums at once by a transposing tree (a horizontal sum per packet costs as much as
    // the dot product itself at d_h = 64): pairs within 128-bit lanes, then lanes.
    __m512 pairs[8], quads[4];
    for (int j = 0; j < 8; ++j)
      pairs[j] = _mm512_add_ps(_mm512_unpacklo_ps(packets[2 * j], packets[2 * j + 1]),
                               _mm512_unpackhi_ps(packets[2 * j], packets[2 * j + 1]));
    for (int j = 0; j < 4; ++j) {
      const __m512d low = _mm512_unpacklo_pd(_mm512_castps_pd(pairs[2 * j]), _mm512_castps_pd(pairs[2 * j + 1]));
      const __m512d high = _mm512_unpackhi_pd(_mm512_castps_pd(pairs[2 * j]), _mm512_castps_pd(pairs[2 * j + 1]));
      quads[j] = _mm512_add_ps(_mm512_castpd_ps(low), _mm512_castpd_ps(high));  // lane L: chunk L of 4 packets
    }
    __m512 halves[2];
    for (int j = 0; j < 2; ++j)
      halves[j] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * j], quads[2 * j + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                _mm512_shuffle_f32x4(quads[2 * j], quads[2 * j + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    _mm512_storeu_ps(totals, _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                           _mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(3, 1, 3, 1))));
    return;
  }
#endif
#if defined(__AVX__)
  if constexpr (std::is_same_v<Packet, __m256> && count % 4 == 0) {
    // Four sums at a time by horizontal adds (a separate horizontal sum per packet costs about as
    // much as a dot product of 64: a decoding step's x Wo^T).
    for (int j = 0; j < count; j += 4) {
      const __m256 sums = _mm256_hadd_ps(_mm256_hadd_ps(packets[j], packets[j + 1]),
                                         _mm256_hadd_ps(packets[j + 2], packets[j + 3]));  // lane L: half L of each
      _mm_storeu_ps(totals + j, _mm_add_ps(_mm256_castps256_ps128(sums), _mm256_extractf128_ps(sums, 1)));
    }
    return;
  }
#endif
  for (int j = 0; j < count; ++j) totals[j] = Eigen::internal::predux(packets[j]);
}

// How a kernel reads b: packets of Scalar from b's elements, and one element as a Scalar. Plain
// loads here; moa/bfloat16.hpp widens bfloat16 weights, keys and values.
template <typename Scalar>
struct PlainLoad {
  template <typename Packet>
  static Packet packet(const Scalar* source) {
    return Eigen::internal::ploadu<Packet>(source);
  }
  static Scalar scalar(Scalar value) { return value; }
};

// c[M, R] += a[M, k] b[R, k]^T for M rows of a and R rows of b (row-major, unit column stride):
// dot products in SIMD packets, so b is read once for all M rows. Each element's sum runs in the
// same order wherever its column falls, so splitting columns across threads changes nothing.
template <typename Scalar, int M, int R>
void dot_block(Index k, const Scalar* a, Index lda, const Scalar* b, Index ldb, Scalar* c, Index ldc) {
  using Packet = typename Eigen::internal::packet_traits<Scalar>::type;
  constexpr Index width = Eigen::internal::packet_traits<Scalar>::size;
  Packet sums[M][R];
  for (int i = 0; i < M; ++i)
    for (int r = 0; r < R; ++r) sums[i][r] = Eigen::internal::pset1<Packet>(Scalar(0));
  Index p = 0;
  for (; p + width <= k; p += width) {
    Packet columns[R];
    for (int r = 0; r < R; ++r) columns[r] = Eigen::internal::ploadu<Packet>(b + r * ldb + p);
    for (int i = 0; i < M; ++i) {
      const Packet row = Eigen::internal::ploadu<Packet>(a + i * lda + p);
      for (int r = 0; r < R; ++r) sums[i][r] = Eigen::internal::pmadd(row, columns[r], sums[i][r]);
    }
  }
  Scalar totals[M][R];
  reduce_packets<Scalar, M * R>(&sums[0][0], &totals[0][0]);
  for (int i = 0; i < M; ++i)
    for (int r = 0; r < R; ++r) {
      Scalar sum = totals[i][r];
      for (Index q = p; q < k; ++q) sum += a[i * lda + q] * b[r * ldb + q];
      c[i * ldc + r] += sum;
    }
}

// c[M, T*width] += a[M, k] b[k, T*width] (b row-major with stride ldb; a's element (i, p) at
// a[i * lda + p * a_step]): T packets of columns held in M*T accumulators while the k rows of b
// stream past, each read once for all M rows. With accumulate false, c = the product instead.
template <typename Scalar, int M, int T, typename Load, typename Element>
void axpy_tile(Index k, const Scalar* a, Index lda, Index a_step, const Element* b, Index ldb, Scalar* c, Index ldc,
               bool accumulate = true) {
  using Packet = typename Eigen::internal::packet_traits<Scalar>::type;
  constexpr Index width = Eigen::internal::packet_traits<Scalar>::size;
  Packet sums[M][T];
  for (int i = 0; i < M; ++i)
    for (int t = 0; t < T; ++t) sums[i][t] = Eigen::internal::pset1<Packet>(Scalar(0));
  for (Index p = 0; p < k; ++p) {
    Packet columns[T];
    for (int t = 0; t < T; ++t) columns[t] = Load::template packet<Packet>(b + p * ldb + t * width);
    for (int i = 0; i < M; ++i) {
      const Packet broadcast = Eigen::internal::pset1<Packet>(a[i * lda + p * a_step]);
      for (int t = 0; t < T; ++t) sums[i][t] = Eigen::internal::pmadd(broadcast, columns[t], sums[i][t]);
    }
  }
  for (int i = 0; i < M; ++i)
    for (int t = 0; t < T; ++t)
      Eigen::internal::pstoreu(c + i * ldc + t * width,
                               accumulate ? Eigen::internal::padd(Eigen::internal::ploadu<Packet>(c + i * ldc + t * width), sums[i][t])
                                          : sums[i][t]);
}
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

// c[M, n] += a[M, k] b[k, n] with M <= kMatrixVectorRows (attention weights times values in a
// decoding step; a transposed rounded weight): b is read once for all rows.
template <typename Scalar, int M, typename Load = PlainLoad<Scalar>, typename Element = Scalar>
void few_rows_times(Index n, Index k, const Scalar* a, Index lda, const Element* b, Index ldb, Scalar* c, Index ldc) {
  constexpr Index width = Eigen::internal::packet_traits<Scalar>::size;
  constexpr int tile = width >= 16 ? 4 : 2;  // accumulators that fit the register file with M = 4
  Index j = 0;
  for (; j + tile * width <= n; j += tile * width)
    axpy_tile<Scalar, M, tile, Load>(k, a, lda, 1, b + j, ldb, c + j, ldc);
  for (; j + width <= n; j += width) axpy_tile<Scalar, M, 1, Load>(k, a, lda, 1, b + j, ldb, c + j, ldc);
  for (; j < n; ++j)
    for (int i = 0; i < M; ++i) {
      Scalar sum = 0;
      for (Index p = 0; p < k; ++p) sum += a[i * lda + p] * Load::scalar(b[p * ldb + j]);
      c[i * ldc + j] += sum;
    }
}

// c[M, n] += a[M, k] b[n, k]^T with M <= kMatrixVectorRows: a decoding step's product with a
// weight, which streams the weight once (a matrix product would pack all of it first).
template <typename Scalar, int M>
void few_rows_times_transposed(Index n, Index k, const Scalar* a, Index lda, const Scalar* b, Index ldb, Scalar* c,
                               Index ldc) {
  constexpr Index block = 4;  // rows of b in flight: enough loads to hide latency, few registers
  Index j = 0;
  for (; j + block <= n; j += block) dot_block<Scalar, M, block>(k, a, lda, b + j * ldb, ldb, c + j, ldc);
  for (; j < n; ++j) dot_block<Scalar, M, 1>(k, a, lda, b + j * ldb, ldb, c + j, ldc);
}

// c[m, n] += a[m, k] b[n, k]^T for n below a packet of columns (a router's logits over E = 8
// experts): blocks of 4 x 4 dot products, each streaming its rows of a and b once, where Eigen's
// GEMM packs both operands for a kernel whose columns are mostly empty.
template <typename Scalar>
void narrow_times_transposed(Index m, Index n, Index k, const Scalar* a, Index lda, const Scalar* b, Index ldb,
                             Scalar* c, Index ldc) {
  constexpr int rows = 4, columns = 4;
  Index i = 0;
  for (; i + rows <= m; i += rows) {
    Index j = 0;
    for (; j + columns <= n; j += columns)
      dot_block<Scalar, rows, columns>(k, a + i * lda, lda, b + j * ldb, ldb, c + i * ldc + j, ldc);
    for (; j < n; ++j) dot_block<Scalar, rows, 1>(k, a + i * lda, lda, b + j * ldb, ldb, c + i * ldc + j, ldc);
  }
  for (; i < m; ++i) few_rows_times_transposed<Scalar, 1>(n, k, a + i * lda, lda, b, ldb, c + i * ldc, ldc);
}

// Products up to this many multiply-adds (float) run in small_product below: attention within
// short sequences (the translate trainer's 16 tokens: [64, 16] x [16, 48] per sequence), where
// Eigen's GEMM spends more on packing its operands than on the arithmetic (BM_SmallProduct:
// 1.1-1.6x the Eigen path at those shapes).
constexpr double kSmallKernelMacs = 1 << 17;

// M rows of c[m, n] (+)= op(a) b with b row-major [k, n] (already op(b)) and n whole packets; a's
// element (i, p) at a[i * a_row + p * a_step]. Column tiles of T packets, then single packets.
template <typename Scalar, int M>
void small_product_rows(Index n, Index k, const Scalar* a, Index a_row, Index a_step, const Scalar* b, Index ldb,
                        Scalar* c, Index ldc, bool accumulate) {
  constexpr Index width = Eigen::internal::packet_traits<Scalar>::size;
  constexpr int tile = width >= 16 ? 4 : 2;  // M * tile accumulators fit the register file
  Index j = 0;
  for (; j + tile * width <= n; j += tile * width)
    axpy_tile<Scalar, M, tile, PlainLoad<Scalar>>(k, a, a_row, a_step, b + j, ldb, c + j, ldc, accumulate);
  for (; j < n; j += width)
    axpy_tile<Scalar, M, 1, PlainLoad<Scalar>>(k, a, a_row, a_step, b + j, ldb, c + j, ldc, accumulate);
}

// Whether small_product takes a product: few multiply-adds, and every column in whole packets.
template <typename Scalar>
bool small_product_fits(Index m, Index n, Index k) {
  constexpr Index width = Eigen::internal::packet_traits<Scalar>::size;
  return std::is_same_v<Scalar, float> && n % width == 0 &&
         static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k) < kSmallKernelMacs;
}

template <typename Scalar, int block>
void small_product_blocks(Index m, Index n, Index k, const Scalar* a, Index a_row, Index a_step, const Scalar* b,
                          Index ldb, Scalar* c, Index ldc, bool accumulate) {
  Index i = 0;
  for (; i + block <= m; i += block)
    small_product_rows<Scalar, block>(n, k, a + i * a_row, a_row, a_step, b, ldb, c + i * ldc, ldc, accumulate);
  for (; i < m; ++i)
    small_product_rows<Scalar, 1>(n, k, a + i * a_row, a_row, a_step, b, ldb, c + i * ldc, ldc, accumulate);
}

// target [k, n] (row-major) = b^T for b [n, k] (rows ldb apart). float blocks of a packet's width
// square are transposed in registers, the edges element by element: attention's scores Q K^T take
// K^T so, and copying its elements one by one took longer than the product (MHA's heads of 32 in
// 16-token sequences: 16 x 16 x 32).
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"  // see reduce_packets
#endif
template <typename Scalar>
void transpose_into(Index n, Index k, const Scalar* b, Index ldb, Scalar* target) {
  using Packet = typename Eigen::internal::packet_traits<Scalar>::type;
  constexpr int width = Eigen::internal::packet_traits<Scalar>::size;
  Index blocked_n = 0, blocked_k = 0;
  if constexpr (std::is_same_v<Scalar, float> && width > 1) {
    blocked_n = n / width * width;
    blocked_k = k / width * width;
    for (Index j = 0; j < blocked_n; j += width)
      for (Index p = 0; p < blocked_k; p += width) {
        Eigen::internal::PacketBlock<Packet, width> block;
        for (int r = 0; r < width; ++r) block.packet[r] = Eigen::internal::ploadu<Packet>(b + (j + r) * ldb + p);
        Eigen::internal::ptranspose(block);
        for (int r = 0; r < width; ++r) Eigen::internal::pstoreu(target + (p + r) * n + j, block.packet[r]);
      }
  }
  for (Index p = 0; p < k; ++p)
    for (Index j = p < blocked_k ? blocked_n : 0; j < n; ++j) target[p * n + j] = b[j * ldb + p];
}
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

// c[m, n] (+)= op(a) op(b) for a small product (small_product_fits): rows a block at a time against
// op(b) held row-major (a transposed b is first copied so), each element summed over k in order.
template <typename Scalar>
void small_product(Transpose transpose_a, Transpose transpose_b, Index m, Index n, Index k, const Scalar* a,
                   Index lda, const Scalar* b, Index ldb, Scalar* c, Index ldc, bool accumulate) {
  thread_local std::vector<Scalar> transposed;  // [k, n] op(b) when b is transposed
  if (transpose_b == Transpose::yes) {
    transposed.resize(static_cast<std::size_t>(k * n));
    transpose_into(n, k, b, ldb, transposed.data());
    b = transposed.data();
    ldb = n;
  }
  // op(a)'s element (i, p): a[i * lda + p] as given, a[p * lda + i] transposed.
  const Index a_row = transpose_a == Transpose::no ? lda : 1, a_step = transpose_a == Transpose::no ? 1 : lda;
  // A single packet of columns needs eight rows of accumulators to hide the multiply-add latency.
  if (n == Eigen::internal::packet_traits<Scalar>::size)
    small_product_blocks<Scalar, 8>(m, n, k, a, a_row, a_step, b, ldb, c, ldc, accumulate);
  else
    small_product_blocks<Scalar, 4>(m, n, k, a, a_row, a_step, b, ldb, c, ldc, accumulate);
}

// Eigen parallelizes a matrix product with OpenMP when the program is compiled with -fopenmp, on
// omp_get_max_threads() threads. moa's threads are the Compute's, so a product here runs on the
// calling thread alone: else every thread of moa's pool started an OpenMP team of its own (a
// translate training step on 2 threads, [64, 24] batches, took 1.5 s instead of 65 ms).
class OneOpenMPThread {
#if defined(_OPENMP)
 public:
  OneOpenMPThread() {
    if (previous_ != 1) omp_set_num_threads(1);
  }
  ~OneOpenMPThread() {
    if (previous_ != 1) omp_set_num_threads(previous_);
  }
  OneOpenMPThread(const OneOpenMPThread&) = delete;
  OneOpenMPThread& operator=(const OneOpenMPThread&) = delete;

 private:
  int previous_ = omp_get_max_threads();
#endif
};

// The product with Eigen on raw row-major storage.
template <typename Scalar>
void eigen_gemm(Transpose transpose_a, Transpose transpose_b, Index m, Index n, Index k, const Scalar* a, Index lda,
                const Scalar* b, Index ldb, Scalar* c, Index ldc, bool accumulate) {
  const Index a_rows = transpose_a == Transpose::no ? m : k, a_cols = transpose_a == Transpose::no ? k : m;
  const Index b_rows = transpose_b == Transpose::no ? k : n, b_cols = transpose_b == Transpose::no ? n : k;
  const ConstStridedMap<Scalar> a_map(a, a_rows, a_cols, Eigen::OuterStride<>(lda));
  const ConstStridedMap<Scalar> b_map(b, b_rows, b_cols, Eigen::OuterStride<>(ldb));
  StridedMap<Scalar> c_map(c, m, n, Eigen::OuterStride<>(ldc));
  // float only: double (the gradient checks' arithmetic) keeps Eigen's own order of summation.
  constexpr bool few_rows_kernels = std::is_same_v<Scalar, float>;
  // A product one 256-bit packet wide (AVX2: a router's logits over E = 8 experts) runs in
  // small_product at any size: Eigen's GEMM packs both operands for 8 columns (measured on a Zen 3
  // core, [1024, 256] x [256, 8]: 173 us against 81; [1536, 128] x [128, 8]: 127 against 63).
  using Packet = typename Eigen::internal::packet_traits<Scalar>::type;
  const bool one_avx_packet = sizeof(Packet) == 32 && n == Eigen::internal::packet_traits<Scalar>::size;
  if (few_rows_kernels && k > 0 && m > kMatrixVectorRows && (one_avx_packet || small_product_fits<Scalar>(m, n, k))) {
    small_product(transpose_a, transpose_b, m, n, k, a, lda, b, ldb, c, ldc, accumulate);
    return;
  }
  if (!accumulate) c_map.setZero();
  if (k == 0) return;
  if (few_rows_kernels && m > kMatrixVectorRows && n < Eigen::internal::packet_traits<Scalar>::size &&
      transpose_a == Transpose::no && transpose_b == Transpose::yes) {
    narrow_times_transposed<Scalar>(m, n, k, a, lda, b, ldb, c, ldc);
    return;
  }
  if (few_rows_kernels && m >= 1 && m <= kMatrixVectorRows && transpose_a == Transpose::no &&
      transpose_b == Transpose::yes) {
    switch (m) {  // x W^T with a weight W [n, k]: the layers' case
      case 1: few_rows_times_transposed<Scalar, 1>(n, k, a, lda, b, ldb, c, ldc); return;
      case 2: few_rows_times_transposed<Scalar, 2>(n, k, a, lda, b, ldb, c, ldc); return;
      case 3: few_rows_times_transposed<Scalar, 3>(n, k, a, lda, b, ldb, c, ldc); return;
      default: few_rows_times_transposed<Scalar, 4>(n, k, a, lda, b, ldb, c, ldc); return;
    }
  }
  if (few_rows_kernels && m >= 1 && m <= kMatrixVectorRows && transpose_a == Transpose::no &&
      transpose_b == Transpose::no) {
    switch (m) {  // p V in attention
      case 1: few_rows_times<Scalar, 1>(n, k, a, lda, b, ldb, c, ldc); return;
      case 2: few_rows_times<Scalar, 2>(n, k, a, lda, b, ldb, c, ldc); return;
      case 3: few_rows_times<Scalar, 3>(n, k, a, lda, b, ldb, c, ldc); return;
      default: few_rows_times<Scalar, 4>(n, k, a, lda, b, ldb, c, ldc); return;
    }
  }
  if (m <= kMatrixVectorRows) {
    // A few rows otherwise: row-vector times matrix, which streams op(B) once per row instead of
    // packing all of it as a matrix product does.
    for (Index i = 0; i < m; ++i) {
      if (transpose_a == Transpose::no) {
        if (transpose_b == Transpose::no) c_map.row(i).noalias() += a_map.row(i) * b_map;
        else c_map.row(i).noalias() += a_map.row(i) * b_map.transpose();
      } else {
        if (transpose_b == Transpose::no) c_map.row(i).noalias() += a_map.col(i).transpose() * b_map;
        else c_map.row(i).noalias() += a_map.col(i).transpose() * b_map.transpose();
      }
    }
    return;
  }
  [[maybe_unused]] const OneOpenMPThread one_thread;
  if (transpose_a == Transpose::no) {
    if (transpose_b == Transpose::no) c_map.noalias() += a_map * b_map;
    else c_map.noalias() += a_map * b_map.transpose();
  } else {
    if (transpose_b == Transpose::no) c_map.noalias() += a_map.transpose() * b_map;
    else c_map.noalias() += a_map.transpose() * b_map.transpose();
  }
}

}  // namespace detail

class EigenGemm final : public GemmBackend {
 public:
  std::string name() const override { return "eigen"; }
  void sgemm(const GemmCall& call) const override {
    MOA_CHECK(call.a_bf16 == nullptr, "EigenGemm::sgemm", "A is given rounded to bfloat16, which this backend does not "
              "multiply (has_bf16() is false)");
    detail::eigen_gemm<float>(call.transpose_a, call.transpose_b, call.m, call.n, call.k, call.a, call.lda, call.b,
                              call.ldb, call.c, call.ldc, call.accumulate);
  }
};

class Compute {
 public:
  // Eigen, one thread, f32.
  Compute() : Compute(std::make_shared<EigenGemm>()) {}
  // threads: how many threads one model uses (>= 1); precision: what evaluation-mode forwards may
  // use (bf16 needs a backend with has_bf16(); training always runs f32).
  explicit Compute(std::shared_ptr<const GemmBackend> backend, int threads = 1, Precision precision = Precision::f32)
      : backend_(std::move(backend)), pool_(std::make_unique<ThreadPool>(threads)), precision_(precision) {
    MOA_CHECK(backend_ != nullptr, "Compute", "backend is null");
    MOA_CHECK(precision != Precision::bf16 || backend_->has_bf16(), "Compute", "precision bf16 needs a backend with ",
              "native bfloat16 products (oneDNN on a CPU with AVX512-BF16 or AMX); backend '", backend_->name(),
              "' has none on this CPU");
    if (threads > 1) serial_.reset(new Compute(backend_, 1, precision_, panels_));
  }

  // The shared default: Eigen, one thread, f32.
  static const std::shared_ptr<const Compute>& standard() {
    static const std::shared_ptr<const Compute> instance = std::make_shared<const Compute>();
    return instance;
  }

  const GemmBackend& backend() const { return *backend_; }
  ThreadPool& pool() const { return *pool_; }
  int threads() const { return pool_->size(); }
  Precision inference_precision() const { return precision_; }
  // The same backend and precision on one thread: for the work inside one part of a parallel
  // loop, which would otherwise split its products into parts run one after another (a pool
  // already running runs nested loops inline, split as on all threads).
  const Compute& serial() const { return serial_ ? *serial_ : *this; }
  // The weights packed for moa's row kernel (moa/row_kernel.hpp), shared with serial().
  const detail::PanelStore& panels() const { return *panels_; }

 private:
  Compute(std::shared_ptr<const GemmBackend> backend, int threads, Precision precision,
          std::shared_ptr<detail::PanelStore> panels)
      : backend_(std::move(backend)), pool_(std::make_unique<ThreadPool>(threads)), precision_(precision),
        panels_(std::move(panels)) {}

  std::shared_ptr<const GemmBackend> backend_;
  std::unique_ptr<ThreadPool> pool_;
  Precision precision_;
  std::shared_ptr<detail::PanelStore> panels_ = std::make_shared<detail::PanelStore>();
  std::unique_ptr<Compute> serial_;  // one thread, when threads > 1
};

using ComputePtr = std::shared_ptr<const Compute>;

namespace detail {

// A layer's set_compute argument, refused when null (the layer would fail at its next product).
inline ComputePtr checked_compute(ComputePtr compute, const char* function) {
  MOA_CHECK(compute != nullptr, function, "compute is null");
  return compute;
}

}  // namespace detail

// Whether a product may use bf16: only evaluation-mode forwards, and only when asked for.
inline Precision product_precision(const Compute& compute, bool training) {
  return training ? Precision::f32 : compute.inference_precision();
}

namespace detail {

// Work below this many flops (about 10 us) is not worth waking other threads for.
constexpr double kParallelGemmFlops = 1 << 21;
// Split boundaries are multiples of this many rows or columns (a kernel's register tile).
constexpr Index kGemmSplitQuantum = 16;

inline void parallel_sgemm(const Compute& compute, GemmCall call) {
  const int threads = compute.threads();
  const double flops = 2.0 * static_cast<double>(call.m) * static_cast<double>(call.n) * static_cast<double>(call.k);
  const bool split_rows = call.m >= 2 * kGemmSplitQuantum && call.m >= call.n / 2;
  const Index extent = split_rows ? call.m : call.n;
  if (threads == 1 || flops < kParallelGemmFlops || extent < 2 * kGemmSplitQuantum) {
    compute.backend().sgemm(call);
    return;
  }
  const Index parts = std::min<Index>(threads, extent / kGemmSplitQuantum);
  const Index quanta = (extent + kGemmSplitQuantum - 1) / kGemmSplitQuantum;
  compute.pool().run(parts, [&](Index part, int) {
    const Index first = std::min(extent, quanta * part / parts * kGemmSplitQuantum);
    const Index last = std::min(extent, quanta * (part + 1) / parts * kGemmSplitQuantum);
    if (first == last) return;
    GemmCall piece = call;
    if (split_rows) {  // rows of C: rows of A (or its columns when transposed)
      piece.m = last - first;
      const Index a_offset = call.transpose_a == Transpose::no ? first * call.lda : first;
      if (call.a_bf16 != nullptr) piece.a_bf16 = call.a_bf16 + a_offset;
      else piece.a = call.a + a_offset;
      piece.c = call.c + first * call.ldc;
    } else {  // columns of C: columns of B (or its rows when transposed)
      piece.n = last - first;
      piece.b = call.b + (call.transpose_b == Transpose::no ? first : first * call.ldb);
      piece.c = call.c + first;
    }
    compute.backend().sgemm(piece);
  });
}

}  // namespace detail

template <typename Scalar>
using MatrixRef = Eigen::Ref<Matrix<Scalar>, 0, Eigen::OuterStride<>>;
template <typename Scalar>
using ConstMatrixRef = Eigen::Ref<const Matrix<Scalar>, 0, Eigen::OuterStride<>>;

// c = op(a) op(b), or c += op(a) op(b) with accumulate. c must already have its shape. float goes
// to the compute's backend, split over its threads; double to Eigen.
template <typename Scalar>
void gemm(const Compute& compute, const ConstMatrixRef<Scalar>& a, Transpose transpose_a,
          const ConstMatrixRef<Scalar>& b, Transpose transpose_b, MatrixRef<Scalar> c, bool accumulate = false,
          Precision precision = Precision::f32, std::uint64_t b_version = 0) {
  const Index m = transpose_a == Transpose::no ? a.rows() : a.cols();
  const Index k = transpose_a == Transpose::no ? a.cols() : a.rows();
  const Index b_k = transpose_b == Transpose::no ? b.rows() : b.cols();
  const Index n = transpose_b == Transpose::no ? b.cols() : b.rows();
  MOA_CHECK(k == b_k && c.rows() == m && c.cols() == n, "moa::gemm", "op(a) is [", m, ", ", k, "], op(b) is [", b_k,
            ", ", n, "], c is [", c.rows(), ", ", c.cols(), "]");
  if (m == 0 || n == 0) return;
  if constexpr (std::is_same_v<Scalar, float>) {
    GemmCall call;
    call.transpose_a = transpose_a;
    call.transpose_b = transpose_b;
    call.m = m;
    call.n = n;
    call.k = k;
    call.a = a.data();
    call.lda = a.outerStride();
    call.b = b.data();
    call.ldb = b.outerStride();
    call.c = c.data();
    call.ldc = c.outerStride();
    call.accumulate = accumulate;
    call.precision = precision;
    call.b_version = b_version;
    if (k == 0) {
      if (!accumulate) c.setZero();
      return;
    }
    detail::parallel_sgemm(compute, call);
  } else {
    detail::eigen_gemm<Scalar>(transpose_a, transpose_b, m, n, k, a.data(), a.outerStride(), b.data(),
                               b.outerStride(), c.data(), c.outerStride(), accumulate);
  }
}

namespace detail {
// Whether rows_times_weight serves a product with a layer's weight of n rows: float in f32, and n
// a multiple of 16 on an AVX-512 CPU. Otherwise the caller gathers the rows for an ordinary product.
template <typename Scalar>
bool rows_times_weight_serves(Precision precision, Index n) {
  return std::is_same_v<Scalar, float> && precision == Precision::f32 && row_kernel_serves(n);
}

// A layer's weight W [n, k] packed for the row kernel (rows_times_weight_serves), in floats or
// (pairs: a bf16 product's, pair_row_kernel_serves) bfloat16 pairs: with a version (inference),
// the compute's kept copy of that version, packed once; without (training, whose weights change
// every step), packed now into `scratch`, which the result then points to.
template <typename Scalar>
std::shared_ptr<const PanelWeight> packed_weight(const Compute& compute, const ConstMatrixRef<Scalar>& weight,
                                                 std::uint64_t weight_version, PanelWeight& scratch, bool pairs = false) {
  if constexpr (std::is_same_v<Scalar, float>) {
    if (weight_version != 0)
      return compute.panels().get(weight.data(), weight.rows(), weight.cols(), weight.outerStride(), weight_version,
                                  pairs);
    if (pairs) pack_weight_pairs(weight.data(), weight.rows(), weight.cols(), weight.outerStride(), scratch);
    else pack_weight(weight.data(), weight.rows(), weight.cols(), weight.outerStride(), scratch);
    return std::shared_ptr<const PanelWeight>(std::shared_ptr<const PanelWeight>(), &scratch);
  } else {
    throw Error("moa::detail::packed_weight: the row kernel takes float only");
  }
}

// What to fetch into L2 while a product runs when `next` (a layer's weight W [n, k]) is the weight
// packed_weight gives next: in inference its kept packed copy (packed now if its version is new),
// else W itself, which packing reads. `keep` holds the packed copy while it is fetched.
template <typename Scalar>
Upcoming upcoming_weight(const Compute& compute, const ConstMatrixRef<Scalar>& next, std::uint64_t weight_version,
                         std::shared_ptr<const PanelWeight>& keep, bool pairs = false) {
  if constexpr (std::is_same_v<Scalar, float>) {
    if (weight_version == 0) return Upcoming::of(next.data(), next.rows(), next.cols(), next.outerStride());
    keep = compute.panels().get(next.data(), next.rows(), next.cols(), next.outerStride(), weight_version, pairs);
    if (pairs)
      return {reinterpret_cast<const char*>(keep->pairs.data()), static_cast<Index>(keep->pairs.size()) / 32};
    return Upcoming::of(keep->panels.data(), 1, static_cast<Index>(keep->panels.size()), 0);
  } else {
    return {};
  }
}

// Lists of rows times a packed weight W [n, k], in place: for i < m, row c_rows[i] of c (+)= row
// a_rows[i] of a times W^T (a null list: rows in order), times scales[i] where scales is not null,
// by moa's row kernel, fetching `upcoming` into L2 meanwhile. Only where rows_times_weight_serves;
// the layers check the rows, this cannot.
template <typename Scalar>
void rows_times_weight(const PanelWeight& weight, Index m, const Scalar* a, Index lda, const Index* a_rows, Scalar* c,
                       Index ldc, const Index* c_rows, bool accumulate, const Upcoming& upcoming = {},
                       const Scalar* scales = nullptr) {
  if constexpr (std::is_same_v<Scalar, float>) {
    if (m > 0) row_kernel(m, a, lda, a_rows, PanelView::packed(weight), c, ldc, c_rows, accumulate, upcoming, scales);
  } else {
    throw Error("moa::detail::rows_times_weight: the row kernel takes float only");
  }
}

// The same for a bf16 product (pair_row_kernel_serves(W's n, k)): a's rows rounded to bfloat16
// (lda in numbers), W packed in pairs (packed_weight with pairs), c in float.
inline void rows_times_weight(const PanelWeight& weight, Index m, const std::uint16_t* a, Index lda,
                              const Index* a_rows, float* c, Index ldc, const Index* c_rows, bool accumulate,
                              const Upcoming& upcoming = {}, const float* scales = nullptr) {
  if (m > 0)
    row_kernel(m, a, lda, a_rows, PanelViewOf<std::uint16_t>::packed(weight), c, ldc, c_rows, accumulate, upcoming,
               scales);
}
}  // namespace detail

// The product x W^T of a layer with weight W [out, in]: input [N, in] -> [N, out], a new matrix.
// weight_version: W's version where the backend may keep W repacked (inference), else 0.
template <typename Scalar>
Matrix<Scalar> linear_product(const Compute& compute, const ConstMatrixRef<Scalar>& input,
                              const ConstMatrixRef<Scalar>& weight, Precision precision = Precision::f32,
                              std::uint64_t weight_version = 0) {
  Matrix<Scalar> output(input.rows(), weight.rows());  // [N, out]
  gemm<Scalar>(compute, input, Transpose::no, weight, Transpose::yes, output, false, precision, weight_version);
  return output;
}

// Runs task(part, thread, part_compute) for parts [0, parts) on the compute's threads, or inline
// when the whole job is too small (`work` multiply-adds or so) to repay waking them. part_compute
// is what a part multiplies on: compute.serial() when the parts run in parallel (a part's products
// whole, not cut in pieces run one after another), else compute (whose threads are free).
template <typename Task>
void parallel_parts(const Compute& compute, Index parts, double work, Task&& task) {
  if (compute.threads() == 1 || parts == 1 || work < detail::kParallelGemmFlops) {
    for (Index part = 0; part < parts; ++part) task(part, 0, compute);
    return;
  }
  const Compute& part_compute = compute.serial();
  compute.pool().run(parts, [&](Index part, int thread) { task(part, thread, part_compute); });
}

// Calls task(first, count, thread) over [0, total) in chunks of at least `grain` items, on the
// compute's threads (inline when it has one).
template <typename Task>
void parallel_ranges(const Compute& compute, Index total, Index grain, Task&& task) {
  const Index chunks = std::max<Index>(1, std::min<Index>(compute.threads(), total / std::max<Index>(grain, 1)));
  if (chunks == 1) {
    if (total > 0) task(Index(0), total, 0);
    return;
  }
  compute.pool().run(chunks, [&](Index chunk, int thread) {
    const Index first = total * chunk / chunks, last = total * (chunk + 1) / chunks;
    if (last > first) task(first, last - first, thread);
  });
}

// sums[j] += the sum over the rows of matrix(i, j) (an expression evaluated as read). Each column is
// summed in row order and columns are spread over the compute's threads, so the sums are the same
// for any thread count. sums: a row vector (view) of matrix.cols() entries.
template <typename Expression, typename Sums>
void add_column_sums(const Compute& compute, const Expression& matrix, Sums&& sums) {
  // Below about this many additions a second thread costs more than it saves.
  constexpr double kParallelAdditions = 1 << 16;
  const Index rows = matrix.rows(), cols = matrix.cols();
  MOA_CHECK(sums.size() == cols, "moa::add_column_sums", "sums has ", sums.size(), " entries for a matrix of ", rows,
            " x ", cols);
  const bool parallel = static_cast<double>(rows) * static_cast<double>(cols) >= kParallelAdditions;
  parallel_ranges(compute, cols, parallel ? 16 : cols, [&](Index first, Index count, int) {
    for (Index i = 0; i < rows; ++i) sums.segment(first, count) += matrix.row(i).segment(first, count);
  });
}

namespace detail {

// Rows per thread at least for elementwise work on rows of `cols` entries: about 16k entries (a few
// microseconds), below which waking another thread costs more than it saves.
inline Index elementwise_row_grain(Index cols) { return std::max<Index>(1, (Index(1) << 14) / std::max<Index>(cols, 1)); }

// target = expression, resized to its shape, rows spread over the compute's threads when it is large
// enough to repay waking them: the copies, sums and zeroing between layers would otherwise leave
// the other threads idle. Elementwise, so the values are the same for any thread count.
template <typename Scalar, typename Expression>
void parallel_assign(const Compute& compute, Matrix<Scalar>& target, const Expression& expression) {
  target.resize(expression.rows(), expression.cols());
  parallel_ranges(compute, target.rows(), elementwise_row_grain(target.cols()), [&](Index first, Index count, int) {
    target.middleRows(first, count) = expression.middleRows(first, count);
  });
}

// a + b (a residual connection, a sum of gradients), in b's storage, rows over the compute's threads.
template <typename Scalar>
Matrix<Scalar> parallel_add(const Compute& compute, const Matrix<Scalar>& a, Matrix<Scalar> b) {
  MOA_CHECK(a.rows() == b.rows() && a.cols() == b.cols(), "moa::parallel_add", "a is ", detail::shape_of(a),
            " but b is ", detail::shape_of(b));
  parallel_ranges(compute, b.rows(), elementwise_row_grain(b.cols()), [&](Index first, Index count, int) {
    b.middleRows(first, count) += a.middleRows(first, count);
  });
  return b;
}

}  // namespace detail

}  // namespace moa
