// moa/bfloat16.hpp - weights rounded to bfloat16, for products that are bound by reading them.
//
// A decoding step multiplies a few rows by each weight it touches, so its time is the time to
// stream the weights (MoA's chosen experts: megabytes per step). Rounded to bfloat16 once for a
// whole decoding, a weight is half the bytes. The sums are float. Where the CPU has AVX512-BF16,
// the rows are rounded too and multiplied by its dot products of bfloat16 pairs, one instruction
// for 32 multiply-adds (as oneDNN's bf16 products round a layer's input); elsewhere the rows stay
// float, and the only rounding is the weight's (relative 2^-9).
#pragma once

#include "moa/bfloat16_number.hpp"
#include "moa/error.hpp"
#include "moa/gemm.hpp"
#include "moa/tensor.hpp"

#include <Eigen/Core>

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

namespace moa {

// A layer's weight W [out, in] rounded to bfloat16 for products x W^T with few rows x. Its rows
// are cut into blocks of block_rows (MoA: one expert's projection each; one block for a dense
// layer), and each block is stored transposed with pairs of inputs interleaved,
// [ceil(in / 2), block_rows, 2] (element (l, j) at ((l / 2) * block_rows + j) * 2 + l % 2; an odd
// in is padded with a zero input): a product streams it pair row by pair row into accumulators (no
// horizontal sums), and each 32-bit lane holds the two numbers that one AVX512-BF16 dot product
// takes.
class BFloat16Weight {
 public:
  BFloat16Weight() = default;
  BFloat16Weight(const ConstMatrixRef<float>& weight, Index block_rows)
      : blocks_(block_rows > 0 ? weight.rows() / block_rows : 0), block_rows_(block_rows), in_(weight.cols()) {
    MOA_CHECK(block_rows > 0 && weight.rows() % block_rows == 0, "BFloat16Weight", "the weight's ", weight.rows(),
              " rows do not split into blocks of ", block_rows);
    data_.assign(static_cast<std::size_t>(blocks_ * block_size()), 0);
    for (Index block = 0; block < blocks_; ++block)
      for (Index r = 0; r < block_rows_; ++r)
        for (Index c = 0; c < in_; ++c)
          data_[static_cast<std::size_t>(block * block_size() + ((c / 2) * block_rows_ + r) * 2 + c % 2)] =
              round_to_bfloat16(weight(block * block_rows_ + r, c));
  }

  Index blocks() const { return blocks_; }
  Index block_rows() const { return block_rows_; }
  Index in_features() const { return in_; }
  // Block b transposed with pairs of inputs interleaved: [ceil(in / 2), block_rows, 2].
  const std::uint16_t* block(Index b) const { return data_.data() + b * block_size(); }

 private:
  Index block_size() const { return (in_ + 1) / 2 * block_rows_ * 2; }

  Index blocks_ = 0, block_rows_ = 0, in_ = 0;
  std::vector<std::uint16_t> data_;  // [blocks, ceil(in / 2), block_rows, 2]
};

// True where the build's vector unit widens bfloat16 in registers (AVX2, AVX-512): only there do
// rounded weights beat float ones.
constexpr bool kFastBFloat16 =
#if defined(__AVX512F__) || defined(__AVX2__)
    true;
#else
    false;
#endif

namespace detail {

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"  // see dot_block in moa/gemm.hpp
#endif
// A packet of floats from as many bfloat16 numbers.
template <typename Packet, Index width>
Packet load_bfloat16(const std::uint16_t* source) {
  // Widening each 16-bit number into the upper half of a 32-bit lane is two instructions where
  // the vector unit has integer shifts; elsewhere the lanes go through memory.
#if defined(__AVX512F__)
  if constexpr (width == 16)
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(source))), 16));
#endif
#if defined(__AVX2__)
  if constexpr (width == 8)
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(source))), 16));
#endif
  alignas(64) float expanded[width];
  for (Index lane = 0; lane < width; ++lane) expanded[lane] = bfloat16_to_float(source[lane]);
  return Eigen::internal::pload<Packet>(expanded);
}

