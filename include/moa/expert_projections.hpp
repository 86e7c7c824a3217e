// moa/expert_projections.hpp - the per-expert products of the head-routed layers (MixtureOfAttention,
// MixtureOfHeads): each expert (head) owns a query projection [d_h, d_model] and an output
// projection [d_model, d_h], and only the assignments (token, expert) routed to it use them.
//
// An assignment list of A entries (token[a], expert[a], gate[a]) is grouped by expert in a
// DispatchPlan; each expert's rows are gathered, multiplied in one GEMM, and scattered back to
// assignment order (queries) or added into the token rows (outputs, scaled by the gates). Backward
// mirrors both. Experts no assignment chose cost nothing. On AVX-512 CPUs, float products whose
// widths are multiples of 16 skip the gathers: moa's row kernels (moa/row_kernel.hpp) read and
// write the rows in place, forward and backward.
//
// Threads: with enough busy experts, too small to split well, each expert is a part of its own,
// taken busiest first by whichever thread is free. Experts write disjoint rows (queries, gradients
// of the attended rows); what sums into token rows (outputs, input gradients) is split by columns
// instead where the row kernel serves and the d_model panels share out evenly: each thread runs
// every expert over its own panels, as one thread would (elsewhere it is written per assignment
// and then added up token by token, in assignment order). Otherwise each expert splits its rows
// across the threads. Either way what each expert computes depends only on the plan and the thread count, so
// results are bit-identical run to run.
#pragma once

#include "moa/bfloat16.hpp"
#include "moa/gemm.hpp"
#include "moa/tensor.hpp"
#include "moa/top_k.hpp"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace moa {

namespace detail {
// A weight read from the last-level cache costs about as long as this many multiply-adds, for
// telling whether experts with a row or two each (decoding) repay waking the threads: wide's
// decoding step on 2 threads takes 0.6 of one thread's time, 0.95 when reads counted for nothing.
constexpr double kWeightReadCost = 8;
}  // namespace detail

template <typename Scalar>
class ExpertProjections {
 public:
  // queries: [A, d_h]; row a = input[tokens[a]] Wq_e^T for e = the expert of a. weights: [E*d_h,
  // d_model] (expert e's rows e*d_h ..); rounded: their bfloat16 copy for decoding, or null;
  // weights_version: their version when the backend may keep them repacked (inference), else 0
  // (training: the row kernel packs each expert's weight into scratch as it comes);
  // rounded_input: input rounded to bfloat16 for bf16 products (gathered instead of input), or null.
  // Rows of assignments the plan skips (padding) are left unwritten.
  void project_in(const Compute& compute, const Matrix<Scalar>& input, const DispatchPlan& plan,
                  const std::vector<Index>& tokens, const ConstMatrixRef<Scalar>& weights, Index head_dim,
                  Matrix<Scalar>& queries, Precision precision, const BFloat16Weight* rounded = nullptr,
                  std::uint64_t weights_version = 0, const BFloat16Matrix* rounded_input = nullptr) {
    MOA_CHECK(rounded_input == nullptr || (std::is_same_v<Scalar, float>), "ExpertProjections::project_in",
              "rounded_input is for float layers");
    MOA_CHECK(rounded_input == nullptr || (rounded_input->rows() == input.rows() && rounded_input->cols() == input.cols()),
              "ExpertProjections::project_in", "rounded_input is [", rounded_input->rows(), ", ",
              rounded_input->cols(), "] for an input of ", detail::shape_of(input));
    queries.resize(static_cast<Index>(tokens.size()), head_dim);
    // Experts write disjoint rows: each one a part of its own.
    const bool parallel = experts_in_parallel(compute, plan, input.cols() * head_dim, Pass::forward);
    scratch_.resize(static_cast<std::size_t>(compute.threads()));
    for_each_expert_dynamically(compute, plan, parallel, [&](Index e, const Index* ids, Index count, int thread,
                                                          const Compute& expert_compute, Index next) {
      Scratch& scratch = scratch_[static_cast<std::size_t>(thread)];
      const auto weight = weights.middleRows(e * head_dim, head_dim);    // [d_h, d_model]
      const bool everyone = count == input.rows();  // every token chose e (so in token order): no gather
      // The row kernel reads the tokens' rows in place (bf16: the rounded ones) and writes the
      // assignments' rows (when every token chose e, the rows are in order already: the backend's
      // product takes them).
      const bool pairs = rounded_input != nullptr && !everyone && detail::pair_row_kernel_serves(head_dim, input.cols());
      const bool in_place =
          pairs || (rounded_input == nullptr && !everyone && detail::rows_times_weight_serves<Scalar>(precision, head_dim));
      const Index gathered = everyone || in_place ? 0 : count;
      auto inputs = rows_of(scratch.wide_rows, rounded_input ? 0 : gathered, input.cols());  // [c, d_model]
      auto projected = rows_of(scratch.narrow_result, in_place ? 0 : count, head_dim);      // [c, d_h]
      if (rounded_input) scratch.rounded_rows.resize(static_cast<std::size_t>(gathered * input.cols()));  // [c, d_model]
      const Index* token_rows = in_place ? token_rows_of(scratch, tokens, ids, count) : nullptr;        // [c]
      const auto packed = in_place ? packed_expert(expert_compute, weight, weights_version, scratch, pairs) : nullptr;
      const detail::Upcoming upcoming =
          in_place ? next_block(expert_compute, weights, head_dim, next, count, weights_version, scratch, pairs)
                   : detail::Upcoming{};
      parallel_ranges(expert_compute, count, kRowGrain, [&](Index first, Index rows, int) {
        if constexpr (std::is_same_v<Scalar, float>) {
          if (pairs) {
            detail::rows_times_weight(*packed, rows, rounded_input->view().data, input.cols(), token_rows + first,
                                      queries.data(), head_dim, ids + first, false, upcoming);
            return;
          }
        }
        if (in_place) {
          detail::rows_times_weight<Scalar>(*packed, rows, input.data(), input.cols(), token_rows + first,
                                            queries.data(), head_dim, ids + first, false, upcoming);
          return;
        }
        if (rounded_input != nullptr) {
          project_rounded(expert_compute, *rounded_input, ids, first, rows, everyone, tokens, weight, weights_version,
                          scratch.rounded_rows.data(), projected.middleRows(first, rows));
        } else if (everyone) {
          weight_product<Scalar>(expert_compute, input.middleRows(first, rows), weight, rounded, e,
                                 projected.middleRows(first, rows), false, precision, weights_version);
        } else {
          for (Index i = first; i < first + rows; ++i) inputs.row(i) = input.row(tokens[ids[i]]);
          weight_product<Scalar>(expert_compute, inputs.middleRows(first, rows), weight, rounded, e,
                                 projected.middleRows(first, rows), false, precision, weights_version);
        }
        for (Index i = first; i < first + rows; ++i) queries.row(ids[i]) = projected.row(i);
      });
    });
  }

