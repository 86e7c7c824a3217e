// moa/multi_head_attention.hpp - standard multi-head attention, the baseline MoA is compared with.
//
// h heads, each with its own query, key and value projection, and one output projection:
//     Q = X Wq^T, K = Z Wk^T, V = Z Wv^T (each [N, h*d_h]);  A_h = softmax(Q_h K_h^T / sqrt(d_h)) V_h
//     y = [A_1 .. A_h] Wo^T
// Same interface as MixtureOfAttention (forward/backward, masks, cache, step), so a model picks
// either by a template argument. Parameters: q_proj.weight, k_proj.weight, v_proj.weight
// [h*d_h, d_model] and o_proj.weight [d_model, h*d_h], without biases as in MoA.
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
#include "moa/reusable.hpp"
#include "moa/tensor.hpp"

#include <cmath>
#include <string>
#include <vector>

namespace moa {

struct MultiHeadAttentionConfig {
  Index model_dim = 0;
  Index num_heads = 0;
  Index head_dim = 0;
  Index causal_block = 32;  // query positions per block of causal attention

  void validate(const char* function) const {
    MOA_CHECK(model_dim > 0, function, "model_dim must be positive, got ", model_dim);
    MOA_CHECK(num_heads > 0, function, "num_heads must be positive, got ", num_heads);
    MOA_CHECK(head_dim > 0, function, "head_dim must be positive, got ", head_dim);
    MOA_CHECK(causal_block > 0, function, "causal_block must be positive, got ", causal_block);
  }
};

template <typename S>
class MultiHeadAttention {
 public:
  using Scalar = S;

  MultiHeadAttention(const MultiHeadAttentionConfig& config, Rng& rng)
      : q_proj("weight", {(config.validate("MultiHeadAttention"), config.num_heads * config.head_dim), config.model_dim}),
        k_proj("weight", {config.num_heads * config.head_dim, config.model_dim}),
        v_proj("weight", {config.num_heads * config.head_dim, config.model_dim}),
        o_proj("weight", {config.model_dim, config.num_heads * config.head_dim}),
        config_(config) {
    const double input_gain = 1.0 / std::sqrt(2.0);
    init_xavier_uniform(q_proj, rng, input_gain);
    init_xavier_uniform(k_proj, rng, input_gain);
    init_xavier_uniform(v_proj, rng, input_gain);
    init_xavier_uniform(o_proj, rng);
  }

  const MultiHeadAttentionConfig& config() const { return config_; }
  Index model_dim() const { return config_.model_dim; }
  Index width() const { return config_.num_heads * config_.head_dim; }
  bool training() const { return training_; }
  void set_training(bool training) { training_ = training; }
  // The backend and threads every product of the layer runs on.
  void set_compute(ComputePtr compute) {
    compute_ = detail::checked_compute(std::move(compute), "MultiHeadAttention::set_compute");
  }
  const Compute& compute() const { return *compute_; }

  // query: [B*Tq, d_model], key_value: [B*Tk, d_model] -> output: [B*Tq, d_model]; padding query
  // rows get zeros, padding keys are never attended to. Nothing random: no Rng.
  Matrix<Scalar> forward(const Matrix<Scalar>& query, const SequenceBatch& query_batch,
                         const Matrix<Scalar>& key_value, const SequenceBatch& key_batch, bool causal) {
    detail::validate_attention_batches("MultiHeadAttention::forward", model_dim(), query.rows(), query.cols(),
                                       query_batch, key_value.rows(), key_value.cols(), key_batch, causal);
    detail::parallel_assign(*compute_, query_, query);
    detail::parallel_assign(*compute_, key_value_, key_value);
    query_batch_ = query_batch;
    key_batch_ = key_batch;
    causal_ = causal;
    return run_forward(query, query_batch, key_value, key_batch, causal, product_precision(*compute_, training_), pass_);
  }

  Matrix<Scalar> forward_self(const Matrix<Scalar>& input, const SequenceBatch& batch, bool causal) {
    return forward(input, batch, input, batch, causal);
  }

  // The forward of evaluation without its state: keeps nothing for backward, so a const layer
  // serves (decoding's encoder, several threads).
  Matrix<Scalar> infer(const Matrix<Scalar>& query, const SequenceBatch& query_batch, const Matrix<Scalar>& key_value,
                       const SequenceBatch& key_batch, bool causal) const {
    detail::validate_attention_batches("MultiHeadAttention::infer", model_dim(), query.rows(), query.cols(), query_batch,
                                       key_value.rows(), key_value.cols(), key_batch, causal);
    const auto pass = inference_.lease();
    pass->for_backward = false;
    return run_forward(query, query_batch, key_value, key_batch, causal, product_precision(*compute_, false), *pass);
  }

