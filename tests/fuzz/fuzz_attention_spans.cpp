// libFuzzer target: the JSON reader of per-layer, per-expert attention spans on arbitrary bytes.
// Whatever it accepts is valid: every span passes validate and gives windows of at least one key.
#include "moa/io/attention_spans.hpp"

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    for (const auto& layer : moa::parse_attention_spans(text))
      for (const moa::AttentionSpan& span : layer) {
        span.validate("fuzz", "span");
        if (!span.is_full() && (span.window_at(0) < 1 || span.band_start(1000) > 1000)) std::abort();
      }
  } catch (const moa::Error&) {
  }
  return 0;
}
