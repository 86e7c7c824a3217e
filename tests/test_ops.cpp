// The op table's rows and the checks every row gets (see op_table.hpp).
#include "attention_support.hpp"
#include "op_table.hpp"

#include "moa/io/safetensors.hpp"
#include "moa/models.hpp"

#include <chrono>
#include <cstdio>

using namespace moa_test;

namespace {

template <typename Scalar>
using M = moa::Matrix<Scalar>;

// ---- the rows ----------------------------------------------------------------------------------

template <typename Scalar, bool with_bias>
Op<Scalar> make_linear(std::uint64_t seed) {
  moa::Rng rng(seed);
  Op<Scalar> op;
  auto layer = own(op, std::make_shared<moa::Linear<Scalar>>(5, 4, with_bias, rng));
  if (with_bias) moa::init_normal(layer->bias.value, rng, 0.0, 1.0);
  *op.inputs = {random_matrix<Scalar>(3, 5, rng)};
  op.input_names = {"input"};
  op.forward = [layer, inputs = op.inputs] { return layer->forward((*inputs)[0]); };
  op.backward = [layer](const M<Scalar>& grad) { return std::vector<M<Scalar>>{layer->backward(grad)}; };
  return op;
}
template <typename Scalar>
Op<Scalar> make_linear_bias(std::uint64_t seed) { return make_linear<Scalar, true>(seed); }
template <typename Scalar>
Op<Scalar> make_linear_no_bias(std::uint64_t seed) { return make_linear<Scalar, false>(seed); }

template <typename Scalar>
Op<Scalar> make_embedding(std::uint64_t seed) {
  moa::Rng rng(seed);
  Op<Scalar> op;
  auto layer = own(op, std::make_shared<moa::Embedding<Scalar>>(11, 6, rng, 0));
  const moa::TokenIds ids{3, 0, 7, 3, 10};  // a repeat and a padding id
  op.forward = [layer, ids] { return layer->forward(ids); };
  op.backward = [layer](const M<Scalar>& grad) {
    layer->backward(grad);
    return std::vector<M<Scalar>>{};
  };
  return op;
}

// The output projection tied to the embeddings (the models' logits).
template <typename Scalar>
Op<Scalar> make_embedding_project(std::uint64_t seed) {
  moa::Rng rng(seed);
  Op<Scalar> op;
  auto layer = own(op, std::make_shared<moa::Embedding<Scalar>>(11, 6, rng, 0));
  *op.inputs = {random_matrix<Scalar>(4, 6, rng)};
  op.input_names = {"input"};
  op.forward = [layer, inputs = op.inputs] { return layer->project((*inputs)[0]); };
  op.backward = [layer, inputs = op.inputs](const M<Scalar>& grad) {
    return std::vector<M<Scalar>>{layer->project_backward((*inputs)[0], grad)};
  };
  return op;
}

template <typename Scalar>
Op<Scalar> make_layer_norm(std::uint64_t seed) {
  moa::Rng rng(seed);
  Op<Scalar> op;
  auto layer = own(op, std::make_shared<moa::LayerNorm<Scalar>>(6));
  moa::init_normal(layer->weight.value, rng, 1.0, 0.5);
  moa::init_normal(layer->bias.value, rng, 0.0, 0.5);
  *op.inputs = {random_matrix<Scalar>(4, 6, rng)};
  op.input_names = {"input"};
  op.forward = [layer, inputs = op.inputs] { return layer->forward((*inputs)[0]); };
  op.backward = [layer](const M<Scalar>& grad) { return std::vector<M<Scalar>>{layer->backward(grad)}; };
  return op;
}

template <typename Scalar, moa::Activation activation>
Op<Scalar> make_feed_forward(std::uint64_t seed) {
  moa::Rng rng(seed);
  Op<Scalar> op;
  auto layer = own(op, std::make_shared<moa::FeedForward<Scalar>>(5, 7, activation, rng));
  *op.inputs = {random_matrix<Scalar>(4, 5, rng)};
  op.input_names = {"input"};
  op.forward = [layer, inputs = op.inputs] { return layer->forward((*inputs)[0]); };
  op.backward = [layer](const M<Scalar>& grad) { return std::vector<M<Scalar>>{layer->backward(grad)}; };
  return op;
}
template <typename Scalar>
Op<Scalar> make_feed_forward_gelu(std::uint64_t seed) { return make_feed_forward<Scalar, moa::Activation::gelu>(seed); }
template <typename Scalar>
Op<Scalar> make_feed_forward_relu(std::uint64_t seed) { return make_feed_forward<Scalar, moa::Activation::relu>(seed); }

template <typename Scalar>
Op<Scalar> make_dropout(std::uint64_t seed) {
  moa::Rng rng(seed);
  Op<Scalar> op;
  auto layer = std::make_shared<moa::Dropout<Scalar>>(0.3);
  op.owner = layer;
  *op.inputs = {random_matrix<Scalar>(4, 6, rng)};
  op.input_names = {"input"};
  op.forward = [layer, inputs = op.inputs] {
    moa::Rng mask(77);  // the same mask every call
    return layer->forward((*inputs)[0], mask);
  };
  op.backward = [layer](const M<Scalar>& grad) { return std::vector<M<Scalar>>{layer->backward(grad)}; };
  return op;
}

template <typename Scalar>
Op<Scalar> make_masked_softmax(std::uint64_t seed) {
  moa::Rng rng(seed);
  Op<Scalar> op;
  moa::BoolMatrix allowed = moa::BoolMatrix::Constant(3, 5, true);
  allowed(0, 4) = allowed(1, 0) = allowed(1, 2) = false;
  auto probabilities = std::make_shared<M<Scalar>>();
  op.owner = probabilities;
  *op.inputs = {random_matrix<Scalar>(3, 5, rng)};
  op.input_names = {"logits"};
  op.forward = [probabilities, allowed, inputs = op.inputs] {
    return *probabilities = moa::softmax_rows<Scalar>((*inputs)[0], allowed);
  };
  op.backward = [probabilities](const M<Scalar>& grad) {
    return std::vector<M<Scalar>>{moa::softmax_rows_backward<Scalar>(*probabilities, grad)};
  };
  return op;
}

// The loss as a [1, 1] output, with label smoothing and an ignored row.
template <typename Scalar>
Op<Scalar> make_cross_entropy(std::uint64_t seed) {
  moa::Rng rng(seed);
  Op<Scalar> op;
  auto loss = std::make_shared<moa::CrossEntropyLoss<Scalar>>(0.2, 0);
  op.owner = loss;
  const moa::TokenIds targets{0, 5, 1, 2, 3};
  *op.inputs = {random_matrix<Scalar>(5, 6, rng)};
  op.input_names = {"logits"};
  op.forward = [loss, targets, inputs = op.inputs] { return M<Scalar>::Constant(1, 1, loss->forward((*inputs)[0], targets)); };
  op.backward = [loss](const M<Scalar>& grad) { return std::vector<M<Scalar>>{loss->backward(grad(0, 0))}; };
  return op;
}

moa::RouterConfig router_config() {
  moa::RouterConfig config;
  config.model_dim = 4;
  config.num_experts = 5;
  config.top_k = 2;
  config.load_balance_coefficient = 0.3;
  config.z_loss_coefficient = 0.1;
  return config;
}

// The router's gates (and aux losses), with one padding token.
template <typename Scalar>
Op<Scalar> make_router(std::uint64_t seed) {
  moa::Rng rng(seed);
  Op<Scalar> op;
  auto router = own(op, std::make_shared<moa::Router<Scalar>>(router_config(), rng));
  moa::init_normal(router->weight.value, rng, 0.0, 1.0);  // a fresh router ties every expert
  *op.inputs = {random_matrix<Scalar>(5, 4, rng)};
  op.input_names = {"input"};
  op.forward = [router, inputs = op.inputs] {
    router->forward((*inputs)[0], {1, 1, 0, 1, 1});
    return router->gates();
  };
  op.backward = [router](const M<Scalar>& grad) { return std::vector<M<Scalar>>{router->backward(grad)}; };
  op.aux_loss = [router] { return static_cast<double>(router->aux_loss()); };
  return op;
}

moa::MixtureOfAttentionConfig moa_config() {
  moa::MixtureOfAttentionConfig config;
  config.model_dim = 6;
  config.num_experts = 4;
  config.top_k = 2;
  config.head_dim = 3;
  config.load_balance_coefficient = 0.1;
  config.z_loss_coefficient = 0.01;
  return config;
}

// An attention layer on two padded sequences: self-attention (causal unless told) or cross-attention.
template <typename Attention, bool self, bool causal = self>
Op<typename Attention::Scalar> make_attention(std::shared_ptr<Attention> layer, moa::Rng& rng) {
  using Scalar = typename Attention::Scalar;
  Op<Scalar> op;
  own(op, layer);
  const auto query_batch = moa::SequenceBatch::padded(4, {4, 3});
  const auto key_batch = moa::SequenceBatch::padded(5, {2, 5});
  *op.inputs = {random_matrix<Scalar>(query_batch.rows(), 6, rng)};
  op.input_names = {"query"};
  if (!self) {
    op.inputs->push_back(random_matrix<Scalar>(key_batch.rows(), 6, rng));
    op.input_names.push_back("key_value");
  }
  op.forward = [layer, query_batch, key_batch, inputs = op.inputs] {
    moa::Rng unused(0);
    if (self) return moa::forward_self_attention(*layer, (*inputs)[0], query_batch, causal, unused);
    return moa::forward_attention(*layer, (*inputs)[0], query_batch, (*inputs)[1], key_batch, false, unused);
  };
  op.backward = [layer](const M<Scalar>& grad) {
    if (self) return std::vector<M<Scalar>>{layer->backward_self(grad)};
    moa::AttentionGradients<Scalar> grads = layer->backward(grad);
    return std::vector<M<Scalar>>{grads.query, grads.key_value};
  };
  op.aux_loss = [layer] { return static_cast<double>(layer->aux_loss()); };
  return op;
}

template <typename Scalar, bool self>
Op<Scalar> make_moa(std::uint64_t seed) {
  moa::Rng rng(seed);
  auto layer = std::make_shared<moa::MixtureOfAttention<Scalar>>(moa_config(), rng);
  moa::init_normal(layer->router.weight.value, rng, 0.0, 1.0);
  return make_attention<moa::MixtureOfAttention<Scalar>, self>(layer, rng);
}
template <typename Scalar>
Op<Scalar> make_moa_self(std::uint64_t seed) { return make_moa<Scalar, true>(seed); }
template <typename Scalar>
Op<Scalar> make_moa_cross(std::uint64_t seed) { return make_moa<Scalar, false>(seed); }

// Expert choice: non-causal self-attention or cross-attention.
template <typename Scalar, bool self>
Op<Scalar> make_moa_expert_choice(std::uint64_t seed) {
  moa::Rng rng(seed);
  auto config = moa_config();
  config.mode = moa::RoutingMode::expert_choice;
  config.capacity_factor = 1.5;
  config.load_balance_coefficient = config.z_loss_coefficient = 0.0;
  auto layer = std::make_shared<moa::MixtureOfAttention<Scalar>>(config, rng);
  moa::init_normal(layer->router.weight.value, rng, 0.0, 1.0);
  return make_attention<moa::MixtureOfAttention<Scalar>, self, false>(layer, rng);
}
template <typename Scalar>
Op<Scalar> make_moa_expert_choice_self(std::uint64_t seed) { return make_moa_expert_choice<Scalar, true>(seed); }
template <typename Scalar>
Op<Scalar> make_moa_expert_choice_cross(std::uint64_t seed) { return make_moa_expert_choice<Scalar, false>(seed); }

// MoH: 2 shared heads and top-2 of 3 routed heads.
template <typename Scalar, bool self>
Op<Scalar> make_moh(std::uint64_t seed) {
  moa::Rng rng(seed);
  moa::MixtureOfHeadsConfig config;
  config.model_dim = 6;
  config.shared_heads = 2;
  config.routed_heads = 3;
  config.top_k = 2;
  config.head_dim = 3;
  config.z_loss_coefficient = 0.01;
  config.causal_block = 2;
  auto layer = std::make_shared<moa::MixtureOfHeads<Scalar>>(make_moh_layer<Scalar>(config, rng));
  return make_attention<moa::MixtureOfHeads<Scalar>, self>(layer, rng);
}
template <typename Scalar>
Op<Scalar> make_moh_self(std::uint64_t seed) { return make_moh<Scalar, true>(seed); }
template <typename Scalar>
Op<Scalar> make_moh_cross(std::uint64_t seed) { return make_moh<Scalar, false>(seed); }

template <typename Scalar, bool self>
Op<Scalar> make_mha(std::uint64_t seed) {
  moa::Rng rng(seed);
  auto layer = std::make_shared<moa::MultiHeadAttention<Scalar>>(moa::MultiHeadAttentionConfig{6, 2, 3}, rng);
  return make_attention<moa::MultiHeadAttention<Scalar>, self>(layer, rng);
}
template <typename Scalar>
Op<Scalar> make_mha_self(std::uint64_t seed) { return make_mha<Scalar, true>(seed); }
template <typename Scalar>
Op<Scalar> make_mha_cross(std::uint64_t seed) { return make_mha<Scalar, false>(seed); }

// The kernel alone: 2 query rows per position (MoA's multi-query form), causal, padded keys.
template <typename Scalar>
Op<Scalar> make_attention_kernel(std::uint64_t seed) {
  moa::Rng rng(seed);
  Op<Scalar> op;
  moa::AttentionLayout layout;
  layout.positions = 4;
  layout.rows_per_position = 2;
  layout.key_length = 4;
  layout.causal = true;
  layout.block_positions = 3;
  auto probabilities = std::make_shared<M<Scalar>>(M<Scalar>::Zero(8, 5));
  op.owner = probabilities;
  *op.inputs = {random_matrix<Scalar>(8, 3, rng), random_matrix<Scalar>(5, 3, rng), random_matrix<Scalar>(5, 3, rng)};
  op.input_names = {"queries", "keys", "values"};
  op.forward = [probabilities, layout, inputs = op.inputs] {
    M<Scalar> output = M<Scalar>::Zero(8, 3);
    moa::attention_forward<Scalar>((*inputs)[0], (*inputs)[1], (*inputs)[2], layout, *probabilities, output);
    return output;
  };
  op.backward = [probabilities, layout, inputs = op.inputs](const M<Scalar>& grad) {
    std::vector<M<Scalar>> grads{M<Scalar>::Zero(8, 3), M<Scalar>::Zero(5, 3), M<Scalar>::Zero(5, 3)};
    moa::attention_backward<Scalar>((*inputs)[0], (*inputs)[1], (*inputs)[2], *probabilities, grad, layout, grads[0], grads[1],
                                    grads[2]);
    return grads;
  };
  return op;
}

// The kernel with a span (sink 1 + window 3) over rows at their own positions (a subset of the
// sequence, as one expert's rows): blocks of 2 rows compute the sink and the band.
template <typename Scalar>
Op<Scalar> make_attention_kernel_span(std::uint64_t seed) {
  moa::Rng rng(seed);
  Op<Scalar> op;
  struct Layout {
    moa::AttentionSpan span = moa::AttentionSpan::streaming(1, 3);
    std::vector<moa::Index> positions{0, 1, 3, 4, 6, 8, 9};
    moa::AttentionLayout layout;
    M<Scalar> probabilities = M<Scalar>::Zero(7, 10);
  };
  auto state = std::make_shared<Layout>();
  state->layout.positions = 7;
  state->layout.key_length = 10;
  state->layout.causal = true;
  state->layout.block_positions = 2;
  state->layout.row_positions = state->positions.data();
  state->layout.span = &state->span;
  op.owner = state;
  *op.inputs = {random_matrix<Scalar>(7, 3, rng), random_matrix<Scalar>(10, 3, rng), random_matrix<Scalar>(10, 3, rng)};
  op.input_names = {"queries", "keys", "values"};
  op.forward = [state, inputs = op.inputs] {
    M<Scalar> output = M<Scalar>::Zero(7, 3);
    moa::attention_forward<Scalar>((*inputs)[0], (*inputs)[1], (*inputs)[2], state->layout, state->probabilities, output);
    return output;
  };
  op.backward = [state, inputs = op.inputs](const M<Scalar>& grad) {
    std::vector<M<Scalar>> grads{M<Scalar>::Zero(7, 3), M<Scalar>::Zero(10, 3), M<Scalar>::Zero(10, 3)};
    moa::attention_backward<Scalar>((*inputs)[0], (*inputs)[1], (*inputs)[2], state->probabilities, grad, state->layout,
                                    grads[0], grads[1], grads[2]);
    return grads;
  };
  return op;
}

moa::TransformerConfig layer_config(moa::NormPlacement norm) {
  moa::TransformerConfig config;
  config.vocab_size = 9;
  config.model_dim = 6;
  config.ffn_dim = 8;
  config.encoder_layers = 1;
  config.decoder_layers = 1;
  config.norm = norm;
  config.activation = moa::Activation::gelu;
  config.attention = moa::AttentionSpec::parse("moa:2K3E3D");
  return config;
}

template <typename Scalar, moa::NormPlacement norm>
Op<Scalar> make_encoder_layer(std::uint64_t seed) {
  using Layer = moa::TransformerEncoderLayer<moa::MixtureOfAttention<Scalar>>;
  moa::Rng rng(seed);
  Op<Scalar> op;
  auto layer = own(op, std::make_shared<Layer>(layer_config(norm), rng));
  moa::init_normal(layer->self_attn.router.weight.value, rng, 0.0, 1.0);
  const auto batch = moa::SequenceBatch::padded(4, {4, 2});
  *op.inputs = {random_matrix<Scalar>(batch.rows(), 6, rng)};
  op.input_names = {"input"};
  op.forward = [layer, batch, inputs = op.inputs] {
    moa::Rng unused(0);
    return layer->forward((*inputs)[0], batch, unused);
  };
  op.backward = [layer](const M<Scalar>& grad) { return std::vector<M<Scalar>>{layer->backward(grad)}; };
  op.aux_loss = [layer] { return static_cast<double>(layer->aux_loss()); };
  return op;
}
template <typename Scalar>
Op<Scalar> make_encoder_layer_post(std::uint64_t seed) { return make_encoder_layer<Scalar, moa::NormPlacement::post>(seed); }

template <typename Scalar>
Op<Scalar> make_decoder_layer_pre(std::uint64_t seed) {
  using Layer = moa::TransformerDecoderLayer<moa::MixtureOfAttention<Scalar>>;
  moa::Rng rng(seed);
  Op<Scalar> op;
  auto layer = own(op, std::make_shared<Layer>(layer_config(moa::NormPlacement::pre), rng));
  moa::init_normal(layer->self_attn.router.weight.value, rng, 0.0, 1.0);
  moa::init_normal(layer->encoder_attn.router.weight.value, rng, 0.0, 1.0);
  const auto batch = moa::SequenceBatch::padded(3, {3, 2});
  const auto memory_batch = moa::SequenceBatch::padded(4, {4, 1});
  *op.inputs = {random_matrix<Scalar>(batch.rows(), 6, rng), random_matrix<Scalar>(memory_batch.rows(), 6, rng)};
  op.input_names = {"input", "memory"};
  op.forward = [layer, batch, memory_batch, inputs = op.inputs] {
    moa::Rng unused(0);
    return layer->forward((*inputs)[0], batch, (*inputs)[1], memory_batch, unused);
  };
  op.backward = [layer](const M<Scalar>& grad) {
    auto grads = layer->backward(grad);
    return std::vector<M<Scalar>>{grads.input, grads.memory};
  };
  op.aux_loss = [layer] { return static_cast<double>(layer->aux_loss()); };
  return op;
}

MOA_OP_CASE(linear, "Linear", make_linear_bias);
MOA_OP_CASE(linear_no_bias, "Linear without bias", make_linear_no_bias);
MOA_OP_CASE(embedding, "Embedding lookup (padding, repeats)", make_embedding);
MOA_OP_CASE(embedding_project, "Embedding::project (tied output)", make_embedding_project);
MOA_OP_CASE(layer_norm, "LayerNorm", make_layer_norm);
MOA_OP_CASE(feed_forward_gelu, "FeedForward GELU", make_feed_forward_gelu);
MOA_OP_CASE(feed_forward_relu, "FeedForward ReLU", make_feed_forward_relu);
MOA_OP_CASE(dropout, "Dropout (fixed mask)", make_dropout);
MOA_OP_CASE(masked_softmax, "softmax_rows with a mask", make_masked_softmax);
MOA_OP_CASE(cross_entropy, "CrossEntropyLoss (smoothing, ignored row)", make_cross_entropy);
MOA_OP_CASE(router, "Router gates + aux losses", make_router);
MOA_OP_CASE(attention_kernel, "attention kernel (2 rows/position, causal)", make_attention_kernel);
MOA_OP_CASE(moa_self, "MixtureOfAttention self, causal, padded", make_moa_self);
MOA_OP_CASE(moa_cross, "MixtureOfAttention cross, padded", make_moa_cross);
MOA_OP_CASE(moa_expert_choice_self, "MixtureOfAttention expert choice, self, padded", make_moa_expert_choice_self);
MOA_OP_CASE(moa_expert_choice_cross, "MixtureOfAttention expert choice, cross, padded", make_moa_expert_choice_cross);
MOA_OP_CASE(attention_kernel_span, "attention kernel, sink + window, rows at their own positions",
            make_attention_kernel_span);
MOA_OP_CASE(moh_self, "MixtureOfHeads self, causal, padded", make_moh_self);
MOA_OP_CASE(moh_cross, "MixtureOfHeads cross, padded", make_moh_cross);
MOA_OP_CASE(mha_self, "MultiHeadAttention self, causal, padded", make_mha_self);
MOA_OP_CASE(mha_cross, "MultiHeadAttention cross, padded", make_mha_cross);
MOA_OP_CASE(encoder_layer, "TransformerEncoderLayer<MoA> post-LN", make_encoder_layer_post);
MOA_OP_CASE(decoder_layer, "TransformerDecoderLayer<MoA> pre-LN", make_decoder_layer_pre);

// ---- the checks every row gets -----------------------------------------------------------------

template <typename Scalar>
std::vector<MatrixD> as_double(const std::vector<M<Scalar>>& matrices) {
  std::vector<MatrixD> result;
  for (const auto& matrix : matrices) result.push_back(matrix.template cast<double>());
  return result;
}

template <typename Scalar>
std::vector<MatrixD> parameter_grads(const moa::ParameterList<Scalar>& parameters) {
  std::vector<MatrixD> grads;
  for (const auto& entry : parameters) grads.push_back(entry.grad().template cast<double>());
  return grads;
}

}  // namespace