// Reads a transposed rounded weight for few_rows_times (moa/gemm.hpp).
struct BFloat16Load {
  template <typename Packet>
  static Packet packet(const std::uint16_t* source) {
    return load_bfloat16<Packet, Eigen::internal::packet_traits<float>::size>(source);
  }
  static float scalar(std::uint16_t value) { return bfloat16_to_float(value); }
};
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

}  // namespace detail

namespace detail {

// c[m, n] += a[m, k] b with b [k, n] bfloat16 (row stride ldb): rows times a rounded weight block
// or rounded keys (transposed) and values. Streams b once per 4 rows of a: for few rows (decoding).
inline void few_rows_times_bfloat16(Index m, Index n, Index k, const float* a, Index lda, const std::uint16_t* b,
                                    Index ldb, float* c, Index ldc) {
  for (Index i = 0; i < m; i += 4) {
    const float* rows = a + i * lda;
    float* out = c + i * ldc;
    switch (std::min<Index>(4, m - i)) {
      case 1: few_rows_times<float, 1, BFloat16Load>(n, k, rows, lda, b, ldb, out, ldc); break;
      case 2: few_rows_times<float, 2, BFloat16Load>(n, k, rows, lda, b, ldb, out, ldc); break;
      case 3: few_rows_times<float, 3, BFloat16Load>(n, k, rows, lda, b, ldb, out, ldc); break;
      default: few_rows_times<float, 4, BFloat16Load>(n, k, rows, lda, b, ldb, out, ldc); break;
    }
  }
}


}  // namespace detail

// A matrix rounded to bfloat16 (a decoding cache's keys or values): rows x cols, row stride
// `stride`.
struct BFloat16Rows {
  const std::uint16_t* data = nullptr;
  Index rows = 0, cols = 0, stride = 0;
  BFloat16Rows middle_rows(Index first, Index count) const {
    check_range(first, count, rows, "moa::BFloat16Rows::middle_rows");
    return {data + first * stride, count, cols, stride};
  }
  BFloat16Rows middle_cols(Index first, Index count) const {
    check_range(first, count, cols, "moa::BFloat16Rows::middle_cols");
    return {data + first, rows, count, stride};
  }

 private:
  static void check_range(Index first, Index count, Index extent, const char* function) {
    MOA_CHECK(first >= 0 && count >= 0 && first + count <= extent, function, "[", first, ", ", first + count,
              ") is outside [0, ", extent, ")");
  }
};

namespace detail {

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"  // see dot_block in moa/gemm.hpp
#endif
// target[i] = round_to_bfloat16(source[i]) for `count` values, in SIMD where the build has it (the
// scalar loop is vectorised by -O3 only, and rounding a layer's input is on its hot path).
inline void round_to_bfloat16(const float* source, Index count, std::uint16_t* target) {
  Index i = 0;
#if defined(__AVX512F__)
  const __m512i half = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
  for (; i + 16 <= count; i += 16) {
    const __m512i bits = _mm512_loadu_si512(source + i);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), one);  // ties to even
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(half, odd)), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(target + i), _mm512_cvtepi32_epi16(rounded));
  }
#elif defined(__AVX2__)
  const __m256i half = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1);
  const auto round8 = [&](const float* from) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(from));
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), one);
    return _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(half, odd)), 16);
  };
  for (; i + 16 <= count; i += 16) {
    // packus works within 128-bit lanes: put the lanes back in order after it.
    const __m256i packed = _mm256_packus_epi32(round8(source + i), round8(source + i + 8));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(target + i), _mm256_permute4x64_epi64(packed, 0xD8));
  }
#endif
  for (; i < count; ++i) target[i] = moa::round_to_bfloat16(source[i]);
}
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"  // see dot_block in moa/gemm.hpp
#endif
// `width` interleaved pairs of a rounded weight as two packets of floats: the pairs' first numbers
// (input 2p of each column), then their second (input 2p + 1). Only a shift and a mask apart.
template <typename Packet, Index width>
void load_bfloat16_pairs(const std::uint16_t* source, Packet& first, Packet& second) {
#if defined(__AVX512F__)
  if constexpr (width == 16) {
    const __m512i pairs = _mm512_loadu_si512(source);
    first = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
    second = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
    return;
  }
#endif
#if defined(__AVX2__)
  if constexpr (width == 8) {
    const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(source));
    first = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
    second = _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
    return;
  }
