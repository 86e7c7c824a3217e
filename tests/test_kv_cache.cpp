#include "support.hpp"

using namespace moa_test;

TEST_CASE("KVCache: append, truncate and reorder keep each sequence's rows", "[kv_cache]") {
  moa::KVCache<float> cache(2, 4, 3);  // 2 sequences, capacity 4, width 3
  REQUIRE(cache.length() == 0);
  REQUIRE_FALSE(cache.frozen());
  // Two steps: rows [b*n + t], sequence-major; values are keys + 100.
  MatrixF keys(4, 3);
  keys << 1, 1, 1, 2, 2, 2, 10, 10, 10, 20, 20, 20;  // sequence 0: 1, 2; sequence 1: 10, 20
  cache.append(keys, keys.array() + 100.0f);
  REQUIRE(cache.length() == 2);
  REQUIRE(cache.key_length(1) == 2);
  REQUIRE(cache.keys(0).row(1) == keys.row(1));
  REQUIRE(cache.keys(1).row(0) == keys.row(2));
  REQUIRE(cache.values(1).row(1)(0) == 120.0f);
  cache.append(MatrixF::Constant(2, 3, 7.0f), MatrixF::Constant(2, 3, 8.0f));  // one more step each
  REQUIRE(cache.length() == 3);
  REQUIRE(cache.keys(1).row(2).isConstant(7.0f));
  cache.truncate(2);
  REQUIRE(cache.length() == 2);
  REQUIRE(cache.key_length(0) == 2);
  // Beam reordering: new sequence i is old order[i]; duplicates and drops allowed.
  cache.reorder({1, 1, 0});
  REQUIRE(cache.batch_size() == 3);
  REQUIRE(cache.keys(0).row(1) == keys.row(3));
  REQUIRE(cache.keys(1).row(0) == keys.row(2));
  REQUIRE(cache.keys(2).row(0) == keys.row(0));
  REQUIRE(cache.values(2).row(1)(2) == 102.0f);
}

TEST_CASE("KVCache: a filled cross-attention cache is frozen with per-sequence lengths", "[kv_cache]") {
  moa::KVCache<double> cache(2, 3, 2);
  const MatrixD keys = MatrixD::Random(6, 2), values = MatrixD::Random(6, 2);
  cache.fill(keys, values, {3, 1});
  REQUIRE(cache.frozen());
  REQUIRE(cache.key_length(0) == 3);
  REQUIRE(cache.key_length(1) == 1);
  REQUIRE(cache.keys(1) == keys.bottomRows(3));
  REQUIRE_MOA_ERROR(cache.append(MatrixD::Zero(2, 2), MatrixD::Zero(2, 2)), "cannot grow");
  REQUIRE_MOA_ERROR(cache.truncate(1), "KVCache::truncate: the cache holds cross-attention keys");
  cache.reorder({1});
  REQUIRE(cache.key_length(0) == 1);
  REQUIRE(cache.frozen());
}

TEST_CASE("KVCache: bad sizes and overflow are clear errors", "[kv_cache][errors]") {
  REQUIRE_MOA_ERROR(moa::KVCache<float>(0, 4, 3), "KVCache: batch_size 0, capacity 4 and width 3 must be positive");
  moa::KVCache<float> cache(2, 2, 3);
  REQUIRE_MOA_ERROR(cache.append(MatrixF::Zero(3, 3), MatrixF::Zero(3, 3)), "must both be [batch_size * n, 3]");
  REQUIRE_MOA_ERROR(cache.append(MatrixF::Zero(2, 2), MatrixF::Zero(2, 2)), "must both be [batch_size * n, 3]");
  REQUIRE_MOA_ERROR(cache.append(MatrixF::Zero(6, 3), MatrixF::Zero(6, 3)), "appending 3 steps to 0 cached would exceed the capacity of 2");
  cache.append(MatrixF::Zero(2, 3), MatrixF::Zero(2, 3));
  REQUIRE_MOA_ERROR(cache.truncate(2), "length 2 is outside [0, 1]");
  REQUIRE_MOA_ERROR(cache.reorder({}), "order is empty");
  REQUIRE_MOA_ERROR(cache.reorder({0, 2}), "order[1] = 2 is outside [0, 2)");
  REQUIRE_MOA_ERROR(cache.fill(MatrixF::Zero(4, 3), MatrixF::Zero(4, 3), {1}), "key_lengths has 1 entries for batch_size 2");
  REQUIRE_MOA_ERROR(cache.fill(MatrixF::Zero(4, 3), MatrixF::Zero(4, 3), {1, 3}), "key length 3 is outside [0, 2]");
}
