// moa/parameter.hpp - a named trainable tensor, the list of a model's parameters, and the
// contiguous block a model keeps them in.
//
// Every layer owns its Parameters and lists them through
//     void collect_parameters(ParameterList<Scalar>& list, const std::string& prefix)
// which adds each one under a PyTorch-style dotted name (prefix + local name, e.g.
// "encoder.layers.0.ffn.fc1.weight"). The optimizer, zero_grad, checkpoints and the gradient
// checker all work on that list.
//
// Memory. A Parameter's value and grad are views (Eigen::Map) into storage the Parameter shares
// ownership of: its own, or after pack_parameters(model) one block for the whole model, values
// first and gradients after them, in list order (as llm.c keeps its model). In a block, zeroing
// every gradient is one fill, Adam one loop, and a data-parallel all-reduce one call. The memory
// never moves: moving a layer or a model moves the views, so a ParameterList (which holds views
// and shares ownership of the storage, never pointers to Parameters) stays valid after the model
// it was taken from is moved.
#pragma once

#include "moa/error.hpp"
#include "moa/tensor.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <new>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

namespace moa {

template <typename Scalar>
using ParameterView = Eigen::Map<Matrix<Scalar>>;

namespace detail {
// Versions are unique in the process, so memory freed and reused never meets an old version.
inline std::uint64_t next_parameter_version() {
  static std::atomic<std::uint64_t> last{0};
  return last.fetch_add(1, std::memory_order_relaxed) + 1;
}
}  // namespace detail

// Parameter memory: aligned for the widest SIMD Eigen was built for, and every tensor in it starts
// at a multiple of kParameterAlignment elements. Eigen's reductions split work by address
// alignment, so without this a sum over a parameter could round differently from run to run.
//
// The storage carries a version that changes whenever its values may have: a backend may keep a
// weight repacked for its kernels (oneDNN, in inference) for as long as the version holds. Every
// write the library makes touches it: optimizer steps, loaders, init_*, and any writable view a
// ParameterList hands out. Code that writes a Parameter's value view itself calls touch().
template <typename Scalar>
class ParameterStorage : public std::vector<Scalar, Eigen::aligned_allocator<Scalar>> {
 public:
  using std::vector<Scalar, Eigen::aligned_allocator<Scalar>>::vector;
  std::uint64_t version() const { return version_; }
  void touch() { version_ = detail::next_parameter_version(); }

 private:
  std::uint64_t version_ = detail::next_parameter_version();
};
constexpr Index kParameterAlignment = 16;
inline Index aligned_extent(Index count) { return (count + kParameterAlignment - 1) / kParameterAlignment * kParameterAlignment; }

template <typename S>
class Parameter {
 public:
  using Scalar = S;

  std::string name;          // local name, e.g. "weight"
  std::vector<Index> shape;  // logical shape, PyTorch order (e.g. {E, d_h, d_model})
  ParameterView<Scalar> value{nullptr, 0, 0};  // [shape[0] * ... * shape[n-2], shape[n-1]] row-major
  ParameterView<Scalar> grad{nullptr, 0, 0};   // same shape as value

  Parameter() = default;

  // A parameter of logical shape `shape` in storage of its own, zero-initialised (value and gradient).
  Parameter(std::string local_name, std::vector<Index> logical_shape)
      : name(std::move(local_name)), shape(std::move(logical_shape)) {
    MOA_CHECK(!shape.empty(), "Parameter", "parameter '", name, "' needs at least one dimension");
    for (Index extent : shape) {
      MOA_CHECK(extent > 0, "Parameter", "parameter '", name, "' has a non-positive extent ", extent);
    }
    const Index distance = aligned_extent(numel());
    bind(std::make_shared<ParameterStorage<Scalar>>(static_cast<std::size_t>(2 * distance), Scalar(0)), 0, distance);
  }

