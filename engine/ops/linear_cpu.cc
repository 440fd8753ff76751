// CPU implementation of Linear: blocked weights, hand-written small-batch kernels, oneDNN
// matmul for large batches.
//
// Three kernel kinds:
//   kF32:       fp32 weights, fp32 math              (ct == kF32, F32/F16 checkpoint)
//   kBF16AsF32: bf16 weights widened to fp32 on load (ct == kF32, BF16 checkpoint). Widening
//               bf16 is exact, so the results are those of fp32 weights, at half the memory
//               traffic (decode is bandwidth-bound).
//   kBF16:      bf16 weights and x, fp32 accumulation (ct == kBF16; vdpbf16ps)
//
// Packed weight layouts (oneDNN's own blocked layouts, so its matmul reads them directly):
//   fp32: [Np/64][Kp][64]      == oneDNN format_tag::BA16a64b   over logical [K, N], Kp = K
//                                 rounded up to 16
//   bf16: [Np/64][Kp/2][64][2] == oneDNN format_tag::BA16a64b2a over logical [K, N], Kp = K
//                                 rounded up to 32
// with K = in, N = out, Np = N rounded up to 64, padding zeroed. A 64-wide column block is
// four AVX-512 registers, so the kernels broadcast one x value (or one bf16 pair of x) per k
// and need no horizontal reductions. For kBF16, x is rounded into bf16 rows zero-padded to Kp
// and oneDNN sees K = Kp (its bf16 kernels fall back to reference code for K-padded weights).
// For kBF16AsF32 with large m, the weights are widened into a per-thread fp32 copy for oneDNN.
//
// A fourth kind, kInt8 (ct == kInt8: --quantize_experts / --quantize_attention), has its own
// layout and kernels and no oneDNN path (oneDNN 2.6 has no per-group dynamic activation scales):
//   int8: [Np/64][Kp/4][64][4] int8 (Kp = K rounded up to 64): four consecutive k of a column
//         in one 32-bit lane, the operand layout of AVX-512 VNNI's vpdpbusd, which multiplies
//         64 unsigned x bytes by 64 signed weight bytes and adds them in int32 per column.
//         x is quantised per row and per group of 64 k to offset-binary bytes (q + 128), so
//         each group's int32 sum carries 128 * sum_k W_q[k][n], which is precomputed per
//         (group, column) ("comp") and subtracted before the group's sum is scaled into fp32.
// and a fifth, kInt4 (ct == kInt4), likewise:
//   int4: [Np/64][Kp/8][64][4] bytes, two k per byte: byte j of a column's 32-bit lane in
//         pair-row p holds k = 8p + j in its low nibble and k = 8p + 4 + j in its high nibble,
//         each as q + 8 (q in [-7, 7], one fp32 scale per (group of 64 k, column)). The nibbles
//         are the unsigned operand of vpdpbusd and x (signed bytes) the signed one, so a group's
//         int32 sum carries 8 * sum_k x_q, which the row's own group sum removes.

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <tuple>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "engine/dtype.h"
#include "engine/ops/linear.h"
#include "engine/ops/threading.h"
#include "oneapi/dnnl/dnnl.hpp"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

// Forces full unrolling of the register-tile loops (at -O2 GCC otherwise keeps the
// accumulators in memory).
#define UNROLL_LOOP _Pragma("GCC unroll 16")

