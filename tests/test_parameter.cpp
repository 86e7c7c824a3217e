#include "support.hpp"

using namespace moa_test;

TEST_CASE("Parameter stores a logical shape as a row-major matrix", "[parameter]") {
  moa::Parameter<float> q("weight", {4, 3, 5});  // e.g. q_proj.weight [E, d_h, d_model]
  REQUIRE(q.value.rows() == 12);
  REQUIRE(q.value.cols() == 5);
  REQUIRE(q.grad.rows() == 12);
  REQUIRE(q.numel() == 60);
  moa::Parameter<float> bias("bias", {7});
  REQUIRE(bias.value.rows() == 1);
  REQUIRE(bias.value.cols() == 7);
  REQUIRE_MOA_ERROR(moa::Parameter<float>("w", {3, 0}), "non-positive extent 0");
  REQUIRE_MOA_ERROR(moa::Parameter<float>("w", {}), "at least one dimension");
}

TEST_CASE("ParameterList names by dotted prefix, finds, zeroes and counts", "[parameter]") {
  moa::Rng rng(0);
  moa::FeedForward<double> ffn(4, 8, moa::Activation::relu, rng);
  moa::ParameterList<double> list;
  ffn.collect_parameters(list, "encoder.layers.0.ffn.");
  REQUIRE(list.size() == 4);
  REQUIRE(list[0].name == "encoder.layers.0.ffn.fc1.weight");
  REQUIRE(list[3].name == "encoder.layers.0.ffn.fc2.bias");
  REQUIRE(list.at("encoder.layers.0.ffn.fc1.weight").shape == std::vector<moa::Index>{8, 4});
  REQUIRE(list.find("nope") == nullptr);
  REQUIRE_MOA_ERROR(list.at("nope"), "no parameter named 'nope'");
  REQUIRE(list.numel() == 8 * 4 + 8 + 4 * 8 + 4);
  for (const auto& entry : list) entry.grad().setOnes();
  list.zero_grad();
  for (const auto& entry : list) REQUIRE(entry.grad().isZero(0));
  REQUIRE_MOA_ERROR(ffn.collect_parameters(list, "encoder.layers.0.ffn."), "duplicate parameter name");
}

TEST_CASE("pack_parameters: one aligned block, values kept, a flat zero_grad", "[parameter]") {
  moa::Rng rng(1);
  moa::FeedForward<float> ffn(5, 7, moa::Activation::relu, rng);
  const auto before = moa::parameters_of(ffn);
  REQUIRE_FALSE(before.contiguous());
  std::vector<MatrixF> values;
  for (const auto& entry : before) values.push_back(entry.value());
  const auto packed = moa::pack_parameters(ffn);
  REQUIRE(packed.contiguous());
  for (std::size_t i = 0; i < packed.size(); ++i) {
    REQUIRE(MatrixF(packed[i].value()) == values[i]);
    // Aligned for the widest packet this build of Eigen uses (64 bytes with AVX-512, 16 with SSE).
    const std::uintptr_t alignment = std::max(EIGEN_MAX_ALIGN_BYTES, 1);
    REQUIRE(reinterpret_cast<std::uintptr_t>(packed[i].value().data()) % alignment == 0);
    REQUIRE(reinterpret_cast<std::uintptr_t>(packed[i].grad().data()) % alignment == 0);
  }
  // The layer computes with the block: a change through the list is seen by the layer.
  REQUIRE(packed.at("fc1.weight").value().data() == ffn.fc1.weight.value.data());
  REQUIRE(packed.flat_size() >= packed.numel());
  packed.flat_grads().setOnes();
  packed.zero_grad();
  for (const auto& entry : packed) REQUIRE(entry.grad().isZero(0));
}

TEST_CASE("Parameter copies are independent; assigning the same shape keeps the memory", "[parameter]") {
  moa::Parameter<float> a("w", {2, 3});
  a.value.setConstant(1.0f);
  moa::Parameter<float> b = a;
  b.value.setConstant(2.0f);
  REQUIRE(a.value.isConstant(1.0f));
  float* const memory = a.value.data();
  a = b;
  REQUIRE(a.value.data() == memory);
  REQUIRE(a.value.isConstant(2.0f));
  moa::Parameter<float> c = std::move(b);
  REQUIRE(c.value.isConstant(2.0f));
  REQUIRE(b.value.size() == 0);
}

TEST_CASE("Parameter versions: every write the library makes changes them, reads do not", "[parameter]") {
  moa::Rng rng(0);
  moa::FeedForward<float> ffn(4, 8, moa::Activation::relu, rng);
  moa::Parameter<float>& weight = ffn.fc1.weight;
  auto changed = [&](auto&& write) {
    const std::uint64_t before = weight.version();
    write();
    return weight.version() != before;
  };
  REQUIRE(weight.version() != 0);
  REQUIRE(changed([&] { moa::init_normal(weight, rng, 0.0, 1.0); }));
  REQUIRE(changed([&] { weight.touch(); }));
  moa::Parameter<float> other("other", weight.shape);
  REQUIRE(other.version() != weight.version());  // storage of its own: a version of its own
  REQUIRE(changed([&] { weight = other; }));     // same shape: numbers copied into this memory
  auto list = moa::parameters_of(ffn);
  REQUIRE(changed([&] { list[0].value().setZero(); }));
  REQUIRE_FALSE(changed([&] { REQUIRE(list[0].values().sum() == 0.0f); }));
  REQUIRE_FALSE(changed([&] { list[0].grad().setOnes(); }));
  // Packed: one block, one version; the optimizer's flat update changes it.
  auto packed = moa::pack_parameters(ffn);
  REQUIRE(packed.contiguous());
  moa::Adam<float> adam(packed);
  REQUIRE(changed([&] { adam.step(1e-3); }));
  REQUIRE(changed([&] { packed.flat_values(); }));
  REQUIRE(ffn.fc2.bias.version() == weight.version());
}
