// CheckpointReader::OpenDummy: random weights made from config.json alone.
//
// Values come from a counter-based generator: element pair j of a tensor is
// SplitMix64(key + (j + 1) * golden) with key = Mix(seed, FNV-1a(name)), so a tensor's bytes
// depend on (seed, name, dtype) only, and the loop has no carried state (the compiler
// vectorizes it: several GB/s per core, where the CPU benchmark loads ~6 GiB).
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/safetensors.h"

namespace moemesh {
namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;
constexpr float kEmbeddingRange = 0.05f;

// SplitMix64's output function.
bool EndsWith(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

inline uint64_t Mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t TensorKey(uint64_t seed, std::string_view name) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a
  for (unsigned char c : name) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  return Mix(h ^ Mix(seed + kGolden));
}

// 32 random bits -> uniform in [-a, a) (24 bits of resolution).
inline float Uniform(uint32_t bits, float a) {
  return (static_cast<float>(bits >> 8) * (2.0f / 16777216.0f) - 1.0f) * a;
}

// Round to nearest even; no NaN handling (the values are finite).
inline uint16_t FiniteF32ToBF16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Round to nearest even, subnormals included.
uint16_t F32ToF16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const int32_t fexp = static_cast<int32_t>((u >> 23) & 0xffu);
  uint32_t man = u & 0x7fffffu;
  if (fexp == 0xff) return static_cast<uint16_t>(sign | 0x7c00u | (man != 0 ? 0x200u : 0u));
  const int32_t exp = fexp - 127 + 15;
  if (exp >= 31) return static_cast<uint16_t>(sign | 0x7c00u);
  if (exp <= 0) {  // subnormal half (or zero)
    if (exp < -10) return static_cast<uint16_t>(sign);
    man |= 0x800000u;
    const int shift = 14 - exp;
    uint32_t h = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = (static_cast<uint32_t>(exp) << 10) | (man >> 13);
  const uint32_t rem = man & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry rounds up the exponent
  return static_cast<uint16_t>(sign | h);
}

// Values of pairs [j0, j0 + kChunk) as fp32: pair j is Mix(key + (j + 1) * golden), low 32 bits
// then high 32 bits. Branch-free over a fixed-size chunk, so the compiler vectorizes it.
constexpr int64_t kChunk = 16;
inline void UniformChunk(uint64_t key, float a, int64_t j0, float* out) {
  uint64_t r[kChunk];
  for (int64_t k = 0; k < kChunk; ++k) r[k] = Mix(key + static_cast<uint64_t>(j0 + k + 1) * kGolden);
  for (int64_t k = 0; k < kChunk; ++k) {
    out[2 * k] = Uniform(static_cast<uint32_t>(r[k]), a);
    out[2 * k + 1] = Uniform(static_cast<uint32_t>(r[k] >> 32), a);
  }
}

// n values uniform in [-a, a) of type `dt` into out.
void FillUniform(uint64_t key, float a, DType dt, int64_t n, void* out) {
  float buf[2 * kChunk];
  for (int64_t i0 = 0; i0 < n; i0 += 2 * kChunk) {
    UniformChunk(key, a, i0 / 2, buf);
    const int64_t m = std::min<int64_t>(2 * kChunk, n - i0);
    switch (dt) {
      case DType::kF32:
        std::memcpy(static_cast<float*>(out) + i0, buf, m * sizeof(float));
        break;
      case DType::kBF16: {
        uint16_t* o = static_cast<uint16_t*>(out) + i0;
        if (m == 2 * kChunk) {
          for (int64_t k = 0; k < 2 * kChunk; ++k) o[k] = FiniteF32ToBF16(buf[k]);
        } else {
          for (int64_t k = 0; k < m; ++k) o[k] = FiniteF32ToBF16(buf[k]);
        }
        break;
      }
      case DType::kF16: {
        uint16_t* o = static_cast<uint16_t*>(out) + i0;
        for (int64_t k = 0; k < m; ++k) o[k] = F32ToF16(buf[k]);
        break;
      }
    }
  }
}

// A buffer of `bytes` for a tensor. Large ones are 2 MiB-aligned and asked to be backed by
// transparent huge pages: on a VM a 4 KiB page fault costs microseconds, which made the first
// touch of the memory cost more than making its values.
void* AllocTensor(size_t bytes) {
  constexpr size_t kHuge = size_t{2} << 20;
  if (bytes < kHuge) return std::malloc(std::max<size_t>(bytes, 1));
  void* p = nullptr;
  if (posix_memalign(&p, kHuge, bytes) != 0) return nullptr;
#ifdef MADV_HUGEPAGE
  ::madvise(p, bytes, MADV_HUGEPAGE);  // advisory: failure is harmless
#endif
  return p;
}

// n copies of v of type `dt` into out.
void FillConstant(float v, DType dt, int64_t n, void* out) {
  switch (dt) {
    case DType::kF32: {
      float* o = static_cast<float*>(out);
      for (int64_t i = 0; i < n; ++i) o[i] = v;
      return;
    }
    case DType::kBF16:
    case DType::kF16: {
      const uint16_t h = dt == DType::kBF16 ? F32ToBF16(v) : F32ToF16(v);
      uint16_t* o = static_cast<uint16_t*>(out);
      for (int64_t i = 0; i < n; ++i) o[i] = h;
      return;
    }
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<CheckpointReader>> CheckpointReader::OpenDummy(
    const ModelConfig& cfg, const ArchSpec& arch, DType dtype, uint64_t seed,
    std::function<bool(std::string_view name)> want) {
  const std::string where = cfg.path.empty() ? std::string("config") : cfg.path;
  for (const auto& [field, v] :
       {std::pair<const char*, int64_t>{"hidden_size", cfg.hidden_size},
        {"num_hidden_layers", cfg.num_hidden_layers},
        {"num_attention_heads", cfg.num_attention_heads},
        {"num_key_value_heads", cfg.num_key_value_heads},
        {"head_dim", cfg.head_dim},
        {"vocab_size", cfg.vocab_size},
        {"intermediate_size", cfg.intermediate_size},
        {"num_experts", cfg.num_experts},
        {"moe_intermediate_size", cfg.moe_intermediate_size}}) {
    if (v < 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": dummy weights need a positive '", field, "', got ", v));
    }
  }
  if (arch.shared_expert && cfg.shared_expert_intermediate_size < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": dummy weights need a positive 'shared_expert_intermediate_size'"));
  }
  std::unique_ptr<CheckpointReader> r(new CheckpointReader());
  const size_t slash = cfg.path.rfind('/');
  r->dir_ = absl::StrCat(
      slash == std::string::npos ? std::string(".") : cfg.path.substr(0, slash), " (dummy weights)");
  r->want_ = want;
  r->dummy_ = true;
  r->seed_ = seed;
  const std::string file = absl::StrCat("dummy weights of ", where);
  for (WeightSpec& w : CheckpointWeights(cfg, arch)) {
    if (want && !want(w.name)) continue;
    auto t = std::make_unique<DummyTensor>();
    t->info.name = w.name;
    t->info.dtype = dtype;
    t->info.shape = std::move(w.shape);
    uint64_t nbytes = DTypeSize(dtype);
    for (int64_t d : t->info.shape) {
      if (__builtin_mul_overflow(nbytes, static_cast<uint64_t>(d), &nbytes) ||
          nbytes > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return absl::InvalidArgumentError(absl::StrCat(
            where, ": tensor '", w.name, "' of shape ", ShapeToString(t->info.shape),
            " is too large"));
      }
    }
    t->info.nbytes = static_cast<size_t>(nbytes);
    t->info.file = file;
    r->dummy_tensors_.emplace(w.name, std::move(t));
  }
  return r;
}