  // output: [rows, d_model]; row t = sum over t's assignments a of gates[a] attended[a] Wo_e^T.
  // attended: [A, d_h]; gates: A values; weights: [E*d_model, d_h] (expert e's rows e*d_model ..).
  Matrix<Scalar> project_out(const Compute& compute, const Matrix<Scalar>& attended, const Scalar* gates,
                             const std::vector<Index>& tokens, const DispatchPlan& plan,
                             const ConstMatrixRef<Scalar>& weights, Index rows, Precision precision,
                             const BFloat16Weight* rounded = nullptr, std::uint64_t weights_version = 0) {
    const Index head_dim = attended.cols(), model = weights.rows() / std::max<Index>(plan.num_experts, 1);
    // In parallel, each expert's rows go to its assignments' rows, then each token adds up its own;
    // otherwise experts add into the token rows one after another.
    const bool parallel = experts_in_parallel(compute, plan, model * head_dim, Pass::forward);
    prepare(compute, parallel, static_cast<Index>(tokens.size()), model);
    // An expert every token chose (rows in token order) accumulates into the output in place.
    const auto every_token_chose = [&](Index e) { return !parallel && plan.count(e) == rows; };
    // bf16 (not decoding, whose steps stream the rounded weights): the row kernel's dot products of
    // pairs read the attended rows, rounded once, for the experts that not every token chose.
    bool pairs = std::is_same_v<Scalar, float> && precision == Precision::bf16 && rounded == nullptr &&
                 detail::pair_row_kernel_serves(model, head_dim);
    if constexpr (std::is_same_v<Scalar, float>) {
      bool some_in_place = false;
      for (Index e = 0; e < plan.num_experts; ++e)
        some_in_place = some_in_place || (plan.count(e) > 0 && !every_token_chose(e));
      pairs = pairs && some_in_place;
      if (pairs) rounded_attended_.assign(compute, attended);  // [A, d_h]
    }
    if (by_columns(compute, parallel, model, pairs || detail::rows_times_weight_serves<Scalar>(precision, model))) {
      Matrix<Scalar> output(rows, model);  // [N, d_model]
      const Index first_expert = busy_experts(plan).front();  // by_columns: some expert is busy
      for_each_expert_by_columns(compute, plan, model, [&](Index e, const Index* ids, Index count, Index next,
                                                         Index column, Index width, Scratch& scratch,
                                                         const Compute& serial) {
        if (e == first_expert) output.middleCols(column, width).setZero();
        const auto slice = weights.middleRows(e * model + column, width);  // [width, d_h]
        const auto packed = packed_expert(serial, slice, weights_version, scratch, pairs);
        const detail::Upcoming upcoming =
            next_block(serial, weights, model, next, count, weights_version, scratch, pairs, column, width);
        const Index* token_rows = token_rows_of(scratch, tokens, ids, count);  // [c]
        scratch.gates.resize(static_cast<std::size_t>(count));                 // [c]
        for (Index i = 0; i < count; ++i) scratch.gates[static_cast<std::size_t>(i)] = gates[ids[i]];
        if constexpr (std::is_same_v<Scalar, float>) {
          if (pairs) {
            detail::rows_times_weight(*packed, count, rounded_attended_.view().data, head_dim, ids,
                                      output.data() + column, model, token_rows, true, upcoming, scratch.gates.data());
            return;
          }
        }
        detail::rows_times_weight<Scalar>(*packed, count, attended.data(), head_dim, ids, output.data() + column, model,
                                          token_rows, true, upcoming, scratch.gates.data());
      });
      return output;
    }
    Matrix<Scalar> output = parallel ? Matrix<Scalar>(rows, model) : Matrix<Scalar>::Zero(rows, model);  // [N, d_model]
    for_each_expert_dynamically(compute, plan, parallel, [&](Index e, const Index* ids, Index count, int thread,
                                                          const Compute& expert_compute, Index next) {
      Scratch& scratch = scratch_[static_cast<std::size_t>(thread)];
      const auto weight = weights.middleRows(e * model, model);      // [d_model, d_h]
      const bool everyone = every_token_chose(e);
      // Otherwise the row kernel adds into the token rows (or writes the assignments' rows) in place.
      const bool in_place = !everyone && (pairs || detail::rows_times_weight_serves<Scalar>(precision, model));
      // The row kernel reads the attended rows in place and scales each product by its gate.
      auto scaled = rows_of(scratch.scaled, in_place ? 0 : count, head_dim);                // [c, d_h] gate * a
      auto projected = rows_of(scratch.wide_result, everyone || in_place ? 0 : count, model);  // [c, d_model]
      const Index* target_rows = !in_place ? nullptr : parallel ? ids : token_rows_of(scratch, tokens, ids, count);  // [c]
      const auto packed = in_place ? packed_expert(expert_compute, weight, weights_version, scratch, pairs) : nullptr;
      const detail::Upcoming upcoming =
          in_place ? next_block(expert_compute, weights, model, next, count, weights_version, scratch, pairs)
                   : detail::Upcoming{};
      if (in_place) {
        scratch.gates.resize(static_cast<std::size_t>(count));  // [c]
        for (Index i = 0; i < count; ++i) scratch.gates[static_cast<std::size_t>(i)] = gates[ids[i]];
      }
      parallel_ranges(expert_compute, count, kRowGrain, [&](Index first, Index slice, int) {
        if constexpr (std::is_same_v<Scalar, float>) {
          if (in_place && pairs) {
            detail::rows_times_weight(*packed, slice, rounded_attended_.view().data, head_dim, ids + first,
                                      parallel ? by_assignment_.data() : output.data(), model, target_rows + first,
                                      !parallel, upcoming, scratch.gates.data() + first);
            return;
          }
        }
        if (in_place) {
          detail::rows_times_weight<Scalar>(*packed, slice, attended.data(), head_dim, ids + first,
                                            parallel ? by_assignment_.data() : output.data(), model,
                                            target_rows + first, !parallel, upcoming, scratch.gates.data() + first);
          return;
        }
        for (Index i = first; i < first + slice; ++i) scaled.row(i) = gates[ids[i]] * attended.row(ids[i]);
        if (everyone) {
          weight_product<Scalar>(expert_compute, scaled.middleRows(first, slice), weight, rounded, e,
                                 output.middleRows(first, slice), true, precision, weights_version);
          return;
        }
        weight_product<Scalar>(expert_compute, scaled.middleRows(first, slice), weight, rounded, e,
                               projected.middleRows(first, slice), false, precision, weights_version);
        add_rows(parallel, ids, first, slice, tokens, projected, output);
      });
    });
    if (parallel) sum_by_token(compute, tokens, plan, output, false);
    return output;
  }

