// moa/top_k.hpp - top-k selection and the dispatch plan of a routed layer.
//
// A routed layer makes assignments token -> expert: with token choice N*k of them, id t*k + j for
// token t's slot j; with expert choice any number, numbered in the layer's own order. The
// dispatch plan groups the ids by expert (token order kept within an expert) with per-expert
// counts and offsets, so each expert's work is one gathered GEMM and experts no token chose cost
// nothing. It is shared by every routed layer (MoA now; MoH heads or MoE feed-forwards later).
#pragma once

#include "moa/error.hpp"
#include "moa/tensor.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace moa {

namespace detail {

// The insertion below mispredicts a branch on nearly every value that enters the list, which on
// router rows (E = 16-128 probabilities, k = 2-8) costs more than scanning the row again: here
// each of k passes takes the largest remaining value (packet maxima) and its first index, found
// packet by packet (E = 64, k = 4: 164 -> 122 ns a token against a scan value by value). About
// 2x faster there (150-280 ns a token before); slower when k is close to the length (base: k = E
// = 8) and on rows shorter than a packet (toy: E = 8, k = 2 under AVX-512: 40 ns against 21), so
// used only where it gains. Returns false, having written nothing, unless every value is
// finite: the insertion keeps its own order for NaNs and infinities.
template <typename Scalar>
bool top_k_by_passes(const Scalar* values, Index length, Index k, Index* chosen) {
  using Packet = typename Eigen::internal::packet_traits<Scalar>::type;
  constexpr Index width = Eigen::internal::packet_traits<Scalar>::size;
  constexpr Index kMaxLength = 256;
  if (k > 8 || length < 3 * k || length < width || length > kMaxLength) return false;
  alignas(64) Scalar work[kMaxLength + width];  // the row, padded to whole packets
  const Index padded = (length + width - 1) / width * width;
  std::copy_n(values, length, work);
  std::fill(work + length, work + padded, Scalar(0));
  Packet total = Eigen::internal::pset1<Packet>(Scalar(0));
  for (Index i = 0; i < padded; i += width) total = Eigen::internal::padd(total, Eigen::internal::pload<Packet>(work + i));
  const Scalar sum = Eigen::internal::predux(total);
  if (!std::isfinite(sum)) return false;  // a NaN or an infinity (or finite values summing past the range)
  // Padding and taken values become -inf: below every value, and never the largest while k < length.
  const Scalar taken = -std::numeric_limits<Scalar>::infinity();
  std::fill(work + length, work + padded, taken);
  for (Index j = 0; j < k; ++j) {
    Packet largest = Eigen::internal::pload<Packet>(work);
    for (Index i = width; i < padded; i += width) largest = Eigen::internal::pmax(largest, Eigen::internal::pload<Packet>(work + i));
    const Scalar top = Eigen::internal::predux_max(largest);
    // The first of equal values (ties go to the lower index): its packet, then its place there.
    const Packet wanted = Eigen::internal::pset1<Packet>(top);
    Index at = 0;
    while (!Eigen::internal::predux_any(Eigen::internal::pcmp_eq(Eigen::internal::pload<Packet>(work + at), wanted)))
      at += width;
    while (work[at] != top) ++at;
    chosen[j] = at;
    // Taken, in a store of the whole packet: a store of one lane, which the next pass's packet
    // load cannot take from the store buffer, stalled each pass (E = 32, k = 4: 62 -> 41 ns a row).
    const Index base = at / width * width;
    const Packet lane = Eigen::internal::pset1<Packet>(static_cast<Scalar>(at - base));
    const Packet here = Eigen::internal::pcmp_eq(Eigen::internal::plset<Packet>(Scalar(0)), lane);
    Eigen::internal::pstore(work + base, Eigen::internal::pselect(here, Eigen::internal::pset1<Packet>(taken),
                                                                  Eigen::internal::pload<Packet>(work + base)));
  }
  return true;
}

}  // namespace detail

// Writes the indices of the k largest of values[0..length) to chosen[0..k), largest first; ties
// go to the lower index, so the choice is reproducible.
template <typename Scalar>
void top_k_indices(const Scalar* values, Index length, Index k, Index* chosen) {
  MOA_CHECK(k > 0 && k <= length, "top_k_indices", "k = ", k, " must be in [1, ", length, "]");
  if (detail::top_k_by_passes(values, length, k, chosen)) return;
  // Insertion into a sorted list of k: one pass, and only strictly larger values move ahead, so
  // among equal values the earlier index stays first.
  // The k-th largest value so far is kept at hand: most values fall below it and cost one compare.
  Index filled = 0;
  Scalar kth_largest{};
  for (Index i = 0; i < length; ++i) {
    const Scalar value = values[i];
    if (filled == k && !(value > kth_largest)) continue;
    Index slot = filled < k ? filled++ : k - 1;
    while (slot > 0 && value > values[chosen[slot - 1]]) {
      chosen[slot] = chosen[slot - 1];
      --slot;
    }
    chosen[slot] = i;
    kth_largest = values[chosen[filled - 1]];
  }
}

struct DispatchPlan {
  Index num_experts = 0;
  Index top_k = 0;
  std::vector<Index> order;    // assignment ids grouped by expert
  std::vector<Index> offsets;  // [E + 1]: expert e's ids are order[offsets[e] .. offsets[e + 1])

  Index count(Index expert) const { return offsets[expert + 1] - offsets[expert]; }
  Index assignments() const { return static_cast<Index>(order.size()); }

  // Calls visit(expert, ids, count) for every expert with at least one assignment, in expert
  // order; ids points at its `count` assignment ids (ascending, so distinct tokens).
  template <typename Visit>
  void for_each_expert(Visit&& visit) const {
    for (Index e = 0; e < num_experts; ++e)
      if (count(e) > 0) visit(e, order.data() + offsets[e], count(e));
  }

  // experts: [A], the expert of each assignment, or -1 for an unrouted (padding) token; top_k:
  // the slots per token (1 where there is no fixed number).
  static DispatchPlan build(const std::vector<Index>& experts, Index num_experts, Index top_k) {
    MOA_CHECK(num_experts > 0 && top_k > 0, "DispatchPlan::build", "num_experts = ", num_experts, " and top_k = ",
              top_k, " must be positive");
    MOA_CHECK(static_cast<Index>(experts.size()) % top_k == 0, "DispatchPlan::build", "experts has ", experts.size(),
              " entries, not a multiple of top_k = ", top_k);
    DispatchPlan plan;
    plan.num_experts = num_experts;
    plan.top_k = top_k;
    plan.offsets.assign(static_cast<std::size_t>(num_experts + 1), 0);
    for (Index expert : experts) {
      MOA_CHECK(expert >= -1 && expert < num_experts, "DispatchPlan::build", "expert ", expert, " is outside [0, ",
                num_experts, ")");
      if (expert >= 0) ++plan.offsets[static_cast<std::size_t>(expert + 1)];
    }
    for (Index e = 0; e < num_experts; ++e) plan.offsets[e + 1] += plan.offsets[e];
    plan.order.resize(static_cast<std::size_t>(plan.offsets[num_experts]));
    std::vector<Index> next(plan.offsets.begin(), plan.offsets.end() - 1);
    for (Index id = 0; id < static_cast<Index>(experts.size()); ++id) {
      if (experts[id] >= 0) plan.order[static_cast<std::size_t>(next[experts[id]]++)] = id;
    }
    return plan;
  }
};

}  // namespace moa
