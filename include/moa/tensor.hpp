// moa/tensor.hpp - matrix aliases and the shape conventions used throughout moa.
//
// Conventions, written once:
//   * Activations are row-major matrices with one row per token and one column per feature.
//     A batch of B sequences padded to length T is a [B*T, d_model] matrix; row b*T + t is token t
//     of sequence b.
//   * Weights follow PyTorch's [out, in] order, so y = x W^T and a checkpoint interchanges with a
//     PyTorch state dict. A 3-d parameter such as q_proj.weight [E, d_h, d_model] is stored as the
//     row-major matrix [E*d_h, d_model], whose bytes are exactly PyTorch's contiguous layout; its
//     logical shape is kept in Parameter::shape.
//   * Token ids are `Index` (std::ptrdiff_t) vectors of length B*T in the same row order.
//   * Every buffer in the code carries a shape comment, e.g. `// scores: [T*k, S]`.
#pragma once

#include <Eigen/Core>

#include <cstddef>
#include <vector>

namespace moa {

using Index = Eigen::Index;

template <typename Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

template <typename Scalar>
using RowVector = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>;

template <typename Scalar>
using ColumnVector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

// true = may attend / is a real token, false = masked out.
using BoolMatrix = Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

using TokenIds = std::vector<Index>;

}  // namespace moa
