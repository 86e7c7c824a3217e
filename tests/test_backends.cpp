// The GEMM backends and thread counts: every float product and layer on every backend this build
// has (Eigen, and oneDNN when moa::dnnl is available), on 1 and 2 threads, against double
// references; determinism; bfloat16 inference where the CPU has it.
#include "attention_support.hpp"

#include "moa/models.hpp"

#ifdef MOA_TEST_HAVE_DNNL
#include "moa/backends/dnnl_gemm.hpp"
#endif

#include <atomic>
#include <set>
#include <stdexcept>

using namespace moa_test;

namespace {

struct NamedCompute {
  std::string name;
  moa::ComputePtr compute;
};

std::vector<std::shared_ptr<const moa::GemmBackend>> backends() {
  std::vector<std::shared_ptr<const moa::GemmBackend>> list{std::make_shared<moa::EigenGemm>()};
#ifdef MOA_TEST_HAVE_DNNL
  list.push_back(std::make_shared<moa::DnnlGemm>());
#endif
  return list;
}

std::vector<NamedCompute> float_computes() {
  std::vector<NamedCompute> list;
  for (const auto& backend : backends())
    for (int threads : {1, 2})
      list.push_back({backend->name() + " x" + std::to_string(threads),
                      std::make_shared<moa::Compute>(backend, threads)});
  return list;
}

moa::MixtureOfAttentionConfig backend_moa_config() {
  moa::MixtureOfAttentionConfig config;
  config.model_dim = 48;
  config.num_experts = 4;
  config.top_k = 2;
  config.head_dim = 16;
  config.causal_block = 8;
  return config;
}

// Enough experts and work on kParallelBatch's 182 tokens (about 91 rows per expert) that, on 2
// threads, each expert is a part of its own.
moa::MixtureOfAttentionConfig parallel_experts_config() {
  auto config = backend_moa_config();
  config.model_dim = 128;
  config.num_experts = 8;
  config.top_k = 4;
  config.head_dim = 32;
  return config;
}
const moa::SequenceBatch kParallelBatch = moa::SequenceBatch::padded(64, {64, 50, 61, 7});

}  // namespace

TEST_CASE("gemm: every backend and thread count equals a naive product", "[gemm][backend]") {
  STATIC_REQUIRE(2.0 * 200 * 130 * 64 >= moa::detail::kParallelGemmFlops);  // the largest case is split
  moa::Rng rng(11);
  for (const NamedCompute& named : float_computes()) {
    // 200 x 130 x 64 is past the size at which a product is split over threads; widths of whole
    // SIMD packets (16, 32, 48, 64) below kSmallKernelMacs take the small-product kernel, 16 with
    // eight rows at a time, and a transposed b is copied in packet-square blocks (k 64: whole
    // blocks; k 20: blocks and a tail; k 1 and 7: no block). Below a packet of columns, x W^T takes
    // blocks of dot products (n 5 and 8; k 20 has a tail past its packets).
    for (const Index m : {1, 3, 4, 15, 16, 17, 47, 100, 200}) {
      for (const Index n : {1, 5, 8, 16, 32, 48, 64, 130}) {
        for (const Index k : {1, 7, 20, 64}) {
          for (const bool transpose_a : {false, true}) {
            for (const bool transpose_b : {false, true}) {
              for (const bool accumulate : {false, true}) {
                INFO(named.name << ": m " << m << " n " << n << " k " << k << " transpose_a " << transpose_a
                                << " transpose_b " << transpose_b << " accumulate " << accumulate);
                // Operands as blocks of larger matrices, so leading dimensions exceed the widths.
                const MatrixF a_storage = random_matrix<float>((transpose_a ? k : m) + 2, (transpose_a ? m : k) + 3, rng);
                const MatrixF b_storage = random_matrix<float>((transpose_b ? n : k) + 1, (transpose_b ? k : n) + 5, rng);
                const auto a = a_storage.block(1, 2, transpose_a ? k : m, transpose_a ? m : k);
                const auto b = b_storage.block(1, 3, transpose_b ? n : k, transpose_b ? k : n);
                MatrixF c_storage = random_matrix<float>(m + 2, n + 2, rng);
                const MatrixF storage_before = c_storage;
                const MatrixD c_before = c_storage.block(1, 1, m, n).cast<double>();
                const MatrixD a_op = transpose_a ? MatrixD(a.cast<double>().transpose()) : MatrixD(a.cast<double>());
                const MatrixD b_op = transpose_b ? MatrixD(b.cast<double>().transpose()) : MatrixD(b.cast<double>());
                MatrixD expected = MatrixD::Zero(m, n);
                for (Index i = 0; i < m; ++i)
                  for (Index j = 0; j < n; ++j)
                    for (Index l = 0; l < k; ++l) expected(i, j) += a_op(i, l) * b_op(l, j);
                // Each element's error against the size of what it sums (|a| |b| (+ |c|)): an element
                // whose terms cancel is exact only to the float rounding of those terms.
                MatrixD magnitude = a_op.cwiseAbs() * b_op.cwiseAbs();
                if (accumulate) {
                  expected += c_before;
                  magnitude += c_before.cwiseAbs();
                }
                moa::gemm<float>(*named.compute, a, transpose_a ? moa::Transpose::yes : moa::Transpose::no, b,
                                 transpose_b ? moa::Transpose::yes : moa::Transpose::no, c_storage.block(1, 1, m, n),
                                 accumulate);
                const MatrixD error = (c_storage.block(1, 1, m, n).cast<double>() - expected).cwiseAbs();
                REQUIRE((error.array() / magnitude.array().max(1e-30)).maxCoeff() < 1e-5);
                // The storage around the block is untouched.
                MatrixF outside = c_storage;
                outside.block(1, 1, m, n) = storage_before.block(1, 1, m, n);
                REQUIRE((outside.array() == storage_before.array()).all());
              }
            }
          }
        }
      }
    }
  }
}