#endif
  alignas(64) float expanded[2][width];
  for (Index lane = 0; lane < width; ++lane)
    for (int half = 0; half < 2; ++half) expanded[half][lane] = bfloat16_to_float(source[2 * lane + half]);
  first = Eigen::internal::pload<Packet>(expanded[0]);
  second = Eigen::internal::pload<Packet>(expanded[1]);
}

// c[M, T*width] += a[M, k] b for T packets of columns of a rounded weight's block (pair rows of
// stride ldb), the rows of a in float: the weight's is the only rounding.
template <int M, int T>
void pair_rows_tile(Index k, const float* a, Index lda, const std::uint16_t* b, Index ldb, float* c, Index ldc) {
  using Packet = Eigen::internal::packet_traits<float>::type;
  constexpr Index width = Eigen::internal::packet_traits<float>::size;
  Packet sums[M][T];
  for (int i = 0; i < M; ++i)
    for (int t = 0; t < T; ++t) sums[i][t] = Eigen::internal::pset1<Packet>(0.0f);
  for (Index p = 0; 2 * p < k; ++p) {
    Packet first[T], second[T];
    for (int t = 0; t < T; ++t) load_bfloat16_pairs<Packet, width>(b + p * ldb + 2 * width * t, first[t], second[t]);
    for (int i = 0; i < M; ++i) {
      const Packet x0 = Eigen::internal::pset1<Packet>(a[i * lda + 2 * p]);
      const Packet x1 = Eigen::internal::pset1<Packet>(2 * p + 1 < k ? a[i * lda + 2 * p + 1] : 0.0f);
      for (int t = 0; t < T; ++t)
        sums[i][t] = Eigen::internal::pmadd(x1, second[t], Eigen::internal::pmadd(x0, first[t], sums[i][t]));
    }
  }
  for (int i = 0; i < M; ++i)
    for (int t = 0; t < T; ++t)
      Eigen::internal::pstoreu(c + i * ldc + t * width,
                               Eigen::internal::padd(Eigen::internal::ploadu<Packet>(c + i * ldc + t * width), sums[i][t]));
}

#if MOA_ROW_KERNEL_X86
// The same with AVX512-BF16 dot products, for rows of a already rounded to bfloat16 (pairs of
// inputs, row stride lda in bfloat16 numbers): one instruction takes a pair row of 16 columns, 32
// multiply-adds, where widening the weight to floats takes three instructions for 16.
template <int M, int T>
__attribute__((target("avx512f,avx512bf16"))) inline void dot_pairs_tile(Index pairs, const std::uint16_t* a, Index lda,
                                                                          const std::uint16_t* b, Index ldb, float* c,
                                                                          Index ldc) {
  __m512 sums[M][T];
  MOA_UNROLL for (int i = 0; i < M; ++i) MOA_UNROLL for (int t = 0; t < T; ++t) sums[i][t] = _mm512_setzero_ps();
  for (Index p = 0; p < pairs; ++p) {
    __m512bh weights[T];
    MOA_UNROLL for (int t = 0; t < T; ++t) weights[t] = (__m512bh)_mm512_loadu_si512(b + p * ldb + 32 * t);
    MOA_UNROLL for (int i = 0; i < M; ++i) {
      std::uint32_t pair;
      std::memcpy(&pair, a + i * lda + 2 * p, sizeof pair);
      const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      MOA_UNROLL for (int t = 0; t < T; ++t) sums[i][t] = _mm512_dpbf16_ps(sums[i][t], weights[t], x);
    }
  }
  MOA_UNROLL for (int i = 0; i < M; ++i) MOA_UNROLL for (int t = 0; t < T; ++t)
    _mm512_storeu_ps(c + i * ldc + 16 * t, _mm512_add_ps(_mm512_loadu_ps(c + i * ldc + 16 * t), sums[i][t]));
}
#endif
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