  // Backward of project_out. grad_output: [N, d_model]. Writes grad_gates[a] = d(loss)/d(gate a)
  // and grad_attended: [A, d_h] (rows of the plan's assignments), and accumulates weight_grad:
  // [E*d_model, d_h].
  void backward_out(const Compute& compute, const Matrix<Scalar>& grad_output, const Matrix<Scalar>& attended,
                    const Scalar* gates, const std::vector<Index>& tokens, const DispatchPlan& plan,
                    const ConstMatrixRef<Scalar>& weights, MatrixRef<Scalar> weight_grad, Scalar* grad_gates,
                    Matrix<Scalar>& grad_attended) {
    const Index head_dim = attended.cols(), model = grad_output.cols();
    // Experts write disjoint rows and weight slices: each one a part of its own.
    const bool parallel = experts_in_parallel(compute, plan, model * head_dim, Pass::backward);
    scratch_.resize(static_cast<std::size_t>(compute.threads()));
    for_each_expert_dynamically(compute, plan, parallel, [&](Index e, const Index* ids, Index count, int thread,
                                                          const Compute& expert_compute, Index next) {
      Scratch& scratch = scratch_[static_cast<std::size_t>(thread)];
      const auto weight = weights.middleRows(e * model, model);  // [d_model, d_h]
      const bool everyone = count == grad_output.rows();      // every token chose e: rows already in token order
      // The row kernels read the tokens' gradient rows in place (no gather) and the weight as it lies.
      const bool in_place = !everyone && row_kernels_take(head_dim, model);
      auto gathered = rows_of(scratch.wide_rows, everyone || in_place ? 0 : count, model);  // [c, d_model]
      const ConstMatrixRef<Scalar> grad_rows = everyone ? ConstMatrixRef<Scalar>(grad_output) : gathered;
      auto scaled = rows_of(scratch.scaled, count, head_dim);                // [c, d_h] gate * a
      auto grad_unscaled = rows_of(scratch.narrow_result, count, head_dim);  // [c, d_h] d(gate * a)
      const Index* token_rows = in_place ? token_rows_of(scratch, tokens, ids, count) : nullptr;  // [c]
      const auto upcoming = [&](const ConstMatrixRef<Scalar>& of) {  // the next expert's block of `of`
        return in_place ? next_block(expert_compute, of, model, next, count, 0, scratch) : detail::Upcoming{};
      };
      parallel_ranges(expert_compute, count, kRowGrain, [&](Index first, Index rows, int) {
        for (Index i = first; i < first + rows; ++i) {
          if (!everyone && !in_place) gathered.row(i) = grad_output.row(tokens[ids[i]]);
          scaled.row(i) = gates[ids[i]] * attended.row(ids[i]);
        }
        if (in_place)
          row_kernel_transposed(weight, rows, grad_output.data(), model, token_rows + first,
                                grad_unscaled.data() + first * head_dim, head_dim, nullptr, false, upcoming(weights));
        else
          gemm<Scalar>(expert_compute, grad_rows.middleRows(first, rows), Transpose::no, weight, Transpose::no,
                       grad_unscaled.middleRows(first, rows));
        for (Index i = first; i < first + rows; ++i) {
          grad_gates[ids[i]] = grad_unscaled.row(i).dot(attended.row(ids[i]));
          grad_attended.row(ids[i]) = gates[ids[i]] * grad_unscaled.row(i);
        }
      });
      auto expert_grad = weight_grad.middleRows(e * model, model);  // [d_model, d_h]
      if (in_place)
        outer_in_place(expert_compute, count, grad_output.data(), model, token_rows, scaled.data(), head_dim, nullptr,
                       expert_grad, upcoming(weight_grad));
      else
        gemm<Scalar>(expert_compute, grad_rows, Transpose::yes, scaled, Transpose::no, expert_grad, true);
    });
  }