TEST_CASE("gemm: narrow products past the small-product size equal a naive product", "[gemm][backend]") {
  // n = 8 is one AVX2 packet: such a product (a router's logits) takes the small-product kernel at
  // any size there. n = 16 stays with oneDNN or Eigen's GEMM, as everywhere past that size.
  moa::Rng rng(12);
  for (const NamedCompute& named : float_computes()) {
    for (const Index m : {203, 1030}) {
      for (const Index n : {8, 16}) {
        for (const Index k : {129, 256}) {
          REQUIRE(static_cast<double>(m) * n * k >= moa::detail::kSmallKernelMacs);
          for (const bool transpose_a : {false, true}) {
            for (const bool transpose_b : {false, true}) {
              INFO(named.name << ": m " << m << " n " << n << " k " << k << " transpose_a " << transpose_a
                              << " transpose_b " << transpose_b);
              const MatrixF a = random_matrix<float>(transpose_a ? k : m, transpose_a ? m : k, rng);
              const MatrixF b = random_matrix<float>(transpose_b ? n : k, transpose_b ? k : n, rng);
              const MatrixD a_op = transpose_a ? MatrixD(a.cast<double>().transpose()) : MatrixD(a.cast<double>());
              const MatrixD b_op = transpose_b ? MatrixD(b.cast<double>().transpose()) : MatrixD(b.cast<double>());
              const MatrixD expected = a_op * b_op;
              MatrixF c = random_matrix<float>(m, n, rng);
              moa::gemm<float>(*named.compute, a, transpose_a ? moa::Transpose::yes : moa::Transpose::no, b,
                               transpose_b ? moa::Transpose::yes : moa::Transpose::no, c, false);
              REQUIRE(relative_error(c.cast<double>(), expected) < 1e-5);
            }
          }
        }
      }
    }
  }
}

TEST_CASE("gemm: shapes are checked, k = 0 gives zeros", "[gemm][backend]") {
  const moa::Compute& compute = *moa::Compute::standard();
  MatrixF a = MatrixF::Ones(3, 4), b = MatrixF::Ones(5, 2), c(3, 2);
  REQUIRE_MOA_ERROR(moa::gemm<float>(compute, a, moa::Transpose::no, b, moa::Transpose::no, c),
                    "moa::gemm: op(a) is [3, 4], op(b) is [5, 2], c is [3, 2]");
  MatrixF empty_a(3, 0), empty_b(0, 2), zeros = MatrixF::Ones(3, 2);
  moa::gemm<float>(compute, empty_a, moa::Transpose::no, empty_b, moa::Transpose::no, zeros);
  REQUIRE(zeros.isZero());
}

TEST_CASE("Compute: bad thread counts and bf16 without native support are refused", "[backend]") {
  REQUIRE_MOA_ERROR(moa::Compute(std::make_shared<moa::EigenGemm>(), 0), "threads must be at least 1, got 0");
  REQUIRE_MOA_ERROR(moa::Compute(nullptr), "Compute: backend is null");
  REQUIRE_MOA_ERROR(moa::Compute(std::make_shared<moa::EigenGemm>(), 1, moa::Precision::bf16),
                    "precision bf16 needs a backend with native bfloat16 products");
}

TEST_CASE("Compute::serial: the same backend and precision on one thread", "[backend]") {
  const auto backend = std::make_shared<moa::EigenGemm>();
  const moa::Compute one(backend), two(backend, 2);
  REQUIRE(&one.serial() == &one);
  REQUIRE(two.serial().threads() == 1);
  REQUIRE(&two.serial().backend() == backend.get());
  REQUIRE(two.serial().inference_precision() == two.inference_precision());
}

TEST_CASE("ThreadPool: every part once, exceptions reach the caller, nested calls run inline", "[backend]") {
  moa::ThreadPool pool(2);
  std::vector<std::atomic<int>> seen(100);
  pool.run(100, [&](Index part, int thread) {
    REQUIRE(thread >= 0);
    REQUIRE(thread < 2);
    ++seen[static_cast<std::size_t>(part)];
  });
  for (const auto& count : seen) REQUIRE(count.load() == 1);
  REQUIRE_THROWS_AS(pool.run(10, [](Index part, int) {
    if (part == 7) throw std::runtime_error("part 7");
  }), std::runtime_error);
  std::atomic<int> inner{0};
  pool.run(4, [&](Index, int) { pool.run(3, [&](Index, int) { ++inner; }); });
  REQUIRE(inner.load() == 12);
}

TEST_CASE("MoA and MHA on every backend and thread count: float forward and backward match double",
          "[moa][mha][backend]") {
  const auto config = backend_moa_config();
  const auto batch = moa::SequenceBatch::padded(40, {40, 23, 37});
  const auto memory_batch = moa::SequenceBatch::padded(30, {30, 11, 29});
  for (const NamedCompute& named : float_computes()) {
    for (const char* kind : {"self causal", "cross"}) {
      INFO(named.name << ", " << kind);
      const bool cross = std::string(kind) == "cross";
      moa::Rng rng(5);
      const MatrixD query = random_matrix(batch.rows(), config.model_dim, rng);
      const MatrixD memory = random_matrix(memory_batch.rows(), config.model_dim, rng);
      const MatrixD grad_output = random_matrix(batch.rows(), config.model_dim, rng);
      auto run = [&](auto& reference, auto& layer) {
        using Float = std::decay_t<decltype(layer)>;
        copy_parameters(layer, reference);
        layer.set_compute(named.compute);
        const MatrixF query_f = query.cast<float>(), memory_f = memory.cast<float>();
        const MatrixD expected = cross ? reference.forward(query, batch, memory, memory_batch, false)
                                       : reference.forward_self(query, batch, true);
        const MatrixF actual = cross ? layer.forward(query_f, batch, memory_f, memory_batch, false)
                                     : layer.forward_self(query_f, batch, true);
        REQUIRE(relative_error(actual.template cast<double>(), expected) < 1e-5);
        const auto expected_grads = reference.backward(grad_output);
        const auto actual_grads = layer.backward(grad_output.cast<float>());
        REQUIRE(relative_error(actual_grads.query.template cast<double>(), expected_grads.query) < 1e-4);
        REQUIRE(relative_error(actual_grads.key_value.template cast<double>(), expected_grads.key_value) < 1e-4);
        require_same_gradients<Float>(layer, reference, 1e-4);
      };
      moa::MixtureOfAttention<double> moa_reference(config, rng);
      moa::init_normal(moa_reference.router.weight, rng, 0.0, 0.5);
      moa::MixtureOfAttention<float> moa_layer(config, rng);
      run(moa_reference, moa_layer);
      moa::MultiHeadAttention<double> mha_reference({config.model_dim, 3, config.head_dim}, rng);
      moa::MultiHeadAttention<float> mha_layer({config.model_dim, 3, config.head_dim}, rng);
      run(mha_reference, mha_layer);
    }
  }
}

