#include "engine/cuda/kernels.h"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <type_traits>
#include <utility>

namespace moemesh {
namespace cuda {
namespace {

constexpr int kWarp = 32;

// Programmatic dependent launch (SetProgrammaticLaunch). Every kernel launched through
// LaunchPdl starts with these, in this order: its blocks may then be scheduled while the kernel
// before it in the stream still runs, so nothing before WaitForPriorGrids may touch memory that
// earlier work writes or reads (the weights of a product, never written, may be prefetched).
// LetDependentsLaunch lets the next such kernel be scheduled once every block of this one has
// started. Without the launch attribute (and on the emulation) both are no-ops.
__device__ __forceinline__ void WaitForPriorGrids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void LetDependentsLaunch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// WaitForPriorGrids, then LetDependentsLaunch: the start of a kernel launched through LaunchPdl.
__device__ __forceinline__ void PdlStart() {
  WaitForPriorGrids();
  LetDependentsLaunch();
}

// Asks the L2 cache for the bytes [p, p + bytes) of a warp's weights, one 128-byte line per lane
// at a time (before WaitForPriorGrids: the wait overlaps their fetch).
__device__ __forceinline__ void PrefetchL2(const void* p, int64_t bytes, int lane) {
#if defined(__CUDA_ARCH__)
  const char* c = static_cast<const char*>(p);
  for (int64_t b = static_cast<int64_t>(lane) * 128; b < bytes; b += 32 * 128) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(c + b));
  }
#else
  (void)p, (void)bytes, (void)lane;
#endif
}

std::atomic<bool> g_programmatic{false};
std::atomic<bool> g_deep_loads{false};  // SetDeepLoads

// Launches kernel(args) on (grid, block, smem, stream), with the programmatic stream
// serialization launch attribute while SetProgrammaticLaunch is on. `kernel` must begin with
// PdlStart (or prefetch its weights, then PdlStart). `name`: for the emulation's statistics.
template <typename... P, typename... A>
cudaError_t LaunchPdl(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
                      cudaStream_t stream, A&&... args) {
#ifdef MOEMESH_CUDA_EMU
  ::emu::Launch(grid, block, smem, stream).With(kernel, name)(std::forward<A>(args)...);
  return cudaPeekAtLastError();  // left for the caller's cudaGetLastError, as CUDA does
#else
  (void)name;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = g_programmatic.load(std::memory_order_relaxed) ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<A>(args)...);
#endif
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float WarpMax(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// (value, index) a beats (value, index) b: greater, or equal at a lower index. NaN never beats.
__device__ __forceinline__ bool Beats(float av, int ai, float bv, int bi) {
  return av > bv || (av == bv && ai < bi);
}

// The best (value, index) over the warp, in every lane.
__device__ __forceinline__ void WarpArgMax(float* v, int* i) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, *v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, *i, o);
    if (Beats(ov, oi, *v, *i)) {
      *v = ov;
      *i = oi;
    }
  }
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024). `scratch`: 32 floats of shared
// memory. Every thread gets the result.
__device__ float BlockSum(float v, float* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  v = WarpSum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int nw = blockDim.x / kWarp;
  float t = lane < nw ? scratch[lane] : 0.0f;
  return WarpSum(t);
}

__device__ __forceinline__ float Bf16ToF32(uint16_t b) {
  return __uint_as_float(static_cast<uint32_t>(b) << 16);
}