namespace moemesh {
namespace ops {
namespace {

enum class Kind { kF32, kBF16AsF32, kBF16, kInt8, kInt4 };

constexpr int64_t kColBlock = 64;  // Output columns per packed block.
constexpr int64_t kKPadF32 = 16;   // K padding of the fp32 layout.
constexpr int64_t kKPadBF16 = 32;  // K padding of the bf16 layout.
constexpr int64_t kI8Group = 64;   // k per activation scale, and K padding of the int8 layout.
// int8 kernels prefetch one group of one column block ahead (int4 kernels: one int4 group,
// kI4GroupBytes).
constexpr int64_t kPrefetchAhead = kI8Group * kColBlock;
// One int4 group of one column block: 64 k x 64 columns of nibbles, then the 64 columns' scales
// (in the weight stream, so a thread streams one sequence of bytes).
constexpr int64_t kI4NibbleBytes = kI8Group * kColBlock / 2;
constexpr int64_t kI4GroupBytes = kI4NibbleBytes + kColBlock * 4;
// Largest m served by the hand-written kernels under Path::kAuto (linear_benchmark.cc: they
// match or beat oneDNN up to about these sizes). kBF16AsF32 has no oneDNN kernel (oneDNN 2.6
// has no f32 x bf16 matmul; it would need the weights widened per call), so the hand-written
// kernels serve every m while a column block stays L2-resident (they re-read the block for
// every 4 rows and do not block K).
constexpr int64_t kSmallMLimitF32 = 64;
constexpr int64_t kSmallMLimitBF16 = 64;
constexpr int64_t kSmallMLimitBF16AsF32LargeK = 32;
constexpr int64_t kL2ResidentBlockBytes = 512 << 10;
// Thread-count model: single-threaded time ~ max(weight bytes / 100 GB/s, multiply-adds /
// (100 fp32 or 200 bf16 per ns)), plus one thread per kNsPerThread of it. The bar is high on
// purpose: waking a sleeping pool worker costs a futex wake-up (dear on this VM), and with
// OpenMP a fork/join cost a scheduler time slice whenever another process competed for the
// cores (2-thread single-stream decode ran 5-10x slower than 1-thread when every lm_head
// forked). So decode-sized products of small models stay on the calling thread; prefill-sized
// ones and batched decode's large products split. (Lowering the bar for batched rows measured
// no gain: batched decode 6,400-7,050 -> 6,620-6,760 tok/s, prefill 19k -> 15.8k tok/s.)
constexpr double kBytesPerNs = 100.0;
constexpr double kF32MacsPerNs = 100.0;
constexpr double kBF16MacsPerNs = 200.0;
constexpr double kInt8MacsPerNs = 400.0;
// The int8/int4 kernels stream far less than the bus from one thread (linear_benchmark --qwen3:
// ~40 and ~30 GB/s, bound by the misses one thread keeps in flight), so their time model uses
// those rates: otherwise a 6 MB int4 q/k/v product of Qwen3-30B-A3B looked like 59 us and ran on
// one thread.
constexpr double kInt8BytesPerNs = 40.0;
constexpr double kInt4BytesPerNs = 30.0;
constexpr double kNsPerThread = 50000.0;

int64_t RoundUp(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Frees what AllocZeroed returned: std::free, or munmap for a mapping of `mapped` bytes.
struct AlignedDeleter {
  size_t mapped = 0;
  void operator()(void* p) const {
    if (mapped > 0) {
      ::munmap(p, mapped);
    } else {
      std::free(p);
    }
  }
};
template <typename T>
using AlignedArray = std::unique_ptr<T[], AlignedDeleter>;

// Packed weights of 256 KiB or more get their own anonymous mapping, and those of 2 MiB or more a
// 2 MiB-aligned one asked to be backed by transparent huge pages: on the dev VM a 4 KiB page fault
// costs microseconds (loading a 6 GiB model spent most of its time faulting), and a decode step
// streams every page of the weights once. Mappings keep them out of malloc's heap, where they
// sat between the load's transient buffers (checkpoint copies, dummy values) and kept that memory
// from being reused: with int8 experts of Qwen3-30B-A3B's shape (4 layers) the process held
// 6.4 GB after loading instead of 5.2 GB, and int4 experts (all under 2 MiB) of all 48 layers
// ran out of 24 GiB.
constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kMapBytes = size_t{256} << 10;

template <typename T>
AlignedArray<T> AllocZeroed(int64_t n) {
  const size_t bytes = static_cast<size_t>(RoundUp(std::max<int64_t>(n, 1) * sizeof(T), 64));
  if (bytes < kMapBytes) {
    void* p = std::aligned_alloc(64, bytes);
    if (p == nullptr) return AlignedArray<T>(nullptr);
    std::memset(p, 0, bytes);
    return AlignedArray<T>(static_cast<T*>(p));
  }
  const size_t size = static_cast<size_t>(RoundUp(static_cast<int64_t>(bytes), 4096));
  if (bytes < kHugePage) {  // fresh anonymous pages are zero
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);  // one fault, not one a page
    if (p == MAP_FAILED) return AlignedArray<T>(nullptr);
    return AlignedArray<T>(static_cast<T*>(p), AlignedDeleter{size});
  }
  // Over-map by one huge page and unmap the unaligned ends. Whole huge pages only: a tail past
  // the last one stays in 4 KiB pages (an int8 expert's 3 MiB gate/up would otherwise take 4 MiB).
  void* raw = ::mmap(nullptr, size + kHugePage, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return AlignedArray<T>(nullptr);
  const uintptr_t base = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (base + kHugePage - 1) / kHugePage * kHugePage;
  if (aligned > base) ::munmap(raw, aligned - base);
  const uintptr_t end = base + size + kHugePage;
  if (end > aligned + size) ::munmap(reinterpret_cast<void*>(aligned + size), end - (aligned + size));
#ifdef MADV_HUGEPAGE
  ::madvise(reinterpret_cast<void*>(aligned), bytes / kHugePage * kHugePage,
            MADV_HUGEPAGE);  // advisory
#endif
  return AlignedArray<T>(reinterpret_cast<T*>(aligned), AlignedDeleter{size});
}

// Grow-only per-thread buffer; Forward() allocates nothing in steady state.
class ThreadScratch {
 public:
  ~ThreadScratch() { std::free(p_); }
  void* Get(size_t bytes) {
    if (bytes > cap_) {
      std::free(p_);
      cap_ = static_cast<size_t>(RoundUp(std::max(bytes, 2 * cap_), 64));
      p_ = std::aligned_alloc(64, cap_);
      if (p_ == nullptr) std::abort();  // Out of memory; Forward() cannot report it.
    }
    return p_;
  }

 private:
  void* p_ = nullptr;
  size_t cap_ = 0;
};

thread_local ThreadScratch t_x_bf16;    // x rounded to bf16 (kBF16) or quantised (kInt8, kInt4)
thread_local ThreadScratch t_x_scales;  // kInt8, kInt4: x's per-group scales
thread_local ThreadScratch t_x_sums;    // kInt4: x's per-group sums of quantised values
thread_local ThreadScratch t_w_f32;
thread_local ThreadScratch t_dnnl_scratchpad;
thread_local ThreadScratch t_pad_x, t_pad_y;  // oneDNN inputs/outputs padded to a bucket

// Row counts given to oneDNN: multiples of 16 up to 128, of 64 up to 1024, then of 256.
int64_t BucketM(int64_t m) {
  const int64_t step = m <= 128 ? 16 : m <= 1024 ? 64 : 256;
  return (m + step - 1) / step * step;
}

// Rounds rows of x [m, k] (stride k) to bf16 (nearest even) into dst [m, ld] (ld >= k),
// zero-padding each row to ld.
void RoundRowsToBF16(const float* x, int64_t m, int64_t k, int64_t ld, uint16_t* dst) {
  for (int64_t r = 0; r < m; ++r) {
    const float* src = x + r * k;
    uint16_t* d = dst + r * ld;
    int64_t i = 0;
#if defined(__AVX512BF16__)
    for (; i + 16 <= k; i += 16) {
      __m256bh v = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
      std::memcpy(d + i, &v, 32);
    }
#endif
    for (; i < k; ++i) d[i] = F32ToBF16(src[i]);
    for (; i < ld; ++i) d[i] = 0;
  }
}

// ---------------------------------------------------------------------------------------
// Small-batch kernels. Each computes rows [R, ncols <= 64] of y for one packed column block.

#if defined(__AVX512F__)

// Makes the compiler keep v in a register: otherwise GCC folds the weight loads into every
// FMA as memory operands, which makes the multi-row tiles load-bound.
template <typename T>
inline void Pin(T& v) {
#if defined(__GNUC__)
  asm("" : "+v"(v));
#endif
}

inline __mmask16 LaneMask(int64_t valid) {
  if (valid >= 16) return 0xffff;
  if (valid <= 0) return 0;
  return static_cast<__mmask16>((1u << valid) - 1);
}

template <int R>
inline void StoreTile(__m512 (&acc)[R][4], const float* bias, float* y, int64_t ldy,
                      int64_t ncols) {
  UNROLL_LOOP
  for (int c = 0; c < 4; ++c) {
    __mmask16 mask = LaneMask(ncols - 16 * c);
    if (mask == 0) break;
    __m512 b = bias != nullptr ? _mm512_loadu_ps(bias + 16 * c) : _mm512_setzero_ps();
    UNROLL_LOOP
    for (int r = 0; r < R; ++r) {
      _mm512_mask_storeu_ps(y + r * ldy + 16 * c, mask, _mm512_add_ps(acc[r][c], b));
    }
  }
}

template <int R>
inline void ZeroTile(__m512 (&acc)[R][4]) {
  UNROLL_LOOP
  for (int r = 0; r < R; ++r) {
    UNROLL_LOOP
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  }
}

// Splits 16 bf16 pairs into the fp32 values of the even-k and odd-k halves.
inline void WidenPairs(__m512i v, __m512* even, __m512* odd) {
  *even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  *odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

// fp32 weights: w is one block [Kp][64]; x rows (fp32) have stride ldx.
template <int R>
void TileF32(const float* x, int64_t ldx, const float* w, int64_t k_len, const float* bias,
             float* y, int64_t ldy, int64_t ncols) {
  __m512 acc[R][4];
  ZeroTile<R>(acc);
  if constexpr (R == 1) {
    // Even and odd k accumulate separately: 8 independent FMA chains hide the FMA latency.
    __m512 acc2[1][4];
    ZeroTile<1>(acc2);
    int64_t k = 0;
    for (; k + 2 <= k_len; k += 2) {
      const float* wk = w + k * kColBlock;
      __m512 x0 = _mm512_set1_ps(x[k]);
      __m512 x1 = _mm512_set1_ps(x[k + 1]);
      UNROLL_LOOP
      for (int c = 0; c < 4; ++c) {
        acc[0][c] = _mm512_fmadd_ps(_mm512_load_ps(wk + 16 * c), x0, acc[0][c]);
        acc2[0][c] = _mm512_fmadd_ps(_mm512_load_ps(wk + 64 + 16 * c), x1, acc2[0][c]);
      }
    }
    if (k < k_len) {
      const float* wk = w + k * kColBlock;
      __m512 x0 = _mm512_set1_ps(x[k]);
      UNROLL_LOOP
      for (int c = 0; c < 4; ++c) {
        acc[0][c] = _mm512_fmadd_ps(_mm512_load_ps(wk + 16 * c), x0, acc[0][c]);
      }
    }
    UNROLL_LOOP
    for (int c = 0; c < 4; ++c) acc[0][c] = _mm512_add_ps(acc[0][c], acc2[0][c]);
  } else {
    for (int64_t k = 0; k < k_len; ++k) {
      const float* wk = w + k * kColBlock;
      __m512 wv[4];
      UNROLL_LOOP
      for (int c = 0; c < 4; ++c) {
        wv[c] = _mm512_load_ps(wk + 16 * c);
        Pin(wv[c]);
      }
      UNROLL_LOOP
      for (int r = 0; r < R; ++r) {
        __m512 xv = _mm512_set1_ps(x[r * ldx + k]);
        UNROLL_LOOP
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_fmadd_ps(wv[c], xv, acc[r][c]);
      }
    }
  }
  StoreTile<R>(acc, bias, y, ldy, ncols);
}

// bf16 weights, fp32 x and math: w is one block [Kp/2][64][2]. Same summation order as
// TileF32, so results equal those of the fp32 weights.
template <int R>
void TileBF16AsF32(const float* x, int64_t ldx, const uint16_t* w, int64_t k_len, const float* bias,
                   float* y, int64_t ldy, int64_t ncols) {
  const int64_t full_pairs = k_len / 2;
  __m512 acc[R][4];
  ZeroTile<R>(acc);
  if constexpr (R == 1) {
    __m512 acc2[1][4];
    ZeroTile<1>(acc2);
    for (int64_t p = 0; p < full_pairs; ++p) {
      const uint16_t* wp = w + p * 2 * kColBlock;
      __m512 x0 = _mm512_set1_ps(x[2 * p]);
      __m512 x1 = _mm512_set1_ps(x[2 * p + 1]);
      UNROLL_LOOP
      for (int c = 0; c < 4; ++c) {
        __m512 we, wo;
        WidenPairs(_mm512_load_si512(wp + 32 * c), &we, &wo);
        acc[0][c] = _mm512_fmadd_ps(we, x0, acc[0][c]);
        acc2[0][c] = _mm512_fmadd_ps(wo, x1, acc2[0][c]);
      }
    }
    if (k_len & 1) {
      const uint16_t* wp = w + full_pairs * 2 * kColBlock;
      __m512 x0 = _mm512_set1_ps(x[k_len - 1]);
      UNROLL_LOOP
      for (int c = 0; c < 4; ++c) {
        __m512 we, wo;
        WidenPairs(_mm512_load_si512(wp + 32 * c), &we, &wo);
        acc[0][c] = _mm512_fmadd_ps(we, x0, acc[0][c]);
      }
    }
    UNROLL_LOOP
    for (int c = 0; c < 4; ++c) acc[0][c] = _mm512_add_ps(acc[0][c], acc2[0][c]);
  } else {
    const int64_t pairs = (k_len + 1) / 2;
    for (int64_t p = 0; p < pairs; ++p) {
      const uint16_t* wp = w + p * 2 * kColBlock;
      const bool has_odd = 2 * p + 1 < k_len;
      __m512 we[4], wo[4];
      UNROLL_LOOP
      for (int c = 0; c < 4; ++c) {
        WidenPairs(_mm512_load_si512(wp + 32 * c), &we[c], &wo[c]);
        Pin(we[c]);
        Pin(wo[c]);
      }
      UNROLL_LOOP
      for (int r = 0; r < R; ++r) {
        __m512 x0 = _mm512_set1_ps(x[r * ldx + 2 * p]);
        UNROLL_LOOP
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_fmadd_ps(we[c], x0, acc[r][c]);
        if (has_odd) {
          __m512 x1 = _mm512_set1_ps(x[r * ldx + 2 * p + 1]);
          UNROLL_LOOP
          for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_fmadd_ps(wo[c], x1, acc[r][c]);
        }
      }
    }
  }
  StoreTile<R>(acc, bias, y, ldy, ncols);
}

#endif  // __AVX512F__

#if defined(__AVX512BF16__)

inline __m512bh BroadcastPair(const uint16_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return (__m512bh)_mm512_set1_epi32(static_cast<int>(v));
}

// bf16 weights and x: w is one block [Kp/2][64][2]; x rows are bf16 with stride ldx (even,
// zero-padded past k_len).
template <int R>
void TileBF16(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t k_len, const float* bias,
              float* y, int64_t ldy, int64_t ncols) {
  const int64_t pairs = (k_len + 1) / 2;
  __m512 acc[R][4];
  ZeroTile<R>(acc);
  if constexpr (R == 1) {
    __m512 acc2[1][4];
    ZeroTile<1>(acc2);
    int64_t p = 0;
    for (; p + 2 <= pairs; p += 2) {
      const uint16_t* wp = w + p * 2 * kColBlock;
      __m512bh x0 = BroadcastPair(x + 2 * p);
      __m512bh x1 = BroadcastPair(x + 2 * p + 2);
      UNROLL_LOOP
      for (int c = 0; c < 4; ++c) {
        acc[0][c] = _mm512_dpbf16_ps(acc[0][c], (__m512bh)_mm512_load_si512(wp + 32 * c), x0);
        acc2[0][c] =
            _mm512_dpbf16_ps(acc2[0][c], (__m512bh)_mm512_load_si512(wp + 128 + 32 * c), x1);
      }
    }
    if (p < pairs) {
      const uint16_t* wp = w + p * 2 * kColBlock;
      __m512bh x0 = BroadcastPair(x + 2 * p);
      UNROLL_LOOP
      for (int c = 0; c < 4; ++c) {
        acc[0][c] = _mm512_dpbf16_ps(acc[0][c], (__m512bh)_mm512_load_si512(wp + 32 * c), x0);
      }
    }
    UNROLL_LOOP
    for (int c = 0; c < 4; ++c) acc[0][c] = _mm512_add_ps(acc[0][c], acc2[0][c]);
  } else {
    for (int64_t p = 0; p < pairs; ++p) {
      const uint16_t* wp = w + p * 2 * kColBlock;
      __m512i wv[4];
      UNROLL_LOOP
      for (int c = 0; c < 4; ++c) {
        wv[c] = _mm512_load_si512(wp + 32 * c);
        Pin(wv[c]);
      }
      UNROLL_LOOP
      for (int r = 0; r < R; ++r) {
        __m512bh xv = BroadcastPair(x + r * ldx + 2 * p);
        UNROLL_LOOP
        for (int c = 0; c < 4; ++c) {
          acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)wv[c], xv);
        }
      }
    }
  }
  StoreTile<R>(acc, bias, y, ldy, ncols);
}

#endif  // __AVX512BF16__

#if defined(__AVX512VNNI__)

// Asks for the next group's weights while this one is multiplied: one thread's int8 kernel
// otherwise streamed only ~30 GB/s (linear_benchmark --qwen3, expert gate+up: 112 -> 80 us).
template <int kLines>
inline void PrefetchLines(const int8_t* p) {
  UNROLL_LOOP
  for (int i = 0; i < kLines; ++i) {
    _mm_prefetch(reinterpret_cast<const char*>(p + 64 * i), _MM_HINT_T0);
  }
}

inline __m512i BroadcastDword(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// int8 weights, quantised x: w is one block [Kp/4][64][4], comp its [groups][64] corrections,
// wscale its 64 row scales; x rows are offset-binary bytes with stride ldx and per-group scales
// xs with stride ldxs. Each group's int32 sums are exact, and the groups are added in order with
// one fp32 FMA each, so a row's result is the same in every tile size.
template <int R>
void TileI8(const uint8_t* x, int64_t ldx, const float* xs, int64_t ldxs, const int8_t* w,
            const int32_t* comp, const float* wscale, int64_t groups, const float* bias, float* y,
            int64_t ldy, int64_t ncols) {
  constexpr int64_t kGroupBytes = kI8Group * kColBlock;  // one group of one block
  __m512 accf[R][4];
  ZeroTile<R>(accf);
  for (int64_t g = 0; g < groups; ++g) {
    const int8_t* wg = w + g * kGroupBytes;
    const uint8_t* xg = x + g * kI8Group;
    __m512i acc[R][4];
    UNROLL_LOOP
    for (int r = 0; r < R; ++r) {
      UNROLL_LOOP
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_si512();
    }
    if constexpr (R == 1) {
      // Two independent chains per column register hide vpdpbusd's latency.
      __m512i acc2[4];
      UNROLL_LOOP
      for (int c = 0; c < 4; ++c) acc2[c] = _mm512_setzero_si512();
      UNROLL_LOOP
      for (int d = 0; d < kI8Group / 4; d += 2) {
        const int8_t* wd = wg + d * 4 * kColBlock;
        const __m512i x0 = BroadcastDword(xg + 4 * d);
        const __m512i x1 = BroadcastDword(xg + 4 * d + 4);
        PrefetchLines<8>(wd + kPrefetchAhead);
        UNROLL_LOOP
        for (int c = 0; c < 4; ++c) {
          acc[0][c] = _mm512_dpbusd_epi32(acc[0][c], x0, _mm512_load_si512(wd + 64 * c));
          acc2[c] = _mm512_dpbusd_epi32(acc2[c], x1, _mm512_load_si512(wd + 256 + 64 * c));
        }
      }
      UNROLL_LOOP
      for (int c = 0; c < 4; ++c) acc[0][c] = _mm512_add_epi32(acc[0][c], acc2[c]);
    } else {
      for (int d = 0; d < kI8Group / 4; ++d) {
        const int8_t* wd = wg + d * 4 * kColBlock;
        PrefetchLines<4>(wd + kPrefetchAhead);
        __m512i wv[4];
        UNROLL_LOOP
        for (int c = 0; c < 4; ++c) {
          wv[c] = _mm512_load_si512(wd + 64 * c);
          Pin(wv[c]);
        }
        UNROLL_LOOP
        for (int r = 0; r < R; ++r) {
          const __m512i xv = BroadcastDword(xg + r * ldx + 4 * d);
          UNROLL_LOOP
          for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], xv, wv[c]);
        }
      }
    }
    UNROLL_LOOP
    for (int c = 0; c < 4; ++c) {
      const __m512i cv = _mm512_load_si512(comp + g * kColBlock + 16 * c);
      UNROLL_LOOP
      for (int r = 0; r < R; ++r) {
        accf[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][c], cv)),
                                     _mm512_set1_ps(xs[r * ldxs + g]), accf[r][c]);
      }
    }
  }
  UNROLL_LOOP
  for (int c = 0; c < 4; ++c) {
    const __m512 sv = _mm512_load_ps(wscale + 16 * c);
    UNROLL_LOOP
    for (int r = 0; r < R; ++r) accf[r][c] = _mm512_mul_ps(accf[r][c], sv);
  }
  StoreTile<R>(accf, bias, y, ldy, ncols);
}

