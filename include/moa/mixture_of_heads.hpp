// moa/mixture_of_heads.hpp - Mixture-of-Head attention (MoH, Jin et al. 2024).
//
// H = h_s + h_r ordinary heads, each with its own query, key, value and output projection of width
// d_h. The first h_s are shared (every token uses them), the other h_r are routed (each token
// takes its top k_r). With x_t the query row and A_{i,t} head i's attention output for token t:
//     s_t = softmax(x_t Ws^T)   [h_s]   (1 when h_s = 1)
//     r_t = softmax(x_t Wr^T)   [h_r],  G(t) = top-k_r(r_t),  r~_{j,t} = r_{j,t} / sum_{m in G(t)} r_{m,t}
//     w_t = softmax(x_t W0^T)   [2]     (only when h_s > 0)
//     gate_{i,t} = 2 w_{0,t} h_s s_{i,t}                 shared head i
//                = 2 w_{1,t} k_r r~_{j,t}  (k_r r~ when h_s = 0)   routed head j in G(t)
//     y_t = sum over t's heads i of gate_{i,t} A_{i,t} Wo_i^T
//     aux = load_balance_coefficient * h_r * sum_j f_j P_j   (f_j: share of tokens choosing j, P_j:
//           mean r_j; the published code's loss) + z_loss_coefficient * mean (logsumexp)^2
// As in the published code: gates of 1 at initialisation (all three routers start at zero), the
// factors h_s, k_r and 2 keeping the two groups on the scale of plain attention.
//
// Computed sparsely, unlike the published code (which runs all H heads and multiplies the unchosen
// by zero): the assignments (token, head) are grouped by sequence and head; the query and output
// projections run per head over its assignments only (moa/expert_projections.hpp, as MoA's
// experts), and attention per (sequence, head) over the rows that chose the head, each row at its
// own position (causal: block by block). Keys and values are computed for every head at every
// position: a routed head is needed at every key position of a sequence as soon as one token of
// it chooses the head, which with top-k_r of h_r heads is nearly always, so skipping per sequence
// would save next to nothing; and decoding needs them for every cached position anyway (a later
// token may choose a head no earlier one did). So the cache holds H key and value heads per
// position, as multi-head attention's does.
//
// Parameters (PyTorch names and [out, in] shapes):
//     router.weight [h_r, d_model], shared_router.weight [h_s, d_model] (h_s > 1),
//     group_router.weight [2, d_model] (h_s > 0), q_proj.weight, k_proj.weight, v_proj.weight
//     [H, d_h, d_model], o_proj.weight [H, d_model, d_h]
#pragma once

#include "moa/attention_cost.hpp"
#include "moa/attention_interface.hpp"
#include "moa/attention_kernel.hpp"
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
#include "moa/softmax.hpp"
#include "moa/tensor.hpp"
#include "moa/top_k.hpp"

#include <cmath>
#include <string>
#include <vector>

namespace moa {

struct MixtureOfHeadsConfig {
  Index model_dim = 0;
  Index shared_heads = 0;  // h_s, used by every token (may be 0)
  Index routed_heads = 0;  // h_r, of which each token takes top_k
  Index top_k = 0;         // k_r
  Index head_dim = 0;
  double load_balance_coefficient = 0.01;  // on h_r * sum_j f_j P_j, f_j the share of tokens choosing head j
  double z_loss_coefficient = 0.0;
  Index causal_block = 32;  // query rows per block of causal attention

  Index num_heads() const { return shared_heads + routed_heads; }

