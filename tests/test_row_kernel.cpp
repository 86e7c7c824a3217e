// moa's row kernel (moa/row_kernel.hpp): lists of rows times a packed weight, in place.
#include "support.hpp"

#include <numeric>

using namespace moa_test;

namespace {

// Rows a_rows of `a` times W^T (times scales[i] when given), into rows c_rows of `c`, in double.
void naive_rows_product(const MatrixF& a, const std::vector<Index>& a_rows, const MatrixF& weight, MatrixD& c,
                        const std::vector<Index>& c_rows, bool accumulate, const std::vector<float>& scales = {}) {
  for (std::size_t i = 0; i < a_rows.size(); ++i) {
    const Index source = a_rows[i], target = c_rows[i];
    const double scale = scales.empty() ? 1.0 : static_cast<double>(scales[i]);
    const Eigen::RowVectorXd product = scale * a.row(source).cast<double>() * weight.cast<double>().transpose();
    if (accumulate) c.row(target) += product;
    else c.row(target) = product;
  }
}

// A product's m rows: rows of a (of a_extent) and of c (of c_extent) to use, and scales (MoA's
// gates) when scaled. With lists, a's rows are drawn at random, and c's too when accumulating
// (rows may repeat: each adds in turn), else distinct and reversed; without, rows in order.
struct RowLists {
  std::vector<Index> a_rows, c_rows;  // [m] each
  std::vector<float> scales;          // [m] when scaled, else empty
};
RowLists random_row_lists(Index m, Index a_extent, Index c_extent, bool lists, bool accumulate, bool scaled,
                          moa::Rng& rng) {
  RowLists made;
  for (Index i = 0; i < m; ++i) {
    made.a_rows.push_back(static_cast<Index>(rng.next_u64() % static_cast<std::uint64_t>(a_extent)));
    made.c_rows.push_back(accumulate ? static_cast<Index>(rng.next_u64() % static_cast<std::uint64_t>(c_extent))
                                     : m - 1 - i);
  }
  if (!lists) {
    std::iota(made.a_rows.begin(), made.a_rows.end(), Index{0});
    std::iota(made.c_rows.begin(), made.c_rows.end(), Index{0});
  }
  for (Index i = 0; scaled && i < m; ++i) made.scales.push_back(static_cast<float>(rng.uniform(-2.0, 2.0)));
  return made;
}

}  // namespace

TEST_CASE("row kernel: lists of rows times a packed weight equal a naive product, in place", "[gemm][row_kernel]") {
  if (!moa::detail::row_kernel_available()) {
    WARN("this CPU has no AVX-512: the row kernel is not used here (products gather their rows instead)");
    REQUIRE_FALSE(moa::detail::row_kernel_serves(64));
    return;
  }
  moa::Rng rng(11);
  moa::detail::PanelStore store;
  std::uint64_t version = 0;
  // n: whole panels, a part panel of each width, several panels; k: below and above the depth block.
  for (const Index n : {16, 48, 64, 80, 112, 512}) {
    for (const Index k : {1, 7, 64, 129, 300}) {
      for (const Index m : {0, 1, 5, 6, 7, 13, 100, 200}) {
        for (const bool lists : {false, true}) {
          for (const bool accumulate : {false, true}) {
            // Scaled rows (MoA's gates) with row lists, accumulating or not.
            const bool scaled = lists && (m % 2 == 1 || accumulate);
            INFO("n " << n << ", k " << k << ", m " << m << ", row lists " << lists << ", accumulate " << accumulate
                      << ", scaled " << scaled);
            const MatrixF weight = random_matrix<float>(n, k, rng);   // [n, k]
            const MatrixF a = random_matrix<float>(m + 9, k, rng);    // [m + 9, k]: more rows than the list reads
            MatrixF c = random_matrix<float>(m + 5, n, rng);          // [m + 5, n]
            const auto [a_rows, c_rows, scales] = random_row_lists(m, m + 9, m + 5, lists, accumulate, scaled, rng);
            MatrixD expected = c.cast<double>();
            naive_rows_product(a, a_rows, weight, expected, c_rows, accumulate, scales);
            // Each weight a new version: a new matrix may take a freed one's place.
            const auto packed = store.get(weight.data(), n, k, k, ++version);
            // Fetching another weight ahead meanwhile (the next expert's) changes nothing.
            moa::detail::row_kernel(m, a.data(), k, lists ? a_rows.data() : nullptr, moa::detail::PanelView::packed(*packed), c.data(), n,
                                    lists ? c_rows.data() : nullptr, accumulate,
                                    moa::detail::Upcoming::of(weight.data(), n, k, k), scaled ? scales.data() : nullptr);
            REQUIRE(relative_error(c.cast<double>(), expected) < 1e-6);
          }
        }
      }
    }
  }
}

