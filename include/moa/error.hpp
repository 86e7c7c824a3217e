// moa/error.hpp - the library's one exception type and the argument-check macro.
//
// Every public entry point validates its arguments with MOA_CHECK. The checks are plain `if`s, not
// assert(), so they stay on under NDEBUG: a wrong shape is a clear exception in every build.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace moa {

// Thrown for a bad argument, a shape mismatch or a malformed file. The message names the function,
// the argument and what was received.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

namespace detail {

template <typename... Parts>
std::string concat(Parts&&... parts) {
  std::ostringstream stream;
  (stream << ... << std::forward<Parts>(parts));
  return stream.str();
}

// "[rows, cols]" for anything with rows() and cols().
template <typename MatrixLike>
std::string shape_of(const MatrixLike& matrix) {
  return concat("[", matrix.rows(), ", ", matrix.cols(), "]");
}

}  // namespace detail

// MOA_CHECK(condition, "Function::name", "argument x has shape ", shape_of(x), ", expected ...")
#define MOA_CHECK(condition, function, ...)                                                  \
  do {                                                                                       \
    if (!(condition)) {                                                                      \
      throw ::moa::Error(::moa::detail::concat(function, ": ", __VA_ARGS__));                \
    }                                                                                        \
  } while (false)

}  // namespace moa