  void validate(const char* function) const {
    MOA_CHECK(model_dim > 0, function, "model_dim must be positive, got ", model_dim);
    MOA_CHECK(shared_heads >= 0, function, "shared_heads must be non-negative, got ", shared_heads);
    MOA_CHECK(routed_heads > 0, function, "routed_heads must be positive, got ", routed_heads);
    MOA_CHECK(top_k > 0 && top_k <= routed_heads, function, "top_k must be in [1, routed_heads = ", routed_heads,
              "], got ", top_k);
    MOA_CHECK(head_dim > 0, function, "head_dim must be positive, got ", head_dim);
    MOA_CHECK(causal_block > 0, function, "causal_block must be positive, got ", causal_block);
    MOA_CHECK(load_balance_coefficient >= 0.0 && z_loss_coefficient >= 0.0, function,
              "aux coefficients must be non-negative, got ", load_balance_coefficient, " and ", z_loss_coefficient);
  }

  // The routed heads' router. Its load-balance loss takes f_j as the share of assignments (summing
  // to 1), MoH's as the share of tokens (summing to k_r): the coefficient carries the factor.
  RouterConfig router_config() const {
    RouterConfig config;
    config.model_dim = model_dim;
    config.num_experts = routed_heads;
    config.top_k = top_k;
    config.load_balance_coefficient = load_balance_coefficient * static_cast<double>(top_k);
    config.z_loss_coefficient = z_loss_coefficient;
    return config;
  }
};

template <typename S>
class MixtureOfHeads {
 public:
  using Scalar = S;

  MixtureOfHeads(const MixtureOfHeadsConfig& config, Rng& rng)
      : router((config.validate("MixtureOfHeads"), config.router_config()), rng),
        q_proj("weight", {config.num_heads(), config.head_dim, config.model_dim}),
        k_proj("weight", {config.num_heads(), config.head_dim, config.model_dim}),
        v_proj("weight", {config.num_heads(), config.head_dim, config.model_dim}),
        o_proj("weight", {config.num_heads(), config.model_dim, config.head_dim}),
        config_(config) {
    // Zero routers: every gate is 1 at the start.
    if (config.shared_heads > 1) shared_router = Parameter<Scalar>("weight", {config.shared_heads, config.model_dim});
    if (config.shared_heads > 0) group_router = Parameter<Scalar>("weight", {2, config.model_dim});
    const double input_gain = 1.0 / std::sqrt(2.0);
    init_xavier_uniform(q_proj, rng, input_gain);
    init_xavier_uniform(k_proj, rng, input_gain);
    init_xavier_uniform(v_proj, rng, input_gain);
    init_xavier_uniform(o_proj, rng);
  }

  const MixtureOfHeadsConfig& config() const { return config_; }
  Index model_dim() const { return config_.model_dim; }
  Index num_heads() const { return config_.num_heads(); }
  Index width() const { return num_heads() * config_.head_dim; }  // of the keys and values
  bool training() const { return router.training(); }
  void set_training(bool training) { router.set_training(training); }
  void set_compute(ComputePtr compute) {
    compute_ = detail::checked_compute(std::move(compute), "MixtureOfHeads::set_compute");
    router.set_compute(compute_);
  }
  const Compute& compute() const { return *compute_; }

  // query: [B*Tq, d_model], key_value: [B*Tk, d_model] -> output: [B*Tq, d_model]. Padding query
  // rows get zeros and use no head; padding keys are never attended to. Nothing random: no Rng.
  Matrix<Scalar> forward(const Matrix<Scalar>& query, const SequenceBatch& query_batch,
                         const Matrix<Scalar>& key_value, const SequenceBatch& key_batch, bool causal) {
    detail::validate_attention_batches("MixtureOfHeads::forward", model_dim(), query.rows(), query.cols(), query_batch,
                                       key_value.rows(), key_value.cols(), key_batch, causal);
    self_attention_ = &query == &key_value;  // forward_self passes one matrix twice: keep one copy
    detail::parallel_assign(*compute_, query_, query);
    if (!self_attention_) detail::parallel_assign(*compute_, key_value_, key_value);
    query_batch_ = query_batch;
    key_batch_ = key_batch;
    causal_ = causal;
    router.forward(query, query_batch, nullptr);
    gating_.routing = router.routing();
    group_gates(query, gating_);
    return run_forward(query, query_batch, key_value, key_batch, causal, gating_,
                       product_precision(*compute_, training()), pass_);
  }
  Matrix<Scalar> forward_self(const Matrix<Scalar>& input, const SequenceBatch& batch, bool causal) {
    return forward(input, batch, input, batch, causal);
  }

