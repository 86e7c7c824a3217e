// moa/attention_interface.hpp - what an attention kind provides, so that the models (and anything
// generic over attention) take MixtureOfAttention, MultiHeadAttention or a new kind alike.
//
// An attention kind A with A::Scalar = S has, with Matrix = Matrix<S>:
//   Index model_dim() const;  bool training() const;  void set_training(bool);
//   void set_compute(ComputePtr);
//   Matrix forward(query, query_batch, key_value, key_batch, bool causal[, Rng&]);
//   Matrix forward_self(input, batch, bool causal[, Rng&]);
//   AttentionGradients<S> backward(grad_output);       // after forward: both inputs' gradients
//   Matrix backward_self(grad_output);                 // after forward_self: their sum
//   Matrix infer(query, query_batch, key_value, key_batch, bool causal) const;
//                                                      // evaluation's forward, keeping nothing
//   KVCache<S> make_self_cache(Index batch_size, Index capacity) const;
//   KVCache<S> make_cross_cache(memory, memory_batch) const;
//   Matrix step(input, KVCache<S>&) const;             // decoding: the cache is the state
//   S aux_loss() const;                                // 0 for kinds without one
//   double last_forward_flops() const;                 // in the units of moa/attention_cost.hpp
//   void collect_parameters(ParameterList<S>&, const std::string& prefix);
// The Rng convention is the library's: a kind that may draw random numbers in training (MoA's
// noisy gating and sampled experts) takes Rng& as the last argument of forward and forward_self;
// a kind that never draws takes none. forward_attention and forward_self_attention call either.
#pragma once

#include "moa/attention_kernel.hpp"
#include "moa/gemm.hpp"
#include "moa/kv_cache.hpp"
#include "moa/parameter.hpp"
#include "moa/random.hpp"
#include "moa/sequence_batch.hpp"
#include "moa/tensor.hpp"

#include <string>
#include <type_traits>
#include <utility>

