#include "engine/speculation.h"

#include <algorithm>

namespace moemesh {

std::vector<int32_t> LookupDraft(const std::vector<int32_t>& history, int max_ngram,
                                 int min_ngram, int max_draft) {
  const int64_t len = static_cast<int64_t>(history.size());
  if (max_draft <= 0) return {};
  for (int64_t n = std::min<int64_t>(max_ngram, len - 1); n >= std::max(min_ngram, 1); --n) {
    const int32_t* suffix = history.data() + len - n;
    // Earlier occurrences start at i <= len - n - 1 (a token follows them), latest first.
    int64_t earliest = -1;
    for (int64_t i = len - n - 1; i >= 0; --i) {
      if (history[i + n - 1] != suffix[n - 1] ||
          !std::equal(suffix, suffix + n, history.begin() + i)) {
        continue;
      }
      earliest = i;
      if (i + n + max_draft <= len) break;  // followed by a whole draft
    }
    if (earliest >= 0) {
      const int64_t end = std::min<int64_t>(earliest + n + max_draft, len);
      return std::vector<int32_t>(history.begin() + earliest + n, history.begin() + end);
    }
  }
  return {};
}

}  // namespace moemesh
