// The CUDA emulation's runtime: fibers for the threads of a block, and the CUDA runtime and
// cuBLAS entry points the engine calls, on host memory. See cuda_emu.h for what is emulated.
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include "engine/cuda/emu/cuda_emu.h"

// Saves the callee-saved registers on the current stack, stores the stack pointer in *save and
// continues on the stack `load` (x86-64 System V; the FP control words are left alone: no kernel
// changes them).
extern "C" void emu_switch(void** save, void* load);
asm(R"(
.text
.globl emu_switch
.type emu_switch,@function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size emu_switch, .-emu_switch
.section .note.GNU-stack,"",@progbits
.text
)");

struct CUstream_st {
  unsigned flags = cudaStreamDefault;  // cudaStreamNonBlocking or not
  bool capturing = false;
  bool capture_failed = false;
  std::vector<std::function<void()>>* graph = nullptr;
};
struct CUevent_st {
  std::chrono::steady_clock::time_point at;
};
struct CUgraph_st {
  std::vector<std::function<void()>> nodes;
};
struct CUgraphExec_st {
  std::vector<std::function<void()>> nodes;
};
struct cublasContext {
  cudaStream_t stream = nullptr;
};

namespace emu {
namespace {

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "CUDA emulation: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

constexpr size_t kStackBytes = 256 << 10;
constexpr int kMaxThreads = 1024;

enum class State { kReady, kBlockWait, kWarpWait, kExchange, kDone };

struct Fiber {
  void* sp = nullptr;
  char* stack = nullptr;
  State state = State::kDone;
  ThreadCtx ctx;
};

struct Block {
  std::vector<Fiber> fibers;
  void* sched_sp = nullptr;
  const std::function<void()>* body = nullptr;
  std::vector<char> dynamic_shared;
  // Shuffle slots, two per lane: a shuffle writes one phase's slot and reads it after the
  // warp's release, the next shuffle uses the other phase, so one switch per shuffle suffices.
  uint64_t exchange[kMaxThreads / 32][2][32];
  int exchange_phase[kMaxThreads / 32];
};

// Plain globals, not thread_local: one kernel runs at a time (g_device), and the fibers of its
// blocks all run on the launching thread.
Block* g_block = nullptr;
Fiber* g_fiber = nullptr;
std::mutex g_device;  // one kernel at a time, like one GPU's worth of fibers
bool g_reverse = [] {
  const char* o = std::getenv("EMU_ORDER");
  const bool reverse = o != nullptr && std::string(o) == "reverse";
  if (reverse) {
    std::fprintf(stderr, "CUDA emulation: blocks, and each block's threads, run in reverse order\n");
  }
  return reverse;
}();

// EMU_STATS=1: counters printed at exit. "launch X" counts host calls (what costs a launch's CPU
// time; a graph replay makes none), "run X" the executions (a replay's too).
struct Stats {
  std::mutex mu;
  std::map<std::string, int64_t> n;
  bool on = [] {
    const char* s = std::getenv("EMU_STATS");
    return s != nullptr && std::string(s) == "1";
  }();
  ~Stats() {
    if (!on) return;
    std::fprintf(stderr, "CUDA emulation statistics:\n");
    for (const auto& [k, v] : n) std::fprintf(stderr, "  %10lld  %s\n", static_cast<long long>(v), k.c_str());
  }
};
Stats g_stats;
void Count(const std::string& what, int64_t by = 1) {
  if (!g_stats.on) return;
  std::lock_guard<std::mutex> l(g_stats.mu);
  g_stats.n[what] += by;
}

// Per host thread, the latest error wins (cudaGetLastError reads and clears it), as in CUDA.
thread_local cudaError_t g_last_error = cudaSuccess;
void SetError(cudaError_t e) { g_last_error = e; }

// The stream this thread captures in cudaStreamCaptureModeThreadLocal or Global mode: while it
// is open this thread may not make unsafe calls (synchronous copies, allocation, waits); one that
// it makes fails and invalidates the capture, as CUDA does.
thread_local cudaStream_t g_thread_capture = nullptr;
std::map<const void*, int> g_max_dynamic_smem;  // cudaFuncSetAttribute
std::mutex g_attr_mu;

void FiberEntry() {
  Fiber* f = g_fiber;
  (*g_block->body)();
  f->state = State::kDone;
  emu_switch(&f->sp, g_block->sched_sp);
  Die("a finished fiber was resumed");
}

void* InitialStack(char* stack) {
  uintptr_t top = reinterpret_cast<uintptr_t>(stack + kStackBytes) & ~uintptr_t{15};
  uintptr_t a = top - 16;  // return address slot, 16-aligned: FiberEntry starts as if called
  *reinterpret_cast<void**>(a) = reinterpret_cast<void*>(&FiberEntry);
  for (int i = 1; i <= 6; ++i) *reinterpret_cast<uint64_t*>(a - 8 * i) = 0;  // rbp .. r15
  return reinterpret_cast<void*>(a - 48);
}

// A stack with an inaccessible lowest page: an overflow faults instead of writing into the
// next fiber's stack.
char* NewStack() {
  void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) Die("cannot map a fiber stack");
  if (mprotect(p, 4096, PROT_NONE) != 0) Die("cannot protect a fiber stack's guard page");
  return static_cast<char*>(p);
}

void Yield(State s) {
  Fiber* f = g_fiber;
  f->state = s;
  emu_switch(&f->sp, g_block->sched_sp);
}

std::string Where(const Fiber& f) {
  char buf[160];
  std::snprintf(buf, sizeof(buf), "block (%u,%u,%u) thread (%u,%u,%u)", f.ctx.block_idx.x,
                f.ctx.block_idx.y, f.ctx.block_idx.z, f.ctx.thread_idx.x, f.ctx.thread_idx.y,
                f.ctx.thread_idx.z);
  return buf;
}

// Runs the ready lanes of warp `w` until none is ready, releasing the warp's own barriers
// (shuffles, __syncwarp) as they complete. Returns when the warp's lanes are all done or at
// __syncthreads.
void RunWarp(Block* b, int w, int n) {
  const int first = 32 * w, lanes = std::min(32, n - first);
  for (;;) {
    for (int i = 0; i < lanes; ++i) {
      Fiber& f = b->fibers[first + (g_reverse ? lanes - 1 - i : i)];
      if (f.state != State::kReady) continue;
      g_fiber = &f;
      emu_switch(&b->sched_sp, f.sp);
    }
    g_fiber = nullptr;
    int waiting = 0, exchanging = 0, exited = 0;
    for (int l = 0; l < lanes; ++l) {
      const State s = b->fibers[first + l].state;
      waiting += s == State::kWarpWait;
      exchanging += s == State::kExchange;
      exited += s == State::kDone;
    }
    if (exchanging > 0 && exchanging != lanes) {
      Die("warp shuffle in " + Where(b->fibers[first]) + "'s warp with " +
          std::to_string(lanes - exchanging) + " of " + std::to_string(lanes) +
          " lanes elsewhere (exited, diverged or at another barrier)");
    }
    if (waiting > 0 && waiting + exited != lanes) {
      Die("__syncwarp in " + Where(b->fibers[first]) + "'s warp while other lanes of it wait " +
          "at __syncthreads");
    }
    if (exchanging == 0 && waiting == 0) return;
    for (int l = 0; l < lanes; ++l) {
      Fiber& f = b->fibers[first + l];
      if (f.state != State::kDone) f.state = State::kReady;
    }
    b->exchange_phase[w] ^= 1;
  }
}

// Runs one block to completion: warp after warp up to the next __syncthreads, then the next
// phase.
void RunBlock(Block* b, std::vector<char*>* stacks, dim3 grid, dim3 block, uint3 bidx) {
  const int n = static_cast<int>(block.x * block.y * block.z);
  b->fibers.resize(n);
  while (static_cast<int>(stacks->size()) < n) stacks->push_back(NewStack());
  for (int t = 0; t < n; ++t) {
    Fiber& f = b->fibers[t];
    f.ctx.thread_idx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
    f.ctx.block_idx = bidx;
    f.ctx.block_dim = block;
    f.ctx.grid_dim = grid;
    f.ctx.lane = t % 32;
    f.ctx.warp = t / 32;
    f.stack = (*stacks)[t];
    f.sp = InitialStack(f.stack);
    f.state = State::kReady;
  }
  const int warps = (n + 31) / 32;
  std::fill(b->exchange_phase, b->exchange_phase + warps, 0);
  for (;;) {
    for (int i = 0; i < warps; ++i) RunWarp(b, g_reverse ? warps - 1 - i : i, n);
    int done = 0;
    for (Fiber& f : b->fibers) {
      if (f.state == State::kBlockWait) f.state = State::kReady;
      done += f.state == State::kDone;
    }
    if (done == n) return;
  }
}

void RunNow(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(g_device);
  static std::vector<char*> stacks;
  auto b = std::make_unique<Block>();
  b->body = &body;
  Block* saved = g_block;
  g_block = b.get();
  // Blocks in order, or (EMU_ORDER=reverse) last first: a kernel whose result depends on the
  // order its blocks finish in (the last-arriver tails) gives the same result both ways.
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  for (uint64_t n = 0; n < blocks; ++n) {
    const uint64_t i = g_reverse ? blocks - 1 - n : n;
    const unsigned x = static_cast<unsigned>(i % grid.x),
                   y = static_cast<unsigned>(i / grid.x % grid.y),
                   z = static_cast<unsigned>(i / grid.x / grid.y);
    // Fresh dynamic shared memory, filled with NaNs: reads before writes show.
    b->dynamic_shared.assign(std::max<size_t>(smem, 16), static_cast<char>(0xFF));
    RunBlock(b.get(), &stacks, grid, block, uint3{x, y, z});
  }
  g_block = saved;
}

// Blocking streams being captured (by any thread): the legacy stream would wait for them.
std::mutex g_capture_mu;
std::set<cudaStream_t> g_blocking_captures;

// Runs `op` on `stream` (at once: streams run in issue order), or records it there while the
// stream is captured. Work on the legacy stream while a blocking stream is captured fails (and
// invalidates that capture), as in CUDA.
cudaError_t Enqueue(cudaStream_t stream, std::function<void()> op) {
  if (stream != nullptr && stream->capturing) {
    stream->graph->push_back(std::move(op));
    return cudaSuccess;
  }
  if (stream == nullptr) {
    std::lock_guard<std::mutex> l(g_capture_mu);
    if (!g_blocking_captures.empty()) {
      for (cudaStream_t s : g_blocking_captures) s->capture_failed = true;
      return cudaErrorStreamCaptureImplicit;
    }
  }
  op();
  return cudaSuccess;
}

// An unsafe call (synchronous copy, allocation, synchronisation) while this thread captures.
bool UnsafeDuringCapture() {
  if (g_thread_capture == nullptr) return false;
  g_thread_capture->capture_failed = true;
  return true;
}

}  // namespace

