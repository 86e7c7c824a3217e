// moa/io/safetensors.hpp - checkpoints in the safetensors format (optional: needs nlohmann_json).
//
// Layout: an 8-byte little-endian header length N, N bytes of JSON
//     {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
//      "__metadata__": {"key": "value"}}
// then the raw little-endian tensor data, offsets relative to the end of the header. The reader
// checks everything before touching data: a malformed file is a moa::Error, never a crash.
// F32 and F64 are read and written; a file written here loads in PyTorch's safetensors and back.
//
// Integrity: the format has no checksum, so the writer records one per tensor in __metadata__
// ("checksum.<name>": "xxh3_64:<16 hex digits>", xxHash's XXH3 over the tensor's stored bytes) and
// the reader verifies every one, naming the tensor that fails. Files without checksums (written by
// PyTorch) load as before; a file with some but not all is refused.
#pragma once

#include "moa/error.hpp"
#include "moa/parameter.hpp"
#include "moa/tensor.hpp"

#include <nlohmann/json.hpp>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <string>
#include <vector>

namespace moa {

enum class DType { F32, F64 };

inline const char* dtype_name(DType dtype) { return dtype == DType::F32 ? "F32" : "F64"; }
inline std::size_t dtype_size(DType dtype) { return dtype == DType::F32 ? 4 : 8; }

// A tensor to write: its name, logical shape and contiguous row-major data.
template <typename Scalar>
struct TensorRef {
  std::string name;
  std::vector<Index> shape;
  const Scalar* data;
};

namespace detail {

inline bool host_is_little_endian() {
  const std::uint16_t probe = 1;
  unsigned char first = 0;
  std::memcpy(&first, &probe, 1);
  return first == 1;
}

// Copies `count` elements of `width` bytes, reversing each element's bytes on a big-endian host.
inline void copy_little_endian(unsigned char* destination, const unsigned char* source, std::size_t count,
                               std::size_t width) {
  if (host_is_little_endian()) {
    std::memcpy(destination, source, count * width);
    return;
  }
  for (std::size_t i = 0; i < count; ++i)
    for (std::size_t b = 0; b < width; ++b) destination[i * width + b] = source[i * width + width - 1 - b];
}

inline std::string shape_string(const std::vector<Index>& shape) {
  std::string text = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

// Every dtype name the format defines; anything else in a header is malformed.
inline bool is_safetensors_dtype(const std::string& name) {
  static const char* const known[] = {"BOOL", "U8",  "I8",  "F8_E5M2", "F8_E4M3", "I16", "U16", "F16",
                                      "BF16", "I32", "U32", "F32",     "F64",     "I64", "U64"};
  return std::find_if(std::begin(known), std::end(known), [&](const char* k) { return name == k; }) != std::end(known);
}

// The metadata key of a tensor's checksum, and its value for the stored bytes.
inline const std::string& checksum_prefix() {
  static const std::string prefix = "checksum.";
  return prefix;
}
inline std::string checksum_of(const unsigned char* bytes, std::size_t size) {
  char text[32];
  std::snprintf(text, sizeof text, "xxh3_64:%016llx", static_cast<unsigned long long>(XXH3_64bits(bytes, size)));
  return text;
}

// The system's reason for the last failed call, for messages: "No such file or directory".
inline std::string system_reason() { return std::strerror(errno); }

}  // namespace detail

// Called on the finished temporary file before it is renamed; returns false on failure. Standard
// C++ cannot force bytes to the disk, so a program that must survive power loss passes one that
// does (POSIX: fsync(fileno(file))), as moa's trainers do.
using SyncFile = std::function<bool(std::FILE*)>;

// Writes the tensors to `path` itself (not atomically; see write_safetensors), with a checksum
// of each tensor in the metadata. Keys starting with "checksum." are reserved for those.
template <typename Scalar>
void write_safetensors_file(const std::string& path, const std::vector<TensorRef<Scalar>>& tensors,
                            DType dtype = DType::F32, const std::map<std::string, std::string>& metadata = {},
                            const SyncFile& sync = {}) {
  const char* function = "write_safetensors";
  // Every tensor in its stored form first: the checksums go in the header, before the data.
  std::vector<unsigned char> data;              // the data section
  std::vector<std::uint64_t> offsets{0};        // tensor i is data[offsets[i], offsets[i + 1])
  for (const TensorRef<Scalar>& tensor : tensors) {
    MOA_CHECK(!tensor.name.empty() && tensor.name != "__metadata__", function, "invalid tensor name '", tensor.name,
              "'");
    std::size_t count = 1;
    for (Index extent : tensor.shape) {
      MOA_CHECK(extent >= 0, function, "tensor '", tensor.name, "' has shape ", detail::shape_string(tensor.shape));
      count *= static_cast<std::size_t>(extent);
    }
    const std::size_t first = data.size();
    data.resize(first + count * dtype_size(dtype));
    if (dtype == DType::F32) {
      const std::vector<float> converted(tensor.data, tensor.data + count);
      detail::copy_little_endian(data.data() + first, reinterpret_cast<const unsigned char*>(converted.data()), count, 4);
    } else {
      const std::vector<double> converted(tensor.data, tensor.data + count);
      detail::copy_little_endian(data.data() + first, reinterpret_cast<const unsigned char*>(converted.data()), count, 8);
    }
    offsets.push_back(data.size());
  }
  std::map<std::string, std::string> all_metadata = metadata;
  for (const auto& entry : metadata)
    MOA_CHECK(entry.first.rfind(detail::checksum_prefix(), 0) != 0, function, "metadata key '", entry.first,
              "' is reserved for the checksums");
  for (std::size_t i = 0; i < tensors.size(); ++i)
    all_metadata[detail::checksum_prefix() + tensors[i].name] =
        detail::checksum_of(data.data() + offsets[i], static_cast<std::size_t>(offsets[i + 1] - offsets[i]));
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  header["__metadata__"] = all_metadata;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    MOA_CHECK(!header.contains(tensors[i].name), function, "duplicate tensor name '", tensors[i].name, "'");
    header[tensors[i].name] = {
        {"dtype", dtype_name(dtype)}, {"shape", tensors[i].shape}, {"data_offsets", {offsets[i], offsets[i + 1]}}};
  }
  std::string header_text = header.dump();
  header_text.append((8 - header_text.size() % 8) % 8, ' ');  // align the data to 8 bytes