  // Backward of project_in. grad_queries: [A, d_h]. Accumulates weight_grad: [E*d_h, d_model] and
  // grad_input: [N, d_model] (+=).
  void backward_in(const Compute& compute, const Matrix<Scalar>& grad_queries, const Matrix<Scalar>& input,
                   const std::vector<Index>& tokens, const DispatchPlan& plan, const ConstMatrixRef<Scalar>& weights,
                   MatrixRef<Scalar> weight_grad, Matrix<Scalar>& grad_input) {
    const Index head_dim = grad_queries.cols(), model = input.cols();
    // As in project_out: per assignment then per token in parallel, else into the token rows.
    const bool parallel = experts_in_parallel(compute, plan, model * head_dim, Pass::backward);
    if (by_columns(compute, parallel, model, row_kernels_take(head_dim, model))) {
      // Each thread's columns of the input gradient and of the weight gradients. (A weight's
      // columns do not lie in one piece, so nothing is fetched ahead.)
      for_each_expert_by_columns(compute, plan, model, [&](Index e, const Index* ids, Index count, Index,
                                                         Index column, Index width, Scratch& scratch, const Compute&) {
        const auto weight = weights.middleRows(e * head_dim, head_dim).middleCols(column, width);  // [d_h, width]
        const Index* token_rows = token_rows_of(scratch, tokens, ids, count);                     // [c]
        row_kernel_transposed(weight, count, grad_queries.data(), head_dim, ids, grad_input.data() + column, model,
                              token_rows, true, {});
        if constexpr (std::is_same_v<Scalar, float>) {
          auto expert_grad = weight_grad.middleRows(e * head_dim, head_dim);  // [d_h, d_model]
          detail::outer_kernel(count, grad_queries.data(), head_dim, ids, input.data() + column, model, token_rows,
                               head_dim, width, expert_grad.data() + column, expert_grad.outerStride());
        }
      });
      return;
    }
    prepare(compute, parallel, static_cast<Index>(tokens.size()), model);
    for_each_expert_dynamically(compute, plan, parallel, [&](Index e, const Index* ids, Index count, int thread,
                                                          const Compute& expert_compute, Index next) {
      Scratch& scratch = scratch_[static_cast<std::size_t>(thread)];
      const auto weight = weights.middleRows(e * head_dim, head_dim);  // [d_h, d_model]
      const bool everyone = count == input.rows();  // every token chose e: inputs already in token order
      // The row kernels read the gradient and input rows in place and add into the token rows.
      const bool in_place = !everyone && row_kernels_take(head_dim, model);
      const Index copied = in_place ? 0 : count;
      auto grad_rows = rows_of(scratch.narrow_rows, copied, head_dim);                  // [c, d_h]
      auto gathered = rows_of(scratch.wide_rows, everyone ? 0 : copied, model);         // [c, d_model]
      const ConstMatrixRef<Scalar> inputs = everyone ? ConstMatrixRef<Scalar>(input) : gathered;
      auto grad_inputs = rows_of(scratch.wide_result, copied, model);                   // [c, d_model]
      const Index* token_rows = in_place ? token_rows_of(scratch, tokens, ids, count) : nullptr;  // [c]
      const auto upcoming = [&](const ConstMatrixRef<Scalar>& of) {  // the next expert's block of `of`
        return in_place ? next_block(expert_compute, of, head_dim, next, count, 0, scratch) : detail::Upcoming{};
      };
      parallel_ranges(expert_compute, count, kRowGrain, [&](Index first, Index rows, int) {
        if (in_place) {
          row_kernel_transposed(weight, rows, grad_queries.data(), head_dim, ids + first,
                                parallel ? by_assignment_.data() : grad_input.data(), model,
                                (parallel ? ids : token_rows) + first, !parallel, upcoming(weights));
          return;
        }
        for (Index i = first; i < first + rows; ++i) {
          grad_rows.row(i) = grad_queries.row(ids[i]);
          if (!everyone) gathered.row(i) = input.row(tokens[ids[i]]);
        }
        gemm<Scalar>(expert_compute, grad_rows.middleRows(first, rows), Transpose::no, weight, Transpose::no,
                     grad_inputs.middleRows(first, rows));
        add_rows(parallel, ids, first, rows, tokens, grad_inputs, grad_input);
      });
      auto expert_grad = weight_grad.middleRows(e * head_dim, head_dim);  // [d_h, d_model]
      if (in_place)
        outer_in_place(expert_compute, count, grad_queries.data(), head_dim, ids, input.data(), model, token_rows,
                       expert_grad, upcoming(weight_grad));
      else
        gemm<Scalar>(expert_compute, grad_rows, Transpose::yes, inputs, Transpose::no, expert_grad, true);
    });
    if (parallel) sum_by_token(compute, tokens, plan, grad_input, true);
  }

