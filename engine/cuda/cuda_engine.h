// The CUDA implementations of the engine's device-dependent parts: the expert shard of an
// expert worker and the attention stack of an attention worker (with its paged KV cache on the
// GPU). Loaded through ExpertShard::Load / AttentionStack::Load with LoadOptions::device =
// cuda:N once //engine/cuda:backend is linked (bazel build --config=cuda).
//
// Weights live on the GPU in the checkpoint's precision (fp32 checkpoints stay fp32 so that the
// oracle's fp32 logits are reproduced; bf16 stay bf16; --compute_dtype=bf16 stores bf16); the
// router (gate) stays fp32 as on the CPU. Activations are fp32. Products with at most
// kSmallM rows run in our own kernel (weights streamed once, fp32 activations, fp32
// accumulation); larger ones in cuBLAS (fp32 weights: fp32 GEMM; bf16 weights: activations
// rounded to bf16, fp32 accumulation).
#ifndef MOEMESH_ENGINE_CUDA_CUDA_ENGINE_H_
#define MOEMESH_ENGINE_CUDA_CUDA_ENGINE_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <map>
#include <set>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/cuda/kernels.h"
#include "engine/expert_groups.h"
#include "engine/model.h"

namespace moemesh {
namespace cuda {

constexpr int64_t kSmallM = 16;

absl::Status CudaStatus(cudaError_t e, const char* what);

// Device memory, grown on demand (contents are not kept when it grows). Move-only.
class DeviceBuffer {
 public:
  // Counts the allocations and frees of every DeviceBuffer in the process. A captured CUDA graph
  // bakes in the addresses of the buffers it uses: it is only replayed while this is unchanged.
  static uint64_t Epoch();

