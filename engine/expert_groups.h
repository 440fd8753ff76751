// The (row, j) assignments of one MoE layer's routing, grouped by expert: what every expert
// implementation (CPU shard, CUDA host plan) runs, in one order.
#ifndef MOEMESH_ENGINE_EXPERT_GROUPS_H_
#define MOEMESH_ENGINE_EXPERT_GROUPS_H_

#include <cstdint>
#include <optional>
#include <vector>

namespace moemesh {

// Group g is expert experts[g]; its grouped rows are [begin[g], begin[g + 1]). Experts ascend;
// within an expert, assignments keep their order (rows ascending). ids outside [0, num_experts)
// (-1: an unused slot) are left out.
struct ExpertGroups {
  std::vector<int32_t> experts;     // [G] experts with at least one row
  std::vector<int32_t> begin;       // [G + 1]
  std::vector<int32_t> assignment;  // [rows] index r * k + j into ids / weights
  std::vector<int32_t> where;       // [n * k] grouped row of each assignment, -1 if left out

  int32_t groups() const { return static_cast<int32_t>(experts.size()); }
  int32_t rows() const { return begin.empty() ? 0 : begin.back(); }
  // Source row of grouped row i (ids are [n, k]).
  int32_t row(int32_t i, int64_t k) const { return static_cast<int32_t>(assignment[i] / k); }
};

// Groups ids [n, k] (reusing g's storage).
void GroupByExpert(const int32_t* ids, int64_t n, int64_t k, int64_t num_experts,
                   ExpertGroups* g);

// Groups laid out for batched GEMMs of one shape: groups of similar size share a bucket, and
// every group of a bucket is padded to the bucket's row count (a multiple of `align`), so one
// batched product with uniform m, n, k runs a bucket (the CUDA expert path: cuBLAS's batched GEMM
// over all experts at once instead of one small GEMM per expert). A group joins the current
// bucket (groups taken largest first) while its rows fill at least `fill` of the bucket's padded
// rows (or it would pad to the same count alone), so every group's padding is under `align` rows
// or under 1 - fill of its padded rows.
struct PaddedBuckets {
  std::vector<int32_t> dst_begin;     // [G + 1] group g's padded rows, groups in their order
  std::vector<int32_t> order;         // [G] groups, bucket by bucket
  std::vector<int32_t> bucket_begin;  // [B + 1] into order
  std::vector<int32_t> bucket_rows;   // [B] padded rows of each group of bucket b
                                      // (PadGroupsToBlocks: of each block)
  int32_t padded_rows() const { return dst_begin.empty() ? 0 : dst_begin.back(); }
  int32_t buckets() const { return static_cast<int32_t>(bucket_rows.size()); }
};

// begin: [G + 1] row offsets of the groups (ascending; empty groups allowed).
PaddedBuckets PadGroups(const std::vector<int32_t>& begin, int32_t align = 8, double fill = 0.8);

// Groups padded to multiples of `block` rows, in group order, for a batched product whose
// entries are blocks of `block` rows (each with its group's weights): one bucket of
// `block`-row entries (bucket_rows {block}; a group spans (dst_begin[g + 1] - dst_begin[g]) /
// block entries, none when empty). Padding per group is under `block` rows.
PaddedBuckets PadGroupsToBlocks(const std::vector<int32_t>& begin, int32_t block);

// The layout of one strided batched product (cuBLAS's strided batched GEMM: no pointer arrays)
// over groups whose `slot`s (the experts' places in one weight array) strictly ascend: one
// bucket whose row count is the largest group's, padded to `align`, and group g at padded row
// (slot[g] - slot[0]) * that count, so the i-th padded block is slot slot[0] + i's. The blocks of
// slots without a group are padding (batch entries computed on zero rows). nullopt when the slots
// do not strictly ascend. Every group in one bucket, in group order.
std::optional<PaddedBuckets> PadGroupsBySlot(const std::vector<int32_t>& begin,
                                             const std::vector<int32_t>& slot, int32_t align = 8);

}  // namespace moemesh

#endif  // MOEMESH_ENGINE_EXPERT_GROUPS_H_