void EnableStatistics() { g_stats.on = true; }

std::map<std::string, int64_t> Statistics() {
  std::lock_guard<std::mutex> l(g_stats.mu);
  return g_stats.n;
}

const ThreadCtx& Ctx() {
  if (g_fiber == nullptr) Die("threadIdx/blockIdx read outside a kernel");
  return g_fiber->ctx;
}

void* DynamicShared() { return g_block->dynamic_shared.data(); }

void SyncThreads() { Yield(State::kBlockWait); }
void SyncWarp() { Yield(State::kWarpWait); }

uint64_t WarpExchange(uint64_t v, unsigned src) {
  Fiber* f = g_fiber;
  const unsigned w = f->ctx.warp;
  const int n = static_cast<int>(g_block->fibers.size());
  if (src >= 32 || static_cast<int>(32 * w + src) >= n) {
    Die("shuffle from a lane that does not exist: " + Where(*f));
  }
  const int phase = g_block->exchange_phase[w];
  g_block->exchange[w][phase][f->ctx.lane] = v;
  Yield(State::kExchange);
  return g_block->exchange[w][phase][src];
}

void RunGrid(const char* name, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
             std::function<void()> body) {
  Count(std::string("launch ") + name);
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > kMaxThreads || block.z > 64 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u) {
    SetError(cudaErrorInvalidConfiguration);
    return;
  }
  if (smem > 48 * 1024) {
    // Needs cudaFuncSetAttribute(MaxDynamicSharedMemorySize) first; one kernel at most is
    // raised in this engine, so any raise up to the size is accepted here.
    std::lock_guard<std::mutex> l(g_attr_mu);
    int raised = 0;
    for (const auto& [f, bytes] : g_max_dynamic_smem) raised = std::max(raised, bytes);
    if (static_cast<int>(smem) > raised || smem > 227 * 1024) {
      SetError(cudaErrorInvalidValue);
      return;
    }
  }
  const cudaError_t e = Enqueue(stream, [name, grid, block, smem, body = std::move(body)] {
    Count(std::string("run ") + name);
    RunNow(grid, block, smem, body);
  });
  if (e != cudaSuccess) SetError(e);
}

}  // namespace emu

