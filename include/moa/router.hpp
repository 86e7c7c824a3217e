// moa/router.hpp - the token router of a Mixture-of-Attention layer, with its auxiliary losses.
//
//     logits_t = x_t Wg^T (+ N(0,1) * (softplus(x_t Wn^T) + 0.01) with noisy gating, training only)
//     p_t = softmax(logits_t)
// Token choice (the paper's): each token t takes its top k experts, G(t) = top-k(p_t), and
//     gate_{t,j} = p_{e_j,t} / sum_{m in G(t)} p_{m,t}   (renormalised, the paper's default)
//                = p_{e_j,t}                             (raw, as the authors' code)
//     L_a = E * sum_i f_i P_i   (f_i: share of the assignments to expert i, no gradient;
//                                P_i: mean router probability of expert i)
//     L_z = mean_t (logsumexp logits_t)^2
//     aux = load_balance_coefficient * L_a + z_loss_coefficient * L_z
// Padding tokens are not routed and count in neither loss.
//
// Expert choice (Zhou et al. 2022; SMHA, Union-of-Experts): each expert e takes the C tokens of each
// sequence with the largest p_{e,t}, C = round(capacity_factor * T * k / E) clamped to [1, T] for a
// sequence of T tokens, with gate p_{e,t}. Or, as the Union-of-Experts code does ("largest load",
// ExpertCapacity::largest_load), C is the largest number of tokens of one sequence of the batch
// whose top k include one expert, at most 60% of the sequence. A token gets zero, one or several
// experts; the load is balanced by construction, so there is no auxiliary loss. The choice looks at
// the whole sequence, so it is defined only where a query may see every other query (not causal
// self-attention).
#pragma once

#include "moa/error.hpp"
#include "moa/gemm.hpp"
#include "moa/init.hpp"
#include "moa/parameter.hpp"
#include "moa/random.hpp"
#include "moa/sequence_batch.hpp"
#include "moa/softmax.hpp"
#include "moa/tensor.hpp"
#include "moa/top_k.hpp"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace moa {

enum class GateNormalization { renormalized, raw };
enum class RoutingMode { token_choice, expert_choice };
enum class ExpertCapacity { fixed, largest_load };

struct RouterConfig {
  Index model_dim = 0;
  Index num_experts = 0;
  Index top_k = 0;
  GateNormalization gate_normalization = GateNormalization::renormalized;
  bool noisy_gating = false;     // training only
  Index sampled_experts = 0;     // of the k, how many are sampled from p instead of taken from the top (training only)
  double load_balance_coefficient = 0.01;
  double z_loss_coefficient = 0.001;
  RoutingMode mode = RoutingMode::token_choice;
  double capacity_factor = 1.0;  // expert choice: C = capacity_factor * T * k / E tokens per expert
  ExpertCapacity capacity = ExpertCapacity::fixed;

  // Expert choice with a fixed capacity: the tokens each expert takes from a sequence of `length`
  // tokens (0 for none).
  Index fixed_capacity(Index length) const {
    if (length == 0) return 0;
    const double tokens =
        std::round(capacity_factor * static_cast<double>(length * top_k) / static_cast<double>(num_experts));
    return std::clamp(static_cast<Index>(tokens), Index(1), length);
  }