// The results of a layer at 2 threads, at 2 again and at 1: bit-identical run to run, within
// float rounding across the counts.
void require_same_results(const std::vector<MatrixF>& two, const std::vector<MatrixF>& again,
                          const std::vector<MatrixF>& one) {
  for (std::size_t i = 0; i < two.size(); ++i) {
    INFO("result " << i);
    REQUIRE((two[i].array() == again[i].array()).all());
    REQUIRE(relative_error(two[i].cast<double>(), one[i].cast<double>()) < 1e-5);
  }
}

// MoA on `backend` at 2 threads, twice, and at 1: the training forward, backward, every parameter's
// gradient and infer() bit-identical run to run at 2 threads, and within float rounding of 1.
void require_threads_agree(const moa::MixtureOfAttentionConfig& config, const moa::SequenceBatch& batch, bool causal,
                           std::uint64_t seed, const std::shared_ptr<const moa::GemmBackend>& backend) {
  auto run = [&](int threads) {
    moa::Rng rng(seed);
    moa::MixtureOfAttention<float> layer(config, rng);
    moa::init_normal(layer.router.weight, rng, 0.0, 0.5);
    layer.set_compute(std::make_shared<moa::Compute>(backend, threads));
    const MatrixF input = random_matrix<float>(batch.rows(), config.model_dim, rng);
    const MatrixF grad_output = random_matrix<float>(batch.rows(), config.model_dim, rng);
    std::vector<MatrixF> results{layer.forward_self(input, batch, causal), layer.backward_self(grad_output)};
    for (const auto& entry : moa::parameters_of(layer)) results.push_back(entry.grad());
    results.push_back(layer.infer(input, batch, input, batch, causal));
    return results;
  };
  require_same_results(run(2), run(2), run(1));
}

TEST_CASE("Threads: bit-identical run to run at a fixed count; 1 and 2 threads agree to rounding",
          "[moa][backend]") {
  // The small layer splits each expert's rows across threads; the larger one (enough experts and
  // work) makes each expert a part of its own, taken by whichever thread is free, and sums into
  // token rows per assignment.
  const auto larger = parallel_experts_config();
  const auto& batch = kParallelBatch;
  STATIC_REQUIRE(moa::detail::kParallelGemmFlops <= 182.0 * 4 * 128 * 32);  // the larger layer's work per product
  // Expert choice (non-causal) as well: its assignments come in a different order.
  auto expert_choice = larger;
  expert_choice.mode = moa::RoutingMode::expert_choice;
  expert_choice.load_balance_coefficient = expert_choice.z_loss_coefficient = 0.0;
  for (const auto& config : {backend_moa_config(), larger, expert_choice})
  for (const auto& backend : backends()) {
    const bool causal = config.mode == moa::RoutingMode::token_choice;
    INFO(backend->name() << ", d_model " << config.model_dim << (causal ? "" : ", expert choice"));
    require_threads_agree(config, batch, causal, 9, backend);
  }
}

TEST_CASE("Threads: experts large enough to split are split even when there are many; the same numbers",
          "[moa][backend]") {
  // Every token to each of 4 experts, 1024 tokens: 512 rows per thread and expert, so the forward
  // and the backward split each expert's rows over the threads, and the outputs go straight into
  // the token rows (every token chose each expert: accumulated in place).
  auto config = backend_moa_config();
  config.model_dim = 256;
  config.num_experts = 4;
  config.top_k = 4;
  config.head_dim = 64;
  for (const auto& backend : backends()) {
    INFO(backend->name());
    require_threads_agree(config, moa::SequenceBatch::full(8, 128), true, 5, backend);
  }
}

namespace {

// Counts the products whose B lies in [begin, end) (a layer's weight), passing every call on.
struct CountingBackend final : moa::GemmBackend {
  std::shared_ptr<const moa::GemmBackend> inner;
  const float *begin = nullptr, *end = nullptr;
  mutable std::atomic<int> calls{0};
  explicit CountingBackend(std::shared_ptr<const moa::GemmBackend> wrapped) : inner(std::move(wrapped)) {}
  std::string name() const override { return inner->name(); }
  void sgemm(const moa::GemmCall& call) const override {
    if (call.b >= begin && call.b < end) ++calls;
    inner->sgemm(call);
  }
};

}  // namespace