using emu::Count;
using emu::Enqueue;
using emu::SetError;
using emu::UnsafeDuringCapture;

// ---------------------------------------------------------------------------------------------
// CUDA runtime

extern "C" {

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidDevice; }

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  std::memset(prop, 0, sizeof(*prop));
  std::snprintf(prop->name, sizeof(prop->name), "CUDA emulation (CPU)");
  prop->totalGlobalMem = size_t{80} << 30;
  prop->multiProcessorCount = 132;
  prop->major = 9;
  prop->minor = 0;
  prop->warpSize = 32;
  prop->maxThreadsPerBlock = 1024;
  prop->sharedMemPerBlock = 48 << 10;
  prop->sharedMemPerBlockOptin = 227 << 10;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = 132; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 227 << 10; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value > (227 << 10)) return cudaErrorInvalidValue;
    std::lock_guard<std::mutex> l(emu::g_attr_mu);
    emu::g_max_dynamic_smem[func] = value;
  }
  return cudaSuccess;
}

cudaError_t cudaGetLastError(void) {
  cudaError_t e = emu::g_last_error;
  emu::g_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return emu::g_last_error; }

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture";
    case cudaErrorStreamCaptureImplicit: return "operation would make the legacy stream depend on a capturing blocking stream";
    default: return "CUDA emulation error";
  }
}