  void validate(const char* function) const {
    MOA_CHECK(model_dim > 0, function, "model_dim must be positive, got ", model_dim);
    MOA_CHECK(num_experts > 0, function, "num_experts must be positive, got ", num_experts);
    MOA_CHECK(top_k > 0 && top_k <= num_experts, function, "top_k must be in [1, num_experts = ", num_experts,
              "], got ", top_k);
    MOA_CHECK(sampled_experts >= 0 && sampled_experts <= top_k, function, "sampled_experts must be in [0, top_k = ",
              top_k, "], got ", sampled_experts);
    MOA_CHECK(load_balance_coefficient >= 0.0 && z_loss_coefficient >= 0.0, function,
              "aux coefficients must be non-negative, got ", load_balance_coefficient, " and ", z_loss_coefficient);
    if (mode == RoutingMode::expert_choice) {
      MOA_CHECK(std::isfinite(capacity_factor) && capacity_factor > 0.0, function,
                "capacity_factor must be positive, got ", capacity_factor);
      MOA_CHECK(!noisy_gating && sampled_experts == 0, function,
                "expert-choice routing has no noisy gating or sampled experts");
      MOA_CHECK(load_balance_coefficient == 0.0 && z_loss_coefficient == 0.0, function,
                "expert-choice routing balances the load by construction and has no auxiliary loss: set "
                "load_balance_coefficient and z_loss_coefficient to 0 (got ", load_balance_coefficient, " and ",
                z_loss_coefficient, ")");
    }
  }
};

struct RoutingStatistics {
  std::vector<Index> counts;   // [E] assignments per expert
  std::vector<double> load;    // [E] counts / all assignments
  double load_entropy = 0.0;   // entropy of `load` (log E when perfectly balanced)
  double mean_token_entropy = 0.0;  // mean over tokens of the entropy of p_t
};

template <typename S>
class Router {
 public:
  using Scalar = S;

  Router(const RouterConfig& config, Rng& rng) : config_((config.validate("Router"), config)) {
    weight = Parameter<Scalar>("weight", {config.num_experts, config.model_dim});  // zero: uniform routing at start
    if (config.noisy_gating) {
      noise_weight = Parameter<Scalar>("noise_weight", {config.num_experts, config.model_dim});
      init_xavier_uniform(noise_weight, rng);
    }
  }

  const RouterConfig& config() const { return config_; }
  bool training() const { return training_; }
  void set_training(bool training) { training_ = training; }
  void set_compute(ComputePtr compute) {
    compute_ = detail::checked_compute(std::move(compute), "Router::set_compute");
  }

  // input: [N, d_model]; routed: N flags, false for padding. Results: experts(), gates(),
  // probabilities(), aux_loss(). Noisy gating and sampled experts draw from rng in training.
  void forward(const Matrix<Scalar>& input, const std::vector<char>& routed, Rng& rng) {
    forward_impl(input, routed, &rng);
  }
  // The same for a router that draws nothing (no noise or sampling, or evaluation).
  void forward(const Matrix<Scalar>& input, const std::vector<char>& routed) { forward_impl(input, routed, nullptr); }

  // The A assignments (token, expert, gate) of a routing. Token choice: A = N*k, assignment
  // t*k + j is token t's slot j (slot 0 the most probable). Expert choice: each sequence's
  // assignments are consecutive, ordered by token and then expert.
  struct Routing {
    std::vector<Index> experts;  // [A] expert of each assignment, -1 for an unrouted (padding) token
    std::vector<Index> tokens;   // [A] input row of each assignment
    Matrix<Scalar> gates;        // token choice [N, k], expert choice [A, 1]: assignment a's gate at data()[a]
    std::vector<Index> sequence_rows;  // expert choice: [B + 1], sequence b's assignments [rows[b], rows[b + 1])
  };

  // What decoding and evaluation need, computed without touching the state forward caches for
  // backward: the routing as in evaluation (no noise, no sampling). Token choice only.
  Routing route(const Matrix<Scalar>& input) const { return route(input, std::vector<char>(input.rows(), 1)); }
  // The same with routed: N flags, false for padding (not routed: experts -1, gates 0).
  Routing route(const Matrix<Scalar>& input, const std::vector<char>& routed) const {
    MOA_CHECK(config_.mode == RoutingMode::token_choice, "Router::route",
              "expert-choice routing chooses among the tokens of a sequence: pass the SequenceBatch");
    check_input(input, routed.size(), "Router::route");
    const Matrix<Scalar> probabilities = softmax_rows(linear_product<Scalar>(*compute_, input, weight.value));  // [N, E]
    Routing routing;
    choose_per_token(probabilities, routed, routing, nullptr);
    return routing;
  }
  // Either mode, over the rows of `batch` (padding not routed).
  Routing route(const Matrix<Scalar>& input, const SequenceBatch& batch) const {
    if (config_.mode == RoutingMode::token_choice) return route(input, batch.token_flags());
    batch.validate("Router::route", "input", input.rows());
    check_input(input, static_cast<std::size_t>(input.rows()), "Router::route");
    Routing routing;
    choose_per_expert(softmax_rows(linear_product<Scalar>(*compute_, input, weight.value)), batch, routing);
    return routing;
  }