TEST_CASE("Threads: experts run as parts of their own multiply on one thread each: one product per expert",
          "[moa][backend]") {
  // 182 tokens x 4 of 8 experts: about 91 rows per expert, too few to split over 2 threads (forward
  // in training or backward), so each expert is a part of its own; its rows are not cut in two
  // products run one after another (the nested loop would split them as on 2 threads).
  auto config = parallel_experts_config();
  config.head_dim = 40;  // not a multiple of 16: the backend multiplies (moa's row kernels would on AVX-512)
  const auto& batch = kParallelBatch;
  for (const auto& backend : backends()) {
    INFO(backend->name());
    moa::Rng rng(3);
    moa::MixtureOfAttention<float> layer(config, rng);
    moa::init_normal(layer.router.weight, rng, 0.0, 0.5);  // tokens spread over the experts
    auto counting = std::make_shared<CountingBackend>(backend);
    const float* weights = layer.q_proj.value.data();
    counting->begin = weights;
    counting->end = weights + layer.q_proj.value.size();
    layer.set_compute(std::make_shared<moa::Compute>(counting, 2));
    const MatrixF input = random_matrix<float>(batch.rows(), config.model_dim, rng);
    layer.forward_self(input, batch, true);
    int busy = 0;
    for (const Index count : layer.routing_statistics().counts) busy += count > 0 ? 1 : 0;
    REQUIRE(busy >= 6);
    REQUIRE(counting->calls.load() == busy);  // the query projections
    counting->calls = 0;
    layer.backward_self(random_matrix<float>(batch.rows(), config.model_dim, rng));
    REQUIRE(counting->calls.load() == busy);  // the input gradients' products with Wq
  }
}

TEST_CASE("Threads: MixtureOfHeads bit-identical run to run at 2 threads; 1 and 2 threads agree to rounding",
          "[moh][backend]") {
  moa::MixtureOfHeadsConfig config;
  config.model_dim = 128;
  config.shared_heads = 2;
  config.routed_heads = 8;
  config.top_k = 2;
  config.head_dim = 32;
  const auto batch = moa::SequenceBatch::padded(64, {64, 50, 61, 7});
  for (const auto& backend : backends()) {
    INFO(backend->name());
    auto run = [&](int threads) {
      moa::Rng rng(9);
      moa::MixtureOfHeads<float> layer(config, rng);
      moa::init_normal(layer.router.weight, rng, 0.0, 0.5);
      moa::init_normal(layer.shared_router, rng, 0.0, 0.5);
      moa::init_normal(layer.group_router, rng, 0.0, 0.5);
      layer.set_compute(std::make_shared<moa::Compute>(backend, threads));
      const MatrixF input = random_matrix<float>(batch.rows(), config.model_dim, rng);
      const MatrixF grad_output = random_matrix<float>(batch.rows(), config.model_dim, rng);
      std::vector<MatrixF> results{layer.forward_self(input, batch, true), layer.backward_self(grad_output)};
      for (const auto& entry : moa::parameters_of(layer)) results.push_back(entry.grad());
      return results;
    };
    require_same_results(run(2), run(2), run(1));
  }
}

TEST_CASE("Threads: decoding steps (a row or two per expert) run the experts in parallel; the same numbers",
          "[moa][backend][cache]") {
  // 8 sequences, one token each, 4 of 32 experts: 32 assignments of 512 x 64 weights, fewer
  // multiply-adds than repay waking a thread, but enough weights to read to repay it.
  moa::MixtureOfAttentionConfig config;
  config.model_dim = 512;
  config.num_experts = 32;
  config.top_k = 4;
  config.head_dim = 64;
  const Index sequences = 8, weight_size = config.model_dim * config.head_dim;
  STATIC_REQUIRE(moa::detail::kParallelGemmFlops > 32.0 * 512 * 64);
  for (const auto& backend : backends()) {
    INFO(backend->name());
    auto run = [&](int threads) {
      moa::Rng rng(31);
      moa::MixtureOfAttention<float> layer(config, rng);
      moa::init_normal(layer.router.weight, rng, 0.0, 0.5);
      layer.set_training(false);
      layer.set_compute(std::make_shared<moa::Compute>(backend, threads));
      auto cache = layer.make_self_cache(sequences, 4);
      std::vector<MatrixF> results;
      for (int step = 0; step < 3; ++step) {
        const MatrixF token = random_matrix<float>(sequences, config.model_dim, rng);
        results.push_back(layer.step(token, cache));
        const std::vector<Index> experts = layer.router.route(token).experts;
        const Index busy = static_cast<Index>(std::set<Index>(experts.begin(), experts.end()).size());
        REQUIRE(moa::detail::kWeightReadCost * busy * weight_size >= moa::detail::kParallelGemmFlops);
      }
      return results;
    };
    require_same_results(run(2), run(2), run(1));
  }
}

TEST_CASE("Seq2Seq on every backend: float logits and gradients match double", "[transformer][backend]") {
  moa::TransformerConfig config;
  config.vocab_size = 37;
  config.model_dim = 32;
  config.ffn_dim = 48;
  config.encoder_layers = 1;
  config.decoder_layers = 1;
  config.dropout = 0.0;
  config.attention = moa::AttentionSpec::parse("moa:2K4E8D");
  const auto source_batch = moa::SequenceBatch::padded(20, {20, 13});
  const auto target_batch = moa::SequenceBatch::padded(18, {18, 9});
  moa::Rng data_rng(3);
  moa::TokenIds source, target;
  for (Index i = 0; i < source_batch.rows(); ++i) source.push_back(3 + static_cast<Index>(data_rng.next_u64() % 34));
  for (Index i = 0; i < target_batch.rows(); ++i) target.push_back(3 + static_cast<Index>(data_rng.next_u64() % 34));
  for (const NamedCompute& named : float_computes()) {
    INFO(named.name);
    moa::Rng rng(4), float_rng(4);
    moa::Seq2Seq<moa::MixtureOfAttention<double>> reference(config, rng);
    // Sharper routers than the initial ones, so routing decisions differ between tokens.
    reference.for_each_attention([&](const moa::AttentionSite&, moa::MixtureOfAttention<double>& attention) {
      moa::init_normal(attention.router.weight, rng, 0.0, 0.5);
    });
    moa::Seq2Seq<moa::MixtureOfAttention<float>> model(config, float_rng);
    copy_parameters(model, reference);
    model.set_compute(named.compute);
    moa::Rng forward_rng(1);
    const MatrixD expected = reference.forward(source, source_batch, target, target_batch, forward_rng);
    const MatrixF actual = model.forward(source, source_batch, target, target_batch, forward_rng);
    REQUIRE(relative_error(actual.cast<double>(), expected) < 1e-5);
    const MatrixD grad_logits = random_matrix(expected.rows(), expected.cols(), forward_rng);
    reference.backward(grad_logits);
    model.backward(grad_logits.cast<float>());
    require_same_gradients(model, reference, 1e-4);
  }
}

