#include "support.hpp"

#include "moa/io/safetensors.hpp"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>

using namespace moa_test;

namespace {

// Writes a file: 8-byte little-endian length of `header`, `header`, then `data`.
std::string write_raw(const std::string& name, const std::string& header, const std::string& data,
                      std::uint64_t declared_length) {
  const std::string path = temporary_path(name);
  std::ofstream file(path, std::ios::binary);
  for (int b = 0; b < 8; ++b) file.put(static_cast<char>((declared_length >> (8 * b)) & 0xFF));
  file << header << data;
  return path;
}

std::string write_raw(const std::string& name, const std::string& header, const std::string& data) {
  return write_raw(name, header, data, header.size());
}

// 1.0f and -2.5f, little-endian.
const std::string kTwoFloats("\x00\x00\x80\x3F\x00\x00\x20\xC0", 8);

struct TwoTensors {
  moa::Parameter<double> a{"a", {2}};
  moa::Parameter<double> b{"b", {1, 1}};
  moa::ParameterList<double> list() {
    moa::ParameterList<double> parameters;
    parameters.add("", a);
    parameters.add("", b);
    return parameters;
  }
};

}  // namespace

TEMPLATE_TEST_CASE("safetensors: round trip in F32 and F64 with metadata", "[safetensors]", float, double) {
  moa::Rng rng(0);
  moa::Linear<TestType> saved(4, 3, true, rng), loaded(4, 3, true, rng);
  moa::init_normal(saved.bias, rng, 0.0, 1.0);
  for (moa::DType dtype : {moa::DType::F32, moa::DType::F64}) {
    const std::string path = temporary_path("round_trip.safetensors");
    moa::save_safetensors(path, moa::parameters_of(saved, "layer."), dtype, {{"format", "pt"}, {"step", "12"}});
    const moa::SafetensorsFile file(path);
    REQUIRE(file.metadata().at("step") == "12");
    REQUIRE(file.info("layer.weight").shape == std::vector<moa::Index>{3, 4});
    REQUIRE(file.info("layer.bias").dtype == dtype);
    moa::load_safetensors(file, moa::parameters_of(loaded, "layer."));
    if (dtype == moa::DType::F64 || std::is_same<TestType, float>::value) {
      REQUIRE(loaded.weight.value == saved.weight.value);
    } else {
      REQUIRE(loaded.weight.value.isApprox(saved.weight.value, 1e-7));
    }
    std::ifstream temporary(path + ".tmp");
    REQUIRE_FALSE(temporary.good());  // the temporary file was renamed away
  }
}

TEST_CASE("safetensors: a file written byte by byte loads", "[safetensors]") {
  const std::string header =
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
      R"("b":{"dtype":"F64","shape":[1,1],"data_offsets":[8,16]},"__metadata__":{"who":"hand"}})";
  const std::string one_and_a_half("\x00\x00\x00\x00\x00\x00\xF8\x3F", 8);  // 1.5 as F64
  const std::string path = write_raw("by_hand.safetensors", header, kTwoFloats + one_and_a_half);
  TwoTensors model;
  moa::load_safetensors(path, model.list());
  REQUIRE(model.a.value(0, 0) == 1.0);
  REQUIRE(model.a.value(0, 1) == -2.5);
  REQUIRE(model.b.value(0, 0) == 1.5);
  REQUIRE(moa::SafetensorsFile(path).metadata().at("who") == "hand");
}

TEST_CASE("safetensors: the writer's bytes are the documented layout", "[safetensors]") {
  moa::Parameter<float> a("a", {2});
  a.value << 1.0f, -2.5f;
  moa::ParameterList<float> list;
  list.add("", a);
  const std::string path = temporary_path("layout.safetensors");
  moa::save_safetensors(path, list);
  std::ifstream file(path, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  std::uint64_t header_length = 0;
  for (int b = 0; b < 8; ++b) header_length |= std::uint64_t(static_cast<unsigned char>(bytes[b])) << (8 * b);
  REQUIRE(header_length % 8 == 0);
  REQUIRE(bytes.size() == 8 + header_length + 8);
  REQUIRE(bytes.substr(8, header_length).find(R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})") !=
          std::string::npos);
  REQUIRE(bytes.substr(8 + header_length) == kTwoFloats);
}

