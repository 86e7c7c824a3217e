// Helpers shared by the attention tests: the naive oracles written from the formulas of MOA.md,
// and gradient and decoding checks that apply to both MixtureOfAttention and MultiHeadAttention.
#pragma once

#include "support.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace moa_test {

// The row of the key/value matrix for token j of sequence b is b*T + j. Attention of one query
// vector q over keys/values [0, visible) of one sequence.
inline moa::RowVector<double> naive_attend(const moa::RowVector<double>& q, const MatrixD& keys, const MatrixD& values,
                                           Index first_row, Index visible) {
  moa::RowVector<double> result = moa::RowVector<double>::Zero(values.cols());
  if (visible == 0) return result;
  std::vector<double> scores(static_cast<std::size_t>(visible));
  for (Index j = 0; j < visible; ++j)
    scores[j] = q.dot(keys.row(first_row + j)) / std::sqrt(static_cast<double>(q.size()));
  const double max_score = *std::max_element(scores.begin(), scores.end());
  double total = 0;
  for (double& s : scores) total += (s = std::exp(s - max_score));
  for (Index j = 0; j < visible; ++j) result += scores[j] / total * values.row(first_row + j);
  return result;
}

// A MixtureOfAttention with a random router (the default zero router ties every expert).
template <typename Scalar>
moa::MixtureOfAttention<Scalar> make_moa_layer(const moa::MixtureOfAttentionConfig& config, moa::Rng& rng) {
  moa::MixtureOfAttention<Scalar> layer(config, rng);
  moa::init_normal(layer.router.weight, rng, 0.0, 1.0);
  return layer;
}

// MixtureOfHeads with random routers (the default zero routers give every gate 1 and tie every
// routed head).
template <typename Scalar>
moa::MixtureOfHeads<Scalar> make_moh_layer(const moa::MixtureOfHeadsConfig& config, moa::Rng& rng) {
  moa::MixtureOfHeads<Scalar> layer(config, rng);
  moa::init_normal(layer.router.weight, rng, 0.0, 1.0);
  if (config.shared_heads > 1) moa::init_normal(layer.shared_router, rng, 0.0, 1.0);
  if (config.shared_heads > 0) moa::init_normal(layer.group_router, rng, 0.0, 1.0);
  return layer;
}

// y_t = sum_{i in G(t)} w_{i,t} softmax(x_t Wq_i^T K^T / sqrt(d_h) + mask) V Wo_i^T, token by token.
inline MatrixD naive_moa(const moa::MixtureOfAttention<double>& layer, const MatrixD& query,
                         const moa::SequenceBatch& query_batch, const MatrixD& key_value,
                         const moa::SequenceBatch& key_batch, bool causal) {
  const auto& config = layer.config();
  const Index experts = config.num_experts, k = config.top_k, head_dim = config.head_dim, model = config.model_dim;
  const MatrixD keys = key_value * layer.k_proj.value.transpose();
  const MatrixD values = key_value * layer.v_proj.value.transpose();
  MatrixD output = MatrixD::Zero(query.rows(), model);
  for (Index b = 0; b < query_batch.batch_size; ++b) {
    for (Index t = 0; t < query_batch.length_of(b); ++t) {
      const Index row = b * query_batch.length + t;
      const moa::RowVector<double> x = query.row(row);
      moa::RowVector<double> p = x * layer.router.weight.value.transpose();
      p = (p.array() - p.maxCoeff()).exp();
      p /= p.sum();
      std::vector<Index> order(static_cast<std::size_t>(experts));
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](Index a, Index c) { return p(a) > p(c); });
      double chosen_sum = 0;
      for (Index j = 0; j < k; ++j) chosen_sum += p(order[j]);
      const double normaliser = config.gate_normalization == moa::GateNormalization::renormalized ? chosen_sum : 1.0;
      const Index visible = causal ? std::min(t + 1, key_batch.length_of(b)) : key_batch.length_of(b);
      for (Index j = 0; j < k; ++j) {
        const Index i = order[j];
        const moa::RowVector<double> q = x * layer.q_proj.value.middleRows(i * head_dim, head_dim).transpose();
        const moa::RowVector<double> a = naive_attend(q, keys, values, b * key_batch.length, visible);
        output.row(row) += p(i) / normaliser * (a * layer.o_proj.value.middleRows(i * model, model).transpose());
      }
    }
  }
  return output;
}

