#include "support.hpp"

#include "moa/text/batching.hpp"
#include "moa/io/safetensors.hpp"
#include "moa/models.hpp"

using namespace moa_test;

namespace {

using MoA = moa::MixtureOfAttention<double>;
using MHA = moa::MultiHeadAttention<double>;
using MoH = moa::MixtureOfHeads<double>;

moa::TransformerConfig tiny_config(const std::string& spec, moa::NormPlacement norm, double dropout = 0.0) {
  moa::TransformerConfig config;
  config.vocab_size = 9;
  config.model_dim = 8;
  config.ffn_dim = 12;
  config.encoder_layers = 1;
  config.decoder_layers = 1;
  config.dropout = dropout;
  config.norm = norm;
  config.activation = moa::Activation::gelu;  // smooth, for finite differences
  config.attention = moa::AttentionSpec::parse(spec);
  return config;
}

// A fresh router ties all experts; finite differences need a clear top-k.
template <typename Scalar>
void randomize_routers(const moa::ParameterList<Scalar>& parameters, moa::Rng& rng) {
  // MoH's shared and group routers choose nothing: gentle, so their softmaxes do not saturate.
  for (const auto& entry : parameters)
    if (entry.name.find("router.weight") != std::string::npos) {
      const bool choosing = entry.name.find("shared_router") == std::string::npos &&
                            entry.name.find("group_router") == std::string::npos;
      auto value = entry.value();
      moa::init_normal(value, rng, 0.0, choosing ? 1.0 : 0.2);
    }
}

// Gradient check of cross-entropy + aux loss over every parameter of a model.
template <typename Model, typename Forward>
moa::GradientCheckResult check_model(Model& model, Forward&& forward, const moa::TokenIds& targets, moa::Index ignore) {
  auto parameters = moa::parameters_of(model);
  moa::CrossEntropyLoss<double> loss(0.1, ignore);
  loss.forward(forward(), targets);
  parameters.zero_grad();
  model.backward(loss.backward());
  std::vector<MatrixD> analytic;
  std::vector<moa::GradientCheckTensor> tensors;
  for (const auto& entry : parameters) analytic.push_back(entry.grad());
  for (std::size_t i = 0; i < parameters.size(); ++i)
    tensors.push_back({parameters[i].name, parameters[i].value(), &analytic[i]});
  return moa::check_gradients([&] { return loss.forward(forward(), targets) + model.aux_loss(); }, tensors);
}

}  // namespace

TEST_CASE("AttentionSpec parses moa:kKeEdD and mha:hHdD and rejects anything else", "[transformer]") {
  const auto moa_spec = moa::AttentionSpec::parse("moa:4K8E64D");
  REQUIRE(moa_spec.kind == moa::AttentionSpec::Kind::moa);
  REQUIRE(moa_spec.top_k == 4);
  REQUIRE(moa_spec.num_experts == 8);
  REQUIRE(moa_spec.head_dim == 64);
  REQUIRE(moa_spec.gates == moa::GateNormalization::renormalized);
  REQUIRE(moa_spec.to_string() == "moa:4K8E64D");
  const auto raw_spec = moa::AttentionSpec::parse("moa:8K8E128D:raw");
  REQUIRE(raw_spec.top_k == 8);
  REQUIRE(raw_spec.gates == moa::GateNormalization::raw);
  REQUIRE(raw_spec.to_string() == "moa:8K8E128D:raw");
  const auto mha_spec = moa::AttentionSpec::parse("mha:8H128D");
  REQUIRE(mha_spec.num_heads == 8);
  REQUIRE(mha_spec.head_dim == 128);
  // Equal FLOPs but for the router and the key/value heads: MoA has one, MHA k.
  REQUIRE(moa::AttentionSpec::parse("moa:4K8E64D").flops_per_token(512, 0) ==
          2.0 * (512.0 * 8 + 2.0 * 4 * 512 * 64 + 2.0 * 512 * 64));
  REQUIRE(moa::AttentionSpec::parse("mha:4H64D").flops_per_token(512, 10) ==
          2.0 * (4.0 * 4 * 512 * 64 + 2.0 * 4 * 10 * 64));
  for (const char* bad : {"moa:4K8E", "mha:4H64", "foo:4H64D", "moa:9K8E64D", "moa:0K8E64D", "moa:4K8E64Dx", "mha:H64D",
                          "moa:4k8e64d", "",
                          "moa:4K8E64D:", "moa:4K8E64D:Raw", "moa:4K8E64D:raw:raw", "mha:4H64D:raw", "moa:4K8E64Draw"}) {
    INFO(bad);
    REQUIRE_MOA_ERROR(moa::AttentionSpec::parse(bad), "AttentionSpec::parse");
  }
  moa::Rng rng(0);
  // The spec's gate normalisation reaches every router of the model.
  moa::Seq2Seq<MoA> raw_model(tiny_config("moa:2K2E4D:raw", moa::NormPlacement::post), rng);
  int sites = 0;
  raw_model.for_each_attention([&](const moa::AttentionSite&, MoA& attention) {
    REQUIRE(attention.router.config().gate_normalization == moa::GateNormalization::raw);
    ++sites;
  });
  REQUIRE(sites > 0);
  REQUIRE_MOA_ERROR(moa::Seq2Seq<MoA>(tiny_config("mha:2H4D", moa::NormPlacement::post), rng),
                    "a MixtureOfAttention model needs a moa: spec");
}

