// moa/optimizer.hpp - Adam and AdamW, the inverse-square-root schedule, and gradient clipping.
#pragma once

#include "moa/error.hpp"
#include "moa/gemm.hpp"
#include "moa/parameter.hpp"
#include "moa/tensor.hpp"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace moa {

struct AdamOptions {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double epsilon = 1e-8;
  double weight_decay = 0.0;
  bool decoupled_weight_decay = false;  // false: Adam with L2 added to the gradient; true: AdamW
};

// PyTorch's torch.optim.Adam / AdamW update, step by step:
//   g = grad (+ wd * theta for Adam);  theta -= lr * wd * theta first for AdamW
//   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//   theta -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
template <typename S>
class Adam {
 public:
  using Scalar = S;

  Adam(const ParameterList<Scalar>& parameters, AdamOptions options = {}) : parameters_(parameters), options_(options) {
    MOA_CHECK(options.beta1 >= 0.0 && options.beta1 < 1.0, "Adam", "beta1 must be in [0, 1), got ", options.beta1);
    MOA_CHECK(options.beta2 >= 0.0 && options.beta2 < 1.0, "Adam", "beta2 must be in [0, 1), got ", options.beta2);
    MOA_CHECK(options.epsilon > 0.0, "Adam", "epsilon must be positive, got ", options.epsilon);
    MOA_CHECK(options.weight_decay >= 0.0, "Adam", "weight_decay must be non-negative, got ", options.weight_decay);
    // The moments mirror the parameters' layout: one flat block for a packed model's list.
    contiguous_ = parameters_.contiguous();
    Index offset = 0;
    for (std::size_t i = 0; i < parameters_.size(); ++i) {
      offsets_.push_back(contiguous_ ? parameters_.flat_offset(i) : offset);
      offset += aligned_extent(parameters_[i].numel());
    }
    const Index total = contiguous_ ? parameters_.flat_size() : offset;
    first_moment_.assign(static_cast<std::size_t>(total), Scalar(0));
    second_moment_.assign(static_cast<std::size_t>(total), Scalar(0));
  }

  // The threads an update runs on (every number alone: the same result on any number).
  void set_compute(ComputePtr compute) { compute_ = detail::checked_compute(std::move(compute), "Adam::set_compute"); }
  const Compute& compute() const { return *compute_; }

  void step(double learning_rate) {
    MOA_CHECK(learning_rate >= 0.0 && std::isfinite(learning_rate), "Adam::step",
              "learning_rate must be finite and non-negative, got ", learning_rate);
    ++steps_;
    const double correction1 = 1.0 - std::pow(options_.beta1, static_cast<double>(steps_));
    const double correction2 = 1.0 - std::pow(options_.beta2, static_cast<double>(steps_));
    Update update;
    update.beta1 = static_cast<Scalar>(options_.beta1);
    update.beta2 = static_cast<Scalar>(options_.beta2);
    update.step_size = static_cast<Scalar>(learning_rate / correction1);
    update.root_correction2 = static_cast<Scalar>(std::sqrt(correction2));
    update.epsilon = static_cast<Scalar>(options_.epsilon);
    update.decay = static_cast<Scalar>(options_.weight_decay);
    update.decay_factor = Scalar(1) - static_cast<Scalar>(learning_rate) * update.decay;
    // A packed model's parameters are one block: one loop over all of them.
    if (contiguous_) {
      Scalar* values = parameters_.flat_values().data();
      const Scalar* grads = parameters_.flat_grads().data();
      // Ranges start at multiples of a SIMD block, so each number takes the same (vector or
      // scalar) path on any number of threads and the result is bit-identical.
      const Index total = parameters_.flat_size(), blocks = (total + kBlock - 1) / kBlock;
      parallel_ranges(*compute_, blocks, kGrain / kBlock, [&](Index first_block, Index block_count, int) {
        const Index first = first_block * kBlock, last = std::min(total, (first_block + block_count) * kBlock);
        apply(update, values + first, grads + first, first, last - first);
      });
      return;
    }
    for (std::size_t i = 0; i < parameters_.size(); ++i)
      apply(update, parameters_[i].value().data(), parameters_[i].grad().data(), offsets_[i], parameters_[i].numel());
  }

