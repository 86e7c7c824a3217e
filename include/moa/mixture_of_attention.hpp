// moa/mixture_of_attention.hpp - the Mixture-of-Attention-Heads layer (Zhang et al., 2022).
//
//     K = Z Wk^T, V = Z Wv^T                                one key and one value head for all experts
//     y_t = sum_{i in G(t)} gate_{i,t} softmax(x_t Wq_i^T K^T / sqrt(d_h) + mask) V Wo_i^T
//
// Computed as MOA.md describes: route; group the N*k assignments by expert (DispatchPlan); one GEMM
// per chosen expert for the query projection, scattered to a [N*k, d_h] buffer in token order (the
// k queries of a token adjacent); per sequence, the N*k query rows attend to the one shared K and
// V as GEMMs (causal: block by block, skipping the upper triangle); one GEMM per expert for the
// output projection, scaled by the gates and added into the token rows. Experts no token chose
// cost nothing, so the cost grows with k and not with E. Backward mirrors each step.
//
// With expert-choice routing (RouterConfig::mode, see moa/router.hpp) each expert chooses its
// tokens instead: a token has any number of assignments, each sequence's assignments are
// consecutive rows, and the rest is the same. It is rejected for causal attention (the choice over
// the whole sequence would see the future) and for decoding step by step.
//
// Parameters (PyTorch names and [out, in] shapes, so a PyTorch-trained layer loads unchanged):
//     router.weight [E, d_model], q_proj.weight [E, d_h, d_model], o_proj.weight [E, d_model, d_h],
//     k_proj.weight [d_h, d_model], v_proj.weight [d_h, d_model]
//     (+ router.noise_weight [E, d_model] with noisy gating)
#pragma once

#include "moa/attention_cost.hpp"
#include "moa/attention_interface.hpp"
#include "moa/attention_kernel.hpp"
#include "moa/attention_span.hpp"
#include "moa/bfloat16.hpp"
#include "moa/error.hpp"
#include "moa/expert_projections.hpp"
#include "moa/gemm.hpp"
#include "moa/init.hpp"
#include "moa/kv_cache.hpp"
#include "moa/parameter.hpp"
#include "moa/random.hpp"
#include "moa/reusable.hpp"
#include "moa/router.hpp"
#include "moa/tensor.hpp"
#include "moa/top_k.hpp"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace moa {

struct MixtureOfAttentionConfig : RouterConfig {
  Index head_dim = 0;
  Index causal_block = 32;  // query positions per block of causal attention
  // Each expert's span in causal self-attention (moa/attention_span.hpp); empty: all full.
  std::vector<AttentionSpan> spans;

  // True when some expert sees less than every earlier key.
  bool has_spans() const {
    return std::any_of(spans.begin(), spans.end(), [](const AttentionSpan& span) { return !span.is_full(); });
  }

  void validate(const char* function) const {
    RouterConfig::validate(function);
    MOA_CHECK(head_dim > 0, function, "head_dim must be positive, got ", head_dim);
    MOA_CHECK(causal_block > 0, function, "causal_block must be positive, got ", causal_block);
    MOA_CHECK(spans.empty() || static_cast<Index>(spans.size()) == num_experts, function, "spans has ", spans.size(),
              " entries for ", num_experts, " experts (empty: every expert full)");
    for (std::size_t e = 0; e < spans.size(); ++e) spans[e].validate(function, "spans[" + std::to_string(e) + "]");
    MOA_CHECK(!has_spans() || mode == RoutingMode::token_choice, function,
              "attention spans are for causal attention, which expert-choice routing is not defined for");
  }
};

template <typename S>
class MixtureOfAttention {
 public:
  using Scalar = S;

  MixtureOfAttention(const MixtureOfAttentionConfig& config, Rng& rng)
      : router((config.validate("MixtureOfAttention"), config), rng),
        q_proj("weight", {config.num_experts, config.head_dim, config.model_dim}),
        o_proj("weight", {config.num_experts, config.model_dim, config.head_dim}),
        k_proj("weight", {config.head_dim, config.model_dim}),
        v_proj("weight", {config.head_dim, config.model_dim}),
        config_(config) {
    // As fairseq's attention: Xavier uniform, gain 1/sqrt(2) for the input projections.
    const double input_gain = 1.0 / std::sqrt(2.0);
    init_xavier_uniform(q_proj, rng, input_gain);
    init_xavier_uniform(k_proj, rng, input_gain);
    init_xavier_uniform(v_proj, rng, input_gain);
    init_xavier_uniform(o_proj, rng);
  }

