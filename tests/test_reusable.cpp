// detail::Reusable: the buffers a layer's infer keeps from call to call, and what keeping them
// must not change (results after other shapes, concurrent callers on a const layer).
#include "support.hpp"

#include <thread>

using namespace moa_test;

TEST_CASE("Reusable: one caller at a time reuses the kept buffers, a concurrent one gets its own", "[reusable]") {
  moa::detail::Reusable<std::vector<int>> reusable;
  const std::vector<int>* kept = nullptr;
  {
    const auto lease = reusable.lease();
    REQUIRE(lease.reused());
    lease->assign(5, 7);
    kept = &*lease;
    const auto concurrent = reusable.lease();  // leased above: fresh buffers
    REQUIRE_FALSE(concurrent.reused());
    REQUIRE(&*concurrent != kept);
    REQUIRE(concurrent->empty());
  }
  const auto again = reusable.lease();
  REQUIRE(again.reused());
  REQUIRE(&*again == kept);
  REQUIRE(again->size() == 5);  // kept as the last caller left them
  const moa::detail::Reusable<std::vector<int>> copy = reusable;  // copies start empty
  REQUIRE(copy.lease()->empty());
}

namespace {

// infer on a layer that served other shapes first equals infer on a fresh copy, bit for bit, and
// the training forward to rounding; two threads calling infer on the const layer at once get the
// same too.
template <typename Layer>
void check_reused_inference(Layer& layer, moa::Rng& rng) {
  const auto batch = moa::SequenceBatch::padded(20, {20, 13, 6});
  const auto wider = moa::SequenceBatch::padded(31, {31, 31, 31, 2});
  const auto narrow = moa::SequenceBatch::padded(5, {5});
  const MatrixF input = random_matrix<float>(batch.rows(), 64, rng);
  const MatrixF other = random_matrix<float>(wider.rows(), 64, rng);
  const MatrixF small = random_matrix<float>(narrow.rows(), 64, rng);
  const Layer fresh = layer;
  const MatrixF expected = fresh.infer(input, batch, input, batch, true);
  // The training forward takes other paths to the same products (weights packed per call, not
  // kept and handed on from expert to expert): the same result to float rounding.
  const MatrixF trained = layer.forward_self(input, batch, true);
  REQUIRE((trained - expected).norm() <= 1e-5 * expected.norm());
  const Layer& frozen = layer;
  frozen.infer(other, wider, other, wider, true);
  frozen.infer(small, narrow, small, narrow, false);
  REQUIRE((frozen.infer(input, batch, input, batch, true).array() == expected.array()).all());
  std::vector<MatrixF> results(4);
  std::vector<std::thread> threads;
  for (std::size_t t = 0; t < results.size(); ++t)
    threads.emplace_back([&, t] {
      for (int repeat = 0; repeat < 5; ++repeat) results[t] = frozen.infer(input, batch, input, batch, true);
    });
  for (auto& thread : threads) thread.join();
  for (const auto& result : results) REQUIRE((result.array() == expected.array()).all());
}

}  // namespace

TEST_CASE("Reusable in the layers: infer after other shapes, and from several threads, equals a fresh layer's",
          "[reusable][moa][moh][mha]") {
  moa::Rng rng(21);
  moa::MixtureOfAttentionConfig moa_config;
  moa_config.model_dim = 64;
  moa_config.num_experts = 6;
  moa_config.top_k = 2;
  moa_config.head_dim = 32;
  moa::MixtureOfAttention<float> mixture(moa_config, rng);
  moa::init_normal(mixture.router.weight, rng, 0.0, 0.5);
  check_reused_inference(mixture, rng);
  moa::MixtureOfHeadsConfig moh_config;
  moh_config.model_dim = 64;
  moh_config.shared_heads = 1;
  moh_config.routed_heads = 4;
  moh_config.top_k = 2;
  moh_config.head_dim = 16;
  moa::MixtureOfHeads<float> heads(moh_config, rng);
  moa::init_normal(heads.router.weight, rng, 0.0, 0.5);
  check_reused_inference(heads, rng);
  moa::MultiHeadAttentionConfig mha_config;
  mha_config.model_dim = 64;
  mha_config.num_heads = 4;
  mha_config.head_dim = 16;
  moa::MultiHeadAttention<float> attention(mha_config, rng);
  check_reused_inference(attention, rng);
}