TEST_CASE("Seq2Seq: parameter names follow fairseq", "[transformer]") {
  moa::Rng rng(1);
  moa::Seq2Seq<MoA> model(tiny_config("moa:2K3E4D", moa::NormPlacement::pre), rng);
  const auto parameters = moa::parameters_of(model);
  for (const char* name : {"embed_tokens.weight", "encoder.layers.0.self_attn.router.weight",
                           "encoder.layers.0.self_attn_layer_norm.weight", "encoder.layers.0.fc1.weight",
                           "encoder.layers.0.final_layer_norm.bias", "decoder.layers.0.encoder_attn.q_proj.weight",
                           "decoder.layers.0.encoder_attn_layer_norm.weight", "decoder.layer_norm.weight"}) {
    INFO(name);
    REQUIRE(parameters.find(name) != nullptr);
  }
}

TEST_CASE("Seq2Seq: gradient check end to end, MoA and MHA, post-LN and pre-LN, with dropout", "[transformer][gradient]") {
  moa::Rng rng(2);
  const std::vector<moa::TokenPair> pairs{{{4, 5, 6}, {7, 8}}, {{5}, {4, 6, 7}}};
  const moa::Seq2SeqBatch batch = moa::make_seq2seq_batch(pairs, {0, 1});
  for (const char* spec : {"moa:2K3E4D", "moa-ec:2K3E4D", "moh:1S2K3H4D", "mha:2H4D"}) {
    for (auto norm : {moa::NormPlacement::post, moa::NormPlacement::pre}) {
      for (double dropout : {0.0, 0.1}) {
        INFO(spec << (norm == moa::NormPlacement::pre ? " pre-LN" : " post-LN") << ", dropout " << dropout);
        auto check = [&](auto& model) {
          randomize_routers(moa::parameters_of(model), rng);
          auto forward = [&] {
            moa::Rng dropout_rng(17);  // the same masks in every evaluation
            return model.forward(batch.source, batch.source_batch, batch.target_input, batch.target_batch, dropout_rng);
          };
          REQUIRE_GRADIENTS_OK(check_model(model, forward, batch.target_output, moa::kPadId));
        };
        const auto config = tiny_config(spec, norm, dropout);
        if (config.attention.kind == moa::AttentionSpec::Kind::moa) {
          moa::Seq2Seq<MoA> model(config, rng);
          check(model);
        } else if (config.attention.kind == moa::AttentionSpec::Kind::moh) {
          moa::Seq2Seq<MoH> model(config, rng);
          check(model);
        } else {
          moa::Seq2Seq<MHA> model(config, rng);
          check(model);
        }
      }
    }
  }
}

