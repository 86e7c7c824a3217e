#include "support.hpp"

#include "moa/bfloat16.hpp"
#include "moa/moa.hpp"

#include <cstring>

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

TEST_CASE("gemm_bfloat16_weight: the product with each block of the rounded weight", "[bf16][gemm]") {
  moa::Rng rng(4);
  for (const Index block_rows : {3, 16, 64, 70}) {
    for (const Index in : {1, 17, 64}) {
      const MatrixF weight = random_matrix<float>(3 * block_rows, in, rng);  // 3 blocks
      const moa::BFloat16Weight rounded(weight, block_rows);
      REQUIRE(rounded.blocks() == 3);
      for (const Index m : {1, 2, 3, 4, 5, 9}) {
        for (const bool accumulate : {false, true}) {
          INFO("block_rows " << block_rows << " in " << in << " m " << m << " accumulate " << accumulate);
          const MatrixF a_storage = random_matrix<float>(m, in + 3, rng);
          const auto a = a_storage.leftCols(in);  // a leading dimension wider than the row
          MatrixF c = random_matrix<float>(m, block_rows, rng);
          const MatrixD before = c.cast<double>();
          moa::gemm_bfloat16_weight(a, rounded, 1, c, accumulate);
          // The same product in double with the weight rounded as the kernel reads it.
          MatrixD expected = accumulate ? before : MatrixD::Zero(m, block_rows);
          for (Index i = 0; i < m; ++i)
            for (Index j = 0; j < block_rows; ++j)
              for (Index l = 0; l < in; ++l)
                expected(i, j) += static_cast<double>(a(i, l)) *
                                  moa::bfloat16_to_float(moa::round_to_bfloat16(weight(block_rows + j, l)));
          REQUIRE(relative_error(c.cast<double>(), expected) < 1e-5);
          // Rounding the weight is the only rounding: against the float weight, bf16's 2^-9.
          if (!accumulate) {
            const MatrixD exact = a.cast<double>() * weight.middleRows(block_rows, block_rows).cast<double>().transpose();
            REQUIRE(relative_error(c.cast<double>(), exact) < 1e-2);
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
