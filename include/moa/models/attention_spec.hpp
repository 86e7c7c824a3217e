// moa/models/attention_spec.hpp - the attention of a model as a string: "moa:4K8E64D" (top-4 of 8
// experts, head width 64), "moa:8K8E128D:raw" (the same with the chosen probabilities as gates,
// not renormalised over the k, as in the authors' code), "moa-ec:4K8E64D" (expert-choice routing:
// each expert takes 4/8 of each sequence's tokens, so k per token on average; in encoder layers, see
// TransformerConfig; "moa-ec:4K8E64D:largest" with the largest-load capacity of moa/router.hpp) or
// "mha:4H64D" (4 heads of width 64), and its cost per token.
#pragma once

#include "moa/attention_cost.hpp"
#include "moa/error.hpp"
#include "moa/router.hpp"
#include "moa/tensor.hpp"

#include <cctype>
#include <string>

namespace moa {

// "moa:4K8E64D", "moa:4K8E64D:raw", "moa-ec:4K8E64D" or "mha:4H64D".
struct AttentionSpec {
  enum class Kind { moa, mha };
  Kind kind = Kind::moa;
  Index top_k = 0;        // moa
  Index num_experts = 0;  // moa
  Index num_heads = 0;    // mha
  Index head_dim = 0;
  GateNormalization gates = GateNormalization::renormalized;  // moa
  RoutingMode routing = RoutingMode::token_choice;            // moa
  ExpertCapacity capacity = ExpertCapacity::fixed;             // moa-ec

  static AttentionSpec parse(const std::string& text) {
    const char* function = "AttentionSpec::parse";
    const std::string expected =
        "expected 'moa:<k>K<E>E<d_h>D[:raw]' (e.g. moa:4K8E64D), 'moa-ec:<k>K<E>E<d_h>D[:largest]' or "
        "'mha:<h>H<d_h>D' (e.g. mha:4H64D)";
    AttentionSpec spec;
    std::size_t position = 0;
    for (const char* prefix : {"moa:", "moa-ec:", "mha:"}) {
      const std::string start = prefix;
      if (text.size() > start.size() && text.compare(0, start.size(), start) == 0) position = start.size();
    }
    MOA_CHECK(position > 0, function, "unknown attention spec '", text, "': ", expected);
    spec.kind = text.compare(0, 4, "mha:") == 0 ? Kind::mha : Kind::moa;
    if (text.compare(0, 7, "moa-ec:") == 0) spec.routing = RoutingMode::expert_choice;
    const std::string letters = spec.kind == Kind::moa ? "KED" : "HD";
    for (char letter : letters) {
      std::size_t end = position;
      while (end < text.size() && std::isdigit(static_cast<unsigned char>(text[end]))) ++end;
      MOA_CHECK(end > position && end < text.size() && end - position <= 9 && text[end] == letter, function,
                "unknown attention spec '", text, "': ", expected);
      const Index value = std::stol(text.substr(position, end - position));
      MOA_CHECK(value > 0, function, "attention spec '", text, "' has a zero count");
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
    MOA_CHECK(spec.kind == Kind::mha || spec.top_k <= spec.num_experts, function, "attention spec '", text,
              "' chooses top-", spec.top_k, " of only ", spec.num_experts, " experts");
    return spec;
  }

  std::string to_string() const {
    const std::string prefix = routing == RoutingMode::expert_choice ? "moa-ec:" : "moa:";
    return kind == Kind::moa ? prefix + std::to_string(top_k) + "K" + std::to_string(num_experts) + "E" +
                                   std::to_string(head_dim) + "D" + (gates == GateNormalization::raw ? ":raw" : "") +
                                   (capacity == ExpertCapacity::largest_load ? ":largest" : "")
                             : "mha:" + std::to_string(num_heads) + "H" + std::to_string(head_dim) + "D";
  }

  // FLOPs per token of one attention layer over `keys` keys (self or cross attention), counting
  // projections and attention; MoA adds its router. MoA with k experts and MHA with k heads of the
  // same width cost the same but for MHA's k key/value heads against MoA's one.
  double flops_per_token(Index model_dim, Index keys) const {
    const double d = static_cast<double>(model_dim), dh = static_cast<double>(head_dim), s = static_cast<double>(keys);
    if (kind == Kind::moa)
      return cost::moa_projections(d, dh, static_cast<double>(num_experts), 1.0, 1.0, static_cast<double>(top_k)) +
             cost::attention(static_cast<double>(top_k) * s, dh);
    const double heads = static_cast<double>(num_heads);
    return cost::mha_projections(d, heads * dh, 1.0, 1.0) + cost::attention(heads * s, dh);
  }
};

}  // namespace moa