// y_t = concat_h softmax(q_h K_h^T / sqrt(d_h) + mask) V_h, times Wo^T, token by token.
inline MatrixD naive_mha(const moa::MultiHeadAttention<double>& layer, const MatrixD& query,
                         const moa::SequenceBatch& query_batch, const MatrixD& key_value,
                         const moa::SequenceBatch& key_batch, bool causal) {
  const auto& config = layer.config();
  const Index head_dim = config.head_dim;
  const MatrixD keys = key_value * layer.k_proj.value.transpose();
  const MatrixD values = key_value * layer.v_proj.value.transpose();
  const MatrixD queries = query * layer.q_proj.value.transpose();
  MatrixD attended = MatrixD::Zero(query.rows(), layer.width());
  for (Index b = 0; b < query_batch.batch_size; ++b) {
    for (Index t = 0; t < query_batch.length_of(b); ++t) {
      const Index row = b * query_batch.length + t;
      const Index visible = causal ? std::min(t + 1, key_batch.length_of(b)) : key_batch.length_of(b);
      for (Index h = 0; h < config.num_heads; ++h) {
        const MatrixD head_keys = keys.middleCols(h * head_dim, head_dim);
        const MatrixD head_values = values.middleCols(h * head_dim, head_dim);
        attended.row(row).segment(h * head_dim, head_dim) =
            naive_attend(queries.row(row).segment(h * head_dim, head_dim), head_keys, head_values,
                         b * key_batch.length, visible);
      }
    }
  }
  return attended * layer.o_proj.value.transpose();
}

struct AttentionCase {
  std::string name;
  bool self;
  bool causal;
  moa::SequenceBatch query_batch;
  moa::SequenceBatch key_batch;
};

// Self, cross, causal and padded inputs of several lengths.
inline std::vector<AttentionCase> attention_cases() {
  return {
      {"self", true, false, moa::SequenceBatch::full(2, 4), moa::SequenceBatch::full(2, 4)},
      {"self causal", true, true, moa::SequenceBatch::full(2, 5), moa::SequenceBatch::full(2, 5)},
      {"self padded", true, false, moa::SequenceBatch::padded(5, {5, 3}), moa::SequenceBatch::padded(5, {5, 3})},
      {"self causal padded", true, true, moa::SequenceBatch::padded(4, {2, 4, 1}),
       moa::SequenceBatch::padded(4, {2, 4, 1})},
      {"cross", false, false, moa::SequenceBatch::full(2, 3), moa::SequenceBatch::full(2, 6)},
      {"cross padded", false, false, moa::SequenceBatch::padded(4, {4, 2}), moa::SequenceBatch::padded(3, {1, 3})},
  };
}

// Gradient check of loss = sum(output .* R) + aux_loss over every parameter and both inputs.
// noise_seed re-seeds the layer's generator for every forward, so noisy gating and sampling
// draw the same numbers each time.
template <typename Layer>
moa::GradientCheckResult check_attention_gradients(Layer& layer, const AttentionCase& test_case, moa::Rng& rng,
                                                   std::uint64_t noise_seed = 99,
                                                   const moa::GradientCheckOptions& options = {}) {
  const Index model = layer.model_dim();
  MatrixD query = random_matrix(test_case.query_batch.rows(), model, rng);
  MatrixD memory = random_matrix(test_case.key_batch.rows(), model, rng);
  auto run = [&] {
    moa::Rng noise(noise_seed);
    return test_case.self ? moa::forward_self_attention(layer, query, test_case.query_batch, test_case.causal, noise)
                          : moa::forward_attention(layer, query, test_case.query_batch, memory, test_case.key_batch,
                                                   test_case.causal, noise);
  };
  const MatrixD output = run();
  const MatrixD output_weights = random_matrix(output.rows(), output.cols(), rng);
  auto parameters = moa::parameters_of(layer);
  parameters.zero_grad();
  moa::AttentionGradients<double> grads = layer.backward(output_weights);
  if (test_case.self) grads.query += grads.key_value;
  std::vector<MatrixD> analytic;
  for (const auto& entry : parameters) analytic.push_back(entry.grad());
  std::vector<moa::GradientCheckTensor> tensors{{"query", &query, &grads.query}};
  if (!test_case.self) tensors.push_back({"key_value", &memory, &grads.key_value});
  for (std::size_t i = 0; i < parameters.size(); ++i)
    tensors.push_back({parameters[i].name, parameters[i].value(), &analytic[i]});
  return moa::check_gradients([&] { return run().cwiseProduct(output_weights).sum() + layer.aux_loss(); }, tensors,
                              options);
}

