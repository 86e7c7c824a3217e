// compare_runs A B LOSS_TOLERANCE PARAMETER_TOLERANCE - for the data-parallel tests: two training
// runs' folders (each with metrics.jsonl and checkpoint.safetensors) agree when they logged the
// same steps with train and validation losses within LOSS_TOLERANCE (relative), and their
// checkpoints hold the
// same tensors (parameters and optimizer moments), each within PARAMETER_TOLERANCE of the tensor's
// largest magnitude. Prints the largest differences; exits 1 when they disagree.
#include "moa/io/safetensors.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <string>
#include <vector>

namespace {

// "train_loss" or "valid_loss" by step, where logged.
std::map<long long, double> losses(const std::string& folder, const std::string& key) {
  std::map<long long, double> losses;
  std::ifstream file(folder + "/metrics.jsonl");
  MOA_CHECK(file.good(), "compare_runs", "cannot open '", folder, "/metrics.jsonl'");
  for (std::string line; std::getline(file, line);) {
    const nlohmann::json entry = nlohmann::json::parse(line);
    if (entry.contains(key)) losses[entry.at("step").get<long long>()] = entry.at(key).get<double>();
  }
  return losses;
}

std::vector<double> tensor(const moa::SafetensorsFile& file, const std::string& name) {
  moa::Index count = 1;
  for (moa::Index extent : file.info(name).shape) count *= extent;
  std::vector<double> values(static_cast<std::size_t>(count));
  file.read(name, values.data(), values.size());
  return values;
}

int compare(const std::string& a, const std::string& b, double loss_tolerance, double parameter_tolerance) {
  bool agree = true;
  for (const std::string key : {"train_loss", "valid_loss"}) {
    const auto losses_a = losses(a, key), losses_b = losses(b, key);
    if (losses_a.size() != losses_b.size() || losses_a.empty()) {
      std::printf("%s: the runs logged %zu and %zu steps\n", key.c_str(), losses_a.size(), losses_b.size());
      return 1;
    }
    double worst_loss = 0;
    long long worst_step = 0;
    for (const auto& [step, loss] : losses_a) {
      const auto other = losses_b.find(step);
      if (other == losses_b.end()) {
        std::printf("%s: step %lld is logged in '%s' only\n", key.c_str(), step, a.c_str());
        return 1;
      }
      const double difference = std::abs(loss - other->second) / std::max(1.0, std::abs(loss));
      if (difference > worst_loss) worst_loss = difference, worst_step = step;
    }
    std::printf("%s: %zu steps, largest relative difference %.3g (step %lld; tolerance %g)\n", key.c_str(),
                losses_a.size(), worst_loss, worst_step, loss_tolerance);
    agree = agree && worst_loss <= loss_tolerance;
  }

  const moa::SafetensorsFile file_a(a + "/checkpoint.safetensors"), file_b(b + "/checkpoint.safetensors");
  if (file_a.metadata().at("step") != file_b.metadata().at("step")) {
    std::printf("the checkpoints are at steps %s and %s\n", file_a.metadata().at("step").c_str(),
                file_b.metadata().at("step").c_str());
    return 1;
  }
  double worst_tensor = 0;
  std::string worst_name;
  for (const auto& [name, info] : file_a.tensors()) {
    if (!file_b.contains(name) || file_b.info(name).shape != info.shape) {
      std::printf("tensor '%s' is missing from '%s' or has another shape\n", name.c_str(), b.c_str());
      return 1;
    }
    const std::vector<double> values_a = tensor(file_a, name), values_b = tensor(file_b, name);
    double largest = 0, difference = 0;
    for (std::size_t i = 0; i < values_a.size(); ++i) {
      largest = std::max(largest, std::abs(values_a[i]));
      difference = std::max(difference, std::abs(values_a[i] - values_b[i]));
    }
    const double relative = largest > 0 ? difference / largest : difference;
    if (relative > worst_tensor) worst_tensor = relative, worst_name = name;
  }
  std::printf("checkpoint: %zu tensors, largest difference %.3g of the tensor's largest magnitude ('%s'; tolerance %g)\n",
              file_a.tensors().size(), worst_tensor, worst_name.c_str(), parameter_tolerance);
  agree = agree && worst_tensor <= parameter_tolerance && file_b.tensors().size() == file_a.tensors().size();
  std::printf("%s\n", agree ? "the runs agree" : "the runs DISAGREE");
  return agree ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: compare_runs FOLDER_A FOLDER_B LOSS_TOLERANCE PARAMETER_TOLERANCE\n");
    return 2;
  }
  try {
    return compare(argv[1], argv[2], std::atof(argv[3]), std::atof(argv[4]));
  } catch (const std::exception& error) {
    std::fprintf(stderr, "compare_runs: error: %s\n", error.what());
    return 2;
  }
}
