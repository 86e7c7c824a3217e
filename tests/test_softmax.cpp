#include "support.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

using namespace moa_test;

namespace {
const double kInfinity = std::numeric_limits<double>::infinity();
}

TEMPLATE_TEST_CASE("softmax_rows: known values and stability", "[softmax]", float, double) {
  moa::Matrix<TestType> logits(2, 3);
  logits << 0, std::log(2.0), std::log(3.0), 1000, 1001, 1002;
  const auto probabilities = moa::softmax_rows(logits);
  REQUIRE(probabilities(0, 0) == Approx(1.0 / 6));
  REQUIRE(probabilities(0, 1) == Approx(2.0 / 6));
  REQUIRE(probabilities(0, 2) == Approx(3.0 / 6));
  const double e = std::exp(1.0), normaliser = 1 + e + e * e;
  REQUIRE(probabilities(1, 0) == Approx(1 / normaliser));
  REQUIRE(probabilities(1, 2) == Approx(e * e / normaliser));
  const auto log_probabilities = moa::log_softmax_rows(logits);
  REQUIRE(log_probabilities(0, 2) == Approx(std::log(0.5)));
  REQUIRE(log_probabilities(1, 0) == Approx(-std::log(normaliser)));
}

TEST_CASE("softmax_rows with masks: masked entries get 0, a fully masked row is all zeros", "[softmax]") {
  MatrixD logits(3, 3);
  logits << 1, 2, 3, 4, 5, 6, 7, 8, 9;
  moa::BoolMatrix allowed(3, 3);
  allowed << true, false, true, false, false, false, true, true, true;
  const MatrixD probabilities = moa::softmax_rows(logits, allowed);
  REQUIRE(probabilities(0, 1) == 0.0);
  REQUIRE(probabilities(0, 0) == Approx(1 / (1 + std::exp(2.0))));
  REQUIRE(probabilities.row(1).isZero(0));
  REQUIRE(probabilities.row(2).sum() == Approx(1.0));
  REQUIRE(probabilities.allFinite());

  MatrixD additive = MatrixD::Zero(3, 3);
  additive(0, 1) = -kInfinity;
  additive.row(1).setConstant(-kInfinity);
  REQUIRE(moa::softmax_rows(logits, additive).isApprox(probabilities));

  const MatrixD log_probabilities = moa::log_softmax_rows(logits, allowed);
  REQUIRE(log_probabilities(0, 1) == -kInfinity);
  REQUIRE(log_probabilities.row(1).isZero(0));
  REQUIRE(log_probabilities(0, 0) == Approx(std::log(probabilities(0, 0))));
}

TEMPLATE_TEST_CASE("softmax_rows and log_softmax_rows never hide a NaN as a masked row", "[softmax]", float, double) {
  // A NaN compares false with everything: a max scan with > alone would skip it and take the row
  // for fully masked (zeros). Every position of the NaN is tried, the first one included.
  const TestType nan = std::numeric_limits<TestType>::quiet_NaN();
  for (moa::Index column = 0; column < 3; ++column) {
    moa::Matrix<TestType> logits(2, 3);
    logits << 1, 2, 3, 4, 5, 6;
    logits(0, column) = nan;
    const moa::Matrix<TestType> probabilities = moa::softmax_rows(logits);
    const moa::Matrix<TestType> log_probabilities = moa::log_softmax_rows(logits);
    for (moa::Index j = 0; j < 3; ++j) {
      REQUIRE(std::isnan(probabilities(0, j)));
      REQUIRE(std::isnan(log_probabilities(0, j)));
    }
    REQUIRE(probabilities.row(1).allFinite());
    REQUIRE(log_probabilities.row(1).allFinite());
  }
  // NaN beside masked entries: the whole row is NaN.
  moa::Matrix<TestType> masked(1, 3);
  masked << -std::numeric_limits<TestType>::infinity(), nan, 0;
  REQUIRE(moa::softmax_rows(masked).array().isNaN().all());
  REQUIRE(moa::log_softmax_rows(masked).array().isNaN().all());
}