TEST_CASE("bf16 row kernel: lists of rounded rows times a weight packed in bfloat16 pairs equal a naive product",
          "[gemm][row_kernel][bf16]") {
  if (!moa::detail::bfloat16_dot_products_available() || !moa::detail::row_kernel_available()) {
    WARN("this CPU has no AVX512-BF16: bf16 products gather their rows for the backend instead");
    REQUIRE_FALSE(moa::detail::pair_row_kernel_serves(64, 64));
    return;
  }
  // With AMX the layers leave bf16 products to the backend's tile products; the kernel is tested.
  REQUIRE(moa::detail::pair_row_kernel_serves(64, 64) == !moa::detail::amx_bfloat16_available());
  REQUIRE_FALSE(moa::detail::pair_row_kernel_serves(64, 7));   // whole pairs only
  REQUIRE_FALSE(moa::detail::pair_row_kernel_serves(40, 64));  // whole packets of columns
  moa::Rng rng(19);
  moa::detail::PanelStore store;
  std::uint64_t version = 0;
  // n: whole panels, a part panel of each width, several panels; k: below and above the depth block
  // (128 pairs).
  for (const Index n : {16, 48, 64, 80, 112, 512}) {
    for (const Index k : {2, 6, 64, 258, 512}) {
      for (const Index m : {0, 1, 5, 6, 7, 13, 100, 200}) {
        for (const bool accumulate : {false, true}) {
          const bool scaled = m % 2 == 1 || accumulate;
          INFO("n " << n << ", k " << k << ", m " << m << ", accumulate " << accumulate << ", scaled " << scaled);
          const MatrixF weight = random_matrix<float>(n, k, rng);  // [n, k]
          const MatrixF a = random_matrix<float>(m + 9, k, rng);   // [m + 9, k]
          moa::BFloat16Matrix rounded_a;
          rounded_a.assign(*moa::Compute::standard(), a);
          MatrixF c = random_matrix<float>(m + 5, n, rng);  // [m + 5, n]
          const auto [a_rows, c_rows, scales] = random_row_lists(m, m + 9, m + 5, true, accumulate, scaled, rng);
          // The naive product of the rounded numbers: the kernel's only rounding beyond them is its
          // float sums'.
          const MatrixF rounded_weight = weight.unaryExpr([](float x) { return moa::bfloat16_to_float(moa::round_to_bfloat16(x)); });
          const MatrixF rounded_rows = a.unaryExpr([](float x) { return moa::bfloat16_to_float(moa::round_to_bfloat16(x)); });
          MatrixD expected = c.cast<double>();
          naive_rows_product(rounded_rows, a_rows, rounded_weight, expected, c_rows, accumulate, scales);
          const auto packed = store.get(weight.data(), n, k, k, ++version, true);
          REQUIRE(packed->panels.empty());
          moa::detail::rows_times_weight(*packed, m, rounded_a.view().data, k, a_rows.data(), c.data(), n, c_rows.data(),
                                         accumulate, moa::detail::Upcoming::of(weight.data(), n, k, k),
                                         scaled ? scales.data() : nullptr);
          REQUIRE(relative_error(c.cast<double>(), expected) < 1e-6);
        }
      }
    }
  }
}