  const MixtureOfAttentionConfig& config() const { return config_; }
  Index model_dim() const { return config_.model_dim; }
  bool training() const { return router.training(); }
  void set_training(bool training) { router.set_training(training); }
  // The backend and threads every product of the layer runs on.
  void set_compute(ComputePtr compute) {
    compute_ = detail::checked_compute(std::move(compute), "MixtureOfAttention::set_compute");
    router.set_compute(compute_);
  }
  const Compute& compute() const { return *compute_; }

  // query: [B*Tq, d_model], key_value: [B*Tk, d_model] -> output: [B*Tq, d_model]. Padding query
  // rows get zeros and are not routed; padding keys are never attended to. Noisy gating and
  // sampled experts draw from rng in training; without them the overloads without an Rng serve.
  Matrix<Scalar> forward(const Matrix<Scalar>& query, const SequenceBatch& query_batch,
                         const Matrix<Scalar>& key_value, const SequenceBatch& key_batch, bool causal, Rng& rng) {
    return forward_impl(query, query_batch, key_value, key_batch, causal, &rng);
  }
  Matrix<Scalar> forward(const Matrix<Scalar>& query, const SequenceBatch& query_batch,
                         const Matrix<Scalar>& key_value, const SequenceBatch& key_batch, bool causal) {
    return forward_impl(query, query_batch, key_value, key_batch, causal, nullptr);
  }
  Matrix<Scalar> forward_self(const Matrix<Scalar>& input, const SequenceBatch& batch, bool causal, Rng& rng) {
    return forward_impl(input, batch, input, batch, causal, &rng);
  }
  Matrix<Scalar> forward_self(const Matrix<Scalar>& input, const SequenceBatch& batch, bool causal) {
    return forward_impl(input, batch, input, batch, causal, nullptr);
  }

  // The forward of evaluation without its state: routes as in evaluation (no noise, no sampling)
  // and keeps nothing for backward, so a const layer serves (decoding's encoder, several threads).
  Matrix<Scalar> infer(const Matrix<Scalar>& query, const SequenceBatch& query_batch, const Matrix<Scalar>& key_value,
                       const SequenceBatch& key_batch, bool causal) const {
    detail::validate_attention_batches("MixtureOfAttention::infer", model_dim(), query.rows(), query.cols(), query_batch,
                                       key_value.rows(), key_value.cols(), key_batch, causal);
    check_not_causal_expert_choice(causal, "MixtureOfAttention::infer");
    check_spans(causal, "MixtureOfAttention::infer");
    const Routing routing = router.route(query, query_batch);
    const auto pass = inference_.lease();
    pass->for_backward = false;
    return run_forward(query, query_batch, key_value, key_batch, causal, routing, product_precision(*compute_, false),
                       *pass);
  }

 private:
  using Routing = typename Router<Scalar>::Routing;

  // With spans, the assignments regrouped by (sequence, expert), each group's positions ascending:
  // an expert's rows attend together within its span.
  struct ExpertRows {
    std::vector<Index> order;      // [A'] assignment ids (routed ones only)
    std::vector<Index> positions;  // [A'] the position of each in its sequence
    std::vector<Index> groups;     // [B*E + 1]: (sequence b, expert e)'s rows start at groups[b*E + e]
  };

  // What a forward computes after routing, kept by forward for backward. A assignments: B*Tq*k
  // with token choice (padding rows unused), any number with expert choice.
  struct ForwardPass {
    DispatchPlan plan;
    Matrix<Scalar> keys;           // [B*Tk, d_h]
    Matrix<Scalar> values;         // [B*Tk, d_h]
    Matrix<Scalar> queries;        // [A, d_h]
    bool for_backward = true;      // false: inference, which keeps no probabilities
    Matrix<Scalar> probabilities;  // [A, Tk] for backward
    Matrix<Scalar> attended;       // [A, d_h], before the gates
    ExpertProjections<Scalar> projections;  // the per-expert products and their buffers
    ExpertRows by_expert;                   // with spans: the rows regrouped by (sequence, expert)
    Matrix<Scalar> grouped_queries;         // with spans: [A, d_h] in by_expert order
    Matrix<Scalar> grouped_attended;        // with spans: [A, d_h] in by_expert order
    BFloat16Matrix rounded_query;           // bf16 products: [B*Tq, d_model] rounded once for all of them
    BFloat16Matrix rounded_key_value;       // bf16 cross-attention: [B*Tk, d_model]
    double flops = 0.0;
  };