// int4 weights, signed quantised x: w is one block [Kp/8][64][4] of nibble pairs, wscale its
// [groups][64] scales; x rows are signed bytes with stride ldx, with per-group scales xs and sums
// xsum (stride ldxs). As TileI8, a row's result is the same in every tile size.
template <int R>
void TileI4(const uint8_t* x, int64_t ldx, const float* xs, const int32_t* xsum, int64_t ldxs,
            const uint8_t* w, int64_t groups, const float* bias, float* y, int64_t ldy,
            int64_t ncols) {
  // One row: low and high nibbles in separate sums (8 independent vpdpbusd chains).
  constexpr bool kSplit = R == 1;
  const __m512i nibble = _mm512_set1_epi8(0x0f);
  __m512 accf[R][4];
  ZeroTile<R>(accf);
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* wg = w + g * kI4GroupBytes;
    const uint8_t* xg = x + g * kI8Group;
    __m512i acc[R][4], acch[R][4];
    UNROLL_LOOP
    for (int r = 0; r < R; ++r) {
      UNROLL_LOOP
      for (int c = 0; c < 4; ++c) {
        acc[r][c] = _mm512_setzero_si512();
        if constexpr (kSplit) acch[r][c] = _mm512_setzero_si512();
      }
    }
    PrefetchLines<4>(reinterpret_cast<const int8_t*>(wg) + kI4GroupBytes + kI4NibbleBytes);
    UNROLL_LOOP
    for (int p = 0; p < kI8Group / 8; ++p) {
      const uint8_t* wp = wg + p * 4 * kColBlock;
      PrefetchLines<4>(reinterpret_cast<const int8_t*>(wp) + kI4GroupBytes);  // a group ahead
      __m512i xl[R], xh[R];
      UNROLL_LOOP
      for (int r = 0; r < R; ++r) {
        xl[r] = BroadcastDword(xg + r * ldx + 8 * p);
        xh[r] = BroadcastDword(xg + r * ldx + 8 * p + 4);
      }
      UNROLL_LOOP
      for (int c = 0; c < 4; ++c) {
        const __m512i v = _mm512_load_si512(wp + 64 * c);
        const __m512i lo = _mm512_and_si512(v, nibble);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
        UNROLL_LOOP
        for (int r = 0; r < R; ++r) {
          acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], lo, xl[r]);
          if constexpr (kSplit) {
            acch[r][c] = _mm512_dpbusd_epi32(acch[r][c], hi, xh[r]);
          } else {
            acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], hi, xh[r]);
          }
        }
      }
    }
    const float* wscale = reinterpret_cast<const float*>(wg + kI4NibbleBytes);
    UNROLL_LOOP
    for (int r = 0; r < R; ++r) {
      const __m512i corr = _mm512_set1_epi32(8 * xsum[r * ldxs + g]);
      const __m512 sx = _mm512_set1_ps(xs[r * ldxs + g]);
      UNROLL_LOOP
      for (int c = 0; c < 4; ++c) {
        __m512i dot = acc[r][c];
        if constexpr (kSplit) dot = _mm512_add_epi32(dot, acch[r][c]);
        const __m512 scale = _mm512_mul_ps(_mm512_load_ps(wscale + 16 * c), sx);
        accf[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(dot, corr)), scale,
                                     accf[r][c]);
      }
    }
  }
  StoreTile<R>(accf, bias, y, ldy, ncols);
}

