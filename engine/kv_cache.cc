#include "engine/kv_cache.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "engine/dtype.h"

namespace moemesh {
namespace {

// Copies rows [begin, begin + n) of `heads` head-major blocks, `from_slots` / `to_slots` rows
// apart, each row `row_bytes` long.
void CopyHeadRows(void* to, int64_t to_slots, const void* from, int64_t from_slots,
                  int64_t heads, int64_t begin, int64_t n, int64_t row_bytes) {
  for (int64_t h = 0; n > 0 && h < heads; ++h) {
    std::memcpy(static_cast<char*>(to) + (h * to_slots + begin) * row_bytes,
                static_cast<const char*>(from) + (h * from_slots + begin) * row_bytes,
                n * row_bytes);
  }
}

// A row of n values into the cache's element type.
void PutRow(float* dst, const float* src, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
void PutRow(uint16_t* dst, const float* src, int64_t n) {
  for (int64_t d = 0; d < n; ++d) dst[d] = F32ToBF16(src[d]);
}
// int8: round(x / s) with s = max|x| / 127 (all zeros for a zero row); returns s.
float PutRowInt8(int8_t* dst, const float* src, int64_t n) {
  float mx = 0.0f;
  for (int64_t d = 0; d < n; ++d) mx = std::max(mx, std::abs(src[d]));
  const float scale = mx / 127.0f;
  const float inv = mx > 0.0f ? 127.0f / mx : 0.0f;
  for (int64_t d = 0; d < n; ++d) {
    dst[d] = static_cast<int8_t>(std::clamp(std::nearbyint(src[d] * inv), -127.0f, 127.0f));
  }
  return scale;
}

}  // namespace

absl::StatusOr<KvDType> ParseKvDType(std::string_view s) {
  if (s == "fp32") return KvDType::kF32;
  if (s == "bf16") return KvDType::kBF16;
  if (s == "int8") return KvDType::kInt8;
  return absl::InvalidArgumentError(
      absl::StrCat("--kv_cache_dtype must be fp32, bf16 or int8, not '", std::string(s), "'"));
}

KvCache::KvCache(int64_t num_layers, int64_t kv_dim, int64_t capacity_tokens, bool host_storage,
                 int64_t kv_heads, KvDType dtype)
    : num_layers_(num_layers),
      kv_dim_(kv_dim),
      kv_heads_(kv_heads > 0 && kv_dim % kv_heads == 0 ? kv_heads : 1),
      capacity_(capacity_tokens),
      host_storage_(host_storage),
      dtype_(dtype),
      elem_bytes_(KvElemBytes(dtype)) {}

int64_t KvCache::Reserved(uint64_t seq) const {
  auto it = seqs_.find(seq);
  return it == seqs_.end() ? 0 : it->second.length;
}

int64_t KvCache::Slots(uint64_t seq) const {
  auto it = seqs_.find(seq);
  return it == seqs_.end() ? 0 : it->second.slots;
}

absl::Status KvCache::Reserve(uint64_t seq, int64_t length) {
  auto it = seqs_.find(seq);
  const int64_t held = it == seqs_.end() ? 0 : it->second.length;
  if (length <= held) return absl::OkStatus();
  if (used_ + (length - held) > capacity_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "KV cache full: sequence needs ", length, " positions, ", capacity_ - used_ + held,
        " available of ", capacity_));
  }
  Seq& s = seqs_[seq];
  if (length > s.slots) {
    // Memory grows in blocks of kBlock slots, at least doubling: a growth copies the sequence's
    // rows into fresh memory (page faults), so a sequence grows O(log length) times. Capacity
    // counts positions, not these slots, so the rounding never refuses a sequence.
    const int64_t want = std::max((length + kBlock - 1) / kBlock * kBlock, 2 * s.slots);
    const bool scaled = dtype_ == KvDType::kInt8;
    if (host_storage_ && s.k.empty()) {
      s.k.resize(num_layers_);
      s.v.resize(num_layers_);
      if (scaled) {
        s.ks.resize(num_layers_);
        s.vs.resize(num_layers_);
      }
    }
    // Head-major: each head's block grows from s.slots to `want` rows; its `held` written rows
    // move, the rest stays unwritten (never read before a Store).
    const int64_t hd = head_dim(), eb = elem_bytes_;
    for (int64_t l = 0; host_storage_ && l < num_layers_; ++l) {
      for (std::unique_ptr<char[]>* buf : {&s.k[l], &s.v[l]}) {
        std::unique_ptr<char[]> grown(new char[want * kv_dim_ * eb]);  // not zero-filled
        CopyHeadRows(grown.get(), want, buf->get(), s.slots, kv_heads_, 0, held, hd * eb);
        buf->swap(grown);
      }
      for (std::unique_ptr<float[]>* buf : {&s.ks[l], &s.vs[l]}) {
        if (!scaled) break;
        std::unique_ptr<float[]> grown(new float[want * kv_heads_]);
        CopyHeadRows(grown.get(), want, buf->get(), s.slots, kv_heads_, 0, held, sizeof(float));
        buf->swap(grown);
      }
    }
    s.slots = want;
  }
  used_ += length - held;
  s.length = length;
  return absl::OkStatus();
}

