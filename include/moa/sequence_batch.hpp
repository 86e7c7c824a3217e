// moa/sequence_batch.hpp - B padded sequences stacked as the B*T rows of one activation matrix.
#pragma once

#include "moa/error.hpp"
#include "moa/tensor.hpp"

#include <utility>
#include <vector>

namespace moa {

// B sequences padded to a common length T: the activation has B*T rows, row b*T + t is token t of
// sequence b, and tokens t >= lengths[b] are padding.
struct SequenceBatch {
  Index batch_size = 0;
  Index length = 0;            // padded length T
  std::vector<Index> lengths;  // true length of each sequence; empty means every one is full

  static SequenceBatch full(Index batch_size, Index length) { return {batch_size, length, {}}; }
  static SequenceBatch padded(Index length, std::vector<Index> lengths) {
    const Index batch_size = static_cast<Index>(lengths.size());
    return {batch_size, length, std::move(lengths)};
  }

  Index rows() const { return batch_size * length; }
  Index length_of(Index sequence) const { return lengths.empty() ? length : lengths[static_cast<std::size_t>(sequence)]; }
  bool is_token(Index row) const { return row % length < length_of(row / length); }
  // Rows flagged true where the batch has a real token.
  std::vector<char> token_flags() const {
    std::vector<char> flags(static_cast<std::size_t>(rows()));
    for (Index row = 0; row < rows(); ++row) flags[static_cast<std::size_t>(row)] = is_token(row);
    return flags;
  }
  Index tokens() const {
    Index total = 0;
    for (Index b = 0; b < batch_size; ++b) total += length_of(b);
    return total;
  }

  // Throws unless the batch is well formed and describes `rows` activation rows.
  void validate(const char* function, const char* argument, Index rows) const {
    MOA_CHECK(batch_size > 0 && length > 0, function, argument, " batch has batch_size ", batch_size, " and length ",
              length, "; both must be positive");
    MOA_CHECK(lengths.empty() || static_cast<Index>(lengths.size()) == batch_size, function, argument, " batch has ",
              lengths.size(), " lengths for batch_size ", batch_size);
    for (Index b = 0; b < static_cast<Index>(lengths.size()); ++b) {
      MOA_CHECK(lengths[static_cast<std::size_t>(b)] >= 0 && lengths[static_cast<std::size_t>(b)] <= length, function,
                argument, " batch has lengths[", b, "] = ", lengths[static_cast<std::size_t>(b)], " outside [0, ",
                length, "]");
    }
    MOA_CHECK(rows == batch_size * length, function, argument, " has ", rows, " rows but its batch describes ",
              batch_size, " x ", length, " = ", batch_size * length);
  }
};

}  // namespace moa
