// moa/io/checkpoint.hpp - training checkpoints: parameters, Adam state and metadata in one
// safetensors file (optional: needs nlohmann_json, as moa/io/safetensors.hpp).
//
// Tensors: every parameter under its name, and "optimizer.exp_avg.<name>",
// "optimizer.exp_avg_sq.<name>" for Adam's moments. Metadata: the caller's strings plus
// "optimizer.steps". Written atomically (see write_safetensors).
#pragma once

#include "moa/error.hpp"
#include "moa/optimizer.hpp"
#include "moa/parameter.hpp"
#include "moa/io/safetensors.hpp"

#include <map>
#include <string>
#include <vector>

namespace moa {

template <typename Scalar>
void save_checkpoint(const std::string& path, const ParameterList<Scalar>& parameters, const Adam<Scalar>& optimizer,
                     std::map<std::string, std::string> metadata, DType dtype = DType::F32, const SyncFile& sync = {}) {
  std::vector<TensorRef<Scalar>> tensors;
  for (const auto& entry : parameters) tensors.push_back({entry.name, entry.shape, entry.value().data()});
  for (std::size_t i = 0; i < parameters.size(); ++i) {
    const auto& shape = parameters[i].shape;
    tensors.push_back({"optimizer.exp_avg." + parameters[i].name, shape, optimizer.first_moment(i).data()});
    tensors.push_back({"optimizer.exp_avg_sq." + parameters[i].name, shape, optimizer.second_moment(i).data()});
  }
  metadata["optimizer.steps"] = std::to_string(optimizer.steps());
  write_safetensors(path, tensors, dtype, metadata, sync);
}

// Loads what save_checkpoint wrote. `expected` metadata entries must match (e.g. the model
// configuration), so a checkpoint of another configuration is refused with a clear message
// before anything changes. Returns the file's metadata.
template <typename Scalar>
std::map<std::string, std::string> load_checkpoint(const std::string& path, const ParameterList<Scalar>& parameters,
                                                   Adam<Scalar>& optimizer,
                                                   const std::map<std::string, std::string>& expected = {}) {
  const char* function = "load_checkpoint";
  const SafetensorsFile file(path);
  for (const auto& [key, value] : expected) {
    const auto found = file.metadata().find(key);
    MOA_CHECK(found != file.metadata().end() && found->second == value, function, "'", path, "' was written with ",
              key, " = '", (found == file.metadata().end() ? std::string("<none>") : found->second),
              "' but this run has '", value, "'");
  }
  const auto steps = file.metadata().find("optimizer.steps");
  MOA_CHECK(steps != file.metadata().end(), function, "'", path, "' has no optimizer.steps metadata");
  // Check every name and shape first, so a bad file changes nothing.
  for (const auto& entry : parameters) {
    for (const char* kind : {"optimizer.exp_avg.", "optimizer.exp_avg_sq."}) {
      const std::string name = kind + entry.name;
      MOA_CHECK(file.contains(name), function, "'", path, "' is missing tensor '", name, "'");
      MOA_CHECK(file.info(name).shape == entry.shape, function, "'", path, "': tensor '", name,
                "' has shape ", detail::shape_string(file.info(name).shape), " but the parameter has shape ",
                detail::shape_string(entry.shape));
    }
  }
  for (const auto& item : file.tensors()) {
    const std::string& name = item.first;
    const bool optimizer_tensor = name.rfind("optimizer.", 0) == 0;
    MOA_CHECK(optimizer_tensor || parameters.find(name) != nullptr, function, "'", path, "' has unexpected tensor '",
              name, "'");
  }
  for (const auto& entry : parameters) {
    MOA_CHECK(file.contains(entry.name), function, "'", path, "' is missing tensor '", entry.name, "'");
    MOA_CHECK(file.info(entry.name).shape == entry.shape, function, "'", path, "': tensor '", entry.name,
              "' has shape ", detail::shape_string(file.info(entry.name).shape), " but the parameter has shape ",
              detail::shape_string(entry.shape));
  }
  for (std::size_t i = 0; i < parameters.size(); ++i) {
    const auto& entry = parameters[i];
    const std::size_t count = static_cast<std::size_t>(entry.numel());
    file.read(entry.name, entry.value().data(), count);
    file.read("optimizer.exp_avg." + parameters[i].name, optimizer.first_moment(i).data(),
              count);
    file.read("optimizer.exp_avg_sq." + parameters[i].name, optimizer.second_moment(i).data(),
              count);
  }
  optimizer.set_steps(std::stoll(steps->second));
  return file.metadata();
}

}  // namespace moa
