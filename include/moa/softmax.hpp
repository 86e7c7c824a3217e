// moa/softmax.hpp - row softmax and log-softmax, optionally masked, with their backward passes.
//
// A mask is either additive (added to the logits; -infinity removes an entry) or boolean (true =
// keep). A masked entry gets probability 0 and gradient 0. A row with every entry masked yields
// all zeros - never NaN - so a padded query row is harmless. A NaN logit is never hidden: its row
// comes out NaN.
#pragma once

#include "moa/error.hpp"
#include "moa/tensor.hpp"

#include <cmath>
#include <limits>

namespace moa {

namespace detail {

// The largest of a row's values; NaN if any is NaN, so that a NaN row is never taken for a fully
// masked one (whose largest value is -inf); -inf for an empty row. Packets all the way (the tail
// through a copy padded with -inf), then the packet's lanes one by one: Eigen's
// maxCoeff<PropagateNaN> peeled an unaligned head and tail element by element and reduced its
// packet through memory with a branch per lane, which on attention's short rows cost more than the
// scan itself.
template <typename Scalar>
Scalar row_max(const Scalar* row, Index length) {
  namespace internal = Eigen::internal;
  using Packet = typename internal::packet_traits<Scalar>::type;
  constexpr Index kSize = internal::packet_traits<Scalar>::size;
  constexpr Scalar kLowest = -std::numeric_limits<Scalar>::infinity();
  const auto max_of = [](const Packet& a, const Packet& b) { return internal::pmax<Eigen::PropagateNaN>(a, b); };
  Packet maxima = internal::pset1<Packet>(kLowest);
  Index j = 0;
  if (length >= 4 * kSize) {  // four chains: one would wait on each maximum's latency (a vocabulary's rows)
    Packet more[3] = {maxima, maxima, maxima};
    for (; j + 4 * kSize <= length; j += 4 * kSize) {
      maxima = max_of(maxima, internal::ploadu<Packet>(row + j));
      for (int c = 0; c < 3; ++c) more[c] = max_of(more[c], internal::ploadu<Packet>(row + j + (c + 1) * kSize));
    }
    maxima = max_of(max_of(maxima, more[0]), max_of(more[1], more[2]));
  }
  for (; j + kSize <= length; j += kSize) maxima = max_of(maxima, internal::ploadu<Packet>(row + j));
  if (j < length) {
    Scalar tail[kSize];  // [kSize] the last length - j values, padded with -inf
    for (Index i = 0; i < kSize; ++i) tail[i] = j + i < length ? row[j + i] : kLowest;
    maxima = max_of(maxima, internal::ploadu<Packet>(tail));
  }
  Scalar lanes[kSize];  // [kSize]
  internal::pstoreu(lanes, maxima);
  Scalar result = kLowest;
  for (Index i = 0; i < kSize; ++i) {
    if (std::isnan(lanes[i])) return lanes[i];
    result = std::max(result, lanes[i]);
  }
  return result;
}

// target[j] = exp((source[j] - offset) * scale) for j < length (target may be source); returns
// their sum. Packets all the way, the tail through a padded copy: no element takes the scalar exp
// (the attention rows are short, so Eigen's scalar head and tail were a fifth of their softmax),
// and the result does not depend on where the row starts in memory.
template <typename Scalar>
Scalar exp_shifted(const Scalar* source, Scalar* target, Index length, Scalar offset, Scalar scale) {
  namespace internal = Eigen::internal;
  using Packet = typename internal::packet_traits<Scalar>::type;
  constexpr Index kSize = internal::packet_traits<Scalar>::size;
  const Packet packet_offset = internal::pset1<Packet>(offset), packet_scale = internal::pset1<Packet>(scale);
  const auto exp_of = [&](const Scalar* values) {
    return internal::pexp(internal::pmul(internal::psub(internal::ploadu<Packet>(values), packet_offset), packet_scale));
  };
  Packet sums = internal::pset1<Packet>(Scalar(0));
  Index j = 0;
  for (; j + kSize <= length; j += kSize) {
    const Packet exponentials = exp_of(source + j);
    internal::pstoreu(target + j, exponentials);
    sums = internal::padd(sums, exponentials);
  }
  Scalar total = internal::predux(sums);
  if (j < length) {
    Scalar tail[kSize];  // [kSize] the last length - j values, padded with the offset
    for (Index i = 0; i < kSize; ++i) tail[i] = j + i < length ? source[j + i] : offset;
    internal::pstoreu(tail, exp_of(tail));
    for (Index i = 0; j + i < length; ++i) {
      target[j + i] = tail[i];
      total += tail[i];
    }
  }
  return total;
}

// exp_shifted in place: values[j] = exp((values[j] - offset) * scale).
template <typename Scalar>
Scalar exp_shifted_inplace(Scalar* values, Index length, Scalar offset, Scalar scale) {
  return exp_shifted(values, values, length, offset, scale);
}

// In-place softmax of one row of `length` values; entries equal to -inf count as masked and get
// exactly 0. Returns the row's log-sum-exp (-inf for a fully masked row, which becomes zeros). A
// NaN anywhere in the row makes the whole row NaN.
template <typename Scalar>
Scalar softmax_row_inplace(Scalar* row, Index length) {
  const Scalar negative_infinity = -std::numeric_limits<Scalar>::infinity();
  Eigen::Map<Eigen::Array<Scalar, Eigen::Dynamic, 1>> values(row, length);
  const Scalar max_value = row_max(row, length);
  if (max_value == negative_infinity) {
    values.setZero();
    return negative_infinity;
  }
  // Packets with a padded tail: a router's rows (8 experts) are shorter than a packet, and Eigen's
  // exp took them one scalar exp at a time (toy's forward: 0.7% in libm's expf).
  const Scalar sum = exp_shifted_inplace(row, length, max_value, Scalar(1));
  // The packet exp of -inf is a denormal in double, not 0; flushing what underflows keeps masked
  // entries at exactly 0 (a plain loop, as Eigen's select would not vectorize here). Underflows
  // are below a sum of at least 1 by far more than float's precision, so the sum stands.
  const Scalar smallest_normal = std::numeric_limits<Scalar>::min(), inverse_sum = Scalar(1) / sum;
  for (Index j = 0; j < length; ++j) row[j] = row[j] < smallest_normal ? Scalar(0) : row[j] * inverse_sum;
  return max_value + std::log(sum);
}

// In-place log-softmax of one row; masked entries stay -inf, a fully masked row becomes zeros, and
// a NaN anywhere makes the whole row NaN.
template <typename Scalar>
void log_softmax_row_inplace(Scalar* row, Index length) {
  const Scalar negative_infinity = -std::numeric_limits<Scalar>::infinity();
  Eigen::Map<Eigen::Array<Scalar, Eigen::Dynamic, 1>> values(row, length);
  const Scalar max_value = row_max(row, length);
  if (max_value == negative_infinity) {
    values.setZero();
    return;
  }
  // The loss over a vocabulary spends most of its time in this exp. (The denormal exp(-inf)
  // cannot move a sum that is at least 1.)
  const Scalar log_normaliser = max_value + std::log((values - max_value).exp().sum());
  values -= log_normaliser;
}

template <typename Scalar>
void apply_bool_mask(Matrix<Scalar>& logits, const BoolMatrix& allowed, const char* function) {
  MOA_CHECK(allowed.rows() == logits.rows() && allowed.cols() == logits.cols(), function, "mask has shape ",
            shape_of(allowed), " but logits have shape ", shape_of(logits));
  const Scalar negative_infinity = -std::numeric_limits<Scalar>::infinity();
  for (Index i = 0; i < logits.rows(); ++i)
    for (Index j = 0; j < logits.cols(); ++j)
      if (!allowed(i, j)) logits(i, j) = negative_infinity;
}

template <typename Scalar>
void apply_additive_mask(Matrix<Scalar>& logits, const Matrix<Scalar>& additive_mask, const char* function) {
  MOA_CHECK(additive_mask.rows() == logits.rows() && additive_mask.cols() == logits.cols(), function,
            "mask has shape ", shape_of(additive_mask), " but logits have shape ", shape_of(logits));
  logits += additive_mask;
}

}  // namespace detail

// probabilities: [N, V]
template <typename Scalar>
Matrix<Scalar> softmax_rows(const Matrix<Scalar>& logits) {
  Matrix<Scalar> probabilities = logits;
  for (Index i = 0; i < probabilities.rows(); ++i) detail::softmax_row_inplace(probabilities.row(i).data(), probabilities.cols());
  return probabilities;
}

template <typename Scalar>
Matrix<Scalar> softmax_rows(const Matrix<Scalar>& logits, const Matrix<Scalar>& additive_mask) {
  Matrix<Scalar> masked = logits;
  detail::apply_additive_mask(masked, additive_mask, "softmax_rows");
  return softmax_rows(masked);
}

template <typename Scalar>
Matrix<Scalar> softmax_rows(const Matrix<Scalar>& logits, const BoolMatrix& allowed) {
  Matrix<Scalar> masked = logits;
  detail::apply_bool_mask(masked, allowed, "softmax_rows");
  return softmax_rows(masked);
}

// d logits = p * (d p - rowsum(d p * p)); masked entries have p = 0 and so get 0.
template <typename Scalar>
Matrix<Scalar> softmax_rows_backward(const Matrix<Scalar>& probabilities, const Matrix<Scalar>& grad_probabilities) {
  MOA_CHECK(probabilities.rows() == grad_probabilities.rows() && probabilities.cols() == grad_probabilities.cols(),
            "softmax_rows_backward", "grad_probabilities has shape ", detail::shape_of(grad_probabilities),
            " but probabilities have shape ", detail::shape_of(probabilities));
  const ColumnVector<Scalar> dot = probabilities.cwiseProduct(grad_probabilities).rowwise().sum();  // [N]
  Matrix<Scalar> grad_logits = grad_probabilities;
  grad_logits.colwise() -= dot;
  return grad_logits.cwiseProduct(probabilities);
}

// log_probabilities: [N, V]
template <typename Scalar>
Matrix<Scalar> log_softmax_rows(const Matrix<Scalar>& logits) {
  Matrix<Scalar> log_probabilities = logits;
  for (Index i = 0; i < log_probabilities.rows(); ++i)
    detail::log_softmax_row_inplace(log_probabilities.row(i).data(), log_probabilities.cols());
  return log_probabilities;
}

template <typename Scalar>
Matrix<Scalar> log_softmax_rows(const Matrix<Scalar>& logits, const Matrix<Scalar>& additive_mask) {
  Matrix<Scalar> masked = logits;
  detail::apply_additive_mask(masked, additive_mask, "log_softmax_rows");
  return log_softmax_rows(masked);
}

template <typename Scalar>
Matrix<Scalar> log_softmax_rows(const Matrix<Scalar>& logits, const BoolMatrix& allowed) {
  Matrix<Scalar> masked = logits;
  detail::apply_bool_mask(masked, allowed, "log_softmax_rows");
  return log_softmax_rows(masked);
}

// d logits = d y - softmax * rowsum(d y), with 0 at masked entries (log-probability -inf) and in
// fully masked rows.
template <typename Scalar>
Matrix<Scalar> log_softmax_rows_backward(const Matrix<Scalar>& log_probabilities,
                                         const Matrix<Scalar>& grad_log_probabilities) {
  MOA_CHECK(log_probabilities.rows() == grad_log_probabilities.rows() &&
                log_probabilities.cols() == grad_log_probabilities.cols(),
            "log_softmax_rows_backward", "grad_log_probabilities has shape ",
            detail::shape_of(grad_log_probabilities), " but log_probabilities have shape ",
            detail::shape_of(log_probabilities));
  const Scalar negative_infinity = -std::numeric_limits<Scalar>::infinity();
  Matrix<Scalar> grad_logits(log_probabilities.rows(), log_probabilities.cols());  // [N, V]
  for (Index i = 0; i < log_probabilities.rows(); ++i) {
    // A fully masked row was output as zeros, which no real log-softmax row of width > 1 is; it
    // does not depend on the logits. (Width 1 gives gradient 0 either way.)
    const bool fully_masked = (log_probabilities.row(i).array() == Scalar(0)).all();
    Scalar total = 0;
    for (Index j = 0; j < log_probabilities.cols(); ++j)
      if (log_probabilities(i, j) != negative_infinity) total += grad_log_probabilities(i, j);
    for (Index j = 0; j < log_probabilities.cols(); ++j) {
      const Scalar value = log_probabilities(i, j);
      grad_logits(i, j) = (fully_masked || value == negative_infinity)
                              ? Scalar(0)
                              : grad_log_probabilities(i, j) - std::exp(value) * total;
    }
  }
  return grad_logits;
}

}  // namespace moa