TEST_CASE("bfloat16 inference: evaluation forwards within 1e-2 of f32 where the CPU has bf16",
          "[moa][mha][moh][bf16]") {
  std::shared_ptr<const moa::GemmBackend> bf16_backend;
  for (const auto& backend : backends())
    if (backend->has_bf16()) bf16_backend = backend;
  if (!bf16_backend) {
    WARN("no backend with native bfloat16 on this machine: bf16 inference not tested");
    return;
  }
  // The layers round their inputs to bfloat16 once for all their products: self-attention (one
  // input) and cross-attention (two), experts that gather their rows and experts every token chose.
  struct Case {
    const char* name;
    bool cross, causal, every_expert, experts_as_parts = false;
  };
  const auto check = [&](auto& layer, const Case& test, const moa::SequenceBatch& batch) {
    const auto key_batch = moa::SequenceBatch::padded(36, {30, 36, 11});
    moa::Rng rng(21);
    const MatrixF input = random_matrix<float>(batch.rows(), layer.model_dim(), rng);
    const MatrixF memory = random_matrix<float>(key_batch.rows(), layer.model_dim(), rng);
    layer.set_training(false);
    const auto forward = [&] {
      return test.cross ? layer.forward(input, batch, memory, key_batch, false)
                        : layer.forward_self(input, batch, test.causal);
    };
    layer.set_compute(std::make_shared<moa::Compute>(bf16_backend, 1, moa::Precision::f32));
    const MatrixF f32 = forward();
    for (int threads : {1, 2}) {
      INFO(threads << " threads");
      layer.set_compute(std::make_shared<moa::Compute>(bf16_backend, threads, moa::Precision::bf16));
      const MatrixF bf16 = forward();
      const double error = relative_error(bf16.cast<double>(), f32.cast<double>());
      INFO("relative error of bf16 against f32: " << error);
      REQUIRE(error < 1e-2);
      REQUIRE(error > 1e-5);  // bf16 really was used: its 8-bit mantissa shows
      const MatrixF inferred = test.cross ? layer.infer(input, batch, memory, key_batch, false)
                                          : layer.infer(input, batch, input, batch, test.causal);
      REQUIRE(inferred == bf16);
    }
    // Training forwards stay f32 whatever the compute's inference precision.
    layer.set_training(true);
    const MatrixF trained = forward();
    REQUIRE(relative_error(trained.cast<double>(), f32.cast<double>()) < 1e-6);
  };
  for (const Case& test : {Case{"causal self-attention", false, true, false}, Case{"self-attention", false, false, false},
                           Case{"cross-attention", true, false, false},
                           Case{"every token to every expert", false, false, true},
                           Case{"experts as parts of their own on 2 threads", false, true, false, true}}) {
    INFO(test.name);
    auto config = test.experts_as_parts ? parallel_experts_config() : backend_moa_config();
    if (test.every_expert) config.top_k = config.num_experts;
    // Padding rows are not routed; without them an expert every token chose reads the input in place.
    const auto batch = test.every_expert       ? moa::SequenceBatch::full(3, 40)
                       : test.experts_as_parts ? kParallelBatch
                                               : moa::SequenceBatch::padded(40, {40, 23, 37});
    moa::Rng rng(21);
    {
      INFO("MixtureOfAttention");
      moa::MixtureOfAttention<float> layer(config, rng);
      moa::init_normal(layer.router.weight, rng, 0.0, 0.5);
      check(layer, test, batch);
    }
    {
      INFO("MultiHeadAttention");
      moa::MultiHeadAttention<float> layer({config.model_dim, 2, config.head_dim}, rng);
      check(layer, test, batch);
    }
    {
      INFO("MixtureOfHeads");
      moa::MixtureOfHeadsConfig moh_config;
      moh_config.model_dim = config.model_dim;
      moh_config.shared_heads = 1;
      moh_config.routed_heads = config.num_experts;
      moh_config.top_k = config.top_k;
      moh_config.head_dim = config.head_dim;
      moa::MixtureOfHeads<float> layer(moh_config, rng);
      moa::init_normal(layer.router.weight, rng, 0.0, 0.5);
      check(layer, test, batch);
    }
  }
}

TEST_CASE("gemm_bfloat16_input: an operand rounded once gives the bf16 product of the float one", "[gemm][bf16]") {
  moa::Rng rng(8);
  const MatrixF a = random_matrix<float>(70, 48, rng), weight = random_matrix<float>(24, 48, rng);
  moa::BFloat16Matrix rounded;
  for (const auto& backend : backends()) {
    INFO(backend->name());
    const auto compute = std::make_shared<moa::Compute>(backend, 1);
    rounded.assign(*compute, a);
    MatrixF product(a.rows(), weight.rows());
    if (!backend->has_bf16()) {
      REQUIRE_THROWS_WITH(moa::gemm_bfloat16_input(*compute, rounded.view(), weight, moa::Transpose::yes, product),
                          Catch::Contains("moa::gemm_bfloat16_input") && Catch::Contains("has no bf16 products"));
      continue;
    }
    for (int threads : {1, 2}) {
      INFO(threads << " threads");
      const moa::Compute bf16(backend, threads, moa::Precision::bf16);
      MatrixF expected(a.rows(), weight.rows());
      moa::gemm<float>(bf16, a, moa::Transpose::no, weight, moa::Transpose::yes, expected, false, moa::Precision::bf16);
      moa::gemm_bfloat16_input(bf16, rounded.view(), weight, moa::Transpose::yes, product);
      REQUIRE(product == expected);  // the same rounding, the same kernel
      moa::gemm_bfloat16_input(bf16, rounded.view().middle_rows(10, 40), weight, moa::Transpose::yes,
                               product.middleRows(10, 40), true);
      // Accumulating may add into c part way through the sum over k (oneDNN's AMX kernel does), so
      // it agrees with the sum of two products to float rounding, not bit for bit.
      REQUIRE(relative_error(product.middleRows(10, 40).cast<double>(),
                             (2 * expected.middleRows(10, 40)).cast<double>()) < 1e-6);
      REQUIRE(relative_error(expected.cast<double>(), (a * weight.transpose()).cast<double>()) < 1e-2);
    }
    REQUIRE_THROWS_WITH(moa::gemm_bfloat16_input(*compute, rounded.view(), weight, moa::Transpose::no, product),
                        Catch::Contains("moa::gemm_bfloat16_input") && Catch::Contains("a is [70, 48]") &&
                            Catch::Contains("op(b) is [24, 48]"));
  }
}