  long long steps() const { return steps_; }
  const AdamOptions& options() const { return options_; }

  // State for checkpoints: the moments of parameter i of the list (its value's shape), and the
  // step count.
  Eigen::Map<const Matrix<Scalar>> first_moment(std::size_t i) const { return moment(first_moment_, i); }
  Eigen::Map<const Matrix<Scalar>> second_moment(std::size_t i) const { return moment(second_moment_, i); }
  ParameterView<Scalar> first_moment(std::size_t i) { return moment(first_moment_, i); }
  ParameterView<Scalar> second_moment(std::size_t i) { return moment(second_moment_, i); }
  void set_steps(long long steps) {
    MOA_CHECK(steps >= 0, "Adam::set_steps", "steps must be non-negative, got ", steps);
    steps_ = steps;
  }

 private:
  static constexpr Index kGrain = Index(1) << 16;  // numbers per thread at least
  static constexpr Index kBlock = 64;               // a multiple of every SIMD width

  struct Update {
    Scalar beta1, beta2, step_size, root_correction2, epsilon, decay, decay_factor;
  };

  // The update of `count` consecutive numbers whose moments start at moment_offset.
  void apply(const Update& u, Scalar* value_data, const Scalar* grad_data, Index moment_offset, Index count) {
    Eigen::Map<Eigen::Array<Scalar, Eigen::Dynamic, 1>> value(value_data, count);
    Eigen::Map<const Eigen::Array<Scalar, Eigen::Dynamic, 1>> grad(grad_data, count);
    Eigen::Map<Eigen::Array<Scalar, Eigen::Dynamic, 1>> first(first_moment_.data() + moment_offset, count);
    Eigen::Map<Eigen::Array<Scalar, Eigen::Dynamic, 1>> second(second_moment_.data() + moment_offset, count);
    if (options_.decoupled_weight_decay) {
      value *= u.decay_factor;
      first = u.beta1 * first + (Scalar(1) - u.beta1) * grad;
      second = u.beta2 * second + (Scalar(1) - u.beta2) * grad.square();
    } else {
      const auto gradient = grad + u.decay * value;
      first = u.beta1 * first + (Scalar(1) - u.beta1) * gradient;
      second = u.beta2 * second + (Scalar(1) - u.beta2) * gradient.square();
    }
    value -= u.step_size * first / (second.sqrt() / u.root_correction2 + u.epsilon);
  }

  template <typename Moments>
  auto moment(Moments& moments, std::size_t i) const {
    MOA_CHECK(i < parameters_.size(), "Adam::moment", "parameter index ", i, " is outside the list of ",
              parameters_.size());
    using Map = std::conditional_t<std::is_const_v<Moments>, Eigen::Map<const Matrix<Scalar>>, ParameterView<Scalar>>;
    const auto& entry = parameters_[i];
    return Map(moments.data() + offsets_[i], entry.value().rows(), entry.value().cols());
  }

  ParameterList<Scalar> parameters_;
  AdamOptions options_;
  bool contiguous_ = false;                  // the list is one block: one update loop
  std::vector<Index> offsets_;              // where parameter i's moments start
  ParameterStorage<Scalar> first_moment_;   // m, laid out as the parameters
  ParameterStorage<Scalar> second_moment_;  // v, laid out as the parameters
  long long steps_ = 0;
  ComputePtr compute_ = Compute::standard();
};

// AdamW: Adam with decoupled weight decay (PyTorch's default decay 0.01).
template <typename Scalar>
Adam<Scalar> make_adamw(const ParameterList<Scalar>& parameters, AdamOptions options = {0.9, 0.999, 1e-8, 0.01, true}) {
  options.decoupled_weight_decay = true;
  return Adam<Scalar>(parameters, options);
}