  // A copy has storage of its own (copying a packed model gives standalone parameters).
  Parameter(const Parameter& other) : name(other.name), shape(other.shape) {
    if (other.storage_ == nullptr) return;
    const Index distance = aligned_extent(numel());
    bind(std::make_shared<ParameterStorage<Scalar>>(static_cast<std::size_t>(2 * distance), Scalar(0)), 0, distance);
    value = other.value;
    grad = other.grad;
  }
  // Moving keeps the memory where it is: only the views and the ownership move.
  Parameter(Parameter&& other) noexcept
      : name(std::move(other.name)), shape(std::move(other.shape)), storage_(std::move(other.storage_)) {
    rebind_views(other.value.data(), other.grad.data());
    other.rebind_views(nullptr, nullptr);
  }
  // Assigning a parameter of the same shape copies the numbers into this one's memory, so a packed
  // model stays packed; another shape takes storage of its own.
  Parameter& operator=(const Parameter& other) {
    if (this == &other) return *this;
    name = other.name;
    if (storage_ != nullptr && other.storage_ != nullptr && shape == other.shape) {
      value = other.value;
      grad = other.grad;
      touch();
      return *this;
    }
    Parameter copy(other);
    return *this = std::move(copy);
  }
  Parameter& operator=(Parameter&& other) noexcept {
    if (this == &other) return *this;
    name = std::move(other.name);
    shape = std::move(other.shape);
    storage_ = std::move(other.storage_);
    rebind_views(other.value.data(), other.grad.data());
    other.rebind_views(nullptr, nullptr);
    return *this;
  }

  Index numel() const {
    return std::accumulate(shape.begin(), shape.end(), Index{1}, [](Index a, Index b) { return a * b; });
  }

  void zero_grad() { grad.setZero(); }

  // The version of the values (see ParameterStorage): call touch() after writing `value` directly.
  std::uint64_t version() const { return storage_ == nullptr ? 0 : storage_->version(); }
  void touch() {
    if (storage_ != nullptr) storage_->touch();
  }

  // The storage the views point into (for ParameterList and pack_parameters).
  const std::shared_ptr<ParameterStorage<Scalar>>& storage() const { return storage_; }

  // Moves this parameter's numbers into `storage` (value at value_offset, gradient at
  // value_offset + grad_distance) and makes its views point there.
  void bind(std::shared_ptr<ParameterStorage<Scalar>> storage, Index value_offset, Index grad_distance) {
    Scalar* value_data = storage->data() + value_offset;
    Scalar* grad_data = value_data + grad_distance;
    if (storage_ != nullptr) {
      std::copy(value.data(), value.data() + value.size(), value_data);
      std::copy(grad.data(), grad.data() + grad.size(), grad_data);
    }
    storage_ = std::move(storage);
    rebind_views(value_data, grad_data);
  }

 private:
  void rebind_views(Scalar* value_data, Scalar* grad_data) {
    const Index cols = value_data == nullptr ? 0 : shape.back();
    const Index rows = value_data == nullptr ? 0 : numel() / cols;
    // A Map's assignment copies elements; placement new points it elsewhere instead.
    new (&value) ParameterView<Scalar>(value_data, rows, cols);
    new (&grad) ParameterView<Scalar>(grad_data, rows, cols);
  }

  std::shared_ptr<ParameterStorage<Scalar>> storage_;  // owns what value and grad view
};

template <typename Scalar>
class ParameterList {
 public:
  // One parameter as the list sees it: its name, shape and memory, not the Parameter object, so
  // the entry stays valid when the layer is moved.
  class Entry {
   public:
    std::string name;          // full dotted name
    std::vector<Index> shape;  // logical shape

    // A writable view of the values: handing it out counts as a change (touches the version).
    ParameterView<Scalar> value() const {
      storage_->touch();
      return ParameterView<Scalar>(value_, rows_, cols_);
    }
    // The values, read only (no touch).
    Eigen::Map<const Matrix<Scalar>> values() const { return Eigen::Map<const Matrix<Scalar>>(value_, rows_, cols_); }
    ParameterView<Scalar> grad() const { return ParameterView<Scalar>(grad_, rows_, cols_); }
    Index numel() const { return rows_ * cols_; }

   private:
    friend class ParameterList;
    Scalar* value_ = nullptr;
    Scalar* grad_ = nullptr;
    Index rows_ = 0, cols_ = 0;
    std::shared_ptr<ParameterStorage<Scalar>> storage_;  // keeps the memory alive
  };

  ParameterList() = default;
  // A list that also calls on_add with each Parameter as it is added (pack_parameters uses it).
  explicit ParameterList(std::function<void(Parameter<Scalar>&)> on_add) : on_add_(std::move(on_add)) {}