  // Either mode in training, keeping what backward needs: token choice routes the rows of `batch`
  // as forward(input, flags[, rng]) does; expert choice lets each expert choose in each sequence.
  void forward(const Matrix<Scalar>& input, const SequenceBatch& batch, Rng* rng) {
    if (config_.mode == RoutingMode::token_choice) {
      forward_impl(input, batch.token_flags(), rng);
      return;
    }
    batch.validate("Router::forward", "input", input.rows());
    check_input(input, static_cast<std::size_t>(input.rows()), "Router::forward");
    detail::parallel_assign(*compute_, input_, input);
    routed_ = batch.token_flags();
    noisy_ = false;
    logits_ = linear_product<Scalar>(*compute_, input, weight.value);  // [N, E]
    probabilities_ = softmax_rows(logits_);                           // [N, E]
    choose_per_expert(probabilities_, batch, routing_);
    routed_tokens_ = batch.tokens();
    log_normalizers_ = ColumnVector<Scalar>::Zero(input.rows());
    compute_aux_losses();
  }

  // grad_gates: the shape of gates(); the aux losses' gradient (weighted by their coefficients) is
  // added. Accumulates into the router weights; returns grad_input: [N, d_model].
  Matrix<Scalar> backward(const Matrix<Scalar>& grad_gates) {
    const Index rows = input_.rows(), experts_count = config_.num_experts, top_k = config_.top_k;
    const Matrix<Scalar>& gates = routing_.gates;
    MOA_CHECK(grad_gates.rows() == gates.rows() && grad_gates.cols() == gates.cols(), "Router::backward",
              "grad_gates has shape ", detail::shape_of(grad_gates), ", expected ", detail::shape_of(gates),
              " (as the last forward)");
    Matrix<Scalar> grad_probabilities = Matrix<Scalar>::Zero(rows, experts_count);  // [N, E]
    Matrix<Scalar> grad_logits_extra = Matrix<Scalar>::Zero(rows, experts_count);   // [N, E] z-loss term
    if (config_.mode == RoutingMode::expert_choice) {
      // gate = p_{e,t}
      for (std::size_t a = 0; a < routing_.experts.size(); ++a)
        grad_probabilities(routing_.tokens[a], routing_.experts[a]) += grad_gates.data()[a];
    } else if (routed_tokens_ > 0) {
      const Scalar per_token = Scalar(1) / static_cast<Scalar>(routed_tokens_);
      const Scalar balance = static_cast<Scalar>(config_.load_balance_coefficient) *
                             static_cast<Scalar>(experts_count) * per_token;
      const Scalar z_scale = static_cast<Scalar>(config_.z_loss_coefficient) * Scalar(2) * per_token;
      parallel_ranges(*compute_, rows, kRowGrain, [&](Index first, Index count, int) {
        for (Index t = first; t < first + count; ++t) {
          if (!routed_[t]) continue;
          const Index* chosen = routing_.experts.data() + t * top_k;
          if (config_.gate_normalization == GateNormalization::renormalized) {
            // gate_j = p_j / S: dp_i = (dgate_i - sum_j dgate_j gate_j) / S
            const Scalar dot = grad_gates.row(t).dot(gates.row(t));
            for (Index j = 0; j < top_k; ++j)
              grad_probabilities(t, chosen[j]) += (grad_gates(t, j) - dot) / gate_sums_(t);
          } else {
            for (Index j = 0; j < top_k; ++j) grad_probabilities(t, chosen[j]) += grad_gates(t, j);
          }
          for (Index e = 0; e < experts_count; ++e) grad_probabilities(t, e) += balance * fractions_[e];
          grad_logits_extra.row(t) = z_scale * log_normalizers_(t) * probabilities_.row(t);
        }
      });
    }
    Matrix<Scalar> grad_logits = softmax_rows_backward(probabilities_, grad_probabilities) + grad_logits_extra;
    gemm<Scalar>(*compute_, grad_logits, Transpose::yes, input_, Transpose::no, weight.grad, true);
    Matrix<Scalar> grad_input(rows, config_.model_dim);  // [N, d_model]
    gemm<Scalar>(*compute_, grad_logits, Transpose::no, weight.value, Transpose::no, grad_input);
    if (noisy_) {
      // d logits / d noise_pre = noise * sigmoid(noise_pre)
      const Matrix<Scalar> grad_noise_pre =
          (grad_logits.array() * noise_.array() / (Scalar(1) + (-noise_pre_.array()).exp())).matrix();  // [N, E]
      gemm<Scalar>(*compute_, grad_noise_pre, Transpose::yes, input_, Transpose::no, noise_weight.grad, true);
      gemm<Scalar>(*compute_, grad_noise_pre, Transpose::no, noise_weight.value, Transpose::no, grad_input, true);
    }
    return grad_input;
  }

