// libFuzzer target: the attention spec parser ("moa:4K8E64D", "mha:4H64D") on arbitrary text; a
// spec that parses must print back to a string that parses to the same spec.
#include "moa/models/attention_spec.hpp"

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    const moa::AttentionSpec spec = moa::AttentionSpec::parse(text);
    const moa::AttentionSpec again = moa::AttentionSpec::parse(spec.to_string());
    if (again.to_string() != spec.to_string() || spec.head_dim <= 0) std::abort();
    spec.flops_per_token(512, 128);
  } catch (const moa::Error&) {
  }
  return 0;
}