  // grad_output: [B*Tq, d_model]. Accumulates every parameter gradient and returns the gradients
  // of both inputs.
  AttentionGradients<Scalar> backward(const Matrix<Scalar>& grad_output) { return backward_impl(grad_output, false); }

 private:
  // one_input: the key and value side's input gradient is added into the query side's (forward_self).
  AttentionGradients<Scalar> backward_impl(const Matrix<Scalar>& grad_output, bool one_input) {
    MOA_CHECK(grad_output.rows() == query_.rows() && grad_output.cols() == model_dim(), "MultiHeadAttention::backward",
              "grad_output has shape ", detail::shape_of(grad_output), ", expected ", detail::shape_of(query_),
              " (as the last forward)");
    const Index heads = config_.num_heads, head_dim = config_.head_dim;
    gemm<Scalar>(*compute_, grad_output, Transpose::yes, pass_.attended, Transpose::no, o_proj.grad, true);
    Matrix<Scalar> grad_attended(grad_output.rows(), width());  // [B*Tq, h*d_h]
    gemm<Scalar>(*compute_, grad_output, Transpose::no, o_proj.value, Transpose::no, grad_attended);
    Matrix<Scalar> grad_queries, grad_keys, grad_values;
    detail::parallel_assign(*compute_, grad_queries, Matrix<Scalar>::Zero(pass_.queries.rows(), width()));  // [B*Tq, h*d_h]
    detail::parallel_assign(*compute_, grad_keys, Matrix<Scalar>::Zero(pass_.keys.rows(), width()));        // [B*Tk, h*d_h]
    detail::parallel_assign(*compute_, grad_values, Matrix<Scalar>::Zero(pass_.values.rows(), width()));    // [B*Tk, h*d_h]
    const Index query_length = query_batch_.length, key_length = key_batch_.length;
    grad_scores_.resize(static_cast<std::size_t>(compute_->threads()));
    const double attention_work = static_cast<double>(query_.rows()) * key_length * width();
    parallel_parts(*compute_, query_batch_.batch_size * heads, attention_work, [&](Index pair, int thread, const Compute& part_compute) {
      const Index b = pair / heads, h = pair % heads;
      attention_backward<Scalar>(
          pass_.queries.block(b * query_length, h * head_dim, query_length, head_dim),
          pass_.keys.block(b * key_length, h * head_dim, key_length, head_dim),
          pass_.values.block(b * key_length, h * head_dim, key_length, head_dim),
          pass_.probabilities.middleRows((b * heads + h) * query_length, query_length),
          grad_attended.block(b * query_length, h * head_dim, query_length, head_dim), layout_of(query_batch_, key_batch_, causal_, b),
          grad_queries.block(b * query_length, h * head_dim, query_length, head_dim),
          grad_keys.block(b * key_length, h * head_dim, key_length, head_dim),
          grad_values.block(b * key_length, h * head_dim, key_length, head_dim),
          &grad_scores_[static_cast<std::size_t>(thread)], part_compute);
    });
    gemm<Scalar>(*compute_, grad_queries, Transpose::yes, query_, Transpose::no, q_proj.grad, true);
    AttentionGradients<Scalar> grads;
    grads.query.resize(query_.rows(), model_dim());  // [B*Tq, d_model]
    gemm<Scalar>(*compute_, grad_queries, Transpose::no, q_proj.value, Transpose::no, grads.query);
    if (one_input)  // backward_self: the input's gradient is the sum of both sides'
      key_value_backward_into<Scalar>(*compute_, grad_keys, grad_values, key_value_, k_proj, v_proj, grads.query);
    else
      grads.key_value = key_value_backward<Scalar>(*compute_, grad_keys, grad_values, key_value_, k_proj, v_proj);
    return grads;
  }

 public:
  // The gradient of the one input of forward_self (both sides' summed).
  Matrix<Scalar> backward_self(const Matrix<Scalar>& grad_output) { return backward_impl(grad_output, true).query; }

  Scalar aux_loss() const { return Scalar(0); }
  double last_forward_flops() const { return pass_.flops; }