TEST_CASE("op table: gradient check of every parameter and input, in double", "[ops][gradient]") {
  for (const OpCase& op_case : op_cases()) {
    DYNAMIC_SECTION(op_case.name) {
      Op<double> op = op_case.make_double(11);
      const MatrixD output = op.forward();
      moa::Rng rng(12);
      const MatrixD output_weights = random_matrix(output.rows(), output.cols(), rng);  // R
      const auto parameters = op.parameters();
      parameters.zero_grad();
      const std::vector<MatrixD> input_grads = op.backward(output_weights);
      REQUIRE(input_grads.size() == op.inputs->size());
      const std::vector<MatrixD> analytic = parameter_grads(parameters);
      std::vector<moa::GradientCheckTensor> tensors;
      auto may_be_zero = [&](const std::string& name) {
        return std::find(op_case.may_be_zero.begin(), op_case.may_be_zero.end(), name) != op_case.may_be_zero.end();
      };
      for (std::size_t i = 0; i < op.inputs->size(); ++i)
        tensors.push_back({op.input_names[i], &(*op.inputs)[i], &input_grads[i], may_be_zero(op.input_names[i])});
      for (std::size_t i = 0; i < parameters.size(); ++i)
        tensors.push_back({parameters[i].name, parameters[i].value(), &analytic[i], may_be_zero(parameters[i].name)});
      moa::GradientCheckOptions options;
      options.tolerance = op_case.gradient_tolerance;
      REQUIRE_GRADIENTS_OK(moa::check_gradients(
          [&] { return op.forward().cwiseProduct(output_weights).sum() + op.aux_loss(); }, tensors, options));
    }
  }
}

