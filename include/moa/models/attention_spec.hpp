// moa/models/attention_spec.hpp - the attention of a model as a string: "moa:4K8E64D" (top-4 of 8
// experts, head width 64), "moa:8K8E128D:raw" (the same with the chosen probabilities as gates,
// not renormalised over the k, as in the authors' code), "moa-ec:4K8E64D" (expert-choice routing:
// each expert takes 4/8 of each sequence's tokens, so k per token on average; in encoder layers, see
// TransformerConfig; "moa-ec:4K8E64D:largest" with the largest-load capacity of moa/router.hpp),
// "moh:2S4K8H32D" (Mixture-of-Head attention: 2 shared heads and top-4 of 8 routed heads of width
// 32) or "mha:4H64D" (4 heads of width 64), and its cost per token.
#pragma once

#include "moa/attention_cost.hpp"
#include "moa/error.hpp"
#include "moa/router.hpp"
#include "moa/tensor.hpp"

#include <cctype>
#include <string>

namespace moa {

// "moa:4K8E64D", "moa:4K8E64D:raw", "moa-ec:4K8E64D", "moh:2S4K8H32D" or "mha:4H64D".
struct AttentionSpec {
  enum class Kind { moa, mha, moh };
  Kind kind = Kind::moa;
  Index top_k = 0;         // moa, moh (of the routed heads)
  Index num_experts = 0;   // moa
  Index num_heads = 0;     // mha; moh: the routed heads
  Index shared_heads = 0;  // moh
  Index head_dim = 0;
  GateNormalization gates = GateNormalization::renormalized;  // moa
  RoutingMode routing = RoutingMode::token_choice;            // moa
  ExpertCapacity capacity = ExpertCapacity::fixed;             // moa-ec

  static AttentionSpec parse(const std::string& text) {
    const char* function = "AttentionSpec::parse";
    const std::string expected =
        "expected 'moa:<k>K<E>E<d_h>D[:raw]' (e.g. moa:4K8E64D), 'moa-ec:<k>K<E>E<d_h>D[:largest]', "
        "'moh:<h_s>S<k>K<h_r>H<d_h>D' (e.g. moh:2S4K8H32D) or 'mha:<h>H<d_h>D' (e.g. mha:4H64D)";
    AttentionSpec spec;
    std::size_t position = 0;
    for (const char* prefix : {"moa:", "moa-ec:", "moh:", "mha:"}) {
      const std::string start = prefix;
      if (text.size() > start.size() && text.compare(0, start.size(), start) == 0) position = start.size();
    }
    MOA_CHECK(position > 0, function, "unknown attention spec '", text, "': ", expected);
    spec.kind = text.compare(0, 4, "mha:") == 0 ? Kind::mha : text.compare(0, 4, "moh:") == 0 ? Kind::moh : Kind::moa;
    if (text.compare(0, 7, "moa-ec:") == 0) spec.routing = RoutingMode::expert_choice;
    const std::string letters = spec.kind == Kind::moa ? "KED" : spec.kind == Kind::moh ? "SKHD" : "HD";
    for (char letter : letters) {
      std::size_t end = position;
      while (end < text.size() && std::isdigit(static_cast<unsigned char>(text[end]))) ++end;
      MOA_CHECK(end > position && end < text.size() && end - position <= 9 && text[end] == letter, function,
                "unknown attention spec '", text, "': ", expected);
      const Index value = std::stol(text.substr(position, end - position));
      MOA_CHECK(value > 0 || letter == 'S', function, "attention spec '", text, "' has a zero count");
      if (letter == 'S') spec.shared_heads = value;
      if (letter == 'K') spec.top_k = value;
      if (letter == 'E') spec.num_experts = value;
      if (letter == 'H') spec.num_heads = value;
      if (letter == 'D') spec.head_dim = value;
      position = end + 1;
    }
    // Expert choice's gates are the probabilities themselves: nothing to renormalise.
    if (spec.kind == Kind::moa && spec.routing == RoutingMode::token_choice &&
        text.compare(position, std::string::npos, ":raw") == 0) {
      spec.gates = GateNormalization::raw;
      position = text.size();
    }
    if (spec.routing == RoutingMode::expert_choice && text.compare(position, std::string::npos, ":largest") == 0) {
      spec.capacity = ExpertCapacity::largest_load;
      position = text.size();
    }
    MOA_CHECK(position == text.size(), function, "unknown attention spec '", text, "': ", expected);
    if (spec.kind == Kind::moa && spec.routing == RoutingMode::expert_choice)
      MOA_CHECK(spec.top_k <= spec.num_experts, function, "attention spec '", text, "' gives each expert ",
                spec.top_k, "/", spec.num_experts, " of the tokens, more than all of them");
    MOA_CHECK(spec.kind != Kind::moa || spec.top_k <= spec.num_experts, function, "attention spec '", text,
              "' chooses top-", spec.top_k, " of only ", spec.num_experts, " experts");
    MOA_CHECK(spec.kind != Kind::moh || spec.top_k <= spec.num_heads, function, "attention spec '", text,
              "' chooses top-", spec.top_k, " of only ", spec.num_heads, " routed heads");
    return spec;
  }

  std::string to_string() const {
    const std::string width = std::to_string(head_dim) + "D";
    if (kind == Kind::mha) return "mha:" + std::to_string(num_heads) + "H" + width;
    if (kind == Kind::moh)
      return "moh:" + std::to_string(shared_heads) + "S" + std::to_string(top_k) + "K" + std::to_string(num_heads) + "H" +
             width;
    const std::string prefix = routing == RoutingMode::expert_choice ? "moa-ec:" : "moa:";
    return prefix + std::to_string(top_k) + "K" + std::to_string(num_experts) + "E" + width +
           (gates == GateNormalization::raw ? ":raw" : "") + (capacity == ExpertCapacity::largest_load ? ":largest" : "");
  }

  // The name of the kind in tables and plots: MoA, MoA-EC, MoH or MHA.
  std::string kind_name() const {
    if (kind == Kind::mha) return "MHA";
    if (kind == Kind::moh) return "MoH";
    return routing == RoutingMode::expert_choice ? "MoA-EC" : "MoA";
  }

  // Heads (or expert queries) each token attends with: k for MoA, h_s + k for MoH, h for MHA.
  Index active_heads() const {
    return kind == Kind::moa ? top_k : kind == Kind::moh ? shared_heads + top_k : num_heads;
  }

  // FLOPs per token of one attention layer over `keys` keys (self or cross attention), counting
  // projections and attention; MoA and MoH add their routers. MoA with k experts and MHA with k
  // heads of the same width cost the same but for MHA's k key/value heads against MoA's one; MoH
  // computes the key and value heads of all h_s + h_r heads.
  double flops_per_token(Index model_dim, Index keys) const {
    const double d = static_cast<double>(model_dim), dh = static_cast<double>(head_dim), s = static_cast<double>(keys);
    const double active = static_cast<double>(active_heads());
    if (kind == Kind::moa)
      return cost::moa_projections(d, dh, static_cast<double>(num_experts), 1.0, 1.0, active) +
             cost::attention(active * s, dh);
    if (kind == Kind::moh)
      return cost::moh_projections(d, dh, static_cast<double>(shared_heads), static_cast<double>(num_heads), 1.0, 1.0,
                                   active) +
             cost::attention(active * s, dh);
    const double heads = static_cast<double>(num_heads);
    return cost::mha_projections(d, heads * dh, 1.0, 1.0) + cost::attention(heads * s, dh);
  }
};

}  // namespace moa
