// moa/bfloat16_number.hpp - one bfloat16 number: a float rounded to its upper 16 bits, and back.
#pragma once

#include <cstdint>
#include <cstring>

namespace moa {

// x rounded to the nearest bfloat16 (ties to even): the upper 16 bits of a float. x is finite.
inline std::uint16_t round_to_bfloat16(float x) {
  std::uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<std::uint16_t>(bits >> 16);
}

inline float bfloat16_to_float(std::uint16_t x) {
  const std::uint32_t bits = static_cast<std::uint32_t>(x) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

}  // namespace moa