TEST_CASE("op table: float forward and backward agree with double", "[ops][float]") {
  for (const OpCase& op_case : op_cases()) {
    DYNAMIC_SECTION(op_case.name) {
      Op<double> reference = op_case.make_double(21);
      Op<float> op = op_case.make_float(21);  // the same draws, rounded to float
      const MatrixD expected = reference.forward();
      const MatrixF actual = op.forward();
      REQUIRE(relative_error(actual.cast<double>(), expected) < op_case.float_tolerance);
      moa::Rng rng(22);
      const MatrixD grad_output = random_matrix(expected.rows(), expected.cols(), rng);
      reference.parameters().zero_grad();
      op.parameters().zero_grad();
      const auto expected_inputs = reference.backward(grad_output);
      const auto actual_inputs = as_double(op.backward(grad_output.cast<float>()));
      for (std::size_t i = 0; i < expected_inputs.size(); ++i) {
        INFO(reference.input_names[i]);
        REQUIRE(relative_error(actual_inputs[i], expected_inputs[i]) < 10 * op_case.float_tolerance);
      }
      const auto expected_parameters = parameter_grads(reference.parameters());
      const auto actual_parameters = parameter_grads(op.parameters());
      for (std::size_t i = 0; i < expected_parameters.size(); ++i) {
        INFO(reference.parameters()[i].name);
        REQUIRE(relative_error(actual_parameters[i], expected_parameters[i]) < 10 * op_case.float_tolerance);
      }
    }
  }
}