#endif  // __AVX512VNNI__

// Quantises rows of x [m, k] (stride k) per group of kI8Group: q = round(x * 127 / max|x| of the
// group) into dst [m, kp] (kp = k rounded up to kI8Group; padding 0), stored as offset-binary
// bytes q + 128 (`offset`: the unsigned operand of vpdpbusd, kInt8) or as signed bytes (kInt4,
// whose weights are the unsigned operand); the group's max|x| / 127 into scales [m, kp /
// kI8Group] and, if `sums` is not null, the group's sum of q into sums [m, kp / kI8Group].
void QuantizeRows(const float* x, int64_t m, int64_t k, int64_t kp, bool offset, uint8_t* dst,
                  float* scales, int32_t* sums) {
  const int64_t groups = kp / kI8Group;
  const int32_t off = offset ? 128 : 0;
  for (int64_t r = 0; r < m; ++r) {
    const float* src = x + r * k;
    uint8_t* d = dst + r * kp;
    float* sc = scales + r * groups;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t k0 = g * kI8Group;
      const int64_t n = std::min(kI8Group, k - k0);
#if defined(__AVX512F__) && defined(__AVX512BW__)
      __m512 v[4];
      __m512 amax = _mm512_setzero_ps();
      for (int c = 0; c < 4; ++c) {
        v[c] = _mm512_maskz_loadu_ps(LaneMask(n - 16 * c), src + k0 + 16 * c);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(v[c]));
      }
      const float mx = _mm512_reduce_max_ps(amax);
      const float inv = mx > 0.0f ? 127.0f / mx : 0.0f;
      sc[g] = mx / 127.0f;
      const __m512 vinv = _mm512_set1_ps(inv);
      __m512i total = _mm512_setzero_si512();
      for (int c = 0; c < 4; ++c) {
        const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v[c], vinv));
        total = _mm512_add_epi32(total, q);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(d + k0 + 16 * c),
                         _mm512_cvtepi32_epi8(_mm512_add_epi32(q, _mm512_set1_epi32(off))));
      }
      if (sums != nullptr) sums[r * groups + g] = _mm512_reduce_add_epi32(total);
#else
      float mx = 0.0f;
      for (int64_t i = 0; i < n; ++i) mx = std::max(mx, std::fabs(src[k0 + i]));
      const float inv = mx > 0.0f ? 127.0f / mx : 0.0f;
      sc[g] = mx / 127.0f;
      int32_t total = 0;
      for (int64_t i = 0; i < kI8Group; ++i) {
        const int q = i < n ? static_cast<int>(std::nearbyint(src[k0 + i] * inv)) : 0;
        total += q;
        d[k0 + i] = static_cast<uint8_t>(q + off);
      }
      if (sums != nullptr) sums[r * groups + g] = total;
#endif
    }
  }
}

// Portable fallbacks over the same layouts.
[[maybe_unused]] void TileF32Generic(const float* x, int64_t ldx, int64_t rows, const float* w,
                                     int64_t k_len, const float* bias, float* y, int64_t ldy,
                                     int64_t ncols) {
  for (int64_t r = 0; r < rows; ++r) {
    float acc[kColBlock] = {};
    for (int64_t k = 0; k < k_len; ++k) {
      const float xv = x[r * ldx + k];
      const float* wk = w + k * kColBlock;
      for (int64_t c = 0; c < kColBlock; ++c) acc[c] += xv * wk[c];
    }
    for (int64_t c = 0; c < ncols; ++c) {
      y[r * ldy + c] = acc[c] + (bias != nullptr ? bias[c] : 0.0f);
    }
  }
}

// x is fp32 (kBF16AsF32) or bf16 (kBF16); w is a bf16 block.
template <typename X>
[[maybe_unused]] void TileBF16Generic(const X* x, int64_t ldx, int64_t rows, const uint16_t* w,
                                      int64_t k_len, const float* bias, float* y, int64_t ldy,
                                      int64_t ncols) {
  for (int64_t r = 0; r < rows; ++r) {
    float acc[kColBlock] = {};
    for (int64_t k = 0; k < k_len; ++k) {
      float xv;
      if constexpr (std::is_same_v<X, float>) {
        xv = x[r * ldx + k];
      } else {
        xv = BF16ToF32(x[r * ldx + k]);
      }
      const uint16_t* wk = w + (k / 2) * 2 * kColBlock + (k & 1);
      for (int64_t c = 0; c < kColBlock; ++c) acc[c] += xv * BF16ToF32(wk[2 * c]);
    }
    for (int64_t c = 0; c < ncols; ++c) {
      y[r * ldy + c] = acc[c] + (bias != nullptr ? bias[c] : 0.0f);
    }
  }
}

// The same arithmetic as TileI8 (exact int32 group sums, one fp32 FMA per group in order).
[[maybe_unused]] void TileI8Generic(const uint8_t* x, int64_t ldx, const float* xs, int64_t ldxs,
                                    int64_t rows, const int8_t* w, const int32_t* comp,
                                    const float* wscale, int64_t groups, const float* bias,
                                    float* y, int64_t ldy, int64_t ncols) {
  for (int64_t r = 0; r < rows; ++r) {
    float acc[kColBlock] = {};
    for (int64_t g = 0; g < groups; ++g) {
      int32_t dot[kColBlock] = {};
      for (int64_t i = 0; i < kI8Group; ++i) {
        const int64_t k = g * kI8Group + i;
        const int32_t xv = x[r * ldx + k];
        const int8_t* wk = w + (k / 4) * 4 * kColBlock + (k & 3);
        for (int64_t c = 0; c < kColBlock; ++c) dot[c] += xv * wk[4 * c];
      }
      for (int64_t c = 0; c < kColBlock; ++c) {
        acc[c] = std::fma(static_cast<float>(dot[c] - comp[g * kColBlock + c]), xs[r * ldxs + g],
                          acc[c]);
      }
    }
    for (int64_t c = 0; c < ncols; ++c) {
      y[r * ldy + c] = acc[c] * wscale[c] + (bias != nullptr ? bias[c] : 0.0f);
    }
  }
}

// The same arithmetic as TileI4.
[[maybe_unused]] void TileI4Generic(const uint8_t* x, int64_t ldx, const float* xs,
                                    const int32_t* xsum, int64_t ldxs, int64_t rows,
                                    const uint8_t* w, int64_t groups, const float* bias, float* y,
                                    int64_t ldy, int64_t ncols) {
  for (int64_t r = 0; r < rows; ++r) {
    float acc[kColBlock] = {};
    for (int64_t g = 0; g < groups; ++g) {
      int32_t dot[kColBlock] = {};
      for (int64_t i = 0; i < kI8Group; ++i) {
        const int32_t xv = static_cast<int8_t>(x[r * ldx + g * kI8Group + i]);
        const int64_t p = i / 8, j = i % 4;
        const int shift = (i % 8) < 4 ? 0 : 4;
        const uint8_t* wp = w + g * kI4GroupBytes + p * 4 * kColBlock + j;  // nibble pair-row p
        for (int64_t c = 0; c < kColBlock; ++c) dot[c] += xv * ((wp[4 * c] >> shift) & 0x0f);
      }
      const float* wscale = reinterpret_cast<const float*>(w + g * kI4GroupBytes + kI4NibbleBytes);
      for (int64_t c = 0; c < kColBlock; ++c) {
        acc[c] = std::fma(static_cast<float>(dot[c] - 8 * xsum[r * ldxs + g]),
                          wscale[c] * xs[r * ldxs + g], acc[c]);
      }
    }
    for (int64_t c = 0; c < ncols; ++c) {
      y[r * ldy + c] = acc[c] + (bias != nullptr ? bias[c] : 0.0f);
    }
  }
}