namespace moa {

namespace detail {

// The detection idiom: Op<Args...> is detected when it is well-formed, with its type.
struct NotDetected {};
template <typename AlwaysVoid, template <typename...> class Op, typename... Args>
struct Detector {
  using type = NotDetected;
};
template <template <typename...> class Op, typename... Args>
struct Detector<std::void_t<Op<Args...>>, Op, Args...> {
  using type = Op<Args...>;
};
template <typename Expected, template <typename...> class Op, typename... Args>
constexpr bool detected_as = std::is_same_v<typename Detector<void, Op, Args...>::type, Expected>;

template <typename A>
using MatrixOf = Matrix<typename A::Scalar>;
template <typename A>
using ForwardOp = decltype(std::declval<A&>().forward(std::declval<const MatrixOf<A>&>(), std::declval<const SequenceBatch&>(),
                                                      std::declval<const MatrixOf<A>&>(), std::declval<const SequenceBatch&>(), true));
template <typename A>
using ForwardRngOp =
    decltype(std::declval<A&>().forward(std::declval<const MatrixOf<A>&>(), std::declval<const SequenceBatch&>(),
                                        std::declval<const MatrixOf<A>&>(), std::declval<const SequenceBatch&>(), true,
                                        std::declval<Rng&>()));
template <typename A>
using ForwardSelfOp =
    decltype(std::declval<A&>().forward_self(std::declval<const MatrixOf<A>&>(), std::declval<const SequenceBatch&>(), true));
template <typename A>
using ForwardSelfRngOp = decltype(std::declval<A&>().forward_self(
    std::declval<const MatrixOf<A>&>(), std::declval<const SequenceBatch&>(), true, std::declval<Rng&>()));
template <typename A>
using BackwardOp = decltype(std::declval<A&>().backward(std::declval<const MatrixOf<A>&>()));
template <typename A>
using BackwardSelfOp = decltype(std::declval<A&>().backward_self(std::declval<const MatrixOf<A>&>()));
template <typename A>
using InferOp = decltype(std::declval<const A&>().infer(std::declval<const MatrixOf<A>&>(), std::declval<const SequenceBatch&>(),
                                                        std::declval<const MatrixOf<A>&>(), std::declval<const SequenceBatch&>(), true));
template <typename A>
using MakeSelfCacheOp = decltype(std::declval<const A&>().make_self_cache(Index{}, Index{}));
template <typename A>
using MakeCrossCacheOp =
    decltype(std::declval<const A&>().make_cross_cache(std::declval<const MatrixOf<A>&>(), std::declval<const SequenceBatch&>()));
template <typename A>
using StepOp = decltype(std::declval<const A&>().step(std::declval<const MatrixOf<A>&>(), std::declval<KVCache<typename A::Scalar>&>()));
template <typename A>
using AuxLossOp = decltype(std::declval<const A&>().aux_loss());
template <typename A>
using FlopsOp = decltype(std::declval<const A&>().last_forward_flops());
template <typename A>
using ModelDimOp = decltype(std::declval<const A&>().model_dim());
template <typename A>
using TrainingOp = decltype(std::declval<const A&>().training());
template <typename A>
using SetTrainingOp = decltype(std::declval<A&>().set_training(true));
template <typename A>
using SetComputeOp = decltype(std::declval<A&>().set_compute(std::declval<ComputePtr>()));
template <typename A>
using CollectOp = decltype(std::declval<A&>().collect_parameters(std::declval<ParameterList<typename A::Scalar>&>(),
                                                                 std::declval<const std::string&>()));
template <typename A>
using ScalarOf = typename A::Scalar;

template <typename A>
constexpr bool has_attention_interface() {
  if constexpr (!std::is_floating_point_v<typename Detector<void, ScalarOf, A>::type>) {
    return false;
  } else {
    using S = typename A::Scalar;
    return (detected_as<Matrix<S>, ForwardOp, A> || detected_as<Matrix<S>, ForwardRngOp, A>) &&
           (detected_as<Matrix<S>, ForwardSelfOp, A> || detected_as<Matrix<S>, ForwardSelfRngOp, A>) &&
           detected_as<AttentionGradients<S>, BackwardOp, A> && detected_as<Matrix<S>, BackwardSelfOp, A> &&
           detected_as<Matrix<S>, InferOp, A> &&
           detected_as<KVCache<S>, MakeSelfCacheOp, A> && detected_as<KVCache<S>, MakeCrossCacheOp, A> &&
           detected_as<Matrix<S>, StepOp, A> && detected_as<S, AuxLossOp, A> && detected_as<double, FlopsOp, A> &&
           detected_as<Index, ModelDimOp, A> && detected_as<bool, TrainingOp, A> && detected_as<void, SetTrainingOp, A> &&
           detected_as<void, SetComputeOp, A> && detected_as<void, CollectOp, A>;
  }
}

}  // namespace detail

// The backward of the key and value projections K = Z Wk^T, V = Z Wv^T that every attention kind
// has (one head for MoA, h for MHA and MoH): grad_keys, grad_values: [rows, width]. Accumulates both
// weight gradients and adds the gradient of Z into grad_key_value: [rows, d_model] (a self-attention
// layer's query gradient: no second matrix to allocate, fault in and add).
template <typename Scalar>
void key_value_backward_into(const Compute& compute, const Matrix<Scalar>& grad_keys, const Matrix<Scalar>& grad_values,
                             const Matrix<Scalar>& key_value, Parameter<Scalar>& k_proj, Parameter<Scalar>& v_proj,
                             Matrix<Scalar>& grad_key_value) {
  MOA_CHECK(grad_key_value.rows() == key_value.rows() && grad_key_value.cols() == key_value.cols(),
            "moa::key_value_backward_into", "grad_key_value is ", detail::shape_of(grad_key_value),
            " for key_value of ", detail::shape_of(key_value));
  gemm<Scalar>(compute, grad_keys, Transpose::yes, key_value, Transpose::no, k_proj.grad, true);
  gemm<Scalar>(compute, grad_values, Transpose::yes, key_value, Transpose::no, v_proj.grad, true);
  gemm<Scalar>(compute, grad_keys, Transpose::no, k_proj.value, Transpose::no, grad_key_value, true);
  gemm<Scalar>(compute, grad_values, Transpose::no, v_proj.value, Transpose::no, grad_key_value, true);
}

// As key_value_backward_into, returning the gradient of Z: [rows, d_model].
template <typename Scalar>
Matrix<Scalar> key_value_backward(const Compute& compute, const Matrix<Scalar>& grad_keys,
                                  const Matrix<Scalar>& grad_values, const Matrix<Scalar>& key_value,
                                  Parameter<Scalar>& k_proj, Parameter<Scalar>& v_proj) {
  Matrix<Scalar> grad_key_value(key_value.rows(), key_value.cols());  // [rows, d_model]
  gemm<Scalar>(compute, grad_keys, Transpose::yes, key_value, Transpose::no, k_proj.grad, true);
  gemm<Scalar>(compute, grad_values, Transpose::yes, key_value, Transpose::no, v_proj.grad, true);
  gemm<Scalar>(compute, grad_keys, Transpose::no, k_proj.value, Transpose::no, grad_key_value);
  gemm<Scalar>(compute, grad_values, Transpose::no, v_proj.value, Transpose::no, grad_key_value, true);
  return grad_key_value;
}

// True when A provides the whole attention interface above.
template <typename A>
constexpr bool is_attention_v = detail::has_attention_interface<A>();

// True when A's forward takes an Rng (it may draw random numbers in training).
template <typename A>
constexpr bool attention_takes_rng_v = detail::detected_as<Matrix<typename A::Scalar>, detail::ForwardSelfRngOp, A>;

// The forward of any attention kind; rng goes to the kinds that take one.
template <typename Attention>
Matrix<typename Attention::Scalar> forward_attention(Attention& attention, const Matrix<typename Attention::Scalar>& query,
                                                     const SequenceBatch& query_batch,
                                                     const Matrix<typename Attention::Scalar>& key_value,
                                                     const SequenceBatch& key_batch, bool causal, Rng& rng) {
  static_assert(is_attention_v<Attention>, "not an attention kind: see moa/attention_interface.hpp");
  if constexpr (attention_takes_rng_v<Attention>) return attention.forward(query, query_batch, key_value, key_batch, causal, rng);
  else return attention.forward(query, query_batch, key_value, key_batch, causal);
}

template <typename Attention>
Matrix<typename Attention::Scalar> forward_self_attention(Attention& attention,
                                                          const Matrix<typename Attention::Scalar>& input,
                                                          const SequenceBatch& batch, bool causal, Rng& rng) {
  static_assert(is_attention_v<Attention>, "not an attention kind: see moa/attention_interface.hpp");
  if constexpr (attention_takes_rng_v<Attention>) return attention.forward_self(input, batch, causal, rng);
  else return attention.forward_self(input, batch, causal);
}

}  // namespace moa