TEST_CASE("Seq2Seq with per-expert spans in the decoder: they reach its self-attention only; gradient check",
          "[transformer][gradient][span]") {
  moa::Rng rng(5);
  auto config = tiny_config("moa:2K3E4D", moa::NormPlacement::pre);
  config.decoder_spans = {{moa::AttentionSpan::full(), moa::AttentionSpan::streaming(1, 1),
                           moa::AttentionSpan::elastic(0, 1.0, 0.5)}};
  moa::Seq2Seq<MoA> model(config, rng);
  std::vector<std::string> spanned;
  model.for_each_attention([&](const moa::AttentionSite& site, MoA& attention) {
    if (attention.config().has_spans()) spanned.push_back(site.name);
  });
  REQUIRE(spanned == std::vector<std::string>{"decoder.layers.0.self_attn"});
  randomize_routers(moa::parameters_of(model), rng);
  const std::vector<moa::TokenPair> pairs{{{4, 5, 6}, {7, 8, 4, 5}}, {{5}, {4, 6, 7}}};
  const moa::Seq2SeqBatch batch = moa::make_seq2seq_batch(pairs, {0, 1});
  auto forward = [&] {
    moa::Rng dropout_rng(17);
    return model.forward(batch.source, batch.source_batch, batch.target_input, batch.target_batch, dropout_rng);
  };
  REQUIRE_GRADIENTS_OK(check_model(model, forward, batch.target_output, moa::kPadId));
  config.decoder_spans.push_back(config.decoder_spans.front());
  REQUIRE_MOA_ERROR(moa::Seq2Seq<MoA>(config, rng), "decoder_spans has 2 layers for 1 decoder layers");
  config.decoder_spans.pop_back();
  config.attention = moa::AttentionSpec::parse("mha:2H4D");
  REQUIRE_MOA_ERROR(moa::Seq2Seq<MHA>(config, rng), "decoder_spans are per MoA expert");
}

TEST_CASE("MaskedLM: gradient check end to end", "[transformer][gradient]") {
  moa::Rng rng(3);
  const moa::TokenIds ids{4, 5, 3, 6, 7, 8, 3, 0};
  const auto batch = moa::SequenceBatch::padded(4, {4, 3});
  const moa::TokenIds targets{-1, -1, 6, -1, -1, -1, 5, -1};
  auto check = [&](auto& model) {
    randomize_routers(moa::parameters_of(model), rng);
    moa::Rng none(0);
    REQUIRE_GRADIENTS_OK(check_model(model, [&] { return model.forward(ids, batch, none); }, targets, -1));
  };
  for (const char* spec : {"moa:2K3E4D", "moa-ec:2K3E4D", "moh:2S1K3H4D"})
  for (auto norm : {moa::NormPlacement::post, moa::NormPlacement::pre}) {
    INFO(spec);
    if (moa::AttentionSpec::parse(spec).kind == moa::AttentionSpec::Kind::moh) {
      moa::MaskedLM<MoH> model(tiny_config(spec, norm), rng);
      check(model);
    } else {
      moa::MaskedLM<MoA> model(tiny_config(spec, norm), rng);
      check(model);
    }
  }
}

