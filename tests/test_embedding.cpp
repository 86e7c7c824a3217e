// Gradient checks, float against double and save/load: the op table (op_table.hpp, test_ops.cpp).
#include "support.hpp"


#include <cmath>

using namespace moa_test;

TEMPLATE_TEST_CASE("Embedding: known forward, padding embeds as zeros", "[embedding]", float, double) {
  moa::Rng rng(0);
  moa::Embedding<TestType> embedding(4, 2, rng, 0);
  REQUIRE(embedding.weight.value.row(0).isZero(0));
  embedding.weight.value << 9, 9, 1, 2, 3, 4, 5, 6;
  const auto output = embedding.forward({2, 0, 3, 2});
  moa::Matrix<TestType> expected(4, 2);
  expected << 3, 4, 0, 0, 5, 6, 3, 4;
  REQUIRE(output == expected);
}

TEST_CASE("Embedding: backward scatters, skips padding; gradient check", "[embedding][gradient]") {
  moa::Rng rng(1);
  moa::Embedding<double> embedding(6, 3, rng, 1);
  const moa::TokenIds ids{2, 1, 5, 2, 0};
  const MatrixD output = embedding.forward(ids);
  const MatrixD output_weights = random_matrix(5, 3, rng);
  embedding.backward(output_weights);
  REQUIRE(embedding.weight.grad.row(2).isApprox(output_weights.row(0) + output_weights.row(3)));
  REQUIRE(embedding.weight.grad.row(1).isZero(0));
  REQUIRE(embedding.weight.grad.row(3).isZero(0));
  const MatrixD analytic = embedding.weight.grad;
  REQUIRE_GRADIENTS_OK(moa::check_gradients(
      [&] { return embedding.forward(ids).cwiseProduct(output_weights).sum(); },
      {{"weight", &embedding.weight.value, &analytic}}));
}

TEST_CASE("Embedding: bad input throws moa::Error", "[embedding][errors]") {
  moa::Rng rng(3);
  REQUIRE_MOA_ERROR(moa::Embedding<float>(4, 2, rng, 4), "Embedding: padding_index 4 is outside [0, 4)");
  moa::Embedding<float> embedding(4, 2, rng);
  REQUIRE_MOA_ERROR(embedding.forward({1, 4}), "Embedding::forward: ids[1] = 4 is outside [0, 4)");
  REQUIRE_MOA_ERROR(embedding.forward({-1}), "ids[0] = -1");
  embedding.forward({1, 2});
  REQUIRE_MOA_ERROR(embedding.backward(MatrixF::Zero(3, 2)), "Embedding::backward: grad_output has shape [3, 2]");
}

TEMPLATE_TEST_CASE("sinusoidal_positions: known values in fairseq's layout", "[embedding]", float, double) {
  const auto positions = moa::sinusoidal_positions<TestType>(3, 4);
  // half = 2 frequencies: 1 and 10000^-1
  REQUIRE(positions.row(0).head(2).isZero(0));
  REQUIRE(positions(0, 2) == Approx(1.0));
  REQUIRE(positions(1, 0) == Approx(std::sin(1.0)));
  REQUIRE(positions(1, 1) == Approx(std::sin(1e-4)));
  REQUIRE(positions(2, 2) == Approx(std::cos(2.0)));
  REQUIRE(positions(2, 3) == Approx(std::cos(2e-4)));
  const auto offset = moa::sinusoidal_positions<TestType>(1, 4, 2);
  REQUIRE(offset.row(0).isApprox(positions.row(2)));
  const auto odd = moa::sinusoidal_positions<TestType>(2, 5);
  REQUIRE(odd.col(4).isZero(0));
  REQUIRE_MOA_ERROR(moa::sinusoidal_positions<TestType>(2, 1), "embedding_dim must be at least 2");
  REQUIRE_MOA_ERROR(moa::sinusoidal_positions<TestType>(-1, 4), "length must be non-negative");
}