  std::FILE* file = std::fopen(path.c_str(), "wb");
  MOA_CHECK(file != nullptr, function, "cannot open '", path, "' for writing: ", detail::system_reason());
  bool ok = true;
  int failure = 0;  // errno of the first failed call
  auto note = [&](bool success) {
    if (ok && !success) failure = errno;
    ok = ok && success;
  };
  auto put = [&](const void* bytes, std::size_t size) { note(size == 0 || std::fwrite(bytes, 1, size, file) == size); };
  unsigned char length_bytes[8];
  const std::uint64_t header_length = header_text.size();
  for (int b = 0; b < 8; ++b) length_bytes[b] = static_cast<unsigned char>(header_length >> (8 * b));
  put(length_bytes, 8);
  put(header_text.data(), header_text.size());
  put(data.data(), data.size());
  note(std::fflush(file) == 0);
  if (ok && sync) note(sync(file));
  note(std::fclose(file) == 0);
  if (!ok) std::remove(path.c_str());
  MOA_CHECK(ok, function, "writing '", path, "' failed: ", failure != 0 ? std::strerror(failure) : "unknown reason");
}

// Renames `from` to `to`, replacing it; a failure names both paths and the system's reason.
inline void replace_file(const std::string& from, const std::string& to) {
  MOA_CHECK(std::rename(from.c_str(), to.c_str()) == 0, "replace_file", "cannot rename '", from, "' to '", to,
            "': ", detail::system_reason());
}

// Writes the tensors to `path` atomically: the bytes go to a temporary file beside it, which is
// flushed (and synced, given `sync`) and then renamed over `path`, so a crash of the program
// leaves the old file or the new one.
template <typename Scalar>
void write_safetensors(const std::string& path, const std::vector<TensorRef<Scalar>>& tensors, DType dtype = DType::F32,
                       const std::map<std::string, std::string>& metadata = {}, const SyncFile& sync = {}) {
  const std::string temporary = path + ".tmp";
  write_safetensors_file(temporary, tensors, dtype, metadata, sync);
  try {
    replace_file(temporary, path);
  } catch (...) {
    std::remove(temporary.c_str());
    throw;
  }
}

// Reads and validates a whole safetensors file; tensors are then read by name, converted to the
// requested scalar type.
class SafetensorsFile {
 public:
  struct TensorInfo {
    DType dtype;
    std::vector<Index> shape;
    std::uint64_t begin;  // byte offset into the data section
    std::uint64_t end;
  };