// Rows [0, rows) of one int4 column block, in tiles of 2 rows and one for the remainder.
void BlockRowsI4(const uint8_t* x, int64_t ldx, const float* xs, const int32_t* xsum, int64_t ldxs,
                 int64_t rows, const uint8_t* w, int64_t groups, const float* bias, float* y,
                 int64_t ldy, int64_t ncols) {
#if defined(__AVX512VNNI__)
  int64_t r = 0;
  for (; r + 2 <= rows; r += 2) {
    TileI4<2>(x + r * ldx, ldx, xs + r * ldxs, xsum + r * ldxs, ldxs, w, groups, bias,
              y + r * ldy, ldy, ncols);
  }
  if (r < rows) {
    TileI4<1>(x + r * ldx, ldx, xs + r * ldxs, xsum + r * ldxs, ldxs, w, groups, bias,
              y + r * ldy, ldy, ncols);
  }
#else
  TileI4Generic(x, ldx, xs, xsum, ldxs, rows, w, groups, bias, y, ldy, ncols);
#endif
}

// Rows [0, rows) of one int8 column block, in tiles of 3 rows (a 4-row tile would need 36
// vector registers) and one tile for the remainder.
void BlockRowsI8(const uint8_t* x, int64_t ldx, const float* xs, int64_t ldxs, int64_t rows,
                 const int8_t* w, const int32_t* comp, const float* wscale, int64_t groups,
                 const float* bias, float* y, int64_t ldy, int64_t ncols) {
#if defined(__AVX512VNNI__)
  int64_t r = 0;
  for (; r + 3 <= rows; r += 3) {
    TileI8<3>(x + r * ldx, ldx, xs + r * ldxs, ldxs, w, comp, wscale, groups, bias, y + r * ldy,
              ldy, ncols);
  }
  if (rows - r == 2) {
    TileI8<2>(x + r * ldx, ldx, xs + r * ldxs, ldxs, w, comp, wscale, groups, bias, y + r * ldy,
              ldy, ncols);
  } else if (rows - r == 1) {
    TileI8<1>(x + r * ldx, ldx, xs + r * ldxs, ldxs, w, comp, wscale, groups, bias, y + r * ldy,
              ldy, ncols);
  }
#else
  TileI8Generic(x, ldx, xs, ldxs, rows, w, comp, wscale, groups, bias, y, ldy, ncols);
#endif
}

#if defined(__AVX512F__)
struct TileF32Fn {
  template <int R>
  static void Run(const float* x, int64_t ldx, const void* w, int64_t k_len, const float* bias,
                  float* y, int64_t ldy, int64_t ncols) {
    TileF32<R>(x, ldx, static_cast<const float*>(w), k_len, bias, y, ldy, ncols);
  }
};
struct TileBF16AsF32Fn {
  template <int R>
  static void Run(const float* x, int64_t ldx, const void* w, int64_t k_len, const float* bias,
                  float* y, int64_t ldy, int64_t ncols) {
    TileBF16AsF32<R>(x, ldx, static_cast<const uint16_t*>(w), k_len, bias, y, ldy, ncols);
  }
};
#endif
#if defined(__AVX512BF16__)
struct TileBF16Fn {
  template <int R>
  static void Run(const uint16_t* x, int64_t ldx, const void* w, int64_t k_len, const float* bias,
                  float* y, int64_t ldy, int64_t ncols) {
    TileBF16<R>(x, ldx, static_cast<const uint16_t*>(w), k_len, bias, y, ldy, ncols);
  }
};
#endif

// Rows [0, rows) of one column block, in tiles of 4 rows and one tile for the remainder.
template <typename Tile, typename X>
[[maybe_unused]] void TileRows(const X* x, int64_t ldx, int64_t rows, const void* w, int64_t k_len,
                               const float* bias, float* y, int64_t ldy, int64_t ncols) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    Tile::template Run<4>(x + r * ldx, ldx, w, k_len, bias, y + r * ldy, ldy, ncols);
  }
  switch (rows - r) {
    case 3:
      Tile::template Run<3>(x + r * ldx, ldx, w, k_len, bias, y + r * ldy, ldy, ncols);
      break;
    case 2:
      Tile::template Run<2>(x + r * ldx, ldx, w, k_len, bias, y + r * ldy, ldy, ncols);
      break;
    case 1:
      Tile::template Run<1>(x + r * ldx, ldx, w, k_len, bias, y + r * ldy, ldy, ncols);
      break;
    default:
      break;
  }
}

void BlockRows(Kind kind, const void* x, int64_t ldx, int64_t rows, const void* w, int64_t k_len,
               const float* bias, float* y, int64_t ldy, int64_t ncols) {
  switch (kind) {
    case Kind::kF32:
#if defined(__AVX512F__)
      TileRows<TileF32Fn>(static_cast<const float*>(x), ldx, rows, w, k_len, bias, y, ldy, ncols);
#else
      TileF32Generic(static_cast<const float*>(x), ldx, rows, static_cast<const float*>(w), k_len,
                     bias, y, ldy, ncols);
#endif
      return;
    case Kind::kBF16AsF32:
#if defined(__AVX512F__)
      TileRows<TileBF16AsF32Fn>(static_cast<const float*>(x), ldx, rows, w, k_len, bias, y, ldy,
                                ncols);
#else
      TileBF16Generic<float>(static_cast<const float*>(x), ldx, rows,
                             static_cast<const uint16_t*>(w), k_len, bias, y, ldy, ncols);
#endif
      return;
    case Kind::kBF16:
#if defined(__AVX512BF16__)
      TileRows<TileBF16Fn>(static_cast<const uint16_t*>(x), ldx, rows, w, k_len, bias, y, ldy,
                           ncols);
#else
      TileBF16Generic<uint16_t>(static_cast<const uint16_t*>(x), ldx, rows,
                                static_cast<const uint16_t*>(w), k_len, bias, y, ldy, ncols);
#endif
      return;
    case Kind::kInt8:  // BlockRowsI8 / BlockRowsI4: they need the scales
    case Kind::kInt4:
      return;
  }
}

// Widens packed bf16 blocks [b0, b1) ([Kp32/2][64][2] each) into the fp32 layout
// ([Kp16][64] each) at dst.
void WidenBlocks(const uint16_t* src, int64_t kp_src, float* dst, int64_t kp_dst, int64_t b0,
                 int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const uint16_t* s = src + b * kp_src * kColBlock;
    float* d = dst + b * kp_dst * kColBlock;
    for (int64_t p = 0; p < kp_dst / 2; ++p) {
#if defined(__AVX512F__)
      for (int c = 0; c < 4; ++c) {
        __m512 even, odd;
        WidenPairs(_mm512_load_si512(s + p * 2 * kColBlock + 32 * c), &even, &odd);
        _mm512_store_ps(d + (2 * p) * kColBlock + 16 * c, even);
        _mm512_store_ps(d + (2 * p + 1) * kColBlock + 16 * c, odd);
      }
#else
      for (int64_t c = 0; c < kColBlock; ++c) {
        d[(2 * p) * kColBlock + c] = BF16ToF32(s[p * 2 * kColBlock + 2 * c]);
        d[(2 * p + 1) * kColBlock + c] = BF16ToF32(s[p * 2 * kColBlock + 2 * c + 1]);
      }
#endif
    }
  }
}

// ---------------------------------------------------------------------------------------
// oneDNN matmul over packed weights. Primitives are cached per (m, threads): oneDNN bakes the
// thread count into a primitive. Beyond kMaxCached distinct m values a runtime-M primitive
// serves the rest. Scratchpads are user-managed and per thread, so Run() is thread-safe.

// Sets the calling thread's OpenMP default team size for a scope (SyncThreads() has set it to
// the general default before).
class ScopedOmpThreads {
 public:
  explicit ScopedOmpThreads(int n) {
#ifdef _OPENMP
    saved_ = omp_get_max_threads();
    if (n != saved_) omp_set_num_threads(n);
#endif
    (void)n;
  }
  ~ScopedOmpThreads() {
#ifdef _OPENMP
    if (omp_get_max_threads() != saved_) omp_set_num_threads(saved_);
#endif
  }
  ScopedOmpThreads(const ScopedOmpThreads&) = delete;
  ScopedOmpThreads& operator=(const ScopedOmpThreads&) = delete;

 private:
  [[maybe_unused]] int saved_ = 1;
};

const dnnl::engine* CpuEngine() {
  static const dnnl::engine* engine = []() -> const dnnl::engine* {
    try {
      return new dnnl::engine(dnnl::engine::kind::cpu, 0);
    } catch (const dnnl::error&) {
      return nullptr;
    }
  }();
  return engine;
}

dnnl::stream* ThreadStream() {
  thread_local std::unique_ptr<dnnl::stream> stream;
  if (stream == nullptr) {
    const dnnl::engine* engine = CpuEngine();
    if (engine == nullptr) return nullptr;
    try {
      stream = std::make_unique<dnnl::stream>(*engine);
    } catch (const dnnl::error&) {
      return nullptr;
    }
  }
  return stream.get();
}

class DnnlMatmul {
 public:
  using dt = dnnl::memory::data_type;
  using tag = dnnl::memory::format_tag;