  // The last forward's routing (see Routing): experts [A], tokens [A], gates [N, k] or [A, 1].
  const Routing& routing() const { return routing_; }
  const std::vector<Index>& experts() const { return routing_.experts; }
  const std::vector<Index>& tokens() const { return routing_.tokens; }
  const Matrix<Scalar>& gates() const { return routing_.gates; }
  const Matrix<Scalar>& probabilities() const { return probabilities_; }  // [N, E]
  const Matrix<Scalar>& logits() const { return logits_; }                // [N, E]
  Index routed_tokens() const { return routed_tokens_; }
  Scalar load_balance_loss() const { return load_balance_loss_; }
  Scalar z_loss() const { return z_loss_; }
  Scalar aux_loss() const {
    return static_cast<Scalar>(config_.load_balance_coefficient) * load_balance_loss_ +
           static_cast<Scalar>(config_.z_loss_coefficient) * z_loss_;
  }

  RoutingStatistics statistics() const {
    RoutingStatistics stats;
    stats.counts.assign(static_cast<std::size_t>(config_.num_experts), 0);
    double total = 0.0;
    for (Index expert : routing_.experts) {
      if (expert < 0) continue;
      ++stats.counts[static_cast<std::size_t>(expert)];
      total += 1.0;
    }
    for (Index count : stats.counts) {
      const double share = total > 0 ? static_cast<double>(count) / total : 0.0;
      stats.load.push_back(share);
      if (share > 0) stats.load_entropy -= share * std::log(share);
    }
    for (Index t = 0; t < probabilities_.rows(); ++t) {
      if (!routed_[t]) continue;
      for (Index e = 0; e < config_.num_experts; ++e) {
        const double p = static_cast<double>(probabilities_(t, e));
        if (p > 0) stats.mean_token_entropy -= p * std::log(p);
      }
    }
    if (routed_tokens_ > 0) stats.mean_token_entropy /= static_cast<double>(routed_tokens_);
    return stats;
  }

  void collect_parameters(ParameterList<Scalar>& list, const std::string& prefix = "") {
    list.add(prefix, weight);
    if (config_.noisy_gating) list.add(prefix, noise_weight);
  }

  Parameter<Scalar> weight;        // [E, d_model]
  Parameter<Scalar> noise_weight;  // [E, d_model], only with noisy gating