  explicit SafetensorsFile(const std::string& path) : path_(path) {
    const char* function = "SafetensorsFile";
    std::error_code error;
    MOA_CHECK(!std::filesystem::is_directory(path, error), function, "'", path, "' is a directory, not a file");
    std::FILE* file = std::fopen(path.c_str(), "rb");
    MOA_CHECK(file != nullptr, function, "cannot open '", path, "': ", detail::system_reason());
    char chunk[1 << 16];
    std::size_t got = 0;
    while ((got = std::fread(chunk, 1, sizeof chunk, file)) > 0) bytes_.insert(bytes_.end(), chunk, chunk + got);
    const bool failed = std::ferror(file) != 0;
    const std::string reason = detail::system_reason();
    std::fclose(file);
    MOA_CHECK(!failed, function, "cannot read '", path, "': ", reason);
    parse();
  }

  // The same from the file's bytes, in memory; `name` stands for its path in messages.
  static SafetensorsFile from_bytes(std::vector<char> bytes, std::string name) {
    SafetensorsFile file;
    file.path_ = std::move(name);
    file.bytes_ = std::move(bytes);
    file.parse();
    return file;
  }

  const std::string& path() const { return path_; }
  // The file's metadata, without the checksums.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // Whether the file carries checksums (files written by moa do; PyTorch's do not).
  bool has_checksums() const { return !checksums_.empty(); }
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }

  const TensorInfo& info(const std::string& name) const {
    auto found = tensors_.find(name);
    MOA_CHECK(found != tensors_.end(), "SafetensorsFile::info", "'", path_, "' has no tensor named '", name, "'");
    return found->second;
  }

  // Copies tensor `name` into `destination` (row-major, `count` elements), converting its dtype.
  template <typename Scalar>
  void read(const std::string& name, Scalar* destination, std::size_t count) const {
    const TensorInfo& tensor = info(name);
    const std::size_t width = dtype_size(tensor.dtype);
    MOA_CHECK((tensor.end - tensor.begin) / width == count, "SafetensorsFile::read", "tensor '", name, "' has ",
              (tensor.end - tensor.begin) / width, " elements, destination has ", count);
    const unsigned char* source = reinterpret_cast<const unsigned char*>(bytes_.data()) + data_start_ + tensor.begin;
    if (tensor.dtype == DType::F32) {
      std::vector<float> values(count);
      detail::copy_little_endian(reinterpret_cast<unsigned char*>(values.data()), source, count, 4);
      std::copy(values.begin(), values.end(), destination);
    } else {
      std::vector<double> values(count);
      detail::copy_little_endian(reinterpret_cast<unsigned char*>(values.data()), source, count, 8);
      std::copy(values.begin(), values.end(), destination);
    }
  }

 private:
  static constexpr std::uint64_t kMaxHeaderLength = 100'000'000;  // as the reference implementation

