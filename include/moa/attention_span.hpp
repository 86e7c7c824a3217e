// moa/attention_span.hpp - how far back an attention expert may look in causal self-attention.
//
//   full:      every earlier key (and the query's own).
//   streaming: an attention sink and a local window (StreamingLLM; DuoAttention's streaming heads):
//              the first `sink` positions and the last `window` up to the query's own.
//   elastic:   a sink and a window alpha + beta * N that grows with N = p + 1, the tokens so far
//              (Mixture of Sparse Attention's per-head spans). N is the query's own length, not
//              the sequence's, so decoding step by step sees exactly what the full forward sees.
// A query at position p sees keys [0, min(sink, p + 1)) and [max(0, p + 1 - w(p)), p], with
// w(p) = max(1, floor(alpha + beta * (p + 1))).
#pragma once

#include "moa/error.hpp"
#include "moa/tensor.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

namespace moa {

struct AttentionSpan {
  Index sink = 0;      // keys [0, sink) are always visible (with a window)
  double window = 0;   // alpha, in positions; 0 = full attention
  double growth = 0;   // beta: the window grows by beta per position, in [0, 1)

  static AttentionSpan full() { return {}; }
  static AttentionSpan streaming(Index sink, Index window) { return {sink, static_cast<double>(window), 0.0}; }
  static AttentionSpan elastic(Index sink, double alpha, double beta) { return {sink, alpha, beta}; }

  bool is_full() const { return window <= 0.0; }
  // A fixed window: what a query sees never reaches further back than sink + window keys.
  bool bounded() const { return !is_full() && growth == 0.0; }

  Index window_at(Index position) const {
    const double keys = std::floor(window + growth * static_cast<double>(position + 1));
    return keys >= kLongest ? static_cast<Index>(kLongest) : std::max<Index>(1, static_cast<Index>(keys));
  }
  static constexpr double kLongest = 1e15;  // a window past any sequence (and safe to convert)
  // The first key of the band that a query at `position` sees (0 for full attention).
  Index band_start(Index position) const { return is_full() ? 0 : std::max<Index>(0, position + 1 - window_at(position)); }

  void validate(const char* function, const std::string& what) const {
    MOA_CHECK(sink >= 0 && std::isfinite(window) && window >= 0.0 && std::isfinite(growth) && growth >= 0.0 &&
                  growth < 1.0,
              function, what, " has sink ", sink, ", window ", window, " and growth ", growth,
              ": expected sink >= 0, window >= 0 (0: full attention) and growth in [0, 1)");
    MOA_CHECK(!is_full() || (sink == 0 && growth == 0.0), function, what,
              " has no window (full attention) but a sink or growth: set window > 0");
  }

  std::string to_string() const {
    if (is_full()) return "full";
    std::string text = "sink " + std::to_string(sink) + " + window ";
    if (growth == 0.0) return text + std::to_string(window_at(0));
    char elastic[64];
    std::snprintf(elastic, sizeof elastic, "%g + %g N", window, growth);
    return text + elastic;
  }

  friend bool operator==(const AttentionSpan& a, const AttentionSpan& b) {
    return a.sink == b.sink && a.window == b.window && a.growth == b.growth;
  }
};

using LayerSpans = std::vector<std::vector<AttentionSpan>>;  // [layer][expert]

}  // namespace moa