cudaError_t cudaMalloc(void** p, size_t size) {
  Count("cudaMalloc");
  if (UnsafeDuringCapture()) return cudaErrorStreamCaptureUnsupported;
  // The exact size, so that a memory checker (valgrind, -fsanitize=address) sees any access
  // past the end.
  if (posix_memalign(p, 256, std::max<size_t>(size, 1)) != 0) return cudaErrorMemoryAllocation;
  std::memset(*p, 0xFF, size);  // NaNs / -1: uninitialised device memory shows
  return cudaSuccess;
}

cudaError_t cudaFree(void* p) {
  if (UnsafeDuringCapture()) return cudaErrorStreamCaptureUnsupported;
  std::free(p);
  return cudaSuccess;
}

cudaError_t cudaMallocHost(void** p, size_t size) {
  if (UnsafeDuringCapture()) return cudaErrorStreamCaptureUnsupported;
  *p = std::aligned_alloc(256, std::max<size_t>(256, (size + 255) / 256 * 256));
  return *p == nullptr ? cudaErrorMemoryAllocation : cudaSuccess;
}

cudaError_t cudaFreeHost(void* p) {
  std::free(p);
  return cudaSuccess;
}

static const char* KindName(cudaMemcpyKind kind) {
  switch (kind) {
    case cudaMemcpyHostToDevice: return "host->device";
    case cudaMemcpyDeviceToHost: return "device->host";
    case cudaMemcpyDeviceToDevice: return "device->device";
    default: return "other";
  }
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, cudaMemcpyKind kind) {
  if (UnsafeDuringCapture()) return cudaErrorStreamCaptureUnsupported;
  Count(std::string("cudaMemcpy (synchronous) ") + KindName(kind));
  Count(std::string("cudaMemcpy (synchronous) ") + KindName(kind) + " bytes", count);
  if (count > 0) std::memmove(dst, src, count);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind kind,
                            cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  Count(std::string("cudaMemcpyAsync ") + KindName(kind));
  Count(std::string("cudaMemcpyAsync ") + KindName(kind) + " bytes", count);
  return Enqueue(stream, [dst, src, count] { std::memmove(dst, src, count); });
}

cudaError_t cudaMemsetAsync(void* p, int value, size_t count, cudaStream_t stream) {
  return Enqueue(stream, [p, value, count] { std::memset(p, value, count); });
}

