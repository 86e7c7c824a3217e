#include "support.hpp"

#include <cmath>

using namespace moa_test;

TEST_CASE("Rng is SplitMix64: known first outputs", "[random]") {
  moa::Rng rng(0);
  // Reference values of SplitMix64 seeded with 0.
  REQUIRE(rng.next_u64() == 0xE220A8397B1DCDAFULL);
  REQUIRE(rng.next_u64() == 0x6E789E6AA1B965F4ULL);
}

TEST_CASE("Rng: the same seed gives the same numbers, state can be saved and restored", "[random]") {
  moa::Rng a(42), b(42), c(43);
  for (int i = 0; i < 100; ++i) REQUIRE(a.next_u64() == b.next_u64());
  REQUIRE(a.next_u64() != c.next_u64());
  const std::uint64_t saved = a.state();
  const double first = a.normal();
  a.set_state(saved);
  REQUIRE(a.normal() == first);
}

TEST_CASE("Rng::discard skips draws: a copy advanced by i continues from draw i", "[random]") {
  moa::Rng serial(77);
  std::vector<std::uint64_t> draws;
  for (int i = 0; i < 10; ++i) draws.push_back(serial.next_u64());
  for (std::uint64_t skip : {0u, 1u, 7u}) {
    moa::Rng jumped(77);
    jumped.discard(skip);
    REQUIRE(jumped.next_u64() == draws[skip]);
  }
  moa::Rng jumped(77);
  jumped.discard(10);
  REQUIRE(jumped.state() == serial.state());
}

TEST_CASE("Rng::peek(i) is draw i from here, and draws nothing", "[random]") {
  moa::Rng serial(5), peeking(5);
  for (std::uint64_t i = 0; i < 20; ++i) REQUIRE(peeking.peek(i) == serial.next_u64());
  REQUIRE(peeking.state() == moa::Rng(5).state());
  REQUIRE(peeking.next_u64() == moa::Rng(5).next_u64());
}

TEST_CASE("Rng: uniform, below and normal have the right moments", "[random]") {
  moa::Rng rng(7);
  const int draws = 200000;
  double sum = 0, sum_squares = 0, uniform_sum = 0;
  std::vector<int> counts(5, 0);
  for (int i = 0; i < draws; ++i) {
    const double u = rng.uniform();
    REQUIRE(u >= 0.0);
    REQUIRE(u < 1.0);
    uniform_sum += u;
    counts[rng.below(5)]++;
    const double z = rng.normal();
    sum += z;
    sum_squares += z * z;
  }
  REQUIRE(uniform_sum / draws == Approx(0.5).margin(0.01));
  REQUIRE(sum / draws == Approx(0.0).margin(0.01));
  REQUIRE(sum_squares / draws == Approx(1.0).margin(0.02));
  for (int count : counts) REQUIRE(count == Approx(draws / 5.0).epsilon(0.03));
  REQUIRE_MOA_ERROR(rng.below(0), "Rng::below");
}

TEMPLATE_TEST_CASE("Xavier uniform stays within its bound and fills it", "[random]", float, double) {
  moa::Rng rng(1);
  moa::Parameter<TestType> weight("weight", {30, 50});
  moa::init_xavier_uniform(weight, rng);
  const double bound = std::sqrt(6.0 / 80.0);
  REQUIRE(weight.value.maxCoeff() <= bound);
  REQUIRE(weight.value.minCoeff() >= -bound);
  REQUIRE(weight.value.maxCoeff() > 0.9 * bound);
  REQUIRE(weight.value.minCoeff() < -0.9 * bound);
  moa::init_zeros(weight);
  REQUIRE(weight.value.isZero(0));
  REQUIRE_MOA_ERROR(moa::init_xavier_uniform(weight.value, rng, 0, 3), "init_xavier_uniform");
  REQUIRE_MOA_ERROR(moa::init_normal(weight.value, rng, 0.0, -1.0), "init_normal");
  REQUIRE_MOA_ERROR(moa::init_uniform(weight.value, rng, 1.0, 0.0), "init_uniform");
}