TEST_CASE("safetensors: malformed files are rejected with a clear moa::Error", "[safetensors][errors]") {
  TwoTensors model;
  const auto list = model.list();
  const std::string good_b = R"("b":{"dtype":"F32","shape":[1,1],"data_offsets":[8,12]})";
  const std::string twelve_bytes = kTwoFloats + std::string("\x00\x00\x80\x3F", 4);

  REQUIRE_MOA_ERROR(moa::load_safetensors(temporary_path("does_not_exist.safetensors"), list), "cannot open");
  {
    const std::string path = temporary_path("truncated.safetensors");
    std::ofstream(path, std::ios::binary) << "abc";
    REQUIRE_MOA_ERROR(moa::load_safetensors(path, list), "is truncated: 3 bytes");
  }
  REQUIRE_MOA_ERROR(moa::load_safetensors(write_raw("past_end.safetensors", "{}", "", 1000), list),
                    "declares a header of 1000 bytes, past the end of the file");
  REQUIRE_MOA_ERROR(moa::load_safetensors(write_raw("huge.safetensors", "{}", "", ~std::uint64_t{0}), list),
                    "more than the limit");
  REQUIRE_MOA_ERROR(moa::load_safetensors(write_raw("json.safetensors", R"({"a": {"dtype": )", ""), list),
                    "malformed JSON header");
  REQUIRE_MOA_ERROR(moa::load_safetensors(write_raw("array.safetensors", "[1, 2]", ""), list),
                    "not a JSON object");
  REQUIRE_MOA_ERROR(
      moa::load_safetensors(
          write_raw("unknown.safetensors", R"({"a":{"dtype":"Q7","shape":[2],"data_offsets":[0,8]}})", kTwoFloats),
          list),
      "tensor 'a' has unknown dtype 'Q7'");
  REQUIRE_MOA_ERROR(
      moa::load_safetensors(
          write_raw("f16.safetensors", R"({"a":{"dtype":"F16","shape":[4],"data_offsets":[0,8]}})", kTwoFloats), list),
      "dtype F16; only F32 and F64 are supported");
  REQUIRE_MOA_ERROR(
      moa::load_safetensors(write_raw("fields.safetensors", R"({"a":{"dtype":"F32","shape":[2]}})", kTwoFloats), list),
      "needs dtype, shape and data_offsets");
  REQUIRE_MOA_ERROR(
      moa::load_safetensors(
          write_raw("negative.safetensors", R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", kTwoFloats),
          list),
      "not a non-negative integer");
  REQUIRE_MOA_ERROR(
      moa::load_safetensors(
          write_raw("range.safetensors", R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", kTwoFloats),
          list),
      "data_offsets [4, 12] out of range");
  REQUIRE_MOA_ERROR(
      moa::load_safetensors(
          write_raw("reversed.safetensors", R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", kTwoFloats),
          list),
      "out of range");
  REQUIRE_MOA_ERROR(
      moa::load_safetensors(
          write_raw("size.safetensors", R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", kTwoFloats), list),
      "shape [3] of F32 (12 bytes) but data_offsets span 8 bytes");
  REQUIRE_MOA_ERROR(
      moa::load_safetensors(
          write_raw("overlap.safetensors",
                    R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                    R"("b":{"dtype":"F32","shape":[1,1],"data_offsets":[4,8]}})",
                    kTwoFloats),
          list),
      "tensors overlap at byte 4");
  REQUIRE_MOA_ERROR(
      moa::load_safetensors(
          write_raw("hole.safetensors", R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", kTwoFloats), list),
      "bytes 0 to 4 of the data section belong to no tensor");
  REQUIRE_MOA_ERROR(
      moa::load_safetensors(
          write_raw("tail.safetensors", R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", kTwoFloats), list),
      "the data section has 8 bytes but the tensors cover 4");
  REQUIRE_MOA_ERROR(moa::load_safetensors(write_raw("metadata.safetensors",
                                                    R"({"__metadata__":{"k":1},"a":{"dtype":"F32","shape":[2],)"
                                                    R"("data_offsets":[0,8]}})",
                                                    kTwoFloats),
                                          list),
                    "__metadata__ value of 'k' is not a string");

  // Well-formed files that do not match the parameters.
  REQUIRE_MOA_ERROR(
      moa::load_safetensors(
          write_raw("missing.safetensors", R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", kTwoFloats),
          list),
      "is missing tensor 'b'");
  REQUIRE_MOA_ERROR(moa::load_safetensors(
                        write_raw("unexpected.safetensors",
                                  R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)" + good_b +
                                      R"(,"c":{"dtype":"F32","shape":[0],"data_offsets":[12,12]}})",
                                  twelve_bytes),
                        list),
                    "has unexpected tensor 'c'");
  REQUIRE_MOA_ERROR(moa::load_safetensors(
                        write_raw("mismatch.safetensors",
                                  R"({"a":{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]},)" + good_b + "}",
                                  twelve_bytes),
                        list),
                    "tensor 'a' has shape [1, 2] but the parameter has shape [2]");
  // A rejected file leaves the parameters unchanged.
  REQUIRE(model.a.value.isZero(0));
}

TEST_CASE("safetensors: writing bad names or to a missing folder throws", "[safetensors][errors]") {
  moa::Parameter<float> a("a", {2});
  moa::ParameterList<float> list;
  list.add("", a);
  REQUIRE_MOA_ERROR(moa::save_safetensors(temporary_path("no/such/folder/x.safetensors"), list), "cannot open");
  const float values[2] = {1, 2};
  REQUIRE_MOA_ERROR(moa::write_safetensors<float>(temporary_path("dup.safetensors"),
                                                  {{"x", {2}, values}, {"x", {2}, values}}),
                    "duplicate tensor name 'x'");
  REQUIRE_MOA_ERROR(moa::write_safetensors<float>(temporary_path("meta.safetensors"), {{"__metadata__", {2}, values}}),
                    "invalid tensor name");
}

TEST_CASE("safetensors: the sync hook runs on the finished file; when it fails the old file stays", "[safetensors][errors]") {
  const float first[2] = {1, 2}, second[2] = {3, 4};
  const std::string path = temporary_path("sync.safetensors");
  long synced_bytes = -1;
  moa::write_safetensors<float>(path, {{"x", {2}, first}}, moa::DType::F32, {}, [&](std::FILE* file) {
    synced_bytes = std::ftell(file);
    return true;
  });
  REQUIRE(synced_bytes > 8);  // called after the last byte was written
  REQUIRE_MOA_ERROR(moa::write_safetensors<float>(path, {{"x", {2}, second}}, moa::DType::F32, {},
                                                  [](std::FILE*) { return false; }),
                    "write_safetensors: writing '" + path + ".tmp' failed");
  float loaded[2] = {0, 0};
  moa::SafetensorsFile(path).read("x", loaded, 2);
  REQUIRE(loaded[0] == 1.0f);
  REQUIRE(loaded[1] == 2.0f);
  REQUIRE_FALSE(std::ifstream(path + ".tmp").good());
  std::remove(path.c_str());
}

TEST_CASE("safetensors: every tensor carries a checksum; a corrupted data byte is refused, naming the tensor",
          "[safetensors][errors]") {
  moa::Parameter<float> a("a", {3}), b("b", {2, 2});
  a.value << 1.0f, 2.0f, 3.0f;
  b.value << 4.0f, 5.0f, 6.0f, 7.0f;
  moa::ParameterList<float> list;
  list.add("", a);
  list.add("", b);
  const std::string path = temporary_path("checksum.safetensors");
  moa::save_safetensors(path, list, moa::DType::F32, {{"step", "3"}});
  const moa::SafetensorsFile good(path);
  REQUIRE(good.has_checksums());
  REQUIRE(good.metadata() == std::map<std::string, std::string>{{"step", "3"}});  // checksums kept apart
  std::string bytes;
  {
    std::ifstream file(path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>());
  }
  // Flip the exponent byte of each float in turn: the tensor it belongs to is named.
  const std::size_t data_start = bytes.size() - 7 * 4;
  for (std::size_t element = 0; element < 7; ++element) {
    std::string corrupted = bytes;
    corrupted[data_start + element * 4 + 3] = static_cast<char>(corrupted[data_start + element * 4 + 3] ^ 0x40);
    const std::string bad = temporary_path("checksum_bad.safetensors");
    std::ofstream(bad, std::ios::binary) << corrupted;
    REQUIRE_MOA_ERROR(moa::SafetensorsFile{bad},
                      std::string("tensor '") + (element < 3 ? "a" : "b") + "' fails its checksum");
  }
  // A stored checksum that does not match its own tensor, and checksums for some tensors only.
  const std::string header_a = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)";
  REQUIRE_MOA_ERROR(moa::SafetensorsFile(write_raw("wrong_sum.safetensors",
                                                   header_a + R"("__metadata__":{"checksum.a":"xxh3_64:0000000000000000"}})",
                                                   kTwoFloats)),
                    "tensor 'a' fails its checksum (stored xxh3_64:0000000000000000");
  REQUIRE_MOA_ERROR(moa::SafetensorsFile(write_raw("orphan_sum.safetensors",
                                                   header_a + R"("__metadata__":{"checksum.z":"xxh3_64:0"}})",
                                                   kTwoFloats)),
                    "has a checksum for tensor 'z', which it does not hold");
  const float values[1] = {1};
  REQUIRE_MOA_ERROR(moa::write_safetensors<float>(temporary_path("reserved.safetensors"), {{"x", {1}, values}},
                                                  moa::DType::F32, {{"checksum.x", "mine"}}),
                    "metadata key 'checksum.x' is reserved");
}

TEST_CASE("safetensors: a file with checksums for some tensors only is refused", "[safetensors][errors]") {
  const float values[1] = {1};
  const std::string path = temporary_path("one_sum.safetensors");
  moa::write_safetensors<float>(path, {{"a", {1}, values}});
  const std::string stored = [&] {
    std::ifstream file(path, std::ios::binary);
    const std::string bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
    const auto at = bytes.find("xxh3_64:");
    return bytes.substr(at, 24);
  }();
  const std::string header =
      R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},)"
      R"("__metadata__":{"checksum.a":")" + stored + R"("}})";
  const std::string one_one("\x00\x00\x80\x3F\x00\x00\x80\x3F", 8);
  REQUIRE_MOA_ERROR(moa::SafetensorsFile(write_raw("some_sums.safetensors", header, one_one)),
                    "has checksums, but none for tensor 'b'");
}

TEST_CASE("safetensors: non-finite values are refused on load, naming the tensor; nothing changes",
          "[safetensors][errors]") {
  TwoTensors model;
  model.a.value << 7.0, 8.0;
  const std::string header =
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1,1],"data_offsets":[8,12]}})";
  const std::string nan_bytes("\x00\x00\xC0\x7F", 4), infinity_bytes("\x00\x00\x80\x7F", 4);
  REQUIRE_MOA_ERROR(moa::load_safetensors(write_raw("nan.safetensors", header, kTwoFloats + nan_bytes), model.list()),
                    "tensor 'b' holds a non-finite value (nan at element 0)");
  REQUIRE_MOA_ERROR(moa::load_safetensors(write_raw("inf.safetensors", header, infinity_bytes + kTwoFloats),
                                          model.list()),
                    "tensor 'a' holds a non-finite value (inf at element 0)");
  REQUIRE(model.a.value(0, 0) == 7.0);  // nothing was loaded
}

TEST_CASE("safetensors: file errors name the path and the system's reason", "[safetensors][errors]") {
  REQUIRE_MOA_ERROR(moa::SafetensorsFile(temporary_path("no_such.safetensors")),
                    "cannot open '" + temporary_path("no_such.safetensors") + "': No such file or directory");
  const float values[1] = {1};
  REQUIRE_MOA_ERROR(moa::write_safetensors<float>(temporary_path("no/such/folder/x.safetensors"), {{"x", {1}, values}}),
                    "No such file or directory");
  // A folder where the file should go: the rename fails, with the reason, and the .tmp is removed.
  const std::string folder = temporary_path("a_folder.safetensors");
  std::filesystem::create_directories(folder + "/inside");
  REQUIRE_MOA_ERROR(moa::write_safetensors<float>(folder, {{"x", {1}, values}}), "cannot rename");
  REQUIRE_MOA_ERROR(moa::SafetensorsFile{folder}, "'" + folder + "' is a directory, not a file");
  REQUIRE_FALSE(std::filesystem::exists(folder + ".tmp"));
}
