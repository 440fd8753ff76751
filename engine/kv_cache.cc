#include "engine/kv_cache.h"

#include "absl/strings/str_cat.h"

namespace moemesh {

KvCache::KvCache(int64_t num_layers, int64_t kv_dim, int64_t capacity_tokens, bool host_storage)
    : num_layers_(num_layers),
      kv_dim_(kv_dim),
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
  for (int64_t l = 0; host_storage_ && l < num_layers_; ++l) {
    s.k[l].resize(want * kv_dim_);
    s.v[l].resize(want * kv_dim_);
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