__device__ __forceinline__ uint16_t F32ToBf16(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Eight consecutive weights as loaded (16 bytes of bf16 or 32 of fp32; LoadRaw8), and as fp32
// (Widen8), so that a kernel can have several loads in flight before it widens them.
template <typename WT>
struct Raw8;
template <>
struct Raw8<float> {
  float4 a, b;
};
template <>
struct Raw8<uint16_t> {
  uint4 a;
};

__device__ __forceinline__ void LoadRaw8(const float* p, Raw8<float>* r) {
  r->a = *reinterpret_cast<const float4*>(p);
  r->b = *reinterpret_cast<const float4*>(p + 4);
}

__device__ __forceinline__ void LoadRaw8(const uint16_t* p, Raw8<uint16_t>* r) {
  r->a = *reinterpret_cast<const uint4*>(p);
}

__device__ __forceinline__ void Widen8(const Raw8<float>& r, float* w) {
  w[0] = r.a.x; w[1] = r.a.y; w[2] = r.a.z; w[3] = r.a.w;
  w[4] = r.b.x; w[5] = r.b.y; w[6] = r.b.z; w[7] = r.b.w;
}

__device__ __forceinline__ void Widen8(const Raw8<uint16_t>& r, float* w) {
  const uint32_t words[4] = {r.a.x, r.a.y, r.a.z, r.a.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    w[2 * i] = __uint_as_float(words[i] << 16);
    w[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
  }
}

// Eight consecutive weights as fp32.
template <typename WT>
__device__ __forceinline__ void Load8(const WT* p, float* w) {
  Raw8<WT> r;
  LoadRaw8(p, &r);
  Widen8(r, w);
}

__device__ __forceinline__ float Load1(const float* p) { return *p; }
__device__ __forceinline__ float Load1(const uint16_t* p) { return Bf16ToF32(*p); }

__device__ __forceinline__ float Silu(float g) { return g / (1.0f + expf(-g)); }

// This block's group (blockIdx.y) of a grouped product: its rows [*r0, *r1) and matrix slot;
// false for a block past the last group. Without groups: all m rows, slot 0.
__device__ __forceinline__ bool BlockGroup(const Groups& groups, int m, int* r0, int* r1,
                                           int64_t* slot) {
  if (groups.num_groups == nullptr) {
    *r0 = 0;
    *r1 = m;
    *slot = 0;
    return true;
  }
  const int g = blockIdx.y;
  if (g >= *groups.num_groups) return false;
  *r0 = groups.row_begin[g];
  *r1 = groups.row_begin[g + 1];
  *slot = groups.slot[g];
  return true;
}

// Row r of a small-batch product's input (Groups::x_rows).
__device__ __forceinline__ const float* XRow(const float* x, const Groups& groups, int r, int in) {
  return x + static_cast<int64_t>(groups.x_rows != nullptr ? groups.x_rows[r] : r) * in;
}

constexpr int kLinWarps = 8;  // output rows per block

// What a small-batch kernel does after its product (SmallMFusion): nothing, the MoE combine of
// its output, or (SplitKKernel) the routing of its output logits.
constexpr int kTailNone = 0, kTailCombine = 1, kTailRoute = 2, kTailQkv = 3;

// One thread counts its group of threads (a block, a warp) in, after a barrier that follows
// their stores: whether it is the last of `total`. The stores are ordered before the count by
// the barrier and the fence (cumulative), the last one's later reads after it by the second
// fence; reads of other blocks' stores go to L2 (__ldcg). The last one resets the count for the
// next launch.
__device__ __forceinline__ bool CountIn(uint32_t* count, unsigned total) {
  __threadfence();
  const bool last = atomicAdd(count, 1u) == total - 1;
  if (last) {
    *count = 0;
    __threadfence();
  }
  return last;
}

// Whether this block is the last of `blocks` to get here (every thread of the block calls it, after
// its stores; the same answer in every thread).
__device__ bool LastBlock(uint32_t* count, unsigned blocks) {
  __shared__ unsigned last;
  __syncthreads();
  if (threadIdx.x == 0) last = CountIn(count, blocks) ? 1u : 0u;
  __syncthreads();
  return last != 0;
}

template <typename KV>
__device__ void PrepareQkvHead(const float* qkv, int t, int h, const QkvArgs& a, float* v);
__device__ void CombineSplits(const float* partial, int t, int h, int heads, int hd, int splits,
                              float* out);

__device__ void RouteGroupsBlock(const float* logits, int rows, int experts,
                                 const int32_t* k_per_row, int kmax, bool normalize, int32_t* ids,
                                 float* weights, const int32_t* slot_of_expert,
                                 int32_t* num_groups, int32_t* group_slot, int32_t* row_begin,
                                 int32_t* perm, int32_t* where, float* route_sm);

// The fused MoE combine of a product's output (SmallMFusion): each warp of the grid counts
// itself in when done with its outputs; the last of blockIdx.x's column (all of its groups'
// blocks) adds outputs [o_begin, o_end) of every token, in CombineColumn's order (same sums).
// Not through CombineColumn's preloading code: its 32-entry arrays make the 64-register
// one-row kernels spill (ptxas).
__device__ void ArriveAndCombine(const SmallMFusion& c, const float* y, int64_t ldy, int o_begin,
                                 int o_end, int out) {
  const int lane = threadIdx.x % kWarp;
  __syncwarp();
  unsigned last = 0;
  if (lane == 0) {
    last = CountIn(&c.counters[blockIdx.x], gridDim.y * (blockDim.x / kWarp)) ? 1u : 0u;
  }
  last = __shfl_sync(0xffffffffu, last, 0);
  if (last == 0) return;
  const int width = min(o_end, out) - o_begin;
  for (int p = lane; p < c.n * width; p += kWarp) {
    const int t = p / width, o = o_begin + p % width;
    float* dst = c.out + static_cast<int64_t>(t) * out + o;
    float acc = *dst;
    for (int j = 0; j < c.k; ++j) {
      const int32_t at = c.where[static_cast<int64_t>(t) * c.k + j];
      const float v = at >= 0 ? __ldcg(y + static_cast<int64_t>(at) * ldy + o) : 0.0f;
      const float wj = at >= 0 ? c.weights[static_cast<int64_t>(t) * c.k + j] : 0.0f;
      acc = fmaf(wj, v, acc);
    }
    *dst = acc;
  }
}

// Eight elements of an x row; with kNorm (SmallMFusion's norm) their squares added to *ss and
// the elements scaled by the norm's weights (the row's rsqrt is applied to the finished sum).
template <bool kNorm>
__device__ __forceinline__ void LoadX8(const float* x, const float* norm_w, float* xv,
                                       float* ss) {
  Load8(x, xv);
  if (kNorm) {
    float nv[8];
    Load8(norm_w, nv);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      *ss = fmaf(xv[e], xv[e], *ss);
      xv[e] *= nv[e];
    }
  }
}

// Writes RmsNorm(x row) (x * inv * w, the norm kernel's formula) from threads [first, first +
// count) of the block. (Every caller has first = 0; without it, ptxas spills 24 bytes in the
// fused norm + qkv kernel.)
__device__ __forceinline__ void WriteNormed(const float* xr, const SmallMFusion& f, float inv,
                                            int in, float* xn, int first, int count) {
  for (int i = static_cast<int>(threadIdx.x) - first; i >= 0 && i < in; i += count) {
    xn[i] = xr[i] * inv * f.norm_w[i];
  }
}

// kLinRows: x rows per pass over the weights (8 for batches; 1 for decode, where fewer
// registers let more warps stream weights at once). kNorm, kTail: SmallMFusion's (kNorm: one-row
// vector kernel without SwiGLU only; kTail: none or the combine, without SwiGLU; SplitKKernel
// alone takes the others).
template <typename WT, bool kVec, bool kSwiglu, int kLinRows, bool kNorm = false,
          int kTail = kTailNone>
__global__ void __launch_bounds__(kLinWarps * kWarp, kLinRows == 1 ? 4 : 1)
    SmallMKernel(const WT* __restrict__ w, const float* __restrict__ bias, int out, int in,
                 const float* __restrict__ x, int m, float* __restrict__ y, int64_t ldy,
                 bool accumulate, Groups groups, SmallMFusion fz) {
  static_assert(!kNorm || (kVec && !kSwiglu && kLinRows == 1), "norm: one-row vector kernel");
  static_assert(kTail == kTailNone || (kTail == kTailCombine && !kSwiglu), "tail: the combine");
  const int lane = threadIdx.x % kWarp;
  const int o = blockIdx.x * kLinWarps + threadIdx.x / kWarp;
  if (groups.num_groups == nullptr && o < out) {
    // One matrix, known before the work this kernel waits for is done: fetch this warp's rows.
    PrefetchL2(w + static_cast<int64_t>(o) * in, static_cast<int64_t>(in) * sizeof(WT), lane);
    if (kSwiglu) {
      PrefetchL2(w + (static_cast<int64_t>(out) + o) * in, static_cast<int64_t>(in) * sizeof(WT),
                 lane);
    }
  }
  PdlStart();
  int r0, r1;
  int64_t slot;
  const bool has_group = BlockGroup(groups, m, &r0, &r1, &slot);
  if (has_group && o < out) {
    const int64_t mat_rows = kSwiglu ? 2 * static_cast<int64_t>(out) : out;
    const WT* wg = w + (slot * mat_rows + o) * static_cast<int64_t>(in);
    const WT* wu = kSwiglu ? wg + static_cast<int64_t>(out) * in : nullptr;
    for (int rb = r0; rb < r1; rb += kLinRows) {
      const int nr = min(kLinRows, r1 - rb);
      const float* xr[kLinRows];
#pragma unroll
      for (int r = 0; r < kLinRows; ++r) xr[r] = XRow(x, groups, rb + min(r, nr - 1), in);
      float ag[kLinRows], au[kLinRows];
#pragma unroll
      for (int r = 0; r < kLinRows; ++r) ag[r] = au[r] = 0.0f;
      float ss = 0.0f;  // kNorm: the row's sum of squares
      if (kVec) {
#pragma unroll(kLinRows == 1 ? 4 : 1)
        for (int i = lane * 8; i < in; i += kWarp * 8) {
          float wv[8], uv[8];
          Load8(wg + i, wv);
          if (kSwiglu) Load8(wu + i, uv);
#pragma unroll
          for (int r = 0; r < kLinRows; ++r) {
            if (r < nr) {
              float xv[8];
              LoadX8<kNorm>(xr[r] + i, fz.norm_w + i, xv, &ss);
#pragma unroll
              for (int e = 0; e < 8; ++e) {
                ag[r] = fmaf(xv[e], wv[e], ag[r]);
                if (kSwiglu) au[r] = fmaf(xv[e], uv[e], au[r]);
              }
            }
          }
        }
      } else {
        for (int i = lane; i < in; i += kWarp) {
          const float wv = Load1(wg + i);
          const float uv = kSwiglu ? Load1(wu + i) : 0.0f;
#pragma unroll
          for (int r = 0; r < kLinRows; ++r) {
            if (r < nr) {
              const float xv = xr[r][i];
              ag[r] = fmaf(xv, wv, ag[r]);
              if (kSwiglu) au[r] = fmaf(xv, uv, au[r]);
            }
          }
        }
      }
#pragma unroll
      for (int r = 0; r < kLinRows; ++r) {
        ag[r] = WarpSum(ag[r]);
        if (kSwiglu) au[r] = WarpSum(au[r]);
      }
      if (kNorm) {
        const float inv = rsqrtf(WarpSum(ss) / static_cast<float>(in) + fz.eps);
        ag[0] *= inv;
        if (blockIdx.x == 0 && threadIdx.x < kWarp) {
          WriteNormed(xr[0], fz, inv, in, fz.xn + static_cast<int64_t>(rb) * in, 0, kWarp);
        }
      }
      if (lane == 0) {
#pragma unroll
        for (int r = 0; r < kLinRows; ++r) {
          if (r < nr) {
            float v;
            if (kSwiglu) {
              v = Silu(ag[r]) * au[r];
            } else {
              v = ag[r] + (bias != nullptr ? bias[o] : 0.0f);
            }
            float* dst = y + static_cast<int64_t>(rb + r) * ldy + o;
            *dst = accumulate ? *dst + v : v;
          }
        }
      }
    }
  }
  if (kTail == kTailCombine) {
    ArriveAndCombine(fz, y, ldy, blockIdx.x * kLinWarps, (blockIdx.x + 1) * kLinWarps, out);
  }
}

// The small-batch product for groups of several rows (MoE decode of a batch: a few rows per
// expert). The plain kernel above re-reads each x row from L1/L2 for every output row, which at
// 4 rows per group is 8 bytes of x per byte of bf16 weight; here each warp takes kOuts output
// rows (4 weight vectors per step: 4 outputs, or 2 gate/up pairs) and reuses every x load for all
// of them, with those 4 weight loads in flight together. kRows: x rows per pass over the
// weights. Each output's sum runs in the plain kernel's order (lane-strided, then WarpSum).
// kDepth: steps whose weight loads are issued together (2: 8 loads in flight per lane, for
// SmallMChoice::kMultiDeep; the same sums).
template <typename WT, bool kSwiglu, int kRows, int kDepth = 1>
__global__ void __launch_bounds__(kLinWarps * kWarp, 2)
    SmallMMultiKernel(const WT* __restrict__ w, const float* __restrict__ bias, int out, int in,
                      const float* __restrict__ x, int m, float* __restrict__ y, int64_t ldy,
                      bool accumulate, Groups groups) {
  constexpr int kOuts = kSwiglu ? 2 : 4;
  PdlStart();
  constexpr int kVecs = kSwiglu ? 2 * kOuts : kOuts;  // weight vectors per step
  int r0, r1;
  int64_t slot;
  if (!BlockGroup(groups, m, &r0, &r1, &slot)) return;
  const int lane = threadIdx.x % kWarp;
  const int o0 = (blockIdx.x * kLinWarps + threadIdx.x / kWarp) * kOuts;
  if (o0 >= out) return;
  const int64_t mat_rows = kSwiglu ? 2 * static_cast<int64_t>(out) : out;
  const WT* base = w + slot * mat_rows * static_cast<int64_t>(in);
  const WT* wr[kVecs];  // gate rows then up rows (SwiGLU), or the kOuts rows
#pragma unroll
  for (int j = 0; j < kOuts; ++j) {
    const int o = min(o0 + j, out - 1);  // past the end: recompute the last row, never stored
    wr[j] = base + static_cast<int64_t>(o) * in;
    if (kSwiglu) wr[kOuts + j] = wr[j] + static_cast<int64_t>(out) * in;
  }
  for (int rb = r0; rb < r1; rb += kRows) {
    const int nr = min(kRows, r1 - rb);
    const float* xr[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) xr[r] = XRow(x, groups, rb + min(r, nr - 1), in);
    float acc[kRows][kVecs];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int v = 0; v < kVecs; ++v) acc[r][v] = 0.0f;
    }
    for (int i0 = lane * 8; i0 < in; i0 += kWarp * 8 * kDepth) {
      Raw8<WT> raw[kDepth][kVecs];
#pragma unroll
      for (int d = 0; d < kDepth; ++d) {
        if (i0 + d * kWarp * 8 < in) {
#pragma unroll
          for (int v = 0; v < kVecs; ++v) LoadRaw8(wr[v] + i0 + d * kWarp * 8, &raw[d][v]);
        }
      }
#pragma unroll
      for (int d = 0; d < kDepth; ++d) {
        const int i = i0 + d * kWarp * 8;
        if (i >= in) break;
        float wv[kVecs][8];
#pragma unroll
        for (int v = 0; v < kVecs; ++v) Widen8(raw[d][v], wv[v]);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          if (r < nr) {
            float xv[8];
            Load8(xr[r] + i, xv);
#pragma unroll
            for (int v = 0; v < kVecs; ++v) {
#pragma unroll
              for (int e = 0; e < 8; ++e) acc[r][v] = fmaf(xv[e], wv[v][e], acc[r][v]);
            }
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r < nr) {
#pragma unroll
        for (int v = 0; v < kVecs; ++v) acc[r][v] = WarpSum(acc[r][v]);
      }
    }
    // Lane r * kOuts + j stores output o0 + j of row rb + r.
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int j = 0; j < kOuts; ++j) {
        if (lane == (r * kOuts + j) % kWarp && r < nr && o0 + j < out) {
          float v;
          if (kSwiglu) {
            v = Silu(acc[r][j]) * acc[r][kOuts + j];
          } else {
            v = acc[r][j] + (bias != nullptr ? bias[o0 + j] : 0.0f);
          }
          float* dst = y + static_cast<int64_t>(rb + r) * ldy + o0 + j;
          *dst = accumulate ? *dst + v : v;
        }
      }
    }
  }
}

// The one-row kernel with each output's sum split over kSplit warps (slices of `in`), for
// decode products too narrow to give every SM enough warps streaming weights (Qwen3-30B-A3B's
// o projection has 2048 output rows: ~16 warps per SM of an H100, each reading 8 KiB in a row).
// The kSplit partial sums meet in shared memory, added in slice order. kDepth > 1 (for
// SmallMChoice::kOneDeep): that many steps' weight loads are issued before any is used, rather
// than leaving the overlap to the compiler's unrolling; the same sums.
template <typename WT, bool kSwiglu, int kSplit, bool kNorm = false, int kTail = kTailNone,
          int kDepth = 1>
