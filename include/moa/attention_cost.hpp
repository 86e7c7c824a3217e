// moa/attention_cost.hpp - the one cost model of the attention layers, in FLOPs (2 per multiply-add):
// what MixtureOfAttention, MixtureOfHeads and MultiHeadAttention report as last_forward_flops(), what a model spec
// costs per token (AttentionSpec::flops_per_token), and what the benchmarks divide by.
#pragma once

#include "moa/tensor.hpp"

namespace moa {
namespace cost {

// rows x [in -> out] linear map.
inline double linear(double rows, double in, double out) { return 2.0 * rows * in * out; }

// Scores Q K^T and P V over the attended (query row, key) pairs of head width head_dim.
inline double attention(double visible_pairs, double head_dim) { return 2.0 * linear(visible_pairs, head_dim, 1.0); }

// MoA's projections: the router over E experts, the shared K and V heads over the key rows, and
// per assignment (token, chosen expert) that expert's Q and O.
inline double moa_projections(double model_dim, double head_dim, double num_experts, double query_rows,
                              double key_rows, double assignments) {
  return linear(query_rows, model_dim, num_experts) + 2.0 * linear(key_rows, model_dim, head_dim) +
         2.0 * linear(assignments, model_dim, head_dim);
}

// MoH's projections: its three routers (h_r routed heads; h_s shared when h_s > 1; the two groups
// when h_s > 0), every head's K and V over the key rows, and per assignment (token, head it uses)
// that head's Q and O.
inline double moh_projections(double model_dim, double head_dim, double shared_heads, double routed_heads,
                              double query_rows, double key_rows, double assignments) {
  const double gate_outputs = routed_heads + (shared_heads > 1 ? shared_heads : 0.0) + (shared_heads > 0 ? 2.0 : 0.0);
  return linear(query_rows, model_dim, gate_outputs) +
         2.0 * linear(key_rows, model_dim, (shared_heads + routed_heads) * head_dim) +
         2.0 * linear(assignments, model_dim, head_dim);
}

// Multi-head attention's projections of total width h * d_h: Q and O over the query rows, K and V
// over the key rows.
inline double mha_projections(double model_dim, double width, double query_rows, double key_rows) {
  return 2.0 * linear(query_rows, model_dim, width) + 2.0 * linear(key_rows, model_dim, width);
}

}  // namespace cost
}  // namespace moa