// c[M, n] += a[M, k] b for b a rounded weight's block [ceil(k / 2), n, 2] (see BFloat16Weight),
// streamed once. With dot_products (the CPU has AVX512-BF16), the rows are rounded to bfloat16
// too, in chunks of kDotChunk inputs, and the products are its dot products.
template <int M>
void pair_rows_times(Index n, Index k, const float* a, Index lda, const std::uint16_t* b, float* c, Index ldc,
                     bool dot_products) {
  const Index ldb = 2 * n;
  // Columns no packet covers: one sum at a time over the rows as the tiles read them.
  const auto remaining_columns = [&](Index from, Index k_first, Index k_count, const auto& value) {
    for (Index i = 0; i < M; ++i)
      for (Index j = from; j < n; ++j) {
        float sum = 0;
        for (Index l = k_first; l < k_first + k_count; ++l)
          sum += value(i, l) * bfloat16_to_float(b[((l / 2) * n + j) * 2 + l % 2]);
        c[i * ldc + j] += sum;
      }
  };
#if MOA_ROW_KERNEL_X86
  if (dot_products) {
    constexpr Index kDotChunk = 512;
    std::uint16_t rounded[M][kDotChunk];  // [M, chunk]: a's rows, an odd chunk's last pair padded with 0
    for (Index k_first = 0; k_first < k; k_first += kDotChunk) {
      const Index count = std::min(kDotChunk, k - k_first), pairs = (count + 1) / 2;
      for (int i = 0; i < M; ++i) {
        round_to_bfloat16(a + i * lda + k_first, count, rounded[i]);
        if (count % 2 != 0) rounded[i][count] = 0;  // kDotChunk is even: count is below it
      }
      const std::uint16_t* block = b + (k_first / 2) * ldb;
      Index j = 0;
      for (; j + 64 <= n; j += 64) dot_pairs_tile<M, 4>(pairs, rounded[0], kDotChunk, block + 2 * j, ldb, c + j, ldc);
      for (; j + 16 <= n; j += 16) dot_pairs_tile<M, 1>(pairs, rounded[0], kDotChunk, block + 2 * j, ldb, c + j, ldc);
      remaining_columns(j, k_first, count,
                        [&](Index i, Index l) { return bfloat16_to_float(rounded[i][l - k_first]); });
    }
    return;
  }
#else
  static_cast<void>(dot_products);
#endif
  constexpr Index width = Eigen::internal::packet_traits<float>::size;
  constexpr int tile = width >= 16 ? 4 : 2;  // accumulators that fit the register file with M = 4
  Index j = 0;
  for (; j + tile * width <= n; j += tile * width) pair_rows_tile<M, tile>(k, a, lda, b + 2 * j, ldb, c + j, ldc);
  for (; j + width <= n; j += width) pair_rows_tile<M, 1>(k, a, lda, b + 2 * j, ldb, c + j, ldc);
  remaining_columns(j, 0, k, [&](Index i, Index l) { return a[i * lda + l]; });
}

// c[m, n] += a[m, k] b for b a rounded weight's block: the rows of a four at a time. dot_products
// only where bfloat16_dot_products_available().
inline void few_rows_times_bfloat16_pairs(Index m, Index n, Index k, const float* a, Index lda, const std::uint16_t* b,
                                          float* c, Index ldc, bool dot_products) {
  for (Index i = 0; i < m; i += 4) {
    const float* rows = a + i * lda;
    float* out = c + i * ldc;
    switch (std::min<Index>(4, m - i)) {
      case 1: pair_rows_times<1>(n, k, rows, lda, b, out, ldc, dot_products); break;
      case 2: pair_rows_times<2>(n, k, rows, lda, b, out, ldc, dot_products); break;
      case 3: pair_rows_times<3>(n, k, rows, lda, b, out, ldc, dot_products); break;
      default: pair_rows_times<4>(n, k, rows, lda, b, out, ldc, dot_products); break;
    }
  }
}

}  // namespace detail