__global__ void __launch_bounds__(kLinWarps * kWarp, 4)
    SplitKKernel(const WT* __restrict__ w, const float* __restrict__ bias, int out, int in,
                 const float* __restrict__ x, int m, float* __restrict__ y, int64_t ldy,
                 bool accumulate, Groups groups, SmallMFusion fz) {
  static_assert(kLinWarps % kSplit == 0, "warps per block must split evenly");
  static_assert(!(kSwiglu && (kNorm || kTail != kTailNone)), "norm, tails: no SwiGLU");
  constexpr int kOutsPerBlock = kLinWarps / kSplit;
  __shared__ float part[kLinWarps][3];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int o = blockIdx.x * kOutsPerBlock + warp / kSplit;
  const int s = warp % kSplit;
  const bool active = o < out;  // inactive warps still meet the block's barriers
  // Slices of whole 256-element steps (32 lanes x 8), so every load stays 16-byte aligned.
  const int chunk = ((in + kSplit - 1) / kSplit + kWarp * 8 - 1) / (kWarp * 8) * (kWarp * 8);
  const int i0 = s * chunk, i1 = min(in, i0 + chunk);
  const int64_t mat_rows = kSwiglu ? 2 * static_cast<int64_t>(out) : out;
  if (groups.num_groups == nullptr && active && i0 < i1) {
    // One matrix, known before the work this kernel waits for is done: fetch this warp's slice.
    const int64_t bytes = static_cast<int64_t>(i1 - i0) * sizeof(WT);
    PrefetchL2(w + static_cast<int64_t>(o) * in + i0, bytes, lane);
    if (kSwiglu) PrefetchL2(w + (static_cast<int64_t>(out) + o) * in + i0, bytes, lane);
  }
  PdlStart();
  int r0, r1;
  int64_t slot;
  const bool has_group = BlockGroup(groups, m, &r0, &r1, &slot);  // the whole block
  const WT* wg = w + ((has_group ? slot : 0) * mat_rows + (active ? o : 0)) *
                         static_cast<int64_t>(in);
  const WT* wu = kSwiglu ? wg + static_cast<int64_t>(out) * in : nullptr;
  for (int r = r0; has_group && r < r1; ++r) {
    float ag = 0.0f, au = 0.0f, ss = 0.0f;  // ss: kNorm's sum of squares of this slice
    const float* xr = XRow(x, groups, r, in);
    if (active) {
      constexpr int kStep = kWarp * 8;
#pragma unroll(kDepth > 1 ? 1 : kSwiglu ? 2 : 4)
      for (int i0l = i0 + lane * 8; i0l < i1; i0l += kStep * kDepth) {
        Raw8<WT> rw[kDepth], ru[kDepth];
        if (kDepth > 1) {
#pragma unroll
          for (int d = 0; d < kDepth; ++d) {
            if (i0l + d * kStep < i1) {
              LoadRaw8(wg + i0l + d * kStep, &rw[d]);
              if (kSwiglu) LoadRaw8(wu + i0l + d * kStep, &ru[d]);
            }
          }
        }
#pragma unroll
        for (int d = 0; d < kDepth; ++d) {
          const int i = i0l + d * kStep;
          if (d > 0 && i >= i1) break;
          float wv[8], uv[8], xv[8];
          if (kDepth > 1) {
            Widen8(rw[d], wv);
            if (kSwiglu) Widen8(ru[d], uv);
          } else {
            Load8(wg + i, wv);
            if (kSwiglu) Load8(wu + i, uv);
          }
          LoadX8<kNorm>(xr + i, fz.norm_w + i, xv, &ss);
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            ag = fmaf(xv[e], wv[e], ag);
            if (kSwiglu) au = fmaf(xv[e], uv[e], au);
          }
        }
      }
      ag = WarpSum(ag);
      if (kSwiglu) au = WarpSum(au);
      if (kNorm) ss = WarpSum(ss);
    }
    if (lane == 0) {
      part[warp][0] = ag;
      part[warp][1] = au;
      part[warp][2] = ss;
    }
    __syncthreads();
    if (s == 0 && lane == 0 && active) {
      for (int t = 1; t < kSplit; ++t) {
        ag += part[warp + t][0];
        au += part[warp + t][1];
        ss += part[warp + t][2];
      }
      if (kNorm) ag *= rsqrtf(ss / static_cast<float>(in) + fz.eps);
      const float v = kSwiglu ? Silu(ag) * au : ag + (bias != nullptr ? bias[o] : 0.0f);
      float* dst = y + static_cast<int64_t>(r) * ldy + o;
      *dst = accumulate ? *dst + v : v;
    }
    if (kNorm && blockIdx.x == 0) {
      // Output 0's warps (always active) summed the squares as every warp group did.
      float t = part[0][2];
      for (int u = 1; u < kSplit; ++u) t += part[u][2];
      WriteNormed(xr, fz, rsqrtf(t / static_cast<float>(in) + fz.eps), in,
                  fz.xn + static_cast<int64_t>(r) * in, 0, blockDim.x);
    }
    __syncthreads();  // `part` is reused by the next row
  }
  if (kTail == kTailCombine) {
    ArriveAndCombine(fz, y, ldy, blockIdx.x * kOutsPerBlock, (blockIdx.x + 1) * kOutsPerBlock,
                     out);
  } else if (kTail == kTailRoute) {
    // The grid's last block routes the m rows of logits (y, ldy == out) as RouteAndGroup does.
    extern __shared__ float tail_sm[];
    if (LastBlock(fz.counters, gridDim.x * gridDim.y)) {
      const RouteArgs& a = fz.route;
      RouteGroupsBlock(y, m, out, a.k_per_row, a.kmax, a.normalize, a.ids, a.weights,
                       a.slot_of_expert, a.num_groups, a.group_slot, a.row_begin, a.perm,
                       a.where, tail_sm);
    }
  } else if (kTail == kTailQkv) {
    // The m tokens' qkv rows: each head's last block (head_dim a multiple of the outputs per
    // block) prepares that head of every token as PrepareQkv does.
    extern __shared__ float tail_sm[];
    const int hd = fz.qkv.head_dim, head = blockIdx.x * kOutsPerBlock / hd;
    if (LastBlock(fz.counters + head, hd / kOutsPerBlock)) {
      for (int t = 0; t < m; ++t) {
        if (fz.qkv.kv.bf16) {
          PrepareQkvHead<uint16_t>(y, t, head, fz.qkv, tail_sm);
        } else {
          PrepareQkvHead<float>(y, t, head, fz.qkv, tail_sm);
        }
      }
    }
  }
}

// Multiprocessors of the current device (cached: one kind of GPU per process).
int SmCount() {
  static const int n = [] {
    int dev = 0, count = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
      return 132;
    }
    return count;
  }();
  return n;
}

int SmallMForcedSplit(SmallMChoice choice) {
  switch (choice) {
    case SmallMChoice::kSplit1: return 1;
    case SmallMChoice::kSplit2: return 2;
    case SmallMChoice::kSplit4: return 4;
    case SmallMChoice::kSplit8: return 8;
    default: return 0;
  }
}

