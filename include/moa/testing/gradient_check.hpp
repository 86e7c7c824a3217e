// moa/testing/gradient_check.hpp - finite-difference gradient checking in double.
//
// Usage: compute the analytic gradients once at the current values (forward + backward of a scalar
// loss), then hand check_gradients the loss as a function and every tensor with its analytic
// gradient. Each entry is perturbed by +-step and the central difference is compared with the
// analytic value by relative error |a - n| / max(|a|, |n|, floor). The floor only keeps noise at
// the level of rounding from failing; an analytic 0 where the numeric gradient is larger than
// that fails with relative error near 1. A tensor whose numeric gradient is all but zero also
// fails (unless allowed), because a check on a tensor the loss does not depend on proves nothing.
#pragma once

#include "moa/error.hpp"
#include "moa/tensor.hpp"

#include <algorithm>
#include <cmath>
#include <functional>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace moa {

struct GradientCheckOptions {
  double step = 1e-5;
  double tolerance = 1e-6;
  double floor = 1e-4;
  bool require_nonzero = true;  // fail when a tensor's numeric gradient is all (near) zero
  int max_reported = 8;         // failures listed in the message
};

// A tensor to check: its values (any contiguous Eigen matrix of doubles: a Matrix, a Parameter's
// value view), perturbed in place and restored, and the analytic gradient of the same shape.
struct GradientCheckTensor {
  template <typename Value, typename Analytic>
  GradientCheckTensor(std::string tensor_name, Value* value, const Analytic* analytic, bool zero_allowed = false)
      : name(std::move(tensor_name)), may_be_zero(zero_allowed) {
    static_assert(std::is_same_v<typename Value::Scalar, double> && std::is_same_v<typename Analytic::Scalar, double>,
                  "gradient checks run in double");
    if (value != nullptr) {
      data = value->data();
      rows = value->rows();
      cols = value->cols();
    }
    if (analytic != nullptr) {
      analytic_data = analytic->data();
      analytic_rows = analytic->rows();
      analytic_cols = analytic->cols();
    }
  }

  // A view (a Parameter's value, a ParameterList entry's value()) is taken by value.
  template <typename Analytic>
  GradientCheckTensor(std::string tensor_name, Eigen::Map<Matrix<double>> value, const Analytic* analytic,
                      bool zero_allowed = false)
      : GradientCheckTensor(std::move(tensor_name), &value, analytic, zero_allowed) {}

  std::string name;
  double* data = nullptr;
  Index rows = 0, cols = 0;
  const double* analytic_data = nullptr;
  Index analytic_rows = 0, analytic_cols = 0;
  bool may_be_zero = false;  // true where the loss may legitimately not depend on the tensor
};

struct GradientCheckResult {
  bool passed = true;
  double max_relative_error = 0.0;
  Index entries_checked = 0;
  std::string message;  // what failed and where
};

inline GradientCheckResult check_gradients(const std::function<double()>& loss,
                                           const std::vector<GradientCheckTensor>& tensors,
                                           const GradientCheckOptions& options = {}) {
  MOA_CHECK(options.step > 0.0, "check_gradients", "step must be positive, got ", options.step);
  MOA_CHECK(!tensors.empty(), "check_gradients", "no tensors to check");
  GradientCheckResult result;
  std::ostringstream failures;
  int reported = 0;
  auto report = [&](const std::string& line) {
    result.passed = false;
    if (reported++ < options.max_reported) failures << line << "\n";
  };
  for (const GradientCheckTensor& tensor : tensors) {
    MOA_CHECK(tensor.data != nullptr && tensor.analytic_data != nullptr, "check_gradients", "tensor '", tensor.name,
              "' has a null value or gradient");
    MOA_CHECK(tensor.rows == tensor.analytic_rows && tensor.cols == tensor.analytic_cols, "check_gradients", "tensor '",
              tensor.name, "' has value shape [", tensor.rows, ", ", tensor.cols, "] but analytic gradient shape [",
              tensor.analytic_rows, ", ", tensor.analytic_cols, "]");
    double largest_numeric = 0.0;
    for (Index i = 0; i < tensor.rows * tensor.cols; ++i) {
      double& entry = tensor.data[i];
      const double original = entry;
      entry = original + options.step;
      const double loss_plus = loss();
      entry = original - options.step;
      const double loss_minus = loss();
      entry = original;
      const double numeric = (loss_plus - loss_minus) / (2.0 * options.step);
      const double analytic = tensor.analytic_data[i];
      const double error =
          std::abs(analytic - numeric) / std::max({std::abs(analytic), std::abs(numeric), options.floor});
      largest_numeric = std::max(largest_numeric, std::abs(numeric));
      result.max_relative_error = std::max(result.max_relative_error, error);
      ++result.entries_checked;
      if (!(error <= options.tolerance)) {
        std::ostringstream line;
        line << tensor.name << "[" << i / tensor.cols << ", " << i % tensor.cols
             << "]: analytic " << analytic << ", numeric " << numeric << ", relative error " << error;
        report(line.str());
      }
    }
    if (options.require_nonzero && !tensor.may_be_zero && largest_numeric < options.floor) {
      report(tensor.name + ": the numeric gradient is zero everywhere, so the check proves nothing");
    }
  }
  if (reported > options.max_reported) failures << "(" << reported - options.max_reported << " more)\n";
  result.message = failures.str();
  return result;
}

}  // namespace moa
