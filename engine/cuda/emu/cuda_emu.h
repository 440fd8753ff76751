// A CPU emulation of the CUDA device, for testing the engine's kernels and its CUDA host code on
// machines without a GPU (CI, this project's build machine). Not a performance tool.
//
// What it emulates: kernels run block after block on the calling thread, each block's threads
// as cooperative fibers (one stack each) that switch only at __syncthreads, __syncwarp and warp
// shuffles, so a read of shared memory another thread writes without a barrier in between sees
// the old value for half the orderings (EMU_ORDER=reverse runs the blocks of a grid, and the
// threads of a block, in reverse order; run the tests both ways). Device memory is host memory;
// streams run in issue order, synchronously; graph capture records launches, copies and cuBLAS
// calls for replay; cuBLAS's GEMMs are plain loops with fp32 sums. A barrier that can never
// complete (threads of a block at different barriers, a shuffle after a lane exited) aborts with
// a message.
//
// This header is what the kernels' source sees in place of nvcc's device environment:
// engine/cuda/emu/cu_to_emu.py turns a .cu file's `K<<<grid, block, smem, stream>>>(args)`
// into `::emu::Launch(grid, block, smem, stream).With(K, "K")(args)` and its `extern __shared__`
// arrays into pointers to the block's dynamic shared memory, and includes this header first.
#ifndef MOEMESH_ENGINE_CUDA_EMU_CUDA_EMU_H_
#define MOEMESH_ENGINE_CUDA_EMU_CUDA_EMU_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include <cuda_runtime.h>  // first: its own code uses the names defined below
#include <vector_types.h>

// For the few places of the kernels' host code that launch other than through `<<<...>>>`.
#define MOEMESH_CUDA_EMU 1

namespace emu {

// The running thread's coordinates (valid inside a kernel).
struct ThreadCtx {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  unsigned lane;
  unsigned warp;
};
const ThreadCtx& Ctx();
void* DynamicShared();

// Barriers, from inside a kernel.
void SyncThreads();
void SyncWarp();
// Every lane of the warp offers `v`; returns lane `src`'s value (all lanes must take part).
uint64_t WarpExchange(uint64_t v, unsigned src);

// Runs grid x block threads of `body` (one fiber per thread), then returns. Records instead
// when `stream` is being captured into a graph.
// Statistics, also printed at exit with EMU_STATS=1: "launch K" counts a kernel's host-side
// launches (a graph replay makes none), "run K" its executions (replays too); cuBLAS calls,
// copies (count and bytes, by direction), synchronisations, allocations and graph launches.
void EnableStatistics();
std::map<std::string, int64_t> Statistics();

// `name` counts the launch in the statistics (EMU_STATS=1: at exit, each kernel's launches and
// runs, cuBLAS calls, copies and synchronisations, to stderr).
void RunGrid(const char* name, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
             std::function<void()> body);

template <typename... P>
struct Bound {
  void (*kernel)(P...);
  const char* name;
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel argument count");
    auto params = std::make_shared<std::tuple<std::decay_t<P>...>>(std::forward<A>(args)...);
    auto k = kernel;
    RunGrid(name, grid, block, smem, stream, [k, params] { std::apply(k, *params); });
  }
};

struct Launch {
  Launch(dim3 grid, dim3 block, size_t smem = 0, cudaStream_t stream = nullptr)
      : grid(grid), block(block), smem(smem), stream(stream) {}
  template <typename... P>
  Bound<P...> With(void (*kernel)(P...), const char* name = "kernel") const {
    return Bound<P...>{kernel, name, grid, block, smem, stream};
  }
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
};

template <typename T>
T Shuffle(T v, unsigned src) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle type");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = WarpExchange(bits, src);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace emu

// The device environment the kernels' source expects.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __grid_constant__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static  // one block runs at a time

#define threadIdx (::emu::Ctx().thread_idx)
#define blockIdx (::emu::Ctx().block_idx)
#define blockDim (::emu::Ctx().block_dim)
#define gridDim (::emu::Ctx().grid_dim)

inline void __syncthreads() { ::emu::SyncThreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::emu::SyncWarp(); }
template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask, int = 32) {
  return ::emu::Shuffle(v, ::emu::Ctx().lane ^ static_cast<unsigned>(lane_mask));
}
// Lane `src`'s value (the full-warp form only: no kernel uses a narrower width).
template <typename T>
T __shfl_sync(unsigned, T v, int src, int width = 32) {
  if (width != 32) {
    std::fprintf(stderr, "CUDA emulation: __shfl_sync: only width 32 is emulated\n");
    std::abort();
  }
  return ::emu::Shuffle(v, static_cast<unsigned>(src) % 32u);
}
// One block runs at a time and its threads switch only at barriers and shuffles, so a
// read-modify-write is atomic and memory is always coherent.
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old + v;
  return old;
}
inline void __threadfence() {}
template <typename T>
T __ldcg(const T* p) {
  return *p;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
using std::isnan;
using std::max;
using std::min;
template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

#endif  // MOEMESH_ENGINE_CUDA_EMU_CUDA_EMU_H_