// Decoding token by token with a self-attention cache gives the full causal forward.
template <typename Layer>
void require_cached_decoding_matches(Layer& layer, Index batch_size, Index length, moa::Rng& rng) {
  using Scalar = typename Layer::Scalar;
  const moa::Matrix<Scalar> input = random_matrix<Scalar>(batch_size * length, layer.model_dim(), rng);
  const moa::Matrix<Scalar> full = layer.forward_self(input, moa::SequenceBatch::full(batch_size, length), true);
  auto cache = layer.make_self_cache(batch_size, length);
  // A prefill of the first two tokens, then one token a step.
  const Index prefill = 2;
  moa::Matrix<Scalar> first(batch_size * prefill, layer.model_dim());
  for (Index b = 0; b < batch_size; ++b) first.middleRows(b * prefill, prefill) = input.middleRows(b * length, prefill);
  const moa::Matrix<Scalar> first_output = layer.step(first, cache);
  for (Index b = 0; b < batch_size; ++b)
    REQUIRE((first_output.middleRows(b * prefill, prefill) - full.middleRows(b * length, prefill)).cwiseAbs().maxCoeff() <
            1e-5);
  for (Index t = prefill; t < length; ++t) {
    moa::Matrix<Scalar> token(batch_size, layer.model_dim());
    for (Index b = 0; b < batch_size; ++b) token.row(b) = input.row(b * length + t);
    const moa::Matrix<Scalar> output = layer.step(token, cache);
    for (Index b = 0; b < batch_size; ++b) {
      INFO("sequence " << b << ", position " << t);
      REQUIRE((output.row(b) - full.row(b * length + t)).cwiseAbs().maxCoeff() < 1e-5);
    }
  }
  REQUIRE(cache.length() == length);
  REQUIRE_MOA_ERROR(layer.step(moa::Matrix<Scalar>::Zero(batch_size, layer.model_dim()), cache),
                    "would exceed the capacity");
}

// After a beam reorder, the cache equals one built from the reordered prefixes, and decoding
// continues identically.
template <typename Layer>
void require_beam_reorder_matches(Layer& layer, moa::Rng& rng) {
  using Scalar = typename Layer::Scalar;
  const Index batch_size = 3, length = 5, model = layer.model_dim();
  const moa::Matrix<Scalar> input = random_matrix<Scalar>(batch_size * length, model, rng);
  auto token_rows = [&](const std::vector<Index>& sequences, Index t) {
    moa::Matrix<Scalar> rows(static_cast<Index>(sequences.size()), model);
    for (std::size_t i = 0; i < sequences.size(); ++i) rows.row(static_cast<Index>(i)) = input.row(sequences[i] * length + t);
    return rows;
  };
  const std::vector<Index> all{0, 1, 2}, order{2, 0, 2, 1};
  auto cache = layer.make_self_cache(batch_size, length);
  for (Index t = 0; t < 3; ++t) layer.step(token_rows(all, t), cache);
  cache.reorder(order);
  auto rebuilt = layer.make_self_cache(static_cast<Index>(order.size()), length);
  for (Index t = 0; t < 3; ++t) layer.step(token_rows(order, t), rebuilt);
  REQUIRE(cache.batch_size() == 4);
  for (Index b = 0; b < 4; ++b) {
    REQUIRE(cache.keys(b).topRows(3) == rebuilt.keys(b).topRows(3));
    REQUIRE(cache.values(b).topRows(3) == rebuilt.values(b).topRows(3));
  }
  const moa::Matrix<Scalar> continued = layer.step(token_rows(order, 3), cache);
  const moa::Matrix<Scalar> expected = layer.step(token_rows(order, 3), rebuilt);
  REQUIRE(continued == expected);
  REQUIRE_MOA_ERROR(cache.reorder({0, 4}), "order[1] = 4 is outside [0, 4)");
}