TEMPLATE_TEST_CASE("row_max: the largest value at every position and length, NaN wherever it is", "[softmax]", float,
                   double) {
  // Lengths below, at and past one packet and four (the scan's chains), each with a tail; the
  // row starts one element in, so it is not aligned.
  const TestType infinity = std::numeric_limits<TestType>::infinity();
  REQUIRE(moa::detail::row_max<TestType>(nullptr, 0) == -infinity);
  std::vector<TestType> storage(200);
  for (moa::Index length = 1; length <= 150; ++length) {
    TestType* row = storage.data() + 1;
    for (moa::Index place = 0; place < length; ++place) {
      for (moa::Index j = 0; j < length; ++j) row[j] = j % 5 == 0 ? -infinity : -TestType(1) - TestType(j % 7);
      row[place] = TestType(3);
      REQUIRE(moa::detail::row_max(row, length) == TestType(3));
      row[place] = std::numeric_limits<TestType>::quiet_NaN();
      REQUIRE(std::isnan(moa::detail::row_max(row, length)));
      row[place] = -infinity;
    }
    for (moa::Index j = 0; j < length; ++j) row[j] = -infinity;
    REQUIRE(moa::detail::row_max(row, length) == -infinity);
  }
}

TEST_CASE("softmax_rows: masked entries are exactly 0 in double (Eigen's exp(-inf) is a denormal)", "[softmax]") {
  MatrixD logits(1, 20);  // wide enough for the vectorized path
  for (moa::Index j = 0; j < 20; ++j) logits(0, j) = j % 3 == 0 ? -kInfinity : 0.1 * static_cast<double>(j);
  const MatrixD probabilities = moa::softmax_rows(logits);
  for (moa::Index j = 0; j < 20; ++j) {
    if (j % 3 == 0) REQUIRE(probabilities(0, j) == 0.0);
    else REQUIRE(probabilities(0, j) > 0.0);
  }
  REQUIRE(probabilities.sum() == Approx(1.0));
}

TEST_CASE("softmax_rows and log_softmax_rows: gradient check with a partial and a full mask", "[softmax][gradient]") {
  moa::Rng rng(11);
  MatrixD logits = random_matrix(4, 5, rng);
  moa::BoolMatrix allowed = moa::BoolMatrix::Constant(4, 5, true);
  allowed(0, 2) = false;
  allowed(2, 0) = allowed(2, 4) = false;
  allowed.row(3).setConstant(false);
  const MatrixD weights = random_matrix(4, 5, rng);
  // The fully masked row 3 does not depend on its logits; everything else does.
  const MatrixD probabilities = moa::softmax_rows(logits, allowed);
  MatrixD grad_weights = weights;
  grad_weights.row(0)(2) = 7.0;  // whatever flows into a masked entry must not come back
  const MatrixD analytic = moa::softmax_rows_backward(probabilities, grad_weights);
  REQUIRE(analytic(0, 2) == 0.0);
  REQUIRE(analytic.row(3).isZero(0));
  const MatrixD analytic_soft = moa::softmax_rows_backward(probabilities, weights);
  REQUIRE_GRADIENTS_OK(moa::check_gradients(
      [&] { return moa::softmax_rows(logits, allowed).cwiseProduct(weights).sum(); },
      {{"logits", &logits, &analytic_soft}}));

  MatrixD weights_finite = weights;
  for (moa::Index i = 0; i < 4; ++i)
    for (moa::Index j = 0; j < 5; ++j)
      if (!allowed(i, j)) weights_finite(i, j) = 0.0;  // -inf * 0 would be NaN in the loss
  const MatrixD log_probabilities = moa::log_softmax_rows(logits, allowed);
  const MatrixD analytic_log = moa::log_softmax_rows_backward(log_probabilities, weights_finite);
  REQUIRE(analytic_log.row(3).isZero(0));
  REQUIRE_GRADIENTS_OK(moa::check_gradients(
      [&] {
        const MatrixD values = moa::log_softmax_rows(logits, allowed);
        double total = 0;
        for (moa::Index i = 0; i < 4; ++i)
          for (moa::Index j = 0; j < 5; ++j)
            if (allowed(i, j)) total += values(i, j) * weights_finite(i, j);
        return total;
      },
      {{"logits", &logits, &analytic_log}}));
}

