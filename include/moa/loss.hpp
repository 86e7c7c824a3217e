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
    const Index classes = logits.cols();
    // Each counted row once from memory: its largest logit, then exp(logit - max) into
    // exponentials_ with their sum Z. The loss needs only log Z; backward scales the exponentials
    // by 1 / Z (so the vocabulary's exp is taken once, and nothing else is written). Ignored rows
    // (padding) are skipped.
    exponentials_.resize(logits.rows(), classes);  // [N, V] exp(logit - row max)
    inverse_sums_.resize(logits.rows());           // [N] 1 / Z, 0 on ignored rows
    ColumnVector<Scalar> nll(logits.rows()), smooth(logits.rows());  // [N] each, summed in row order below
    parallel_ranges(*compute_, logits.rows(), 64, [&](Index first, Index rows, int) {
      for (Index i = first; i < first + rows; ++i) {
        if (targets_[i] == ignore_index_) {
          inverse_sums_(i) = Scalar(0);
          continue;
        }
        const Scalar* row = logits.row(i).data();
        const Scalar max_value = detail::row_max(row, classes);
        const Scalar total = detail::exp_shifted(row, exponentials_.row(i).data(), classes, max_value, Scalar(1));
        const Scalar log_sum = max_value + std::log(total);  // log-sum-exp: log p[j] = logit[j] - log_sum
        inverse_sums_(i) = Scalar(1) / total;
        nll(i) = log_sum - row[targets_[i]];
        smooth(i) = log_sum - logits.row(i).sum() / static_cast<Scalar>(classes);  // -mean_j log p[j]
      }
    });
    const Scalar smoothing = static_cast<Scalar>(label_smoothing_);
    Scalar total = 0;
    Scalar total_nll = 0;
    counted_ = 0;
    for (Index i = 0; i < logits.rows(); ++i) {
      if (targets_[i] == ignore_index_) continue;
      total += (Scalar(1) - smoothing) * nll(i) + smoothing * smooth(i);
      total_nll += nll(i);
      ++counted_;
    }
    nll_ = counted_ > 0 ? total_nll / static_cast<Scalar>(counted_) : Scalar(0);
    return counted_ > 0 ? total / static_cast<Scalar>(counted_) : Scalar(0);
  }

  // grad_logits: [N, V] = grad_loss * (softmax - smoothed target) / counted, zero on ignored rows.
  Matrix<Scalar> backward(Scalar grad_loss = Scalar(1)) const {
    Matrix<Scalar> grad_logits(exponentials_.rows(), exponentials_.cols());  // [N, V]
    const Scalar smoothing = static_cast<Scalar>(label_smoothing_);
    const Scalar scale = counted_ > 0 ? grad_loss / static_cast<Scalar>(counted_) : Scalar(0);
    const Scalar uniform = smoothing / static_cast<Scalar>(exponentials_.cols()) * scale;
    parallel_ranges(*compute_, grad_logits.rows(), 64, [&](Index first, Index rows, int) {
      for (Index i = first; i < first + rows; ++i) {
        if (targets_[i] == ignore_index_) {
          grad_logits.row(i).setZero();
          continue;
        }
        grad_logits.row(i).array() = exponentials_.row(i).array() * (inverse_sums_(i) * scale) - uniform;
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
  TokenIds targets_;                   // N
  Matrix<Scalar> exponentials_;        // [N, V] exp(logit - row max); rows of ignored targets unset
  ColumnVector<Scalar> inverse_sums_;  // [N] 1 / the row's sum of exponentials_
  Index counted_ = 0;
  Scalar nll_ = 0;
};

}  // namespace moa
