// The (row, j) assignments of one MoE layer's routing, grouped by expert: what every expert
// implementation (CPU shard, CUDA host plan) runs, in one order.
#ifndef MOEMESH_ENGINE_EXPERT_GROUPS_H_
#define MOEMESH_ENGINE_EXPERT_GROUPS_H_

#include <cstdint>
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

}  // namespace moemesh

#endif  // MOEMESH_ENGINE_EXPERT_GROUPS_H_