TEST_CASE("Seq2Seq and MaskedLM: infer on a const model equals forward in evaluation", "[transformer][inference]") {
  moa::Rng rng(4);
  const std::vector<moa::TokenPair> pairs{{{4, 5, 6}, {7, 8}}, {{5}, {4, 6, 7}}};
  const moa::Seq2SeqBatch batch = moa::make_seq2seq_batch(pairs, {0, 1});
  for (const char* spec : {"moa:2K3E4D", "moa-ec:2K3E4D", "moh:1S2K3H4D", "mha:2H4D"}) {
    for (auto norm : {moa::NormPlacement::post, moa::NormPlacement::pre}) {
      INFO(spec << (norm == moa::NormPlacement::pre ? " pre-LN" : " post-LN"));
      auto check = [&](auto& translator, auto& language_model) {
        randomize_routers(moa::parameters_of(translator), rng);
        randomize_routers(moa::parameters_of(language_model), rng);
        translator.set_training(false);
        language_model.set_training(false);
        moa::Rng unused(0);
        const MatrixD logits =
            translator.forward(batch.source, batch.source_batch, batch.target_input, batch.target_batch, unused);
        const auto& frozen = translator;
        REQUIRE(frozen.infer(batch.source, batch.source_batch, batch.target_input, batch.target_batch) == logits);
        const MatrixD masked = language_model.forward(batch.source, batch.source_batch, unused);
        const auto& frozen_language_model = language_model;
        REQUIRE(frozen_language_model.infer(batch.source, batch.source_batch) == masked);
        // Inference is evaluation: a model in training mode is refused, not silently switched.
        translator.set_training(true);
        language_model.set_training(true);
        REQUIRE_MOA_ERROR(frozen.infer(batch.source, batch.source_batch, batch.target_input, batch.target_batch),
                          "Seq2Seq::infer: inference is evaluation: call set_training(false) first");
        REQUIRE_MOA_ERROR(frozen_language_model.infer(batch.source, batch.source_batch),
                          "MaskedLM::infer: inference is evaluation");
      };
      const auto config = tiny_config(spec, norm, 0.1);
      if (config.attention.kind == moa::AttentionSpec::Kind::moa) {
        moa::Seq2Seq<MoA> translator(config, rng);
        moa::MaskedLM<MoA> language_model(config, rng);
        check(translator, language_model);
      } else if (config.attention.kind == moa::AttentionSpec::Kind::moh) {
        moa::Seq2Seq<MoH> translator(config, rng);
        moa::MaskedLM<MoH> language_model(config, rng);
        check(translator, language_model);
      } else {
        moa::Seq2Seq<MHA> translator(config, rng);
        moa::MaskedLM<MHA> language_model(config, rng);
        check(translator, language_model);
      }
    }
  }
}

TEST_CASE("Seq2Seq: the synthetic reverse task is learned by MoA and by MHA", "[transformer][convergence]") {
  for (const char* spec : {"moa:2K4E16D", "mha:2H16D"}) {
    INFO(spec);
    moa::Rng rng(4);
    moa::TransformerConfig config;
    config.vocab_size = 12;
    config.model_dim = 32;
    config.ffn_dim = 64;
    config.encoder_layers = 1;
    config.decoder_layers = 1;
    config.norm = moa::NormPlacement::pre;
    config.attention = moa::AttentionSpec::parse(spec);
    const auto pairs = moa::synthetic_reverse_task(2000, 12, 2, 6, rng);
    auto run = [&](auto& model) {
      auto parameters = moa::parameters_of(model);
      moa::Adam<float> adam(parameters, {0.9, 0.98, 1e-9, 0.0, false});
      moa::CrossEntropyLoss<float> loss(0.0, moa::kPadId);
      float last = 0;
      for (int step = 0; step < 400; ++step) {
        std::vector<std::size_t> indices;
        for (int i = 0; i < 32; ++i) indices.push_back(rng.below(pairs.size()));
        const auto batch = moa::make_seq2seq_batch(pairs, indices);
        const auto logits =
            model.forward(batch.source, batch.source_batch, batch.target_input, batch.target_batch, rng);
        last = loss.forward(logits, batch.target_output);
        parameters.zero_grad();
        model.backward(loss.backward());
        adam.step(step < 50 ? 3e-3 * (step + 1) / 50 : 3e-3);
      }
      return last;
    };
    float final_loss = 0;
    if (config.attention.kind == moa::AttentionSpec::Kind::moa) {
      moa::Seq2Seq<moa::MixtureOfAttention<float>> model(config, rng);
      final_loss = run(model);
    } else {
      moa::Seq2Seq<moa::MultiHeadAttention<float>> model(config, rng);
      final_loss = run(model);
    }
    INFO("final loss " << final_loss << " (chance: log 9 = 2.2)");
    REQUIRE(final_loss < 0.3f);
  }
}