template <typename WT>
cudaError_t LaunchSmallM(const WT* w, const float* bias, int64_t out, int64_t in, const float* x,
                         int64_t m, float* y, int64_t ldy, bool accumulate, bool swiglu,
                         const Groups& groups, cudaStream_t stream, SmallMChoice choice,
                         SmallMFusion fz) {
  const bool grouped = groups.num_groups != nullptr;
  bool norm = fz.norm_w != nullptr;
  const bool comb = fz.out != nullptr, route = fz.route.ids != nullptr,
             qkv = fz.qkv.q_out != nullptr;
  if ((norm && (grouped || swiglu || fz.xn == nullptr || comb)) ||
      (comb + route + qkv > 1) || ((comb || route || qkv) && (swiglu || ldy != out)) ||
      (comb && (fz.k <= 0 || fz.k > 32)) || ((route || qkv) && grouped) ||
      ((comb || route || qkv) && fz.counters == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const bool vec = in % 8 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                   (!norm || reinterpret_cast<uintptr_t>(fz.norm_w) % 16 == 0);
  dim3 grid(static_cast<unsigned>((out + kLinWarps - 1) / kLinWarps),
            static_cast<unsigned>(grouped ? groups.max_groups : 1));
  dim3 block(kLinWarps * kWarp);
  const int o = static_cast<int>(out), k = static_cast<int>(in), mm = static_cast<int>(m);
  // Rows per group: all m for one matrix, the mean over the groups of a MoE layer.
  const int64_t per_group = grouped ? (m + groups.max_groups - 1) / groups.max_groups : m;
  const int forced_split = SmallMForcedSplit(choice);
  // Deep loads (SetDeepLoads): kAuto's kernels with several steps of weight loads in flight.
  const bool auto_deep =
      choice == SmallMChoice::kAuto && g_deep_loads.load(std::memory_order_relaxed);
  const bool multi =
      vec && (choice == SmallMChoice::kAuto ? (grouped ? per_group >= 2 : m > 8)
                                            : choice == SmallMChoice::kMulti ||
                                                  choice == SmallMChoice::kMultiDeep ||
                                                  choice == SmallMChoice::kMulti8);
  const bool one = vec && !multi && m <= 8;  // decode-sized: the one-row kernels
  const int split = one ? (forced_split > 0 ? forced_split : SmallMSplit(out, grid.y)) : 1;
  if (norm && !one) {
    // Not the one-row kernels: normalize first, then the product reads xn.
    const cudaError_t e = RmsNorm(x, fz.norm_w, m, in, fz.eps, fz.xn, stream);
    if (e != cudaSuccess) return e;
    x = fz.xn;
    norm = false;
    fz.norm_w = nullptr;
  }
  const QkvArgs& qa = fz.qkv;
  const size_t tail_smem = route ? RouteAndGroupSmem(m, out, fz.route.kmax)
                                 : static_cast<size_t>(qa.head_dim) * sizeof(float);  // qkv
  const bool qkv_heads = qkv && qa.mode != 2 && qa.head_dim > 0 &&
                         out == static_cast<int64_t>(qa.heads + 2 * qa.kv_heads) * qa.head_dim;
  const int tail = comb && !multi && fz.n <= kFusedCombineRows ? kTailCombine
                   : route && split > 1 && m <= kLinWarps && tail_smem <= 48 * 1024
                       ? kTailRoute
                   : qkv_heads && split > 1 && m <= kLinWarps &&
                           qa.head_dim % (kLinWarps / split) == 0
                       ? kTailQkv
                       : kTailNone;
  // The kernel variant for (norm, tail): SwiGLU products take in neither; only the split one-row
  // kernel routes.
  auto launch = [&](auto norm_tag, auto tail_tag) -> cudaError_t {
    constexpr bool kN = decltype(norm_tag)::value;
    constexpr int kT = decltype(tail_tag)::value;
    // The split kernel at `split` warps per sum; kDeep (kOneDeep): with its steps' weight loads
    // issued together, 4 (SwiGLU: 2) at a time, and at split 1 too.
    auto launch_split = [&](auto deep_tag) {
      constexpr bool kDeep = decltype(deep_tag)::value;
      auto go = [&](auto split_tag) {
        constexpr int kS = decltype(split_tag)::value;
        dim3 sgrid(static_cast<unsigned>((out + kLinWarps / kS - 1) / (kLinWarps / kS)), grid.y);
        const size_t smem = kT == kTailRoute || kT == kTailQkv ? tail_smem : 0;
        if (swiglu) {
          if constexpr (!kN && kT == kTailNone) {
            LaunchPdl(kDeep ? "SplitKKernel<WT, true, kS, false, kTailNone, 2> (deep loads)"
                            : "SplitKKernel<WT, true, kS, false, kTailNone, 1>",
                      SplitKKernel<WT, true, kS, false, kTailNone, kDeep ? 2 : 1>, sgrid, block, 0,
                      stream, w, bias, o, k, x, mm, y, ldy, accumulate, groups, fz);
          }
        } else {
          LaunchPdl(kDeep ? "SplitKKernel<WT, false, kS, kN, kT, 4> (deep loads)"
                          : "SplitKKernel<WT, false, kS, kN, kT, 1>",
                    SplitKKernel<WT, false, kS, kN, kT, kDeep ? 4 : 1>, sgrid, block, smem, stream,
                    w, bias, o, k, x, mm, y, ldy, accumulate, groups, fz);
        }
      };
      switch (split) {
        case 1:
          if constexpr (kDeep) go(std::integral_constant<int, 1>());  // else: SmallMKernel's
          break;
        case 2: go(std::integral_constant<int, 2>()); break;
        case 4: go(std::integral_constant<int, 4>()); break;
        default: go(std::integral_constant<int, 8>()); break;
      }
    };
    if constexpr (!kN && kT == kTailNone && sizeof(WT) == 2) {
      if (one && (choice == SmallMChoice::kOneDeep || auto_deep)) {
        launch_split(std::true_type());
        return cudaGetLastError();
      }
    }
    if (multi) {
      // Several rows per matrix: the multi-output kernel (x loads shared by 4 weight vectors).
      const int outs_per_block = kLinWarps * (swiglu ? 2 : 4);
      dim3 mgrid(static_cast<unsigned>((out + outs_per_block - 1) / outs_per_block), grid.y);
      if constexpr (!kN && kT == kTailNone) {
        // kRows x rows per pass; kDepth steps of weight loads in flight (kMultiDeep, bf16).
        auto go = [&](auto rows_tag, auto depth_tag) {
          constexpr int kR = decltype(rows_tag)::value, kD = decltype(depth_tag)::value;
          if (swiglu) {
            LaunchPdl(kD > 1 ? "SmallMMultiKernel<WT, true, kR, 2> (deep loads)"
                             : "SmallMMultiKernel<WT, true, kR, 1>",
                      SmallMMultiKernel<WT, true, kR, kD>, mgrid, block, 0, stream, w, bias, o, k,
                      x, mm, y, ldy, accumulate, groups);
          } else {
            LaunchPdl(kD > 1 ? "SmallMMultiKernel<WT, false, kR, 2> (deep loads)"
                             : "SmallMMultiKernel<WT, false, kR, 1>",
                      SmallMMultiKernel<WT, false, kR, kD>, mgrid, block, 0, stream, w, bias, o, k,
                      x, mm, y, ldy, accumulate, groups);
          }
        };
        using R4 = std::integral_constant<int, 4>;
        using R8 = std::integral_constant<int, 8>;
        using D1 = std::integral_constant<int, 1>;
        using D2 = std::integral_constant<int, 2>;
        // 4 x rows per pass up to a mean of 4 per group, else (or kMulti8) 8.
        const bool rows4 = per_group <= 4 && choice != SmallMChoice::kMulti8;
        bool deep = false;
        if constexpr (sizeof(WT) == 2) {
          deep = choice == SmallMChoice::kMultiDeep || auto_deep;
          if (deep) rows4 ? go(R4(), D2()) : go(R8(), D2());
        }
        if (!deep) rows4 ? go(R4(), D1()) : go(R8(), D1());
      }
    } else if (split > 1) {
      launch_split(std::false_type());
    } else if constexpr (kT != kTailRoute && kT != kTailQkv) {
      if (swiglu) {
        if constexpr (!kN && kT == kTailNone) {
          if (one) {
            LaunchPdl("SmallMKernel<WT, true, true, 1>", SmallMKernel<WT, true, true, 1>, grid,
                      block, 0, stream, w, bias, o, k, x, mm, y, ldy, accumulate, groups, fz);
          } else if (vec) {
            LaunchPdl("SmallMKernel<WT, true, true, 8>", SmallMKernel<WT, true, true, 8>, grid,
                      block, 0, stream, w, bias, o, k, x, mm, y, ldy, accumulate, groups, fz);
          } else {
            LaunchPdl("SmallMKernel<WT, false, true, 8>", SmallMKernel<WT, false, true, 8>, grid,
                      block, 0, stream, w, bias, o, k, x, mm, y, ldy, accumulate, groups, fz);
          }
        }
      } else if (one) {
        LaunchPdl("SmallMKernel<WT, true, false, 1, kN, kT>",
                  SmallMKernel<WT, true, false, 1, kN, kT>, grid, block, 0, stream, w, bias, o, k,
                  x, mm, y, ldy, accumulate, groups, fz);
      } else if constexpr (!kN) {
        if (vec) {
          LaunchPdl("SmallMKernel<WT, true, false, 8, false, kT>",
                    SmallMKernel<WT, true, false, 8, false, kT>, grid, block, 0, stream, w, bias, o,
                    k, x, mm, y, ldy, accumulate, groups, fz);
        } else {
          LaunchPdl("SmallMKernel<WT, false, false, 8, false, kT>",
                    SmallMKernel<WT, false, false, 8, false, kT>, grid, block, 0, stream, w, bias,
                    o, k, x, mm, y, ldy, accumulate, groups, fz);
        }
      }
    }
    return cudaGetLastError();
  };
  using N = std::integral_constant<bool, true>;
  using P = std::integral_constant<bool, false>;
  using TNone = std::integral_constant<int, kTailNone>;
  using TComb = std::integral_constant<int, kTailCombine>;
  using TRoute = std::integral_constant<int, kTailRoute>;
  using TQkv = std::integral_constant<int, kTailQkv>;
  cudaError_t e;
  if (tail == kTailCombine) {
    e = launch(P(), TComb());
  } else if (tail == kTailRoute) {
    e = norm ? launch(N(), TRoute()) : launch(P(), TRoute());
  } else if (tail == kTailQkv) {
    e = norm ? launch(N(), TQkv()) : launch(P(), TQkv());
  } else {
    e = norm ? launch(N(), TNone()) : launch(P(), TNone());
  }
  if (e != cudaSuccess || tail != kTailNone) return e;
  return FusionTail(y, m, out, fz, stream);
}

__global__ void RmsNormKernel(const float* x, const float* w, int dim, float eps, float* y) {
  __shared__ float scratch[32];
  PdlStart();
  const float* xr = x + static_cast<int64_t>(blockIdx.x) * dim;
  float* yr = y + static_cast<int64_t>(blockIdx.x) * dim;
  float ss = 0.0f;
  if (dim % 4 == 0) {
    const float4* x4 = reinterpret_cast<const float4*>(xr);
    for (int i = threadIdx.x; i < dim / 4; i += blockDim.x) {
      const float4 v = x4[i];
      ss = fmaf(v.x, v.x, fmaf(v.y, v.y, fmaf(v.z, v.z, fmaf(v.w, v.w, ss))));
    }
  } else {
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss = fmaf(xr[i], xr[i], ss);
  }
  ss = BlockSum(ss, scratch);
  const float inv = rsqrtf(ss / static_cast<float>(dim) + eps);
  for (int i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = xr[i] * inv * w[i];
}

// Element offset of (layer, position, K or V)'s row in the pool.
__device__ __forceinline__ int64_t KvRow(const PagedKv& kv, int64_t layer, int32_t page_off,
                                         int pos, int which) {
  const int32_t page = kv.pages[page_off + pos / kv.page_size];
  return ((static_cast<int64_t>(page) * kv.num_layers + layer) * 2 + which) * kv.page_size *
             kv.kv_dim +
         static_cast<int64_t>(pos % kv.page_size) * kv.kv_dim;
}

// KV elements: fp32, or bf16 bit patterns (rows rounded to nearest even as they are stored, as
// the CPU's bf16 cache does).
__device__ __forceinline__ float KvToF32(float v) { return v; }
__device__ __forceinline__ float KvToF32(uint16_t v) { return Bf16ToF32(v); }
template <typename T>
__device__ __forceinline__ T KvFromF32(float v);
template <>
__device__ __forceinline__ float KvFromF32<float>(float v) { return v; }
template <>
__device__ __forceinline__ uint16_t KvFromF32<uint16_t>(float v) { return F32ToBf16(v); }

// The q/k norm of one head (mode 1), v[0, hd) in shared memory, by one warp.
__device__ __forceinline__ void NormHead(float* v, const float* wn, int hd, float eps, int lane) {
  float ss = 0.0f;
  for (int i = lane; i < hd; i += kWarp) ss = fmaf(v[i], v[i], ss);
  ss = WarpSum(ss);
  const float inv = rsqrtf(ss / static_cast<float>(hd) + eps);
  __syncwarp();
  for (int i = lane; i < hd; i += kWarp) v[i] = v[i] * inv * wn[i];
}

// Rotary embedding (rotate-half) of pair (i, i + half) of a head v at position pos.
__device__ __forceinline__ void RopePair(float* v, int i, int half, int pos,
                                         const float* inv_freq) {
  const float angle = static_cast<float>(pos) * inv_freq[i];
  float sn, c;
  sincosf(angle, &sn, &c);
  const float x1 = v[i], x2 = v[i + half];
  v[i] = x1 * c - x2 * sn;
  v[i + half] = x2 * c + x1 * sn;
}

__device__ __forceinline__ float Clip(float v, float clip) {
  return clip > 0.0f ? fminf(fmaxf(v, -clip), clip) : v;
}

// Token t's PrepareQkv by the whole block. s: (heads + 2 kv_heads) * hd floats of shared
// memory; the block's threads meet at barriers. qkv is read from L2 (the fused qkv product's last
// block reads rows other blocks wrote).
template <typename KV>
__device__ void PrepareQkvBlock(const float* qkv, int t, int heads, int kv_heads, int hd,
                                float clip, int mode, const float* q_norm, const float* k_norm,
                                float eps, const float* inv_freq, int64_t layer,
                                const PagedKv& kv, float* q_out, float* s) {
  __shared__ float scratch[32];
  const int qd = heads * hd, kvd = kv_heads * hd, n = qd + 2 * kvd;
  const float* row = qkv + static_cast<int64_t>(t) * n;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = Clip(__ldcg(row + i), clip);
  __syncthreads();
  if (mode == 1) {  // per head, over q heads then k heads
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nw = blockDim.x / kWarp;
    for (int h = warp; h < heads + kv_heads; h += nw) {
      NormHead(s + h * hd, h < heads ? q_norm : k_norm, hd, eps, lane);
    }
    __syncthreads();
  } else if (mode == 2) {  // over the whole q (k) projection
    float ssq = 0.0f, ssk = 0.0f;
    for (int i = threadIdx.x; i < qd; i += blockDim.x) ssq = fmaf(s[i], s[i], ssq);
    for (int i = threadIdx.x; i < kvd; i += blockDim.x) ssk = fmaf(s[qd + i], s[qd + i], ssk);
    ssq = BlockSum(ssq, scratch);
    ssk = BlockSum(ssk, scratch);
    const float iq = rsqrtf(ssq / static_cast<float>(qd) + eps);
    const float ik = rsqrtf(ssk / static_cast<float>(kvd) + eps);
    for (int i = threadIdx.x; i < qd; i += blockDim.x) s[i] = s[i] * iq * q_norm[i];
    for (int i = threadIdx.x; i < kvd; i += blockDim.x) s[qd + i] = s[qd + i] * ik * k_norm[i];
    __syncthreads();
  }
  // Rotary embedding (rotate-half), on q and k heads.
  const int pos = kv.pos[t];
  const int half = hd / 2;
  for (int idx = threadIdx.x; idx < (heads + kv_heads) * half; idx += blockDim.x) {
    RopePair(s + idx / half * hd, idx % half, half, pos, inv_freq);
  }
  __syncthreads();
  float* qo = q_out + static_cast<int64_t>(t) * qd;
  for (int i = threadIdx.x; i < qd; i += blockDim.x) qo[i] = s[i];
  KV* kr = static_cast<KV*>(kv.pool) + KvRow(kv, layer, kv.page_off[t], pos, 0);
  KV* vr = static_cast<KV*>(kv.pool) + KvRow(kv, layer, kv.page_off[t], pos, 1);
  for (int i = threadIdx.x; i < kvd; i += blockDim.x) {
    kr[i] = KvFromF32<KV>(s[qd + i]);
    vr[i] = KvFromF32<KV>(s[qd + kvd + i]);
  }
}

template <typename KV>
__global__ void PrepareQkvKernel(const float* qkv, int heads, int kv_heads, int hd, float clip,
                                 int mode, const float* q_norm, const float* k_norm, float eps,
                                 const float* inv_freq, int64_t layer, PagedKv kv, float* q_out) {
  extern __shared__ float s[];
  PdlStart();
  PrepareQkvBlock<KV>(qkv, blockIdx.x, heads, kv_heads, hd, clip, mode, q_norm, k_norm, eps,
                      inv_freq, layer, kv, q_out, s);
}

// Head h (q heads, then k heads, then v heads) of token t's PrepareQkv (a QkvArgs, mode 0 or
// 1) by one block: PrepareQkvBlock's work for that head, the same bits. v: head_dim floats of
// shared memory.
template <typename KV>
__device__ void PrepareQkvHead(const float* qkv, int t, int h, const QkvArgs& a, float* v) {
  const int hd = a.head_dim, half = hd / 2, qd = a.heads * hd;
  const float* row = qkv + static_cast<int64_t>(t) * (qd + 2 * a.kv_heads * hd);
  __syncthreads();  // v may still be read for the previous token
  for (int i = threadIdx.x; i < hd; i += blockDim.x) {
    v[i] = Clip(__ldcg(row + static_cast<int64_t>(h) * hd + i), a.clip);
  }
  __syncthreads();
  const bool rotary = h < a.heads + a.kv_heads;  // q or k
  if (a.mode == 1 && rotary && threadIdx.x < kWarp) {
    NormHead(v, h < a.heads ? a.q_norm : a.k_norm, hd, a.eps, threadIdx.x);
  }
  __syncthreads();
  const int pos = a.kv.pos[t];
  if (rotary) {
    for (int i = threadIdx.x; i < half; i += blockDim.x) RopePair(v, i, half, pos, a.inv_freq);
    __syncthreads();
  }
  if (h < a.heads) {
    float* qo = a.q_out + static_cast<int64_t>(t) * qd + h * hd;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) qo[i] = v[i];
    return;
  }
  const int which = rotary ? 0 : 1;  // K or V
  const int kvh = h - a.heads - which * a.kv_heads;
  KV* dst = static_cast<KV*>(a.kv.pool) + KvRow(a.kv, a.layer, a.kv.page_off[t], pos, which) +
            static_cast<int64_t>(kvh) * hd;
  for (int i = threadIdx.x; i < hd; i += blockDim.x) dst[i] = KvFromF32<KV>(v[i]);
}

constexpr int kAttWarps = 8;
constexpr int kAttUnroll = 4;  // cache rows loaded before the first is used
constexpr int kMaxDimPerLane = 8;  // head_dim <= 256

template <typename KV>
__global__ void __launch_bounds__(kAttWarps * kWarp)
    PagedAttentionKernel(const float* q, int heads, int kv_heads, int hd, int64_t layer,
                         PagedKv kv, float* out, float* partial, uint32_t* counters) {
  PdlStart();
  __shared__ float sm_m[kAttWarps], sm_l[kAttWarps];
  __shared__ float sm_acc[kAttWarps][kMaxDimPerLane * kWarp];
  const int t = blockIdx.x, h = blockIdx.y;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int qd = heads * hd;
  const int kvh = h / (heads / kv_heads);
  const float scale = rsqrtf(static_cast<float>(hd));
  const int pos = kv.pos[t];
  const int32_t poff = kv.page_off[t];
  float qr[kMaxDimPerLane], acc[kMaxDimPerLane];
#pragma unroll
  for (int d = 0; d < kMaxDimPerLane; ++d) {
    const int i = lane + d * kWarp;
    qr[d] = i < hd ? q[static_cast<int64_t>(t) * qd + h * hd + i] * scale : 0.0f;
    acc[d] = 0.0f;
  }
  // Split s of gridDim.z takes positions [lo, hi) of [0, pos] (all of them when unsplit).
  const int splits = gridDim.z;
  const int chunk = (pos + splits) / splits;
  const int lo = static_cast<int>(blockIdx.z) * chunk, hi = min(pos + 1, lo + chunk);
  float m = -INFINITY, l = 0.0f;
  for (int p0 = lo + warp * kAttUnroll; p0 < hi; p0 += kAttWarps * kAttUnroll) {
    float kk[kAttUnroll][kMaxDimPerLane], vv[kAttUnroll][kMaxDimPerLane];
#pragma unroll
    for (int u = 0; u < kAttUnroll; ++u) {
      const int p = p0 + u;
      const bool ok = p < hi;
      const KV* pool = static_cast<const KV*>(kv.pool);
      const KV* kr = ok ? pool + KvRow(kv, layer, poff, p, 0) + kvh * hd : nullptr;
      const KV* vr = ok ? pool + KvRow(kv, layer, poff, p, 1) + kvh * hd : nullptr;
#pragma unroll
      for (int d = 0; d < kMaxDimPerLane; ++d) {
        const int i = lane + d * kWarp;
        const bool in = ok && i < hd;
        kk[u][d] = in ? KvToF32(kr[i]) : 0.0f;
        vv[u][d] = in ? KvToF32(vr[i]) : 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < kAttUnroll; ++u) {
      if (p0 + u >= hi) break;
      float dot = 0.0f;
#pragma unroll
      for (int d = 0; d < kMaxDimPerLane; ++d) dot = fmaf(qr[d], kk[u][d], dot);
      dot = WarpSum(dot);
      const float mn = fmaxf(m, dot);
      const float corr = expf(m - mn), e = expf(dot - mn);
      l = l * corr + e;
#pragma unroll
      for (int d = 0; d < kMaxDimPerLane; ++d) acc[d] = fmaf(acc[d], corr, e * vv[u][d]);
      m = mn;
    }
  }
  if (lane == 0) {
    sm_m[warp] = m;
    sm_l[warp] = l;
  }
#pragma unroll
  for (int d = 0; d < kMaxDimPerLane; ++d) sm_acc[warp][lane + d * kWarp] = acc[d];
  __syncthreads();
  float mx = -INFINITY;
  for (int w = 0; w < kAttWarps; ++w) mx = fmaxf(mx, sm_m[w]);
  float denom = 0.0f;
  for (int w = 0; w < kAttWarps; ++w) {
    if (sm_m[w] != -INFINITY) denom += sm_l[w] * expf(sm_m[w] - mx);
  }
  // Split: this block's (max, denominator, unnormalised numerators) for AttentionCombineKernel
  // (an empty split leaves max -inf).
  float* part = splits > 1 ? partial + ((static_cast<int64_t>(t) * heads + h) * splits +
                                        blockIdx.z) * (hd + 2)
                           : nullptr;
  if (part != nullptr && threadIdx.x == 0) {
    part[0] = mx;
    part[1] = denom;
  }
  for (int i = threadIdx.x; i < hd; i += blockDim.x) {
    float num = 0.0f;
    for (int w = 0; w < kAttWarps; ++w) {
      if (sm_m[w] != -INFINITY) num += sm_acc[w][i] * expf(sm_m[w] - mx);
    }
    if (part != nullptr) {
      part[2 + i] = num;
    } else {
      out[static_cast<int64_t>(t) * qd + h * hd + i] = num / denom;
    }
  }
  // Fused combine: the (token, head)'s last split to finish.
  if (part != nullptr && counters != nullptr &&
      LastBlock(counters + static_cast<int64_t>(t) * heads + h, splits)) {
    CombineSplits(partial, t, h, heads, hd, splits, out);
  }
}

// The splits of (token t, head h) into its attention output, by one block (any size: every
// output's sums run in split order). L2 loads: in the attention kernel, the last split's block
// reads the partials of other blocks.
__device__ void CombineSplits(const float* partial, int t, int h, int heads, int hd, int splits,
                              float* out) {
  const float* base = partial + (static_cast<int64_t>(t) * heads + h) * splits * (hd + 2);
  float mx = -INFINITY;
  for (int s = 0; s < splits; ++s) mx = fmaxf(mx, __ldcg(base + s * (hd + 2)));
  float denom = 0.0f;
  for (int s = 0; s < splits; ++s) {
    const float ms = __ldcg(base + s * (hd + 2));
    if (ms != -INFINITY) denom += __ldcg(base + s * (hd + 2) + 1) * expf(ms - mx);
  }
  for (int i = threadIdx.x; i < hd; i += blockDim.x) {
    float num = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const float ms = __ldcg(base + s * (hd + 2));
      if (ms != -INFINITY) num += __ldcg(base + s * (hd + 2) + 2 + i) * expf(ms - mx);
    }
    out[static_cast<int64_t>(t) * heads * hd + h * hd + i] = num / denom;
  }
}

__global__ void AttentionCombineKernel(const float* partial, int heads, int hd, int splits,
                                       float* out) {
  PdlStart();
  CombineSplits(partial, blockIdx.x, blockIdx.y, heads, hd, splits, out);
}

// Row r's routing by one warp (lane: its lane), p: [experts] floats of shared memory.
__device__ void TopKRow(const float* logits, int r, int lane, int experts,
                        const int32_t* k_per_row, int kmax, bool normalize, int32_t* ids,
                        float* weights, float* p) {
  const float* lr = logits + static_cast<int64_t>(r) * experts;
  float mx = -INFINITY;
  // L2 loads: the fused router product's last block reads logits other blocks wrote.
  for (int e = lane; e < experts; e += kWarp) mx = fmaxf(mx, __ldcg(lr + e));
  mx = WarpMax(mx);
  float sum = 0.0f;
  for (int e = lane; e < experts; e += kWarp) {
    const float v = expf(__ldcg(lr + e) - mx);
    p[e] = v;
    sum += v;
  }
  sum = WarpSum(sum);
  __syncwarp();
  for (int e = lane; e < experts; e += kWarp) p[e] /= sum;
  __syncwarp();
  const int k = k_per_row[r];
  float picked_sum = 0.0f;
  for (int j = 0; j < kmax; ++j) {
    if (j >= k) {
      if (lane == 0) {
        ids[static_cast<int64_t>(r) * kmax + j] = -1;
        weights[static_cast<int64_t>(r) * kmax + j] = 0.0f;
      }
      continue;
    }
    float best = -1.0f;
    int bi = experts;
    for (int e = lane; e < experts; e += kWarp) {
      if (p[e] > best) {  // ascending e: keeps the lower index on ties
        best = p[e];
        bi = e;
      }
    }
    WarpArgMax(&best, &bi);
    if (lane == 0) {
      ids[static_cast<int64_t>(r) * kmax + j] = bi;
      weights[static_cast<int64_t>(r) * kmax + j] = best;
      if (bi < experts) p[bi] = -2.0f;  // taken (a NaN row picks none: not past its p)
    }
    picked_sum += best;
    __syncwarp();
  }
  if (normalize && lane == 0) {
    for (int j = 0; j < k; ++j) weights[static_cast<int64_t>(r) * kmax + j] /= picked_sum;
  }
}

// One warp per row.
__global__ void TopKKernel(const float* logits, int experts, const int32_t* k_per_row, int kmax,
                           bool normalize, int32_t* ids, float* weights) {
  extern __shared__ float p[];
  TopKRow(logits, blockIdx.x, threadIdx.x, experts, k_per_row, kmax, normalize, ids, weights, p);
}

// BuildGroups by the whole block. sm: (4 * experts + 1 + nk) int32s of shared memory.
__device__ void GroupBlock(const int32_t* ids, int nk, int k, int experts,
                           const int32_t* slot_of_expert, int32_t* num_groups,
                           int32_t* group_slot, int32_t* row_begin, int32_t* perm,
                           int32_t* where, int32_t* sm) {
  // Shared: [experts] counts, [experts] starts, [experts + 1] group starts, [experts] group
  // slots, [nk] ids. Everything is staged there; global memory is written once, in parallel.
  int32_t* cnt = sm;
  int32_t* start = cnt + experts;
  int32_t* gbeg = start + experts;
  int32_t* gslot = gbeg + experts + 1;
  int32_t* sid = gslot + experts;
  __shared__ int32_t ngroups;
  for (int a = threadIdx.x; a < nk; a += blockDim.x) sid[a] = ids[a];
  __syncthreads();
  for (int e = threadIdx.x; e < experts; e += blockDim.x) {
    int c = 0;
    for (int a = 0; a < nk; ++a) c += sid[a] == e;
    cnt[e] = c;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int g = 0, off = 0;
    for (int e = 0; e < experts; ++e) {
      start[e] = off;
      if (cnt[e] == 0) continue;
      gslot[g] = slot_of_expert[e];
      gbeg[g] = off;
      off += cnt[e];
      ++g;
    }
    gbeg[g] = off;
    ngroups = g;
  }
  __syncthreads();
  const int G = ngroups;
  for (int g = threadIdx.x; g <= G; g += blockDim.x) {
    row_begin[g] = gbeg[g];
    if (g < G) group_slot[g] = gslot[g];
  }
  if (threadIdx.x == 0) *num_groups = G;
  for (int a = threadIdx.x; a < nk; a += blockDim.x) {
    const int e = sid[a];
    if (e < 0 || e >= experts) {
      where[a] = -1;
      continue;
    }
    int at = start[e];
    for (int b = 0; b < a; ++b) at += sid[b] == e;  // rank among earlier rows of expert e
    perm[at] = a / k;
    where[a] = at;
  }
}

__global__ void BuildGroupsKernel(const int32_t* ids, int nk, int k, int experts,
                                  const int32_t* slot_of_expert, int32_t* num_groups,
                                  int32_t* group_slot, int32_t* row_begin, int32_t* perm,
                                  int32_t* where) {
  extern __shared__ int32_t sm[];
  GroupBlock(ids, nk, k, experts, slot_of_expert, num_groups, group_slot, row_begin, perm, where,
             sm);
}

// TopK for `rows` rows (a warp each) then the grouping, in one block: a decode step's routing
// in one launch. Shared: [rows][experts] floats, then GroupBlock's.
__device__ void RouteGroupsBlock(const float* logits, int rows, int experts,
                                 const int32_t* k_per_row, int kmax, bool normalize, int32_t* ids,
                                 float* weights, const int32_t* slot_of_expert,
                                 int32_t* num_groups, int32_t* group_slot, int32_t* row_begin,
                                 int32_t* perm, int32_t* where, float* route_sm) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (warp < rows) {
    TopKRow(logits, warp, lane, experts, k_per_row, kmax, normalize, ids, weights,
            route_sm + warp * experts);
  }
  __syncthreads();  // ids in global memory, visible to the block from here
  GroupBlock(ids, rows * kmax, kmax, experts, slot_of_expert, num_groups, group_slot, row_begin,
             perm, where, reinterpret_cast<int32_t*>(route_sm + rows * experts));
}

__global__ void RouteGroupsKernel(const float* logits, int rows, int experts,
                                  const int32_t* k_per_row, int kmax, bool normalize,
                                  int32_t* ids, float* weights, const int32_t* slot_of_expert,
                                  int32_t* num_groups, int32_t* group_slot, int32_t* row_begin,
                                  int32_t* perm, int32_t* where) {
  extern __shared__ float route_sm[];
  PdlStart();
  RouteGroupsBlock(logits, rows, experts, k_per_row, kmax, normalize, ids, weights,
                   slot_of_expert, num_groups, group_slot, row_begin, perm, where, route_sm);
}

// Block (position, layer, K or V): one row.
template <typename KV>
__global__ void CopyKvRowsKernel(KV* pool, int num_layers, int page_size, int kv_dim,
                                 const int32_t* src_pages, const int32_t* dst_pages, int begin) {
  const int pos = begin + static_cast<int>(blockIdx.x);
  const int64_t block = static_cast<int64_t>(blockIdx.y) * 2 + blockIdx.z;
  const int64_t slot = static_cast<int64_t>(pos % page_size) * kv_dim;
  const int64_t per_page = static_cast<int64_t>(num_layers) * 2 * page_size * kv_dim;
  const KV* src = pool + src_pages[pos / page_size] * per_page + block * page_size * kv_dim + slot;
  KV* dst = pool + dst_pages[pos / page_size] * per_page + block * page_size * kv_dim + slot;
  for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) dst[i] = src[i];
}