  void add(const std::string& prefix, Parameter<Scalar>& parameter) {
    const std::string full_name = prefix + parameter.name;
    MOA_CHECK(find(full_name) == nullptr, "ParameterList::add", "duplicate parameter name '", full_name, "'");
    MOA_CHECK(parameter.storage() != nullptr, "ParameterList::add", "parameter '", full_name, "' has no storage");
    if (on_add_) on_add_(parameter);
    Entry entry;
    entry.name = full_name;
    entry.shape = parameter.shape;
    entry.value_ = parameter.value.data();
    entry.grad_ = parameter.grad.data();
    entry.rows_ = parameter.value.rows();
    entry.cols_ = parameter.value.cols();
    entry.storage_ = parameter.storage();
    entries_.push_back(std::move(entry));
  }

  std::size_t size() const { return entries_.size(); }
  bool empty() const { return entries_.empty(); }
  const Entry& operator[](std::size_t i) const { return entries_[i]; }
  auto begin() const { return entries_.begin(); }
  auto end() const { return entries_.end(); }

  const Entry* find(const std::string& full_name) const {
    for (const Entry& entry : entries_) {
      if (entry.name == full_name) return &entry;
    }
    return nullptr;
  }

  const Entry& at(const std::string& full_name) const {
    const Entry* entry = find(full_name);
    MOA_CHECK(entry != nullptr, "ParameterList::at", "no parameter named '", full_name, "'");
    return *entry;
  }

  Index numel() const {
    Index total = 0;
    for (const Entry& entry : entries_) total += entry.numel();
    return total;
  }

  // When the values lie in one block in list order, each at the next aligned place after the one
  // before, and so do the gradients (a packed model's list): all values as one flat view, and all
  // gradients, alignment gaps included (they hold zeros, which every update keeps at zero), and
  // where entry i starts in them. Otherwise empty views.
  bool contiguous() const {
    if (entries_.empty()) return false;
    for (std::size_t i = 1; i < entries_.size(); ++i) {
      const Entry& previous = entries_[i - 1];
      const Index step = aligned_extent(previous.numel());
      if (entries_[i].storage_ != previous.storage_ || entries_[i].value_ != previous.value_ + step ||
          entries_[i].grad_ != previous.grad_ + step)
        return false;
    }
    return true;
  }
  Index flat_size() const {
    return contiguous() ? static_cast<Index>(entries_.back().value_ - entries_.front().value_) + entries_.back().numel() : 0;
  }
  Index flat_offset(std::size_t i) const { return static_cast<Index>(entries_[i].value_ - entries_.front().value_); }
  // Writable, so it touches the block's version.
  ParameterView<Scalar> flat_values() const {
    if (contiguous()) entries_.front().storage_->touch();
    return flat(contiguous() ? entries_.front().value_ : nullptr);
  }
  ParameterView<Scalar> flat_grads() const { return flat(contiguous() ? entries_.front().grad_ : nullptr); }

  void zero_grad() const {
    if (contiguous()) {
      flat_grads().setZero();
      return;
    }
    for (const Entry& entry : entries_) entry.grad().setZero();
  }

 private:
  ParameterView<Scalar> flat(Scalar* data) const {
    return ParameterView<Scalar>(data, data == nullptr ? 0 : 1, data == nullptr ? 0 : flat_size());
  }

  std::vector<Entry> entries_;
  std::function<void(Parameter<Scalar>&)> on_add_;
};

// The parameter list of anything with collect_parameters(list, prefix).
template <typename Layer>
ParameterList<typename Layer::Scalar> parameters_of(Layer& layer, const std::string& prefix = "") {
  ParameterList<typename Layer::Scalar> list;
  layer.collect_parameters(list, prefix);
  return list;
}

// Moves every parameter of `layer` into one new block (values in list order, each at an aligned
// place, then gradients in the same layout) and returns the list of it, which is contiguous. The
// models call it when they are built; a standalone layer may too. Lists taken before still point
// at the old memory.
template <typename Layer>
ParameterList<typename Layer::Scalar> pack_parameters(Layer& layer) {
  using Scalar = typename Layer::Scalar;
  std::vector<Parameter<Scalar>*> parameters;
  ParameterList<Scalar> gather([&](Parameter<Scalar>& parameter) { parameters.push_back(&parameter); });
  layer.collect_parameters(gather, "");
  Index total = 0;
  for (Parameter<Scalar>* parameter : parameters) total += aligned_extent(parameter->numel());
  auto block = std::make_shared<ParameterStorage<Scalar>>(static_cast<std::size_t>(2 * total), Scalar(0));
  Index offset = 0;
  for (Parameter<Scalar>* parameter : parameters) {
    parameter->bind(block, offset, total);
    offset += aligned_extent(parameter->numel());
  }
  return parameters_of(layer);
}

}  // namespace moa