cudaError_t cudaStreamCreate(cudaStream_t* stream) {
  return cudaStreamCreateWithFlags(stream, cudaStreamDefault);
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int flags) {
  *stream = new CUstream_st;
  (*stream)->flags = flags;
  return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  delete stream;
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  Count("cudaStreamSynchronize");
  if (UnsafeDuringCapture() || (stream != nullptr && stream->capturing)) {
    if (stream != nullptr && stream->capturing) stream->capture_failed = true;
    return cudaErrorStreamCaptureUnsupported;
  }
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void) {
  Count("cudaDeviceSynchronize");
  if (UnsafeDuringCapture()) return cudaErrorStreamCaptureUnsupported;
  return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t* event) {
  *event = new CUevent_st;
  return cudaSuccess;
}

cudaError_t cudaEventDestroy(cudaEvent_t event) {
  delete event;
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  return Enqueue(stream, [event] { event->at = std::chrono::steady_clock::now(); });
}

cudaError_t cudaEventSynchronize(cudaEvent_t) {
  if (UnsafeDuringCapture()) return cudaErrorStreamCaptureUnsupported;
  return cudaSuccess;
}

cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  *ms = std::chrono::duration<float, std::milli>(end->at - start->at).count();
  return cudaSuccess;
}

cudaError_t cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode mode) {
  Count("cudaStreamBeginCapture");
  if (stream == nullptr) return cudaErrorStreamCaptureUnsupported;  // legacy stream
  if (stream->capturing) return cudaErrorIllegalState;
  stream->capturing = true;
  stream->capture_failed = false;
  stream->graph = new std::vector<std::function<void()>>;
  if (mode != cudaStreamCaptureModeRelaxed) emu::g_thread_capture = stream;
  if (!(stream->flags & cudaStreamNonBlocking)) {
    std::lock_guard<std::mutex> l(emu::g_capture_mu);
    emu::g_blocking_captures.insert(stream);
  }
  return cudaSuccess;
}

cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t* graph) {
  if (stream == nullptr || !stream->capturing) return cudaErrorIllegalState;
  stream->capturing = false;
  if (emu::g_thread_capture == stream) emu::g_thread_capture = nullptr;
  {
    std::lock_guard<std::mutex> l(emu::g_capture_mu);
    emu::g_blocking_captures.erase(stream);
  }
  std::unique_ptr<std::vector<std::function<void()>>> nodes(stream->graph);
  stream->graph = nullptr;
  if (stream->capture_failed) {
    *graph = nullptr;
    return cudaErrorStreamCaptureInvalidated;
  }
  *graph = new CUgraph_st{std::move(*nodes)};
  return cudaSuccess;
}

cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph, unsigned long long) {
  if (graph == nullptr) return cudaErrorInvalidValue;
  *exec = new CUgraphExec_st{graph->nodes};
  return cudaSuccess;
}

cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream) {
  Count("cudaGraphLaunch");
  if (exec == nullptr) return cudaErrorInvalidValue;
  for (const auto& node : exec->nodes) {
    const cudaError_t e = Enqueue(stream, node);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

cudaError_t cudaGraphDestroy(cudaGraph_t graph) {
  delete graph;
  return cudaSuccess;
}

cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
  delete exec;
  return cudaSuccess;
}

}  // extern "C"

// ---------------------------------------------------------------------------------------------
// cuBLAS: column-major GEMMs with fp32 sums, for the type combinations cuBLAS accepts.