__global__ void GatherRowsKernel(const float* src, const int32_t* perm, int64_t dim, float* dst) {
  PdlStart();
  const float* s = src + static_cast<int64_t>(perm[blockIdx.x]) * dim;
  float* d = dst + static_cast<int64_t>(blockIdx.x) * dim;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) d[i] = s[i];
}

// Block (row, column chunk of 256): each thread issues its k loads (load(at, i): column i of
// grouped row `at`) before summing in order.
template <typename Load>
__device__ __forceinline__ void CombineColumn(const int32_t* where, const float* weights, int k,
                                              int64_t dim, float* out, const Load& load) {
  const int r = blockIdx.x;
  const int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (i >= dim) return;
  constexpr int kMaxK = 32;
  float v[kMaxK], w[kMaxK];
#pragma unroll
  for (int j = 0; j < kMaxK; ++j) {
    if (j < k) {
      const int32_t at = where[static_cast<int64_t>(r) * k + j];
      v[j] = at >= 0 ? load(at, i) : 0.0f;
      w[j] = at >= 0 ? weights[static_cast<int64_t>(r) * k + j] : 0.0f;
    }
  }
  float acc = out[static_cast<int64_t>(r) * dim + i];
#pragma unroll
  for (int j = 0; j < kMaxK; ++j) {
    if (j < k) acc = fmaf(w[j], v[j], acc);
  }
  out[static_cast<int64_t>(r) * dim + i] = acc;
}