  void parse() {
    const char* function = "SafetensorsFile";
    MOA_CHECK(bytes_.size() >= 8, function, "'", path_, "' is truncated: ", bytes_.size(),
              " bytes, fewer than the 8-byte header length");
    std::uint64_t header_length = 0;
    for (int b = 0; b < 8; ++b)
      header_length |= static_cast<std::uint64_t>(static_cast<unsigned char>(bytes_[b])) << (8 * b);
    MOA_CHECK(header_length <= kMaxHeaderLength, function, "'", path_, "' declares a header of ", header_length,
              " bytes, more than the limit of ", kMaxHeaderLength);
    MOA_CHECK(header_length <= bytes_.size() - 8, function, "'", path_, "' declares a header of ", header_length,
              " bytes, past the end of the file (", bytes_.size(), " bytes)");
    data_start_ = 8 + header_length;
    const std::uint64_t data_size = bytes_.size() - data_start_;

    nlohmann::json header;
    try {
      header = nlohmann::json::parse(bytes_.begin() + 8, bytes_.begin() + static_cast<std::ptrdiff_t>(data_start_));
    } catch (const nlohmann::json::exception& error) {
      MOA_CHECK(false, function, "'", path_, "' has a malformed JSON header: ", error.what());
    }
    MOA_CHECK(header.is_object(), function, "'", path_, "' has a header that is not a JSON object");

    std::vector<std::pair<std::uint64_t, std::uint64_t>> ranges;  // (begin, end) per tensor
    for (auto item = header.begin(); item != header.end(); ++item) {
      const std::string& name = item.key();
      const nlohmann::json& entry = item.value();
      if (name == "__metadata__") {
        MOA_CHECK(entry.is_object(), function, "'", path_, "': __metadata__ is not an object");
        for (auto meta = entry.begin(); meta != entry.end(); ++meta) {
          MOA_CHECK(meta.value().is_string(), function, "'", path_, "': __metadata__ value of '", meta.key(),
                    "' is not a string");
          const std::string& key = meta.key();
          if (key.rfind(detail::checksum_prefix(), 0) == 0)
            checksums_[key.substr(detail::checksum_prefix().size())] = meta.value().get<std::string>();
          else
            metadata_[key] = meta.value().get<std::string>();
        }
        continue;
      }
      MOA_CHECK(entry.is_object() && entry.contains("dtype") && entry.contains("shape") &&
                    entry.contains("data_offsets"),
                function, "'", path_, "': tensor '", name, "' needs dtype, shape and data_offsets");
      MOA_CHECK(entry["dtype"].is_string(), function, "'", path_, "': tensor '", name, "' has a non-string dtype");
      const std::string dtype = entry["dtype"].get<std::string>();
      MOA_CHECK(detail::is_safetensors_dtype(dtype), function, "'", path_, "': tensor '", name, "' has unknown dtype '",
                dtype, "'");
      MOA_CHECK(dtype == "F32" || dtype == "F64", function, "'", path_, "': tensor '", name, "' has dtype ", dtype,
                "; only F32 and F64 are supported");
      TensorInfo tensor{dtype == "F32" ? DType::F32 : DType::F64, {}, 0, 0};

      const nlohmann::json& shape = entry["shape"];
      MOA_CHECK(shape.is_array(), function, "'", path_, "': tensor '", name, "' has a shape that is not an array");
      std::uint64_t count = 1;
      for (const nlohmann::json& extent : shape) {
        MOA_CHECK(extent.is_number_unsigned(), function, "'", path_, "': tensor '", name,
                  "' has a shape entry that is not a non-negative integer");
        const std::uint64_t value = extent.get<std::uint64_t>();
        MOA_CHECK(value == 0 || count <= data_size / value, function, "'", path_, "': tensor '", name,
                  "' has a shape larger than the file");
        count *= value;
        tensor.shape.push_back(static_cast<Index>(value));
      }

      const nlohmann::json& offsets = entry["data_offsets"];
      MOA_CHECK(offsets.is_array() && offsets.size() == 2 && offsets[0].is_number_unsigned() &&
                    offsets[1].is_number_unsigned(),
                function, "'", path_, "': tensor '", name, "' needs data_offsets [begin, end] of non-negative integers");
      tensor.begin = offsets[0].get<std::uint64_t>();
      tensor.end = offsets[1].get<std::uint64_t>();
      MOA_CHECK(tensor.begin <= tensor.end && tensor.end <= data_size, function, "'", path_, "': tensor '", name,
                "' has data_offsets [", tensor.begin, ", ", tensor.end, "] out of range of the ", data_size,
                "-byte data section");
      MOA_CHECK(tensor.end - tensor.begin == count * dtype_size(tensor.dtype), function, "'", path_, "': tensor '",
                name, "' has shape ", detail::shape_string(tensor.shape), " of ", dtype, " (",
                count * dtype_size(tensor.dtype), " bytes) but data_offsets span ", tensor.end - tensor.begin,
                " bytes");
      ranges.emplace_back(tensor.begin, tensor.end);
      tensors_.emplace(name, std::move(tensor));
    }

    // The tensors must tile the data section exactly: no overlap, no hole, nothing left over.
    std::sort(ranges.begin(), ranges.end());
    std::uint64_t expected = 0;
    for (const auto& range : ranges) {
      MOA_CHECK(range.first >= expected, function, "'", path_, "': tensors overlap at byte ", range.first,
                " of the data section");
      MOA_CHECK(range.first == expected, function, "'", path_, "': bytes ", expected, " to ", range.first,
                " of the data section belong to no tensor");
      expected = range.second;
    }
    MOA_CHECK(expected == data_size, function, "'", path_, "': the data section has ", data_size,
              " bytes but the tensors cover ", expected);
    verify_checksums();
  }