TEST_CASE("bfloat16 decoding: caches carry rounded weights, keys and values; steps within 1e-2 of f32",
          "[moa][mha][moh][bf16][cache]") {
  std::shared_ptr<const moa::GemmBackend> bf16_backend;
  for (const auto& backend : backends())
    if (backend->has_bf16()) bf16_backend = backend;
  if (!bf16_backend || !moa::kFastBFloat16) {
    WARN("no native bfloat16 (backend and build): bf16 decoding not tested");
    return;
  }
  const auto f32 = std::make_shared<moa::Compute>(bf16_backend, 1, moa::Precision::f32);
  const auto bf16 = std::make_shared<moa::Compute>(bf16_backend, 1, moa::Precision::bf16);
  const Index config_head_dim = backend_moa_config().head_dim;
  auto check = [&](auto& layer) {
    moa::Rng rng(23);
    layer.set_training(false);
    const MatrixF prefix = random_matrix<float>(3 * 5, layer.model_dim(), rng);  // 3 sequences, 5 tokens
    const MatrixF token = random_matrix<float>(3, layer.model_dim(), rng);
    const MatrixF memory = random_matrix<float>(3 * 7, layer.model_dim(), rng);
    const auto memory_batch = moa::SequenceBatch::padded(7, {7, 4, 6});
    auto run = [&](const moa::ComputePtr& compute) {
      layer.set_compute(compute);
      auto self = layer.make_self_cache(3, 6);
      auto cross = layer.make_cross_cache(memory, memory_batch);
      const bool rounded = self.rounded_weight(self.kQueryWeight) != nullptr &&
                           self.rounded_weight(self.kKeyWeight) != nullptr &&
                           cross.rounded_weight(cross.kOutputWeight) != nullptr;
      REQUIRE(rounded == (compute == bf16));
      REQUIRE((self.has_rounded_rows() == rounded && cross.has_rounded_rows() == rounded));
      layer.step(prefix, self);
      MatrixF probabilities(1, 6), output(1, config_head_dim);
      REQUIRE_MOA_ERROR(moa::attention_over_cache<float>(MatrixF::Zero(1, config_head_dim), self, 3, 0, moa::AttentionLayout{},
                                                         probabilities, output, *compute, moa::Precision::f32),
                        "sequence 3 and columns [0, " + std::to_string(config_head_dim) + ")");
      return std::vector<MatrixF>{layer.step(token, self), layer.step(token, cross)};
    };
    const std::vector<MatrixF> exact = run(f32), rounded = run(bf16);
    for (std::size_t i = 0; i < exact.size(); ++i) {
      const double error = relative_error(rounded[i].cast<double>(), exact[i].cast<double>());
      INFO("step " << i << ": relative error of bf16 against f32 " << error);
      REQUIRE(error < 1e-2);
      REQUIRE(error > 1e-6);  // the rounded weights were used
    }
  };
  const auto config = backend_moa_config();
  moa::Rng rng(22);
  moa::MixtureOfAttention<float> mixture(config, rng);
  moa::init_normal(mixture.router.weight, rng, 0.0, 0.5);
  check(mixture);
  moa::MultiHeadAttention<float> heads({config.model_dim, 2, config.head_dim}, rng);
  check(heads);
  moa::MixtureOfHeadsConfig moh_config;
  moh_config.model_dim = config.model_dim;
  moh_config.shared_heads = 1;
  moh_config.routed_heads = 4;
  moh_config.top_k = 2;
  moh_config.head_dim = config.head_dim;
  moa::MixtureOfHeads<float> routed_heads(moh_config, rng);
  moa::init_normal(routed_heads.router.weight, rng, 0.0, 0.5);
  moa::init_normal(routed_heads.group_router, rng, 0.0, 0.5);
  check(routed_heads);
}

TEST_CASE("CrossEntropyLoss on two threads: the same loss and gradient as on one", "[loss][backend]") {
  moa::Rng rng(17);
  const MatrixF logits = random_matrix<float>(300, 57, rng, 3.0);
  moa::TokenIds targets;
  for (Index i = 0; i < logits.rows(); ++i) targets.push_back(i % 7 == 0 ? -1 : i % 57);
  moa::CrossEntropyLoss<float> one(0.1, -1), two(0.1, -1);
  two.set_compute(std::make_shared<moa::Compute>(std::make_shared<moa::EigenGemm>(), 2));
  REQUIRE(one.forward(logits, targets) == two.forward(logits, targets));
  const MatrixF grad_one = one.backward(), grad_two = two.backward();
  REQUIRE((grad_one.array() == grad_two.array()).all());
  REQUIRE(grad_one.row(0).isZero());  // an ignored row
  REQUIRE(!grad_one.row(1).isZero());
}