  Matrix<Scalar> forward_impl(const Matrix<Scalar>& query, const SequenceBatch& query_batch,
                              const Matrix<Scalar>& key_value, const SequenceBatch& key_batch, bool causal, Rng* rng) {
    detail::validate_attention_batches("MixtureOfAttention::forward", model_dim(), query.rows(), query.cols(),
                                       query_batch, key_value.rows(), key_value.cols(), key_batch, causal);
    // forward_self passes one matrix twice; keep one copy of it.
    self_attention_ = &query == &key_value;
    detail::parallel_assign(*compute_, query_, query);
    if (!self_attention_) detail::parallel_assign(*compute_, key_value_, key_value);
    query_batch_ = query_batch;
    key_batch_ = key_batch;
    causal_ = causal;
    check_not_causal_expert_choice(causal, "MixtureOfAttention::forward");
    check_spans(causal, "MixtureOfAttention::forward");
    router.forward(query, query_batch, rng);
    return run_forward(query, query_batch, key_value, key_batch, causal, router.routing(),
                       product_precision(*compute_, training()), pass_);
  }

  void check_not_causal_expert_choice(bool causal, const char* function) const {
    MOA_CHECK(!causal || config_.mode == RoutingMode::token_choice, function,
              "expert-choice routing is not defined for causal attention: each expert chooses among all the "
              "tokens of a sequence, so a token's output would depend on later tokens");
  }

  void check_spans(bool causal, const char* function) const {
    MOA_CHECK(causal || !config_.has_spans(), function,
              "attention spans (a sink and a window of earlier keys) are defined for causal attention only");
  }

  // routing: the assignments of the N = B*Tq query rows.
  Matrix<Scalar> run_forward(const Matrix<Scalar>& query, const SequenceBatch& query_batch,
                             const Matrix<Scalar>& key_value, const SequenceBatch& key_batch, bool causal,
                             const Routing& routing, Precision precision, ForwardPass& pass) const {
    const Index assignments = static_cast<Index>(routing.experts.size());
    pass.plan = DispatchPlan::build(routing.experts, config_.num_experts, slots_per_row());
    // Inference lets the backend keep the weights repacked, until their versions change.
    const auto version = [&](const Parameter<Scalar>& weight) { return pass.for_backward ? 0 : weight.version(); };
    // bf16: each input rounded once for all the products that read it.
    const ProductInput<Scalar> query_input(*compute_, query, precision, pass.rounded_query);
    const ProductInput<Scalar> key_value_input =
        &query == &key_value ? query_input : ProductInput<Scalar>(*compute_, key_value, precision, pass.rounded_key_value);
    pass.keys = key_value_input.times(k_proj.value, version(k_proj));    // [B*Tk, d_h]
    pass.values = key_value_input.times(v_proj.value, version(v_proj));  // [B*Tk, d_h]
    pass.projections.project_in(*compute_, query, pass.plan, routing.tokens, q_proj.value, config_.head_dim,
                                pass.queries, precision, nullptr, version(q_proj), query_input.rounded());  // [A, d_h]
    detail::AttentionProbabilities<Scalar> probabilities(pass.for_backward ? &pass.probabilities : nullptr, assignments,
                                                 key_batch.length, compute_->threads());  // [A, Tk]
    pass.attended.resize(assignments, config_.head_dim);        // [A, d_h], rows of routed tokens written
    pass.flops = projection_flops(query.rows(), key_value.rows(), pass.plan.assignments());
    // Sequences are independent: one per thread.
    const double attention_work = static_cast<double>(assignments) * key_batch.length * config_.head_dim;
    if (spans_differ()) {
      pass.by_expert = rows_by_expert(routing, query_batch);
      pass.grouped_queries.resize(assignments, config_.head_dim);   // [A, d_h] in by_expert order
      pass.grouped_attended.resize(assignments, config_.head_dim);  // [A, d_h] in by_expert order
      parallel_parts(*compute_, query_batch.batch_size, attention_work, [&](Index b, int thread, const Compute& part_compute) {
        for_each_expert_rows(pass.by_expert, b, key_batch.length_of(b), 0, [&](Index first, Index count, const AttentionLayout& layout) {
          for (Index i = first; i < first + count; ++i) pass.grouped_queries.row(i) = pass.queries.row(pass.by_expert.order[i]);
          attention_forward<Scalar>(pass.grouped_queries.middleRows(first, count),
                                    pass.keys.middleRows(b * key_batch.length, key_batch.length),
                                    pass.values.middleRows(b * key_batch.length, key_batch.length), layout,
                                    probabilities.rows(first, count, thread),
                                    pass.grouped_attended.middleRows(first, count), part_compute, precision);
          for (Index i = first; i < first + count; ++i) pass.attended.row(pass.by_expert.order[i]) = pass.grouped_attended.row(i);
        });
      });
      for (Index b = 0; b < query_batch.batch_size; ++b)
        for_each_expert_rows(pass.by_expert, b, key_batch.length_of(b), 0, [&](Index, Index, const AttentionLayout& layout) {
          pass.flops += cost::attention(static_cast<double>(layout.visible_pairs()), static_cast<double>(config_.head_dim));
        });
    } else {
      parallel_parts(*compute_, query_batch.batch_size, attention_work, [&](Index b, int thread, const Compute& part_compute) {
        const SequenceRows rows = sequence_rows(routing, query_batch, key_batch, causal, b);
        attention_forward<Scalar>(pass.queries.middleRows(rows.first, rows.count),
                                  pass.keys.middleRows(b * key_batch.length, key_batch.length),
                                  pass.values.middleRows(b * key_batch.length, key_batch.length), rows.layout,
                                  probabilities.rows(rows.first, rows.count, thread),
                                  pass.attended.middleRows(rows.first, rows.count), part_compute, precision);
      });
      for (Index b = 0; b < query_batch.batch_size; ++b) {
        const AttentionLayout layout = sequence_rows(routing, query_batch, key_batch, causal, b).layout;
        pass.flops += cost::attention(static_cast<double>(layout.visible_pairs()), static_cast<double>(config_.head_dim));
      }
    }
    return pass.projections.project_out(*compute_, pass.attended, routing.gates.data(), routing.tokens, pass.plan,
                                        o_proj.value, query.rows(), precision, nullptr, version(o_proj));
  }