  // Weights are [k, n] in BA16a64b (fp32) or BA16a64b2a (bf16) layout of `weight_bytes`
  // bytes; `weights` (may be null: then passed to each Run) and `bias` ([n] or null) must
  // outlive this object. Source rows have stride `ld`. Null if oneDNN cannot serve it.
  static std::unique_ptr<DnnlMatmul> Create(dt type, int64_t k, int64_t n, int64_t ld,
                                            void* weights, int64_t weight_bytes,
                                            const float* bias) {
    const dnnl::engine* engine = CpuEngine();
    if (engine == nullptr) return nullptr;
    try {
      auto mm = std::unique_ptr<DnnlMatmul>(new DnnlMatmul());
      mm->type_ = type;
      mm->k_ = k;
      mm->n_ = n;
      mm->ld_ = ld;
      mm->w_md_ =
          dnnl::memory::desc({k, n}, type, type == dt::bf16 ? tag::BA16a64b2a : tag::BA16a64b);
      if (static_cast<int64_t>(mm->w_md_.get_size()) != weight_bytes) return nullptr;
      if (weights != nullptr) mm->w_mem_ = dnnl::memory(mm->w_md_, *engine, weights);
      if (bias != nullptr) {
        mm->bias_md_ = dnnl::memory::desc({1, n}, dt::f32, tag::ab);
        mm->bias_mem_ = dnnl::memory(mm->bias_md_, *engine, const_cast<float*>(bias));
      }
      return mm;
    } catch (const dnnl::error&) {
      return nullptr;
    }
  }

  std::string ImplName(int64_t m) const {
    try {
      const Prim* prim = Get(m, SyncThreads());
      return prim != nullptr ? prim->impl : "";
    } catch (const dnnl::error&) {
      return "";
    }
  }

  // Run() with the rows split over ParallelRun's threads and oneDNN single-threaded on each
  // part, so that no OpenMP team ever forms: libgomp's workers spin for milliseconds after
  // each region, taking a core from every other thread and process. Parts start at multiples
  // of 16 rows.
  bool RunSplit(const void* x, int64_t m, float* y, int threads,
                const void* weights = nullptr) const {
    if (threads <= 1 || m < 32) return Run(x, m, y, 1, weights);
    const size_t esize = type_ == dt::bf16 ? 2 : 4;
    std::atomic<bool> ok{true};
    ParallelRun(threads, [&](int t, int nt) {
      const int64_t r0 = std::min(m, (m * t / nt + 15) / 16 * 16);
      const int64_t r1 = t + 1 == nt ? m : std::min(m, (m * (t + 1) / nt + 15) / 16 * 16);
      if (r1 > r0 && !Run(static_cast<const char*>(x) + r0 * ld_ * esize, r1 - r0, y + r0 * n_,
                          1, weights)) {
        ok.store(false);
      }
    });
    return ok.load();
  }

  // y [m, n] = x [m, k] W on `threads` threads (<= SyncThreads()); `weights` overrides the
  // buffer given to Create(). False on failure (y is then unspecified; the caller recomputes
  // it).
  bool Run(const void* x, int64_t m, float* y, int threads, const void* weights = nullptr) const {
    dnnl::stream* stream = ThreadStream();
    if (stream == nullptr) return false;
    // oneDNN takes its team size from the calling thread's OpenMP default.
    ScopedOmpThreads scoped(threads);
    try {
      // m is rounded up to a bucket (few distinct primitives); the extra rows are zeros.
      const int64_t mb = BucketM(m);
      const void* xs = x;
      float* ys = y;
      if (mb != m) {
        const size_t esize = type_ == dt::bf16 ? 2 : 4;
        char* xp = static_cast<char*>(t_pad_x.Get(mb * ld_ * esize));
        std::memcpy(xp, x, m * ld_ * esize);
        std::memset(xp + m * ld_ * esize, 0, (mb - m) * ld_ * esize);
        xs = xp;
        ys = static_cast<float*>(t_pad_y.Get(mb * n_ * sizeof(float)));
      }
      const Prim* prim = Get(mb, threads);
      if (prim == nullptr) return false;
      const dnnl::engine& engine = *CpuEngine();
      dnnl::memory src({{mb, k_}, type_, {ld_, 1}}, engine, const_cast<void*>(xs));
      dnnl::memory dst({{mb, n_}, dt::f32, {n_, 1}}, engine, ys);
      dnnl::memory wei =
          weights != nullptr ? dnnl::memory(w_md_, engine, const_cast<void*>(weights)) : w_mem_;
      if (!wei) return false;
      std::unordered_map<int, dnnl::memory> args = {
          {DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}};
      if (bias_mem_) args.emplace(DNNL_ARG_BIAS, bias_mem_);
      if (prim->scratchpad_md.get_size() > 0) {
        void* buf = t_dnnl_scratchpad.Get(prim->scratchpad_md.get_size());
        args.emplace(DNNL_ARG_SCRATCHPAD, dnnl::memory(prim->scratchpad_md, engine, buf));
      }
      prim->matmul.execute(*stream, args);
      stream->wait();
      if (ys != y) std::memcpy(y, ys, m * n_ * sizeof(float));
      return true;
    } catch (const dnnl::error&) {
      return false;
    }
  }

 private:
  struct Prim {
    dnnl::matmul matmul;
    dnnl::memory::desc scratchpad_md;
    std::string impl;
  };
  DnnlMatmul() = default;

  // Throws dnnl::error. Primitives are shared process-wide by every Linear of the same dtype,
  // shape and bias, per (bucketed) m and thread count: the experts of a layer see a different
  // m at every step, and creating a primitive per expert and per m cost more than the
  // products. (A runtime-M primitive would avoid that, but oneDNN 2.6 serves it with its
  // reference kernel.)
  const Prim* Get(int64_t m, int threads) const {
    using Key = std::tuple<int, int64_t, int64_t, int64_t, bool, int64_t, int>;
    static std::mutex mu;
    static auto* cache = new std::map<Key, std::unique_ptr<Prim>>;
    const Key key(static_cast<int>(type_), k_, n_, ld_, static_cast<bool>(bias_mem_), m, threads);
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache->find(key);
    if (it != cache->end()) return it->second.get();
    dnnl::memory::desc src_md({m, k_}, type_, {ld_, 1});
    dnnl::memory::desc dst_md({m, n_}, dt::f32, {n_, 1});
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    dnnl::matmul::desc desc = bias_mem_ ? dnnl::matmul::desc(src_md, w_md_, bias_md_, dst_md)
                                        : dnnl::matmul::desc(src_md, w_md_, dst_md);
    dnnl::matmul::primitive_desc pd(desc, attr, *CpuEngine());
    auto prim = std::make_unique<Prim>();
    prim->matmul = dnnl::matmul(pd);
    prim->scratchpad_md = pd.scratchpad_desc();
    prim->impl = pd.impl_info_str();
    const Prim* result = prim.get();
    (*cache)[key] = std::move(prim);
    return result;
  }

  dt type_ = dt::f32;
  int64_t k_ = 0, n_ = 0, ld_ = 0;
  dnnl::memory::desc w_md_, bias_md_;
  dnnl::memory w_mem_, bias_mem_;
};

float ElementToF32(const void* w, DType wtype, int64_t i) {
  switch (wtype) {
    case DType::kF32:
      return static_cast<const float*>(w)[i];
    case DType::kBF16:
      return BF16ToF32(static_cast<const uint16_t*>(w)[i]);
    case DType::kF16:
      return F16ToF32(static_cast<const uint16_t*>(w)[i]);
  }
  return 0.0f;
}

// The kernels' view of x: rows of fp32 (kF32, kBF16AsF32), bf16 (kBF16), or bytes with
// per-group scales (kInt8: offset-binary; kInt4: signed, with per-group sums).
struct XRows {
  const void* data = nullptr;
  int64_t ld = 0;                 // elements per row
  size_t esize = 4;               // bytes per element
  const float* scales = nullptr;  // kInt8, kInt4: [rows][groups]
  const int32_t* sums = nullptr;  // kInt4: [rows][groups]
  int64_t groups = 0;

  XRows From(int64_t r) const {
    XRows o = *this;
    o.data = static_cast<const char*>(data) + r * ld * static_cast<int64_t>(esize);
    if (scales != nullptr) o.scales = scales + r * groups;
    if (sums != nullptr) o.sums = sums + r * groups;
    return o;
  }
};

// Out of host memory packing an [out, in] weight.
absl::Status NoMemory(int64_t out, int64_t in) {
  return absl::ResourceExhaustedError(
      absl::StrCat("Linear::Create: no memory for a [", out, ", ", in, "] weight"));
}

// max |x[i]| over n values.
float MaxAbs(const float* x, int64_t n) {
  int64_t i = 0;
  float mx = 0.0f;
#if defined(__AVX512F__)
  __m512 m = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
  mx = _mm512_reduce_max_ps(m);
#endif
  for (; i < n; ++i) mx = std::max(mx, std::fabs(x[i]));
  return mx;
}