TEST_CASE("row kernel: lists of rows times a weight read as it lies (a backward's product) equal a naive product",
          "[gemm][row_kernel]") {
  if (!moa::detail::row_kernel_available()) {
    WARN("this CPU has no AVX-512: backward products gather their rows instead");
    return;
  }
  moa::Rng rng(15);
  // M [k, n] as it lies is W = M^T: n one panel read in place (16, 48, 64) or panels copied
  // together (80, 512: rows a layer's width apart); k below and above the depth block.
  for (const Index n : {16, 48, 64, 80, 512}) {
    for (const Index k : {1, 16, 64, 200}) {
      for (const Index m : {0, 1, 7, 100}) {
        for (const bool accumulate : {false, true}) {
          INFO("n " << n << ", k " << k << ", m " << m << ", accumulate " << accumulate);
          const MatrixF stored = random_matrix<float>(k, n + 3, rng);  // [k, n + 3]: rows wider than the product
          const MatrixF weight = stored.leftCols(n).transpose();        // W [n, k]
          const MatrixF a = random_matrix<float>(m + 4, k, rng);
          MatrixF c = random_matrix<float>(m + 2, n, rng);
          std::vector<Index> a_rows, c_rows;
          for (Index i = 0; i < m; ++i) {
            a_rows.push_back(static_cast<Index>(rng.next_u64() % static_cast<std::uint64_t>(m + 4)));
            c_rows.push_back(static_cast<Index>(rng.next_u64() % static_cast<std::uint64_t>(m + 2)));
          }
          if (!accumulate) std::iota(c_rows.begin(), c_rows.end(), Index{0});
          MatrixD expected = c.cast<double>();
          naive_rows_product(a, a_rows, weight, expected, c_rows, accumulate);
          moa::detail::row_kernel(m, a.data(), k, a_rows.data(),
                                  moa::detail::PanelView::transposed(stored.data(), k, n, n + 3), c.data(), n,
                                  c_rows.data(), accumulate);
          REQUIRE(relative_error(c.cast<double>(), expected) < 1e-6);
        }
      }
    }
  }
}

TEST_CASE("Upcoming: a matrix in one piece is its lines; shares, and the lines beyond a count, split them without gap or overlap",
          "[row_kernel]") {
  using moa::detail::Upcoming;
  const std::vector<float> buffer(1000);
  const Upcoming whole = Upcoming::of(buffer.data(), 10, 100, 100);
  REQUIRE(whole.data == reinterpret_cast<const char*>(buffer.data()));
  REQUIRE(whole.lines == 63);  // 1000 floats: 62.5 lines of 16
  REQUIRE(Upcoming::of(buffer.data(), 10, 50, 100).lines == 0);  // rows apart: not one piece
  REQUIRE(Upcoming::of(buffer.data(), 1, 50, 100).lines == 4);   // one row is one piece
  REQUIRE(Upcoming::of(nullptr, 10, 100, 100).lines == 0);
  for (const Index lines : {0, 1, 5, 63, 2048}) {
    for (const Index parts : {1, 2, 3, 11, 64, 100}) {
      INFO(lines << " lines in " << parts << " parts");
      const Upcoming upcoming{whole.data, lines};
      Index covered = 0;
      for (Index part = 0; part < parts; ++part) {
        const Upcoming share = upcoming.share(part, parts);
        REQUIRE(share.lines >= 0);
        if (share.lines > 0) REQUIRE(share.data == upcoming.data + 64 * covered);
        covered += share.lines;
      }
      REQUIRE(covered == lines);
      // A range of shares is the shares it spans.
      const Upcoming range = upcoming.share(1, parts, 2);
      REQUIRE(range.lines == upcoming.share(1, parts).lines + upcoming.share(2, parts).lines);
    }
    // What a tile fetches as it runs, and the rest before it: the whole, once.
    for (const Index count : {0, 1, 5, 64, 3000}) {
      const Upcoming upcoming{whole.data, lines}, rest = upcoming.beyond(count);
      REQUIRE(rest.lines == std::max<Index>(0, lines - count));
      if (rest.lines > 0) REQUIRE(rest.data == upcoming.data + 64 * count);
    }
  }
}