 public:
  // grad_output: [B*Tq, d_model]. Accumulates every parameter gradient (the aux loss's included)
  // and returns the gradients of both inputs.
  AttentionGradients<Scalar> backward(const Matrix<Scalar>& grad_output) { return backward_impl(grad_output, false); }

 private:
  // one_input: the key and value side's input gradient is added into the query side's (forward_self).
  AttentionGradients<Scalar> backward_impl(const Matrix<Scalar>& grad_output, bool one_input) {
    const Index head_dim = config_.head_dim, model = model_dim();
    MOA_CHECK(grad_output.rows() == query_.rows() && grad_output.cols() == model, "MixtureOfAttention::backward",
              "grad_output has shape ", detail::shape_of(grad_output), ", expected ", detail::shape_of(query_),
              " (as the last forward)");
    const Routing& routing = router.routing();
    const Matrix<Scalar>& gates = routing.gates;                                   // [N, k] or [A, 1]
    Matrix<Scalar> grad_gates = Matrix<Scalar>::Zero(gates.rows(), gates.cols());  // as gates
    const std::vector<Index>& tokens = routing.tokens;                             // [A]
    // Large buffers are members, reused by every call: fresh ones would page-fault each time.
    Matrix<Scalar>& grad_attended = grad_attended_;  // [A, d_h]
    detail::parallel_assign(*compute_, grad_attended, Matrix<Scalar>::Zero(pass_.attended.rows(), head_dim));
    // Output side: y_t += gate * a Wo_e^T.
    pass_.projections.backward_out(*compute_, grad_output, pass_.attended, gates.data(), tokens, pass_.plan, o_proj.value,
                                   o_proj.grad, grad_gates.data(), grad_attended);
    // Attention, per sequence, against the shared K and V.
    Matrix<Scalar>& grad_queries = grad_queries_;  // [A, d_h]
    Matrix<Scalar>& grad_keys = grad_keys_;        // [B*Tk, d_h]
    Matrix<Scalar>& grad_values = grad_values_;    // [B*Tk, d_h]
    detail::parallel_assign(*compute_, grad_queries, Matrix<Scalar>::Zero(pass_.queries.rows(), head_dim));
    detail::parallel_assign(*compute_, grad_keys, Matrix<Scalar>::Zero(pass_.keys.rows(), head_dim));
    detail::parallel_assign(*compute_, grad_values, Matrix<Scalar>::Zero(pass_.values.rows(), head_dim));
    grad_scores_.resize(static_cast<std::size_t>(compute_->threads()));
    const double attention_work = static_cast<double>(pass_.queries.rows()) * key_batch_.length * head_dim;
    if (spans_differ()) {
      // Per (sequence, expert) group: gather its rows' output gradients, scatter its query gradients.
      Matrix<Scalar>& grouped_grad = grouped_grad_;                  // [A, d_h] in by_expert order
      Matrix<Scalar>& grouped_grad_queries = grouped_grad_queries_;  // [A, d_h] in by_expert order
      grouped_grad.resize(grad_attended.rows(), head_dim);
      grouped_grad_queries.resize(grad_attended.rows(), head_dim);
      const std::vector<Index>& order = pass_.by_expert.order;
      parallel_parts(*compute_, query_batch_.batch_size, attention_work, [&](Index b, int thread, const Compute& part_compute) {
        const Index key_rows = key_batch_.length, first_key = b * key_rows;
        for_each_expert_rows(pass_.by_expert, b, key_batch_.length_of(b), 0, [&](Index first, Index count, const AttentionLayout& layout) {
          for (Index i = first; i < first + count; ++i) grouped_grad.row(i) = grad_attended.row(order[i]);
          attention_backward<Scalar>(pass_.grouped_queries.middleRows(first, count),
                                     pass_.keys.middleRows(first_key, key_rows), pass_.values.middleRows(first_key, key_rows),
                                     pass_.probabilities.middleRows(first, count), grouped_grad.middleRows(first, count),
                                     layout, grouped_grad_queries.middleRows(first, count),
                                     grad_keys.middleRows(first_key, key_rows), grad_values.middleRows(first_key, key_rows),
                                     &grad_scores_[static_cast<std::size_t>(thread)], part_compute);
          for (Index i = first; i < first + count; ++i) grad_queries.row(order[i]) = grouped_grad_queries.row(i);
        });
      });
    } else {
      parallel_parts(*compute_, query_batch_.batch_size, attention_work, [&](Index b, int thread, const Compute& part_compute) {
        const SequenceRows rows = sequence_rows(routing, query_batch_, key_batch_, causal_, b);
        const Index key_rows = key_batch_.length, first_key = b * key_rows;
        attention_backward<Scalar>(pass_.queries.middleRows(rows.first, rows.count),
                                   pass_.keys.middleRows(first_key, key_rows), pass_.values.middleRows(first_key, key_rows),
                                   pass_.probabilities.middleRows(rows.first, rows.count),
                                   grad_attended.middleRows(rows.first, rows.count), rows.layout,
                                   grad_queries.middleRows(rows.first, rows.count),
                                   grad_keys.middleRows(first_key, key_rows), grad_values.middleRows(first_key, key_rows),
                                   &grad_scores_[static_cast<std::size_t>(thread)], part_compute);
      });
    }
    // Query side: q = x Wq_e^T.
    AttentionGradients<Scalar> grads;
    grads.query = router.backward(grad_gates);  // [N, d_model]
    pass_.projections.backward_in(*compute_, grad_queries, query_, tokens, pass_.plan, q_proj.value, q_proj.grad,
                                  grads.query);
    // The shared key and value heads.
    const Matrix<Scalar>& key_value = self_attention_ ? query_ : key_value_;  // [B*Tk, d_model]
    if (one_input)  // backward_self: the input's gradient is the sum of both sides'
      key_value_backward_into<Scalar>(*compute_, grad_keys, grad_values, key_value, k_proj, v_proj, grads.query);
    else
      grads.key_value = key_value_backward<Scalar>(*compute_, grad_keys, grad_values, key_value, k_proj, v_proj);
    return grads;
  }