  DeviceBuffer() = default;
  DeviceBuffer(DeviceBuffer&& o) noexcept : p_(o.p_), bytes_(o.bytes_) { o.p_ = nullptr; o.bytes_ = 0; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer();
  absl::Status Reserve(size_t bytes);
  template <typename T>
  T* as() const { return static_cast<T*>(p_); }
  void* get() const { return p_; }
  size_t bytes() const { return bytes_; }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

// Page-locked host memory (for asynchronous copies), grown on demand. Move-only.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  ~PinnedBuffer();
  absl::Status Reserve(size_t bytes);
  template <typename T>
  T* as() const { return static_cast<T*>(p_); }
  void* get() const { return p_; }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

// A stream, a cuBLAS handle bound to it and the scratch memory of the work queued on it.
class Exec {
 public:
  static absl::StatusOr<std::unique_ptr<Exec>> Create(int device);
  ~Exec();
  cudaStream_t stream() const { return stream_; }
  cublasHandle_t blas() const { return blas_; }
  absl::Status Sync();
  DeviceBuffer blas_workspace;  // set as cuBLAS's workspace (no allocation while capturing)
  DeviceBuffer xb16, gu;       // scratch of Project's cuBLAS path
  DeviceBuffer ab16, ptrs;     // scratch of GroupedSwiGlu
  DeviceBuffer act32, gathered, y32;  // and of its fallbacks (grown only when they run)
  PinnedBuffer h_ptrs;

 private:
  cudaStream_t stream_ = nullptr;
  cublasHandle_t blas_ = nullptr;
};

// Weights of one or more (`count`) [rows, in] matrices stored back to back on the device.
struct DeviceMatrix {
  DeviceBuffer w;
  WType wt = WType::kF32;
  int64_t rows = 0, in = 0, count = 0;
  DeviceBuffer bias;  // [rows] fp32, or empty
  bool has_bias = false;
  const void* matrix(int64_t slot) const {
    return static_cast<const char*>(w.get()) + slot * rows * in * WTypeSize(wt);
  }
};

// y[m, out] (+)= x[m, in] W^T (+ bias) with matrix `slot` of `mat`; with `swiglu`, W is a fused
// [2 out, in] gate/up matrix and y = silu(gate) * up ([m, out], ldy == out).
absl::Status Project(Exec& ex, const DeviceMatrix& mat, int64_t slot, const float* x, int64_t m,
                     float* y, int64_t ldy, bool accumulate, bool swiglu);

// xn = RmsNorm(x, norm_w, eps) ([m, in]; not x's memory), then y[m, out] = xn W^T (+ bias) with
// matrix 0 of `mat`, then `tail`'s routing or qkv preparation of y if it has one (its counters
// with it; its norm fields are these): one launch for a decode-sized m (SmallMFusion; the norm's
// values up to rounding), separate ones otherwise (FusionTail after cuBLAS).
absl::Status ProjectNormed(Exec& ex, const DeviceMatrix& mat, const float* x,
                           const float* norm_w, float eps, float* xn, int64_t m, float* y,
                           int64_t ldy, SmallMFusion tail = SmallMFusion());

// The routed experts' products for rows grouped by expert: group g (rows [row_begin[g],
// row_begin[g+1]) of x) uses matrix slot[g] of gate_up and down; act = silu(gate) * up,
// y = act down^T ([rows, hidden] fp32). bf16 weights (bf16 in and out of every GEMM, fp32
// accumulation): up to kMaxPadGroups groups are padded to a few row counts and run as one cuBLAS
// batched GEMM per projection and row count (BatchedSwiGlu, BatchedLayout::kAuto), with the cast
// to bf16, the SwiGLU and the widening back to fp32 as three passes around them (no host
// synchronisation; the expert shards skip the widening, see `out`); more groups (or if cuBLAS
// refuses the batched call) go through cublasGemmGroupedBatchedEx; fp32 weights (or if that is
// refused too) Project per group.
// With x_rows (device [rows]), grouped row i is row x_rows[i] of x: the batched way reads the
// rows in place as it pads them; the others gather them into ex.gathered first.
//
// With `out`, y may be null: the batched way then leaves its output rows padded, in bf16, for
// CombineExpertsPadded (no unpadding pass; out->padded, out->map), and the other ways write fp32
// rows in grouped order to y or, if null, to ex.y32 (out->y).
struct GroupedOut {
  const void* padded = nullptr;  // bf16 rows padded as `map` says, or null
  PadMap map;
  const float* y = nullptr;  // otherwise
};
absl::Status GroupedSwiGlu(Exec& ex, const DeviceMatrix& gate_up, const DeviceMatrix& down,
                           const std::vector<int32_t>& slot, const std::vector<int32_t>& row_begin,
                           const float* x, float* y, const int32_t* x_rows = nullptr,
                           GroupedOut* out = nullptr);
// The way the last GroupedSwiGlu call in the process ran: BatchedSwiGlu's plan's name
// ("strided", "batched" or "blocks"), "grouped" or "per-group".
const char* LastGroupedSwiGluPath();

// GroupedSwiGlu's three ways, for tests and expert_gemm_bench. The first two take bf16 weights
// (UNIMPLEMENTED otherwise; BatchedSwiGlu also at most kMaxPadGroups groups).
// BatchedSwiGlu with x_rows (device [rows]): grouped row i is row x_rows[i] of x, read in place.
// With `padded`, the output stays padded in ex.xb16 (bf16) as *padded describes; y is unused.
//
// How BatchedSwiGlu lays out its padded rows (PlanBatched):
//   kBuckets: PadGroups' buckets at `fill` (a group joins a bucket while its rows fill at least
//     that share of the bucket's; GroupedSwiGlu uses kBucketFill, expert_gemm_bench
//     --bucket_fills times others), each bucket one pointer-array batched GEMM
//     (cublasGemmBatchedEx) per projection, its pointers made on the device;
//   kStrided: one bucket laid out by slot (PadGroupsBySlot: every group padded to the largest
//     one's rows, at its slot's place; slots between the groups' are zero rows), one strided
//     batched GEMM (cublasGemmStridedBatchedEx) per projection: weights and rows at fixed
//     strides, no pointer arrays. The groups' slots must strictly ascend (INVALID_ARGUMENT
//     otherwise), as a shard's groups do (experts ascend, slots follow them);
//   kBlocks64, kBlocks128: every group padded to whole blocks of 64 or 128 rows
//     (PadGroupsToBlocks) and one pointer-array batched GEMM per projection whose entries are
//     the blocks (each with its group's weights): padding under a block per group, the way a
//     grouped GEMM kernel tiles its groups; pointers made on the device;
//   kAuto: kStrided where the slots ascend and its padded rows are at most 1 + kStridedSlack
//     times the buckets', kBuckets otherwise.
enum class BatchedLayout { kAuto, kBuckets, kStrided, kBlocks64, kBlocks128 };
constexpr double kBucketFill = 0.8;
constexpr double kStridedSlack = 0.1;
struct BatchedPlan {
  PaddedBuckets buckets;  // the padded rows' layout
  bool strided = false;
  int32_t block_rows = 0;  // kBlocks*: the rows of each batch entry
  // The way's name: "strided", "blocks" or "batched" (buckets).
  const char* name() const { return strided ? "strided" : block_rows > 0 ? "blocks" : "batched"; }
};
absl::StatusOr<BatchedPlan> PlanBatched(const std::vector<int32_t>& slot,
                                        const std::vector<int32_t>& row_begin,
                                        double fill = kBucketFill,
                                        BatchedLayout layout = BatchedLayout::kAuto);
absl::Status BatchedSwiGlu(Exec& ex, const DeviceMatrix& gate_up, const DeviceMatrix& down,
                           const std::vector<int32_t>& slot, const std::vector<int32_t>& row_begin,
                           const float* x, float* y, const int32_t* x_rows = nullptr,
                           PadMap* padded = nullptr, double fill = kBucketFill,
                           BatchedLayout layout = BatchedLayout::kAuto);
absl::Status CublasGroupedSwiGlu(Exec& ex, const DeviceMatrix& gate_up, const DeviceMatrix& down,
                                 const std::vector<int32_t>& slot,
                                 const std::vector<int32_t>& row_begin, const float* x, float* y);
// (act in ex.act32.)
absl::Status PerGroupSwiGlu(Exec& ex, const DeviceMatrix& gate_up, const DeviceMatrix& down,
                            const std::vector<int32_t>& slot,
                            const std::vector<int32_t>& row_begin, const float* x, float* y);

// Routed experts on one GPU.
class CudaExpertShard : public ExpertShard {
 public:
  static absl::StatusOr<std::unique_ptr<CudaExpertShard>> Load(const CheckpointReader& ckpt,
                                                               const ModelConfig& cfg,
                                                               const ArchSpec& arch,
                                                               const std::set<ExpertId>& shards,
                                                               const LoadOptions& opt);
  ~CudaExpertShard() override;
  // Host memory in and out (the expert worker's RunExperts): rows grouped by expert on the
  // host, one upload, all experts' products, the weighted combine on the GPU, one download.
  // Thread-safe: each call in flight takes its own stream and buffers.
  absl::Status RunExperts(int32_t layer, const float* x, int64_t n, const int32_t* ids,
                          const float* weights, int64_t k, float* out) const override;
  Device device() const override { return device_; }

  // Device memory in and out, on `ex`'s stream (the in-process CUDA attention stack): routing
  // ids/weights [n, k] stay on the GPU when GroupsOnDevice(n, k) (decode); larger batches group
  // on the host (with host synchronisations). out[n, hidden] is accumulated into. Calls share
  // one set of device scratch buffers: callers queue them on one stream (the attention stack
  // does), so that the work of one call never overlaps the next.
  absl::Status RunDevice(Exec& ex, int32_t layer, const float* x, int64_t n, const int32_t* ids,
                         const float* weights, int64_t k, float* out) const;
  // A MoE layer's router and experts from its input h [n, hidden]: xn = RmsNorm(h, norm_w),
  // logits = xn router^T ([n, experts], no bias), top k per row as TopKRouting (into the device
  // ids/weights [n, kmax]), then RunDevice on xn. A decode-sized step (n <= 8) does the norm,
  // the router and the routing and grouping in one launch (SmallMFusion); up to kRouteMaxRows
  // rows route and group in one launch after the router's; larger batches run TopKRouting,
  // then RunDevice.
  struct Router {
    const DeviceMatrix* mat = nullptr;
    const float* norm_w = nullptr;
    float eps = 0.0f;
    float* xn = nullptr;      // [n, hidden]
    float* logits = nullptr;  // [n, experts]
  };
  absl::Status RunDeviceRouted(Exec& ex, int32_t layer, const float* h, int64_t n,
                               const Router& router, const int32_t* k_per_row, int64_t kmax,
                               bool normalize, int32_t* ids, float* weights, float* out) const;
  // Whether RunDevice groups n x k assignments on the GPU: then it makes no host round trip and
  // allocates nothing once its buffers have grown, so the call can be captured in a CUDA graph.
  bool GroupsOnDevice(int64_t n, int64_t k) const;

 private:
  struct Scratch;
  struct Plan;  // host-side grouping of one call
  // A device-grouped plan's arrays (BuildGroups' outputs), carved from s.d_groups for n x k
  // assignments; `plan` views them.
  struct GroupArrays {
    int32_t *perm, *where, *slot, *row_begin, *num_groups;
  };
  absl::Status DevicePlan(Scratch& s, int64_t n, int64_t k, Plan* plan, GroupArrays* out) const;
  absl::Status RunGrouped(Exec& ex, Scratch& s, int32_t layer, const float* x, int64_t n,
                          const Plan& plan, int64_t k, const float* d_weights,
                          float* out) const;
  // s's counters of the fused combine and routing (hidden_ zeros, which the kernels leave zero).
  absl::Status FusionCounters(Exec& ex, Scratch& s, uint32_t** counters) const;
  std::unique_ptr<Scratch> TakeScratch() const;
  void GiveScratch(std::unique_ptr<Scratch> s) const;

  Device device_;
  int64_t hidden_ = 0, width_ = 0, num_experts_ = 0;
  struct LayerWeights {
    DeviceMatrix gate_up, down;       // [held, 2 width, hidden], [held, hidden, width]
    std::vector<int32_t> slot;        // expert -> slot, -1 if not held
    DeviceBuffer d_slot;              // same on the device
  };
  std::vector<LayerWeights> layers_;
  mutable std::mutex mu_;
  mutable std::vector<std::unique_ptr<Scratch>> free_;
  mutable std::mutex device_mu_;
  mutable std::unique_ptr<Scratch> device_scratch_;  // RunDevice's (stable addresses for graphs)
};

// The attention side of the model on one GPU.
class CudaAttentionStack : public AttentionStack {
 public:
  static absl::StatusOr<std::unique_ptr<CudaAttentionStack>> Load(const CheckpointReader& ckpt,
                                                                  const ModelConfig& cfg,
                                                                  const ArchSpec& arch,
                                                                  const LoadOptions& opt);
  ~CudaAttentionStack() override;
  absl::Status Forward(const std::vector<SeqStep>& batch, float* hidden, KvCache* cache,
                       ExpertBackend* experts, std::vector<float>* logits) const override;
  // The argmax of each row on the GPU (ArgMaxRows): R ids come back instead of R x vocab floats.
  absl::Status ForwardArgMax(const std::vector<SeqStep>& batch, float* hidden, KvCache* cache,
                             ExpertBackend* experts, std::vector<int32_t>* ids) const override;
  std::unique_ptr<KvCache> NewCache(int64_t capacity_tokens) const override;
  Device device() const override { return device_; }

 private:
  // Forward (ids null) or ForwardArgMax (logits null).
  absl::Status Run(const std::vector<SeqStep>& batch, float* hidden, KvCache* cache,
                   ExpertBackend* experts, std::vector<float>* logits,
                   std::vector<int32_t>* ids) const;
  // Run's body, under mu_; `cache` is a CudaKvCache.
  absl::Status RunLocked(const std::vector<SeqStep>& batch, float* hidden, KvCache* cache,
                         ExpertBackend* experts, std::vector<float>* logits,
                         std::vector<int32_t>* ids) const;
  struct Layer {
    DeviceBuffer input_norm, post_norm, q_norm, k_norm;  // fp32
    DeviceMatrix qkv, o, router, mlp_gate_up, mlp_down, shared_gate;
    bool moe = true, has_mlp = false, has_shared_gate = false;
  };
  struct Scratch;
  // What one step queues after its inputs are on the GPU.
  struct StepArgs {
    int64_t tokens = 0, rows = 0, kmax = 1;  // T, logits rows R, largest k
    const int32_t* d_k = nullptr;            // [T] experts per token
    const int32_t* d_sel = nullptr;          // [R] rows that get logits
    int splits = 1;                          // PagedAttention's splits (AttentionSplits)
    PagedKv kv;
    ExpertBackend* experts = nullptr;
    const CudaExpertShard* same_gpu = nullptr;  // in-process experts on this GPU, or null
  };
  // The layers, the final norm and the LM head (into scratch_->logits) on exec_'s stream.
  absl::Status EnqueueStep(const StepArgs& a) const;
  // EnqueueStep through a CUDA graph per step shape (see LoadOptions::cuda_graphs): the first
  // step of a shape runs as is, the next one is captured, later ones replay the graph. Falls
  // back to EnqueueStep for good if a capture fails.
  absl::Status EnqueueStepGraph(const StepArgs& a) const;
  void DropGraphs() const;

  Device device_;
  std::vector<Layer> layers_;
  bool any_moe_ = false;
  DeviceBuffer final_norm_, inv_freq_;
  DeviceMatrix lm_head_;
  mutable std::mutex mu_;
  std::unique_ptr<Exec> exec_;
  std::unique_ptr<Scratch> scratch_;
  // CUDA graphs of decode steps, by (tokens, logits rows, kmax, KV pool, expert shard,
  // attention splits).
  struct StepGraph {
    bool warm = false;               // a step of this shape ran without allocating
    cudaGraphExec_t exec = nullptr;  // captured
  };
  using GraphKey = std::tuple<int64_t, int64_t, int64_t, const void*, const void*, int>;
  bool use_graphs_ = false;
  KvDType kv_dtype_ = KvDType::kF32;  // the caches' element type (fp32 or bf16)
  mutable bool graphs_failed_ = false;
  mutable uint64_t graphs_epoch_ = 0;
  mutable std::map<GraphKey, StepGraph> graphs_;
};

// Decode steps replayed from CUDA graphs and graphs captured, over the process (for tests and
// the bench).
struct GraphCounts {
  int64_t captured = 0, replayed = 0;
};
GraphCounts StepGraphCounts();

// Registers the CUDA backend with the engine (engine/model.h's RegisterDeviceBackend).
// //engine/cuda:backend calls it at start-up; tests may call it again (idempotent).
void RegisterCudaBackend();

// Number of visible GPUs (0 without a driver or GPU; never fails).
int DeviceCount();

}  // namespace cuda
}  // namespace moemesh

#endif  // MOEMESH_ENGINE_CUDA_CUDA_ENGINE_H_