TEST_CASE("outer kernel: a weight gradient G^T X over lists of rows equals a naive sum, for any split of its rows",
          "[gemm][row_kernel]") {
  if (!moa::detail::row_kernel_available()) {
    WARN("this CPU has no AVX-512: weight gradients gather their rows instead");
    return;
  }
  moa::Rng rng(16);
  // n: tiles of 6 rows and remainders; k: X read in place (one panel, rows in order) or copied;
  // m: below and above the kernel's block of 64 rows.
  for (const Index n : {1, 6, 16, 47, 512}) {
    for (const Index k : {16, 48, 64, 80, 512}) {
      for (const Index m : {0, 1, 5, 64, 150}) {
        for (const bool lists : {false, true}) {
          INFO("n " << n << ", k " << k << ", m " << m << ", row lists " << lists);
          const MatrixF g = random_matrix<float>(m + 3, n, rng);  // [m + 3, n]
          const MatrixF x = random_matrix<float>(m + 5, k, rng);  // [m + 5, k]
          std::vector<Index> g_rows(static_cast<std::size_t>(m)), x_rows(static_cast<std::size_t>(m));
          for (Index i = 0; i < m; ++i) {
            g_rows[static_cast<std::size_t>(i)] = lists ? static_cast<Index>(rng.next_u64() % static_cast<std::uint64_t>(m + 3)) : i;
            x_rows[static_cast<std::size_t>(i)] = lists ? static_cast<Index>(rng.next_u64() % static_cast<std::uint64_t>(m + 5)) : i;
          }
          const MatrixF start = random_matrix<float>(n, k, rng);
          MatrixD expected = start.cast<double>();
          for (Index i = 0; i < m; ++i)
            expected += g.row(g_rows[static_cast<std::size_t>(i)]).transpose().cast<double>() *
                        x.row(x_rows[static_cast<std::size_t>(i)]).cast<double>();
          MatrixF whole = start;
          moa::detail::outer_kernel(m, g.data(), n, lists ? g_rows.data() : nullptr, x.data(), k,
                                    lists ? x_rows.data() : nullptr, n, k, whole.data(), k);
          REQUIRE(relative_error(whole.cast<double>(), expected) < 1e-6);
          // Rows of w in two calls (as threads split them): the same floats.
          MatrixF split = start;
          const Index half = n / 2;
          moa::detail::outer_kernel(m, g.data(), n, lists ? g_rows.data() : nullptr, x.data(), k,
                                    lists ? x_rows.data() : nullptr, half, k, split.data(), k);
          moa::detail::outer_kernel(m, g.data() + half, n, lists ? g_rows.data() : nullptr, x.data(), k,
                                    lists ? x_rows.data() : nullptr, n - half, k, split.data() + half * k, k);
          REQUIRE((split.array() == whole.array()).all());
        }
      }
    }
  }
}

TEST_CASE("detail::packed_weight: inference keeps a packed copy per version, training packs into scratch",
          "[gemm][row_kernel]") {
  moa::Rng rng(12);
  MatrixF weight = random_matrix<float>(64, 40, rng);  // [n = 64, k = 40]
  const MatrixF a = random_matrix<float>(10, 40, rng);
  const std::vector<Index> a_rows{9, 0, 3, 3, 7};
  const std::vector<Index> c_rows{4, 1, 0, 2, 3};
  const auto compute = std::make_shared<moa::Compute>();
  moa::detail::PanelWeight scratch;
  auto run = [&](const moa::Compute& on, std::uint64_t version, const MatrixF& w) {
    MatrixF c = MatrixF::Constant(5, w.rows(), 7.0f);
    const auto packed = moa::detail::packed_weight<float>(on, w, version, scratch);
    moa::detail::rows_times_weight<float>(*packed, 5, a.data(), 40, a_rows.data(), c.data(), w.rows(), c_rows.data(),
                                          false);
    return c;
  };
  auto expected_of = [&](const MatrixF& w) {
    MatrixD expected = MatrixD::Constant(5, w.rows(), 7.0);
    naive_rows_product(a, a_rows, w, expected, c_rows, false);
    return expected;
  };
  // bf16, doubles and widths the kernel has no panel for gather their rows instead.
  REQUIRE_FALSE(moa::detail::rows_times_weight_serves<float>(moa::Precision::bf16, 64));
  REQUIRE_FALSE(moa::detail::rows_times_weight_serves<float>(moa::Precision::f32, 40));
  REQUIRE_FALSE(moa::detail::rows_times_weight_serves<double>(moa::Precision::f32, 64));
  if (!moa::detail::row_kernel_available()) {
    WARN("this CPU has no AVX-512: the row kernel is not used here");
    REQUIRE_FALSE(moa::detail::rows_times_weight_serves<float>(moa::Precision::f32, 64));
    return;
  }
  REQUIRE(moa::detail::rows_times_weight_serves<float>(moa::Precision::f32, 64));
  // Training (no version): packed into the scratch on every call, nothing kept.
  REQUIRE(relative_error(run(*compute, 0, weight).cast<double>(), expected_of(weight)) < 1e-6);
  REQUIRE(scratch.panels.size() == 64 * 40);
  REQUIRE(compute->panels().bytes() == 0);
  // Inference: the same version reads the kept copy, stale or not; a new version packs again.
  REQUIRE(relative_error(run(*compute, 3, weight).cast<double>(), expected_of(weight)) < 1e-6);
  REQUIRE(compute->panels().bytes() == 64 * 40 * sizeof(float));
  weight *= 2.0f;
  REQUIRE(relative_error(run(*compute, 3, weight).cast<double>(), expected_of(weight / 2.0f)) < 1e-6);
  REQUIRE(relative_error(run(*compute, 0, weight).cast<double>(), expected_of(weight)) < 1e-6);
  REQUIRE(relative_error(run(*compute, 4, weight).cast<double>(), expected_of(weight)) < 1e-6);
  REQUIRE(compute->panels().bytes() == 64 * 40 * sizeof(float));
  // Threads share one store: a compute's serial() packs nothing again.
  const auto two = std::make_shared<moa::Compute>(std::make_shared<moa::EigenGemm>(), 2);
  run(*two, 4, weight);
  run(two->serial(), 4, weight);
  REQUIRE(two->panels().bytes() == 64 * 40 * sizeof(float));
  REQUIRE(&two->serial().panels() == &two->panels());
}

