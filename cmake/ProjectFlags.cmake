# Compile options for moa's own tests, benchmarks and examples, never for the library targets. Set
# per directory (no target of their own), so nothing is left behind in a parent project's scope.
if(MOA_WARNINGS AND CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
  add_compile_options(-Wall -Wextra -Wpedantic -Werror)
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND (MOA_NATIVE OR CMAKE_CXX_FLAGS MATCHES "-fsanitize"))
    # GCC 12 reports false positives inside its own AVX-512 intrinsics when Eigen inlines them, and
    # in libstdc++'s <regex> (through Catch2) when sanitizers instrument the code.
    add_compile_options(-Wno-maybe-uninitialized -Wno-uninitialized)
  endif()
endif()
if(MOA_NATIVE)
  add_compile_options(-march=native)
endif()