namespace {

float Load(const void* p, cudaDataType t, int64_t i) {
  if (t == CUDA_R_32F) return static_cast<const float*>(p)[i];
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

void Store(void* p, cudaDataType t, int64_t i, float v) {
  if (t == CUDA_R_32F) {
    static_cast<float*>(p)[i] = v;
  } else {
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16(v);
  }
}

bool Supported(cudaDataType a, cudaDataType b, cudaDataType c, cublasComputeType_t compute) {
  if (compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_32F_FAST_TF32 &&
      compute != CUBLAS_COMPUTE_32F_FAST_16BF) {
    return false;
  }
  if (a != b) return false;
  if (a == CUDA_R_32F) return c == CUDA_R_32F;
  if (a == CUDA_R_16BF) return c == CUDA_R_16BF || c == CUDA_R_32F;
  return false;
}

void Gemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, float alpha,
          const void* A, cudaDataType at, int lda, const void* B, cudaDataType bt, int ldb,
          float beta, void* C, cudaDataType ct, int ldc) {
  // op(A) as m rows of k, op(B)^T as n rows of k, both contiguous fp32.
  std::vector<float> a(size_t(m) * k), b(size_t(n) * k);
  for (int i = 0; i < m; ++i) {
    for (int l = 0; l < k; ++l) {
      a[size_t(i) * k + l] = ta == CUBLAS_OP_N ? Load(A, at, i + int64_t{l} * lda)
                                               : Load(A, at, l + int64_t{i} * lda);
    }
  }
  for (int j = 0; j < n; ++j) {
    for (int l = 0; l < k; ++l) {
      b[size_t(j) * k + l] = tb == CUBLAS_OP_N ? Load(B, bt, l + int64_t{j} * ldb)
                                               : Load(B, bt, j + int64_t{l} * ldb);
    }
  }
  for (int j = 0; j < n; ++j) {
    const float* bj = b.data() + size_t(j) * k;
    for (int i = 0; i < m; ++i) {
      const float* ai = a.data() + size_t(i) * k;
      float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int l = 0;
      for (; l + 8 <= k; l += 8) {
        for (int u = 0; u < 8; ++u) part[u] += ai[l + u] * bj[l + u];
      }
      float sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
      for (; l < k; ++l) sum += ai[l] * bj[l];
      const int64_t c = i + int64_t{j} * ldc;
      Store(C, ct, c, beta == 0 ? alpha * sum : alpha * sum + beta * Load(C, ct, c));
    }
  }
}

bool ShapeOk(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, int lda, int ldb,
             int ldc) {
  if (m < 0 || n < 0 || k < 0) return false;
  if (lda < std::max(1, ta == CUBLAS_OP_N ? m : k)) return false;
  if (ldb < std::max(1, tb == CUBLAS_OP_N ? k : n)) return false;
  return ldc >= std::max(1, m);
}

}  // namespace

