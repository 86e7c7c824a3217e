// A program compiled with -fopenmp (the consumer's choice): Eigen then parallelizes its own matrix
// products on omp_get_max_threads() threads, and each thread of moa's pool would start an OpenMP
// team of its own. moa's products must run on the Compute's threads only. libgomp keeps the
// threads of a team alive, so a product that parallelized leaves more threads in the process.
#include "moa/moa.hpp"

#include <catch2/catch.hpp>
#include <omp.h>

#include <filesystem>
#include <iterator>

namespace {

long process_threads() {
  const std::filesystem::directory_iterator tasks("/proc/self/task");
  return static_cast<long>(std::distance(std::filesystem::begin(tasks), std::filesystem::end(tasks)));
}

moa::Matrix<float> random_matrix(moa::Index rows, moa::Index cols, moa::Rng& rng) {
  moa::Matrix<float> matrix(rows, cols);
  moa::init_normal(matrix, rng, 0.0, 1.0);
  return matrix;
}

}  // namespace

TEST_CASE("with OpenMP, moa's products run on the Compute's threads alone", "[openmp]") {
  REQUIRE(_OPENMP > 0);
  if (!std::filesystem::exists("/proc/self/task")) {
    WARN("no /proc/self/task to count the process's threads on this system: not checked");
    return;
  }
  omp_set_num_threads(4);
  moa::Rng rng(3);
  // Eigen's general product (no small-product kernel): large enough for Eigen to parallelize it.
  const moa::Matrix<float> a = random_matrix(256, 192, rng), b = random_matrix(192, 160, rng);
  moa::Matrix<double> expected = moa::Matrix<double>::Zero(256, 160);  // by loops: Eigen's product would start a team
  for (moa::Index i = 0; i < 256; ++i)
    for (moa::Index p = 0; p < 192; ++p)
      for (moa::Index j = 0; j < 160; ++j) expected(i, j) += double(a(i, p)) * double(b(p, j));
  for (int threads : {1, 2}) {
    SECTION(std::to_string(threads) + " thread(s)") {
      const moa::Compute compute(std::make_shared<moa::EigenGemm>(), threads);
      const long before = process_threads();
      moa::Matrix<float> c(256, 160);
      for (int repeat = 0; repeat < 3; ++repeat) moa::gemm<float>(compute, a, moa::Transpose::no, b, moa::Transpose::no, c);
      CHECK(process_threads() == before);
      CHECK(omp_get_max_threads() == 4);  // the caller's setting, restored
      CHECK((c.cast<double>() - expected).norm() <= 1e-5 * expected.norm());
    }
  }
}
