#include "engine/expert_groups.h"

#include <algorithm>

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

PaddedBuckets PadGroups(const std::vector<int32_t>& begin, int32_t align, double fill) {
  PaddedBuckets p;
  const int32_t G = begin.empty() ? 0 : static_cast<int32_t>(begin.size()) - 1;
  auto rows = [&](int32_t g) { return begin[g + 1] - begin[g]; };
  p.order.resize(G);
  for (int32_t g = 0; g < G; ++g) p.order[g] = g;
  // Largest first; ties by group so the plan is deterministic.
  std::stable_sort(p.order.begin(), p.order.end(),
                   [&](int32_t a, int32_t b) { return rows(a) > rows(b); });
  std::vector<int32_t> padded(G, 0);
  p.bucket_begin.push_back(0);
  for (int32_t j = 0; j < G; ++j) {
    const int32_t r = rows(p.order[j]);
    const int32_t own = std::max(align, (r + align - 1) / align * align);  // padded alone
    const bool joins = !p.bucket_rows.empty() &&
                       (own == p.bucket_rows.back() || r >= fill * p.bucket_rows.back());
    if (!joins) {
      if (!p.bucket_rows.empty()) p.bucket_begin.push_back(j);
      p.bucket_rows.push_back(own);
    }
    padded[p.order[j]] = p.bucket_rows.back();
  }
  if (G > 0) p.bucket_begin.push_back(G);
  p.dst_begin.assign(G + 1, 0);
  for (int32_t g = 0; g < G; ++g) p.dst_begin[g + 1] = p.dst_begin[g] + padded[g];
  return p;
}

PaddedBuckets PadGroupsToBlocks(const std::vector<int32_t>& begin, int32_t block) {
  PaddedBuckets p;
  const int32_t G = begin.empty() ? 0 : static_cast<int32_t>(begin.size()) - 1;
  p.bucket_begin.push_back(0);
  if (G == 0) return p;
  p.order.resize(G);
  p.dst_begin.assign(G + 1, 0);
  for (int32_t g = 0; g < G; ++g) {
    p.order[g] = g;
    const int32_t rows = begin[g + 1] - begin[g];
    p.dst_begin[g + 1] = p.dst_begin[g] + (rows + block - 1) / block * block;
  }
  p.bucket_begin.push_back(G);
  p.bucket_rows.push_back(block);
  return p;
}

std::optional<PaddedBuckets> PadGroupsBySlot(const std::vector<int32_t>& begin,
                                             const std::vector<int32_t>& slot, int32_t align) {
  const int32_t G = begin.empty() ? 0 : static_cast<int32_t>(begin.size()) - 1;
  if (static_cast<int32_t>(slot.size()) != G) return std::nullopt;
  for (int32_t g = 1; g < G; ++g) {
    if (slot[g] <= slot[g - 1]) return std::nullopt;
  }
  PaddedBuckets p;
  p.bucket_begin.push_back(0);
  if (G == 0) return p;
  int32_t most = 1;
  for (int32_t g = 0; g < G; ++g) most = std::max(most, begin[g + 1] - begin[g]);
  const int32_t rows = (most + align - 1) / align * align;
  p.order.resize(G);
  p.dst_begin.resize(G + 1);
  for (int32_t g = 0; g < G; ++g) {
    p.order[g] = g;
    p.dst_begin[g] = (slot[g] - slot[0]) * rows;
  }
  p.dst_begin[G] = (slot[G - 1] - slot[0] + 1) * rows;
  p.bucket_begin.push_back(G);
  p.bucket_rows.push_back(rows);
  return p;
}

}  // namespace moemesh