// A cross-attention cache, filled once, gives the full cross-attention forward.
template <typename Layer>
void require_cross_cache_matches(Layer& layer, moa::Rng& rng) {
  using Scalar = typename Layer::Scalar;
  const moa::SequenceBatch query_batch = moa::SequenceBatch::full(2, 3), memory_batch = moa::SequenceBatch::padded(4, {4, 2});
  const moa::Matrix<Scalar> query = random_matrix<Scalar>(query_batch.rows(), layer.model_dim(), rng);
  const moa::Matrix<Scalar> memory = random_matrix<Scalar>(memory_batch.rows(), layer.model_dim(), rng);
  const moa::Matrix<Scalar> full = layer.forward(query, query_batch, memory, memory_batch, false);
  auto cache = layer.make_cross_cache(memory, memory_batch);
  for (Index t = 0; t < 3; ++t) {
    moa::Matrix<Scalar> token(2, layer.model_dim());
    token.row(0) = query.row(t);
    token.row(1) = query.row(3 + t);
    const moa::Matrix<Scalar> output = layer.step(token, cache);
    REQUIRE((output.row(0) - full.row(t)).cwiseAbs().maxCoeff() < 1e-5);
    REQUIRE((output.row(1) - full.row(3 + t)).cwiseAbs().maxCoeff() < 1e-5);
  }
  REQUIRE_MOA_ERROR(cache.append(moa::Matrix<Scalar>::Zero(2, cache.width()), moa::Matrix<Scalar>::Zero(2, cache.width())),
                    "cannot grow");
}

// Shape and argument errors common to both layers.
template <typename Layer>
void require_attention_bad_input_throws(Layer& layer, const std::string& name) {
  using Scalar = typename Layer::Scalar;
  using M = moa::Matrix<Scalar>;
  const Index model = layer.model_dim();
  const auto batch = moa::SequenceBatch::full(2, 3);
  REQUIRE_MOA_ERROR(layer.forward_self(M::Zero(6, model + 1), batch, false),
                    name + "::forward: query has shape [6, " + std::to_string(model + 1) + "]");
  REQUIRE_MOA_ERROR(layer.forward_self(M::Zero(5, model), batch, false), "query has 5 rows but its batch describes 2 x 3");
  REQUIRE_MOA_ERROR(layer.forward_self(M::Zero(6, model), moa::SequenceBatch::padded(3, {3, 4}), false),
                    "lengths[1] = 4 outside [0, 3]");
  REQUIRE_MOA_ERROR(layer.forward_self(M::Zero(6, model), moa::SequenceBatch{2, 3, {3}}, false),
                    "1 lengths for batch_size 2");
  REQUIRE_MOA_ERROR(layer.forward(M::Zero(6, model), batch, M::Zero(4, model), moa::SequenceBatch::full(1, 4), false),
                    "query batch has 2 sequences but key_value batch has 1");
  REQUIRE_MOA_ERROR(layer.forward(M::Zero(6, model), batch, M::Zero(8, model), moa::SequenceBatch::full(2, 4), true),
                    "causal attention needs query and key_value batches of one length");
  REQUIRE_MOA_ERROR(layer.forward(M::Zero(6, model), batch, M::Zero(6, model - 1), batch, false),
                    "key_value has shape [6, " + std::to_string(model - 1) + "]");
  layer.forward_self(M::Zero(6, model), batch, false);
  REQUIRE_MOA_ERROR(layer.backward(M::Zero(5, model)), name + "::backward: grad_output has shape [5, ");
  auto cache = layer.make_self_cache(2, 2);
  REQUIRE_MOA_ERROR(layer.step(M::Zero(3, model), cache), name + "::step: input has shape [3, ");
  REQUIRE_MOA_ERROR(layer.step(M::Zero(6, model), cache), "appending 3 steps to 0 cached would exceed the capacity of 2");
  moa::KVCache<Scalar> wrong(2, 2, cache.width() + 1);
  REQUIRE_MOA_ERROR(layer.step(M::Zero(2, model), wrong), "cache has width");
  REQUIRE_MOA_ERROR(layer.make_cross_cache(M::Zero(5, model), batch), "memory has 5 rows");
}

}  // namespace moa_test
