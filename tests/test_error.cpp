#include "support.hpp"

TEST_CASE("MOA_CHECK throws moa::Error naming the function, in every build type", "[error]") {
  const int width = 3;
  REQUIRE_MOA_ERROR(MOA_CHECK(width == 4, "Layer::forward", "input has width ", width, ", expected 4"),
                    "Layer::forward: input has width 3, expected 4");
  REQUIRE(moa_test::moa_error_message([&] { MOA_CHECK(width == 3, "Layer::forward", "never shown"); }) ==
          "<no moa::Error thrown>");
}

TEST_CASE("moa::Error is a std::runtime_error", "[error]") {
  REQUIRE_THROWS_AS(throw moa::Error("x"), std::runtime_error);
  REQUIRE(moa::detail::shape_of(moa::Matrix<float>(2, 5)) == "[2, 5]");
}