  // A self-attention cache holds h key rows and value rows of width d_h per past token (stored as
  // one row of width h*d_h); a cross-attention cache is filled once from the encoder output.
  // With a bf16 compute, a cache carries the weights its steps use rounded to bfloat16.
  KVCache<Scalar> make_self_cache(Index batch_size, Index capacity) const {
    KVCache<Scalar> cache(batch_size, capacity, width());
    cache.set_rounded_weights(round_weights_for_decoding<Scalar>(
        *compute_, {{q_proj.value, width()}, {o_proj.value, model_dim()}, {k_proj.value, width()}, {v_proj.value, width()}}));
    return cache;
  }
  KVCache<Scalar> make_cross_cache(const Matrix<Scalar>& memory, const SequenceBatch& memory_batch) const {
    KVCache<Scalar> cache = make_cross_attention_cache<Scalar>(memory, memory_batch, k_proj.value, v_proj.value,
                                                               "MultiHeadAttention::make_cross_cache", *compute_,
                                                               product_precision(*compute_, false));
    cache.set_rounded_weights(round_weights_for_decoding<Scalar>(*compute_, {{q_proj.value, width()}, {o_proj.value, model_dim()}}));
    return cache;
  }

  // input: [B*n, d_model], n new tokens of each sequence; see MixtureOfAttention::step.
  Matrix<Scalar> step(const Matrix<Scalar>& input, KVCache<Scalar>& cache) const {
    const char* function = "MultiHeadAttention::step";
    const Index steps = check_step_input(input, cache, model_dim(), width(), function);
    const Index heads = config_.num_heads, head_dim = config_.head_dim;
    const Index offset = cache.frozen() ? 0 : cache.length();
    const Precision precision = product_precision(*compute_, false);
    if (!cache.frozen())
      cache.append(weight_product<Scalar>(*compute_, input, k_proj.value, cache.rounded_weight(cache.kKeyWeight), precision),
                   weight_product<Scalar>(*compute_, input, v_proj.value, cache.rounded_weight(cache.kValueWeight), precision));
    const Matrix<Scalar> queries =
        weight_product<Scalar>(*compute_, input, q_proj.value, cache.rounded_weight(cache.kQueryWeight), precision);  // [B*n, h*d_h]
    Matrix<Scalar> attended(input.rows(), width());                   // [B*n, h*d_h]
    Matrix<Scalar> probabilities(steps, cache.capacity());            // [n, capacity]
    double flops = projection_flops(input.rows(), cache.frozen() ? 0 : input.rows());
    for (Index b = 0; b < cache.batch_size(); ++b) {
      AttentionLayout layout;
      layout.positions = steps;
      layout.key_length = cache.key_length(b);
      layout.causal = !cache.frozen();
      layout.position_offset = offset;
      layout.block_positions = config_.causal_block;
      for (Index h = 0; h < heads; ++h) {
        attention_over_cache<Scalar>(queries.block(b * steps, h * head_dim, steps, head_dim), cache, b, h * head_dim,
                                     layout, probabilities, attended.block(b * steps, h * head_dim, steps, head_dim),
                                     *compute_, precision);
      }
      flops += cost::attention(static_cast<double>(layout.visible_pairs() * heads), static_cast<double>(head_dim));
    }
    cache.set_last_step_flops(flops);
    return weight_product<Scalar>(*compute_, attended, o_proj.value, cache.rounded_weight(cache.kOutputWeight), precision);
  }

  void collect_parameters(ParameterList<Scalar>& list, const std::string& prefix = "") {
    list.add(prefix + "q_proj.", q_proj);
    list.add(prefix + "k_proj.", k_proj);
    list.add(prefix + "v_proj.", v_proj);
    list.add(prefix + "o_proj.", o_proj);
  }

  Parameter<Scalar> q_proj;  // [h*d_h, d_model]
  Parameter<Scalar> k_proj;  // [h*d_h, d_model]
  Parameter<Scalar> v_proj;  // [h*d_h, d_model]
  Parameter<Scalar> o_proj;  // [d_model, h*d_h]

 private:
  // What a forward computes, kept by forward for backward.
  struct ForwardPass {
    Matrix<Scalar> queries;        // [B*Tq, h*d_h]
    Matrix<Scalar> keys;           // [B*Tk, h*d_h]
    Matrix<Scalar> values;         // [B*Tk, h*d_h]
    bool for_backward = true;      // false: inference, which keeps no probabilities
    Matrix<Scalar> probabilities;  // [B*h*Tq, Tk] for backward
    Matrix<Scalar> attended;       // [B*Tq, h*d_h]
    BFloat16Matrix rounded_query;      // bf16 products: [B*Tq, d_model] rounded once for all of them
    BFloat16Matrix rounded_key_value;  // bf16 cross-attention: [B*Tk, d_model]
    double flops = 0.0;
  };