  SafetensorsFile() = default;

  void verify_checksums() const {
    const char* function = "SafetensorsFile";
    if (checksums_.empty()) return;
    for (const auto& [name, stored] : checksums_)
      MOA_CHECK(tensors_.count(name) != 0, function, "'", path_, "' has a checksum for tensor '", name,
                "', which it does not hold");
    for (const auto& [name, tensor] : tensors_) {
      const auto found = checksums_.find(name);
      MOA_CHECK(found != checksums_.end(), function, "'", path_, "' has checksums, but none for tensor '", name, "'");
      const std::string computed = detail::checksum_of(
          reinterpret_cast<const unsigned char*>(bytes_.data()) + data_start_ + tensor.begin,
          static_cast<std::size_t>(tensor.end - tensor.begin));
      MOA_CHECK(found->second == computed, function, "'", path_, "': tensor '", name, "' fails its checksum (stored ",
                found->second, ", computed ", computed, "): the file is corrupted");
    }
  }

  std::string path_;
  std::vector<char> bytes_;
  std::uint64_t data_start_ = 0;
  std::map<std::string, std::string> metadata_;
  std::map<std::string, std::string> checksums_;  // tensor name -> "xxh3_64:<hex>"
  std::map<std::string, TensorInfo> tensors_;
};

namespace detail {

// Tensor `name` read as `count` values, refused if any is not finite: a checkpoint that holds a NaN
// or an infinity would only train on garbage.
template <typename Scalar>
std::vector<Scalar> read_finite(const SafetensorsFile& file, const std::string& name, std::size_t count,
                                const char* function) {
  std::vector<Scalar> values(count);
  file.read(name, values.data(), count);
  for (std::size_t i = 0; i < count; ++i)
    MOA_CHECK(std::isfinite(values[i]), function, "'", file.path(), "': tensor '", name, "' holds a non-finite value (",
              values[i], " at element ", i, ")");
  return values;
}

}  // namespace detail

// Saves every parameter under its full name.
template <typename Scalar>
void save_safetensors(const std::string& path, const ParameterList<Scalar>& parameters, DType dtype = DType::F32,
                      const std::map<std::string, std::string>& metadata = {}, const SyncFile& sync = {}) {
  std::vector<TensorRef<Scalar>> tensors;
  for (const auto& entry : parameters) tensors.push_back({entry.name, entry.shape, entry.values().data()});
  write_safetensors(path, tensors, dtype, metadata, sync);
}

// Loads every parameter by name. The file must hold exactly these names with these shapes: a
// missing name, an unexpected one or a shape mismatch throws before any parameter changes.
template <typename Scalar>
void load_safetensors(const SafetensorsFile& file, const ParameterList<Scalar>& parameters) {
  const char* function = "load_safetensors";
  for (const auto& entry : parameters) {
    MOA_CHECK(file.contains(entry.name), function, "'", file.path(), "' is missing tensor '", entry.name, "'");
    const auto& info = file.info(entry.name);
    MOA_CHECK(info.shape == entry.shape, function, "'", file.path(), "': tensor '", entry.name,
              "' has shape ", detail::shape_string(info.shape), " but the parameter has shape ",
              detail::shape_string(entry.shape));
  }
  for (const auto& item : file.tensors()) {
    MOA_CHECK(parameters.find(item.first) != nullptr, function, "'", file.path(), "' has unexpected tensor '",
              item.first, "'");
  }
  // Everything read and checked before any parameter changes.
  std::vector<std::vector<Scalar>> values;
  for (const auto& entry : parameters)
    values.push_back(detail::read_finite<Scalar>(file, entry.name, static_cast<std::size_t>(entry.numel()), function));
  for (std::size_t i = 0; i < parameters.size(); ++i)
    std::copy(values[i].begin(), values[i].end(), parameters[i].value().data());
}

template <typename Scalar>
void load_safetensors(const std::string& path, const ParameterList<Scalar>& parameters) {
  load_safetensors(SafetensorsFile(path), parameters);
}

}  // namespace moa
