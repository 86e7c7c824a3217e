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
  for (const auto& entry : list) entry.parameter->grad.setOnes();
  list.zero_grad();
  for (const auto& entry : list) REQUIRE(entry.parameter->grad.isZero(0));
  REQUIRE_MOA_ERROR(ffn.collect_parameters(list, "encoder.layers.0.ffn."), "duplicate parameter name");
}
