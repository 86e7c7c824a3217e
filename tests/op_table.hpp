// The table of differentiable ops, in the manner of ggml's test-backend-ops: each row builds one op
// (a layer with its inputs) in double or float from a seed, and the generic tests in test_ops.cpp
// run every check on every row: the gradient check of every parameter and input, float against
// double, a save/load round trip of the parameters, determinism, and (hidden tag [.perf]) a timing.
// A new layer adds a row here, not a file of copied scaffolding; what is its own (known values,
// error messages) stays in its test file.
#pragma once

#include "support.hpp"

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace moa_test {

// One op with its inputs. forward reads `*inputs` (the gradient check perturbs them in place) and
// must give the same result each call (an op that draws random numbers re-seeds inside forward);
// backward(grad_output), after forward, accumulates parameter gradients and returns the inputs'.
template <typename Scalar>
struct Op {
  // Shared with the op's functions, so the Op can be moved and copied freely.
  std::shared_ptr<std::vector<moa::Matrix<Scalar>>> inputs = std::make_shared<std::vector<moa::Matrix<Scalar>>>();
  std::vector<std::string> input_names;
  std::function<moa::Matrix<Scalar>()> forward;
  std::function<std::vector<moa::Matrix<Scalar>>(const moa::Matrix<Scalar>&)> backward;
  std::function<double()> aux_loss = [] { return 0.0; };           // added to the checked loss
  std::function<moa::ParameterList<Scalar>()> parameters = [] { return moa::ParameterList<Scalar>(); };
  std::shared_ptr<void> owner;                                     // keeps the layer alive
};

struct OpCase {
  std::string name;
  std::function<Op<double>(std::uint64_t seed)> make_double;
  std::function<Op<float>(std::uint64_t seed)> make_float;
  double gradient_tolerance = 1e-6;  // relative, finite differences in double
  double float_tolerance = 1e-5;     // relative, float forward and backward against double
  std::vector<std::string> may_be_zero;  // tensors the checked loss may legitimately not depend on
};

inline std::vector<OpCase>& op_cases() {
  static std::vector<OpCase> cases;
  return cases;
}

struct OpRegistration {
  explicit OpRegistration(OpCase op_case) { op_cases().push_back(std::move(op_case)); }
};

// Registers the row `name` built by the function template `factory<Scalar>(seed)`, with the
// default tolerances or with its own.
#define MOA_OP_CASE(id, name, factory) MOA_OP_CASE_WITH(id, name, factory, 1e-6, 1e-5)
#define MOA_OP_CASE_WITH(id, name, factory, gradient_tolerance, float_tolerance)                           \
  static const ::moa_test::OpRegistration moa_op_case_##id(::moa_test::OpCase{                           \
      name, [](std::uint64_t seed) { return factory<double>(seed); },                                      \
      [](std::uint64_t seed) { return factory<float>(seed); }, gradient_tolerance, float_tolerance, {}})

// A layer held by shared_ptr in the Op, with its parameters listed.
template <typename Layer>
std::shared_ptr<Layer> own(Op<typename Layer::Scalar>& op, std::shared_ptr<Layer> layer) {
  op.owner = layer;
  op.parameters = [layer] { return moa::parameters_of(*layer); };
  return layer;
}

}  // namespace moa_test