 private:
  void check_input(const Matrix<Scalar>& input, std::size_t flags, const char* function) const {
    MOA_CHECK(input.cols() == config_.model_dim, function, "input has shape ", detail::shape_of(input),
              ", expected [N, ", config_.model_dim, "]");
    MOA_CHECK(static_cast<Index>(flags) == input.rows(), function, "routed has ", flags, " flags for ", input.rows(),
              " input rows");
  }

  void forward_impl(const Matrix<Scalar>& input, const std::vector<char>& routed, Rng* rng) {
    const char* function = "Router::forward";
    const Index experts_count = config_.num_experts;
    MOA_CHECK(config_.mode == RoutingMode::token_choice, function,
              "expert-choice routing chooses among the tokens of a sequence: pass the SequenceBatch");
    check_input(input, routed.size(), function);
    const bool noisy = training_ && config_.noisy_gating;
    const bool sampling = training_ && config_.sampled_experts > 0;
    MOA_CHECK(rng != nullptr || !(noisy || sampling), function,
              "noisy gating and sampled experts draw random numbers in training: pass an Rng");
    detail::parallel_assign(*compute_, input_, input);
    routed_ = routed;
    const Index rows = input.rows();
    logits_ = linear_product<Scalar>(*compute_, input, weight.value);  // [N, E]
    if (noisy) {
      noise_pre_ = linear_product<Scalar>(*compute_, input, noise_weight.value);  // [N, E]
      noise_.resize(rows, experts_count);                              // [N, E] standard normal draws
      for (Index i = 0; i < noise_.size(); ++i) noise_.data()[i] = static_cast<Scalar>(rng->normal());
      logits_.array() += noise_.array() * (softplus(noise_pre_.array()) + Scalar(0.01));
    }
    noisy_ = noisy;
    probabilities_ = logits_;                     // [N, E]
    log_normalizers_.resize(rows);                // [N] for the z-loss
    parallel_ranges(*compute_, rows, kRowGrain, [&](Index first, Index count, int) {
      for (Index t = first; t < first + count; ++t)
        log_normalizers_(t) = detail::softmax_row_inplace(probabilities_.row(t).data(), experts_count);
    });

    gate_sums_ = ColumnVector<Scalar>::Ones(rows);  // [N]
    choose_per_token(probabilities_, routed_, routing_, sampling ? rng : nullptr, &gate_sums_);
    routed_tokens_ = 0;
    for (char flag : routed_) routed_tokens_ += flag ? 1 : 0;
    compute_aux_losses();
  }

  // Token choice: each routed row's top-k experts (the last sampled_experts slots sampled when
  // rng is given), gates p / S; gate_sums receives S.
  void choose_per_token(const Matrix<Scalar>& probabilities, const std::vector<char>& routed, Routing& routing,
                        Rng* rng, ColumnVector<Scalar>* gate_sums = nullptr) const {
    const Index rows = probabilities.rows(), top_k = config_.top_k;
    routing.experts.assign(static_cast<std::size_t>(rows * top_k), -1);
    routing.tokens.resize(static_cast<std::size_t>(rows * top_k));
    for (Index a = 0; a < rows * top_k; ++a) routing.tokens[static_cast<std::size_t>(a)] = a / top_k;
    routing.gates = Matrix<Scalar>::Zero(rows, top_k);  // [N, k]
    routing.sequence_rows.clear();
    auto choose = [&](Index first, Index count, int) {
      for (Index t = first; t < first + count; ++t) {
        if (!routed[static_cast<std::size_t>(t)]) continue;
        Index* chosen = routing.experts.data() + t * top_k;
        const Scalar* p = probabilities.row(t).data();
        top_k_indices(p, config_.num_experts, top_k - (rng != nullptr ? config_.sampled_experts : 0), chosen);
        if (rng != nullptr) sample_remaining(p, chosen, *rng);
        const Scalar sum = gate_normalizer(p, chosen);
        if (gate_sums != nullptr) (*gate_sums)(t) = sum;
        for (Index j = 0; j < top_k; ++j) routing.gates(t, j) = p[chosen[j]] / sum;
      }
    };
    // Sampling draws from one generator in token order; otherwise tokens choose independently.
    if (rng != nullptr) choose(0, rows, 0);
    else parallel_ranges(*compute_, rows, kRowGrain, choose);
  }

