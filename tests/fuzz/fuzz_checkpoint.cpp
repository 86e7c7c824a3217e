// libFuzzer target: resuming a training run from an arbitrary checkpoint file, the metadata
// (step, rng, lr_scale, optimizer.steps, config) and the tensors (names, shapes, values) of a tiny
// model included. Every input must resume or throw moa::Error.
#include "common/training_loop.hpp"
#include "moa/linear.hpp"

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <unistd.h>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const std::string folder = [] {
    const std::string path = std::filesystem::temp_directory_path().string() + "/moa_fuzz_checkpoint_" +
                             std::to_string(::getpid());
    std::filesystem::create_directories(path);
    return path;
  }();
  {
    std::FILE* file = std::fopen((folder + "/checkpoint.safetensors").c_str(), "wb");
    if (file == nullptr) return 0;
    if (size > 0) std::fwrite(data, 1, size, file);
    std::fclose(file);
  }
  moa::Rng init(1);
  moa::Linear<float> layer(2, 2, true, init);
  const auto parameters = moa::parameters_of(layer, "layer.");
  moa::Adam<float> adam(parameters);
  moa::Rng rng(2);
  moa_examples::TrainingSettings settings;
  settings.folder = folder;
  settings.config = "fuzz";
  settings.steps = 100;
  settings.resume = true;
  moa_examples::TrainingLoop<float> loop(settings, parameters, adam, [](long long) { return 0.01; }, rng);
  try {
    loop.restore();
  } catch (const moa::Error&) {
  }
  return 0;
}