// q[i] = clamp(nearbyint(x[i] / scale), -qmax, qmax), or 0 for every i when scale is 0 (a row
// or group of zeros). The same values, and divisions, as the scalar spec in linear.h.
void QuantizeWeights(const float* x, int64_t n, float scale, float qmax, int32_t* q) {
  if (!(scale > 0.0f)) {
    std::fill(q, q + n, 0);
    return;
  }
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 vs = _mm512_set1_ps(scale), lo = _mm512_set1_ps(-qmax), hi = _mm512_set1_ps(qmax);
  for (; i + 16 <= n; i += 16) {
    __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + i), vs),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    _mm512_storeu_si512(q + i, _mm512_cvtps_epi32(v));
  }
#endif
  for (; i < n; ++i) q[i] = static_cast<int32_t>(std::clamp(std::nearbyint(x[i] / scale), -qmax, qmax));
}

}  // namespace

struct Linear::Impl {
  int64_t out = 0, in = 0;
  ComputeType ct = ComputeType::kF32;
  Kind kind = Kind::kF32;
  int64_t blocks = 0;  // Np / 64.
  int64_t k_pad = 0;   // Kp of the packed layout.
  int64_t weight_bytes = 0;
  AlignedArray<float> w_f32;      // kF32.
  AlignedArray<uint16_t> w_bf16;  // kBF16AsF32, kBF16.
  AlignedArray<int8_t> w_i8;      // kInt8 [Np/64][Kp/4][64][4],
  AlignedArray<int32_t> i8_comp;  //   [Np/64][Kp/64][64]: 128 * sum of a group's weights,
  AlignedArray<float> i8_scale;   //   [Np]: each output row's scale.
  AlignedArray<uint8_t> w_i4;     // kInt4 [Np/64][Kp/64][kI4GroupBytes]: per group [8][64][4]
                                  //   nibble pairs, then 64 fp32 column scales.
  AlignedArray<float> bias;       // [Np] or null.
  std::unique_ptr<DnnlMatmul> dnnl;
  Path path = Path::kAuto;
  int64_t small_m_limit = 0;

  const void* Block(int64_t b) const {
    switch (kind) {
      case Kind::kF32:
        return w_f32.get() + b * k_pad * kColBlock;
      case Kind::kInt8:
        return w_i8.get() + b * k_pad * kColBlock;
      default:
        return w_bf16.get() + b * k_pad * kColBlock;
    }
  }
  // The kernels' x: x itself, or (kBF16) its bf16 copy or (kInt8, kInt4) its quantised copy in
  // this thread's scratch.
  XRows PrepareX(const float* x, int64_t m) const {
    XRows r;
    if (kind == Kind::kBF16) {
      auto* xb = static_cast<uint16_t*>(t_x_bf16.Get(m * k_pad * sizeof(uint16_t)));
      RoundRowsToBF16(x, m, in, k_pad, xb);
      r.data = xb;
      r.ld = k_pad;
      r.esize = sizeof(uint16_t);
    } else if (kind == Kind::kInt8 || kind == Kind::kInt4) {
      r.groups = k_pad / kI8Group;
      auto* xq = static_cast<uint8_t*>(t_x_bf16.Get(m * k_pad));
      auto* xs = static_cast<float*>(t_x_scales.Get(m * r.groups * sizeof(float)));
      int32_t* sums = nullptr;
      if (kind == Kind::kInt4) {
        sums = static_cast<int32_t*>(t_x_sums.Get(m * r.groups * sizeof(int32_t)));
      }
      QuantizeRows(x, m, in, k_pad, /*offset=*/kind == Kind::kInt8, xq, xs, sums);
      r.data = xq;
      r.ld = k_pad;
      r.esize = 1;
      r.scales = xs;
      r.sums = sums;
    } else {
      r.data = x;
      r.ld = in;
    }
    return r;
  }
  void RunBlocks(const XRows& x, int64_t m, float* y, int64_t b0, int64_t b1) const {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t col = b * kColBlock;
      const float* bias_b = bias != nullptr ? bias.get() + col : nullptr;
      const int64_t ncols = std::min(kColBlock, out - col);
      if (kind == Kind::kInt4) {
        BlockRowsI4(static_cast<const uint8_t*>(x.data), x.ld, x.scales, x.sums, x.groups, m,
                    w_i4.get() + b * x.groups * kI4GroupBytes, x.groups, bias_b, y + col, out,
                    ncols);
      } else if (kind == Kind::kInt8) {
        BlockRowsI8(static_cast<const uint8_t*>(x.data), x.ld, x.scales, x.groups, m,
                    static_cast<const int8_t*>(Block(b)), i8_comp.get() + b * x.groups * kColBlock,
                    i8_scale.get() + col, x.groups, bias_b, y + col, out, ncols);
      } else {
        BlockRows(kind, x.data, x.ld, m, Block(b), in, bias_b, y + col, out, ncols);
      }
    }
  }
  // Threads worth using for batch size m (at most SyncThreads()).
  double EstimatedNs(int64_t m) const {
    const double macs = static_cast<double>(m) * in * out;
    const double macs_per_ns = kind == Kind::kBF16                           ? kBF16MacsPerNs
                               : kind == Kind::kInt8 || kind == Kind::kInt4 ? kInt8MacsPerNs
                                                                             : kF32MacsPerNs;
    const double bytes_per_ns = kind == Kind::kInt8   ? kInt8BytesPerNs
                                : kind == Kind::kInt4 ? kInt4BytesPerNs
                                                      : kBytesPerNs;
    return std::max(weight_bytes / bytes_per_ns, macs / macs_per_ns);
  }
  int Threads(int64_t m) const {
    const double est_ns = EstimatedNs(m);
    const int max_threads = SyncThreads();
    if (est_ns < 2 * kNsPerThread) return 1;
    return static_cast<int>(std::min<double>(max_threads, est_ns / kNsPerThread));
  }
  void ForwardSmall(const XRows& x, int64_t m, float* y) const;
  bool ForwardOneDnn(const void* x, int64_t m, float* y) const;
  absl::Status PackInt8(const void* w, DType wtype);
  absl::Status PackInt4(const void* w, DType wtype);
};

absl::Status Linear::Impl::PackInt4(const void* w, DType wtype) {
  const int64_t groups = k_pad / kI8Group;
  w_i4 = AllocZeroed<uint8_t>(blocks * groups * kI4GroupBytes);
  if (w_i4 == nullptr) return NoMemory(out, in);
  weight_bytes = blocks * groups * kI4GroupBytes;
  std::vector<float> row(k_pad, 0.0f);
  std::vector<int32_t> q(k_pad);
  const size_t esize = DTypeSize(wtype);
  for (int64_t n = 0; n < out; ++n) {
    ToF32(static_cast<const char*>(w) + n * in * esize, wtype, in, row.data());
    const int64_t b = n / kColBlock, c = n % kColBlock;
    for (int64_t g = 0; g < groups; ++g) {
      uint8_t* group = w_i4.get() + (b * groups + g) * kI4GroupBytes;
      const float scale = MaxAbs(row.data() + g * kI8Group, kI8Group) / 7.0f;  // padding is 0
      std::memcpy(group + kI4NibbleBytes + c * 4, &scale, 4);
      QuantizeWeights(row.data() + g * kI8Group, kI8Group, scale, 7.0f, q.data());
      // Pair-row p, byte j: k = 8p + j (low nibble) and 8p + 4 + j (high), each q + 8.
      for (int p = 0; p < kI8Group / 8; ++p) {
        uint32_t lane = 0;
        for (int j = 0; j < 4; ++j) {
          const uint32_t lo = static_cast<uint32_t>(q[8 * p + j] + 8);
          const uint32_t hi = static_cast<uint32_t>(q[8 * p + 4 + j] + 8);
          lane |= (lo | hi << 4) << (8 * j);
        }
        std::memcpy(group + p * 4 * kColBlock + c * 4, &lane, 4);
      }
    }
  }
  return absl::OkStatus();
}

absl::Status Linear::Impl::PackInt8(const void* w, DType wtype) {
  const int64_t groups = k_pad / kI8Group;
  w_i8 = AllocZeroed<int8_t>(blocks * k_pad * kColBlock);
  i8_comp = AllocZeroed<int32_t>(blocks * groups * kColBlock);
  i8_scale = AllocZeroed<float>(blocks * kColBlock);
  if (w_i8 == nullptr || i8_comp == nullptr || i8_scale == nullptr) {
    return NoMemory(out, in);
  }
  weight_bytes = blocks * k_pad * kColBlock + blocks * groups * kColBlock * 4 + blocks * kColBlock * 4;
  std::vector<float> row(k_pad, 0.0f);
  std::vector<int32_t> q(k_pad);
  const size_t esize = DTypeSize(wtype);
  for (int64_t n = 0; n < out; ++n) {
    ToF32(static_cast<const char*>(w) + n * in * esize, wtype, in, row.data());
    const float scale = MaxAbs(row.data(), in) / 127.0f;
    i8_scale[n] = scale;
    QuantizeWeights(row.data(), k_pad, scale, 127.0f, q.data());
    const int64_t b = n / kColBlock, c = n % kColBlock;
    int8_t* col = w_i8.get() + b * k_pad * kColBlock + c * 4;
    int32_t* comp = i8_comp.get() + b * groups * kColBlock + c;
    for (int64_t k4 = 0; k4 < k_pad / 4; ++k4) {  // four k of the column: one 32-bit lane
      uint32_t lane = 0;
      for (int j = 0; j < 4; ++j) lane |= (static_cast<uint32_t>(q[4 * k4 + j]) & 0xffu) << (8 * j);
      std::memcpy(col + k4 * 4 * kColBlock, &lane, 4);
    }
    for (int64_t g = 0; g < groups; ++g) {
      int32_t sum = 0;
      for (int64_t k = g * kI8Group; k < (g + 1) * kI8Group; ++k) sum += q[k];
      comp[g * kColBlock] = 128 * sum;
    }
  }
  return absl::OkStatus();
}

