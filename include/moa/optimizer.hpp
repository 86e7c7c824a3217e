// moa/optimizer.hpp - Adam and AdamW, the inverse-square-root schedule, and gradient clipping.
#pragma once

#include "moa/error.hpp"
#include "moa/parameter.hpp"
#include "moa/tensor.hpp"

#include <cmath>
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
    for (const auto& entry : parameters_) {
      const Matrix<Scalar>& value = entry.parameter->value;
      first_moment_.push_back(Matrix<Scalar>::Zero(value.rows(), value.cols()));
      second_moment_.push_back(Matrix<Scalar>::Zero(value.rows(), value.cols()));
    }
  }

  void step(double learning_rate) {
    MOA_CHECK(learning_rate >= 0.0 && std::isfinite(learning_rate), "Adam::step",
              "learning_rate must be finite and non-negative, got ", learning_rate);
    ++steps_;
    const double correction1 = 1.0 - std::pow(options_.beta1, static_cast<double>(steps_));
    const double correction2 = 1.0 - std::pow(options_.beta2, static_cast<double>(steps_));
    const Scalar beta1 = static_cast<Scalar>(options_.beta1);
    const Scalar beta2 = static_cast<Scalar>(options_.beta2);
    const Scalar step_size = static_cast<Scalar>(learning_rate / correction1);
    const Scalar root_correction2 = static_cast<Scalar>(std::sqrt(correction2));
    const Scalar epsilon = static_cast<Scalar>(options_.epsilon);
    const Scalar decay = static_cast<Scalar>(options_.weight_decay);
    for (std::size_t i = 0; i < parameters_.size(); ++i) {
      Parameter<Scalar>& parameter = *parameters_[i].parameter;
      MOA_CHECK(parameter.grad.rows() == first_moment_[i].rows() && parameter.grad.cols() == first_moment_[i].cols(),
                "Adam::step", "parameter '", parameters_[i].name, "' changed shape to ",
                detail::shape_of(parameter.grad), " after the optimizer was made");
      auto value = parameter.value.array();
      auto first = first_moment_[i].array();
      auto second = second_moment_[i].array();
      if (options_.decoupled_weight_decay) {
        value *= Scalar(1) - static_cast<Scalar>(learning_rate) * decay;
        first = beta1 * first + (Scalar(1) - beta1) * parameter.grad.array();
        second = beta2 * second + (Scalar(1) - beta2) * parameter.grad.array().square();
      } else {
        const auto gradient = parameter.grad.array() + decay * value;
        first = beta1 * first + (Scalar(1) - beta1) * gradient;
        second = beta2 * second + (Scalar(1) - beta2) * gradient.square();
      }
      value -= step_size * first / (second.sqrt() / root_correction2 + epsilon);
    }
  }

  long long steps() const { return steps_; }
  const AdamOptions& options() const { return options_; }

  // State for checkpoints: the moments, in the order of the parameter list, and the step count.
  const std::vector<Matrix<Scalar>>& first_moments() const { return first_moment_; }
  const std::vector<Matrix<Scalar>>& second_moments() const { return second_moment_; }
  std::vector<Matrix<Scalar>>& first_moments() { return first_moment_; }
  std::vector<Matrix<Scalar>>& second_moments() { return second_moment_; }
  void set_steps(long long steps) {
    MOA_CHECK(steps >= 0, "Adam::set_steps", "steps must be non-negative, got ", steps);
    steps_ = steps;
  }

 private:
  ParameterList<Scalar> parameters_;
  AdamOptions options_;
  std::vector<Matrix<Scalar>> first_moment_;   // per parameter, its value's shape
  std::vector<Matrix<Scalar>> second_moment_;  // per parameter, its value's shape
  long long steps_ = 0;
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

// Scales all gradients by max_norm / (norm + 1e-6) when their global L2 norm exceeds max_norm, as
// torch.nn.utils.clip_grad_norm_. Returns the norm before clipping.
template <typename Scalar>
double clip_grad_norm(const ParameterList<Scalar>& parameters, double max_norm) {
  MOA_CHECK(max_norm > 0.0, "clip_grad_norm", "max_norm must be positive, got ", max_norm);
  double squared = 0.0;
  for (const auto& entry : parameters) squared += static_cast<double>(entry.parameter->grad.squaredNorm());
  const double norm = std::sqrt(squared);
  if (norm > max_norm) {
    const Scalar scale = static_cast<Scalar>(max_norm / (norm + 1e-6));
    for (const auto& entry : parameters) entry.parameter->grad *= scale;
  }
  return norm;
}

}  // namespace moa