__global__ void CombineKernel(const float* y, const int32_t* where, const float* weights, int k,
                              int64_t dim, float* out) {
  PdlStart();
  CombineColumn(where, weights, k, dim, out,
                [&](int32_t at, int64_t i) { return y[at * dim + i]; });
}

__global__ void AddBiasKernel(float* y, const float* bias, int64_t out, int64_t ldy) {
  float* yr = y + static_cast<int64_t>(blockIdx.x) * ldy;
  for (int64_t i = threadIdx.x; i < out; i += blockDim.x) yr[i] += bias[i];
}

__global__ void ScaleSigmoidKernel(float* y, const float* g, int64_t dim) {
  const float s = 1.0f / (1.0f + expf(-g[blockIdx.x]));
  float* yr = y + static_cast<int64_t>(blockIdx.x) * dim;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) yr[i] *= s;
}

__global__ void AddKernel(float* dst, const float* src, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[i] += src[i];
  }
}

__global__ void SiluMulKernel(const float* gu, int64_t width, void* act, bool bf16) {
  const float* row = gu + static_cast<int64_t>(blockIdx.x) * 2 * width;
  for (int64_t i = threadIdx.x; i < width; i += blockDim.x) {
    const float v = Silu(row[i]) * row[width + i];
    const int64_t at = static_cast<int64_t>(blockIdx.x) * width + i;
    if (bf16) {
      static_cast<uint16_t*>(act)[at] = F32ToBf16(v);
    } else {
      static_cast<float*>(act)[at] = v;
    }
  }
}

__global__ void SiluMulBf16Kernel(const uint16_t* gu, int64_t width, uint16_t* act) {
  const uint16_t* row = gu + static_cast<int64_t>(blockIdx.x) * 2 * width;
  for (int64_t i = threadIdx.x; i < width; i += blockDim.x) {
    act[static_cast<int64_t>(blockIdx.x) * width + i] =
        F32ToBf16(Silu(Bf16ToF32(row[i])) * Bf16ToF32(row[width + i]));
  }
}