TEST_CASE("packing: 16 x 16 blocks transposed in registers and the edges give every element its place",
          "[gemm][row_kernel]") {
  moa::Rng rng(18);
  for (const Index n : {16, 37, 64, 80, 130}) {
    for (const Index k : {1, 15, 16, 40, 512}) {
      INFO("n " << n << ", k " << k);
      const MatrixF stored = random_matrix<float>(n, k + 2, rng);  // rows wider than the weight
      moa::detail::PanelWeight packed;
      moa::detail::pack_weight(stored.data(), n, k, k + 2, packed);
      REQUIRE(static_cast<Index>(packed.panels.size()) == n * k);
      for (Index j = 0; j < n; ++j)
        for (Index kk = 0; kk < k; ++kk) {
          const Index p = j / moa::detail::kPanelWidth, width = packed.panel_width(p);
          REQUIRE(packed.panel(p)[kk * width + j % moa::detail::kPanelWidth] == stored(j, kk));
        }
    }
  }
}

TEST_CASE("row kernel in the layers: inference (packed copies kept) equals the evaluation forward (packed as used)",
          "[moa][moh][row_kernel]") {
  const auto batch = moa::SequenceBatch::padded(24, {24, 17, 9});
  // head_dim 64 and 48: the kernel's panels for both projections; 40: for the output projection
  // only (d_model 96), the query projection's rows are gathered in both.
  for (const Index head_dim : {64, 48, 40}) {
    for (const int threads : {1, 2}) {
      INFO("head_dim " << head_dim << ", threads " << threads);
      const auto compute = std::make_shared<moa::Compute>(std::make_shared<moa::EigenGemm>(), threads);
      moa::Rng rng(13);
      const MatrixF input = random_matrix<float>(batch.rows(), 96, rng);
      moa::MixtureOfAttentionConfig moa_config;
      moa_config.model_dim = 96;
      moa_config.num_experts = 6;
      moa_config.top_k = 2;
      moa_config.head_dim = head_dim;
      moa::MixtureOfAttention<float> moa_layer(moa_config, rng);
      moa::init_normal(moa_layer.router.weight, rng, 0.0, 0.5);
      moa::MixtureOfHeadsConfig moh_config;
      moh_config.model_dim = 96;
      moh_config.shared_heads = 2;
      moh_config.routed_heads = 6;
      moh_config.top_k = 2;
      moh_config.head_dim = head_dim;
      moa::MixtureOfHeads<float> moh_layer(moh_config, rng);
      moa::init_normal(moh_layer.router.weight, rng, 0.0, 0.5);
      auto check = [&](auto& layer) {
        layer.set_compute(compute);
        layer.set_training(false);
        const MatrixF evaluated = layer.forward_self(input, batch, true);
        const MatrixF inferred = layer.infer(input, batch, input, batch, true);
        REQUIRE(relative_error(inferred.cast<double>(), evaluated.cast<double>()) < 1e-6);
        REQUIRE((layer.infer(input, batch, input, batch, true).array() == inferred.array()).all());
      };
      check(moa_layer);
      check(moh_layer);
      REQUIRE((compute->panels().bytes() > 0) == moa::detail::row_kernel_available());
    }
  }
}

