// moa/parameter.hpp - a named trainable tensor and the list of a model's parameters.
//
// Every layer owns its Parameters and lists them through
//     void collect_parameters(ParameterList<Scalar>& list, const std::string& prefix)
// which adds each one under a PyTorch-style dotted name (prefix + local name, e.g.
// "encoder.layers.0.ffn.fc1.weight"). The optimizer, zero_grad, checkpoints and the gradient
// checker all work on that list.
#pragma once

#include "moa/error.hpp"
#include "moa/tensor.hpp"

#include <numeric>
#include <string>
#include <utility>
#include <vector>

namespace moa {

template <typename Scalar>
struct Parameter {
  std::string name;            // local name, e.g. "weight"
  std::vector<Index> shape;    // logical shape, PyTorch order (e.g. {E, d_h, d_model})
  Matrix<Scalar> value;        // [shape[0] * ... * shape[n-2], shape[n-1]] row-major
  Matrix<Scalar> grad;         // same shape as value

  Parameter() = default;

  // A parameter of logical shape `shape`, zero-initialised (value and gradient).
  Parameter(std::string local_name, std::vector<Index> logical_shape)
      : name(std::move(local_name)), shape(std::move(logical_shape)) {
    MOA_CHECK(!shape.empty(), "Parameter", "parameter '", name, "' needs at least one dimension");
    for (Index extent : shape) {
      MOA_CHECK(extent > 0, "Parameter", "parameter '", name, "' has a non-positive extent ", extent);
    }
    const Index cols = shape.back();
    const Index rows = numel() / cols;
    value = Matrix<Scalar>::Zero(rows, cols);
    grad = Matrix<Scalar>::Zero(rows, cols);
  }

  Index numel() const {
    return std::accumulate(shape.begin(), shape.end(), Index{1}, [](Index a, Index b) { return a * b; });
  }

  void zero_grad() { grad.setZero(); }
};

template <typename Scalar>
class ParameterList {
 public:
  struct Entry {
    std::string name;              // full dotted name
    Parameter<Scalar>* parameter;  // owned by the layer
  };

  void add(const std::string& prefix, Parameter<Scalar>& parameter) {
    const std::string full_name = prefix + parameter.name;
    MOA_CHECK(find(full_name) == nullptr, "ParameterList::add", "duplicate parameter name '", full_name, "'");
    entries_.push_back({full_name, &parameter});
  }

  std::size_t size() const { return entries_.size(); }
  bool empty() const { return entries_.empty(); }
  const Entry& operator[](std::size_t i) const { return entries_[i]; }
  auto begin() const { return entries_.begin(); }
  auto end() const { return entries_.end(); }

  Parameter<Scalar>* find(const std::string& full_name) const {
    for (const Entry& entry : entries_) {
      if (entry.name == full_name) return entry.parameter;
    }
    return nullptr;
  }

  Parameter<Scalar>& at(const std::string& full_name) const {
    Parameter<Scalar>* parameter = find(full_name);
    MOA_CHECK(parameter != nullptr, "ParameterList::at", "no parameter named '", full_name, "'");
    return *parameter;
  }

  void zero_grad() const {
    for (const Entry& entry : entries_) entry.parameter->zero_grad();
  }

  Index numel() const {
    Index total = 0;
    for (const Entry& entry : entries_) total += entry.parameter->numel();
    return total;
  }

 private:
  std::vector<Entry> entries_;
};

// The parameter list of anything with collect_parameters(list, prefix).
template <typename Layer>
ParameterList<typename Layer::Scalar> parameters_of(Layer& layer, const std::string& prefix = "") {
  ParameterList<typename Layer::Scalar> list;
  layer.collect_parameters(list, prefix);
  return list;
}

}  // namespace moa