 private:
  // Rows of one expert handed to a thread at a time.
  static constexpr Index kRowGrain = 32;

  // Whether an expert of `count` rows fetches the next expert's weights ahead (row_kernel's
  // Upcoming): with a few rows (decoding steps) its own weight streams from memory already.
  static bool fetches_ahead(Index next, Index count) { return next >= 0 && count >= kFetchAheadRows; }
  static constexpr Index kFetchAheadRows = 16;

  // Whether the backward's row kernels serve an expert of these widths: float on an AVX-512 CPU,
  // both widths multiples of 16.
  static bool row_kernels_take(Index head_dim, Index model) {
    return std::is_same_v<Scalar, float> && detail::row_kernel_serves(head_dim) && detail::row_kernel_serves(model);
  }

  // For i < m: row c_rows[i] of c (+)= row a_rows[i] of a times M, M [k, n] an expert's weight as
  // it lies (float only: row_kernels_take).
  static void row_kernel_transposed(const ConstMatrixRef<Scalar>& m, Index rows, const Scalar* a, Index lda,
                                    const Index* a_rows, Scalar* c, Index ldc, const Index* c_rows, bool accumulate,
                                    const detail::Upcoming& upcoming) {
    if constexpr (std::is_same_v<Scalar, float>)
      detail::row_kernel(rows, a, lda, a_rows, detail::PanelView::transposed(m.data(), m.rows(), m.cols(), m.outerStride()),
                         c, ldc, c_rows, accumulate, upcoming);
  }

