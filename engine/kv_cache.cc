#include "engine/kv_cache.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace moemesh {

KvCache::KvCache(int64_t num_layers, int64_t kv_dim, int64_t capacity_tokens, bool host_storage,
                 int64_t kv_heads)
    : num_layers_(num_layers),
      kv_dim_(kv_dim),
      kv_heads_(kv_heads > 0 && kv_dim % kv_heads == 0 ? kv_heads : 1),
      capacity_(capacity_tokens),
      host_storage_(host_storage) {}

int64_t KvCache::Slots(uint64_t seq) const {
  auto it = seqs_.find(seq);
  return it == seqs_.end() ? 0 : it->second.slots;
}

absl::Status KvCache::Reserve(uint64_t seq, int64_t length) {
  auto it = seqs_.find(seq);
  int64_t have = it == seqs_.end() ? 0 : it->second.slots;
  if (length <= have) return absl::OkStatus();
  int64_t want = (length + kBlock - 1) / kBlock * kBlock;
  if (used_ + (want - have) > capacity_) {
    // A smaller, exact reservation may still fit.
    want = length;
    if (used_ + (want - have) > capacity_) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "KV cache full: sequence needs ", length, " slots, ", capacity_ - used_ + have,
          " available of ", capacity_));
    }
  }
  Seq& s = seqs_[seq];
  if (host_storage_ && s.k.empty()) {
    s.k.resize(num_layers_);
    s.v.resize(num_layers_);
  }
  // Head-major: each head's block grows from `have` to `want` rows.
  const int64_t hd = head_dim();
  for (int64_t l = 0; host_storage_ && l < num_layers_; ++l) {
    for (std::vector<float>* buf : {&s.k[l], &s.v[l]}) {
      std::vector<float> grown(want * kv_dim_);
      for (int64_t h = 0; have > 0 && h < kv_heads_; ++h) {
        std::copy(buf->begin() + h * have * hd, buf->begin() + (h + 1) * have * hd,
                  grown.begin() + h * want * hd);
      }
      buf->swap(grown);
    }
  }
  used_ += want - have;
  s.slots = want;
  return absl::OkStatus();
}

void KvCache::Free(uint64_t seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return;
  used_ -= it->second.slots;
  seqs_.erase(it);
}

float* KvCache::K(uint64_t seq, int64_t layer) { return seqs_.at(seq).k[layer].data(); }
float* KvCache::V(uint64_t seq, int64_t layer) { return seqs_.at(seq).v[layer].data(); }

}  // namespace moemesh