// A float matrix's values rounded to bfloat16, row-major and contiguous: the A operand of bf16
// products that would otherwise each round it again (a layer's input, read by its key, value and
// every expert's query projection). Storage is reused by the next assign.
class BFloat16Matrix {
 public:
  // Rounds source, rows spread over the compute's threads.
  void assign(const Compute& compute, const ConstMatrixRef<float>& source) {
    rows_ = source.rows();
    cols_ = source.cols();
    data_.resize(static_cast<std::size_t>(rows_ * cols_));
    parallel_ranges(compute, rows_, detail::elementwise_row_grain(cols_), [&](Index first, Index count, int) {
      for (Index r = first; r < first + count; ++r)
        detail::round_to_bfloat16(source.data() + r * source.outerStride(), cols_, data_.data() + r * cols_);
    });
  }
  Index rows() const { return rows_; }
  Index cols() const { return cols_; }
  const std::uint16_t* row(Index r) const { return data_.data() + r * cols_; }
  BFloat16Rows view() const { return {data_.data(), rows_, cols_, cols_}; }

 private:
  Index rows_ = 0, cols_ = 0;
  std::vector<std::uint16_t> data_;  // [rows, cols]
};

// c = a op(b), or c += a op(b) with accumulate, for a already rounded to bfloat16: a bf16 product
// on the compute's backend (which must have bf16), split over its threads like gemm().
inline void gemm_bfloat16_input(const Compute& compute, const BFloat16Rows& a, const ConstMatrixRef<float>& b,
                                Transpose transpose_b, MatrixRef<float> c, bool accumulate = false,
                                std::uint64_t b_version = 0) {
  const Index b_k = transpose_b == Transpose::no ? b.rows() : b.cols();
  const Index n = transpose_b == Transpose::no ? b.cols() : b.rows();
  MOA_CHECK(a.cols == b_k && c.rows() == a.rows && c.cols() == n, "moa::gemm_bfloat16_input", "a is [", a.rows, ", ",
            a.cols, "], op(b) is [", b_k, ", ", n, "], c is [", c.rows(), ", ", c.cols(), "]");
  MOA_CHECK(compute.backend().has_bf16(), "moa::gemm_bfloat16_input", "the backend '", compute.backend().name(),
            "' has no bf16 products");
  if (a.rows == 0 || n == 0) return;
  if (a.cols == 0) {
    if (!accumulate) c.setZero();
    return;
  }
  GemmCall call;
  call.transpose_b = transpose_b;
  call.m = a.rows;
  call.n = n;
  call.k = a.cols;
  call.a_bf16 = a.data;
  call.lda = a.stride;
  call.b = b.data();
  call.ldb = b.outerStride();
  call.c = c.data();
  call.ldc = c.outerStride();
  call.accumulate = accumulate;
  call.precision = Precision::bf16;
  call.b_version = b_version;
  detail::parallel_sgemm(compute, call);
}

// A layer input that several products x W^T read (its key, value and query projections): with
// bf16 products it is rounded to bfloat16 once, here, and every product reads that copy; otherwise
// they read the input as it is. storage: the rounded copy's buffer, kept by the caller for reuse.
template <typename Scalar>
class ProductInput {
 public:
  ProductInput(const Compute& compute, const Matrix<Scalar>& input, Precision precision, BFloat16Matrix& storage)
      : compute_(&compute), input_(&input), precision_(precision) {
    if constexpr (std::is_same_v<Scalar, float>) {
      if (precision == Precision::bf16) {
        storage.assign(compute, input);
        rounded_ = &storage;
      }
    }
  }

  // input W^T for a weight W [out, in] with its version (0: unknown), a new matrix [N, out].
  Matrix<Scalar> times(const ConstMatrixRef<Scalar>& weight, std::uint64_t weight_version) const {
    if constexpr (std::is_same_v<Scalar, float>) {
      if (rounded_ != nullptr) {
        Matrix<float> output(input_->rows(), weight.rows());  // [N, out]
        gemm_bfloat16_input(*compute_, rounded_->view(), weight, Transpose::yes, output, false, weight_version);
        return output;
      }
    }
    return linear_product<Scalar>(*compute_, *input_, weight, precision_, weight_version);
  }
  // The rounded copy, or null when the products are not bf16.
  const BFloat16Matrix* rounded() const { return rounded_; }