 public:
  // The gradient of the one input of forward_self (both sides' summed).
  Matrix<Scalar> backward_self(const Matrix<Scalar>& grad_output) { return backward_impl(grad_output, true).query; }

  // alpha * L_a + beta * L_z of the last forward (0 without routed tokens).
  Scalar aux_loss() const { return router.aux_loss(); }
  RoutingStatistics routing_statistics() const { return router.statistics(); }
  // FLOPs of the last forward: router, projections, and attention over the visible keys (a step's
  // are its cache's last_step_flops()).
  double last_forward_flops() const { return pass_.flops; }

  // Incremental decoding. A self-attention cache holds ONE key row and value row of width d_h per
  // past token per sequence; a cross-attention cache is filled once from the encoder output.
  // With a bf16 compute, a cache carries the expert weights (and a self-attention cache the key
  // and value weights) rounded to bfloat16, which its steps stream instead.
  // When every expert has a bounded span (a sink and a fixed window), the cache is windowed: it
  // keeps the widest sink and window of positions, whatever `capacity` says, so decoding runs in
  // constant memory; a step then takes at most the widest window of tokens.
  KVCache<Scalar> make_self_cache(Index batch_size, Index capacity) const {
    KVCache<Scalar> cache = all_spans_bounded() ? windowed_cache(batch_size)
                                                : KVCache<Scalar>(batch_size, capacity, config_.head_dim);
    cache.set_rounded_weights(round_weights_for_decoding<Scalar>(
        *compute_, {{q_proj.value, config_.head_dim}, {o_proj.value, model_dim()}, {k_proj.value, config_.head_dim},
                    {v_proj.value, config_.head_dim}}));
    return cache;
  }
  KVCache<Scalar> make_cross_cache(const Matrix<Scalar>& memory, const SequenceBatch& memory_batch) const {
    KVCache<Scalar> cache = make_cross_attention_cache<Scalar>(memory, memory_batch, k_proj.value, v_proj.value,
                                                               "MixtureOfAttention::make_cross_cache", *compute_,
                                                               product_precision(*compute_, false));
    cache.set_rounded_weights(
        round_weights_for_decoding<Scalar>(*compute_, {{q_proj.value, config_.head_dim}, {o_proj.value, model_dim()}}));
    return cache;
  }