TEST_CASE("row kernel with experts as parts on 2 threads: inference equals the evaluation forward",
          "[moa][row_kernel]") {
  // 182 tokens x 4 of 8 experts, about 91 rows each: on 2 threads each expert is a part of its own,
  // and its outputs are added into the token rows by columns, a panel per thread.
  moa::MixtureOfAttentionConfig config;
  config.model_dim = 128;
  config.num_experts = 8;
  config.top_k = 4;
  config.head_dim = 32;
  const auto batch = moa::SequenceBatch::padded(64, {64, 50, 61, 7});
  moa::Rng rng(14);
  moa::MixtureOfAttention<float> layer(config, rng);
  moa::init_normal(layer.router.weight, rng, 0.0, 0.5);
  const auto compute = std::make_shared<moa::Compute>(std::make_shared<moa::EigenGemm>(), 2);
  layer.set_compute(compute);
  layer.set_training(false);
  const MatrixF input = random_matrix<float>(batch.rows(), config.model_dim, rng);
  const MatrixF evaluated = layer.forward_self(input, batch, true);
  const MatrixF inferred = layer.infer(input, batch, input, batch, true);
  REQUIRE(relative_error(inferred.cast<double>(), evaluated.cast<double>()) < 1e-6);
  REQUIRE((compute->panels().bytes() > 0) == moa::detail::row_kernel_available());
}


TEST_CASE("row kernels in the backward: float MoA and MoH gradients match double at widths of every kernel path",
          "[moa][moh][row_kernel]") {
  const auto batch = moa::SequenceBatch::padded(30, {30, 21, 26});
  // d_model 160: three panels, the last part-wide. head_dim 16: one panel, the attended rows read in
  // place by the weight-gradient kernel; 80: the output weight read as it lies in two panels, copied.
  for (const Index head_dim : {16, 80}) {
    for (const int threads : {1, 2}) {
      INFO("head_dim " << head_dim << ", threads " << threads);
      const auto compute = std::make_shared<moa::Compute>(std::make_shared<moa::EigenGemm>(), threads);
      moa::Rng rng(17);
      const MatrixD input = random_matrix(batch.rows(), 160, rng);
      const MatrixD grad_output = random_matrix(batch.rows(), 160, rng);
      auto check = [&](auto& layer, auto& reference) {
        using Float = std::decay_t<decltype(layer)>;
        copy_parameters(layer, reference);
        layer.set_compute(compute);
        const MatrixD expected = reference.forward_self(input, batch, true);
        const MatrixF actual = layer.forward_self(input.cast<float>(), batch, true);
        REQUIRE(relative_error(actual.template cast<double>(), expected) < 1e-5);
        const MatrixD expected_grad = reference.backward_self(grad_output);
        const MatrixF actual_grad = layer.backward_self(grad_output.cast<float>());
        REQUIRE(relative_error(actual_grad.template cast<double>(), expected_grad) < 1e-4);
        require_same_gradients<Float>(layer, reference, 1e-4);
      };
      moa::MixtureOfAttentionConfig moa_config;
      moa_config.model_dim = 160;
      moa_config.num_experts = 5;
      moa_config.top_k = 2;
      moa_config.head_dim = head_dim;
      moa::MixtureOfAttention<double> moa_reference(moa_config, rng);
      moa::init_normal(moa_reference.router.weight, rng, 0.0, 0.5);
      moa::MixtureOfAttention<float> moa_layer(moa_config, rng);
      check(moa_layer, moa_reference);
      moa::MixtureOfHeadsConfig moh_config;
      moh_config.model_dim = 160;
      moh_config.shared_heads = 1;
      moh_config.routed_heads = 5;
      moh_config.top_k = 2;
      moh_config.head_dim = head_dim;
      moa::MixtureOfHeads<double> moh_reference(moh_config, rng);
      moa::init_normal(moh_reference.router.weight, rng, 0.0, 0.5);
      moa::MixtureOfHeads<float> moh_layer(moh_config, rng);
      check(moh_layer, moh_reference);
    }
  }
}