  // The largest load of the batch: the most tokens of one sequence whose top k include one expert.
  Index largest_load(const Matrix<Scalar>& probabilities, const SequenceBatch& batch) const {
    std::vector<Index> chosen(static_cast<std::size_t>(config_.top_k));
    std::vector<Index> loads;  // [E] of one sequence
    Index largest = 0;
    for (Index b = 0; b < batch.batch_size; ++b) {
      loads.assign(static_cast<std::size_t>(config_.num_experts), 0);
      for (Index t = 0; t < batch.length_of(b); ++t) {
        top_k_indices(probabilities.row(b * batch.length + t).data(), config_.num_experts, config_.top_k, chosen.data());
        for (Index e : chosen) largest = std::max(largest, ++loads[static_cast<std::size_t>(e)]);
      }
    }
    return largest;
  }

  // Expert choice: in each sequence, each expert's `capacity` tokens of largest probability (ties
  // to the earlier token), emitted by token and then expert.
  void choose_per_expert(const Matrix<Scalar>& probabilities, const SequenceBatch& batch, Routing& routing) const {
    const Index experts_count = config_.num_experts;
    const Index load = config_.capacity == ExpertCapacity::largest_load ? largest_load(probabilities, batch) : 0;
    auto capacity_of = [&](Index length) {
      if (config_.capacity == ExpertCapacity::fixed || length == 0) return config_.fixed_capacity(length);
      return std::clamp(std::min(load, static_cast<Index>(0.6 * static_cast<double>(length))), Index(1), length);
    };
    routing.experts.clear();
    routing.tokens.clear();
    routing.sequence_rows.assign(1, 0);
    std::vector<Scalar> column;     // [T] one expert's probabilities over the sequence
    std::vector<Index> chosen;      // [C] the positions it takes
    std::vector<char> taken;        // [T*E] position t taken by expert e
    std::vector<Scalar> gates;      // [A]
    for (Index b = 0; b < batch.batch_size; ++b) {
      const Index length = batch.length_of(b), first = b * batch.length, capacity = capacity_of(length);
      taken.assign(static_cast<std::size_t>(length * experts_count), 0);
      column.resize(static_cast<std::size_t>(length));
      chosen.resize(static_cast<std::size_t>(capacity));
      for (Index e = 0; e < experts_count && capacity > 0; ++e) {
        for (Index t = 0; t < length; ++t) column[static_cast<std::size_t>(t)] = probabilities(first + t, e);
        top_k_indices(column.data(), length, capacity, chosen.data());
        for (Index t : chosen) taken[static_cast<std::size_t>(t * experts_count + e)] = 1;
      }
      for (Index t = 0; t < length; ++t) {
        for (Index e = 0; e < experts_count; ++e) {
          if (!taken[static_cast<std::size_t>(t * experts_count + e)]) continue;
          routing.experts.push_back(e);
          routing.tokens.push_back(first + t);
          gates.push_back(probabilities(first + t, e));
        }
      }
      routing.sequence_rows.push_back(static_cast<Index>(routing.experts.size()));
    }
    routing.gates = Eigen::Map<const Matrix<Scalar>>(gates.data(), static_cast<Index>(gates.size()), 1);
  }

  // S in g = p / S: the chosen experts' probability mass when renormalized, else 1.
  Scalar gate_normalizer(const Scalar* p, const Index* chosen) const {
    if (config_.gate_normalization == GateNormalization::raw) return Scalar(1);
    Scalar sum = 0;
    for (Index j = 0; j < config_.top_k; ++j) sum += p[chosen[j]];
    return sum;
  }