  // weight_grad [n, k] += G^T X over an expert's m rows, G's rows g_rows of g and X's rows x_rows
  // of x (null: in order), in place (float only: row_kernels_take). The threads take panels of 64
  // columns where there are several (each copies only its own slices of X's rows), else ranges of
  // rows; each element sums its rows in order, so any thread count gives the same gradient.
  static void outer_in_place(const Compute& compute, Index m, const Scalar* g, Index ldg, const Index* g_rows,
                             const Scalar* x, Index ldx, const Index* x_rows, MatrixRef<Scalar> weight_grad,
                             const detail::Upcoming& upcoming) {
    if constexpr (std::is_same_v<Scalar, float>) {
      const Index n = weight_grad.rows(), k = weight_grad.cols(), ldw = weight_grad.outerStride();
      const Index panels = (k + detail::kPanelWidth - 1) / detail::kPanelWidth;
      if (panels > 1) {
        parallel_ranges(compute, panels, 1, [&](Index first, Index count, int) {
          const Index column = first * detail::kPanelWidth, width = std::min(k - column, count * detail::kPanelWidth);
          detail::outer_kernel(m, g, ldg, g_rows, x + column, ldx, x_rows, n, width, weight_grad.data() + column, ldw,
                               upcoming.share(first, panels, count));
        });
      } else {
        parallel_ranges(compute, n, 12, [&](Index first, Index rows, int) {
          detail::outer_kernel(m, g + first, ldg, g_rows, x, ldx, x_rows, rows, k, weight_grad.data() + first * ldw,
                               ldw, upcoming.share(first, n, rows));
        });
      }
    }
  }

  // Buffers reused across experts and calls, so a pass does not allocate per expert; one per
  // width, so none is resized between uses.
  struct Scratch {
    Matrix<Scalar> wide_rows, wide_result;      // [c, d_model] gathered rows, per-expert results
    Matrix<Scalar> narrow_rows, narrow_result;  // [c, d_h]
    Matrix<Scalar> scaled;                      // [c, d_h] gate * attended
    std::vector<Scalar> gates;                  // [c] the gate of each of an expert's assignments
    std::vector<std::uint16_t> rounded_rows;    // [c, d_model] gathered rows of a rounded input
    std::vector<Index> token_rows;              // [c] the token row of each of an expert's assignments
    detail::PanelWeight packed;                 // an expert's weight packed for the row kernel (training)
    std::shared_ptr<const detail::PanelWeight> handed_on;  // the next expert's kept packed weight (inference)
    const Scalar* handed_on_of = nullptr;                   // the weight it is of
  };

  // Expert e's weight (a block of rows of the experts' weights) packed for the row kernel: the copy
  // next_block handed on when it fetched it ahead for this expert, else packed_weight's.
  static std::shared_ptr<const detail::PanelWeight> packed_expert(const Compute& compute,
                                                                  const ConstMatrixRef<Scalar>& weight,
                                                                  std::uint64_t version, Scratch& scratch, bool pairs) {
    if (version != 0 && scratch.handed_on && scratch.handed_on_of == weight.data() &&
        scratch.handed_on->version == version && scratch.handed_on->pairs.empty() != pairs)
      return std::move(scratch.handed_on);
    return detail::packed_weight<Scalar>(compute, weight, version, scratch.packed, pairs);
  }

  // What an expert of `count` rows fetches into L2 while its row kernels run (nothing unless
  // fetches_ahead): the next expert's rows of `of` (its block of `block` rows: a weight, or a weight
  // gradient), or with a version (inference) that weight's kept packed copy, which is handed on in
  // the scratch to packed_expert (one lookup in the store per expert, not two).
  static detail::Upcoming next_block(const Compute& compute, const ConstMatrixRef<Scalar>& of, Index block, Index next,
                                     Index count, std::uint64_t version, Scratch& scratch, bool pairs = false,
                                     Index offset = 0, Index rows_wanted = -1) {
    if (!fetches_ahead(next, count)) return {};
    const auto rows = of.middleRows(next * block + offset, rows_wanted < 0 ? block : rows_wanted);
    if (version != 0) scratch.handed_on_of = rows.data();
    return detail::upcoming_weight<Scalar>(compute, rows, version, scratch.handed_on, pairs);
  }

  // projected = rows [first, first + count) of an expert's rows of a rounded input times weight^T,
  // in bf16: gathered as bfloat16 (half the bytes of floats) into gathered's same rows [c, d_model],
  // or read in place when every token chose the expert (rows in token order).
  template <typename Weight, typename Projected>
  static void project_rounded(const Compute& compute, const BFloat16Matrix& input, const Index* ids, Index first,
                              Index count, bool everyone, const std::vector<Index>& tokens, const Weight& weight,
                              std::uint64_t weights_version, std::uint16_t* gathered, Projected&& projected) {
    if constexpr (std::is_same_v<Scalar, float>) {  // float only (project_in checks)
      const Index model = input.cols();
      if (!everyone)
        for (Index i = first; i < first + count; ++i) std::copy_n(input.row(tokens[ids[i]]), model, gathered + i * model);
      const BFloat16Rows rows = everyone ? input.view().middle_rows(first, count)
                                         : BFloat16Rows{gathered + first * model, count, model, model};
      gemm_bfloat16_input(compute, rows, weight, Transpose::yes, projected, false, weights_version);
    }
  }