  Matrix<Scalar> run_forward(const Matrix<Scalar>& query, const SequenceBatch& query_batch,
                             const Matrix<Scalar>& key_value, const SequenceBatch& key_batch, bool causal,
                             Precision precision, ForwardPass& pass) const {
    // Inference lets the backend keep the weights repacked, until their versions change.
    const auto version = [&](const Parameter<Scalar>& weight) { return pass.for_backward ? 0 : weight.version(); };
    // bf16: each input rounded once for all the products that read it.
    const ProductInput<Scalar> query_input(*compute_, query, precision, pass.rounded_query);
    const ProductInput<Scalar> key_value_input =
        &query == &key_value ? query_input : ProductInput<Scalar>(*compute_, key_value, precision, pass.rounded_key_value);
    pass.queries = query_input.times(q_proj.value, version(q_proj));     // [B*Tq, h*d_h]
    pass.keys = key_value_input.times(k_proj.value, version(k_proj));    // [B*Tk, h*d_h]
    pass.values = key_value_input.times(v_proj.value, version(v_proj));  // [B*Tk, h*d_h]
    const Index heads = config_.num_heads, head_dim = config_.head_dim;
    detail::AttentionProbabilities<Scalar> probabilities(pass.for_backward ? &pass.probabilities : nullptr,
                                                 query_batch.batch_size * heads * query_batch.length, key_batch.length,
                                                 compute_->threads());  // [B*h*Tq, Tk]
    pass.attended = Matrix<Scalar>::Zero(query.rows(), width());  // [B*Tq, h*d_h]
    pass.flops = projection_flops(query.rows(), key_value.rows());
    // (sequence, head) pairs are independent: one per thread.
    const double attention_work = static_cast<double>(query.rows()) * key_batch.length * width();
    parallel_parts(*compute_, query_batch.batch_size * heads, attention_work, [&](Index pair, int thread, const Compute& part_compute) {
      const Index b = pair / heads, h = pair % heads;
      attention_forward<Scalar>(
          pass.queries.block(b * query_batch.length, h * head_dim, query_batch.length, head_dim),
          pass.keys.block(b * key_batch.length, h * head_dim, key_batch.length, head_dim),
          pass.values.block(b * key_batch.length, h * head_dim, key_batch.length, head_dim),
          layout_of(query_batch, key_batch, causal, b),
          probabilities.rows((b * heads + h) * query_batch.length, query_batch.length, thread),
          pass.attended.block(b * query_batch.length, h * head_dim, query_batch.length, head_dim), part_compute, precision);
    });
    for (Index b = 0; b < query_batch.batch_size; ++b)
      pass.flops += cost::attention(static_cast<double>(layout_of(query_batch, key_batch, causal, b).visible_pairs() * heads),
                                    static_cast<double>(head_dim));
    return linear_product<Scalar>(*compute_, pass.attended, o_proj.value, precision, version(o_proj));
  }

  AttentionLayout layout_of(const SequenceBatch& query_batch, const SequenceBatch& key_batch, bool causal,
                            Index sequence) const {
    AttentionLayout layout;
    layout.positions = query_batch.length_of(sequence);
    layout.key_length = key_batch.length_of(sequence);
    layout.causal = causal;
    layout.block_positions = config_.causal_block;
    return layout;
  }

  double projection_flops(Index query_rows, Index key_rows) const {
    return cost::mha_projections(static_cast<double>(model_dim()), static_cast<double>(width()),
                                 static_cast<double>(query_rows), static_cast<double>(key_rows));
  }

  MultiHeadAttentionConfig config_;
  bool training_ = true;
  ComputePtr compute_ = Compute::standard();
  bool causal_ = false;
  SequenceBatch query_batch_, key_batch_;
  Matrix<Scalar> query_;          // [B*Tq, d_model]
  Matrix<Scalar> key_value_;      // [B*Tk, d_model]
  std::vector<Matrix<Scalar>> grad_scores_;  // one score-gradient workspace per thread
  ForwardPass pass_;  // the last forward's, for backward
  detail::Reusable<ForwardPass> inference_;  // infer's buffers, kept for the next call
};

static_assert(is_attention_v<MultiHeadAttention<float>> && is_attention_v<MultiHeadAttention<double>>,
              "MultiHeadAttention must provide the attention interface (moa/attention_interface.hpp)");

}  // namespace moa
