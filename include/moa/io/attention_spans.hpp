// moa/io/attention_spans.hpp - per-layer, per-expert attention spans (moa/attention_span.hpp) from
// a JSON file, as Mixture of Sparse Attention ships its per-head alphas and betas:
//
//   {"layers": [
//     [{"sink": 4, "alpha": 64}, {"alpha": 0}, {"sink": 4, "alpha": 16, "beta": 0.25}, ...],
//     ...
//   ]}
//
// One array per layer, one object per expert: alpha (the window; 0 for full attention), beta (its
// growth per position, default 0), sink (default 0). Anything else is an error naming the file,
// the layer and the expert.
#pragma once

#include "moa/attention_span.hpp"
#include "moa/error.hpp"

#include <nlohmann/json.hpp>

#include <fstream>
#include <string>
#include <vector>

namespace moa {

inline LayerSpans parse_attention_spans(const std::string& text, const std::string& source = "spans") {
  const char* function = "parse_attention_spans";
  nlohmann::json root;
  try {
    root = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& error) {
    throw Error(std::string(function) + ": " + source + " is not JSON: " + error.what());
  }
  MOA_CHECK(root.is_object() && root.contains("layers") && root["layers"].is_array(), function, source,
            ": expected an object with an array \"layers\"");
  LayerSpans spans;
  for (std::size_t layer = 0; layer < root["layers"].size(); ++layer) {
    const nlohmann::json& experts = root["layers"][layer];
    const std::string where = source + " layer " + std::to_string(layer);
    MOA_CHECK(experts.is_array() && !experts.empty(), function, where, ": expected a non-empty array of experts");
    std::vector<AttentionSpan>& layer_spans = spans.emplace_back();
    for (std::size_t e = 0; e < experts.size(); ++e) {
      const nlohmann::json& entry = experts[e];
      const std::string what = where + " expert " + std::to_string(e);
      MOA_CHECK(entry.is_object(), function, what, ": expected an object {\"sink\", \"alpha\", \"beta\"}");
      for (const auto& item : entry.items())
        MOA_CHECK(item.key() == "sink" || item.key() == "alpha" || item.key() == "beta", function, what,
                  ": unknown key \"", item.key(), "\" (expected sink, alpha, beta)");
      MOA_CHECK(entry.contains("alpha") && entry["alpha"].is_number(), function, what,
                ": \"alpha\" (the window, 0 for full attention) must be a number");
      MOA_CHECK(!entry.contains("beta") || entry["beta"].is_number(), function, what, ": \"beta\" must be a number");
      MOA_CHECK(!entry.contains("sink") || entry["sink"].is_number_integer(), function, what,
                ": \"sink\" must be an integer");
      AttentionSpan span;
      span.window = entry["alpha"].get<double>();
      span.growth = entry.value("beta", 0.0);
      span.sink = entry.value("sink", Index(0));
      span.validate(function, what);
      layer_spans.push_back(span);
    }
  }
  return spans;
}

inline LayerSpans load_attention_spans(const std::string& path) {
  std::ifstream file(path);
  MOA_CHECK(file.good(), "load_attention_spans", "cannot open '", path, "'");
  const std::string text((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  return parse_attention_spans(text, "'" + path + "'");
}

}  // namespace moa
