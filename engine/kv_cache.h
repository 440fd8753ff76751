// The KV cache of one attention worker.
#ifndef MOEMESH_ENGINE_KV_CACHE_H_
#define MOEMESH_ENGINE_KV_CACHE_H_

#include <cstdint>
#include <memory>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace moemesh {

// Per sequence and layer: K and V in fp32, grown in blocks as the sequence grows, head-major:
// kv head h's row for position p is at K(seq, layer) + h * HeadStride(seq) + p * head_dim
// (head_dim = kv_dim / kv_heads), so attention streams each head's rows contiguously. With
// kv_heads = 1 that is rows [position, kv_dim]. The positions reserved over all sequences are
// bounded by `capacity_tokens` (the router admits requests against the same count); memory is
// allocated in larger steps (Slots()), which capacity does not count.
// Not thread-safe: the attention worker's step loop owns it.
//
// This class keeps the rows in host memory (the CPU attention stack). A device's attention stack
// (AttentionStack::NewCache) derives from it with `host_storage` false: the base class then only
// does the slot accounting, and the subclass keeps the rows on its device (and overrides
// Reserve, Free, Truncate, Rename and CopyRows to manage them).
// Element type of a host KV cache: fp32 (exact: the oracle comparisons), bf16 (half the
// memory and half the bytes attention reads; rows rounded to nearest even as they are stored)
// or int8 (a quarter plus one fp32 scale per row of head_dim values: each (position, kv head)
// row stored as round(x / s) with s = max|x| / 127).
enum class KvDType { kF32, kBF16, kInt8 };

// "fp32" / "bf16" / "int8" -> KvDType; InvalidArgument naming --kv_cache_dtype otherwise.
absl::StatusOr<KvDType> ParseKvDType(std::string_view s);

// Bytes of one element: 4, 2 or 1.
inline int64_t KvElemBytes(KvDType t) {
  return t == KvDType::kBF16 ? 2 : t == KvDType::kInt8 ? 1 : 4;
}

class KvCache {
 public:
  KvCache(int64_t num_layers, int64_t kv_dim, int64_t capacity_tokens, bool host_storage = true,
          int64_t kv_heads = 1, KvDType dtype = KvDType::kF32);
  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;
  virtual ~KvCache() = default;

  // Makes room for positions [0, length) of `seq` (creating it if new).
  // RESOURCE_EXHAUSTED when the cache has no room; the sequence is then left as it was.
  virtual absl::Status Reserve(uint64_t seq, int64_t length);
  // Frees the sequence's positions and memory at once. No-op for an unknown sequence.
  virtual void Free(uint64_t seq);
  // Gives back positions [length, Reserved(seq)) of `seq` (no-op when it holds no more).
  virtual void Truncate(uint64_t seq, int64_t length);
  // Moves `from`'s positions and rows to the new id `to` (no copy). False when `from` is
  // unknown or `to` exists.
  virtual bool Rename(uint64_t from, uint64_t to);
  // Copies positions [begin, end) of every layer from `src` to `dst` (both reserved that far;
  // int8 scales too). Here for host storage only (Unimplemented otherwise); a device's cache
  // copies its own rows.
  virtual absl::Status CopyRows(uint64_t src, uint64_t dst, int64_t begin, int64_t end);
  bool host_storage() const { return host_storage_; }
  // Positions reserved for `seq` (0 for an unknown sequence).
  int64_t Reserved(uint64_t seq) const;
  // Rows allocated per head for `seq` (>= Reserved(seq); 0 for an unknown sequence).
  int64_t Slots(uint64_t seq) const;
  bool Has(uint64_t seq) const { return seqs_.count(seq) != 0; }

  // `seq`'s K (V) at `layer`: kv_heads() blocks of HeadStride(seq) elements, each rows
  // [0, reserved length) of head_dim() elements. Valid until the next Reserve or Free of that
  // sequence. Host storage only; K/V for an fp32 cache, KBf16/VBf16 (bf16 bit patterns) for a
  // bf16 one, KInt8/VInt8 for an int8 one, whose row scales KScale/VScale hold: kv head h's
  // scale for position p at h * Slots(seq) + p.
  float* K(uint64_t seq, int64_t layer);
  float* V(uint64_t seq, int64_t layer);
  uint16_t* KBf16(uint64_t seq, int64_t layer);
  uint16_t* VBf16(uint64_t seq, int64_t layer);
  int8_t* KInt8(uint64_t seq, int64_t layer);
  int8_t* VInt8(uint64_t seq, int64_t layer);
  float* KScale(uint64_t seq, int64_t layer);
  float* VScale(uint64_t seq, int64_t layer);
  KvDType dtype() const { return dtype_; }
  int64_t num_layers() const { return num_layers_; }
  // Writes positions [pos, pos + n) of `seq` at `layer` from rows k, v [n, kv_dim] (kv head
  // after kv head, as a projection produces them) into the head-major layout. The positions
  // must be reserved. Host storage only.
  void Store(uint64_t seq, int64_t layer, int64_t pos, int64_t n, const float* k, const float* v);
  int64_t HeadStride(uint64_t seq) const { return Slots(seq) * head_dim(); }
  int64_t kv_heads() const { return kv_heads_; }
  int64_t head_dim() const { return kv_dim_ / kv_heads_; }

  int64_t kv_dim() const { return kv_dim_; }
  int64_t capacity_tokens() const { return capacity_; }
  int64_t used_tokens() const { return used_; }  // positions reserved over all sequences
  int64_t num_sequences() const { return static_cast<int64_t>(seqs_.size()); }

 protected:
  // CopyRows' argument check: OutOfRange unless 0 <= begin <= end <= both sequences' lengths
  // (NotFound for an unknown sequence).
  absl::Status CheckCopy(uint64_t src, uint64_t dst, int64_t begin, int64_t end) const;

 private:
  static constexpr int64_t kBlock = 64;  // slots grow in multiples of this, at least doubling
  struct Seq {
    int64_t slots = 0;   // rows allocated per head (>= length)
    int64_t length = 0;  // positions reserved (what capacity counts)
    std::vector<std::unique_ptr<char[]>> k, v;  // [layer] -> [slots * kv_dim] elements
    // int8 caches: [layer] -> [kv_heads * slots] row scales (head-major as the rows).
    std::vector<std::unique_ptr<float[]>> ks, vs;
  };

  const int64_t num_layers_;
  const int64_t kv_dim_;
  const int64_t kv_heads_;
  const int64_t capacity_;
  const bool host_storage_;
  const KvDType dtype_;
  const int64_t elem_bytes_;  // 4, 2 or 1
  int64_t used_ = 0;
  std::unordered_map<uint64_t, Seq> seqs_;
};

}  // namespace moemesh

#endif  // MOEMESH_ENGINE_KV_CACHE_H_