void KvCache::Truncate(uint64_t seq, int64_t length) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end() || length >= it->second.length || length < 0) return;
  used_ -= it->second.length - length;
  it->second.length = length;
}

bool KvCache::Rename(uint64_t from, uint64_t to) {
  auto it = seqs_.find(from);
  if (it == seqs_.end() || seqs_.count(to) != 0) return false;
  Seq s = std::move(it->second);
  seqs_.erase(it);
  seqs_.emplace(to, std::move(s));
  return true;
}

absl::Status KvCache::CheckCopy(uint64_t src, uint64_t dst, int64_t begin, int64_t end) const {
  auto a = seqs_.find(src), b = seqs_.find(dst);
  if (a == seqs_.end() || b == seqs_.end()) {
    return absl::NotFoundError(absl::StrCat("KV rows of an unknown sequence (", src, " -> ", dst,
                                            ")"));
  }
  if (begin < 0 || end > a->second.length || end > b->second.length || begin > end) {
    return absl::OutOfRangeError(absl::StrCat("KV rows [", begin, ", ", end, ") of ",
                                              a->second.length, " / ", b->second.length));
  }
  return absl::OkStatus();
}

absl::Status KvCache::CopyRows(uint64_t src, uint64_t dst, int64_t begin, int64_t end) {
  if (!host_storage_) {
    return absl::UnimplementedError("copying KV rows needs a KV cache in host memory");
  }
  absl::Status st = CheckCopy(src, dst, begin, end);
  if (!st.ok()) return st;
  const Seq& a = seqs_.at(src);
  Seq& b = seqs_.at(dst);
  const int64_t row_bytes = head_dim() * elem_bytes_, n = end - begin;
  for (int64_t l = 0; l < num_layers_; ++l) {
    CopyHeadRows(b.k[l].get(), b.slots, a.k[l].get(), a.slots, kv_heads_, begin, n, row_bytes);
    CopyHeadRows(b.v[l].get(), b.slots, a.v[l].get(), a.slots, kv_heads_, begin, n, row_bytes);
    if (dtype_ == KvDType::kInt8) {
      CopyHeadRows(b.ks[l].get(), b.slots, a.ks[l].get(), a.slots, kv_heads_, begin, n,
                   sizeof(float));
      CopyHeadRows(b.vs[l].get(), b.slots, a.vs[l].get(), a.slots, kv_heads_, begin, n,
                   sizeof(float));
    }
  }
  return absl::OkStatus();
}

void KvCache::Free(uint64_t seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return;
  used_ -= it->second.length;
  seqs_.erase(it);
}

float* KvCache::K(uint64_t seq, int64_t layer) {
  return reinterpret_cast<float*>(seqs_.at(seq).k[layer].get());
}
float* KvCache::V(uint64_t seq, int64_t layer) {
  return reinterpret_cast<float*>(seqs_.at(seq).v[layer].get());
}
uint16_t* KvCache::KBf16(uint64_t seq, int64_t layer) {
  return reinterpret_cast<uint16_t*>(seqs_.at(seq).k[layer].get());
}
uint16_t* KvCache::VBf16(uint64_t seq, int64_t layer) {
  return reinterpret_cast<uint16_t*>(seqs_.at(seq).v[layer].get());
}
int8_t* KvCache::KInt8(uint64_t seq, int64_t layer) {
  return reinterpret_cast<int8_t*>(seqs_.at(seq).k[layer].get());
}
int8_t* KvCache::VInt8(uint64_t seq, int64_t layer) {
  return reinterpret_cast<int8_t*>(seqs_.at(seq).v[layer].get());
}
float* KvCache::KScale(uint64_t seq, int64_t layer) { return seqs_.at(seq).ks[layer].get(); }
float* KvCache::VScale(uint64_t seq, int64_t layer) { return seqs_.at(seq).vs[layer].get(); }


void KvCache::Store(uint64_t seq, int64_t layer, int64_t pos, int64_t n, const float* k,
                    const float* v) {
  const int64_t hd = head_dim(), slots = seqs_.at(seq).slots;
  // put(row, k_row, v_row) for each new position and kv head; `row` counts head-major rows.
  auto for_rows = [&](auto put) {
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t h = 0; h < kv_heads_; ++h) {
        put(h * slots + pos + i, k + i * kv_dim_ + h * hd, v + i * kv_dim_ + h * hd);
      }
    }
  };
  auto store = [&](auto* kc, auto* vc) {
    for_rows([&](int64_t row, const float* kr, const float* vr) {
      PutRow(kc + row * hd, kr, hd);
      PutRow(vc + row * hd, vr, hd);
    });
  };
  if (dtype_ == KvDType::kInt8) {
    int8_t* kc = KInt8(seq, layer);
    int8_t* vc = VInt8(seq, layer);
    float* ksc = KScale(seq, layer);
    float* vsc = VScale(seq, layer);
    for_rows([&](int64_t row, const float* kr, const float* vr) {
      ksc[row] = PutRowInt8(kc + row * hd, kr, hd);
      vsc[row] = PutRowInt8(vc + row * hd, vr, hd);
    });
  } else if (dtype_ == KvDType::kBF16) {
    store(KBf16(seq, layer), VBf16(seq, layer));
  } else {
    store(K(seq, layer), V(seq, layer));
  }
}

}  // namespace moemesh
