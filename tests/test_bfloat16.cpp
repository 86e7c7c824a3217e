#include "support.hpp"

#include "moa/bfloat16.hpp"
#include "moa/moa.hpp"

#include <cmath>
#include <cstring>
#include <vector>

using namespace moa_test;

namespace {

float from_bits(std::uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

}  // namespace

TEST_CASE("bfloat16: rounding to nearest, ties to even, and back", "[bf16]") {
  REQUIRE(moa::round_to_bfloat16(1.0f) == 0x3F80);
  REQUIRE(moa::round_to_bfloat16(-2.0f) == 0xC000);
  REQUIRE(moa::round_to_bfloat16(from_bits(0x3F807FFF)) == 0x3F80);  // below half: down
  REQUIRE(moa::round_to_bfloat16(from_bits(0x3F808001)) == 0x3F81);  // above half: up
  REQUIRE(moa::round_to_bfloat16(from_bits(0x3F808000)) == 0x3F80);  // a tie to the even 0x3F80
  REQUIRE(moa::round_to_bfloat16(from_bits(0x3F818000)) == 0x3F82);  // a tie to the even 0x3F82
  REQUIRE(moa::bfloat16_to_float(0x3F81) == from_bits(0x3F810000));
}

TEST_CASE("bfloat16: rounding an array (SIMD where built) equals rounding each value", "[bf16]") {
  std::vector<float> values;
  for (std::uint32_t bits : {0x3F807FFFu, 0x3F808000u, 0x3F808001u, 0x3F818000u, 0x7F7FFFFFu, 0x7F800000u, 0xFF800000u,
                             0x7FC00000u, 0x00000001u, 0x80008000u, 0x00000000u, 0x80000000u})
    values.push_back(from_bits(bits));
  moa::Rng rng(3);
  while (values.size() < 1000) values.push_back(static_cast<float>(rng.normal()) * std::ldexp(1.0f, static_cast<int>(values.size() % 60) - 30));
  // Every count up to 40 (the SIMD body and its scalar tail), then the whole array.
  std::vector<std::size_t> counts(41);
  for (std::size_t count = 0; count < counts.size(); ++count) counts[count] = count;
  counts.push_back(values.size());
  for (std::size_t count : counts) {
    std::vector<std::uint16_t> rounded(count + 1, 0xABCD);
    moa::detail::round_to_bfloat16(values.data(), static_cast<moa::Index>(count), rounded.data());
    for (std::size_t i = 0; i < count; ++i) {
      INFO("value " << i << " of " << count);
      REQUIRE(rounded[i] == moa::round_to_bfloat16(values[i]));
    }
    REQUIRE(rounded[count] == 0xABCD);  // nothing past the end
  }
}

TEST_CASE("gemm_bfloat16_weight: the product with each block of the rounded weight", "[bf16][gemm]") {
  moa::Rng rng(4);
  const auto bf16 = [](float x) { return static_cast<double>(moa::bfloat16_to_float(moa::round_to_bfloat16(x))); };
  // Both kernels where the CPU has AVX512-BF16's dot products (the public function takes those),
  // the float one elsewhere.
  std::vector<bool> kernels{false};
  if (moa::detail::bfloat16_dot_products_available()) kernels.push_back(true);
  for (const bool dot_products : kernels) {
    for (const Index block_rows : {3, 16, 64, 70, 80}) {
      for (const Index in : {1, 2, 17, 64, 1030}) {  // 1030: three chunks of rounded rows, the last odd
        const MatrixF weight = random_matrix<float>(3 * block_rows, in, rng);  // 3 blocks
        const moa::BFloat16Weight rounded(weight, block_rows);
        REQUIRE(rounded.blocks() == 3);
        for (const Index m : {1, 2, 3, 4, 5, 9}) {
          for (const bool accumulate : {false, true}) {
            INFO("dot products " << dot_products << " block_rows " << block_rows << " in " << in << " m " << m
                                 << " accumulate " << accumulate);
            const MatrixF a_storage = random_matrix<float>(m, in + 3, rng);
            const auto a = a_storage.leftCols(in);  // a leading dimension wider than the row
            MatrixF c = random_matrix<float>(m, block_rows, rng);
            const MatrixD before = c.cast<double>();
            if (dot_products == moa::detail::bfloat16_dot_products_available()) {
              moa::gemm_bfloat16_weight(a, rounded, 1, c, accumulate);
            } else {
              if (!accumulate) c.setZero();
              moa::detail::few_rows_times_bfloat16_pairs(m, block_rows, in, a.data(), a.outerStride(), rounded.block(1),
                                                         c.data(), c.outerStride(), dot_products);
            }
            // The same product in double with the weight rounded as the kernel reads it, and the
            // rows too where the kernel takes dot products of bfloat16 pairs.
            MatrixD expected = accumulate ? before : MatrixD::Zero(m, block_rows);
            for (Index i = 0; i < m; ++i)
              for (Index j = 0; j < block_rows; ++j)
                for (Index l = 0; l < in; ++l)
                  expected(i, j) += (dot_products ? bf16(a(i, l)) : a(i, l)) * bf16(weight(block_rows + j, l));
            REQUIRE(relative_error(c.cast<double>(), expected) < 1e-5);
            // Against the float weight and rows: bf16's 2^-9 for each rounded operand.
            if (!accumulate) {
              const MatrixD exact = a.cast<double>() * weight.middleRows(block_rows, block_rows).cast<double>().transpose();
              REQUIRE(relative_error(c.cast<double>(), exact) < 1e-2);
            }
          }
        }
      }
    }
  }
  const moa::BFloat16Weight rounded(MatrixF::Ones(8, 5), 4);
  MatrixF c(2, 4);
  REQUIRE_MOA_ERROR(moa::gemm_bfloat16_weight(MatrixF::Ones(2, 6), rounded, 0, c),
                    "moa::gemm_bfloat16_weight: a is [2, 6] and c [2, 4] for block 0 of a weight of 2 blocks [4, 5]");
  REQUIRE_MOA_ERROR(moa::gemm_bfloat16_weight(MatrixF::Ones(2, 5), rounded, 2, c), "for block 2 of a weight of 2 blocks");
  REQUIRE_MOA_ERROR(moa::BFloat16Weight(MatrixF::Ones(8, 5), 3), "the weight's 8 rows do not split into blocks of 3");
}

namespace {

// A matrix rounded to bfloat16 as its float values (what a kernel reading the rounded copy sees).
MatrixF rounded_values_of(const MatrixF& matrix) {
  return matrix.unaryExpr([](float x) { return moa::bfloat16_to_float(moa::round_to_bfloat16(x)); });
}

std::vector<std::uint16_t> bits_of(const MatrixF& matrix) {
  std::vector<std::uint16_t> bits;
  for (Index r = 0; r < matrix.rows(); ++r)
    for (Index c = 0; c < matrix.cols(); ++c) bits.push_back(moa::round_to_bfloat16(matrix(r, c)));
  return bits;
}

}  // namespace

TEST_CASE("attention_forward over rounded keys and values: the float kernel on the same rounded numbers",
          "[bf16][attention]") {
  moa::Rng rng(5);
  const Index head_dim = 16, keys_count = 37;
  // A cache-like block of two heads: keys [S, 2*d_h] rounded and stored transposed [2*d_h, S];
  // values [S, 2*d_h]; head 1 is columns (rows of the transposed keys) [d_h, 2*d_h).
  const MatrixF keys = random_matrix<float>(keys_count, 2 * head_dim, rng);
  const MatrixF values = random_matrix<float>(keys_count, 2 * head_dim, rng);
  const MatrixF keys_transposed = keys.transpose();
  const std::vector<std::uint16_t> key_bits = bits_of(keys_transposed), value_bits = bits_of(values);
  const moa::BFloat16Rows rounded_keys{key_bits.data(), 2 * head_dim, keys_count, keys_count};
  const moa::BFloat16Rows rounded_values{value_bits.data(), keys_count, 2 * head_dim, 2 * head_dim};
  const MatrixF float_keys = rounded_values_of(keys).middleCols(head_dim, head_dim);
  const MatrixF float_values = rounded_values_of(values).middleCols(head_dim, head_dim);
  const moa::AttentionSpan span = moa::AttentionSpan::streaming(2, 5);
  for (const bool causal : {false, true}) {
    for (const bool spanned : {false, true}) {
      if (spanned && !causal) continue;
      for (const Index positions : {1, 2, 3}) {
        for (const Index rows_per_position : {1, 3, 4}) {
          INFO("causal " << causal << " span " << spanned << " positions " << positions << " rows per position "
                         << rows_per_position);
          moa::AttentionLayout layout;
          layout.positions = positions;
          layout.rows_per_position = rows_per_position;
          layout.key_length = 31;  // keys past it are padding
          layout.causal = causal;
          layout.position_offset = causal ? layout.key_length - positions : 0;
          layout.span = spanned ? &span : nullptr;
          const Index rows = positions * rows_per_position;
          const MatrixF queries = random_matrix<float>(rows, head_dim, rng);
          MatrixF expected_probabilities = MatrixF::Zero(rows, keys_count), expected(rows, head_dim);
          moa::attention_forward<float>(queries, float_keys, float_values, layout, expected_probabilities, expected);
          MatrixF probabilities = MatrixF::Zero(rows, keys_count), output(rows, head_dim);
          moa::attention_forward(queries, rounded_keys.middle_rows(head_dim, head_dim),
                                 rounded_values.middle_cols(head_dim, head_dim), layout, probabilities, output);
          REQUIRE(relative_error(output.cast<double>(), expected.cast<double>()) < 1e-5);
          REQUIRE(relative_error(probabilities.cast<double>(), expected_probabilities.cast<double>()) < 1e-5);
        }
      }
    }
  }
  moa::AttentionLayout layout;
  layout.positions = 1;
  layout.key_length = keys_count;
  MatrixF probabilities(1, keys_count), output(1, head_dim);
  REQUIRE_MOA_ERROR(moa::attention_forward(random_matrix<float>(1, head_dim, rng), rounded_keys, rounded_values, layout,
                                           probabilities, output),
                    "rounded keys (transposed) [32, 37]");
  REQUIRE_MOA_ERROR(rounded_keys.middle_rows(head_dim, head_dim + 1), "middle_rows: [16, 33) is outside [0, 32)");
  REQUIRE_MOA_ERROR(rounded_values.middle_cols(-1, 2), "middle_cols: [-1, 1) is outside [0, 32)");
  MatrixF sums = MatrixF::Zero(1, 3);
  REQUIRE_MOA_ERROR(moa::add_column_sums(moa::Compute(), keys, sums.row(0)), "sums has 3 entries for a matrix of 37 x 32");
}

TEST_CASE("KVCache with rounded weights: rounded keys (transposed) and values follow every change", "[bf16][cache]") {
  moa::Rng rng(6);
  const Index width = 6;
  auto weights = std::make_shared<const moa::KVCache<float>::RoundedWeights>();
  // Every rounded number equals the float one rounded, for the rows in use of each sequence.
  auto require_in_step = [&](const moa::KVCache<float>& cache) {
    REQUIRE(cache.has_rounded_rows());
    for (Index b = 0; b < cache.batch_size(); ++b) {
      const moa::BFloat16Rows keys = cache.rounded_keys(b), values = cache.rounded_values(b);
      REQUIRE((keys.rows == width && keys.cols == cache.capacity() && values.rows == cache.capacity() &&
               values.cols == width));
      for (Index row = 0; row < cache.key_length(b); ++row)
        for (Index c = 0; c < width; ++c) {
          REQUIRE(keys.data[c * keys.stride + row] == moa::round_to_bfloat16(cache.keys(b)(row, c)));
          REQUIRE(values.data[row * values.stride + c] == moa::round_to_bfloat16(cache.values(b)(row, c)));
        }
    }
  };
  SECTION("self-attention: append, truncate, reorder") {
    moa::KVCache<float> cache(3, 8, width);
    REQUIRE_FALSE(cache.has_rounded_rows());
    REQUIRE_MOA_ERROR(cache.rounded_keys(0), "no rounded keys");
    cache.set_rounded_weights(weights);
    cache.append(random_matrix<float>(3 * 4, width, rng), random_matrix<float>(3 * 4, width, rng));
    require_in_step(cache);
    cache.truncate(2);
    cache.append(random_matrix<float>(3, width, rng), random_matrix<float>(3, width, rng));
    require_in_step(cache);
    cache.reorder({2, 0, 2, 1});
    require_in_step(cache);
    cache.set_rounded_weights(nullptr);
    REQUIRE_FALSE(cache.has_rounded_rows());
  }
  SECTION("windowed: positions dropped past the sink") {
    auto cache = moa::KVCache<float>::windowed(2, width, 1, 3, 2);
    cache.set_rounded_weights(weights);
    for (int step = 0; step < 6; ++step) {
      cache.append(random_matrix<float>(2 * 2, width, rng), random_matrix<float>(2 * 2, width, rng));
      require_in_step(cache);
    }
    REQUIRE(cache.key_shift() > 0);
  }
  SECTION("cross-attention: filled, then rounded weights given") {
    moa::KVCache<float> cache(2, 5, width);
    cache.fill(random_matrix<float>(2 * 5, width, rng), random_matrix<float>(2 * 5, width, rng), {5, 3});
    cache.set_rounded_weights(weights);
    require_in_step(cache);
  }
}