extern "C" {

cublasStatus_t cublasCreate(cublasHandle_t* handle) {
  *handle = new cublasContext;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy(cublasHandle_t handle) {
  delete handle;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t stream) {
  handle->stream = stream;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetWorkspace(cublasHandle_t, void*, size_t) { return CUBLAS_STATUS_SUCCESS; }

const char* cublasGetStatusString(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "success";
    case CUBLAS_STATUS_INVALID_VALUE: return "an invalid value was used as an argument";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "the requested functionality is not supported";
    default: return "cuBLAS emulation error";
  }
}

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa,
                            cublasOperation_t transb, int m, int n, int k, const void* alpha,
                            const void* A, cudaDataType Atype, int lda, const void* B,
                            cudaDataType Btype, int ldb, const void* beta, void* C,
                            cudaDataType Ctype, int ldc, cublasComputeType_t computeType,
                            cublasGemmAlgo_t) {
  if (!Supported(Atype, Btype, Ctype, computeType)) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (!ShapeOk(transa, transb, m, n, k, lda, ldb, ldc)) return CUBLAS_STATUS_INVALID_VALUE;
  Count("launch cublasGemmEx");
  const float a = *static_cast<const float*>(alpha), b = *static_cast<const float*>(beta);
  if (Enqueue(handle->stream, [=] {
    Gemm(transa, transb, m, n, k, a, A, Atype, lda, B, Btype, ldb, b, C, Ctype, ldc);
      }) != cudaSuccess) {  // the legacy stream while a blocking stream is captured
    return CUBLAS_STATUS_EXECUTION_FAILED;
  }
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGemmBatchedEx(cublasHandle_t handle, cublasOperation_t transa,
                                   cublasOperation_t transb, int m, int n, int k,
                                   const void* alpha, const void* const Aarray[],
                                   cudaDataType Atype, int lda, const void* const Barray[],
                                   cudaDataType Btype, int ldb, const void* beta,
                                   void* const Carray[], cudaDataType Ctype, int ldc,
                                   int batchCount, cublasComputeType_t computeType,
                                   cublasGemmAlgo_t) {
  if (!Supported(Atype, Btype, Ctype, computeType)) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (!ShapeOk(transa, transb, m, n, k, lda, ldb, ldc) || batchCount < 0) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  Count("launch cublasGemmBatchedEx");
  const float a = *static_cast<const float*>(alpha), b = *static_cast<const float*>(beta);
  // The pointer arrays are device memory: read when the call runs (a replayed graph reads them
  // again).
  if (Enqueue(handle->stream, [=] {
    for (int i = 0; i < batchCount; ++i) {
      Gemm(transa, transb, m, n, k, a, Aarray[i], Atype, lda, Barray[i], Btype, ldb, b,
           Carray[i], Ctype, ldc);
    }
      }) != cudaSuccess) {  // the legacy stream while a blocking stream is captured
    return CUBLAS_STATUS_EXECUTION_FAILED;
  }
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGemmStridedBatchedEx(
    cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
    int k, const void* alpha, const void* A, cudaDataType Atype, int lda, long long int strideA,
    const void* B, cudaDataType Btype, int ldb, long long int strideB, const void* beta, void* C,
    cudaDataType Ctype, int ldc, long long int strideC, int batchCount,
    cublasComputeType_t computeType, cublasGemmAlgo_t) {
  if (!Supported(Atype, Btype, Ctype, computeType)) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (!ShapeOk(transa, transb, m, n, k, lda, ldb, ldc) || batchCount < 0) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  Count("launch cublasGemmStridedBatchedEx");
  const float a = *static_cast<const float*>(alpha), b = *static_cast<const float*>(beta);
  auto at = [](const void* p, cudaDataType t, long long i) {
    return static_cast<const char*>(p) + i * (t == CUDA_R_32F ? 4 : 2);
  };
  if (Enqueue(handle->stream, [=] {
    for (int i = 0; i < batchCount; ++i) {
      Gemm(transa, transb, m, n, k, a, at(A, Atype, i * strideA), Atype, lda,
           at(B, Btype, i * strideB), Btype, ldb, b,
           const_cast<char*>(at(C, Ctype, i * strideC)), Ctype, ldc);
    }
      }) != cudaSuccess) {  // the legacy stream while a blocking stream is captured
    return CUBLAS_STATUS_EXECUTION_FAILED;
  }
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGemmGroupedBatchedEx(
    cublasHandle_t handle, const cublasOperation_t transa_array[],
    const cublasOperation_t transb_array[], const int m_array[], const int n_array[],
    const int k_array[], const void* alpha_array, const void* const Aarray[],
    cudaDataType_t Atype, const int lda_array[], const void* const Barray[], cudaDataType_t Btype,
    const int ldb_array[], const void* beta_array, void* const Carray[], cudaDataType_t Ctype,
    const int ldc_array[], int group_count, const int group_size[],
    cublasComputeType_t computeType) {
  // What the H100's cuBLAS 13 said to bf16 inputs with fp32 outputs here.
  if (!Supported(Atype, Btype, Ctype, computeType) || (Atype == CUDA_R_16BF && Ctype == CUDA_R_32F)) {
    return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  struct Problem {
    cublasOperation_t ta, tb;
    int m, n, k, lda, ldb, ldc;
    float alpha, beta;
  };
  std::vector<Problem> groups(group_count);
  for (int g = 0; g < group_count; ++g) {
    Problem& p = groups[g];
    p = Problem{transa_array[g], transb_array[g], m_array[g], n_array[g], k_array[g],
                lda_array[g], ldb_array[g], ldc_array[g],
                static_cast<const float*>(alpha_array)[g], static_cast<const float*>(beta_array)[g]};
    if (!ShapeOk(p.ta, p.tb, p.m, p.n, p.k, p.lda, p.ldb, p.ldc) || group_size[g] < 0) {
      return CUBLAS_STATUS_INVALID_VALUE;
    }
  }
  Count("launch cublasGemmGroupedBatchedEx");
  std::vector<int> sizes(group_size, group_size + group_count);
  if (Enqueue(handle->stream, [=] {
    int i = 0;
    for (int g = 0; g < group_count; ++g) {
      const Problem& p = groups[g];
      for (int s = 0; s < sizes[g]; ++s, ++i) {
        Gemm(p.ta, p.tb, p.m, p.n, p.k, p.alpha, Aarray[i], Atype, p.lda, Barray[i], Btype, p.ldb,
             p.beta, Carray[i], Ctype, p.ldc);
      }
    }
      }) != cudaSuccess) {  // the legacy stream while a blocking stream is captured
    return CUBLAS_STATUS_EXECUTION_FAILED;
  }
  return CUBLAS_STATUS_SUCCESS;
}

}  // extern "C"