TEST_CASE("Transformer models reject bad configurations and inputs", "[transformer][errors]") {
  moa::Rng rng(5);
  auto config = tiny_config("moa:2K3E4D", moa::NormPlacement::post);
  config.encoder_layers = 0;
  REQUIRE_MOA_ERROR(moa::Seq2Seq<MoA>(config, rng), "Seq2Seq: needs encoder and decoder layers");
  config = tiny_config("moa:2K3E4D", moa::NormPlacement::post);
  config.padding_index = 9;
  REQUIRE_MOA_ERROR(moa::Seq2Seq<MoA>(config, rng), "padding_index 9 is outside [0, 9)");
  moa::Seq2Seq<MoA> model(tiny_config("moa:2K3E4D", moa::NormPlacement::post), rng);
  REQUIRE_MOA_ERROR(model.forward({4, 5}, moa::SequenceBatch::full(1, 3), {1, 4}, moa::SequenceBatch::full(1, 2), rng),
                    "Seq2Seq::forward: source has 2 rows but its batch describes 1 x 3");
  REQUIRE_MOA_ERROR(model.forward({4, 5}, moa::SequenceBatch::full(1, 2), {1, 4}, moa::SequenceBatch::full(2, 1), rng),
                    "source has 1 sequences but target_input has 2");
  REQUIRE_MOA_ERROR(model.forward({4, 50}, moa::SequenceBatch::full(1, 2), {1, 4}, moa::SequenceBatch::full(1, 2), rng),
                    "ids[1] = 50 is outside [0, 9)");
}

TEST_CASE("Seq2Seq: one parameter block; a moved model still trains and saves correctly", "[transformer][parameter]") {
  auto config = tiny_config("moa:2K4E4D", moa::NormPlacement::pre, 0.1);
  const auto source_batch = moa::SequenceBatch::padded(5, {5, 3});
  const auto target_batch = moa::SequenceBatch::padded(4, {4, 2});
  const moa::TokenIds source{4, 5, 6, 7, 8, 4, 5, 6, 0, 0}, target{1, 5, 6, 7, 1, 8, 0, 0};
  const moa::TokenIds target_output{5, 6, 7, 2, 8, 2, 0, 0};
  auto train_steps = [&](moa::Seq2Seq<MoA>& model, const moa::ParameterList<double>& parameters, moa::Adam<double>& adam,
                         moa::Rng& rng, int steps) {
    moa::CrossEntropyLoss<double> loss(0.0, moa::kPadId);
    for (int step = 0; step < steps; ++step) {
      loss.forward(model.forward(source, source_batch, target, target_batch, rng), target_output);
      parameters.zero_grad();
      model.backward(loss.backward());
      adam.step(1e-2);
    }
  };
  moa::Rng init_a(3), init_b(3), rng_a(4), rng_b(4);
  moa::Seq2Seq<MoA> reference(config, init_a);
  auto model = std::make_unique<moa::Seq2Seq<MoA>>(config, init_b);
  const auto reference_parameters = moa::parameters_of(reference);
  const auto parameters = moa::parameters_of(*model);
  REQUIRE(parameters.contiguous());
  REQUIRE(parameters.flat_size() < parameters.numel() + 16 * static_cast<moa::Index>(parameters.size()));
  moa::Adam<double> reference_adam(reference_parameters), adam(parameters);
  train_steps(reference, reference_parameters, reference_adam, rng_a, 2);
  train_steps(*model, parameters, adam, rng_b, 2);
  // Move the model out of its heap slot and free the slot: the list and Adam must follow the move.
  moa::Seq2Seq<MoA> moved = std::move(*model);
  model.reset();
  train_steps(reference, reference_parameters, reference_adam, rng_a, 2);
  train_steps(moved, parameters, adam, rng_b, 2);
  for (std::size_t i = 0; i < parameters.size(); ++i) {
    INFO(parameters[i].name);
    REQUIRE(MatrixD(parameters[i].value()) == MatrixD(reference_parameters[i].value()));
  }
  REQUIRE(parameters.at("embed_tokens.weight").value().data() == moved.embed_tokens.weight.value.data());
  // Saved through the list after the move, loaded into a fresh model: the same outputs.
  const std::string path = temporary_path("moved.safetensors");
  moa::save_safetensors(path, parameters, moa::DType::F64);
  moa::Rng init_c(99);
  moa::Seq2Seq<MoA> loaded(config, init_c);
  moa::load_safetensors(path, moa::parameters_of(loaded));
  moved.set_training(false);
  loaded.set_training(false);
  moa::Rng unused(0);
  REQUIRE(loaded.forward(source, source_batch, target, target_batch, unused) ==
          moved.forward(source, source_batch, target, target_batch, unused));
  std::remove(path.c_str());
}
