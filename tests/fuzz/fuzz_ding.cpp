// libFuzzer target: the Ding dictionary reader on arbitrary text, with every filter option.
#include "common/ding.hpp"

#include <cstddef>
#include <cstdint>
#include <sstream>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  for (int options = 0; options < 4; ++options) {
    std::istringstream stream(text);
    moa_examples::DingOptions ding;
    ding.phrases = (options & 1) != 0;
    ding.sentences = true;
    ding.max_words = (options & 2) != 0 ? 3 : 0;
    try {
      moa_examples::read_ding(stream, ding);
    } catch (const moa::Error&) {
    }
  }
  return 0;
}