TEST_CASE("Dropout, LayerNorm and Adam on two threads: the same numbers as on one", "[backend]") {
  const auto two_threads = std::make_shared<moa::Compute>(std::make_shared<moa::EigenGemm>(), 2);
  moa::Rng rng(21);
  const MatrixF input = random_matrix<float>(300, 40, rng), grad_output = random_matrix<float>(300, 40, rng);
  // Dropout: entry (i, j) is draw i*D + j of the generator's stream, whichever thread draws it,
  // and the generator ends where a serial draw of every entry ends.
  moa::Dropout<float> serial(0.3), parallel(0.3);
  parallel.set_compute(two_threads);
  moa::Rng serial_rng(5), parallel_rng(5), reference_rng(5);
  const MatrixF dropped = serial.forward(input, serial_rng);
  REQUIRE(parallel.forward(input, parallel_rng) == dropped);
  REQUIRE(parallel.backward(grad_output) == serial.backward(grad_output));
  for (Index i = 0; i < dropped.size(); ++i) {
    const bool kept = !(reference_rng.uniform() < 0.3);
    REQUIRE((dropped.data()[i] != 0.0f) == (kept && input.data()[i] != 0.0f));
  }
  REQUIRE(parallel_rng.state() == serial_rng.state());
  REQUIRE(serial_rng.next_u64() == reference_rng.next_u64());
  // LayerNorm: every row alone.
  moa::LayerNorm<float> norm_one(40), norm_two(40);
  norm_two.set_compute(two_threads);
  for (auto* norm : {&norm_one, &norm_two}) {
    norm->weight.value = random_matrix<float>(1, 40, rng);
    norm->bias.value = random_matrix<float>(1, 40, rng);
  }
  norm_two.weight.value = norm_one.weight.value;
  norm_two.bias.value = norm_one.bias.value;
  REQUIRE(norm_two.forward(input) == norm_one.forward(input));
  REQUIRE(norm_two.backward(grad_output) == norm_one.backward(grad_output));
  // Adam: every number alone, over a packed block long enough to be split.
  moa::Linear<float> layer_one(600, 300, true, rng), layer_two(600, 300, true, rng);
  moa::pack_parameters(layer_one);
  moa::pack_parameters(layer_two);
  auto list_one = moa::parameters_of(layer_one), list_two = moa::parameters_of(layer_two);
  for (std::size_t i = 0; i < list_one.size(); ++i) {
    list_two[i].value() = list_one[i].value();
    list_one[i].grad() = random_matrix<float>(list_one[i].value().rows(), list_one[i].value().cols(), rng);
    list_two[i].grad() = list_one[i].grad();
  }
  moa::Adam<float> adam_one(list_one), adam_two(list_two);
  adam_two.set_compute(two_threads);
  for (int step = 0; step < 3; ++step) {
    adam_one.step(1e-2);
    adam_two.step(1e-2);
  }
  for (std::size_t i = 0; i < list_one.size(); ++i) REQUIRE(list_two[i].value() == list_one[i].value());
}

TEST_CASE("grad_norm, clip_grad_norm and zero_grad on two threads: the same numbers as on one", "[backend][optimizer]") {
  const auto two_threads = std::make_shared<moa::Compute>(std::make_shared<moa::EigenGemm>(), 2);
  moa::Rng rng(22);
  for (const bool packed : {true, false}) {
    INFO("packed " << packed);
    // Enough gradient entries to be split over the threads.
    moa::Linear<float> layer(600, 300, true, rng);
    if (packed) moa::pack_parameters(layer);
    const auto list = moa::parameters_of(layer);
    REQUIRE(list.numel() >= moa::detail::kParallelGradientEntries);
    REQUIRE(list.contiguous() == packed);
    std::vector<MatrixF> grads;
    for (std::size_t i = 0; i < list.size(); ++i) {
      grads.push_back(random_matrix<float>(list[i].grad().rows(), list[i].grad().cols(), rng));
      list[i].grad() = grads.back();
    }
    double expected_squares = 0.0;
    for (const MatrixF& grad : grads) expected_squares += static_cast<double>(grad.squaredNorm());
    const double serial_norm = moa::grad_norm(list);
    REQUIRE(serial_norm == std::sqrt(expected_squares));
    REQUIRE(moa::grad_norm(list, *two_threads) == serial_norm);
    // Clipping on two threads scales every gradient as clipping on one does.
    REQUIRE(moa::clip_grad_norm(list, serial_norm / 4, *two_threads) == serial_norm);
    const float scale = static_cast<float>(serial_norm / 4 / (serial_norm + 1e-6));
    for (std::size_t i = 0; i < list.size(); ++i) REQUIRE(list[i].grad() == MatrixF(grads[i] * scale));
    moa::zero_grad(list, *two_threads);
    for (std::size_t i = 0; i < list.size(); ++i) REQUIRE(list[i].grad().isZero(0.0f));
  }
}

TEST_CASE("Copies, sums and zeroing between layers: split over two threads, the same numbers as on one",
          "[backend]") {
  const auto two_threads = std::make_shared<moa::Compute>(std::make_shared<moa::EigenGemm>(), 2);
  const moa::Compute& one_thread = *moa::Compute::standard();
  moa::Rng rng(4);
  const MatrixF a = random_matrix<float>(1000, 70, rng), b = random_matrix<float>(1000, 70, rng);
  REQUIRE(2 * moa::detail::elementwise_row_grain(70) <= 1000);  // so two threads take a share each
  const MatrixF sum = a + b;
  REQUIRE(moa::detail::parallel_add(*two_threads, a, b) == sum);
  REQUIRE(moa::detail::parallel_add(one_thread, a, b) == sum);
  REQUIRE_MOA_ERROR(moa::detail::parallel_add(*two_threads, a, MatrixF(3, 70)),
                    "moa::parallel_add: a is [1000, 70] but b is [3, 70]");
  MatrixF target(3, 3);
  moa::detail::parallel_assign(*two_threads, target, a);
  REQUIRE(target == a);
  moa::detail::parallel_assign(*two_threads, target, MatrixF::Zero(900, 20));
  REQUIRE((target.rows() == 900 && target.cols() == 20 && target.isZero()));
  // Linear caches its input by copy, or by move from a temporary: the same backward either way.
  moa::Rng copy_rng(6), move_rng(6);
  moa::Linear<float> copying(70, 5, true, copy_rng), moving(70, 5, true, move_rng);
  copying.set_compute(two_threads);
  moving.set_compute(two_threads);
  const MatrixF output = copying.forward(a);
  REQUIRE(moving.forward(MatrixF(a)) == output);
  const MatrixF grad_output = random_matrix<float>(1000, 5, rng);
  REQUIRE(copying.backward(grad_output) == moving.backward(grad_output));
  REQUIRE(copying.weight.grad == moving.weight.grad);
}

