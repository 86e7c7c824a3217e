// moa/loss.hpp - cross-entropy over logits with label smoothing and an ignore index.
#pragma once

#include "moa/error.hpp"
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
    log_probabilities_ = log_softmax_rows(logits);  // [N, V]
    const Scalar smoothing = static_cast<Scalar>(label_smoothing_);
    const Scalar classes = static_cast<Scalar>(logits.cols());
    Scalar total = 0;
    Scalar total_nll = 0;
    counted_ = 0;
    for (Index i = 0; i < logits.rows(); ++i) {
      if (targets_[i] == ignore_index_) continue;
      const Scalar nll = -log_probabilities_(i, targets_[i]);
      const Scalar smooth = -log_probabilities_.row(i).sum() / classes;
      total += (Scalar(1) - smoothing) * nll + smoothing * smooth;
      total_nll += nll;
      ++counted_;
    }
    nll_ = counted_ > 0 ? total_nll / static_cast<Scalar>(counted_) : Scalar(0);
    return counted_ > 0 ? total / static_cast<Scalar>(counted_) : Scalar(0);
  }

  // grad_logits: [N, V] = grad_loss * (softmax - smoothed target) / counted, zero on ignored rows.
  Matrix<Scalar> backward(Scalar grad_loss = Scalar(1)) const {
    Matrix<Scalar> grad_logits = Matrix<Scalar>::Zero(log_probabilities_.rows(), log_probabilities_.cols());
    if (counted_ == 0) return grad_logits;
    const Scalar smoothing = static_cast<Scalar>(label_smoothing_);
    const Scalar uniform = smoothing / static_cast<Scalar>(log_probabilities_.cols());
    const Scalar scale = grad_loss / static_cast<Scalar>(counted_);
    for (Index i = 0; i < log_probabilities_.rows(); ++i) {
      if (targets_[i] == ignore_index_) continue;
      grad_logits.row(i) = (log_probabilities_.row(i).array().exp() - uniform) * scale;
      grad_logits(i, targets_[i]) -= (Scalar(1) - smoothing) * scale;
    }
    return grad_logits;
  }

  Index counted() const { return counted_; }
  // Mean negative log-likelihood of the targets without smoothing (for perplexity).
  Scalar nll() const { return nll_; }

 private:
  double label_smoothing_;
  Index ignore_index_;
  TokenIds targets_;                 // N
  Matrix<Scalar> log_probabilities_;  // [N, V]
  Index counted_ = 0;
  Scalar nll_ = 0;
};

}  // namespace moa
