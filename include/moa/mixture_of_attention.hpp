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
#include "moa/bfloat16.hpp"
#include "moa/error.hpp"
#include "moa/gemm.hpp"
#include "moa/init.hpp"
#include "moa/kv_cache.hpp"
#include "moa/parameter.hpp"
#include "moa/random.hpp"
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

  void validate(const char* function) const {
    RouterConfig::validate(function);
    MOA_CHECK(head_dim > 0, function, "head_dim must be positive, got ", head_dim);
    MOA_CHECK(causal_block > 0, function, "causal_block must be positive, got ", causal_block);
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
    const Routing routing = router.route(query, query_batch);
    ForwardPass pass;
    return run_forward(query, query_batch, key_value, key_batch, causal, routing, product_precision(*compute_, false),
                       pass);
  }

 private:
  // Buffers reused across experts and calls, so a forward does not allocate per expert; one per
  // width, so none is resized between uses.
  struct ProjectionScratch {
    Matrix<Scalar> wide_rows, wide_result;  // [c, d_model] gathered rows, per-expert results
    Matrix<Scalar> narrow_rows, narrow_result;  // [c, d_h]
    Matrix<Scalar> scaled;                  // [c, d_h] gate * attended
  };

  using Routing = typename Router<Scalar>::Routing;

  // What a forward computes after routing, kept by forward for backward. A assignments: B*Tq*k
  // with token choice (padding rows unused), any number with expert choice.
  struct ForwardPass {
    DispatchPlan plan;
    Matrix<Scalar> keys;           // [B*Tk, d_h]
    Matrix<Scalar> values;         // [B*Tk, d_h]
    Matrix<Scalar> queries;        // [A, d_h]
    Matrix<Scalar> probabilities;  // [A, Tk]
    Matrix<Scalar> attended;       // [A, d_h], before the gates
    std::vector<ProjectionScratch> scratch;  // one per part of the experts (see expert_parts)
    double flops = 0.0;
  };

  Matrix<Scalar> forward_impl(const Matrix<Scalar>& query, const SequenceBatch& query_batch,
                              const Matrix<Scalar>& key_value, const SequenceBatch& key_batch, bool causal, Rng* rng) {
    detail::validate_attention_batches("MixtureOfAttention::forward", model_dim(), query.rows(), query.cols(),
                                       query_batch, key_value.rows(), key_value.cols(), key_batch, causal);
    // forward_self passes one matrix twice; keep one copy of it.
    self_attention_ = &query == &key_value;
    query_ = query;
    if (!self_attention_) key_value_ = key_value;
    query_batch_ = query_batch;
    key_batch_ = key_batch;
    causal_ = causal;
    check_not_causal_expert_choice(causal, "MixtureOfAttention::forward");
    router.forward(query, query_batch, rng);
    return run_forward(query, query_batch, key_value, key_batch, causal, router.routing(),
                       product_precision(*compute_, training()), pass_);
  }

  void check_not_causal_expert_choice(bool causal, const char* function) const {
    MOA_CHECK(!causal || config_.mode == RoutingMode::token_choice, function,
              "expert-choice routing is not defined for causal attention: each expert chooses among all the "
              "tokens of a sequence, so a token's output would depend on later tokens");
  }

  // routing: the assignments of the N = B*Tq query rows.
  Matrix<Scalar> run_forward(const Matrix<Scalar>& query, const SequenceBatch& query_batch,
                             const Matrix<Scalar>& key_value, const SequenceBatch& key_batch, bool causal,
                             const Routing& routing, Precision precision, ForwardPass& pass) const {
    const Index assignments = static_cast<Index>(routing.experts.size());
    pass.plan = DispatchPlan::build(routing.experts, config_.num_experts, slots_per_row());
    pass.keys = linear_product<Scalar>(*compute_, key_value, k_proj.value, precision);    // [B*Tk, d_h]
    pass.values = linear_product<Scalar>(*compute_, key_value, v_proj.value, precision);  // [B*Tk, d_h]
    project_queries(query, pass.plan, routing.tokens, pass.queries, precision, pass.scratch);  // [A, d_h]
    pass.probabilities.resize(assignments, key_batch.length);  // [A, Tk]
    pass.attended.resize(assignments, config_.head_dim);        // [A, d_h], rows of routed tokens written
    pass.flops = projection_flops(query.rows(), key_value.rows(), pass.plan.assignments());
    // Sequences are independent: one per thread.
    const double attention_work = static_cast<double>(assignments) * key_batch.length * config_.head_dim;
    parallel_parts(*compute_, query_batch.batch_size, attention_work, [&](Index b, int) {
      const SequenceRows rows = sequence_rows(routing, query_batch, key_batch, causal, b);
      attention_forward<Scalar>(pass.queries.middleRows(rows.first, rows.count),
                                pass.keys.middleRows(b * key_batch.length, key_batch.length),
                                pass.values.middleRows(b * key_batch.length, key_batch.length), rows.layout,
                                pass.probabilities.middleRows(rows.first, rows.count),
                                pass.attended.middleRows(rows.first, rows.count), *compute_, precision);
    });
    for (Index b = 0; b < query_batch.batch_size; ++b) {
      const AttentionLayout layout = sequence_rows(routing, query_batch, key_batch, causal, b).layout;
      pass.flops += cost::attention(static_cast<double>(layout.visible_pairs()), static_cast<double>(config_.head_dim));
    }
    return project_outputs(pass.attended, routing, pass.plan, query.rows(), precision, pass.scratch);
  }

 public:
  // grad_output: [B*Tq, d_model]. Accumulates every parameter gradient (the aux loss's included)
  // and returns the gradients of both inputs.
  AttentionGradients<Scalar> backward(const Matrix<Scalar>& grad_output) {
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
    grad_attended.setZero(pass_.attended.rows(), head_dim);
    // Output side: y_t += gate * a Wo_e^T. Within an expert every row is another token, so row
    // slices run on separate threads without conflicts.
    // Experts write disjoint rows and weight slices here: parts of them run on separate threads.
    const Index parts = expert_parts(pass_.plan);
    pass_.scratch.resize(static_cast<std::size_t>(parts));
    for_each_expert_in_parts(pass_.plan, parts, [&](Index e, const Index* ids, Index count, Index part) {
      ProjectionScratch& scratch = pass_.scratch[static_cast<std::size_t>(part)];
      const auto weight = o_proj.value.middleRows(e * model, model);  // [d_model, d_h]
      const bool everyone = count == query_.rows();  // every token chose e: rows already in token order
      auto gathered = rows_of(scratch.wide_rows, everyone ? 0 : count, model);  // [c, d_model]
      const ConstMatrixRef<Scalar> grad_rows = everyone ? ConstMatrixRef<Scalar>(grad_output) : gathered;
      auto scaled = rows_of(scratch.scaled, count, head_dim);                 // [c, d_h] gate * a
      auto grad_unscaled = rows_of(scratch.narrow_result, count, head_dim);   // [c, d_h] d(gate * a)
      parallel_ranges(*compute_, count, kRowGrain, [&](Index first, Index rows, int) {
        for (Index i = first; i < first + rows; ++i) {
          if (!everyone) gathered.row(i) = grad_output.row(tokens[ids[i]]);
          scaled.row(i) = gates.data()[ids[i]] * pass_.attended.row(ids[i]);
        }
        gemm<Scalar>(*compute_, grad_rows.middleRows(first, rows), Transpose::no, weight, Transpose::no,
                     grad_unscaled.middleRows(first, rows));
        for (Index i = first; i < first + rows; ++i) {
          grad_gates.data()[ids[i]] = grad_unscaled.row(i).dot(pass_.attended.row(ids[i]));
          grad_attended.row(ids[i]) = gates.data()[ids[i]] * grad_unscaled.row(i);
        }
      });
      gemm<Scalar>(*compute_, grad_rows, Transpose::yes, scaled, Transpose::no, o_proj.grad.middleRows(e * model, model),
                   true);
    });
    // Attention, per sequence, against the shared K and V.
    Matrix<Scalar>& grad_queries = grad_queries_;  // [A, d_h]
    Matrix<Scalar>& grad_keys = grad_keys_;        // [B*Tk, d_h]
    Matrix<Scalar>& grad_values = grad_values_;    // [B*Tk, d_h]
    grad_queries.setZero(pass_.queries.rows(), head_dim);
    grad_keys.setZero(pass_.keys.rows(), head_dim);
    grad_values.setZero(pass_.values.rows(), head_dim);
    grad_scores_.resize(static_cast<std::size_t>(compute_->threads()));
    const double attention_work = static_cast<double>(pass_.queries.rows()) * key_batch_.length * head_dim;
    parallel_parts(*compute_, query_batch_.batch_size, attention_work, [&](Index b, int thread) {
      const SequenceRows rows = sequence_rows(routing, query_batch_, key_batch_, causal_, b);
      const Index key_rows = key_batch_.length, first_key = b * key_rows;
      attention_backward<Scalar>(pass_.queries.middleRows(rows.first, rows.count), pass_.keys.middleRows(first_key, key_rows),
                                 pass_.values.middleRows(first_key, key_rows),
                                 pass_.probabilities.middleRows(rows.first, rows.count),
                                 grad_attended.middleRows(rows.first, rows.count), rows.layout,
                                 grad_queries.middleRows(rows.first, rows.count),
                                 grad_keys.middleRows(first_key, key_rows), grad_values.middleRows(first_key, key_rows),
                                 &grad_scores_[static_cast<std::size_t>(thread)], *compute_);
    });
    // Query side: q = x Wq_e^T.
    AttentionGradients<Scalar> grads;
    grads.query = router.backward(grad_gates);  // [N, d_model]
    // Experts of one part add into the token rows of the part's own sum, added up in part order.
    PartSums part_sums(grads.query, parts);
    for_each_expert_in_parts(pass_.plan, parts, [&](Index e, const Index* ids, Index count, Index part) {
      ProjectionScratch& scratch = pass_.scratch[static_cast<std::size_t>(part)];
      Matrix<Scalar>& grad_query = part_sums.of(part);  // [N, d_model]
      const auto weight = q_proj.value.middleRows(e * head_dim, head_dim);  // [d_h, d_model]
      const bool everyone = count == query_.rows();  // every token chose e: inputs already in token order
      auto grad_rows = rows_of(scratch.narrow_rows, count, head_dim);              // [c, d_h]
      auto gathered = rows_of(scratch.wide_rows, everyone ? 0 : count, model);     // [c, d_model]
      const ConstMatrixRef<Scalar> inputs = everyone ? ConstMatrixRef<Scalar>(query_) : gathered;
      auto grad_inputs = rows_of(scratch.wide_result, count, model);               // [c, d_model]
      parallel_ranges(*compute_, count, kRowGrain, [&](Index first, Index rows, int) {
        for (Index i = first; i < first + rows; ++i) {
          grad_rows.row(i) = grad_queries.row(ids[i]);
          if (!everyone) gathered.row(i) = query_.row(tokens[ids[i]]);
        }
        gemm<Scalar>(*compute_, grad_rows.middleRows(first, rows), Transpose::no, weight, Transpose::no,
                     grad_inputs.middleRows(first, rows));
        for (Index i = first; i < first + rows; ++i) grad_query.row(tokens[ids[i]]) += grad_inputs.row(i);
      });
      gemm<Scalar>(*compute_, grad_rows, Transpose::yes, inputs, Transpose::no,
                   q_proj.grad.middleRows(e * head_dim, head_dim), true);
    });
    part_sums.add_up(*compute_);
    // The shared key and value heads.
    const Matrix<Scalar>& key_value = self_attention_ ? query_ : key_value_;
    gemm<Scalar>(*compute_, grad_keys, Transpose::yes, key_value, Transpose::no, k_proj.grad, true);
    gemm<Scalar>(*compute_, grad_values, Transpose::yes, key_value, Transpose::no, v_proj.grad, true);
    grads.key_value.resize(key_value.rows(), model);  // [B*Tk, d_model]
    gemm<Scalar>(*compute_, grad_keys, Transpose::no, k_proj.value, Transpose::no, grads.key_value);
    gemm<Scalar>(*compute_, grad_values, Transpose::no, v_proj.value, Transpose::no, grads.key_value, true);
    return grads;
  }

  Matrix<Scalar> backward_self(const Matrix<Scalar>& grad_output) {
    AttentionGradients<Scalar> grads = backward(grad_output);
    grads.query += grads.key_value;
    return std::move(grads.query);
  }

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
  KVCache<Scalar> make_self_cache(Index batch_size, Index capacity) const {
    KVCache<Scalar> cache(batch_size, capacity, config_.head_dim);
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
    std::vector<ProjectionScratch> scratch;  // a step changes nothing in the layer
    Matrix<Scalar> queries;     // [B*n*k, d_h]
    project_queries(input, plan, routing.tokens, queries, precision, scratch, cache.rounded_weight(cache.kQueryWeight));
    Matrix<Scalar> attended(input.rows() * k, config_.head_dim);                // [B*n*k, d_h]
    Matrix<Scalar> probabilities(steps * k, cache.capacity());                  // [n*k, capacity]
    double flops = projection_flops(input.rows(), cache.frozen() ? 0 : input.rows(), plan.assignments());
    for (Index b = 0; b < cache.batch_size(); ++b) {
      AttentionLayout layout;
      layout.positions = steps;
      layout.rows_per_position = k;
      layout.key_length = cache.key_length(b);
      layout.causal = !cache.frozen();
      layout.position_offset = offset;
      layout.block_positions = config_.causal_block;
      attention_forward<Scalar>(queries.middleRows(b * steps * k, steps * k), cache.keys(b), cache.values(b), layout,
                                probabilities, attended.middleRows(b * steps * k, steps * k), *compute_, precision);
      flops += cost::attention(static_cast<double>(layout.visible_pairs()), static_cast<double>(config_.head_dim));
    }
    cache.set_last_step_flops(flops);
    return project_outputs(attended, routing, plan, input.rows(), precision, scratch,
                           cache.rounded_weight(cache.kOutputWeight));
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
  // Rows of one expert handed to a thread at a time.
  static constexpr Index kRowGrain = 32;

  // How many parts the experts are cut into, each run on a thread of its own: one per thread when
  // there are at least two busy experts per thread and work enough to repay waking them;
  // otherwise one part, whose experts split their rows across the threads instead. A part holds
  // consecutive experts of about equal assignments (DispatchPlan::expert_runs), so the split, and
  // with it every result, depends on the plan and the thread count alone.
  Index expert_parts(const DispatchPlan& plan) const {
    const int threads = compute_->threads();
    if (threads == 1) return 1;
    Index busy = 0;
    for (Index e = 0; e < plan.num_experts; ++e) busy += plan.count(e) > 0 ? 1 : 0;
    const double work = static_cast<double>(plan.assignments()) * static_cast<double>(model_dim() * config_.head_dim);
    return busy >= 2 * threads && work >= detail::kParallelGemmFlops ? threads : 1;
  }

  // visit(expert, ids, count, part) for every expert with assignments, the parts on the compute's
  // threads, each part's experts in order.
  template <typename Visit>
  void for_each_expert_in_parts(const DispatchPlan& plan, Index parts, Visit&& visit) const {
    if (parts == 1) {
      plan.for_each_expert([&](Index e, const Index* ids, Index count) { visit(e, ids, count, Index(0)); });
      return;
    }
    const std::vector<Index> runs = plan.expert_runs(parts);
    compute_->pool().run(parts, [&](Index part, int) {
      for (Index e = runs[static_cast<std::size_t>(part)]; e < runs[static_cast<std::size_t>(part + 1)]; ++e)
        if (plan.count(e) > 0) visit(e, plan.order.data() + plan.offsets[e], plan.count(e), part);
    });
  }

  // Sums into token rows from parts of the experts: part 0 adds into `total` itself, every other
  // part into a zeroed matrix of its own, and add_up adds those in part order.
  class PartSums {
   public:
    PartSums(Matrix<Scalar>& total, Index parts) : total_(total) {
      for (Index part = 1; part < parts; ++part) others_.push_back(Matrix<Scalar>::Zero(total.rows(), total.cols()));
    }
    Matrix<Scalar>& of(Index part) { return part == 0 ? total_ : others_[static_cast<std::size_t>(part - 1)]; }
    void add_up(const Compute& compute) {
      if (others_.empty()) return;
      parallel_ranges(compute, total_.rows(), kRowGrain, [&](Index first, Index rows, int) {
        for (const Matrix<Scalar>& other : others_) total_.middleRows(first, rows) += other.middleRows(first, rows);
      });
    }

   private:
    Matrix<Scalar>& total_;
    std::vector<Matrix<Scalar>> others_;
  };

  // The first `rows` rows of a scratch buffer, grown (never shrunk) to fit.
  static auto rows_of(Matrix<Scalar>& buffer, Index rows, Index cols) {
    if (buffer.rows() < rows || buffer.cols() != cols) buffer.resize(std::max(rows, buffer.rows()), cols);
    return buffer.topRows(rows);
  }

  // queries: [A, d_h]; row a = x_t Wq_e^T for assignment a's token t = tokens[a] and expert e.
  // rounded: the query weights rounded to bfloat16 (a decoding's), or null.
  void project_queries(const Matrix<Scalar>& input, const DispatchPlan& plan, const std::vector<Index>& tokens,
                       Matrix<Scalar>& queries, Precision precision, std::vector<ProjectionScratch>& scratches,
                       const BFloat16Weight* rounded = nullptr) const {
    const Index head_dim = config_.head_dim;
    queries.resize(static_cast<Index>(tokens.size()), head_dim);  // rows of unrouted tokens are never read
    // Experts write disjoint rows: parts of them run on separate threads.
    const Index parts = expert_parts(plan);
    scratches.resize(static_cast<std::size_t>(parts));
    for_each_expert_in_parts(plan, parts, [&](Index e, const Index* ids, Index count, Index part) {
      ProjectionScratch& scratch = scratches[static_cast<std::size_t>(part)];
      const auto weight = q_proj.value.middleRows(e * head_dim, head_dim);  // [d_h, d_model]
      auto inputs = rows_of(scratch.wide_rows, count, input.cols());        // [c, d_model]
      auto projected = rows_of(scratch.narrow_result, count, head_dim);     // [c, d_h]
      parallel_ranges(*compute_, count, kRowGrain, [&](Index first, Index rows, int) {
        if (count == input.rows()) {  // every token chose e (so in token order): no gather
          weight_product<Scalar>(*compute_, input.middleRows(first, rows), weight, rounded, e,
                                 projected.middleRows(first, rows), false, precision);
        } else {
          for (Index i = first; i < first + rows; ++i) inputs.row(i) = input.row(tokens[ids[i]]);
          weight_product<Scalar>(*compute_, inputs.middleRows(first, rows), weight, rounded, e,
                                 projected.middleRows(first, rows), false, precision);
        }
        for (Index i = first; i < first + rows; ++i) queries.row(ids[i]) = projected.row(i);
      });
    });
  }

  // output: [N, d_model]; row t = sum over t's assignments a of gate_a attended_a Wo_e^T.
  Matrix<Scalar> project_outputs(const Matrix<Scalar>& attended, const Routing& routing, const DispatchPlan& plan,
                                 Index rows, Precision precision, std::vector<ProjectionScratch>& scratches,
                                 const BFloat16Weight* rounded = nullptr) const {
    const Index model = model_dim(), head_dim = config_.head_dim;
    const Matrix<Scalar>& gates = routing.gates;
    const std::vector<Index>& tokens = routing.tokens;
    Matrix<Scalar> output = Matrix<Scalar>::Zero(rows, model);  // [N, d_model]
    // Experts of one part add into the token rows of the part's own sum, added up in part order.
    const Index parts = expert_parts(plan);
    scratches.resize(static_cast<std::size_t>(parts));
    PartSums part_sums(output, parts);
    for_each_expert_in_parts(plan, parts, [&](Index e, const Index* ids, Index count, Index part) {
      ProjectionScratch& scratch = scratches[static_cast<std::size_t>(part)];
      Matrix<Scalar>& target = part_sums.of(part);  // [N, d_model]
      const auto weight = o_proj.value.middleRows(e * model, model);  // [d_model, d_h]
      auto scaled = rows_of(scratch.scaled, count, head_dim);         // [c, d_h] gate * a
      auto projected = rows_of(scratch.wide_result, count, model);    // [c, d_model]
      parallel_ranges(*compute_, count, kRowGrain, [&](Index first, Index slice, int) {
        for (Index i = first; i < first + slice; ++i) scaled.row(i) = gates.data()[ids[i]] * attended.row(ids[i]);
        if (count == rows) {  // every token chose e: accumulate in place
          weight_product<Scalar>(*compute_, scaled.middleRows(first, slice), weight, rounded, e,
                                 target.middleRows(first, slice), true, precision);
          return;
        }
        weight_product<Scalar>(*compute_, scaled.middleRows(first, slice), weight, rounded, e,
                               projected.middleRows(first, slice), false, precision);
        for (Index i = first; i < first + slice; ++i) target.row(tokens[ids[i]]) += projected.row(i);
      });
    });
    part_sums.add_up(*compute_);
    return output;
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
  Matrix<Scalar> grad_attended_, grad_queries_, grad_keys_, grad_values_;
  std::vector<Matrix<Scalar>> grad_scores_;  // one score-gradient workspace per thread
};

static_assert(is_attention_v<MixtureOfAttention<float>> && is_attention_v<MixtureOfAttention<double>>,
              "MixtureOfAttention must provide the attention interface (moa/attention_interface.hpp)");

}  // namespace moa