  // The forward of evaluation without its state, so a const layer serves.
  Matrix<Scalar> infer(const Matrix<Scalar>& query, const SequenceBatch& query_batch, const Matrix<Scalar>& key_value,
                       const SequenceBatch& key_batch, bool causal) const {
    detail::validate_attention_batches("MixtureOfHeads::infer", model_dim(), query.rows(), query.cols(), query_batch,
                                       key_value.rows(), key_value.cols(), key_batch, causal);
    Gating gating;
    gating.routing = router.route(query, query_batch);
    group_gates(query, gating);
    const auto pass = inference_.lease();
    pass->for_backward = false;
    return run_forward(query, query_batch, key_value, key_batch, causal, gating, product_precision(*compute_, false),
                       *pass);
  }

  // grad_output: [B*Tq, d_model]. Accumulates every parameter gradient (the aux loss's included)
  // and returns the gradients of both inputs.
  AttentionGradients<Scalar> backward(const Matrix<Scalar>& grad_output) { return backward_impl(grad_output, false); }

 private:
  // one_input: the key and value side's input gradient is added into the query side's (forward_self).
  AttentionGradients<Scalar> backward_impl(const Matrix<Scalar>& grad_output, bool one_input) {
    const Index head_dim = config_.head_dim, heads = num_heads(), model = model_dim();
    MOA_CHECK(grad_output.rows() == query_.rows() && grad_output.cols() == model, "MixtureOfHeads::backward",
              "grad_output has shape ", detail::shape_of(grad_output), ", expected ", detail::shape_of(query_),
              " (as the last forward)");
    const Assignments& assigned = pass_.assigned;
    // Output side: y_t += gate * a Wo_i^T.
    std::vector<Scalar> grad_gates(assigned.gates.size(), Scalar(0));  // [A]
    Matrix<Scalar> grad_attended = Matrix<Scalar>::Zero(pass_.attended.rows(), head_dim);  // [A, d_h]
    pass_.projections.backward_out(*compute_, grad_output, pass_.attended, assigned.gates.data(), assigned.tokens,
                                   pass_.plan, o_proj.value, o_proj.grad, grad_gates.data(), grad_attended);
    // Attention, per (sequence, head).
    Matrix<Scalar> grad_queries = Matrix<Scalar>::Zero(pass_.queries.rows(), head_dim);  // [A, d_h]
    Matrix<Scalar> grad_keys = Matrix<Scalar>::Zero(pass_.keys.rows(), width());         // [B*Tk, H*d_h]
    Matrix<Scalar> grad_values = Matrix<Scalar>::Zero(pass_.values.rows(), width());     // [B*Tk, H*d_h]
    grad_scores_.resize(static_cast<std::size_t>(compute_->threads()));
    const Index key_length = key_batch_.length;
    const double attention_work = static_cast<double>(assigned.tokens.size()) * key_length * head_dim;
    parallel_parts(*compute_, query_batch_.batch_size * heads, attention_work, [&](Index pair, int thread, const Compute& part_compute) {
      const Index b = pair / heads, h = pair % heads;
      const Index first = assigned.group_rows[pair], count = assigned.group_rows[pair + 1] - first;
      if (count == 0) return;
      attention_backward<Scalar>(pass_.queries.middleRows(first, count),
                                 pass_.keys.block(b * key_length, h * head_dim, key_length, head_dim),
                                 pass_.values.block(b * key_length, h * head_dim, key_length, head_dim),
                                 pass_.probabilities.middleRows(first, count), grad_attended.middleRows(first, count),
                                 group_layout(assigned, key_batch_, causal_, b, h),
                                 grad_queries.middleRows(first, count),
                                 grad_keys.block(b * key_length, h * head_dim, key_length, head_dim),
                                 grad_values.block(b * key_length, h * head_dim, key_length, head_dim),
                                 &grad_scores_[static_cast<std::size_t>(thread)], part_compute);
    });
    // Query side: q = x Wq_i^T, and the gates' three routers.
    AttentionGradients<Scalar> grads;
    grads.query = Matrix<Scalar>::Zero(query_.rows(), model);  // [B*Tq, d_model]
    pass_.projections.backward_in(*compute_, grad_queries, query_, assigned.tokens, pass_.plan, q_proj.value,
                                  q_proj.grad, grads.query);
    backward_gates(grad_gates, grads.query);
    // Every head's keys and values.
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

  // The routed heads' load-balance (and z) loss of the last forward.
  Scalar aux_loss() const { return router.aux_loss(); }
  RoutingStatistics routing_statistics() const { return router.statistics(); }
  double last_forward_flops() const { return pass_.flops; }

  // A self-attention cache holds every head's key and value (width H*d_h) per past token: a routed
  // head a later token chooses must see every earlier position. A cross-attention cache is filled
  // once from the encoder output. With a bf16 compute, a cache carries the weights rounded.
  KVCache<Scalar> make_self_cache(Index batch_size, Index capacity) const {
    KVCache<Scalar> cache(batch_size, capacity, width());
    cache.set_rounded_weights(round_weights_for_decoding<Scalar>(
        *compute_, {{q_proj.value, config_.head_dim}, {o_proj.value, model_dim()}, {k_proj.value, width()},
                    {v_proj.value, width()}}));
    return cache;
  }
  KVCache<Scalar> make_cross_cache(const Matrix<Scalar>& memory, const SequenceBatch& memory_batch) const {
    KVCache<Scalar> cache = make_cross_attention_cache<Scalar>(memory, memory_batch, k_proj.value, v_proj.value,
                                                               "MixtureOfHeads::make_cross_cache", *compute_,
                                                               product_precision(*compute_, false));
    cache.set_rounded_weights(
        round_weights_for_decoding<Scalar>(*compute_, {{q_proj.value, config_.head_dim}, {o_proj.value, model_dim()}}));
    return cache;
  }

  // input: [B*n, d_model], n new tokens of each of the cache's B sequences (sequence-major).
  // Routes them as in evaluation, appends every head's keys and values to a self-attention cache
  // (causal among themselves and after the cached ones) or reads a cross-attention cache.
  Matrix<Scalar> step(const Matrix<Scalar>& input, KVCache<Scalar>& cache) const {
    const char* function = "MixtureOfHeads::step";
    const Index steps = check_step_input(input, cache, model_dim(), width(), function);
    const Index heads = num_heads(), head_dim = config_.head_dim;
    const Index offset = cache.frozen() ? 0 : cache.length();
    const Precision precision = product_precision(*compute_, false);
    if (!cache.frozen())
      cache.append(weight_product<Scalar>(*compute_, input, k_proj.value, cache.rounded_weight(cache.kKeyWeight), precision),
                   weight_product<Scalar>(*compute_, input, v_proj.value, cache.rounded_weight(cache.kValueWeight), precision));
    const SequenceBatch batch = SequenceBatch::full(cache.batch_size(), steps);
    Gating gating;
    gating.routing = router.route(input);
    group_gates(input, gating);
    const Assignments assigned = assign(gating, batch);
    const DispatchPlan plan = DispatchPlan::build(assigned.heads, heads, 1);
    ExpertProjections<Scalar> projections;  // a step changes nothing in the layer
    Matrix<Scalar> queries;                 // [A, d_h]
    projections.project_in(*compute_, input, plan, assigned.tokens, q_proj.value, head_dim, queries, precision,
                           cache.rounded_weight(cache.kQueryWeight), q_proj.version());
    const Index rows = static_cast<Index>(assigned.tokens.size());
    Matrix<Scalar> attended(rows, head_dim);                // [A, d_h]
    Matrix<Scalar> probabilities(rows, cache.capacity());  // [A, capacity]
    double flops = projection_flops(input.rows(), cache.frozen() ? 0 : input.rows(), rows);
    for (Index pair = 0; pair < cache.batch_size() * heads; ++pair) {
      const Index b = pair / heads, h = pair % heads;
      const Index first = assigned.group_rows[pair], count = assigned.group_rows[pair + 1] - first;
      if (count == 0) continue;
      AttentionLayout layout;
      layout.positions = count;
      layout.row_positions = assigned.positions.data() + first;
      layout.key_length = cache.key_length(b);
      layout.causal = !cache.frozen();
      layout.position_offset = offset;
      layout.block_positions = config_.causal_block;
      attention_over_cache<Scalar>(queries.middleRows(first, count), cache, b, h * head_dim, layout,
                                   probabilities.middleRows(first, count), attended.middleRows(first, count), *compute_,
                                   precision);
      flops += cost::attention(static_cast<double>(layout.visible_pairs()), static_cast<double>(head_dim));
    }
    cache.set_last_step_flops(flops);
    return projections.project_out(*compute_, attended, assigned.gates.data(), assigned.tokens, plan, o_proj.value,
                                   input.rows(), precision, cache.rounded_weight(cache.kOutputWeight), o_proj.version());
  }

  void collect_parameters(ParameterList<Scalar>& list, const std::string& prefix = "") {
    router.collect_parameters(list, prefix + "router.");
    if (config_.shared_heads > 1) list.add(prefix + "shared_router.", shared_router);
    if (config_.shared_heads > 0) list.add(prefix + "group_router.", group_router);
    list.add(prefix + "q_proj.", q_proj);
    list.add(prefix + "k_proj.", k_proj);
    list.add(prefix + "v_proj.", v_proj);
    list.add(prefix + "o_proj.", o_proj);
  }

  Router<Scalar> router;           // over the routed heads
  Parameter<Scalar> shared_router;  // [h_s, d_model], only with h_s > 1
  Parameter<Scalar> group_router;   // [2, d_model], only with h_s > 0
  Parameter<Scalar> q_proj;         // [H, d_h, d_model]
  Parameter<Scalar> k_proj;         // [H, d_h, d_model]
  Parameter<Scalar> v_proj;         // [H, d_h, d_model]
  Parameter<Scalar> o_proj;         // [H, d_model, d_h]

 private:
  using Routing = typename Router<Scalar>::Routing;

  // What sets the gates of N query rows.
  struct Gating {
    Routing routing;       // routed heads: experts [N*k_r] (-1 for padding), gates [N, k_r] renormalised
    Matrix<Scalar> shared;  // [N, h_s] softmax(x Ws^T), only with h_s > 1
    Matrix<Scalar> group;   // [N, 2] softmax(x W0^T), only with h_s > 0
  };

  // The A (token, head) pairs of a pass, grouped by sequence, then head, then position.
  struct Assignments {
    std::vector<Index> heads;       // [A] 0 .. h_s - 1 shared, h_s + j routed head j
    std::vector<Index> tokens;      // [A] query row
    std::vector<Index> positions;   // [A] position of the token in its sequence
    std::vector<Index> slots;       // [A] which gate: < h_s a shared head, else h_s + the routing slot
    std::vector<Scalar> gates;      // [A]
    std::vector<Index> group_rows;  // [B*H + 1]: (sequence b, head h)'s assignments start at [b*H + h]
  };

  // What a forward computes after gating, kept by forward for backward.
  struct ForwardPass {
    Assignments assigned;
    DispatchPlan plan;
    Matrix<Scalar> keys;           // [B*Tk, H*d_h]
    Matrix<Scalar> values;         // [B*Tk, H*d_h]
    Matrix<Scalar> queries;        // [A, d_h]
    bool for_backward = true;      // false: inference, which keeps no probabilities
    Matrix<Scalar> probabilities;  // [A, Tk] for backward
    Matrix<Scalar> attended;       // [A, d_h], before the gates
    ExpertProjections<Scalar> projections;
    BFloat16Matrix rounded_query;      // bf16 products: [B*Tq, d_model] rounded once for all of them
    BFloat16Matrix rounded_key_value;  // bf16 cross-attention: [B*Tk, d_model]
    double flops = 0.0;
  };

  // Fills gating.shared and gating.group for the rows of input.
  void group_gates(const Matrix<Scalar>& input, Gating& gating) const {
    if (config_.shared_heads > 1) gating.shared = softmax_rows(linear_product<Scalar>(*compute_, input, shared_router.value));
    if (config_.shared_heads > 0) gating.group = softmax_rows(linear_product<Scalar>(*compute_, input, group_router.value));
  }

  // Scale of shared head i's gate for token t, and of routed slot j's over its renormalised
  // router probability.
  Scalar shared_gate(const Gating& gating, Index token, Index head) const {
    const Scalar share = config_.shared_heads > 1 ? gating.shared(token, head) : Scalar(1);
    return Scalar(2) * gating.group(token, 0) * static_cast<Scalar>(config_.shared_heads) * share;
  }
  Scalar routed_scale(const Gating& gating, Index token) const {
    const Scalar group = config_.shared_heads > 0 ? Scalar(2) * gating.group(token, 1) : Scalar(1);
    return group * static_cast<Scalar>(config_.top_k);
  }

  Assignments assign(const Gating& gating, const SequenceBatch& batch) const {
    const Index heads = num_heads(), shared = config_.shared_heads, top_k = config_.top_k, length = batch.length;
    Assignments assigned;
    assigned.group_rows.assign(static_cast<std::size_t>(batch.batch_size * heads + 1), 0);
    // Count per (sequence, head), then place in position order.
    for (Index b = 0; b < batch.batch_size; ++b) {
      Index* counts = assigned.group_rows.data() + b * heads + 1;
      for (Index t = b * length; t < b * length + batch.length_of(b); ++t) {
        for (Index i = 0; i < shared; ++i) ++counts[i];
        for (Index j = 0; j < top_k; ++j) ++counts[shared + gating.routing.experts[static_cast<std::size_t>(t * top_k + j)]];
      }
    }
    for (std::size_t g = 1; g < assigned.group_rows.size(); ++g) assigned.group_rows[g] += assigned.group_rows[g - 1];
    const std::size_t total = static_cast<std::size_t>(assigned.group_rows.back());
    assigned.heads.resize(total);
    assigned.tokens.resize(total);
    assigned.positions.resize(total);
    assigned.slots.resize(total);
    assigned.gates.resize(total);
    std::vector<Index> next(assigned.group_rows.begin(), assigned.group_rows.end() - 1);
    const auto place = [&](Index b, Index t, Index head, Index slot, Scalar gate) {
      const std::size_t a = static_cast<std::size_t>(next[static_cast<std::size_t>(b * heads + head)]++);
      assigned.heads[a] = head;
      assigned.tokens[a] = t;
      assigned.positions[a] = t - b * length;
      assigned.slots[a] = slot;
      assigned.gates[a] = gate;
    };
    for (Index b = 0; b < batch.batch_size; ++b) {
      for (Index t = b * length; t < b * length + batch.length_of(b); ++t) {
        for (Index i = 0; i < shared; ++i) place(b, t, i, i, shared_gate(gating, t, i));
        const Scalar scale = routed_scale(gating, t);
        for (Index j = 0; j < top_k; ++j)
          place(b, t, shared + gating.routing.experts[static_cast<std::size_t>(t * top_k + j)], shared + j,
                scale * gating.routing.gates(t, j));
      }
    }
    return assigned;
  }

  AttentionLayout group_layout(const Assignments& assigned, const SequenceBatch& key_batch, bool causal, Index sequence,
                               Index head) const {
    const std::size_t pair = static_cast<std::size_t>(sequence * num_heads() + head);
    AttentionLayout layout;
    layout.positions = assigned.group_rows[pair + 1] - assigned.group_rows[pair];
    layout.row_positions = assigned.positions.data() + assigned.group_rows[pair];
    layout.key_length = key_batch.length_of(sequence);
    layout.causal = causal;
    layout.block_positions = config_.causal_block;
    return layout;
  }

  Matrix<Scalar> run_forward(const Matrix<Scalar>& query, const SequenceBatch& query_batch,
                             const Matrix<Scalar>& key_value, const SequenceBatch& key_batch, bool causal,
                             const Gating& gating, Precision precision, ForwardPass& pass) const {
    const Index heads = num_heads(), head_dim = config_.head_dim, key_length = key_batch.length;
    pass.assigned = assign(gating, query_batch);
    const Assignments& assigned = pass.assigned;
    const Index rows = static_cast<Index>(assigned.tokens.size());
    pass.plan = DispatchPlan::build(assigned.heads, heads, 1);
    // Inference lets the backend keep the weights repacked, until their versions change.
    const auto version = [&](const Parameter<Scalar>& weight) { return pass.for_backward ? 0 : weight.version(); };
    // bf16: each input rounded once for all the products that read it.
    const ProductInput<Scalar> query_input(*compute_, query, precision, pass.rounded_query);
    const ProductInput<Scalar> key_value_input =
        &query == &key_value ? query_input : ProductInput<Scalar>(*compute_, key_value, precision, pass.rounded_key_value);
    pass.keys = key_value_input.times(k_proj.value, version(k_proj));    // [B*Tk, H*d_h]
    pass.values = key_value_input.times(v_proj.value, version(v_proj));  // [B*Tk, H*d_h]
    pass.projections.project_in(*compute_, query, pass.plan, assigned.tokens, q_proj.value, head_dim, pass.queries,
                                precision, nullptr, version(q_proj), query_input.rounded());  // [A, d_h]
    detail::AttentionProbabilities<Scalar> probabilities(pass.for_backward ? &pass.probabilities : nullptr, rows, key_length,
                                                 compute_->threads());  // [A, Tk]
    pass.attended.resize(rows, head_dim);                 // [A, d_h]
    pass.flops = projection_flops(query.rows(), key_value.rows(), rows);
    // (sequence, head) pairs are independent: one per thread.
    const double attention_work = static_cast<double>(rows) * key_length * head_dim;
    parallel_parts(*compute_, query_batch.batch_size * heads, attention_work, [&](Index pair, int thread, const Compute& part_compute) {
      const Index b = pair / heads, h = pair % heads;
      const Index first = assigned.group_rows[pair], count = assigned.group_rows[pair + 1] - first;
      if (count == 0) return;
      attention_forward<Scalar>(pass.queries.middleRows(first, count),
                                pass.keys.block(b * key_length, h * head_dim, key_length, head_dim),
                                pass.values.block(b * key_length, h * head_dim, key_length, head_dim),
                                group_layout(assigned, key_batch, causal, b, h), probabilities.rows(first, count, thread),
                                pass.attended.middleRows(first, count), part_compute, precision);
    });
    for (Index pair = 0; pair < query_batch.batch_size * heads; ++pair)
      pass.flops += cost::attention(
          static_cast<double>(group_layout(assigned, key_batch, causal, pair / heads, pair % heads).visible_pairs()),
          static_cast<double>(head_dim));
    return pass.projections.project_out(*compute_, pass.attended, assigned.gates.data(), assigned.tokens, pass.plan,
                                        o_proj.value, query.rows(), precision, nullptr, version(o_proj));
  }

  // From the gradients of the A gates to the three routers; adds their input gradient to
  // grad_query: [N, d_model].
  void backward_gates(const std::vector<Scalar>& grad_gates, Matrix<Scalar>& grad_query) {
    const Index rows = query_.rows(), shared = config_.shared_heads;
    const Scalar top_k = static_cast<Scalar>(config_.top_k), two = Scalar(2);
    const Gating& gating = gating_;
    const Assignments& assigned = pass_.assigned;
    Matrix<Scalar> grad_routed = Matrix<Scalar>::Zero(rows, config_.top_k);  // [N, k_r] renormalised gates
    Matrix<Scalar> grad_shared = Matrix<Scalar>::Zero(rows, std::max<Index>(shared, 1));  // [N, h_s]
    Matrix<Scalar> grad_group = Matrix<Scalar>::Zero(rows, 2);                // [N, 2]
    for (std::size_t a = 0; a < grad_gates.size(); ++a) {
      const Index t = assigned.tokens[a], slot = assigned.slots[a];
      const Scalar grad = grad_gates[a];
      if (slot < shared) {
        const Scalar share = shared > 1 ? gating.shared(t, slot) : Scalar(1);
        grad_group(t, 0) += grad * two * static_cast<Scalar>(shared) * share;
        if (shared > 1) grad_shared(t, slot) += grad * two * gating.group(t, 0) * static_cast<Scalar>(shared);
      } else {
        const Index j = slot - shared;
        grad_routed(t, j) += grad * routed_scale(gating, t);
        if (shared > 0) grad_group(t, 1) += grad * two * top_k * gating.routing.gates(t, j);
      }
    }
    grad_query += router.backward(grad_routed);
    const auto backward_router = [&](Parameter<Scalar>& weight, const Matrix<Scalar>& probabilities,
                                     const Matrix<Scalar>& grad_probabilities) {
      const Matrix<Scalar> grad_logits = softmax_rows_backward(probabilities, grad_probabilities);  // [N, n]
      gemm<Scalar>(*compute_, grad_logits, Transpose::yes, query_, Transpose::no, weight.grad, true);
      gemm<Scalar>(*compute_, grad_logits, Transpose::no, weight.value, Transpose::no, grad_query, true);
    };
    if (shared > 1) backward_router(shared_router, gating.shared, grad_shared);
    if (shared > 0) backward_router(group_router, gating.group, grad_group);
  }

  double projection_flops(Index query_rows, Index key_rows, Index assignments) const {
    return cost::moh_projections(static_cast<double>(model_dim()), static_cast<double>(config_.head_dim),
                                 static_cast<double>(config_.shared_heads), static_cast<double>(config_.routed_heads),
                                 static_cast<double>(query_rows), static_cast<double>(key_rows),
                                 static_cast<double>(assignments));
  }

  MixtureOfHeadsConfig config_;
  ComputePtr compute_ = Compute::standard();
  bool causal_ = false;
  bool self_attention_ = false;
  SequenceBatch query_batch_, key_batch_;
  Matrix<Scalar> query_;      // [B*Tq, d_model]
  Matrix<Scalar> key_value_;  // [B*Tk, d_model], empty for self-attention (query_ is both)
  Gating gating_;             // the last forward's
  ForwardPass pass_;          // the last forward's, for backward
  detail::Reusable<ForwardPass> inference_;  // infer's buffers, kept for the next call
  std::vector<Matrix<Scalar>> grad_scores_;  // one score-gradient workspace per thread
};

static_assert(is_attention_v<MixtureOfHeads<float>> && is_attention_v<MixtureOfHeads<double>>,
              "MixtureOfHeads must provide the attention interface (moa/attention_interface.hpp)");

}  // namespace moa