  template <typename ArrayLike>
  static auto softplus(const ArrayLike& x) {
    // log(1 + e^x) without overflow: max(x, 0) + log(1 + e^-|x|)
    return x.max(Scalar(0)) + (Scalar(1) + (-x.abs()).exp()).log();
  }

  // Fills the last sampled_experts slots by sampling without replacement from the probabilities
  // of the experts not yet chosen.
  void sample_remaining(const Scalar* p, Index* chosen, Rng& rng) const {
    const Index fixed = config_.top_k - config_.sampled_experts;
    for (Index slot = fixed; slot < config_.top_k; ++slot) {
      double remaining = 0.0;
      auto is_chosen = [&](Index e) {
        for (Index s = 0; s < slot; ++s)
          if (chosen[s] == e) return true;
        return false;
      };
      for (Index e = 0; e < config_.num_experts; ++e)
        if (!is_chosen(e)) remaining += static_cast<double>(p[e]);
      double draw = rng.uniform() * remaining;
      Index pick = -1;
      for (Index e = 0; e < config_.num_experts; ++e) {
        if (is_chosen(e)) continue;
        pick = e;  // the last free expert absorbs rounding
        draw -= static_cast<double>(p[e]);
        if (draw < 0.0) break;
      }
      chosen[slot] = pick;
    }
  }

  void compute_aux_losses() {
    const Index experts_count = config_.num_experts;
    fractions_.assign(static_cast<std::size_t>(experts_count), Scalar(0));
    if (config_.mode == RoutingMode::expert_choice) {
      load_balance_loss_ = z_loss_ = 0;
      return;
    }
    for (Index t = 0; t < logits_.rows(); ++t)
      if (!routed_[t]) log_normalizers_(t) = 0;  // padding takes no part in the z-loss
    load_balance_loss_ = 0;
    z_loss_ = 0;
    if (routed_tokens_ == 0) return;
    for (Index expert : routing_.experts)
      if (expert >= 0) fractions_[static_cast<std::size_t>(expert)] += Scalar(1);
    for (Scalar& fraction : fractions_) fraction /= static_cast<Scalar>(routed_tokens_ * config_.top_k);
    RowVector<Scalar> mean_probability = RowVector<Scalar>::Zero(experts_count);  // [E]
    for (Index t = 0; t < logits_.rows(); ++t) {
      if (!routed_[t]) continue;
      mean_probability += probabilities_.row(t);
      z_loss_ += log_normalizers_(t) * log_normalizers_(t);
    }
    mean_probability /= static_cast<Scalar>(routed_tokens_);
    z_loss_ /= static_cast<Scalar>(routed_tokens_);
    for (Index e = 0; e < experts_count; ++e) load_balance_loss_ += fractions_[e] * mean_probability(e);
    load_balance_loss_ *= static_cast<Scalar>(experts_count);
  }

  RouterConfig config_;
  bool training_ = true;
  static constexpr Index kRowGrain = 64;  // rows per thread at least: below, waking one costs more

  ComputePtr compute_ = Compute::standard();
  bool noisy_ = false;
  Matrix<Scalar> input_;                // [N, d_model]
  std::vector<char> routed_;            // N
  Matrix<Scalar> logits_;               // [N, E] (noisy in training with noisy gating)
  Matrix<Scalar> noise_pre_;            // [N, E] x Wn^T
  Matrix<Scalar> noise_;                // [N, E] the N(0,1) draws
  Matrix<Scalar> probabilities_;        // [N, E]
  Routing routing_;                     // the last forward's assignments
  ColumnVector<Scalar> gate_sums_;      // [N] the renormaliser S (1 for raw gates)
  ColumnVector<Scalar> log_normalizers_;  // [N] logsumexp of the logits
  std::vector<Scalar> fractions_;       // [E] f_i
  Index routed_tokens_ = 0;
  Scalar load_balance_loss_ = 0;
  Scalar z_loss_ = 0;
};

}  // namespace moa