  // input: [B*n, d_model], n new tokens of each of the cache's B sequences (sequence-major).
  // Routes only these tokens (as in evaluation: no noise, no sampling), appends their keys and
  // values to a self-attention cache (causal among themselves and after the cached ones) or reads
  // a cross-attention cache, and returns output: [B*n, d_model]. It replaces what forward cached
  // for backward.
  Matrix<Scalar> step(const Matrix<Scalar>& input, KVCache<Scalar>& cache) const {
    const char* function = "MixtureOfAttention::step";
    MOA_CHECK(config_.mode == RoutingMode::token_choice, function,
              "expert-choice routing chooses among all the tokens of a sequence: it has no step-by-step decoding");
    const Index steps = check_step_input(input, cache, model_dim(), config_.head_dim, function);
    const Index k = config_.top_k;
    const Index offset = cache.frozen() ? 0 : cache.length();
    const Precision precision = product_precision(*compute_, false);
    if (!cache.frozen())
      cache.append(weight_product<Scalar>(*compute_, input, k_proj.value, cache.rounded_weight(cache.kKeyWeight), precision),
                   weight_product<Scalar>(*compute_, input, v_proj.value, cache.rounded_weight(cache.kValueWeight), precision));
    const Routing routing = router.route(input);
    const DispatchPlan plan = DispatchPlan::build(routing.experts, config_.num_experts, k);
    ExpertProjections<Scalar> projections;  // a step changes nothing in the layer
    Matrix<Scalar> queries;                 // [B*n*k, d_h]
    projections.project_in(*compute_, input, plan, routing.tokens, q_proj.value, config_.head_dim, queries, precision,
                           cache.rounded_weight(cache.kQueryWeight), q_proj.version());
    Matrix<Scalar> attended(input.rows() * k, config_.head_dim);                // [B*n*k, d_h]
    Matrix<Scalar> probabilities(steps * k, cache.capacity());                  // [n*k, capacity]
    double flops = projection_flops(input.rows(), cache.frozen() ? 0 : input.rows(), plan.assignments());
    MOA_CHECK(!cache.frozen() || !config_.has_spans(), function,
              "attention spans are for causal self-attention, not a cross-attention cache");
    if (spans_differ()) {
      const ExpertRows by_expert = rows_by_expert(routing, SequenceBatch::full(cache.batch_size(), steps));
      Matrix<Scalar> grouped_queries(queries.rows(), config_.head_dim), grouped_attended(queries.rows(), config_.head_dim);
      Matrix<Scalar> grouped_probabilities(queries.rows(), cache.capacity());  // [A, capacity]
      for (Index b = 0; b < cache.batch_size(); ++b) {
        for_each_expert_rows(by_expert, b, cache.key_length(b), offset, [&](Index first, Index count, AttentionLayout layout) {
          layout.shift_from = cache.sink_rows();
          layout.key_shift = cache.key_shift();
          for (Index i = first; i < first + count; ++i) grouped_queries.row(i) = queries.row(by_expert.order[i]);
          attention_over_cache<Scalar>(grouped_queries.middleRows(first, count), cache, b, 0, layout,
                                       grouped_probabilities.middleRows(first, count),
                                       grouped_attended.middleRows(first, count), *compute_, precision);
          for (Index i = first; i < first + count; ++i) attended.row(by_expert.order[i]) = grouped_attended.row(i);
          flops += cost::attention(static_cast<double>(layout.visible_pairs()), static_cast<double>(config_.head_dim));
        });
      }
    } else {
      for (Index b = 0; b < cache.batch_size(); ++b) {
        AttentionLayout layout;
        layout.positions = steps;
        layout.rows_per_position = k;
        layout.key_length = cache.key_length(b);
        layout.causal = !cache.frozen();
        layout.position_offset = offset;
        layout.block_positions = config_.causal_block;
        layout.span = shared_span();
        layout.shift_from = cache.sink_rows();
        layout.key_shift = cache.key_shift();
        attention_over_cache<Scalar>(queries.middleRows(b * steps * k, steps * k), cache, b, 0, layout, probabilities,
                                     attended.middleRows(b * steps * k, steps * k), *compute_, precision);
        flops += cost::attention(static_cast<double>(layout.visible_pairs()), static_cast<double>(config_.head_dim));
      }
    }
    cache.set_last_step_flops(flops);
    return projections.project_out(*compute_, attended, routing.gates.data(), routing.tokens, plan, o_proj.value,
                                   input.rows(), precision, cache.rounded_weight(cache.kOutputWeight), o_proj.version());
  }