  // Whether the experts run as parts of their own on the compute's threads: when there are at
  // least two busy experts per thread, work enough to repay waking them, and experts too small to
  // split. Otherwise each expert splits its rows across the threads instead, which adds the
  // outputs straight into the token rows (no per-assignment rows and second pass to sum them) but
  // wakes the threads for every expert, and in training has oneDNN copy each weight once per
  // thread. Measured on 2 threads (Xeon): the forward gains from splitting from about 200 rows per
  // thread (wide8 and causal at 256: 3-7%; base at 512: 10%; wide at 64 and toy at 128 lose 5-20%),
  // backward only from larger experts (base and causal: 6-10% in forward+backward; wide and the
  // translate trainer's model, about 2M multiply-adds per thread and expert, 2% slower). Each
  // expert run as a part multiplies on one thread (Compute::serial), whole. With a row or two per
  // expert (decoding steps) the products stream their weights rather than compute, so reading the
  // weights counts as work too (see kWeightReadCost).
  enum class Pass { forward, backward };
  static bool experts_in_parallel(const Compute& compute, const DispatchPlan& plan, Index weight_size, Pass pass) {
    const int threads = compute.threads();
    if (threads == 1) return false;
    Index busy = 0;
    for (Index e = 0; e < plan.num_experts; ++e) busy += plan.count(e) > 0 ? 1 : 0;
    const double work = std::max(static_cast<double>(plan.assignments()), detail::kWeightReadCost * static_cast<double>(busy)) *
                        static_cast<double>(weight_size);
    if (busy < 2 * threads || work < detail::kParallelGemmFlops) return false;
    const double rows_per_thread = static_cast<double>(plan.assignments()) / static_cast<double>(busy * threads);
    const bool split = pass == Pass::forward ? rows_per_thread >= 192.0
                                             : rows_per_thread * static_cast<double>(weight_size) >= double(1 << 22);
    return !split;
  }

  // Whether a sum into token rows that would run per assignment (parallel) runs by columns
  // instead: each thread takes whole panels of the d_model columns, an equal share, and runs every
  // expert over them in turn, adding into the token rows in place as one thread does. No
  // per-assignment rows, no second pass to add them up (Zen 4, wide's forward+backward on 2
  // threads, alternated: 15.9-17.0 -> 14.9-15.6 ms), and the same sums as one thread's.
  // in_place: the row kernel serves every expert.
  static bool by_columns(const Compute& compute, bool parallel, Index model, bool in_place) {
    const Index panels = (model + detail::kPanelWidth - 1) / detail::kPanelWidth;
    return parallel && in_place && panels % compute.threads() == 0;
  }

  // The experts with assignments, in expert order.
  static std::vector<Index> busy_experts(const DispatchPlan& plan) {
    std::vector<Index> busy;
    for (Index e = 0; e < plan.num_experts; ++e)
      if (plan.count(e) > 0) busy.push_back(e);
    return busy;
  }

  // visit(expert, ids, count, next, column, width, scratch, serial) on each thread for its columns
  // [column, column + width) (whole panels) and every expert with assignments, in expert order;
  // next: the expert after it (-1: none). serial: the compute a thread multiplies on.
  template <typename Visit>
  void for_each_expert_by_columns(const Compute& compute, const DispatchPlan& plan, Index model, Visit&& visit) {
    const std::vector<Index> busy = busy_experts(plan);
    const Index panels = (model + detail::kPanelWidth - 1) / detail::kPanelWidth, parts = static_cast<Index>(busy.size());
    scratch_.resize(static_cast<std::size_t>(compute.threads()));
    parallel_ranges(compute, panels, panels / compute.threads(), [&](Index first, Index count, int thread) {
      const Index column = first * detail::kPanelWidth, width = std::min(model - column, count * detail::kPanelWidth);
      for (Index part = 0; part < parts; ++part) {
        const Index e = busy[static_cast<std::size_t>(part)];
        visit(e, plan.order.data() + plan.offsets[e], plan.count(e),
              part + 1 < parts ? busy[static_cast<std::size_t>(part + 1)] : Index{-1}, column, width,
              scratch_[static_cast<std::size_t>(thread)], compute.serial());
      }
    });
  }

