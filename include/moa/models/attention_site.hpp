// moa/models/attention_site.hpp - where an attention layer sits in a model, as a model's
// for_each_attention reports it (for routing statistics, expert analyses, tests).
#pragma once

#include <string>

namespace moa {

struct AttentionSite {
  std::string name;            // its parameter prefix, e.g. "decoder.layers.0.encoder_attn"
  bool queries_from_source;    // its queries are source tokens (encoder), else target tokens (decoder)
};

}  // namespace moa