void Linear::Impl::ForwardSmall(const XRows& x, int64_t m, float* y) const {
  const int threads = Threads(m);
  // Split column blocks when there are enough of them, else rows. Row chunks start at
  // multiples of 4, so every row goes through the same tile as single-threaded and results
  // do not depend on the thread count.
  const bool split_rows = blocks < 2 * threads && m >= 8 * threads;
  if (threads > 1 && (blocks > 1 || split_rows)) {
    ParallelRun(threads, [&](int t, int nt) {
      if (split_rows) {
        const int64_t r0 = std::min(m, RoundUp(m * t / nt, 4));
        const int64_t r1 = t + 1 == nt ? m : std::min(m, RoundUp(m * (t + 1) / nt, 4));
        if (r1 > r0) RunBlocks(x.From(r0), r1 - r0, y + r0 * out, 0, blocks);
      } else {
        RunBlocks(x, m, y, blocks * t / nt, blocks * (t + 1) / nt);
      }
    });
    return;
  }
  RunBlocks(x, m, y, 0, blocks);
}

bool Linear::Impl::ForwardOneDnn(const void* x, int64_t m, float* y) const {
  const int threads = Threads(m);
  if (kind != Kind::kBF16AsF32) return dnnl->RunSplit(x, m, y, threads);
  // Widen the weights into this thread's fp32 scratch (cost ~ one m=1 pass; only used for
  // m above the small-kernel limit).
  const int64_t kp_f32 = RoundUp(in, kKPadF32);
  auto* wf = static_cast<float*>(t_w_f32.Get(blocks * kp_f32 * kColBlock * sizeof(float)));
  ParallelRun(threads, [&](int t, int nt) {
    WidenBlocks(w_bf16.get(), k_pad, wf, kp_f32, blocks * t / nt, blocks * (t + 1) / nt);
  });
  return dnnl->RunSplit(x, m, y, threads, wf);
}

absl::StatusOr<Linear> Linear::Create(const void* w, DType wtype, int64_t out, int64_t in,
                                      ComputeType ct, const float* bias) {
  if (w == nullptr) return absl::InvalidArgumentError("Linear::Create: null weight");
  if (out <= 0 || in <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("Linear::Create: bad shape [", out, ", ", in, "]"));
  }
  auto impl = std::make_unique<Impl>();
  impl->out = out;
  impl->in = in;
  impl->ct = ct;
  if (ct == ComputeType::kBF16) {
    impl->kind = Kind::kBF16;
  } else if (ct == ComputeType::kInt8) {
    impl->kind = Kind::kInt8;
  } else if (ct == ComputeType::kInt4) {
    impl->kind = Kind::kInt4;
  } else {
    impl->kind = wtype == DType::kBF16 ? Kind::kBF16AsF32 : Kind::kF32;
  }
  impl->blocks = RoundUp(out, kColBlock) / kColBlock;
  const bool quantised = impl->kind == Kind::kInt8 || impl->kind == Kind::kInt4;
  impl->k_pad = RoundUp(in, impl->kind == Kind::kF32 ? kKPadF32
                            : quantised               ? kI8Group
                                                      : kKPadBF16);
  const int64_t packed = impl->blocks * impl->k_pad * kColBlock;

  if (quantised) {
    absl::Status st = impl->kind == Kind::kInt8 ? impl->PackInt8(w, wtype) : impl->PackInt4(w, wtype);
    if (!st.ok()) return st;
  } else if (impl->kind == Kind::kF32) {
    impl->w_f32 = AllocZeroed<float>(packed);
    if (impl->w_f32 == nullptr) return NoMemory(out, in);
    impl->weight_bytes = packed * 4;
    float* dst = impl->w_f32.get();
    for (int64_t n = 0; n < out; ++n) {
      float* col = dst + (n / kColBlock) * impl->k_pad * kColBlock + n % kColBlock;
      for (int64_t k = 0; k < in; ++k) col[k * kColBlock] = ElementToF32(w, wtype, n * in + k);
    }
  } else {
    impl->w_bf16 = AllocZeroed<uint16_t>(packed);
    if (impl->w_bf16 == nullptr) {
      return NoMemory(out, in);
    }
    impl->weight_bytes = packed * 2;
    uint16_t* dst = impl->w_bf16.get();
    for (int64_t n = 0; n < out; ++n) {
      uint16_t* col = dst + (n / kColBlock) * impl->k_pad * kColBlock + (n % kColBlock) * 2;
      for (int64_t k = 0; k < in; ++k) {
        uint16_t v = wtype == DType::kBF16 ? static_cast<const uint16_t*>(w)[n * in + k]
                                           : F32ToBF16(ElementToF32(w, wtype, n * in + k));
        col[(k / 2) * 2 * kColBlock + (k & 1)] = v;
      }
    }
  }
  if (bias != nullptr) {
    impl->bias = AllocZeroed<float>(impl->blocks * kColBlock);
    if (impl->bias == nullptr) return NoMemory(out, in);
    std::memcpy(impl->bias.get(), bias, out * sizeof(float));
  }
  using dt = dnnl::memory::data_type;
  switch (impl->kind) {
    case Kind::kF32:
      impl->dnnl = DnnlMatmul::Create(dt::f32, in, out, in, impl->w_f32.get(), impl->weight_bytes,
                                      impl->bias.get());
      impl->small_m_limit = kSmallMLimitF32;
      break;
    case Kind::kBF16AsF32:
      impl->dnnl = DnnlMatmul::Create(dt::f32, in, out, in, nullptr,
                                      impl->blocks * RoundUp(in, kKPadF32) * kColBlock * 4,
                                      impl->bias.get());
      impl->small_m_limit = impl->k_pad * kColBlock * 2 <= kL2ResidentBlockBytes
                                ? std::numeric_limits<int64_t>::max()
                                : kSmallMLimitBF16AsF32LargeK;
      break;
    case Kind::kBF16:
      impl->dnnl = DnnlMatmul::Create(dt::bf16, impl->k_pad, out, impl->k_pad, impl->w_bf16.get(),
                                      impl->weight_bytes, impl->bias.get());
      impl->small_m_limit = kSmallMLimitBF16;
      break;
    case Kind::kInt8:
    case Kind::kInt4:
      impl->small_m_limit = std::numeric_limits<int64_t>::max();
      break;
  }
  return Linear(std::move(impl));
}

Linear::Linear() = default;
Linear::Linear(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Linear::Linear(Linear&&) noexcept = default;
Linear& Linear::operator=(Linear&&) noexcept = default;
Linear::~Linear() = default;

int64_t Linear::in() const { return impl_->in; }
int64_t Linear::out() const { return impl_->out; }
ComputeType Linear::compute() const { return impl_->ct; }
int64_t Linear::weight_bytes() const { return impl_->weight_bytes; }
double Linear::EstimatedNs(int64_t m) const { return impl_->EstimatedNs(m); }
int Linear::ThreadsFor(int64_t m) const { return impl_->Threads(m); }
void Linear::set_path_for_testing(Path p) { impl_->path = p; }
int64_t Linear::small_m_limit() const { return impl_->small_m_limit; }
std::string Linear::onednn_impl_for_testing(int64_t m) const {
  return impl_->dnnl != nullptr ? impl_->dnnl->ImplName(m) : "";
}

void Linear::Forward(const float* x, int64_t m, float* y) const {
  if (m <= 0) return;
  const Impl& p = *impl_;
  const XRows src = p.PrepareX(x, m);
  const bool use_dnnl = p.dnnl != nullptr &&
                        (p.path == Path::kOneDnn || (p.path == Path::kAuto && m > p.small_m_limit));
  if (use_dnnl && p.ForwardOneDnn(src.data, m, y)) return;
  p.ForwardSmall(src, m, y);
}

void Linear::ForwardPart(const float* x, int64_t m, float* y, int part, int num_parts) const {
  if (m <= 0 || num_parts <= 0 || part < 0 || part >= num_parts) return;
  const Impl& p = *impl_;
  const int64_t b0 = p.blocks * part / num_parts;
  const int64_t b1 = p.blocks * (part + 1) / num_parts;
  if (b0 == b1) return;
  p.RunBlocks(p.PrepareX(x, m), m, y, b0, b1);
}

}  // namespace ops

const char* ComputeTypeName(ComputeType ct) {
  switch (ct) {
    case ComputeType::kF32:
      return "fp32";
    case ComputeType::kBF16:
      return "bf16";
    case ComputeType::kInt8:
      return "int8";
    case ComputeType::kInt4:
      return "int4";
  }
  return "?";
}

}  // namespace moemesh