 private:
  const Compute* compute_;
  const Matrix<Scalar>* input_;
  Precision precision_;
  const BFloat16Matrix* rounded_ = nullptr;
};

// c = a W_b^T, or c += a W_b^T with accumulate, where W_b is block b of a rounded weight: a [m, in]
// float, c [m, block_rows]. Streams the block once per 4 rows of a: for few rows (decoding steps);
// larger products belong to gemm().
inline void gemm_bfloat16_weight(const ConstMatrixRef<float>& a, const BFloat16Weight& weight, Index block,
                                 MatrixRef<float> c, bool accumulate = false) {
  const Index m = a.rows(), n = weight.block_rows(), k = weight.in_features();
  MOA_CHECK(a.cols() == k && c.rows() == m && c.cols() == n && block >= 0 && block < weight.blocks(),
            "moa::gemm_bfloat16_weight", "a is [", m, ", ", a.cols(), "] and c [", c.rows(), ", ", c.cols(),
            "] for block ", block, " of a weight of ", weight.blocks(), " blocks [", n, ", ", k, "]");
  if (!accumulate) c.setZero();
  detail::few_rows_times_bfloat16_pairs(m, n, k, a.data(), a.outerStride(), weight.block(block), c.data(),
                                        c.outerStride(), detail::bfloat16_dot_products_available());
}

// Up to this many rows, a product streams a rounded weight; above, gemm() with the float one.
constexpr Index kRoundedWeightRows = 16;

// c = a W^T (or c += with accumulate) for the float weight W [n, k], or for block `block` of its
// rounded copy when there is one (rounded not null) and a has few rows. weight_version: W's
// version (inference: the backend may keep W repacked), or 0.
template <typename Scalar>
void weight_product(const Compute& compute, const ConstMatrixRef<Scalar>& a, const ConstMatrixRef<Scalar>& weight,
                    const BFloat16Weight* rounded, Index block, MatrixRef<Scalar> c, bool accumulate,
                    Precision precision, std::uint64_t weight_version = 0) {
  if constexpr (std::is_same_v<Scalar, float>) {
    if (rounded != nullptr && a.rows() <= kRoundedWeightRows) {
      gemm_bfloat16_weight(a, *rounded, block, c, accumulate);
      return;
    }
  }
  gemm<Scalar>(compute, a, Transpose::no, weight, Transpose::yes, c, accumulate, precision, weight_version);
}

// input W^T as a new matrix [N, out], as linear_product, from the rounded weight when it serves.
template <typename Scalar>
Matrix<Scalar> weight_product(const Compute& compute, const ConstMatrixRef<Scalar>& input,
                              const ConstMatrixRef<Scalar>& weight, const BFloat16Weight* rounded, Precision precision) {
  Matrix<Scalar> output(input.rows(), weight.rows());  // [N, out]
  weight_product<Scalar>(compute, input, weight, rounded, 0, output, false, precision);
  return output;
}

// The rounded copies of a layer's weights for a decoding, when its compute allows bf16 and the
// build widens bfloat16 in registers (else null: steps use the float weights). Each entry is a
// weight and its block rows.
template <typename Scalar>
std::shared_ptr<const std::vector<BFloat16Weight>> round_weights_for_decoding(
    const Compute& compute, std::initializer_list<std::pair<ConstMatrixRef<Scalar>, Index>> weights) {
  if constexpr (std::is_same_v<Scalar, float>) {
    if (kFastBFloat16 && product_precision(compute, false) == Precision::bf16) {
      auto rounded = std::make_shared<std::vector<BFloat16Weight>>();
      for (const auto& [weight, block_rows] : weights) rounded->emplace_back(weight, block_rows);
      return rounded;
    }
  }
  return nullptr;
}

}  // namespace moa
