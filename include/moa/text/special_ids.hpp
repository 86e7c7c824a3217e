// moa/text/special_ids.hpp - the special token ids, one convention everywhere (batching, decoding,
// and the SentencePiece models the examples train): 0 = padding, 1 = beginning of sequence,
// 2 = end of sequence, 3 = unknown; regular pieces start at 4.
#pragma once

#include "moa/tensor.hpp"

namespace moa {

constexpr Index kPadId = 0;
constexpr Index kBosId = 1;
constexpr Index kEosId = 2;
constexpr Index kUnkId = 3;
constexpr Index kFirstRegularId = 4;

}  // namespace moa