__global__ void Bf16ToF32Kernel(const uint16_t* x, int64_t n, float* y) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    y[i] = Bf16ToF32(x[i]);
  }
}

__global__ void ToBf16Kernel(const float* x, int64_t n, uint16_t* y) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    y[i] = F32ToBf16(x[i]);
  }
}

__global__ void ArgMaxRowsKernel(const float* x, int64_t n, int32_t* out) {
  __shared__ float sv[32];
  __shared__ int si[32];
  PdlStart();
  const float* row = x + static_cast<int64_t>(blockIdx.x) * n;
  float bv = -INFINITY;
  int bi = INT_MAX;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = row[i];
    if (Beats(v, static_cast<int>(i), bv, bi)) {
      bv = v;
      bi = static_cast<int>(i);
    }
  }
  WarpArgMax(&bv, &bi);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) {
    sv[warp] = bv;
    si[warp] = bi;
  }
  __syncthreads();
  if (warp == 0) {
    const int nw = blockDim.x / kWarp;
    bv = lane < nw ? sv[lane] : -INFINITY;
    bi = lane < nw ? si[lane] : INT_MAX;
    WarpArgMax(&bv, &bi);
    // A NaN first value: nothing compares greater than it, so the sequential scan stays at 0.
    if (lane == 0) out[blockIdx.x] = isnan(row[0]) || bi == INT_MAX ? 0 : bi;
  }
}

// The group of padded row p (begin: ascending [groups + 1]): the last g with begin[g] <= p.
__device__ __forceinline__ int FindGroup(const int32_t* begin, int groups, int p) {
  int lo = 0, hi = groups - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (begin[mid] <= p) lo = mid; else hi = mid - 1;
  }
  return lo;
}

__global__ void PadRowsKernel(const float* x, int64_t dim, const __grid_constant__ PadMap map,
                              const int32_t* x_rows, uint16_t* xp) {
  const int p = blockIdx.x;
  const int g = FindGroup(map.dst_begin, map.groups, p);
  const int r = p - map.dst_begin[g];
  int src = map.src_begin[g] + r < map.src_begin[g + 1] ? map.src_begin[g] + r : -1;
  if (src >= 0 && x_rows != nullptr) src = x_rows[src];
  uint16_t* d = xp + static_cast<int64_t>(p) * dim;
  const float* s = src >= 0 ? x + static_cast<int64_t>(src) * dim : nullptr;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) d[i] = s != nullptr ? F32ToBf16(s[i]) : 0;
}

__global__ void UnpadRowsKernel(const uint16_t* yp, int64_t dim, const __grid_constant__ PadMap map,
                                float* y) {
  const int i = blockIdx.x;  // source row
  const int g = FindGroup(map.src_begin, map.groups, i);
  const uint16_t* s = yp + static_cast<int64_t>(map.dst_begin[g] + (i - map.src_begin[g])) * dim;
  float* d = y + static_cast<int64_t>(i) * dim;
  for (int64_t e = threadIdx.x; e < dim; e += blockDim.x) d[e] = Bf16ToF32(s[e]);
}

// CombineKernel over BatchedSwiGlu's padded bf16 rows: grouped row `at` of group g is padded
// row dst_begin[g] + at - src_begin[g] (the block's rows are one token's: `at` is uniform over
// the block, so is the search).
__global__ void CombinePaddedKernel(const uint16_t* yp, const __grid_constant__ PadMap map,
                                    const int32_t* where, const float* weights, int k, int64_t dim,
                                    float* out) {
  CombineColumn(where, weights, k, dim, out, [&](int32_t at, int64_t i) {
    const int g = FindGroup(map.src_begin, map.groups, at);
    return Bf16ToF32(yp[static_cast<int64_t>(map.dst_begin[g] + at - map.src_begin[g]) * dim + i]);
  });
}

__global__ void BatchPointersKernel(const __grid_constant__ BatchList list, const char* a,
                                    int64_t a_stride, const char* b, int64_t b_row, char* c,
                                    int64_t c_row, void** out) {
  const int n = list.n;
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    const int g = list.order[j];
    out[j] = const_cast<char*>(a + list.slot[g] * a_stride);
    out[n + j] = const_cast<char*>(b + list.row[g] * b_row);
    out[2 * n + j] = c + list.row[g] * c_row;
  }
}

// Kernel parameters stay within the 4 KiB every CUDA version takes.
static_assert(sizeof(PadMap) + sizeof(SlotList) + 8 * sizeof(int64_t) <= 4096,
              "BlockPointersKernel's parameters");
__global__ void BlockPointersKernel(const __grid_constant__ PadMap map,
                                    const __grid_constant__ SlotList slots, int block, int n,
                                    const char* a, int64_t a_stride, const char* b, int64_t b_row,
                                    char* c, int64_t c_row, void** out) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= n) return;
  const int64_t p = static_cast<int64_t>(j) * block;
  const int g = FindGroup(map.dst_begin, map.groups, static_cast<int>(p));
  out[j] = const_cast<char*>(a + slots.slot[g] * a_stride);
  out[n + j] = const_cast<char*>(b + p * b_row);
  out[2 * n + j] = c + p * c_row;
}

__device__ __forceinline__ uint64_t SplitMix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

__global__ void FillKernel(void* dst, bool bf16, int64_t n, uint64_t seed, float scale,
                           bool constant) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = scale;
    if (!constant) {
      const uint64_t r = SplitMix64(seed ^ (static_cast<uint64_t>(i) * 0xd1b54a32d192ed03ull));
      v = (static_cast<float>(r >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f) * scale;
    }
    if (bf16) {
      static_cast<uint16_t*>(dst)[i] = F32ToBf16(v);
    } else {
      static_cast<float*>(dst)[i] = v;
    }
  }
}

unsigned GridFor(int64_t n, int threads) {
  int64_t b = (n + threads - 1) / threads;
  if (b > 65535 * 8) b = 65535 * 8;
  return static_cast<unsigned>(b < 1 ? 1 : b);
}

}  // namespace

void SetProgrammaticLaunch(bool on) { g_programmatic.store(on, std::memory_order_relaxed); }

bool ProgrammaticLaunch() { return g_programmatic.load(std::memory_order_relaxed); }

void SetDeepLoads(bool on) { g_deep_loads.store(on, std::memory_order_relaxed); }

bool DeepLoads() { return g_deep_loads.load(std::memory_order_relaxed); }

int SmallMSplit(int64_t out, int64_t groups) {
  // While the product has fewer than 2 warps' worth of output rows per SM slot (32 warps per SM
  // at the one-row kernels' 64 registers).
  int split = 1;
  while (split < 4 && out * groups * split < 2LL * SmCount() * 32) split *= 2;
  return split;
}

cudaError_t SmallMLinear(const void* w, WType wt, const float* bias, int64_t out, int64_t in,
                         const float* x, int64_t m, float* y, int64_t ldy, bool accumulate,
                         bool swiglu, const Groups& groups, cudaStream_t stream,
                         SmallMChoice choice, const SmallMFusion& fusion) {
  if (m <= 0 || out <= 0) return cudaSuccess;
  if (wt == WType::kF32) {
    return LaunchSmallM(static_cast<const float*>(w), bias, out, in, x, m, y, ldy, accumulate,
                        swiglu, groups, stream, choice, fusion);
  }
  return LaunchSmallM(static_cast<const uint16_t*>(w), bias, out, in, x, m, y, ldy, accumulate,
                      swiglu, groups, stream, choice, fusion);
}

cudaError_t FusionTail(const float* y, int64_t m, int64_t out, const SmallMFusion& fz,
                       cudaStream_t stream) {
  if (fz.out != nullptr) {
    return CombineExperts(y, fz.where, fz.weights, fz.n, fz.k, out, fz.out, stream);
  }
  if (fz.route.ids != nullptr) {
    const RouteArgs& a = fz.route;
    return RouteAndGroup(y, m, out, a.k_per_row, a.kmax, a.normalize, a.ids, a.weights,
                         a.slot_of_expert, a.num_groups, a.group_slot, a.row_begin, a.perm,
                         a.where, stream);
  }
  if (fz.qkv.q_out != nullptr) {
    const QkvArgs& a = fz.qkv;
    return PrepareQkv(y, m, a.heads, a.kv_heads, a.head_dim, a.clip, a.mode, a.q_norm, a.k_norm,
                      a.eps, a.inv_freq, a.layer, a.kv, a.q_out, stream);
  }
  return cudaSuccess;
}

cudaError_t RmsNorm(const float* x, const float* w, int64_t rows, int64_t dim, float eps,
                    float* y, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  LaunchPdl("RmsNormKernel", RmsNormKernel, static_cast<unsigned>(rows), 512, 0, stream, x, w,
            static_cast<int>(dim), eps, y);
  return cudaGetLastError();
}

cudaError_t PrepareQkv(const float* qkv, int64_t tokens, int64_t heads, int64_t kv_heads,
                       int64_t head_dim, float clip, int qk_norm_mode, const float* q_norm,
                       const float* k_norm, float eps, const float* inv_freq, int64_t layer,
                       const PagedKv& kv, float* q_out, cudaStream_t stream) {
  if (tokens <= 0) return cudaSuccess;
  const size_t smem = static_cast<size_t>((heads + 2 * kv_heads) * head_dim) * sizeof(float);
  auto launch = [&](auto kernel) {
    if (smem > 48 * 1024) {
      cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem));
      if (e != cudaSuccess) return e;
    }
    LaunchPdl("PrepareQkvKernel", kernel, static_cast<unsigned>(tokens), 256, smem, stream, qkv,
              static_cast<int>(heads), static_cast<int>(kv_heads), static_cast<int>(head_dim), clip,
              qk_norm_mode, q_norm, k_norm, eps, inv_freq, layer, kv, q_out);
    return cudaGetLastError();
  };
  return kv.bf16 ? launch(PrepareQkvKernel<uint16_t>) : launch(PrepareQkvKernel<float>);
}

cudaError_t PagedAttention(const float* q, int64_t tokens, int64_t heads, int64_t kv_heads,
                           int64_t head_dim, int64_t layer, const PagedKv& kv, float* out,
                           cudaStream_t stream, int splits, float* partial,
                           uint32_t* counters) {
  if (tokens <= 0) return cudaSuccess;
  if (head_dim > kMaxDimPerLane * kWarp || splits < 1 || (splits > 1 && partial == nullptr)) {
    return cudaErrorInvalidValue;
  }
  dim3 grid(static_cast<unsigned>(tokens), static_cast<unsigned>(heads),
            static_cast<unsigned>(splits));
  if (kv.bf16) {
    LaunchPdl("PagedAttentionKernel<uint16_t>", PagedAttentionKernel<uint16_t>, grid,
              kAttWarps * kWarp, 0, stream, q, static_cast<int>(heads), static_cast<int>(kv_heads),
              static_cast<int>(head_dim), layer, kv, out, partial, counters);
  } else {
    LaunchPdl("PagedAttentionKernel<float>", PagedAttentionKernel<float>, grid, kAttWarps * kWarp,
              0, stream, q, static_cast<int>(heads), static_cast<int>(kv_heads),
              static_cast<int>(head_dim), layer, kv, out, partial, counters);
  }
  if (splits > 1 && counters == nullptr) {
    LaunchPdl("AttentionCombineKernel", AttentionCombineKernel,
              dim3(static_cast<unsigned>(tokens), static_cast<unsigned>(heads)), 128, 0, stream,
              partial, static_cast<int>(heads), static_cast<int>(head_dim), splits, out);
  }
  return cudaGetLastError();
}