TEST_CASE("op table: parameters survive a safetensors round trip; forwards repeat exactly", "[ops][safetensors]") {
  for (const OpCase& op_case : op_cases()) {
    DYNAMIC_SECTION(op_case.name) {
      Op<float> saved = op_case.make_float(31);
      const MatrixF output = saved.forward();
      REQUIRE(saved.forward() == output);  // deterministic
      if (saved.parameters().empty()) continue;
      const std::string path = temporary_path("op_table.safetensors");
      moa::save_safetensors(path, saved.parameters(), moa::DType::F32);
      Op<float> loaded = op_case.make_float(32);  // other weights, then the saved ones
      *loaded.inputs = *saved.inputs;
      moa::load_safetensors(path, loaded.parameters());
      REQUIRE(loaded.forward() == output);
      std::remove(path.c_str());
    }
  }
}

// Not run by default: `moa_tests "[.perf]"` times each row's float forward and backward.
TEST_CASE("op table: time per row", "[.perf]") {
  for (const OpCase& op_case : op_cases()) {
    Op<float> op = op_case.make_float(41);
    const MatrixF output = op.forward();
    const MatrixF grad = MatrixF::Ones(output.rows(), output.cols());
    const int repeats = 2000;
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < repeats; ++i) {
      op.forward();
      op.backward(grad);
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("%-48s %9.2f us per forward+backward\n", op_case.name.c_str(), 1e6 * seconds / repeats);
  }
}
