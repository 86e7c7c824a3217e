#include "attention_support.hpp"

#include <cmath>

using namespace moa_test;

namespace {

void run_kernel(const MatrixD& queries, const MatrixD& keys, const MatrixD& values, const moa::AttentionLayout& layout,
                MatrixD& probabilities, MatrixD& output) {
  probabilities = MatrixD::Zero(queries.rows(), keys.rows());
  output = MatrixD::Zero(queries.rows(), values.cols());
  moa::attention_forward<double>(queries, keys, values, layout, probabilities, output);
}

}  // namespace

TEST_CASE("attention_forward: a known value", "[attention]") {
  MatrixD queries(1, 2), keys(2, 2), values(2, 2), probabilities, output;
  queries << 1, 0;
  keys << 1, 0, 0, 1;
  values << 1, 2, 3, 4;
  moa::AttentionLayout layout;
  layout.positions = 1;
  layout.key_length = 2;
  run_kernel(queries, keys, values, layout, probabilities, output);
  const double first = std::exp(1 / std::sqrt(2.0)) / (std::exp(1 / std::sqrt(2.0)) + 1);
  REQUIRE(probabilities(0, 0) == Approx(first));
  REQUIRE(output(0, 0) == Approx(first * 1 + (1 - first) * 3));
  REQUIRE(output(0, 1) == Approx(first * 2 + (1 - first) * 4));
  layout.key_length = 0;  // nothing to attend to: zeros, not NaN
  run_kernel(queries, keys, values, layout, probabilities, output);
  REQUIRE(output.isZero(0));
}

TEST_CASE("attention_forward: causal blocks of any size give the same result and skip future keys", "[attention]") {
  moa::Rng rng(1);
  const Index positions = 9, k = 3, head_dim = 4;
  const MatrixD queries = random_matrix(positions * k, head_dim, rng);
  const MatrixD keys = random_matrix(positions, head_dim, rng), values = random_matrix(positions, head_dim, rng);
  moa::AttentionLayout layout;
  layout.positions = positions;
  layout.rows_per_position = k;
  layout.key_length = positions;
  layout.causal = true;
  MatrixD reference_probabilities, reference;
  layout.block_positions = positions;
  run_kernel(queries, keys, values, layout, reference_probabilities, reference);
  for (Index p = 0; p < positions; ++p)
    for (Index r = p * k; r < (p + 1) * k; ++r) {
      REQUIRE(reference_probabilities.row(r).tail(positions - p - 1).isZero(0));
      REQUIRE(reference_probabilities.row(r).sum() == Approx(1.0));
    }
  for (Index block : {1, 2, 4}) {
    layout.block_positions = block;
    MatrixD probabilities, output;
    run_kernel(queries, keys, values, layout, probabilities, output);
    REQUIRE((output - reference).cwiseAbs().maxCoeff() < 1e-14);
  }
}

TEST_CASE("attention_backward: gradient check of queries, keys and values, causal and padded", "[attention][gradient]") {
  moa::Rng rng(2);
  for (bool causal : {false, true}) {
    moa::AttentionLayout layout;
    layout.positions = 5;
    layout.rows_per_position = 2;
    layout.key_length = causal ? 5 : 4;  // one padded key when not causal
    layout.causal = causal;
    layout.block_positions = 2;
    MatrixD queries = random_matrix(10, 3, rng), keys = random_matrix(5, 3, rng), values = random_matrix(5, 3, rng);
    const MatrixD output_weights = random_matrix(10, 3, rng);
    MatrixD probabilities, output;
    run_kernel(queries, keys, values, layout, probabilities, output);
    MatrixD grad_queries = MatrixD::Zero(10, 3), grad_keys = MatrixD::Zero(5, 3), grad_values = MatrixD::Zero(5, 3);
    moa::attention_backward<double>(queries, keys, values, probabilities, output_weights, layout, grad_queries,
                                    grad_keys, grad_values);
    if (!causal) REQUIRE(grad_keys.row(4).isZero(0));
    REQUIRE_GRADIENTS_OK(moa::check_gradients(
        [&] {
          MatrixD p, o;
          run_kernel(queries, keys, values, layout, p, o);
          return o.cwiseProduct(output_weights).sum();
        },
        {{"queries", &queries, &grad_queries}, {"keys", &keys, &grad_keys}, {"values", &values, &grad_values}}));
  }
}

TEST_CASE("SequenceBatch: rows, lengths and validation", "[attention][errors]") {
  const auto batch = moa::SequenceBatch::padded(4, {4, 1});
  REQUIRE(batch.rows() == 8);
  REQUIRE(batch.tokens() == 5);
  REQUIRE(batch.is_token(4));
  REQUIRE_FALSE(batch.is_token(5));
  REQUIRE_MOA_ERROR(batch.validate("f", "x", 7), "f: x has 7 rows but its batch describes 2 x 4 = 8");
  REQUIRE_MOA_ERROR(moa::SequenceBatch::full(0, 4).validate("f", "x", 0), "batch_size 0");
}