  void collect_parameters(ParameterList<Scalar>& list, const std::string& prefix = "") {
    router.collect_parameters(list, prefix + "router.");
    list.add(prefix + "q_proj.", q_proj);
    list.add(prefix + "o_proj.", o_proj);
    list.add(prefix + "k_proj.", k_proj);
    list.add(prefix + "v_proj.", v_proj);
  }

  Router<Scalar> router;
  Parameter<Scalar> q_proj;  // [E, d_h, d_model]
  Parameter<Scalar> o_proj;  // [E, d_model, d_h]
  Parameter<Scalar> k_proj;  // [d_h, d_model]
  Parameter<Scalar> v_proj;  // [d_h, d_model]

 private:
  // With spans that differ between experts, the assignments regrouped by (sequence, expert) (see
  // ExpertRows).
  ExpertRows rows_by_expert(const Routing& routing, const SequenceBatch& batch) const {
    const Index experts = config_.num_experts, length = batch.length;
    ExpertRows rows;
    rows.groups.assign(static_cast<std::size_t>(batch.batch_size * experts + 1), 0);
    for (std::size_t a = 0; a < routing.experts.size(); ++a)
      if (routing.experts[a] >= 0) ++rows.groups[static_cast<std::size_t>((routing.tokens[a] / length) * experts + routing.experts[a] + 1)];
    for (std::size_t g = 1; g < rows.groups.size(); ++g) rows.groups[g] += rows.groups[g - 1];
    rows.order.resize(static_cast<std::size_t>(rows.groups.back()));
    rows.positions.resize(rows.order.size());
    std::vector<Index> next(rows.groups.begin(), rows.groups.end() - 1);
    // Token-major assignments: within each group, positions come out ascending.
    for (Index a = 0; a < static_cast<Index>(routing.experts.size()); ++a) {
      const Index expert = routing.experts[static_cast<std::size_t>(a)];
      if (expert < 0) continue;
      const Index token = routing.tokens[static_cast<std::size_t>(a)];
      const std::size_t slot = static_cast<std::size_t>(next[static_cast<std::size_t>((token / length) * experts + expert)]++);
      rows.order[slot] = a;
      rows.positions[slot] = token % length;
    }
    return rows;
  }

  // visit(first, count, layout) for each expert with rows in `sequence`: rows [first, first +
  // count) of the regrouped order, at their positions (+ offset), within the expert's span, against
  // key_length keys.
  template <typename Visit>
  void for_each_expert_rows(const ExpertRows& rows, Index sequence, Index key_length, Index offset, Visit&& visit) const {
    for (Index e = 0; e < config_.num_experts; ++e) {
      const std::size_t group = static_cast<std::size_t>(sequence * config_.num_experts + e);
      const Index first = rows.groups[group], count = rows.groups[group + 1] - first;
      if (count == 0) continue;
      AttentionLayout layout;
      layout.positions = count;
      layout.row_positions = rows.positions.data() + first;
      layout.key_length = key_length;
      layout.causal = true;
      layout.position_offset = offset;
      layout.block_positions = config_.causal_block;
      layout.span = &config_.spans[static_cast<std::size_t>(e)];
      visit(first, count, layout);
    }
  }

