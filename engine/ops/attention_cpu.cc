// CPU attention: online softmax over 16-key blocks, fp32 arithmetic; the KV cache in fp32, bf16
// (widened to fp32 as it is loaded) or int8 with a scale per row (a key's scale multiplies its
// score, a value's scale its softmax weight).
//
// Work is split into units of (kv head, chunk of new tokens); a unit processes every query
// head of its kv head for its tokens ("rows"), so each K/V block is loaded once per unit.
// The AVX-512 path (head_dim 16, 32, 64, 128 or 256) computes a block's 16 scores as vector
// dot products followed by one transposing 16-way horizontal sum, keeps the accumulators of
// up to 2 rows in registers while streaming V, and shares each K/V row load between them.
// Other head dims use a generic per-key path.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "engine/ops/attention.h"
#include "engine/ops/simd_math.h"
#include "engine/ops/threading.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define UNROLL_LOOP _Pragma("GCC unroll 16")

namespace moemesh {
namespace ops {
namespace {

constexpr int64_t kKeyBlock = 16;
// How far ahead the AVX-512 path prefetches K/V rows.
constexpr int64_t kPrefetchKeys = 16;
// Rows (token x query head) per unit: enough to amortise the K transposes, small enough to
// leave parallelism.
constexpr int64_t kRowsPerUnit = 32;
// Multiply-adds per thread below which attention stays on the calling thread (~120 us of
// work): a fork/join costs microseconds on a quiet machine and milliseconds when another
// process competes for the cores (see linear_cpu.cc), so decode-sized attention never forks.
constexpr int64_t kMinWorkPerThread = 1 << 21;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// A KV cache element as fp32.
inline float KvAt(const float* p, int64_t i) { return p[i]; }
inline float KvAt(const uint16_t* p, int64_t i) {
  const uint32_t u = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline float KvAt(const int8_t* p, int64_t i) { return static_cast<float>(p[i]); }

// Everything one unit needs to know. KV: float or uint16_t (bf16 bits) cache elements.
template <typename KV>
struct Unit {
  const KV* k;        // Row 0 of the unit's kv head in the K cache.
  const KV* v;        // Same in the V cache.
  int64_t kv_stride;  // Elements between cache rows.
  int64_t head_dim;
  float scale;
  int64_t rows;           // Query rows: token-major, head-minor.
  const float* const* q;  // [rows] -> head_dim floats.
  float* const* out;      // [rows] -> head_dim floats.
  const int64_t* ctx;     // [rows] keys visible to each row (non-decreasing).
  // int8 caches: key / value j's scale at ks[j * scale_stride] / vs[j * scale_stride]; null for
  // fp32 and bf16 caches.
  const float* ks = nullptr;
  const float* vs = nullptr;
  int64_t scale_stride = 1;
  float KScale(int64_t j) const { return ks == nullptr ? 1.0f : ks[j * scale_stride]; }
  float VScale(int64_t j) const { return vs == nullptr ? 1.0f : vs[j * scale_stride]; }
};

// ---------------------------------------------------------------------------------------
// Generic path: any head_dim, one row at a time, per-key dot products.

inline float Dot(const float* a, const float* b, int64_t n) {
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  }
  if (i < n) {
    __mmask16 m = internal::TailMask(n - i);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
#else
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
#endif
}

// A bf16 (int8) row widened first, then the fp32 Dot: for bf16 the same sums as an fp32 cache
// of those values.
template <typename KV>
inline float Dot(const float* a, const KV* b, int64_t n) {
  thread_local std::vector<float> wide;
  wide.resize(n);
  for (int64_t i = 0; i < n; ++i) wide[i] = KvAt(b, i);
  return Dot(a, wide.data(), n);
}

template <typename KV>
void AttendUnitGeneric(const Unit<KV>& u, float* acc) {
  const int64_t d_len = u.head_dim;
  float s[kKeyBlock];
  for (int64_t r = 0; r < u.rows; ++r) {
    float mx = kNegInf, l = 0.0f;
    std::fill(acc, acc + d_len, 0.0f);
    for (int64_t j0 = 0; j0 < u.ctx[r]; j0 += kKeyBlock) {
      const int64_t nb = std::min(kKeyBlock, u.ctx[r] - j0);
      float block_max = kNegInf;
      for (int64_t j = 0; j < nb; ++j) {
        s[j] = Dot(u.q[r], u.k + (j0 + j) * u.kv_stride, d_len) * u.KScale(j0 + j) * u.scale;
        block_max = std::max(block_max, s[j]);
      }
      const float new_max = std::max(mx, block_max);
      const float corr = internal::ExpScalar(mx - new_max);
      l *= corr;
      for (int64_t d = 0; d < d_len; ++d) acc[d] *= corr;
      for (int64_t j = 0; j < nb; ++j) {
        const float p = internal::ExpScalar(s[j] - new_max);
        l += p;
        const KV* vj = u.v + (j0 + j) * u.kv_stride;
        const float pv = p * u.VScale(j0 + j);
        for (int64_t d = 0; d < d_len; ++d) acc[d] += pv * KvAt(vj, d);
      }
      mx = new_max;
    }
    const float inv = 1.0f / l;
    for (int64_t d = 0; d < d_len; ++d) u.out[r][d] = acc[d] * inv;
  }
}

// ---------------------------------------------------------------------------------------
// AVX-512 path.

#if defined(__AVX512F__)

// 16 cache elements as fp32.
inline __m512 LoadKv16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 LoadKv16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 LoadKv16(const int8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}

// The scales of keys j0 .. j0+15 (lanes past `valid` keys 0) of an int8 cache; all 1 otherwise.
inline __m512 Scales16(const float* scales, int64_t stride, int64_t j0, __mmask16 valid) {
  if (scales == nullptr) return _mm512_set1_ps(1.0f);
  if (stride == 1) return _mm512_maskz_loadu_ps(valid, scales + j0);
  const __m512i idx = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(static_cast<int32_t>(stride)));
  return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid, idx, scales + j0 * stride, 4);
}

// Pairwise step of a 16-way horizontal sum: per 128-bit lane, the two halves of x0 and of x1
// added and interleaved.
inline __m512 PairSum(__m512 x0, __m512 x1) {
  return _mm512_add_ps(_mm512_unpacklo_ps(x0, x1), _mm512_unpackhi_ps(x0, x1));
}

// y[i] = PairSum(x[2i], x[2i+1]) for 16 vectors x; returns lane j = sum of x[j]'s 16 lanes.
inline __m512 FinishSum16(const __m512 (&y)[8]) {
  __m512 z[4];
  UNROLL_LOOP
  for (int i = 0; i < 4; ++i) {
    // Lane L of z[i]: the lane-L sums of x[4i..4i+3].
    z[i] = _mm512_add_ps(_mm512_shuffle_ps(y[2 * i], y[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(y[2 * i], y[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  const __m512 s01 =
      _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88), _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
  const __m512 s23 =
      _mm512_add_ps(_mm512_shuffle_f32x4(z[2], z[3], 0x88), _mm512_shuffle_f32x4(z[2], z[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
}

// One 16-key block starting at key j0 for NR rows r0..r0+NR-1 (all of which see key j0):
// scores, online-softmax update, P V accumulation. m, l, acc point at row r0's state; acc
// rows hold 16 * D16 floats (64-byte aligned).
template <int D16, int NR, typename KV>
inline void BlockRows(const Unit<KV>& u, int64_t r0, int64_t j0, float* m, float* l, float* acc) {
  constexpr int kD = 16 * D16;
  const int64_t max_valid = std::min<int64_t>(u.ctx[r0 + NR - 1] - j0, kKeyBlock);
  const KV* k = u.k + j0 * u.kv_stride;

  // Scores: per key a D16-vector dot product, then a transposing 16-way horizontal sum.
  __m512 q[NR][D16];
  UNROLL_LOOP
  for (int r = 0; r < NR; ++r) {
    UNROLL_LOOP
    for (int c = 0; c < D16; ++c) q[r][c] = _mm512_loadu_ps(u.q[r0 + r] + 16 * c);
  }
  __m512 y[NR][8];
  UNROLL_LOOP
  for (int jp = 0; jp < 8; ++jp) {
    __m512 x[NR][2];
    UNROLL_LOOP
    for (int h = 0; h < 2; ++h) {
      const int64_t j = 2 * jp + h;
      if (j < max_valid) {
        const KV* kj = k + j * u.kv_stride;
        __m512 kv[D16];
        UNROLL_LOOP
        for (int c = 0; c < D16; ++c) kv[c] = LoadKv16(kj + 16 * c);
        UNROLL_LOOP
        for (int r = 0; r < NR; ++r) {
          __m512 t = _mm512_mul_ps(q[r][0], kv[0]);
          UNROLL_LOOP
          for (int c = 1; c < D16; ++c) t = _mm512_fmadd_ps(q[r][c], kv[c], t);
          x[r][h] = t;
        }
      } else {
        UNROLL_LOOP
        for (int r = 0; r < NR; ++r) x[r][h] = _mm512_setzero_ps();
      }
    }
    UNROLL_LOOP
    for (int r = 0; r < NR; ++r) y[r][jp] = PairSum(x[r][0], x[r][1]);
  }

  // Online softmax. An int8 cache's key scales multiply the scores; its value scales the weights
  // of the P V sum (after the row sums l, which take the unscaled weights).
  alignas(64) float p[NR][16];
  float corr[NR];
  const __m512 scale = _mm512_set1_ps(u.scale);
  constexpr bool kScaled = std::is_same_v<KV, int8_t>;
  __m512 k_scale = scale, v_scale = _mm512_set1_ps(1.0f);
  if constexpr (kScaled) {
    const __mmask16 valid = internal::TailMask(max_valid);
    k_scale = _mm512_mul_ps(Scales16(u.ks, u.scale_stride, j0, valid), scale);
    v_scale = Scales16(u.vs, u.scale_stride, j0, valid);
  }
  UNROLL_LOOP
  for (int r = 0; r < NR; ++r) {
    const __mmask16 mask = internal::TailMask(std::min<int64_t>(u.ctx[r0 + r] - j0, kKeyBlock));
    const __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(kNegInf), mask,
                                        _mm512_mul_ps(FinishSum16(y[r]), k_scale));
    const float new_max = std::max(m[r], _mm512_reduce_max_ps(s));
    corr[r] = internal::ExpScalar(m[r] - new_max);
    const __m512 e =
        _mm512_maskz_mov_ps(mask, internal::Exp512(_mm512_sub_ps(s, _mm512_set1_ps(new_max))));
    l[r] = l[r] * corr[r] + _mm512_reduce_add_ps(e);
    m[r] = new_max;
    _mm512_store_ps(p[r], kScaled ? _mm512_mul_ps(e, v_scale) : e);
  }

  // acc = acc * corr + P V, even and odd keys in separate accumulators when registers allow
  // (the FMA chains are latency-bound otherwise).
  constexpr int kSets = NR * D16 <= 8 ? 2 : 1;
  __m512 a[kSets][NR][D16];
  UNROLL_LOOP
  for (int r = 0; r < NR; ++r) {
    const __m512 c = _mm512_set1_ps(corr[r]);
    UNROLL_LOOP
    for (int i = 0; i < D16; ++i) {
      a[0][r][i] = _mm512_mul_ps(_mm512_load_ps(acc + r * kD + 16 * i), c);
      if constexpr (kSets == 2) a[1][r][i] = _mm512_setzero_ps();
    }
  }
  const KV* v = u.v + j0 * u.kv_stride;
  int64_t j = 0;
  for (; j + kSets <= max_valid; j += kSets) {
    UNROLL_LOOP
    for (int set = 0; set < kSets; ++set) {
      __m512 vj[D16];
      UNROLL_LOOP
      for (int i = 0; i < D16; ++i) vj[i] = LoadKv16(v + (j + set) * u.kv_stride + 16 * i);
      UNROLL_LOOP
      for (int r = 0; r < NR; ++r) {
        const __m512 pj = _mm512_set1_ps(p[r][j + set]);
        UNROLL_LOOP
        for (int i = 0; i < D16; ++i) a[set][r][i] = _mm512_fmadd_ps(pj, vj[i], a[set][r][i]);
      }
    }
  }
  for (; j < max_valid; ++j) {
    UNROLL_LOOP
    for (int r = 0; r < NR; ++r) {
      const __m512 pj = _mm512_set1_ps(p[r][j]);
      UNROLL_LOOP
      for (int i = 0; i < D16; ++i) {
        a[0][r][i] = _mm512_fmadd_ps(pj, LoadKv16(v + j * u.kv_stride + 16 * i), a[0][r][i]);
      }
    }
  }
  UNROLL_LOOP
  for (int r = 0; r < NR; ++r) {
    UNROLL_LOOP
    for (int i = 0; i < D16; ++i) {
      __m512 sum = a[0][r][i];
      if constexpr (kSets == 2) sum = _mm512_add_ps(sum, a[1][r][i]);
      _mm512_store_ps(acc + r * kD + 16 * i, sum);
    }
  }
}

// Scratch floats of one unit in AttendUnitsAvx512: acc [rows][head_dim], m [rows], l [rows],
// rounded to 64 bytes so that every unit's acc rows stay aligned.
inline int64_t UnitStateFloats(int64_t head_dim, int64_t rows) {
  return (rows * head_dim + 2 * rows + 15) / 16 * 16;
}

// Units of the same tokens (one per kv head: same rows and ctx), interleaved per 16-key block:
// each block of K/V rows is then read once for all heads, front to back, which the hardware
// prefetcher streams far better than one pass per head over every row's slice. Each head's
// arithmetic is exactly that of processing it alone.
template <int D16, typename KV>
void AttendUnitsAvx512(const Unit<KV>* units, int64_t n_units, float* scratch) {
  constexpr int kD = 16 * D16;
  // Rows per register tile: two share each K/V load while registers last.
  constexpr int kNR = D16 <= 4 ? 2 : 1;
  const int64_t rows = units[0].rows;
  const int64_t per_unit = UnitStateFloats(kD, rows);
  for (int64_t h = 0; h < n_units; ++h) {
    float* acc = scratch + h * per_unit;
    std::fill(acc, acc + rows * kD, 0.0f);
    std::fill(acc + rows * kD, acc + rows * kD + rows, kNegInf);
    std::fill(acc + rows * kD + rows, acc + rows * kD + 2 * rows, 0.0f);
  }
  const int64_t* ctx = units[0].ctx;
  const int64_t max_ctx = ctx[rows - 1];
  int64_t first = 0;  // First row that still sees keys at j0 (ctx is non-decreasing).
  for (int64_t j0 = 0; j0 < max_ctx; j0 += kKeyBlock) {
    while (ctx[first] <= j0) ++first;
    for (int64_t h = 0; h < n_units; ++h) {
      const Unit<KV>& u = units[h];
      // This head's K and V rows kPrefetchKeys ahead: each is read once, and the loads of a
      // block otherwise wait on memory. One prefetch per 64-byte line.
      const int64_t jp = j0 + kPrefetchKeys;
      for (int64_t j = jp; j < std::min(max_ctx, jp + kKeyBlock); ++j) {
        UNROLL_LOOP
        for (int c = 0; c < kD; c += static_cast<int>(64 / sizeof(KV))) {
          _mm_prefetch(reinterpret_cast<const char*>(u.k + j * u.kv_stride + c), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(u.v + j * u.kv_stride + c), _MM_HINT_T0);
        }
      }
      float* acc = scratch + h * per_unit;
      float* m = acc + rows * kD;
      float* l = m + rows;
      int64_t r = first;
      for (; r + kNR <= rows; r += kNR) {
        BlockRows<D16, kNR>(u, r, j0, m + r, l + r, acc + r * kD);
      }
      for (; r < rows; ++r) BlockRows<D16, 1>(u, r, j0, m + r, l + r, acc + r * kD);
    }
  }
  for (int64_t h = 0; h < n_units; ++h) {
    const Unit<KV>& u = units[h];
    const float* acc = scratch + h * per_unit;
    const float* l = acc + rows * kD + rows;
    for (int64_t r = 0; r < rows; ++r) {
      const __m512 inv = _mm512_set1_ps(1.0f / l[r]);
      for (int i = 0; i < D16; ++i) {
        _mm512_storeu_ps(u.out[r] + 16 * i,
                         _mm512_mul_ps(_mm512_load_ps(acc + r * kD + 16 * i), inv));
      }
    }
  }
}

#endif  // __AVX512F__

// Per-thread scratch for one unit.
std::vector<float>& UnitScratch(int64_t floats) {
  thread_local std::vector<float> buf;
  // +16 for alignment.
  if (static_cast<int64_t>(buf.size()) < floats + 16) buf.resize(floats + 16);
  return buf;
}

float* Align64(float* p) {
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t{63});
}

template <typename KV>
struct Problem {
  const float* q;
  const KV* k_cache;
  const KV* v_cache;
  int64_t start_pos, n_new, n_heads, n_kv_heads, head_dim;
  float* out;
  int64_t group, tokens_per_unit, chunks;
  int64_t heads_per_unit;  // kv heads a unit processes together (1 or n_kv_heads)
  int64_t row_stride, head_stride;
  // int8 caches: kv head g's scale for position p at g * scale_head_stride + p *
  // scale_row_stride; null otherwise.
  const float* k_scale = nullptr;
  const float* v_scale = nullptr;
  int64_t scale_row_stride = 0, scale_head_stride = 0;
  int64_t head_groups() const { return n_kv_heads / heads_per_unit; }
  int64_t units() const { return head_groups() * chunks; }
};

// `all_heads`: each unit takes every kv head of its tokens (callers that do not split the
// problem over threads); otherwise one kv head per unit (parallelism within a sequence).
template <typename KV>
Problem<KV> MakeProblem(const float* q, const KV* k_cache, const KV* v_cache, int64_t start_pos,
                        int64_t n_new, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                        float* out, bool all_heads, int64_t row_stride, int64_t head_stride) {
  Problem<KV> p{q,   k_cache, v_cache, start_pos, n_new, n_heads, n_kv_heads, head_dim,
                out, 0,       0,       0,         1,     0,       0};
  p.row_stride = row_stride > 0 ? row_stride : n_kv_heads * head_dim;
  p.head_stride = head_stride > 0 ? head_stride : head_dim;
  p.group = n_heads / n_kv_heads;
  p.tokens_per_unit = std::max<int64_t>(1, kRowsPerUnit / p.group);
  p.chunks = (n_new + p.tokens_per_unit - 1) / p.tokens_per_unit;
  p.heads_per_unit = all_heads ? n_kv_heads : 1;
  return p;
}

// Unit index u: kv heads from (u % head_groups) * heads_per_unit, token chunk u / head_groups.
template <typename KV>
void RunUnit(const Problem<KV>& p, int64_t index) {
  const int64_t g0 = (index % p.head_groups()) * p.heads_per_unit;
  const int64_t nh = p.heads_per_unit;
  const int64_t i0 = (index / p.head_groups()) * p.tokens_per_unit;
  const int64_t i1 = std::min(p.n_new, i0 + p.tokens_per_unit);
  const int64_t rows = (i1 - i0) * p.group;
  thread_local std::vector<const float*> q_rows;
  thread_local std::vector<float*> out_rows;
  thread_local std::vector<int64_t> ctx;
  thread_local std::vector<Unit<KV>> units;
  q_rows.resize(nh * rows);
  out_rows.resize(nh * rows);
  ctx.resize(rows);
  units.clear();
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t a = 0; a < p.group; ++a) ctx[(i - i0) * p.group + a] = p.start_pos + i + 1;
  }
  for (int64_t hh = 0; hh < nh; ++hh) {
    const int64_t g = g0 + hh;
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t a = 0; a < p.group; ++a) {
        const int64_t r = (i - i0) * p.group + a;
        const int64_t h = g * p.group + a;
        q_rows[hh * rows + r] = p.q + (i * p.n_heads + h) * p.head_dim;
        out_rows[hh * rows + r] = p.out + (i * p.n_heads + h) * p.head_dim;
      }
    }
    units.push_back(Unit<KV>{p.k_cache + g * p.head_stride,
                         p.v_cache + g * p.head_stride,
                         p.row_stride,
                         p.head_dim,
                         static_cast<float>(1.0 / std::sqrt(static_cast<double>(p.head_dim))),
                         rows,
                         q_rows.data() + hh * rows,
                         out_rows.data() + hh * rows,
                         ctx.data()});
    if (p.k_scale != nullptr) {
      units.back().ks = p.k_scale + g * p.scale_head_stride;
      units.back().vs = p.v_scale + g * p.scale_head_stride;
      units.back().scale_stride = p.scale_row_stride;
    }
  }
#if defined(__AVX512F__)
  if (p.head_dim % 16 == 0 && p.head_dim <= 256) {
    float* s = Align64(UnitScratch(nh * UnitStateFloats(p.head_dim, rows)).data());
    switch (p.head_dim / 16) {
      case 1:
        AttendUnitsAvx512<1>(units.data(), nh, s);
        return;
      case 2:
        AttendUnitsAvx512<2>(units.data(), nh, s);
        return;
      case 4:
        AttendUnitsAvx512<4>(units.data(), nh, s);
        return;
      case 8:
        AttendUnitsAvx512<8>(units.data(), nh, s);
        return;
      case 16:
        AttendUnitsAvx512<16>(units.data(), nh, s);
        return;
      default:
        break;
    }
  }
#endif
  for (const Unit<KV>& u : units) AttendUnitGeneric(u, UnitScratch(p.head_dim).data());
}

template <typename KV>
void AttentionPartT(const float* q, const KV* k_cache, const KV* v_cache, int64_t start_pos,
                    int64_t n_new, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                    float* out, int part, int num_parts, int64_t row_stride,
                    int64_t head_stride) {
  if (n_new <= 0 || num_parts <= 0 || part < 0 || part >= num_parts) return;
  const Problem<KV> p = MakeProblem(q, k_cache, v_cache, start_pos, n_new, n_heads, n_kv_heads,
                                    head_dim, out, /*all_heads=*/num_parts == 1, row_stride,
                                    head_stride);
  for (int64_t u = part; u < p.units(); u += num_parts) RunUnit(p, u);
}

// Scales of an int8 cache (null for the others) and their layout.
struct KvScales {
  const float* k = nullptr;
  const float* v = nullptr;
  int64_t row_stride = 0, head_stride = 0;
};

template <typename KV>
void AttentionT(const float* q, const KV* k_cache, const KV* v_cache, int64_t start_pos,
                int64_t n_new, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, float* out,
                int64_t row_stride, int64_t head_stride, const KvScales& scales = {}) {
  if (n_new <= 0) return;
  // Keys visited summed over the new tokens, times the work per key for all heads.
  const int64_t keys = n_new * start_pos + n_new * (n_new + 1) / 2;
  const int threads = ThreadsFor(keys * n_heads * head_dim * 2, SyncThreads(), kMinWorkPerThread);
  Problem<KV> p = MakeProblem(q, k_cache, v_cache, start_pos, n_new, n_heads, n_kv_heads,
                              head_dim, out, /*all_heads=*/threads <= 1, row_stride, head_stride);
  p.k_scale = scales.k;
  p.v_scale = scales.v;
  p.scale_row_stride = scales.row_stride > 0 ? scales.row_stride : n_kv_heads;
  p.scale_head_stride = scales.head_stride > 0 ? scales.head_stride : 1;
  if (threads > 1 && p.units() > 1) {
    // Interleaved units balance the causal triangle.
    ParallelRun(threads, [&](int t, int nt) {
      for (int64_t u = t; u < p.units(); u += nt) RunUnit(p, u);
    });
    return;
  }
  for (int64_t u = 0; u < p.units(); ++u) RunUnit(p, u);
}

}  // namespace

void AttentionPart(const float* q, const float* k_cache, const float* v_cache, int64_t start_pos,
                   int64_t n_new, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, float* out,
                   int part, int num_parts, int64_t row_stride, int64_t head_stride) {
  AttentionPartT(q, k_cache, v_cache, start_pos, n_new, n_heads, n_kv_heads, head_dim, out, part,
                 num_parts, row_stride, head_stride);
}

void Attention(const float* q, const float* k_cache, const float* v_cache, int64_t start_pos,
               int64_t n_new, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, float* out,
               int64_t row_stride, int64_t head_stride) {
  AttentionT(q, k_cache, v_cache, start_pos, n_new, n_heads, n_kv_heads, head_dim, out,
             row_stride, head_stride);
}

void Attention(const float* q, const uint16_t* k_cache, const uint16_t* v_cache,
               int64_t start_pos, int64_t n_new, int64_t n_heads, int64_t n_kv_heads,
               int64_t head_dim, float* out, int64_t row_stride, int64_t head_stride) {
  AttentionT(q, k_cache, v_cache, start_pos, n_new, n_heads, n_kv_heads, head_dim, out,
             row_stride, head_stride);
}

void Attention(const float* q, const int8_t* k_cache, const int8_t* v_cache,
               const float* k_scale, const float* v_scale, int64_t start_pos, int64_t n_new,
               int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, float* out,
               int64_t row_stride, int64_t head_stride, int64_t scale_row_stride,
               int64_t scale_head_stride) {
  AttentionT(q, k_cache, v_cache, start_pos, n_new, n_heads, n_kv_heads, head_dim, out,
             row_stride, head_stride,
             KvScales{k_scale, v_scale, scale_row_stride, scale_head_stride});
}

}  // namespace ops
}  // namespace moemesh