TEST_CASE("experts as parts on 2 threads: sums into token rows by columns equal one thread's, per assignment match",
          "[moa][row_kernel][threads]") {
  // 200 tokens x 4 of 8 experts, about 100 rows each: experts run as parts of their own on 2
  // threads. d_model 128 (two panels) splits evenly, and each thread adds every expert into its
  // panel of the token rows: the same sums as one thread, bit for bit. 192 (three panels) does not:
  // per-assignment rows, summed token by token afterwards, match to rounding.
  const Index tokens_count = 200, experts = 8, top_k = 4, head_dim = 32;
  moa::Rng rng(23);
  std::vector<Index> expert_of, tokens;  // [A] each
  for (Index t = 0; t < tokens_count; ++t) {
    std::vector<Index> order(static_cast<std::size_t>(experts));
    std::iota(order.begin(), order.end(), Index{0});
    for (Index i = experts - 1; i > 0; --i)
      std::swap(order[static_cast<std::size_t>(i)],
                order[static_cast<std::size_t>(rng.next_u64() % static_cast<std::uint64_t>(i + 1))]);
    for (Index slot = 0; slot < top_k; ++slot) {
      expert_of.push_back(order[static_cast<std::size_t>(slot)]);
      tokens.push_back(t);
    }
  }
  const auto plan = moa::DispatchPlan::build(expert_of, experts, top_k);
  const Index assignments = static_cast<Index>(tokens.size());
  for (const Index model : {128, 192}) {
    INFO("d_model " << model);
    const MatrixF attended = random_matrix<float>(assignments, head_dim, rng);          // [A, d_h]
    const MatrixF out_weights = random_matrix<float>(experts * model, head_dim, rng);   // [E*d_model, d_h]
    const MatrixF in_weights = random_matrix<float>(experts * head_dim, model, rng);    // [E*d_h, d_model]
    const MatrixF grad_queries = random_matrix<float>(assignments, head_dim, rng);      // [A, d_h]
    const MatrixF input = random_matrix<float>(tokens_count, model, rng);               // [N, d_model]
    const MatrixF grad_input_before = random_matrix<float>(tokens_count, model, rng);   // [N, d_model]
    const MatrixF weight_grad_before = random_matrix<float>(experts * head_dim, model, rng);
    std::vector<float> gates(static_cast<std::size_t>(assignments));
    for (float& gate : gates) gate = static_cast<float>(rng.uniform(0.0, 1.0));

    // The sums in double.
    MatrixD expected_output = MatrixD::Zero(tokens_count, model);
    MatrixD expected_grad_input = grad_input_before.cast<double>();
    MatrixD expected_weight_grad = weight_grad_before.cast<double>();
    for (Index a = 0; a < assignments; ++a) {
      const Index e = expert_of[static_cast<std::size_t>(a)], t = tokens[static_cast<std::size_t>(a)];
      expected_output.row(t) += static_cast<double>(gates[static_cast<std::size_t>(a)]) * attended.row(a).cast<double>() *
                                out_weights.middleRows(e * model, model).cast<double>().transpose();
      expected_grad_input.row(t) += grad_queries.row(a).cast<double>() * in_weights.middleRows(e * head_dim, head_dim).cast<double>();
      expected_weight_grad.middleRows(e * head_dim, head_dim) +=
          grad_queries.row(a).cast<double>().transpose() * input.row(t).cast<double>();
    }

    std::vector<MatrixF> outputs, grad_inputs, weight_grads;
    for (const int threads : {1, 2}) {
      const moa::Compute compute(std::make_shared<moa::EigenGemm>(), threads);
      moa::ExpertProjections<float> projections;
      outputs.push_back(projections.project_out(compute, attended, gates.data(), tokens, plan, out_weights,
                                                tokens_count, moa::Precision::f32));
      MatrixF grad_input = grad_input_before, weight_grad = weight_grad_before;
      projections.backward_in(compute, grad_queries, input, tokens, plan, in_weights, weight_grad, grad_input);
      grad_inputs.push_back(grad_input);
      weight_grads.push_back(weight_grad);
    }
    for (std::size_t run = 0; run < 2; ++run) {
      INFO("threads " << run + 1);
      REQUIRE(relative_error(outputs[run].cast<double>(), expected_output) < 1e-5);
      REQUIRE(relative_error(grad_inputs[run].cast<double>(), expected_grad_input) < 1e-5);
      REQUIRE(relative_error(weight_grads[run].cast<double>(), expected_weight_grad) < 1e-5);
    }
    if (model == 128 && moa::detail::row_kernel_available()) {
      REQUIRE(outputs[1] == outputs[0]);
      REQUIRE(grad_inputs[1] == grad_inputs[0]);
      REQUIRE(weight_grads[1] == weight_grads[0]);
    } else {
      REQUIRE(outputs[1] != outputs[0]);  // summed by assignment: another order of additions
    }
  }
}
