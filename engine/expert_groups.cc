#include "engine/expert_groups.h"

namespace moemesh {

void GroupByExpert(const int32_t* ids, int64_t n, int64_t k, int64_t num_experts,
                   ExpertGroups* g) {
  const int64_t nk = n * k;
  std::vector<int32_t> next(num_experts, 0);  // counts, then each expert's next grouped row
  for (int64_t a = 0; a < nk; ++a) {
    if (ids[a] >= 0 && ids[a] < num_experts) ++next[ids[a]];
  }
  g->experts.clear();
  g->begin.clear();
  int32_t off = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    const int32_t count = next[e];
    next[e] = off;
    if (count == 0) continue;
    g->experts.push_back(static_cast<int32_t>(e));
    g->begin.push_back(off);
    off += count;
  }
  g->begin.push_back(off);
  g->assignment.assign(off, -1);
  g->where.assign(nk, -1);
  for (int64_t a = 0; a < nk; ++a) {
    const int32_t e = ids[a];
    if (e < 0 || e >= num_experts) continue;
    g->assignment[next[e]] = static_cast<int32_t>(a);
    g->where[a] = next[e]++;
  }
}

}  // namespace moemesh