TEST_CASE("softmax functions reject mismatched shapes", "[softmax][errors]") {
  const MatrixD logits = MatrixD::Zero(2, 3);
  REQUIRE_MOA_ERROR(moa::softmax_rows(logits, moa::BoolMatrix(3, 2)), "softmax_rows: mask has shape [3, 2]");
  REQUIRE_MOA_ERROR(moa::softmax_rows(logits, MatrixD(2, 2)), "softmax_rows: mask has shape [2, 2]");
  REQUIRE_MOA_ERROR(moa::log_softmax_rows(logits, moa::BoolMatrix(1, 3)), "log_softmax_rows");
  REQUIRE_MOA_ERROR(moa::log_softmax_rows(logits, MatrixD(1, 3)), "log_softmax_rows");
  REQUIRE_MOA_ERROR(moa::softmax_rows_backward(logits, MatrixD(2, 4)), "softmax_rows_backward");
  REQUIRE_MOA_ERROR(moa::log_softmax_rows_backward(logits, MatrixD(2, 4)), "log_softmax_rows_backward");
}

TEMPLATE_TEST_CASE("exp_shifted_inplace: exp((x - offset) * scale) and its sum, every length and start, the same wherever the row starts",
                   "[softmax]", float, double) {
  using Scalar = TestType;
  const Scalar offset = Scalar(0.75), scale = Scalar(0.125);
  std::vector<Scalar> source(80);
  for (std::size_t i = 0; i < source.size(); ++i) source[i] = Scalar(std::sin(0.37 * static_cast<double>(i)) * 20);
  const double tolerance = std::is_same_v<Scalar, float> ? 1e-6 : 1e-14;
  for (moa::Index length = 0; length <= 40; ++length) {
    for (moa::Index start = 0; start < 17; ++start) {
      std::vector<Scalar> values(source.begin(), source.end());
      const std::vector<Scalar> row(values.begin() + start, values.begin() + start + length);
      const Scalar total = moa::detail::exp_shifted_inplace(values.data() + start, length, offset, scale);
      double expected_total = 0;
      for (moa::Index j = 0; j < length; ++j) {
        const double expected = std::exp((static_cast<double>(row[static_cast<std::size_t>(j)]) - offset) * scale);
        expected_total += expected;
        REQUIRE(std::abs(values[static_cast<std::size_t>(start + j)] - expected) <= tolerance * expected);
      }
      REQUIRE(std::abs(total - expected_total) <= tolerance * std::max(1.0, expected_total) * 4);
      for (moa::Index j = 0; j < start; ++j) REQUIRE(values[static_cast<std::size_t>(j)] == source[static_cast<std::size_t>(j)]);
      for (moa::Index j = start + length; j < 80; ++j) REQUIRE(values[static_cast<std::size_t>(j)] == source[static_cast<std::size_t>(j)]);
    }
  }
  // The same values at any start give the same bits.
  for (moa::Index length : {7, 16, 33}) {
    std::vector<Scalar> reference;
    Scalar reference_total = 0;
    for (moa::Index start = 0; start < 17; ++start) {
      std::vector<Scalar> values(80, Scalar(0));
      std::copy(source.begin(), source.begin() + length, values.begin() + start);
      const Scalar total = moa::detail::exp_shifted_inplace(values.data() + start, length, offset, scale);
      const std::vector<Scalar> result(values.begin() + start, values.begin() + start + length);
      if (start == 0) {
        reference = result;
        reference_total = total;
      }
      REQUIRE(result == reference);
      REQUIRE(total == reference_total);
    }
  }
}
