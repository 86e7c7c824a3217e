// moa/io/checkpoint.hpp - training checkpoints: parameters, Adam state and metadata in one
// safetensors file (optional: needs nlohmann_json, as moa/io/safetensors.hpp).
//
// Tensors: every parameter under its name, and "optimizer.exp_avg.<name>",
// "optimizer.exp_avg_sq.<name>" for Adam's moments. Metadata: the caller's strings plus
// "optimizer.steps" (and the checksums of moa/io/safetensors.hpp). Written atomically and verified
// before it replaces the old file; values that are not finite are refused both ways.
// average_parameters averages several such files (checkpoint averaging for evaluation).
#pragma once

#include "moa/error.hpp"
#include "moa/optimizer.hpp"
#include "moa/parameter.hpp"
#include "moa/io/safetensors.hpp"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <map>
#include <string>
#include <vector>

namespace moa {

// Metadata `key` of the file at `path` as a whole decimal number in [low, high], or an error naming
// the file and the key (a missing key, text, an over-long number, a value out of range).
inline long long metadata_integer(const std::map<std::string, std::string>& metadata, const std::string& path,
                                  const std::string& key, long long low, long long high, const char* function) {
  const auto found = metadata.find(key);
  MOA_CHECK(found != metadata.end(), function, "'", path, "' has no '", key, "' in its metadata");
  const std::string& text = found->second;
  char* end = nullptr;
  errno = 0;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  MOA_CHECK(!text.empty() && end == text.c_str() + text.size() && errno == 0, function, "'", path, "': metadata '",
            key, "' = '", text, "' is not a whole number");
  MOA_CHECK(value >= low && value <= high, function, "'", path, "': metadata '", key, "' = ", value, " is outside [",
            low, ", ", high, "]");
  return value;
}

// How save_checkpoint writes: the stored precision, a hook that forces the finished file to the
// disk (see SyncFile), and whether the file it replaces is kept beside it (previous_checkpoint).
struct CheckpointWriting {
  DType dtype = DType::F32;
  SyncFile sync;
  bool keep_previous = false;
};

// Where save_checkpoint keeps the file it replaced, given keep_previous.
inline std::string previous_checkpoint(const std::string& path) { return path + ".previous"; }

// Writes `path` so that a good checkpoint is never lost: values that are not finite are refused
// before anything is written; the new file goes to <path>.tmp, is read back and verified (its
// checksums), and only then replaces `path` (kept as previous_checkpoint(path) if asked).
template <typename Scalar>
void save_checkpoint(const std::string& path, const ParameterList<Scalar>& parameters, const Adam<Scalar>& optimizer,
                     std::map<std::string, std::string> metadata, const CheckpointWriting& writing = {}) {
  const char* function = "save_checkpoint";
  std::vector<TensorRef<Scalar>> tensors;
  for (const auto& entry : parameters) tensors.push_back({entry.name, entry.shape, entry.values().data()});
  for (std::size_t i = 0; i < parameters.size(); ++i) {
    const auto& shape = parameters[i].shape;
    tensors.push_back({"optimizer.exp_avg." + parameters[i].name, shape, optimizer.first_moment(i).data()});
    tensors.push_back({"optimizer.exp_avg_sq." + parameters[i].name, shape, optimizer.second_moment(i).data()});
  }
  for (const TensorRef<Scalar>& tensor : tensors) {
    Index count = 1;
    for (Index extent : tensor.shape) count *= extent;
    for (Index i = 0; i < count; ++i)
      MOA_CHECK(std::isfinite(tensor.data[i]), function, "tensor '", tensor.name, "' holds a non-finite value (",
                tensor.data[i], " at element ", i, "): '", path, "' was not written and is left as it was");
  }
  metadata["optimizer.steps"] = std::to_string(optimizer.steps());
  const std::string temporary = path + ".tmp";
  try {
    write_safetensors_file(temporary, tensors, writing.dtype, metadata, writing.sync);
    const SafetensorsFile written(temporary);  // verifies every checksum
    MOA_CHECK(written.tensors().size() == tensors.size(), function, "'", temporary, "' reads back ",
              written.tensors().size(), " tensors, not ", tensors.size());
    std::error_code error;
    if (writing.keep_previous && std::filesystem::exists(path, error)) replace_file(path, previous_checkpoint(path));
    replace_file(temporary, path);
  } catch (...) {
    std::remove(temporary.c_str());
    throw;
  }
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
  const long long optimizer_steps = metadata_integer(file.metadata(), path, "optimizer.steps", 0,
                                                                  std::numeric_limits<long long>::max(), function);
  // Everything read and checked (finite values) before the parameters or the optimizer change.
  std::vector<std::vector<Scalar>> values;
  for (const auto& entry : parameters) {
    const std::size_t count = static_cast<std::size_t>(entry.numel());
    for (const std::string& name : {entry.name, "optimizer.exp_avg." + entry.name, "optimizer.exp_avg_sq." + entry.name})
      values.push_back(detail::read_finite<Scalar>(file, name, count, function));
  }
  for (std::size_t i = 0; i < parameters.size(); ++i) {
    std::copy(values[3 * i].begin(), values[3 * i].end(), parameters[i].value().data());
    std::copy(values[3 * i + 1].begin(), values[3 * i + 1].end(), optimizer.first_moment(i).data());
    std::copy(values[3 * i + 2].begin(), values[3 * i + 2].end(), optimizer.second_moment(i).data());
  }
  optimizer.set_steps(optimizer_steps);
  return file.metadata();
}

// Sets the parameters to the mean of their values in several files: checkpoints (their optimizer
// tensors are ignored) or parameter files, as the Transformer recipe averages its last checkpoints
// for evaluation. Every file must hold every parameter with its shape and nothing else but
// optimizer state; the mean is taken in double, and nothing changes unless every file is good.
template <typename Scalar>
void average_parameters(const std::vector<std::string>& paths, const ParameterList<Scalar>& parameters) {
  const char* function = "average_parameters";
  MOA_CHECK(!paths.empty(), function, "no file to average");
  std::vector<std::vector<double>> sums;
  for (const auto& entry : parameters) sums.emplace_back(static_cast<std::size_t>(entry.numel()), 0.0);
  for (const std::string& path : paths) {
    const SafetensorsFile file(path);
    for (const auto& entry : parameters) {
      MOA_CHECK(file.contains(entry.name), function, "'", path, "' is missing tensor '", entry.name, "'");
      MOA_CHECK(file.info(entry.name).shape == entry.shape, function, "'", path, "': tensor '", entry.name,
                "' has shape ", detail::shape_string(file.info(entry.name).shape), " but the parameter has shape ",
                detail::shape_string(entry.shape));
    }
    for (const auto& item : file.tensors())
      MOA_CHECK(item.first.rfind("optimizer.", 0) == 0 || parameters.find(item.first) != nullptr, function, "'", path,
                "' has unexpected tensor '", item.first, "'");
    for (std::size_t i = 0; i < parameters.size(); ++i) {
      const auto values = detail::read_finite<Scalar>(file, parameters[i].name, sums[i].size(), function);
      for (std::size_t j = 0; j < values.size(); ++j) sums[i][j] += static_cast<double>(values[j]);
    }
  }
  const double count = static_cast<double>(paths.size());
  for (std::size_t i = 0; i < parameters.size(); ++i) {
    Scalar* value = parameters[i].value().data();
    for (std::size_t j = 0; j < sums[i].size(); ++j) value[j] = static_cast<Scalar>(sums[i][j] / count);
  }
}

}  // namespace moa