  // One span for every expert (null if none or full): a token's k rows see the same keys, so
  // they stay side by side and attend in blocks of positions, as without spans.
  const AttentionSpan* shared_span() const {
    if (!config_.has_spans()) return nullptr;
    const AttentionSpan& first = config_.spans.front();
    for (const AttentionSpan& span : config_.spans)
      if (!(span == first)) return nullptr;
    return &first;
  }
  // Experts of different spans: each expert's rows attend as a group (see ExpertRows).
  bool spans_differ() const { return config_.has_spans() && shared_span() == nullptr; }

  bool all_spans_bounded() const {
    return !config_.spans.empty() &&
           std::all_of(config_.spans.begin(), config_.spans.end(), [](const AttentionSpan& span) { return span.bounded(); });
  }
  KVCache<Scalar> windowed_cache(Index batch_size) const {
    Index sink = 0, window = 0;
    for (const AttentionSpan& span : config_.spans) {
      sink = std::max(sink, span.sink);
      window = std::max(window, span.window_at(0));
    }
    return KVCache<Scalar>::windowed(batch_size, config_.head_dim, sink, window, window);
  }

  // Assignments per query row in the dispatch plan's terms: k slots with token choice; expert
  // choice has no fixed number.
  Index slots_per_row() const { return config_.mode == RoutingMode::token_choice ? config_.top_k : 1; }

  // Sequence b's assignment rows [first, first + count) and what they see. Token choice: k rows
  // per position, padding positions included in the extent; expert choice: the rows it chose,
  // each its own position (never causal).
  struct SequenceRows {
    Index first = 0;
    Index count = 0;
    AttentionLayout layout;
  };
  SequenceRows sequence_rows(const Routing& routing, const SequenceBatch& query_batch, const SequenceBatch& key_batch,
                             bool causal, Index sequence) const {
    SequenceRows rows;
    rows.layout.key_length = key_batch.length_of(sequence);
    rows.layout.causal = causal;
    rows.layout.block_positions = config_.causal_block;
    if (config_.mode == RoutingMode::token_choice) {
      rows.count = query_batch.length * config_.top_k;
      rows.first = sequence * rows.count;
      rows.layout.positions = query_batch.length_of(sequence);
      rows.layout.rows_per_position = config_.top_k;
      rows.layout.span = shared_span();
    } else {
      rows.first = routing.sequence_rows[static_cast<std::size_t>(sequence)];
      rows.count = routing.sequence_rows[static_cast<std::size_t>(sequence + 1)] - rows.first;
      rows.layout.positions = rows.count;
      rows.layout.rows_per_position = 1;
    }
    return rows;
  }

  double projection_flops(Index query_rows, Index key_rows, Index assignments) const {
    return cost::moa_projections(static_cast<double>(model_dim()), static_cast<double>(config_.head_dim),
                                 static_cast<double>(config_.num_experts), static_cast<double>(query_rows),
                                 static_cast<double>(key_rows), static_cast<double>(assignments));
  }

  MixtureOfAttentionConfig config_;
  ComputePtr compute_ = Compute::standard();
  bool causal_ = false;
  bool self_attention_ = false;
  SequenceBatch query_batch_, key_batch_;
  Matrix<Scalar> query_;          // [B*Tq, d_model]
  Matrix<Scalar> key_value_;      // [B*Tk, d_model], empty for self-attention (query_ is both)
  ForwardPass pass_;  // the last forward's, for backward
  detail::Reusable<ForwardPass> inference_;  // infer's buffers, kept for the next call
  Matrix<Scalar> grad_attended_, grad_queries_, grad_keys_, grad_values_;
  Matrix<Scalar> grouped_grad_, grouped_grad_queries_;  // with spans: [A, d_h] in by_expert order
  std::vector<Matrix<Scalar>> grad_scores_;  // one score-gradient workspace per thread
};

static_assert(is_attention_v<MixtureOfAttention<float>> && is_attention_v<MixtureOfAttention<double>>,
              "MixtureOfAttention must provide the attention interface (moa/attention_interface.hpp)");

}  // namespace moa
