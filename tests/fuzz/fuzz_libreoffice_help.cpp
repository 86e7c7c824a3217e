// libFuzzer target: the LibreOffice help reader on arbitrary bytes, as the German page and (after
// the first NUL byte, if any) the English page.
#include "common/libreoffice_help.hpp"

#include <cstddef>
#include <cstdint>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  const std::size_t split = text.find('\0');
  const std::string german = text.substr(0, split);
  const std::string english = split == std::string::npos ? text : text.substr(split + 1);
  try {
    moa_examples::align_help_page(german, english, "fuzz.html");
  } catch (const moa::Error&) {
  }
  return 0;
}
