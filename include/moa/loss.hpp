// moa/loss.hpp - cross-entropy over logits with label smoothing and an ignore index.
#pragma once

#include "moa/error.hpp"
#include "moa/gemm.hpp"
#include "moa/softmax.hpp"
#include "moa/tensor.hpp"

namespace moa {

// Mean over the counted tokens (targets != ignore_index) of
//     -(1 - eps) log p[target] - (eps / V) sum_j log p[j]
// which is PyTorch's CrossEntropyLoss(label_smoothing=eps, ignore_index=...). With no counted token
// the loss and its gradient are 0 (PyTorch returns NaN there).
template <typename S>
class CrossEntropyLoss {
 public:
  using Scalar = S;
  static constexpr Index kNoIgnore = -1;

  explicit CrossEntropyLoss(double label_smoothing = 0.0, Index ignore_index = kNoIgnore)
      : label_smoothing_(label_smoothing), ignore_index_(ignore_index) {
    MOA_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, "CrossEntropyLoss",
              "label_smoothing must be in [0, 1], got ", label_smoothing);
  }

  // Rows are spread over the compute's threads; the sums stay in row order, so the loss does not
  // depend on the thread count.
  void set_compute(ComputePtr compute) {
    compute_ = detail::checked_compute(std::move(compute), "CrossEntropyLoss::set_compute");
  }

  // logits: [N, V], targets: N ids in [0, V) or ignore_index. Returns the mean loss.
  Scalar forward(const Matrix<Scalar>& logits, const TokenIds& targets) {
    MOA_CHECK(static_cast<Index>(targets.size()) == logits.rows(), "CrossEntropyLoss::forward", "targets has ",
              targets.size(), " entries but logits have shape ", detail::shape_of(logits));
    MOA_CHECK(logits.cols() > 0, "CrossEntropyLoss::forward", "logits have shape ", detail::shape_of(logits),
              ", expected at least one class");
    for (std::size_t i = 0; i < targets.size(); ++i) {
      MOA_CHECK(targets[i] == ignore_index_ || (targets[i] >= 0 && targets[i] < logits.cols()),
                "CrossEntropyLoss::forward", "targets[", i, "] = ", targets[i], " is outside [0, ", logits.cols(),
                ") and is not the ignore index ", ignore_index_);
    }
    targets_ = targets;
    log_probabilities_.resize(logits.rows(), logits.cols());                  // [N, V]
    ColumnVector<Scalar> row_sums = ColumnVector<Scalar>::Zero(logits.rows());  // [N] sum_j log p[j]
    parallel_ranges(*compute_, logits.rows(), 64, [&](Index first, Index rows, int) {
      for (Index i = first; i < first + rows; ++i) {
        log_probabilities_.row(i) = logits.row(i);
        detail::log_softmax_row_inplace(log_probabilities_.row(i).data(), log_probabilities_.cols());
        if (targets_[i] != ignore_index_) row_sums(i) = log_probabilities_.row(i).sum();
      }
    });
    const Scalar smoothing = static_cast<Scalar>(label_smoothing_);
    const Scalar classes = static_cast<Scalar>(logits.cols());
    Scalar total = 0;
    Scalar total_nll = 0;
    counted_ = 0;
    for (Index i = 0; i < logits.rows(); ++i) {
      if (targets_[i] == ignore_index_) continue;
      const Scalar nll = -log_probabilities_(i, targets_[i]);
      const Scalar smooth = -row_sums(i) / classes;
      total += (Scalar(1) - smoothing) * nll + smoothing * smooth;
      total_nll += nll;
      ++counted_;
    }
    nll_ = counted_ > 0 ? total_nll / static_cast<Scalar>(counted_) : Scalar(0);
    return counted_ > 0 ? total / static_cast<Scalar>(counted_) : Scalar(0);
  }

  // grad_logits: [N, V] = grad_loss * (softmax - smoothed target) / counted, zero on ignored rows.
  Matrix<Scalar> backward(Scalar grad_loss = Scalar(1)) const {
    Matrix<Scalar> grad_logits(log_probabilities_.rows(), log_probabilities_.cols());  // [N, V]
    const Scalar smoothing = static_cast<Scalar>(label_smoothing_);
    const Scalar uniform = smoothing / static_cast<Scalar>(log_probabilities_.cols());
    const Scalar scale = counted_ > 0 ? grad_loss / static_cast<Scalar>(counted_) : Scalar(0);
    parallel_ranges(*compute_, grad_logits.rows(), 64, [&](Index first, Index rows, int) {
      for (Index i = first; i < first + rows; ++i) {
        if (targets_[i] == ignore_index_) {
          grad_logits.row(i).setZero();
          continue;
        }
        grad_logits.row(i) = (log_probabilities_.row(i).array().exp() - uniform) * scale;
        grad_logits(i, targets_[i]) -= (Scalar(1) - smoothing) * scale;
      }
    });
    return grad_logits;
  }

  Index counted() const { return counted_; }
  // Mean negative log-likelihood of the targets without smoothing (for perplexity).
  Scalar nll() const { return nll_; }

 private:
  double label_smoothing_;
  Index ignore_index_;
  ComputePtr compute_ = Compute::standard();
  TokenIds targets_;                 // N
  Matrix<Scalar> log_probabilities_;  // [N, V]
  Index counted_ = 0;
  Scalar nll_ = 0;
};

}  // namespace moa
