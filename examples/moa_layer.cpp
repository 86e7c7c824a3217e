// The smallest program with a Mixture-of-Attention layer: forward and backward on a random padded
// batch, the aux loss and the expert loads, then a safetensors round trip.
//     moa_layer [checkpoint.safetensors]
#include "moa/moa.hpp"
#include "moa/io/safetensors.hpp"

#include <cmath>
#include <cstdio>
#include <string>

int main(int argc, char** argv) {
  const std::string checkpoint = argc > 1 ? argv[1] : "moa_layer.safetensors";
  moa::Rng rng(7);

  moa::MixtureOfAttentionConfig config;  // "4K8E64D": top-4 of 8 experts, head width 64
  config.model_dim = 256;
  config.num_experts = 8;
  config.top_k = 4;
  config.head_dim = 64;
  moa::MixtureOfAttention<float> attention(config, rng);
  // A fresh router is all zeros (every token picks experts 0..k-1); a trained one spreads them.
  moa::init_normal(attention.router.weight, rng, 0.0, 0.1);

  // Two sequences padded to 16 tokens; the second has 11 real ones. One row per token.
  const auto batch = moa::SequenceBatch::padded(16, {16, 11});
  moa::Matrix<float> x(batch.rows(), config.model_dim);
  moa::init_normal(x, rng, 0.0, 1.0);

  const moa::Matrix<float> y = attention.forward_self(x, batch, /*causal=*/true);
  std::printf("output [%lld, %lld], aux loss %.5f (load balance %.4f, z-loss %.4f)\n",
              static_cast<long long>(y.rows()), static_cast<long long>(y.cols()), attention.aux_loss(),
              attention.router.load_balance_loss(), attention.router.z_loss());

  // Backward of a toy loss sum(y^2)/2 + aux: dL/dy = y; the aux loss's gradient is added inside.
  auto parameters = moa::parameters_of(attention, "attn.");
  parameters.zero_grad();
  const moa::Matrix<float> grad_x = attention.backward_self(y);
  std::printf("input gradient norm %.4f, q_proj gradient norm %.4f\n", grad_x.norm(),
              parameters.at("attn.q_proj.weight").grad().norm());

  const moa::RoutingStatistics stats = attention.routing_statistics();
  std::printf("expert loads:");
  for (double load : stats.load) std::printf(" %.3f", load);
  std::printf("  (load entropy %.3f of at most %.3f)\n", stats.load_entropy, std::log(8.0));
  std::printf("token 0 chose experts:");
  for (moa::Index j = 0; j < config.top_k; ++j) std::printf(" %lld", static_cast<long long>(attention.router.experts()[j]));
  std::printf("\n");

  moa::save_safetensors(checkpoint, parameters);
  moa::MixtureOfAttention<float> reloaded(config, rng);
  moa::load_safetensors(checkpoint, moa::parameters_of(reloaded, "attn."));
  const bool same = reloaded.forward_self(x, batch, true) == y;
  std::printf("%lld parameters saved to %s and reloaded %s\n", static_cast<long long>(parameters.numel()),
              checkpoint.c_str(), same ? "identically" : "DIFFERENTLY");
  return same ? 0 : 1;
}