int AttentionSplits(int64_t tokens, int64_t heads, int64_t max_context) {
  const int64_t blocks = std::max<int64_t>(tokens * heads, 1);
  int splits = 1;
  while (splits < 16 && blocks * splits * 2 <= 2 * SmCount() &&
         max_context >= 2 * splits * kAttentionSplitRows) {
    splits *= 2;
  }
  return splits;
}

cudaError_t TopKRouting(const float* logits, int64_t rows, int64_t experts,
                        const int32_t* k_per_row, int64_t kmax, bool normalize, int32_t* ids,
                        float* weights, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  TopKKernel<<<static_cast<unsigned>(rows), kWarp, experts * sizeof(float), stream>>>(
      logits, static_cast<int>(experts), k_per_row, static_cast<int>(kmax), normalize, ids,
      weights);
  return cudaGetLastError();
}

cudaError_t RouteAndGroup(const float* logits, int64_t rows, int64_t experts,
                          const int32_t* k_per_row, int64_t kmax, bool normalize, int32_t* ids,
                          float* weights, const int32_t* slot_of_expert, int32_t* num_groups,
                          int32_t* group_slot, int32_t* row_begin, int32_t* perm, int32_t* where,
                          cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  const size_t smem = RouteAndGroupSmem(rows, experts, kmax);
  if (rows > kRouteMaxRows || smem > 48 * 1024) return cudaErrorInvalidValue;
  LaunchPdl("RouteGroupsKernel", RouteGroupsKernel, 1,
            static_cast<unsigned>(std::max<int64_t>(rows, 8) * kWarp), smem, stream, logits,
            static_cast<int>(rows), static_cast<int>(experts), k_per_row, static_cast<int>(kmax),
            normalize, ids, weights, slot_of_expert, num_groups, group_slot, row_begin, perm,
            where);
  return cudaGetLastError();
}

cudaError_t BuildGroups(const int32_t* ids, int64_t n, int64_t k, int64_t experts,
                        const int32_t* slot_of_expert, int32_t* num_groups, int32_t* group_slot,
                        int32_t* row_begin, int32_t* perm, int32_t* where, cudaStream_t stream) {
  const int threads = 256;
  const size_t smem = (4 * experts + 1 + n * k) * sizeof(int32_t);
  if (smem > 48 * 1024) return cudaErrorInvalidValue;
  BuildGroupsKernel<<<1, threads, smem, stream>>>(
      ids, static_cast<int>(n * k), static_cast<int>(k), static_cast<int>(experts),
      slot_of_expert, num_groups, group_slot, row_begin, perm, where);
  return cudaGetLastError();
}

cudaError_t CopyKvRows(void* pool, int64_t elem_bytes, int64_t num_layers, int64_t page_size,
                       int64_t kv_dim, const int32_t* src_pages, const int32_t* dst_pages,
                       int64_t begin, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (begin < 0 || begin + n > INT_MAX || num_layers <= 0 || num_layers > 65535 ||
      page_size <= 0 || kv_dim <= 0 || (elem_bytes != 4 && elem_bytes != 2)) {
    return cudaErrorInvalidValue;
  }
  const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(num_layers), 2);
  const int L = static_cast<int>(num_layers), P = static_cast<int>(page_size),
            D = static_cast<int>(kv_dim), b = static_cast<int>(begin);
  if (elem_bytes == 2) {
    CopyKvRowsKernel<uint16_t><<<grid, 256, 0, stream>>>(static_cast<uint16_t*>(pool), L, P, D, src_pages,
                                               dst_pages, b);
  } else {
    CopyKvRowsKernel<float><<<grid, 256, 0, stream>>>(static_cast<float*>(pool), L, P, D, src_pages,
                                               dst_pages, b);
  }
  return cudaGetLastError();
}

cudaError_t GatherRows(const float* src, const int32_t* perm, int64_t rows, int64_t dim,
                       float* dst, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  LaunchPdl("GatherRowsKernel", GatherRowsKernel, static_cast<unsigned>(rows), 256, 0, stream, src,
            perm, dim, dst);
  return cudaGetLastError();
}

cudaError_t CombineExperts(const float* y, const int32_t* where, const float* weights, int64_t n,
                           int64_t k, int64_t dim, float* out, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (k > 32) return cudaErrorInvalidValue;
  dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>((dim + 255) / 256));
  LaunchPdl("CombineKernel", CombineKernel, grid, 256, 0, stream, y, where, weights,
            static_cast<int>(k), dim, out);
  return cudaGetLastError();
}

cudaError_t CombineExpertsPadded(const void* yp, const PadMap& map, const int32_t* where,
                                 const float* weights, int64_t n, int64_t k, int64_t dim,
                                 float* out, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (k > 32 || map.groups <= 0 || map.groups > kMaxPadGroups) return cudaErrorInvalidValue;
  dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>((dim + 255) / 256));
  CombinePaddedKernel<<<grid, 256, 0, stream>>>(static_cast<const uint16_t*>(yp), map, where,
                                                weights, static_cast<int>(k), dim, out);
  return cudaGetLastError();
}

cudaError_t ScaleRowsBySigmoid(float* y, const float* g, int64_t rows, int64_t dim,
                               cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  ScaleSigmoidKernel<<<static_cast<unsigned>(rows), 256, 0, stream>>>(y, g, dim);
  return cudaGetLastError();
}

cudaError_t AddBias(float* y, const float* bias, int64_t rows, int64_t out, int64_t ldy,
                    cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  AddBiasKernel<<<static_cast<unsigned>(rows), 256, 0, stream>>>(y, bias, out, ldy);
  return cudaGetLastError();
}

cudaError_t AddInto(float* dst, const float* src, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  AddKernel<<<GridFor(n, 256), 256, 0, stream>>>(dst, src, n);
  return cudaGetLastError();
}

cudaError_t SiluMul(const float* gu, int64_t rows, int64_t width, void* act, WType act_type,
                    cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  SiluMulKernel<<<static_cast<unsigned>(rows), 256, 0, stream>>>(gu, width, act,
                                                                  act_type == WType::kBF16);
  return cudaGetLastError();
}

cudaError_t SiluMulBf16(const void* gu, int64_t rows, int64_t width, void* act,
                        cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  SiluMulBf16Kernel<<<static_cast<unsigned>(rows), 256, 0, stream>>>(
      static_cast<const uint16_t*>(gu), width, static_cast<uint16_t*>(act));
  return cudaGetLastError();
}

cudaError_t Bf16ToF32(const void* x, int64_t n, float* y, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  Bf16ToF32Kernel<<<GridFor(n, 256), 256, 0, stream>>>(static_cast<const uint16_t*>(x), n, y);
  return cudaGetLastError();
}

cudaError_t ToBf16(const float* x, int64_t n, void* y, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  ToBf16Kernel<<<GridFor(n, 256), 256, 0, stream>>>(x, n, static_cast<uint16_t*>(y));
  return cudaGetLastError();
}

cudaError_t ArgMaxRows(const float* x, int64_t rows, int64_t n, int32_t* out,
                       cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  if (n <= 0 || n > INT_MAX) return cudaErrorInvalidValue;
  LaunchPdl("ArgMaxRowsKernel", ArgMaxRowsKernel, static_cast<unsigned>(rows), 1024, 0, stream, x,
            n, out);
  return cudaGetLastError();
}

cudaError_t PadRowsToBf16(const float* x, int64_t dim, const PadMap& map, void* xp,
                          cudaStream_t stream, const int32_t* x_rows) {
  if (map.groups <= 0 || map.groups > kMaxPadGroups) return cudaErrorInvalidValue;
  const int rows = map.dst_begin[map.groups];
  if (rows <= 0) return cudaSuccess;
  PadRowsKernel<<<static_cast<unsigned>(rows), 256, 0, stream>>>(x, dim, map, x_rows,
                                                                  static_cast<uint16_t*>(xp));
  return cudaGetLastError();
}

cudaError_t UnpadRowsToF32(const void* yp, int64_t dim, const PadMap& map, float* y,
                           cudaStream_t stream) {
  if (map.groups <= 0 || map.groups > kMaxPadGroups) return cudaErrorInvalidValue;
  const int rows = map.src_begin[map.groups];
  if (rows <= 0) return cudaSuccess;
  UnpadRowsKernel<<<static_cast<unsigned>(rows), 256, 0, stream>>>(
      static_cast<const uint16_t*>(yp), dim, map, y);
  return cudaGetLastError();
}

cudaError_t FillBatchPointers(const BatchList& list, const void* a, int64_t a_stride,
                              const void* b, int64_t b_row, void* c, int64_t c_row, void** out,
                              cudaStream_t stream) {
  if (list.n <= 0) return cudaSuccess;
  if (list.n > kMaxPadGroups) return cudaErrorInvalidValue;
  BatchPointersKernel<<<1, 256, 0, stream>>>(list, static_cast<const char*>(a), a_stride,
                                             static_cast<const char*>(b), b_row,
                                             static_cast<char*>(c), c_row, out);
  return cudaGetLastError();
}

cudaError_t FillBlockPointers(const PadMap& map, const SlotList& slots, int32_t block,
                              const void* a, int64_t a_stride, const void* b, int64_t b_row,
                              void* c, int64_t c_row, void** out, cudaStream_t stream) {
  if (map.groups <= 0 || map.groups > kMaxPadGroups || block <= 0 ||
      map.dst_begin[map.groups] % block != 0) {
    return cudaErrorInvalidValue;
  }
  const int n = map.dst_begin[map.groups] / block;
  if (n == 0) return cudaSuccess;
  BlockPointersKernel<<<GridFor(n, 256), 256, 0, stream>>>(
      map, slots, block, n, static_cast<const char*>(a), a_stride, static_cast<const char*>(b),
      b_row, static_cast<char*>(c), c_row, out);
  return cudaGetLastError();
}

cudaError_t FillRandom(void* dst, WType wt, int64_t n, uint64_t seed, float scale, bool constant,
                       cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  FillKernel<<<GridFor(n, 256), 256, 0, stream>>>(dst, wt == WType::kBF16, n, seed, scale,
                                                   constant);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace moemesh