TEST_CASE("set_compute refuses a null compute, naming the layer", "[backend]") {
  moa::Rng rng(1);
  moa::Linear<float> linear(3, 2, true, rng);
  REQUIRE_MOA_ERROR(linear.set_compute(nullptr), "Linear::set_compute: compute is null");
  moa::FeedForward<float> ffn(3, 4, moa::Activation::relu, rng);
  REQUIRE_MOA_ERROR(ffn.set_compute(nullptr), "FeedForward::set_compute: compute is null");
  auto config = backend_moa_config();
  moa::MixtureOfAttention<float> moa_layer(config, rng);
  REQUIRE_MOA_ERROR(moa_layer.set_compute(nullptr), "MixtureOfAttention::set_compute: compute is null");
  moa::MultiHeadAttention<float> mha({config.model_dim, 2, 4}, rng);
  REQUIRE_MOA_ERROR(mha.set_compute(nullptr), "MultiHeadAttention::set_compute: compute is null");
  moa::CrossEntropyLoss<float> loss;
  REQUIRE_MOA_ERROR(loss.set_compute(nullptr), "CrossEntropyLoss::set_compute: compute is null");
  // The layer still works on its previous compute.
  REQUIRE(linear.forward(MatrixF::Ones(2, 3)).allFinite());
}

#ifdef MOA_TEST_HAVE_DNNL
TEST_CASE("oneDNN packed weights: inference reuses them, and every change of the weights is seen",
          "[moa][moh][mha][backend]") {
  // Products large enough for oneDNN (smaller ones go to Eigen, which packs nothing).
  const auto batch = moa::SequenceBatch::padded(64, {64, 50});
  moa::Rng rng(3);
  const MatrixF input = random_matrix<float>(batch.rows(), 128, rng);
  const MatrixF grad_output = random_matrix<float>(batch.rows(), 128, rng);
  const auto eigen = std::make_shared<moa::Compute>(std::make_shared<moa::EigenGemm>(), 1);
  auto check_layer = [&](auto& layer, const moa::ComputePtr& compute, double tolerance) {
    const auto* backend = dynamic_cast<const moa::DnnlGemm*>(&compute->backend());
    REQUIRE(backend != nullptr);
    moa::Adam<float> adam(moa::pack_parameters(layer));
    layer.set_compute(compute);
    // The layer's inference against a copy's on Eigen, twice (the second from the packed copies).
    auto require_current = [&](const char* after) {
      INFO("after " << after);
      layer.set_training(false);
      auto reference = layer;
      reference.set_compute(eigen);
      const MatrixF expected = reference.infer(input, batch, input, batch, true);
      const MatrixF first = layer.infer(input, batch, input, batch, true);
      REQUIRE(relative_error(first.template cast<double>(), expected.template cast<double>()) < tolerance);
      REQUIRE(backend->packed_bytes() > 0);
      REQUIRE(layer.infer(input, batch, input, batch, true) == first);
    };
    require_current("building");
    layer.set_training(true);
    layer.forward_self(input, batch, true);
    layer.backward_self(grad_output);
    adam.step(1e-2);
    require_current("an optimizer step");
    layer.q_proj.value *= 0.5f;
    layer.q_proj.touch();
    require_current("writing the query weights and touching them");
    for (const auto& entry : moa::parameters_of(layer)) entry.value() *= 1.25f;
    require_current("writing every parameter through a ParameterList");
  };
  std::vector<std::pair<moa::ComputePtr, double>> computes;
  for (int threads : {1, 2})
    computes.emplace_back(std::make_shared<moa::Compute>(std::make_shared<moa::DnnlGemm>(), threads), 1e-5);
  if (moa::DnnlGemm().has_bf16())
    computes.emplace_back(std::make_shared<moa::Compute>(std::make_shared<moa::DnnlGemm>(), 1, moa::Precision::bf16),
                          1e-2);
  for (const auto& [compute, tolerance] : computes) {
    INFO("threads " << compute->threads() << ", tolerance " << tolerance);
    moa::MixtureOfAttentionConfig moa_config;
    moa_config.model_dim = 128;
    moa_config.num_experts = 4;
    moa_config.top_k = 2;
    moa_config.head_dim = 64;
    moa::MixtureOfAttention<float> moa_layer(moa_config, rng);
    moa::init_normal(moa_layer.router.weight, rng, 0.0, 0.5);
    check_layer(moa_layer, compute, tolerance);
    moa::MixtureOfHeadsConfig moh_config;
    moh_config.model_dim = 128;
    moh_config.shared_heads = 1;
    moh_config.routed_heads = 4;
    moh_config.top_k = 1;
    moh_config.head_dim = 64;
    moa::MixtureOfHeads<float> moh_layer(moh_config, rng);
    moa::init_normal(moh_layer.router.weight, rng, 0.0, 0.5);
    check_layer(moh_layer, compute, tolerance);
    moa::MultiHeadAttention<float> mha_layer({128, 2, 64}, rng);
    check_layer(mha_layer, compute, tolerance);
  }
}
#endif