// fairseq's inverse_sqrt schedule: linear warm-up from initial_lr to peak_lr over warmup_steps,
// then peak_lr * sqrt(warmup_steps / step). Steps count from 1.
class InverseSqrtSchedule {
 public:
  InverseSqrtSchedule(double peak_lr, long long warmup_steps, double initial_lr = 0.0)
      : peak_lr_(peak_lr), warmup_steps_(warmup_steps), initial_lr_(initial_lr) {
    MOA_CHECK(peak_lr > 0.0, "InverseSqrtSchedule", "peak_lr must be positive, got ", peak_lr);
    MOA_CHECK(warmup_steps >= 0, "InverseSqrtSchedule", "warmup_steps must be non-negative, got ", warmup_steps);
    MOA_CHECK(initial_lr >= 0.0 && initial_lr <= peak_lr, "InverseSqrtSchedule", "initial_lr must be in [0, peak_lr], got ",
              initial_lr);
  }

  double operator()(long long step) const {
    MOA_CHECK(step >= 1, "InverseSqrtSchedule", "step must be at least 1, got ", step);
    if (step <= warmup_steps_) {
      return initial_lr_ + static_cast<double>(step) * (peak_lr_ - initial_lr_) / static_cast<double>(warmup_steps_);
    }
    const double warmup = static_cast<double>(warmup_steps_ > 0 ? warmup_steps_ : 1);
    return peak_lr_ * std::sqrt(warmup / static_cast<double>(step));
  }

 private:
  double peak_lr_;
  long long warmup_steps_;
  double initial_lr_;
};

namespace detail {
// Below about this many gradient entries in all, a second thread costs more than it saves.
constexpr Index kParallelGradientEntries = Index(1) << 16;

// task(i) for every parameter i of the list, the parameters spread over the compute's threads
// (each one whole on one thread) when there are enough entries to repay waking them.
template <typename Scalar, typename Task>
void for_each_parameter(const ParameterList<Scalar>& parameters, const Compute& compute, Task&& task) {
  const Index count = static_cast<Index>(parameters.size());
  if (compute.threads() == 1 || count < 2 || parameters.numel() < kParallelGradientEntries) {
    for (Index i = 0; i < count; ++i) task(i);
    return;
  }
  compute.pool().run(count, [&](Index i, int) { task(i); });
}
}  // namespace detail

// The global L2 norm of every gradient; NaN or infinity when any gradient is not finite. Each
// parameter's sum of squares is taken whole and the sums are added in list order, so the norm is
// the same on any number of threads.
template <typename Scalar>
double grad_norm(const ParameterList<Scalar>& parameters, const Compute& compute = *Compute::standard()) {
  std::vector<double> squared(parameters.size());  // [parameters]
  detail::for_each_parameter(parameters, compute, [&](Index i) {
    squared[static_cast<std::size_t>(i)] = static_cast<double>(parameters[static_cast<std::size_t>(i)].grad().squaredNorm());
  });
  double total = 0.0;
  for (double value : squared) total += value;
  return std::sqrt(total);
}

// Scales all gradients by max_norm / (norm + 1e-6) when their global L2 norm exceeds max_norm, as
// torch.nn.utils.clip_grad_norm_. Returns the norm before clipping (a non-finite norm clips nothing).
template <typename Scalar>
double clip_grad_norm(const ParameterList<Scalar>& parameters, double max_norm,
                      const Compute& compute = *Compute::standard()) {
  MOA_CHECK(max_norm > 0.0, "clip_grad_norm", "max_norm must be positive, got ", max_norm);
  const double norm = grad_norm(parameters, compute);
  if (norm > max_norm) {
    const Scalar scale = static_cast<Scalar>(max_norm / (norm + 1e-6));
    detail::for_each_parameter(parameters, compute,
                               [&](Index i) { parameters[static_cast<std::size_t>(i)].grad() *= scale; });
  }
  return norm;
}

// parameters.zero_grad() on the compute's threads: a packed list's block in pieces, else each
// parameter whole.
template <typename Scalar>
void zero_grad(const ParameterList<Scalar>& parameters, const Compute& compute) {
  if (!parameters.contiguous()) {
    detail::for_each_parameter(parameters, compute,
                               [&](Index i) { parameters[static_cast<std::size_t>(i)].grad().setZero(); });
    return;
  }
  auto grads = parameters.flat_grads();  // [1, flat size]
  parallel_ranges(compute, grads.size(), detail::kParallelGradientEntries / 2,
                  [&](Index first, Index count, int) { grads.middleCols(first, count).setZero(); });
}

}  // namespace moa
