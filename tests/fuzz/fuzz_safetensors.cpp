// libFuzzer target: the safetensors reader on arbitrary bytes. Every input must parse or throw
// moa::Error; anything else (a crash, a sanitizer report, another exception) is a finding.
#include "moa/io/safetensors.hpp"

#include <cstddef>
#include <cstdint>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const moa::SafetensorsFile file =
        moa::SafetensorsFile::from_bytes(std::vector<char>(data, data + size), "fuzz input");
    for (const auto& [name, info] : file.tensors()) {
      std::size_t count = 1;
      for (moa::Index extent : info.shape) count *= static_cast<std::size_t>(extent);
      std::vector<double> values(count);
      file.read(name, values.data(), count);
    }
  } catch (const moa::Error&) {
  }
  return 0;
}