  // visit(expert, ids, count, thread, expert_compute, next) for every expert with assignments;
  // next is the expert the thread likely visits next (-1: none), whose weights it may fetch ahead.
  // In parallel, each expert is a part that the first free thread takes, the busiest experts first
  // (so the last to finish are small), and multiplies on expert_compute = compute.serial(). For
  // work whose experts write disjoint outputs, which thread runs an expert changes nothing:
  // `thread` only picks scratch.
  template <typename Visit>
  static void for_each_expert_dynamically(const Compute& compute, const DispatchPlan& plan, bool parallel,
                                          Visit&& visit) {
    std::vector<Index> busy = busy_experts(plan);  // (parallel) sorted below, most first
    const Index parts = static_cast<Index>(busy.size());
    if (!parallel) {
      for (Index part = 0; part < parts; ++part) {
        const Index e = busy[static_cast<std::size_t>(part)];
        visit(e, plan.order.data() + plan.offsets[e], plan.count(e), 0, compute,
              part + 1 < parts ? busy[static_cast<std::size_t>(part + 1)] : Index{-1});
      }
      return;
    }
    std::stable_sort(busy.begin(), busy.end(), [&](Index a, Index b) { return plan.count(a) > plan.count(b); });
    const Index stride = compute.threads();  // a guess at the part this thread takes next
    compute.pool().run(parts, [&](Index part, int thread) {
      const Index e = busy[static_cast<std::size_t>(part)];
      visit(e, plan.order.data() + plan.offsets[e], plan.count(e), thread, compute.serial(),
            part + stride < parts ? busy[static_cast<std::size_t>(part + stride)] : Index{-1});
    });
  }

  // Scratch for each thread that runs experts, and the per-assignment rows of a parallel sum.
  void prepare(const Compute& compute, bool parallel, Index assignments, Index model) {
    scratch_.resize(parallel ? static_cast<std::size_t>(compute.threads()) : 1);
    if (parallel) by_assignment_.resize(assignments, model);  // [A, d_model]
  }

  // Rows [first, first + count) of one expert's results: to their assignments' rows of
  // by_assignment_ (parallel), or added into their tokens' rows of target.
  template <typename Results>
  void add_rows(bool parallel, const Index* ids, Index first, Index count, const std::vector<Index>& tokens,
                const Results& results, Matrix<Scalar>& target) {
    for (Index i = first; i < first + count; ++i) {
      if (parallel) by_assignment_.row(ids[i]) = results.row(i);
      else target.row(tokens[ids[i]]) += results.row(i);
    }
  }

  // target.row(t) (+)= the sum of by_assignment_'s rows of t's assignments in the plan, in
  // assignment order (zero for a token with none), tokens spread over the threads: the same sums for
  // any thread count and whichever thread ran which expert.
  void sum_by_token(const Compute& compute, const std::vector<Index>& tokens, const DispatchPlan& plan,
                    Matrix<Scalar>& target, bool accumulate) {
    const Index rows = target.rows(), assignments = static_cast<Index>(tokens.size());
    std::vector<char> planned(static_cast<std::size_t>(assignments), 0);  // [A] padding is not in the plan
    for (Index a : plan.order) planned[static_cast<std::size_t>(a)] = 1;
    token_offsets_.assign(static_cast<std::size_t>(rows + 1), 0);  // [N + 1]
    for (Index a = 0; a < assignments; ++a)
      if (planned[static_cast<std::size_t>(a)]) ++token_offsets_[static_cast<std::size_t>(tokens[a] + 1)];
    for (Index t = 0; t < rows; ++t) token_offsets_[t + 1] += token_offsets_[t];
    token_assignments_.resize(static_cast<std::size_t>(token_offsets_[rows]));  // ids grouped by token, ascending
    std::vector<Index> next(token_offsets_.begin(), token_offsets_.end() - 1);
    for (Index a = 0; a < assignments; ++a)
      if (planned[static_cast<std::size_t>(a)]) token_assignments_[static_cast<std::size_t>(next[tokens[a]]++)] = a;
    parallel_ranges(compute, rows, kRowGrain, [&](Index first, Index count, int) {
      for (Index t = first; t < first + count; ++t) {
        if (!accumulate) target.row(t).setZero();
        for (Index i = token_offsets_[t]; i < token_offsets_[t + 1]; ++i)
          target.row(t) += by_assignment_.row(token_assignments_[static_cast<std::size_t>(i)]);
      }
    });
  }

  // The token rows of an expert's `count` assignments ids, in scratch: [c].
  static const Index* token_rows_of(Scratch& scratch, const std::vector<Index>& tokens, const Index* ids, Index count) {
    scratch.token_rows.resize(static_cast<std::size_t>(count));
    for (Index i = 0; i < count; ++i) scratch.token_rows[static_cast<std::size_t>(i)] = tokens[static_cast<std::size_t>(ids[i])];
    return scratch.token_rows.data();
  }

  // The first `rows` rows of a scratch buffer, grown (never shrunk) to fit.
  static auto rows_of(Matrix<Scalar>& buffer, Index rows, Index cols) {
    if (buffer.rows() < rows || buffer.cols() != cols) buffer.resize(std::max(rows, buffer.rows()), cols);
    return buffer.topRows(rows);
  }

  std::vector<Scratch> scratch_;  // one per thread
  Matrix<Scalar> by_assignment_;  // [A, d_model] each assignment's row of a sum into token rows
  BFloat16Matrix rounded_attended_;  // bf16 project_out: [A, d_h] the attended rows rounded
  std::vector<Index> token_offsets_, token_assignments_;  // [N + 1], [A]: token t's assignments
};

}  // namespace moa