void CheckpointReader::ReleaseDummyValues(std::string_view name_prefix) const {
  if (!dummy_) return;
  std::lock_guard<std::mutex> lock(dummy_mu_);
  for (auto it = dummy_tensors_.lower_bound(name_prefix);
       it != dummy_tensors_.end() && it->first.compare(0, name_prefix.size(), name_prefix) == 0;
       ++it) {
    it->second->info.data = nullptr;
    it->second->bytes.reset();
  }
}

const TensorInfo* CheckpointReader::FindDummy(std::string_view name, bool make) const {
  auto it = dummy_tensors_.find(name);
  if (it == dummy_tensors_.end()) return nullptr;
  DummyTensor& t = *it->second;
  if (!make) return &t.info;
  std::lock_guard<std::mutex> lock(dummy_mu_);
  if (t.info.data != nullptr) return &t.info;
  const int64_t n = t.info.numel();
  t.bytes.reset(AllocTensor(t.info.nbytes));
  if (t.bytes == nullptr) return nullptr;  // Out of memory (Get() says so).
  const std::string_view nm = t.info.name;
  if (EndsWith(nm, "norm.weight")) {  // input_layernorm, q_norm, model.norm, ...
    FillConstant(1.0f, t.info.dtype, n, t.bytes.get());
  } else if (EndsWith(nm, ".bias")) {
    FillConstant(0.0f, t.info.dtype, n, t.bytes.get());
  } else {
    const float a = nm == "model.embed_tokens.weight"
                        ? kEmbeddingRange
                        : 1.0f / std::sqrt(static_cast<float>(t.info.shape.back()));
    FillUniform(TensorKey(seed_, nm), a, t.info.dtype, n, t.bytes.get());
  }
  t.info.data = t.bytes.get();
  return &t.info;
}

}  // namespace moemesh
