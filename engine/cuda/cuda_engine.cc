#include "engine/cuda/cuda_engine.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/dtype.h"
#include "engine/expert_groups.h"

namespace moemesh {
namespace cuda {

#define MOEMESH_CUDA(expr)                                          \
  do {                                                              \
    cudaError_t _e = (expr);                                        \
    if (_e != cudaSuccess) return CudaStatus(_e, #expr);            \
  } while (0)

#define MOEMESH_BLAS(expr)                                                              \
  do {                                                                                  \
    cublasStatus_t _s = (expr);                                                         \
    if (_s != CUBLAS_STATUS_SUCCESS) {                                                  \
      return absl::InternalError(absl::StrCat(#expr, ": ", cublasGetStatusString(_s))); \
    }                                                                                   \
  } while (0)

#define MOEMESH_OK(expr)                 \
  do {                                   \
    absl::Status _st = (expr);           \
    if (!_st.ok()) return _st;           \
  } while (0)

absl::Status CudaStatus(cudaError_t e, const char* what) {
  const std::string msg = absl::StrCat("CUDA error in ", what, ": ", cudaGetErrorString(e));
  if (e == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(msg);
  return absl::InternalError(msg);
}

// ---------------------------------------------------------------- memory

namespace {
std::atomic<uint64_t> alloc_epoch{1};
std::atomic<int64_t> graphs_captured{0}, graphs_replayed{0};
}  // namespace

uint64_t DeviceBuffer::Epoch() { return alloc_epoch.load(std::memory_order_acquire); }

GraphCounts StepGraphCounts() {
  GraphCounts c;
  c.captured = graphs_captured.load();
  c.replayed = graphs_replayed.load();
  return c;
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    if (p_ != nullptr) {
      cudaFree(p_);
      alloc_epoch.fetch_add(1);
    }
    p_ = o.p_;
    bytes_ = o.bytes_;
    o.p_ = nullptr;
    o.bytes_ = 0;
  }
  return *this;
}

DeviceBuffer::~DeviceBuffer() {
  if (p_ != nullptr) {
    cudaFree(p_);
    alloc_epoch.fetch_add(1);
  }
}

absl::Status DeviceBuffer::Reserve(size_t bytes) {
  if (bytes <= bytes_) return absl::OkStatus();
  alloc_epoch.fetch_add(1);
  if (p_ != nullptr) cudaFree(p_);
  p_ = nullptr;
  bytes_ = 0;
  const size_t want = std::max<size_t>(bytes, 256);
  MOEMESH_CUDA(cudaMalloc(&p_, want));
  bytes_ = want;
  return absl::OkStatus();
}

PinnedBuffer::~PinnedBuffer() {
  if (p_ != nullptr) cudaFreeHost(p_);
}

absl::Status PinnedBuffer::Reserve(size_t bytes) {
  if (bytes <= bytes_) return absl::OkStatus();
  if (p_ != nullptr) cudaFreeHost(p_);
  p_ = nullptr;
  bytes_ = 0;
  const size_t want = std::max<size_t>(bytes * 5 / 4, 4096);  // grow with slack
  MOEMESH_CUDA(cudaMallocHost(&p_, want));
  bytes_ = want;
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Exec>> Exec::Create(int device) {
  auto ex = std::unique_ptr<Exec>(new Exec());
  MOEMESH_CUDA(cudaSetDevice(device));
  MOEMESH_CUDA(cudaStreamCreateWithFlags(&ex->stream_, cudaStreamNonBlocking));
  MOEMESH_BLAS(cublasCreate(&ex->blas_));
  MOEMESH_BLAS(cublasSetStream(ex->blas_, ex->stream_));
  // Our own workspace (NVIDIA's recommendation for Hopper: 32 MiB), so that a cuBLAS call in a
  // captured graph never allocates. cublasSetStream resets it: set after.
  constexpr size_t kWorkspace = size_t{32} << 20;
  MOEMESH_OK(ex->blas_workspace.Reserve(kWorkspace));
  MOEMESH_BLAS(cublasSetWorkspace(ex->blas_, ex->blas_workspace.get(), kWorkspace));
  return ex;
}

Exec::~Exec() {
  if (blas_ != nullptr) cublasDestroy(blas_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

absl::Status Exec::Sync() {
  MOEMESH_CUDA(cudaStreamSynchronize(stream_));
  return absl::OkStatus();
}

// ---------------------------------------------------------------- projections

absl::Status Project(Exec& ex, const DeviceMatrix& mat, int64_t slot, const float* x, int64_t m,
                     float* y, int64_t ldy, bool accumulate, bool swiglu) {
  if (m <= 0) return absl::OkStatus();
  const int64_t out = swiglu ? mat.rows / 2 : mat.rows;
  const float* bias = mat.has_bias ? mat.bias.as<float>() : nullptr;
  if (m <= kSmallM) {
    MOEMESH_CUDA(SmallMLinear(mat.matrix(slot), mat.wt, bias, out, mat.in, x, m, y, ldy,
                              accumulate, swiglu, Groups(), ex.stream()));
    return absl::OkStatus();
  }
  const void* b = x;
  cudaDataType_t t = CUDA_R_32F;
  if (mat.wt == WType::kBF16) {
    MOEMESH_OK(ex.xb16.Reserve(static_cast<size_t>(m * mat.in) * 2));
    MOEMESH_CUDA(ToBf16(x, m * mat.in, ex.xb16.get(), ex.stream()));
    b = ex.xb16.get();
    t = CUDA_R_16BF;
  }
  const float one = 1.0f, zero = 0.0f;
  float* c = y;
  int64_t ldc = ldy;
  if (swiglu) {
    MOEMESH_OK(ex.gu.Reserve(static_cast<size_t>(m * mat.rows) * sizeof(float)));
    c = ex.gu.as<float>();
    ldc = mat.rows;
  }
  MOEMESH_BLAS(cublasGemmEx(ex.blas(), CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(mat.rows),
                            static_cast<int>(m), static_cast<int>(mat.in), &one, mat.matrix(slot),
                            t, static_cast<int>(mat.in), b, t, static_cast<int>(mat.in),
                            accumulate && !swiglu ? &one : &zero, c, CUDA_R_32F,
                            static_cast<int>(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  if (swiglu) {
    MOEMESH_CUDA(SiluMul(c, m, out, y, WType::kF32, ex.stream()));
  } else if (bias != nullptr) {
    MOEMESH_CUDA(AddBias(y, bias, m, out, ldy, ex.stream()));
  }
  return absl::OkStatus();
}

absl::Status ProjectNormed(Exec& ex, const DeviceMatrix& mat, const float* x,
                           const float* norm_w, float eps, float* xn, int64_t m, float* y,
                           int64_t ldy, SmallMFusion tail) {
  if (m <= 0) return absl::OkStatus();
  if (m <= kSmallM) {
    tail.norm_w = norm_w;
    tail.eps = eps;
    tail.xn = xn;
    MOEMESH_CUDA(SmallMLinear(mat.matrix(0), mat.wt, mat.has_bias ? mat.bias.as<float>() : nullptr,
                              mat.rows, mat.in, x, m, y, ldy, false, false, Groups(), ex.stream(),
                              SmallMChoice::kAuto, tail));
    return absl::OkStatus();
  }
  MOEMESH_CUDA(RmsNorm(x, norm_w, m, mat.in, eps, xn, ex.stream()));
  MOEMESH_OK(Project(ex, mat, 0, xn, m, y, ldy, false, false));
  MOEMESH_CUDA(FusionTail(y, m, mat.rows, tail, ex.stream()));
  return absl::OkStatus();
}

namespace {
// b holds at least `bytes`, zeros where it grew (on `stream`): the fused kernels' counters,
// which they leave at zero.
absl::Status ReserveZeros(DeviceBuffer& b, size_t bytes, cudaStream_t stream) {
  if (b.bytes() >= bytes) return absl::OkStatus();
  MOEMESH_OK(b.Reserve(bytes));
  MOEMESH_CUDA(cudaMemsetAsync(b.get(), 0, b.bytes(), stream));
  return absl::OkStatus();
}

std::atomic<const char*> last_grouped_path{"none"};

// The process-wide launch settings a load asks for (on once any load of the process does).
void UseLaunchOptions(const LoadOptions& opt) {
  if (opt.cuda_pdl) SetProgrammaticLaunch(true);
  if (opt.cuda_deep_loads) SetDeepLoads(true);
}
}  // namespace

const char* LastGroupedSwiGluPath() { return last_grouped_path.load(); }

absl::StatusOr<BatchedPlan> PlanBatched(const std::vector<int32_t>& slot,
                                        const std::vector<int32_t>& row_begin, double fill,
                                        BatchedLayout layout) {
  constexpr int32_t kAlign = 8;  // padded rows in multiples of 8
  BatchedPlan plan;
  if (layout == BatchedLayout::kBlocks64 || layout == BatchedLayout::kBlocks128) {
    plan.block_rows = layout == BatchedLayout::kBlocks64 ? 64 : 128;
    plan.buckets = PadGroupsToBlocks(row_begin, plan.block_rows);
    return plan;
  }
  if (layout != BatchedLayout::kStrided) plan.buckets = PadGroups(row_begin, kAlign, fill);
  if (layout == BatchedLayout::kBuckets) return plan;
  std::optional<PaddedBuckets> by_slot = PadGroupsBySlot(row_begin, slot, kAlign);
  if (!by_slot.has_value()) {
    if (layout == BatchedLayout::kAuto) return plan;
    return absl::InvalidArgumentError(
        "strided batched expert GEMMs take groups whose slots strictly ascend");
  }
  if (layout == BatchedLayout::kStrided ||
      by_slot->padded_rows() <= (1 + kStridedSlack) * plan.buckets.padded_rows()) {
    plan.buckets = *std::move(by_slot);
    plan.strided = true;
  }
  return plan;
}

namespace {
// BatchedSwiGlu with its plan made.
absl::Status RunBatched(Exec& ex, const DeviceMatrix& gate_up, const DeviceMatrix& down,
                        const std::vector<int32_t>& slot, const std::vector<int32_t>& row_begin,
                        const BatchedPlan& plan, const float* x, float* y, const int32_t* x_rows,
                        PadMap* padded) {
  const int G = static_cast<int>(slot.size());
  if (G == 0) return absl::OkStatus();
  const int64_t H = gate_up.in, W = down.in;
  // Groups padded to one row count per bucket (the strided plan: one bucket laid out by slot),
  // each bucket one cuBLAS batched GEMM per projection (bf16 in and out, fp32 accumulation). Row
  // maps and pointer arrays travel as kernel parameters: no host synchronisation, no upload.
  const PaddedBuckets& pb = plan.buckets;
  const int64_t P = pb.padded_rows();
  MOEMESH_OK(ex.xb16.Reserve(static_cast<size_t>(P * H) * 2));  // x, later y
  MOEMESH_OK(ex.ab16.Reserve(static_cast<size_t>(P * W) * 2));
  MOEMESH_OK(ex.gu.Reserve(static_cast<size_t>(P * 2 * W) * 2));
  PadMap map;
  map.groups = G;
  for (int g = 0; g <= G; ++g) {
    map.src_begin[g] = row_begin[g];
    map.dst_begin[g] = pb.dst_begin[g];
  }
  MOEMESH_CUDA(PadRowsToBf16(x, H, map, ex.xb16.get(), ex.stream(), x_rows));
  const float one = 1.0f, zero = 0.0f;
  // The two projections (pass 0: gate/up [P, H] -> [P, 2 W], 1: down [P, W] -> [P, H]). Strides as
  // DeviceMatrix::matrix(slot) has them ([2 W, H] and [H, W] bf16).
  std::function<absl::Status(const DeviceMatrix&, int, const void*, void*)> project;
  if (plan.strided) {
    // Batch entry i: slot slot[0] + i's matrix and padded rows [i R, (i + 1) R).
    const int R = pb.bucket_rows[0];
    const int count = static_cast<int>(P / R);
    project = [&, R, count](const DeviceMatrix& w, int, const void* in, void* out) -> absl::Status {
      const int m = static_cast<int>(w.rows), k = static_cast<int>(w.in);
      MOEMESH_BLAS(cublasGemmStridedBatchedEx(
          ex.blas(), CUBLAS_OP_T, CUBLAS_OP_N, m, R, k, &one, w.matrix(slot[0]), CUDA_R_16BF, k,
          w.rows * w.in, in, CUDA_R_16BF, k, int64_t{R} * k, &zero, out, CUDA_R_16BF, m,
          int64_t{R} * m, count, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      return absl::OkStatus();
    };
  } else {
    // Pointer arrays, made on the device: n batch entries, bucket b's entries
    // [entry_begin[b], entry_begin[b + 1]), each pb.bucket_rows[b] padded rows. Buckets: an entry
    // per group (groups order[bucket_begin[b] ..)); blocks: one bucket, an entry per block of a
    // group's padded rows (none when every group is empty).
    const bool blocks = plan.block_rows > 0;
    const int n = blocks ? static_cast<int>(P / plan.block_rows) : G;
    const std::vector<int32_t> entry_begin =
        blocks ? std::vector<int32_t>{0, n} : pb.bucket_begin;
    MOEMESH_OK(ex.ptrs.Reserve(6 * static_cast<size_t>(std::max(n, 1)) * sizeof(void*)));
    void** dp = ex.ptrs.as<void*>();
    BatchList list;
    SlotList slots;
    if (blocks) {
      std::copy(slot.begin(), slot.end(), slots.slot);
    } else {
      list.n = G;
      for (int g = 0; g < G; ++g) {
        list.slot[g] = slot[g];
        list.row[g] = pb.dst_begin[g];
        list.order[g] = pb.order[g];
      }
    }
    // Pass 0's arrays at dp, pass 1's at dp + 3 n.
    auto fill = [&](const DeviceMatrix& w, int pass, const void* in, int64_t in_row, void* out,
                    int64_t out_row) {
      const int64_t stride = w.rows * w.in * 2;
      void** at = dp + 3 * n * pass;
      return blocks ? FillBlockPointers(map, slots, plan.block_rows, w.w.get(), stride, in,
                                        in_row, out, out_row, at, ex.stream())
                    : FillBatchPointers(list, w.w.get(), stride, in, in_row, out, out_row, at,
                                        ex.stream());
    };
    MOEMESH_CUDA(fill(gate_up, 0, ex.xb16.get(), H * 2, ex.gu.get(), 2 * W * 2));
    MOEMESH_CUDA(fill(down, 1, ex.ab16.get(), W * 2, ex.xb16.get(), H * 2));
    project = [&, dp, n, entry_begin](const DeviceMatrix& w, int pass, const void*,
                                      void*) -> absl::Status {
      void** arrays = dp + 3 * n * pass;
      const int m = static_cast<int>(w.rows), k = static_cast<int>(w.in);
      for (int b = 0; b < pb.buckets(); ++b) {
        const int j = entry_begin[b], count = entry_begin[b + 1] - j;
        if (count == 0) continue;
        MOEMESH_BLAS(cublasGemmBatchedEx(
            ex.blas(), CUBLAS_OP_T, CUBLAS_OP_N, m, pb.bucket_rows[b], k, &one, arrays + j,
            CUDA_R_16BF, k, arrays + n + j, CUDA_R_16BF, k, &zero, arrays + 2 * n + j,
            CUDA_R_16BF, m, count, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      }
      return absl::OkStatus();
    };
  }
  MOEMESH_OK(project(gate_up, 0, ex.xb16.get(), ex.gu.get()));
  MOEMESH_CUDA(SiluMulBf16(ex.gu.get(), P, W, ex.ab16.get(), ex.stream()));
  MOEMESH_OK(project(down, 1, ex.ab16.get(), ex.xb16.get()));
  if (padded != nullptr) {
    *padded = map;  // the caller's combine reads the padded rows
  } else {
    MOEMESH_CUDA(UnpadRowsToF32(ex.xb16.get(), H, map, y, ex.stream()));
  }
  return absl::OkStatus();
}

absl::Status BatchedTakes(const DeviceMatrix& gate_up, const DeviceMatrix& down, size_t groups) {
  if (gate_up.wt != WType::kBF16 || down.wt != WType::kBF16 || groups > kMaxPadGroups) {
    return absl::UnimplementedError(
        absl::StrCat("batched expert GEMMs take bf16 weights and at most ", kMaxPadGroups,
                     " groups"));
  }
  return absl::OkStatus();
}
}  // namespace

absl::Status BatchedSwiGlu(Exec& ex, const DeviceMatrix& gate_up, const DeviceMatrix& down,
                           const std::vector<int32_t>& slot, const std::vector<int32_t>& row_begin,
                           const float* x, float* y, const int32_t* x_rows, PadMap* padded,
                           double fill, BatchedLayout layout) {
  MOEMESH_OK(BatchedTakes(gate_up, down, slot.size()));
  absl::StatusOr<BatchedPlan> plan = PlanBatched(slot, row_begin, fill, layout);
  if (!plan.ok()) return plan.status();
  return RunBatched(ex, gate_up, down, slot, row_begin, *plan, x, y, x_rows, padded);
}

absl::Status CublasGroupedSwiGlu(Exec& ex, const DeviceMatrix& gate_up, const DeviceMatrix& down,
                                 const std::vector<int32_t>& slot,
                                 const std::vector<int32_t>& row_begin, const float* x, float* y) {
  const int G = static_cast<int>(slot.size());
  if (G == 0) return absl::OkStatus();
  if (gate_up.wt != WType::kBF16 || down.wt != WType::kBF16) {
    return absl::UnimplementedError("cuBLAS's grouped expert GEMMs take bf16 weights");
  }
  const int64_t rows = row_begin[G], H = gate_up.in, W = down.in;
  // bf16 throughout the grouped GEMMs (cuBLAS's grouped call takes bf16 in and out, with fp32
  // accumulation); y is widened to fp32 at the end.
  MOEMESH_OK(ex.xb16.Reserve(static_cast<size_t>(rows * H) * 2));
  MOEMESH_OK(ex.ab16.Reserve(static_cast<size_t>(rows * W) * 2));
  MOEMESH_OK(ex.gu.Reserve(static_cast<size_t>(rows * 2 * W) * 2));
  MOEMESH_CUDA(ToBf16(x, rows * H, ex.xb16.get(), ex.stream()));
  // Device arrays of pointers: [A of gate_up, B, C, A of down, B, C] x G.
  MOEMESH_OK(ex.h_ptrs.Reserve(6 * G * sizeof(void*)));
  MOEMESH_OK(ex.ptrs.Reserve(6 * G * sizeof(void*)));
  MOEMESH_OK(ex.Sync());  // h_ptrs may still feed the previous call's copy
  const void** hp = ex.h_ptrs.as<const void*>();
  const char* xb = ex.xb16.as<char>();
  const char* ab = ex.ab16.as<char>();
  const char* gb = ex.gu.as<char>();
  for (int g = 0; g < G; ++g) {
    const int64_t b = row_begin[g];
    hp[g] = gate_up.matrix(slot[g]);
    hp[G + g] = xb + b * H * 2;
    hp[2 * G + g] = gb + b * 2 * W * 2;
    hp[3 * G + g] = down.matrix(slot[g]);
    hp[4 * G + g] = ab + b * W * 2;
    hp[5 * G + g] = xb + b * H * 2;  // y in bf16 reuses x's bf16 copy (consumed by then)
  }
  MOEMESH_CUDA(cudaMemcpyAsync(ex.ptrs.get(), hp, 6 * G * sizeof(void*), cudaMemcpyHostToDevice,
                               ex.stream()));
  void** dp = ex.ptrs.as<void*>();
  std::vector<cublasOperation_t> ta(G, CUBLAS_OP_T), tb(G, CUBLAS_OP_N);
  std::vector<int> m1(G, static_cast<int>(2 * W)), m2(G, static_cast<int>(H)), n(G),
      k1(G, static_cast<int>(H)), k2(G, static_cast<int>(W)), ones(G, 1);
  std::vector<float> alpha(G, 1.0f), beta(G, 0.0f);
  for (int g = 0; g < G; ++g) n[g] = row_begin[g + 1] - row_begin[g];
  MOEMESH_BLAS(cublasGemmGroupedBatchedEx(
      ex.blas(), ta.data(), tb.data(), m1.data(), n.data(), k1.data(), alpha.data(),
      const_cast<const void* const*>(dp), CUDA_R_16BF, k1.data(),
      const_cast<const void* const*>(dp + G), CUDA_R_16BF, k1.data(), beta.data(), dp + 2 * G,
      CUDA_R_16BF, m1.data(), G, ones.data(), CUBLAS_COMPUTE_32F));
  MOEMESH_CUDA(SiluMulBf16(ex.gu.get(), rows, W, ex.ab16.get(), ex.stream()));
  MOEMESH_BLAS(cublasGemmGroupedBatchedEx(
      ex.blas(), ta.data(), tb.data(), m2.data(), n.data(), k2.data(), alpha.data(),
      const_cast<const void* const*>(dp + 3 * G), CUDA_R_16BF, k2.data(),
      const_cast<const void* const*>(dp + 4 * G), CUDA_R_16BF, k2.data(), beta.data(),
      dp + 5 * G, CUDA_R_16BF, m2.data(), G, ones.data(), CUBLAS_COMPUTE_32F));
  MOEMESH_CUDA(Bf16ToF32(ex.xb16.get(), rows * H, y, ex.stream()));
  return ex.Sync();  // the host arrays above are freed next
}

absl::Status PerGroupSwiGlu(Exec& ex, const DeviceMatrix& gate_up, const DeviceMatrix& down,
                            const std::vector<int32_t>& slot,
                            const std::vector<int32_t>& row_begin, const float* x, float* y) {
  if (slot.empty()) return absl::OkStatus();
  const int64_t H = gate_up.in, W = down.in;
  MOEMESH_OK(ex.act32.Reserve(static_cast<size_t>(row_begin.back() * W) * sizeof(float)));
  float* act = ex.act32.as<float>();
  for (size_t g = 0; g < slot.size(); ++g) {
    const int64_t b = row_begin[g], m = row_begin[g + 1] - b;
    MOEMESH_OK(Project(ex, gate_up, slot[g], x + b * H, m, act + b * W, W, false, true));
    MOEMESH_OK(Project(ex, down, slot[g], act + b * W, m, y + b * H, H, false, false));
  }
  return absl::OkStatus();
}

absl::Status GroupedSwiGlu(Exec& ex, const DeviceMatrix& gate_up, const DeviceMatrix& down,
                           const std::vector<int32_t>& slot, const std::vector<int32_t>& row_begin,
                           const float* x, float* y, const int32_t* x_rows, GroupedOut* out) {
  if (out != nullptr) *out = GroupedOut();
  if (slot.empty()) return absl::OkStatus();
  // A path cuBLAS refuses (a status other than "not for these weights") is not tried again.
  static std::atomic<bool> batched_ok{true}, grouped_ok{true};
  // Runs one way; on failure says so once and turns that way off.
  auto attempt = [&](std::atomic<bool>& ok, const char* path, const char* next,
                     const absl::Status& st) {
    if (st.ok()) {
      last_grouped_path = path;
      return true;
    }
    std::fprintf(stderr, "%s expert GEMMs: %s; using %s\n", path, st.ToString().c_str(), next);
    ok = false;
    return false;
  };
  const bool bf16 = gate_up.wt == WType::kBF16 && down.wt == WType::kBF16;
  if (BatchedTakes(gate_up, down, slot.size()).ok() && batched_ok.load()) {
    absl::StatusOr<BatchedPlan> plan = PlanBatched(slot, row_begin);
    if (!plan.ok()) return plan.status();  // (kAuto always has one)
    if (attempt(batched_ok, plan->name(), "cuBLAS's grouped GEMM",
                RunBatched(ex, gate_up, down, slot, row_begin, *plan, x, y, x_rows,
                           out != nullptr ? &out->map : nullptr))) {
      if (out != nullptr) out->padded = ex.xb16.get();
      return absl::OkStatus();
    }
  }
  if (out != nullptr) {
    if (y == nullptr) {
      const int64_t rows = row_begin.back(), H = down.rows;
      MOEMESH_OK(ex.y32.Reserve(static_cast<size_t>(rows * H) * sizeof(float)));
      y = ex.y32.as<float>();
    }
    out->y = y;
  }
  if (x_rows != nullptr) {  // the other ways read the rows gathered
    const int64_t rows = row_begin.back(), H = gate_up.in;
    MOEMESH_OK(ex.gathered.Reserve(static_cast<size_t>(rows * H) * sizeof(float)));
    MOEMESH_CUDA(GatherRows(x, x_rows, rows, H, ex.gathered.as<float>(), ex.stream()));
    x = ex.gathered.as<float>();
  }
  if (bf16 && grouped_ok.load() &&
      attempt(grouped_ok, "grouped", "one GEMM per expert",
              CublasGroupedSwiGlu(ex, gate_up, down, slot, row_begin, x, y))) {
    return absl::OkStatus();
  }
  last_grouped_path = "per-group";
  return PerGroupSwiGlu(ex, gate_up, down, slot, row_begin, x, y);
}

// ---------------------------------------------------------------- loading

namespace {

uint64_t SeedOf(const std::string& name) { return std::hash<std::string>()(name) | 1; }

// Copies checkpoint tensors to the device, converting to the storage type; with a dummy
// checkpoint fills random values on the device instead (no host traffic).
class Uploader {
 public:
  Uploader(const CheckpointReader& ckpt, Exec& ex, ComputeType ct)
      : ckpt_(ckpt), ex_(ex), ct_(ct), dummy_(ckpt.dummy()) {}

  // Storage type of a matrix: bf16 for bf16 checkpoints, dummy weights or bf16 compute.
  WType TypeOf(const std::string& name, bool force_f32) const {
    if (force_f32) return WType::kF32;
    if (dummy_ || ct_ == ComputeType::kBF16) return WType::kBF16;
    const TensorInfo* t = ckpt_.Find(name);
    return t != nullptr && t->dtype == DType::kBF16 ? WType::kBF16 : WType::kF32;
  }

  // `rows` x `in` of tensor `name` into dst (type wt).
  absl::Status Rows(const std::string& name, int64_t rows, int64_t in, WType wt, void* dst) {
    const int64_t n = rows * in;
    if (dummy_) {
      MOEMESH_CUDA(FillRandom(dst, wt, n, SeedOf(name), 1.0f / std::sqrt(static_cast<float>(in)),
                              false, ex_.stream()));
      return absl::OkStatus();
    }
    auto t = ckpt_.Get(name, {rows, in});
    if (!t.ok()) return t.status();
    const TensorInfo* ti = *t;
    MOEMESH_OK(ex_.Sync());  // the staging buffer is reused
    if (wt == WType::kBF16 && ti->dtype == DType::kBF16) {
      staging_.resize(n * 2);
      std::memcpy(staging_.data(), ti->data, n * 2);
    } else {
      f32_.resize(n);
      ToF32(ti->data, ti->dtype, n, f32_.data());
      if (wt == WType::kF32) {
        staging_.resize(n * 4);
        std::memcpy(staging_.data(), f32_.data(), n * 4);
      } else {
        staging_.resize(n * 2);
        uint16_t* s = reinterpret_cast<uint16_t*>(staging_.data());
        for (int64_t i = 0; i < n; ++i) s[i] = F32ToBF16(f32_[i]);
      }
    }
    MOEMESH_CUDA(cudaMemcpy(dst, staging_.data(), staging_.size(), cudaMemcpyHostToDevice));
    return absl::OkStatus();
  }

  // A 1-D fp32 vector (norm weights: 1 when dummy; biases: 0 when dummy).
  absl::Status Vector(const std::string& name, int64_t n, float dummy_value, DeviceBuffer* out) {
    MOEMESH_OK(out->Reserve(n * sizeof(float)));
    if (dummy_) {
      MOEMESH_CUDA(FillRandom(out->get(), WType::kF32, n, 0, dummy_value, true, ex_.stream()));
      return absl::OkStatus();
    }
    auto t = ckpt_.Get(name, {n});
    if (!t.ok()) return t.status();
    f32_.resize(n);
    ToF32((*t)->data, (*t)->dtype, n, f32_.data());
    MOEMESH_CUDA(cudaMemcpy(out->get(), f32_.data(), n * sizeof(float), cudaMemcpyHostToDevice));
    return absl::OkStatus();
  }

  // Parts stacked row-wise into one matrix (fused q/k/v, gate/up), with optional biases.
  absl::Status Matrix(const std::vector<LinearPart>& parts, int64_t in, bool force_f32,
                      DeviceMatrix* m) {
    m->wt = TypeOf(parts[0].weight, force_f32);
    m->in = in;
    m->rows = 0;
    m->count = 1;
    for (const LinearPart& p : parts) m->rows += p.rows;
    MOEMESH_OK(m->w.Reserve(static_cast<size_t>(m->rows * in * WTypeSize(m->wt))));
    int64_t r = 0;
    m->has_bias = false;
    for (const LinearPart& p : parts) m->has_bias |= !p.bias.empty();
    if (m->has_bias) MOEMESH_OK(m->bias.Reserve(m->rows * sizeof(float)));
    for (const LinearPart& p : parts) {
      MOEMESH_OK(Rows(p.weight, p.rows, in, m->wt,
                      static_cast<char*>(m->w.get()) + r * in * WTypeSize(m->wt)));
      if (m->has_bias) {
        DeviceBuffer b;
        if (p.bias.empty()) {
          MOEMESH_CUDA(cudaMemsetAsync(m->bias.as<float>() + r, 0, p.rows * sizeof(float),
                                       ex_.stream()));
        } else {
          MOEMESH_OK(Vector(p.bias, p.rows, 0.0f, &b));
          MOEMESH_OK(ex_.Sync());
          MOEMESH_CUDA(cudaMemcpy(m->bias.as<float>() + r, b.get(), p.rows * sizeof(float),
                                  cudaMemcpyDeviceToDevice));
        }
      }
      r += p.rows;
    }
    return ex_.Sync();
  }

 private:
  const CheckpointReader& ckpt_;
  Exec& ex_;
  const ComputeType ct_;
  const bool dummy_;
  std::vector<char> staging_;
  std::vector<float> f32_;
};

absl::Status CheckDevice(const Device& d) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) count = 0;
  if (d.index >= count) {
    return absl::NotFoundError(absl::StrCat("no CUDA device ", d.ToString(), ": this machine has ",
                                            count, " GPU", count == 1 ? "" : "s"));
  }
  return absl::OkStatus();
}

// Host-side grouping of the (row, j) assignments of one call by expert (GroupByExpert), in
// the device's terms: the slot of each group's weights and the source row of each grouped row.
struct HostPlan {
  ExpertGroups groups;
  std::vector<int32_t> perm, group_slot;
  int64_t max_group_rows = 0;
  int32_t num_groups() const { return groups.groups(); }
  int64_t rows() const { return groups.rows(); }
};

void MakeHostPlan(const int32_t* ids, int64_t n, int64_t k, const std::vector<int32_t>& slot,
                  HostPlan* p) {
  ExpertGroups& g = p->groups;
  GroupByExpert(ids, n, k, static_cast<int64_t>(slot.size()), &g);
  p->group_slot.resize(g.groups());
  p->max_group_rows = 0;
  for (int32_t i = 0; i < g.groups(); ++i) {
    p->group_slot[i] = slot[g.experts[i]];
    p->max_group_rows = std::max<int64_t>(p->max_group_rows, g.begin[i + 1] - g.begin[i]);
  }
  p->perm.assign(std::max(g.rows(), 1), -1);
  for (int32_t i = 0; i < g.rows(); ++i) p->perm[i] = g.row(i, k);
}

}  // namespace

// ---------------------------------------------------------------- experts

struct CudaExpertShard::Plan {
  // Device views.
  const int32_t* perm = nullptr;
  const int32_t* where = nullptr;
  Groups groups;
  int64_t max_rows = 0;       // upper bound of the grouped rows
  const HostPlan* host = nullptr;  // set when grouped on the host
};

struct CudaExpertShard::Scratch {
  std::unique_ptr<Exec> ex;
  PinnedBuffer h_x, h_out, h_idx, h_w;
  DeviceBuffer d_x, d_act, d_y, d_out, d_idx, d_w, d_groups;
  DeviceBuffer d_counters;  // the fused combine's, zeros between launches
  HostPlan host_plan;
};

CudaExpertShard::~CudaExpertShard() {
  cudaSetDevice(device_.index);
  free_.clear();
  layers_.clear();
}

std::unique_ptr<CudaExpertShard::Scratch> CudaExpertShard::TakeScratch() const {
  std::lock_guard<std::mutex> lock(mu_);
  if (free_.empty()) return std::make_unique<Scratch>();
  auto s = std::move(free_.back());
  free_.pop_back();
  return s;
}

void CudaExpertShard::GiveScratch(std::unique_ptr<Scratch> s) const {
  std::lock_guard<std::mutex> lock(mu_);
  free_.push_back(std::move(s));
}

absl::StatusOr<std::unique_ptr<CudaExpertShard>> CudaExpertShard::Load(
    const CheckpointReader& ckpt, const ModelConfig& cfg, const ArchSpec& arch,
    const std::set<ExpertId>& shards, const LoadOptions& opt) {
  if (opt.expert_quant != LoadOptions::WeightQuant::kNone) {
    return absl::InvalidArgumentError(
        "--quantize_experts (int8, int4) is supported by CPU expert shards only; a CUDA expert "
        "shard keeps bf16 or fp32 weights");
  }
  MOEMESH_OK(CheckDevice(opt.device));
  MOEMESH_CUDA(cudaSetDevice(opt.device.index));
  UseLaunchOptions(opt);
  auto s = std::unique_ptr<CudaExpertShard>(new CudaExpertShard());
  MOEMESH_OK(s->SetShards(cfg, shards));
  s->device_ = opt.device;
  s->hidden_ = cfg.hidden_size;
  s->width_ = cfg.moe_intermediate_size;
  s->num_experts_ = cfg.num_experts;
  auto ex = Exec::Create(opt.device.index);
  if (!ex.ok()) return ex.status();
  Uploader up(ckpt, **ex, opt.compute);
  s->layers_.resize(cfg.num_hidden_layers);
  const int64_t H = s->hidden_, W = s->width_;
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    LayerWeights& L = s->layers_[l];
    L.slot.assign(cfg.num_experts, -1);
    int32_t held = 0;
    for (int64_t e = 0; e < cfg.num_experts; ++e) {
      if (s->Holds(static_cast<int32_t>(l), static_cast<int32_t>(e))) L.slot[e] = held++;
    }
    if (held == 0) continue;
    int64_t first = 0;
    while (L.slot[first] < 0) ++first;
    const WType wt = up.TypeOf(ExpertTensorsOf(cfg, arch, l, first).gate.name, false);
    for (DeviceMatrix* m : {&L.gate_up, &L.down}) {
      m->wt = wt;
      m->count = held;
    }
    L.gate_up.rows = 2 * W;
    L.gate_up.in = H;
    L.down.rows = H;
    L.down.in = W;
    MOEMESH_OK(L.gate_up.w.Reserve(static_cast<size_t>(held * 2 * W * H * WTypeSize(wt))));
    MOEMESH_OK(L.down.w.Reserve(static_cast<size_t>(held * H * W * WTypeSize(wt))));
    for (int64_t e = 0; e < cfg.num_experts; ++e) {
      const int32_t slot = L.slot[e];
      if (slot < 0) continue;
      const MlpTensors t = ExpertTensorsOf(cfg, arch, l, e);
      char* gu = static_cast<char*>(const_cast<void*>(L.gate_up.matrix(slot)));
      MOEMESH_OK(up.Rows(t.gate.name, W, H, wt, gu));
      MOEMESH_OK(up.Rows(t.up.name, W, H, wt, gu + W * H * WTypeSize(wt)));
      MOEMESH_OK(up.Rows(t.down.name, H, W, wt, const_cast<void*>(L.down.matrix(slot))));
    }
    MOEMESH_OK(L.d_slot.Reserve(L.slot.size() * sizeof(int32_t)));
    MOEMESH_CUDA(cudaMemcpy(L.d_slot.get(), L.slot.data(), L.slot.size() * sizeof(int32_t),
                            cudaMemcpyHostToDevice));
  }
  MOEMESH_OK((*ex)->Sync());
  return s;
}

absl::Status CudaExpertShard::RunGrouped(Exec& ex, Scratch& s, int32_t layer, const float* x,
                                         int64_t n, const Plan& plan, int64_t k,
                                         const float* d_weights, float* out) const {
  const LayerWeights& L = layers_[layer];
  const int64_t H = hidden_, W = width_, A = plan.max_rows;
  if (plan.host == nullptr || plan.host->max_group_rows <= kSmallM) {
    MOEMESH_OK(s.d_y.Reserve(A * H * sizeof(float)));
    float* y = s.d_y.as<float>();
    MOEMESH_OK(s.d_act.Reserve(A * W * sizeof(float)));
    float* act = s.d_act.as<float>();
    // All experts in two launches; each group's weights are streamed once per pass over its
    // rows, which gate/up reads in place (x_rows: no gathered copy).
    Groups in_place = plan.groups;
    in_place.x_rows = plan.perm;
    MOEMESH_CUDA(SmallMLinear(L.gate_up.w.get(), L.gate_up.wt, nullptr, W, H, x, A, act, W,
                              false, true, in_place, ex.stream()));
    // The combine goes with the down product (fused into it for a few tokens).
    SmallMFusion combine;
    combine.where = plan.where;
    combine.weights = d_weights;
    combine.n = static_cast<int32_t>(n);
    combine.k = static_cast<int32_t>(k);
    combine.out = out;
    MOEMESH_OK(FusionCounters(ex, s, &combine.counters));
    MOEMESH_CUDA(SmallMLinear(L.down.w.get(), L.down.wt, nullptr, H, W, act, A, y, H, false,
                              false, plan.groups, ex.stream(), SmallMChoice::kAuto, combine));
    return absl::OkStatus();
  }
  // Large groups (prefill): the batched way's padded bf16 rows go to the combine as they are.
  const HostPlan& hp = *plan.host;
  GroupedOut g;
  MOEMESH_OK(GroupedSwiGlu(ex, L.gate_up, L.down, hp.group_slot, hp.groups.begin, x, nullptr,
                           plan.perm, &g));
  if (g.padded != nullptr) {
    MOEMESH_CUDA(CombineExpertsPadded(g.padded, g.map, plan.where, d_weights, n, k, H, out,
                                      ex.stream()));
  } else {
    MOEMESH_CUDA(CombineExperts(g.y, plan.where, d_weights, n, k, H, out, ex.stream()));
  }
  return absl::OkStatus();
}

namespace {
// Uploads a host plan and the routing weights into one device buffer; fills the device views.
template <typename PlanT>
absl::Status UploadPlan(Exec& ex, const HostPlan& hp, const float* weights, int64_t nk,
                        PinnedBuffer* h_idx, DeviceBuffer* d_idx, PlanT* plan, float** d_w) {
  const int64_t G = hp.num_groups();
  const int64_t ints = static_cast<int64_t>(hp.perm.size()) + nk + G + (G + 1) + 1;
  const size_t bytes = (ints + nk) * 4;
  MOEMESH_OK(h_idx->Reserve(bytes));
  MOEMESH_OK(d_idx->Reserve(bytes));
  int32_t* h = h_idx->as<int32_t>();
  int32_t* at = h;
  auto put = [&](const int32_t* src, int64_t n) {
    std::memcpy(at, src, n * 4);
    at += n;
  };
  put(hp.perm.data(), hp.perm.size());
  put(hp.groups.where.data(), nk);
  put(hp.group_slot.data(), G);
  put(hp.groups.begin.data(), G + 1);
  *at++ = static_cast<int32_t>(G);
  std::memcpy(at, weights, nk * 4);
  MOEMESH_CUDA(cudaMemcpyAsync(d_idx->get(), h, bytes, cudaMemcpyHostToDevice, ex.stream()));
  int32_t* d = d_idx->as<int32_t>();
  plan->perm = d;
  d += hp.perm.size();
  plan->where = d;
  d += nk;
  plan->groups.slot = d;
  d += G;
  plan->groups.row_begin = d;
  d += G + 1;
  plan->groups.num_groups = d;
  d += 1;
  plan->groups.max_groups = static_cast<int32_t>(std::max<int64_t>(G, 1));
  *d_w = reinterpret_cast<float*>(d);
  plan->max_rows = static_cast<int64_t>(hp.perm.size());
  plan->host = &hp;
  return absl::OkStatus();
}
}  // namespace

absl::Status CudaExpertShard::RunExperts(int32_t layer, const float* x, int64_t n,
                                         const int32_t* ids, const float* weights, int64_t k,
                                         float* out) const {
  MOEMESH_OK(CheckRouting(layer, n, ids, k));
  if (n <= 0) return absl::OkStatus();
  auto s = TakeScratch();
  absl::Status st = [&]() -> absl::Status {
    MOEMESH_CUDA(cudaSetDevice(device_.index));
    if (s->ex == nullptr) {
      auto ex = Exec::Create(device_.index);
      if (!ex.ok()) return ex.status();
      s->ex = std::move(*ex);
    }
    Exec& ex = *s->ex;
    HostPlan& hp = s->host_plan;
    MakeHostPlan(ids, n, k, layers_[layer].slot, &hp);
    if (hp.rows() == 0) return absl::OkStatus();
    const int64_t H = hidden_;
    MOEMESH_OK(s->h_x.Reserve(n * H * sizeof(float)));
    MOEMESH_OK(s->h_out.Reserve(n * H * sizeof(float)));
    MOEMESH_OK(s->d_x.Reserve(n * H * sizeof(float)));
    MOEMESH_OK(s->d_out.Reserve(n * H * sizeof(float)));
    std::memcpy(s->h_x.as<float>(), x, n * H * sizeof(float));
    MOEMESH_CUDA(cudaMemcpyAsync(s->d_x.get(), s->h_x.get(), n * H * sizeof(float),
                                 cudaMemcpyHostToDevice, ex.stream()));
    Plan plan;
    float* d_w = nullptr;
    MOEMESH_OK(UploadPlan(ex, hp, weights, n * k, &s->h_idx, &s->d_idx, &plan, &d_w));
    MOEMESH_CUDA(cudaMemsetAsync(s->d_out.get(), 0, n * H * sizeof(float), ex.stream()));
    MOEMESH_OK(RunGrouped(ex, *s, layer, s->d_x.as<float>(), n, plan, k, d_w,
                          s->d_out.as<float>()));
    MOEMESH_CUDA(cudaMemcpyAsync(s->h_out.get(), s->d_out.get(), n * H * sizeof(float),
                                 cudaMemcpyDeviceToHost, ex.stream()));
    MOEMESH_OK(ex.Sync());
    const float* r = s->h_out.as<float>();
    for (int64_t i = 0; i < n * H; ++i) out[i] += r[i];
    return absl::OkStatus();
  }();
  GiveScratch(std::move(s));
  return st;
}

absl::Status CudaExpertShard::RunDevice(Exec& ex, int32_t layer, const float* x, int64_t n,
                                        const int32_t* ids, const float* weights, int64_t k,
                                        float* out) const {
  if (layer < 0 || layer >= static_cast<int32_t>(layers_.size())) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " out of range"));
  }
  if (n <= 0) return absl::OkStatus();
  std::lock_guard<std::mutex> lock(device_mu_);
  if (device_scratch_ == nullptr) device_scratch_ = std::make_unique<Scratch>();
  Scratch* s = device_scratch_.get();
  const LayerWeights& L = layers_[layer];
  const int64_t nk = n * k;
  Plan plan;
  if (GroupsOnDevice(n, k)) {
    // Group on the device: no host round trip in the decode loop.
    GroupArrays g;
    MOEMESH_OK(DevicePlan(*s, n, k, &plan, &g));
    MOEMESH_CUDA(BuildGroups(ids, n, k, num_experts_, L.d_slot.as<int32_t>(), g.num_groups,
                             g.slot, g.row_begin, g.perm, g.where, ex.stream()));
    return RunGrouped(ex, *s, layer, x, n, plan, k, weights, out);
  }
  // Large batches (prefill): group on the host so that big groups go to cuBLAS.
  std::vector<int32_t> h_ids(nk);
  std::vector<float> h_w(nk);
  MOEMESH_CUDA(cudaMemcpyAsync(h_ids.data(), ids, nk * 4, cudaMemcpyDeviceToHost, ex.stream()));
  MOEMESH_CUDA(cudaMemcpyAsync(h_w.data(), weights, nk * 4, cudaMemcpyDeviceToHost,
                               ex.stream()));
  MOEMESH_OK(ex.Sync());
  MOEMESH_OK(CheckRouting(layer, n, h_ids.data(), k));
  MakeHostPlan(h_ids.data(), n, k, L.slot, &s->host_plan);
  if (s->host_plan.rows() == 0) return absl::OkStatus();
  float* d_w = nullptr;
  MOEMESH_OK(UploadPlan(ex, s->host_plan, h_w.data(), nk, &s->h_idx, &s->d_idx, &plan, &d_w));
  MOEMESH_OK(RunGrouped(ex, *s, layer, x, n, plan, k, d_w, out));
  return ex.Sync();  // the pinned upload buffer is reused by the next call
}

absl::Status CudaExpertShard::DevicePlan(Scratch& s, int64_t n, int64_t k, Plan* plan,
                                         GroupArrays* out) const {
  const int64_t nk = n * k;
  MOEMESH_OK(s.d_groups.Reserve((2 * nk + 2 * num_experts_ + 2) * sizeof(int32_t)));
  int32_t* d = s.d_groups.as<int32_t>();
  out->perm = d;
  out->where = d + nk;
  out->slot = d + 2 * nk;
  out->row_begin = out->slot + num_experts_;
  out->num_groups = out->row_begin + num_experts_ + 1;
  plan->perm = out->perm;
  plan->where = out->where;
  plan->groups = Groups{out->num_groups, out->slot, out->row_begin,
                        static_cast<int32_t>(std::min<int64_t>(nk, num_experts_))};
  plan->max_rows = nk;
  return absl::OkStatus();
}

absl::Status CudaExpertShard::RunDeviceRouted(Exec& ex, int32_t layer, const float* h,
                                              int64_t n, const Router& router,
                                              const int32_t* k_per_row, int64_t kmax,
                                              bool normalize, int32_t* ids, float* weights,
                                              float* out) const {
  if (layer < 0 || layer >= static_cast<int32_t>(layers_.size())) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " out of range"));
  }
  if (n <= 0) return absl::OkStatus();
  const DeviceMatrix& rm = *router.mat;
  if (rm.has_bias || rm.rows != num_experts_) {
    return absl::InvalidArgumentError("router: one row per expert, no bias");
  }
  if (n <= kRouteMaxRows && GroupsOnDevice(n, kmax) &&
      RouteAndGroupSmem(n, num_experts_, kmax) <= 48 * 1024) {
    // A decode step: norm, router, routing and grouping in one launch (n <= 8) or two.
    std::lock_guard<std::mutex> lock(device_mu_);
    if (device_scratch_ == nullptr) device_scratch_ = std::make_unique<Scratch>();
    Scratch* s = device_scratch_.get();
    Plan plan;
    GroupArrays g;
    MOEMESH_OK(DevicePlan(*s, n, kmax, &plan, &g));
    SmallMFusion route;
    MOEMESH_OK(FusionCounters(ex, *s, &route.counters));
    route.route = RouteArgs{k_per_row, static_cast<int32_t>(kmax), normalize, ids, weights,
                            layers_[layer].d_slot.as<int32_t>(), g.num_groups, g.slot,
                            g.row_begin, g.perm, g.where};
    MOEMESH_OK(ProjectNormed(ex, rm, h, router.norm_w, router.eps, router.xn, n, router.logits,
                             rm.rows, route));
    return RunGrouped(ex, *s, layer, router.xn, n, plan, kmax, weights, out);
  }
  MOEMESH_OK(ProjectNormed(ex, rm, h, router.norm_w, router.eps, router.xn, n, router.logits,
                           rm.rows));
  MOEMESH_CUDA(TopKRouting(router.logits, n, num_experts_, k_per_row, kmax, normalize, ids,
                           weights, ex.stream()));
  return RunDevice(ex, layer, router.xn, n, ids, weights, kmax, out);
}

absl::Status CudaExpertShard::FusionCounters(Exec& ex, Scratch& s, uint32_t** counters) const {
  MOEMESH_OK(ReserveZeros(
      s.d_counters, static_cast<size_t>(std::max<int64_t>(hidden_, 1)) * sizeof(uint32_t),
      ex.stream()));
  *counters = s.d_counters.as<uint32_t>();
  return absl::OkStatus();
}

bool CudaExpertShard::GroupsOnDevice(int64_t n, int64_t k) const {
  const int64_t nk = n * k;
  // BuildGroups: one block, its counters in 48 KiB of shared memory.
  return nk <= 2048 && (4 * num_experts_ + 1 + nk) * 4 <= 48 * 1024;
}

// ---------------------------------------------------------------- KV cache

namespace {

class CudaKvCache : public KvCache {
 public:
  static constexpr int64_t kPage = 16;

  // dtype: fp32 or bf16 elements in the pool.
  CudaKvCache(int device, int64_t layers, int64_t kv_dim, int64_t capacity, KvDType dtype,
              DeviceBuffer pool, int64_t num_pages)
      : KvCache(layers, kv_dim, capacity, /*host_storage=*/false, 1, dtype),
        device_(device),
        pool_(std::move(pool)) {
    for (int64_t p = num_pages - 1; p >= 0; --p) free_pages_.push_back(static_cast<int32_t>(p));
  }

  absl::Status Reserve(uint64_t seq, int64_t length) override {
    auto it = pages_.find(seq);
    const int64_t have = it == pages_.end() ? 0 : static_cast<int64_t>(it->second.size());
    const int64_t need = (length + kPage - 1) / kPage;
    if (need - have > static_cast<int64_t>(free_pages_.size())) {
      return absl::ResourceExhaustedError(
          absl::StrCat("KV cache full: sequence needs ", length, " slots"));
    }
    absl::Status st = KvCache::Reserve(seq, length);
    if (!st.ok()) return st;
    std::vector<int32_t>& pages = pages_[seq];
    while (static_cast<int64_t>(pages.size()) < need) {
      pages.push_back(free_pages_.back());
      free_pages_.pop_back();
    }
    return absl::OkStatus();
  }

  void Free(uint64_t seq) override {
    auto it = pages_.find(seq);
    if (it != pages_.end()) {
      for (int32_t p : it->second) free_pages_.push_back(p);
      pages_.erase(it);
    }
    KvCache::Free(seq);
  }

  // Gives back the pages past the new length too.
  void Truncate(uint64_t seq, int64_t length) override {
    KvCache::Truncate(seq, length);
    auto it = pages_.find(seq);
    if (it == pages_.end()) return;
    const size_t keep = static_cast<size_t>((Reserved(seq) + kPage - 1) / kPage);
    while (it->second.size() > keep) {
      free_pages_.push_back(it->second.back());
      it->second.pop_back();
    }
  }

  bool Rename(uint64_t from, uint64_t to) override {
    if (!KvCache::Rename(from, to)) return false;
    auto node = pages_.extract(from);
    if (!node.empty()) {
      node.key() = to;
      pages_.insert(std::move(node));
    }
    return true;
  }

  // On the device, on the legacy stream, synchronously: called between steps (each of which ends
  // synchronised), never during one.
  absl::Status CopyRows(uint64_t src, uint64_t dst, int64_t begin, int64_t end) override {
    MOEMESH_OK(CheckCopy(src, dst, begin, end));
    if (begin == end) return absl::OkStatus();
    MOEMESH_CUDA(cudaSetDevice(device_));
    const std::vector<int32_t>& a = pages_.at(src);
    const std::vector<int32_t>& b = pages_.at(dst);
    std::vector<int32_t> lists(a);
    lists.insert(lists.end(), b.begin(), b.end());
    MOEMESH_OK(copy_pages_.Reserve(lists.size() * sizeof(int32_t)));
    MOEMESH_CUDA(cudaMemcpy(copy_pages_.get(), lists.data(), lists.size() * sizeof(int32_t),
                            cudaMemcpyHostToDevice));
    const int32_t* d = copy_pages_.as<int32_t>();
    MOEMESH_CUDA(cuda::CopyKvRows(pool(), KvElemBytes(dtype()), num_layers(), kPage, kv_dim(), d,
                                  d + a.size(), begin, end - begin, nullptr));
    MOEMESH_CUDA(cudaStreamSynchronize(nullptr));
    return absl::OkStatus();
  }

  const std::vector<int32_t>& Pages(uint64_t seq) const { return pages_.at(seq); }
  void* pool() const { return pool_.get(); }

 private:
  const int device_;
  DeviceBuffer pool_;
  DeviceBuffer copy_pages_;  // CopyRows' page lists
  std::vector<int32_t> free_pages_;
  std::unordered_map<uint64_t, std::vector<int32_t>> pages_;
};

}  // namespace

std::unique_ptr<KvCache> CudaAttentionStack::NewCache(int64_t capacity_tokens) const {
  cudaSetDevice(device_.index);
  const int64_t L = cfg_.num_hidden_layers, kvd = kv_dim();
  // Whole pages for every slot, plus one partial page per sequence in flight.
  const int64_t pages = (capacity_tokens + CudaKvCache::kPage - 1) / CudaKvCache::kPage + 256;
  DeviceBuffer pool;
  absl::Status st = pool.Reserve(
      static_cast<size_t>(pages * L * 2 * CudaKvCache::kPage * kvd * KvElemBytes(kv_dtype_)));
  if (!st.ok()) {
    std::fprintf(stderr, "CUDA KV cache of %lld tokens: %s; the cache will hold nothing\n",
                 static_cast<long long>(capacity_tokens), std::string(st.message()).c_str());
    return std::make_unique<CudaKvCache>(device_.index, L, kvd, 0, kv_dtype_, DeviceBuffer(), 0);
  }
  return std::make_unique<CudaKvCache>(device_.index, L, kvd, capacity_tokens, kv_dtype_,
                                       std::move(pool), pages);
}

// ---------------------------------------------------------------- attention stack

struct CudaAttentionStack::Scratch {
  PinnedBuffer h_hidden, h_idx, h_xn, h_route, h_moe, h_argmax;
  DeviceBuffer d_idx, h, xn, qkv, q, att, rl, ids, w, tmp, act, g, sel, logits, d_argmax;
  DeviceBuffer att_part;      // PagedAttention's split partials
  DeviceBuffer att_counters;  // and its fused combine's counters (zeros, left zero)
  DeviceBuffer counters;  // the fused qkv product's, one per head (zeros, left zero)
};

CudaAttentionStack::~CudaAttentionStack() {
  cudaSetDevice(device_.index);
  DropGraphs();
  scratch_.reset();
  exec_.reset();
  layers_.clear();
}

absl::StatusOr<std::unique_ptr<CudaAttentionStack>> CudaAttentionStack::Load(
    const CheckpointReader& ckpt, const ModelConfig& cfg, const ArchSpec& arch,
    const LoadOptions& opt) {
  MOEMESH_OK(CheckDevice(opt.device));
  MOEMESH_CUDA(cudaSetDevice(opt.device.index));
  if (opt.kv_dtype == KvDType::kInt8) {
    return absl::InvalidArgumentError(
        "--kv_cache_dtype=int8 is supported by the CPU attention stack only; the CUDA KV cache "
        "holds fp32 or bf16");
  }
  if (opt.attention_quant != LoadOptions::WeightQuant::kNone) {
    return absl::InvalidArgumentError(
        "--quantize_attention (int8, int4) is supported by the CPU attention stack only");
  }
  if (cfg.head_dim > 256 || cfg.head_dim % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("the CUDA attention kernel needs an even head_dim <= 256, not ", cfg.head_dim));
  }
  auto s = std::unique_ptr<CudaAttentionStack>(new CudaAttentionStack());
  s->cfg_ = cfg;
  s->arch_ = arch;
  s->device_ = opt.device;
  s->use_graphs_ = opt.cuda_graphs;
  UseLaunchOptions(opt);
  s->kv_dtype_ = opt.kv_dtype;
  auto ex = Exec::Create(opt.device.index);
  if (!ex.ok()) return ex.status();
  s->exec_ = std::move(*ex);
  s->scratch_ = std::make_unique<Scratch>();
  Uploader up(ckpt, *s->exec_, opt.compute);
  const int64_t h = cfg.hidden_size, hd = cfg.head_dim;
  const int64_t qd = cfg.num_attention_heads * hd, kvd = cfg.num_key_value_heads * hd;
  s->layers_.resize(cfg.num_hidden_layers);
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    Layer& L = s->layers_[l];
    const LayerTensors t = LayerTensorsOf(cfg, arch, l);
    MOEMESH_OK(up.Vector(t.input_norm.name, h, 1.0f, &L.input_norm));
    MOEMESH_OK(up.Vector(t.post_norm.name, h, 1.0f, &L.post_norm));
    MOEMESH_OK(up.Matrix({{t.q.name, qd, t.q_bias.name},
                          {t.k.name, kvd, t.k_bias.name},
                          {t.v.name, kvd, t.v_bias.name}},
                         h, false, &L.qkv));
    MOEMESH_OK(up.Matrix({{t.o.name, h, t.o_bias.name}}, qd, false, &L.o));
    if (!t.q_norm.name.empty()) {  // [head_dim] per head, or the whole q (k) projection
      MOEMESH_OK(up.Vector(t.q_norm.name, t.q_norm.shape[0], 1.0f, &L.q_norm));
      MOEMESH_OK(up.Vector(t.k_norm.name, t.k_norm.shape[0], 1.0f, &L.k_norm));
    }
    L.moe = cfg.IsMoeLayer(l);
    s->any_moe_ = s->any_moe_ || L.moe;
    if (L.moe) {
      MOEMESH_OK(up.Matrix({{t.router.name, cfg.num_experts, ""}}, h, true, &L.router));
    }
    // The dense MLP of a dense layer, or the shared expert of a MoE layer.
    L.has_mlp = !t.mlp.gate.name.empty();
    if (L.has_mlp) {
      const int64_t w = t.mlp.gate.shape[0];
      MOEMESH_OK(up.Matrix({{t.mlp.gate.name, w, ""}, {t.mlp.up.name, w, ""}}, h, false,
                           &L.mlp_gate_up));
      MOEMESH_OK(up.Matrix({{t.mlp.down.name, h, ""}}, w, false, &L.mlp_down));
    }
    L.has_shared_gate = !t.shared_expert_gate.name.empty();
    if (L.has_shared_gate) {
      MOEMESH_OK(up.Matrix({{t.shared_expert_gate.name, 1, ""}}, h, true, &L.shared_gate));
    }
  }
  MOEMESH_OK(up.Vector("model.norm.weight", h, 1.0f, &s->final_norm_));
  const std::string head = cfg.tie_word_embeddings || (!ckpt.dummy() && ckpt.Find("lm_head.weight") == nullptr)
                               ? "model.embed_tokens.weight"
                               : "lm_head.weight";
  MOEMESH_OK(up.Matrix({{head, cfg.vocab_size, ""}}, h, false, &s->lm_head_));
  // Rotary frequencies exactly as the CPU computes them (engine/ops/kernels_cpu.cc).
  std::vector<float> inv(hd / 2);
  for (int64_t i = 0; i < hd / 2; ++i) {
    const float e = static_cast<float>(2 * i) / static_cast<float>(hd);
    inv[i] = 1.0f / static_cast<float>(std::pow(static_cast<double>(static_cast<float>(cfg.rope_theta)),
                                                static_cast<double>(e)));
  }
  MOEMESH_OK(s->inv_freq_.Reserve(inv.size() * sizeof(float)));
  MOEMESH_CUDA(cudaMemcpy(s->inv_freq_.get(), inv.data(), inv.size() * sizeof(float),
                          cudaMemcpyHostToDevice));
  MOEMESH_OK(s->exec_->Sync());
  return s;
}

absl::Status CudaAttentionStack::Forward(const std::vector<SeqStep>& batch, float* hidden,
                                         KvCache* cache, ExpertBackend* experts,
                                         std::vector<float>* logits) const {
  return Run(batch, hidden, cache, experts, logits, nullptr);
}

absl::Status CudaAttentionStack::ForwardArgMax(const std::vector<SeqStep>& batch, float* hidden,
                                               KvCache* cache, ExpertBackend* experts,
                                               std::vector<int32_t>* ids) const {
  return Run(batch, hidden, cache, experts, nullptr, ids);
}

absl::Status CudaAttentionStack::Run(const std::vector<SeqStep>& batch, float* hidden,
                                     KvCache* cache, ExpertBackend* experts,
                                     std::vector<float>* logits, std::vector<int32_t>* ids) const {
  auto* kv = dynamic_cast<CudaKvCache*>(cache);
  if (kv == nullptr) {
    return absl::InvalidArgumentError("the CUDA attention stack needs a cache from its NewCache()");
  }
  std::lock_guard<std::mutex> lock(mu_);
  absl::Status status = RunLocked(batch, hidden, cache, experts, logits, ids);
  // A step that failed midway may have copies from the pinned buffers still queued: let them
  // finish before the next step refills those buffers.
  if (!status.ok()) exec_->Sync().IgnoreError();
  return status;
}

absl::Status CudaAttentionStack::RunLocked(const std::vector<SeqStep>& batch, float* hidden,
                                           KvCache* cache, ExpertBackend* experts,
                                           std::vector<float>* logits,
                                           std::vector<int32_t>* ids) const {
  auto* kv = static_cast<CudaKvCache*>(cache);
  int64_t T = 0, kmax = 1, R = 0;
  std::vector<int64_t> offset;
  MOEMESH_OK(PlanBatch(batch, *kv, &offset, &T, &kmax, &R));
  MOEMESH_CUDA(cudaSetDevice(device_.index));
  Exec& ex = *exec_;
  Scratch& s = *scratch_;
  cudaStream_t st = ex.stream();
  const int64_t H = cfg_.hidden_size, hd = cfg_.head_dim, nh = cfg_.num_attention_heads,
                nkv = cfg_.num_key_value_heads, qd = nh * hd, kvd = nkv * hd,
                qkvd = qd + 2 * kvd, E = cfg_.num_experts, V = cfg_.vocab_size;

  // Per-token indices, one upload: [pos T][page_off T][k T][sel R][pages P].
  int64_t P = 0;
  for (const SeqStep& b : batch) P += static_cast<int64_t>(kv->Pages(b.seq_id).size());
  const int64_t n_idx = 3 * T + R + P;
  MOEMESH_OK(s.h_idx.Reserve(n_idx * 4));
  // Grown in powers of two: the page lists lengthen every kPage tokens, and each move of the
  // buffer drops the captured graphs.
  size_t idx_bytes = 1024;
  while (idx_bytes < static_cast<size_t>(n_idx) * 4) idx_bytes *= 2;
  MOEMESH_OK(s.d_idx.Reserve(idx_bytes));
  int32_t* hi = s.h_idx.as<int32_t>();
  int32_t* h_pos = hi;
  int32_t* h_off = hi + T;
  int32_t* h_k = hi + 2 * T;
  int32_t* h_sel = hi + 3 * T;
  int32_t* h_pages = hi + 3 * T + R;
  int64_t pp = 0, r = 0;
  for (size_t b = 0; b < batch.size(); ++b) {
    const SeqStep& sq = batch[b];
    const std::vector<int32_t>& pages = kv->Pages(sq.seq_id);
    const int64_t n = static_cast<int64_t>(sq.tokens.size());
    const int64_t k = sq.experts_per_token > 0 ? sq.experts_per_token : cfg_.num_experts_per_tok;
    for (int64_t i = 0; i < n; ++i) {
      h_pos[offset[b] + i] = static_cast<int32_t>(sq.start_pos + i);
      h_off[offset[b] + i] = static_cast<int32_t>(pp);
      h_k[offset[b] + i] = static_cast<int32_t>(k);
    }
    for (int64_t i = sq.all_logits ? 0 : n - 1; i < n; ++i) h_sel[r++] = static_cast<int32_t>(offset[b] + i);
    std::memcpy(h_pages + pp, pages.data(), pages.size() * 4);
    pp += static_cast<int64_t>(pages.size());
  }
  MOEMESH_CUDA(cudaMemcpyAsync(s.d_idx.get(), hi, n_idx * 4, cudaMemcpyHostToDevice, st));
  const int32_t* d_pos = s.d_idx.as<int32_t>();
  const int32_t* d_off = d_pos + T;
  const int32_t* d_k = d_pos + 2 * T;
  const int32_t* d_sel = d_pos + 3 * T;
  const int32_t* d_pages = d_pos + 3 * T + R;

  MOEMESH_OK(s.h_hidden.Reserve(T * H * 4));
  std::memcpy(s.h_hidden.get(), hidden, T * H * 4);
  MOEMESH_OK(s.h.Reserve(T * H * 4));
  MOEMESH_OK(s.xn.Reserve(T * H * 4));
  MOEMESH_OK(s.qkv.Reserve(T * qkvd * 4));
  MOEMESH_OK(s.q.Reserve(T * qd * 4));
  MOEMESH_OK(s.att.Reserve(T * qd * 4));
  MOEMESH_OK(s.rl.Reserve(T * std::max<int64_t>(E, 1) * 4));
  MOEMESH_OK(s.ids.Reserve(T * kmax * 4));
  MOEMESH_OK(s.w.Reserve(T * kmax * 4));
  MOEMESH_OK(s.tmp.Reserve(T * H * 4));
  MOEMESH_OK(s.g.Reserve(T * 4));
  MOEMESH_OK(ReserveZeros(
      s.counters,
      static_cast<size_t>(cfg_.num_attention_heads + 2 * cfg_.num_key_value_heads) *
          sizeof(uint32_t),
      st));
  MOEMESH_CUDA(cudaMemcpyAsync(s.h.get(), s.h_hidden.get(), T * H * 4, cudaMemcpyHostToDevice,
                               st));

  // Long contexts split each (token, head)'s attention over several blocks (flash-decoding).
  int64_t max_context = 0;
  for (const SeqStep& b : batch) {
    max_context = std::max<int64_t>(max_context,
                                    b.start_pos + static_cast<int64_t>(b.tokens.size()));
  }
  StepArgs a;
  a.splits = AttentionSplits(T, nh, max_context);
  if (a.splits > 1) {
    MOEMESH_OK(s.att_part.Reserve(T * nh * a.splits * (hd + 2) * 4));
    MOEMESH_OK(ReserveZeros(s.att_counters, T * nh * sizeof(uint32_t), st));
  }
  a.tokens = T;
  a.rows = R;
  a.kmax = kmax;
  a.d_k = d_k;
  a.d_sel = d_sel;
  a.kv.pool = kv->pool();
  a.kv.bf16 = kv->dtype() == KvDType::kBF16;
  a.kv.page_size = CudaKvCache::kPage;
  a.kv.num_layers = cfg_.num_hidden_layers;
  a.kv.kv_dim = kvd;
  a.kv.pages = d_pages;
  a.kv.page_off = d_off;
  a.kv.pos = d_pos;
  a.experts = experts;
  const ExpertShard* local = experts->local_shard();
  a.same_gpu = local != nullptr && local->device() == device_
                   ? static_cast<const CudaExpertShard*>(local)
                   : nullptr;
  // Graphs for decode steps whose experts need no host round trip.
  const bool graph = use_graphs_ && !graphs_failed_ && T == static_cast<int64_t>(batch.size()) &&
                     (!any_moe_ || (a.same_gpu != nullptr && a.same_gpu->GroupsOnDevice(T, kmax)));
  if (ids != nullptr) {
    // Only the rows' argmax leaves the GPU. Buffers sized in steps of 256 rows, and before the
    // step is enqueued: a device buffer that grows drops the captured graphs.
    MOEMESH_OK(s.d_argmax.Reserve((R + 255) / 256 * 256 * 4));
    MOEMESH_OK(s.h_argmax.Reserve(R * 4));
  }
  MOEMESH_OK(graph ? EnqueueStepGraph(a) : EnqueueStep(a));
  if (ids != nullptr) {
    MOEMESH_CUDA(ArgMaxRows(s.logits.as<float>(), R, V, s.d_argmax.as<int32_t>(), st));
    MOEMESH_CUDA(cudaMemcpyAsync(s.h_argmax.get(), s.d_argmax.get(), R * 4,
                                 cudaMemcpyDeviceToHost, st));
    MOEMESH_OK(ex.Sync());
    ids->assign(s.h_argmax.as<int32_t>(), s.h_argmax.as<int32_t>() + R);
    return absl::OkStatus();
  }
  logits->resize(R * V);
  MOEMESH_CUDA(cudaMemcpyAsync(logits->data(), s.logits.get(), R * V * 4, cudaMemcpyDeviceToHost, st));
  return ex.Sync();
}

absl::Status CudaAttentionStack::EnqueueStep(const StepArgs& a) const {
  Exec& ex = *exec_;
  Scratch& s = *scratch_;
  cudaStream_t st = ex.stream();
  const int64_t T = a.tokens, R = a.rows, kmax = a.kmax;
  const int64_t H = cfg_.hidden_size, hd = cfg_.head_dim, nh = cfg_.num_attention_heads,
                nkv = cfg_.num_key_value_heads, qd = nh * hd, kvd = nkv * hd,
                qkvd = qd + 2 * kvd, E = cfg_.num_experts, V = cfg_.vocab_size;
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  float* d_h = s.h.as<float>();
  float* d_xn = s.xn.as<float>();
  const PagedKv& pk = a.kv;
  const int qk_mode = arch_.qk_norm == QkNorm::kNone ? 0 : arch_.qk_norm == QkNorm::kPerHead ? 1 : 2;
  const float clip = cfg_.clip_qkv.has_value() ? static_cast<float>(*cfg_.clip_qkv) : 0.0f;

  for (size_t l = 0; l < layers_.size(); ++l) {
    const Layer& L = layers_[l];
    // Norm, qkv and (up to 8 tokens, no whole-projection q/k norm) the q/k norm, RoPE and KV
    // write in one launch.
    SmallMFusion prep;
    prep.counters = s.counters.as<uint32_t>();
    prep.qkv = QkvArgs{static_cast<int32_t>(nh), static_cast<int32_t>(nkv),
                       static_cast<int32_t>(hd), clip, qk_mode, L.q_norm.as<float>(),
                       L.k_norm.as<float>(), eps, inv_freq_.as<float>(),
                       static_cast<int64_t>(l), pk, s.q.as<float>()};
    MOEMESH_OK(ProjectNormed(ex, L.qkv, d_h, L.input_norm.as<float>(), eps, d_xn, T,
                             s.qkv.as<float>(), qkvd, prep));
    MOEMESH_CUDA(PagedAttention(s.q.as<float>(), T, nh, nkv, hd, static_cast<int64_t>(l), pk,
                                s.att.as<float>(), st, a.splits, s.att_part.as<float>(),
                                s.att_counters.as<uint32_t>()));
    MOEMESH_OK(Project(ex, L.o, 0, s.att.as<float>(), T, d_h, H, true, false));

    if (!L.moe) MOEMESH_CUDA(RmsNorm(d_h, L.post_norm.as<float>(), T, H, eps, d_xn, st));
    if (L.moe) {
      // The router's product writes xn for the experts (and a shared MLP).
      if (a.same_gpu != nullptr) {
        const CudaExpertShard::Router router{&L.router, L.post_norm.as<float>(), eps, d_xn,
                                             s.rl.as<float>()};
        MOEMESH_OK(a.same_gpu->RunDeviceRouted(ex, static_cast<int32_t>(l), d_h, T, router,
                                               a.d_k, kmax, arch_.norm_topk_prob,
                                               s.ids.as<int32_t>(), s.w.as<float>(), d_h));
      } else {
        MOEMESH_OK(ProjectNormed(ex, L.router, d_h, L.post_norm.as<float>(), eps, d_xn, T,
                                 s.rl.as<float>(), E));
        MOEMESH_CUDA(TopKRouting(s.rl.as<float>(), T, E, a.d_k, kmax, arch_.norm_topk_prob,
                                 s.ids.as<int32_t>(), s.w.as<float>(), st));
        // Experts elsewhere (other processes, the CPU, another GPU): through host memory.
        MOEMESH_OK(s.h_xn.Reserve(T * H * 4));
        MOEMESH_OK(s.h_route.Reserve(T * kmax * 8));
        MOEMESH_OK(s.h_moe.Reserve(T * H * 4));
        int32_t* h_ids = s.h_route.as<int32_t>();
        float* h_w = reinterpret_cast<float*>(h_ids + T * kmax);
        MOEMESH_CUDA(cudaMemcpyAsync(s.h_xn.get(), d_xn, T * H * 4, cudaMemcpyDeviceToHost, st));
        MOEMESH_CUDA(cudaMemcpyAsync(h_ids, s.ids.get(), T * kmax * 4, cudaMemcpyDeviceToHost, st));
        MOEMESH_CUDA(cudaMemcpyAsync(h_w, s.w.get(), T * kmax * 4, cudaMemcpyDeviceToHost, st));
        MOEMESH_OK(ex.Sync());
        float* moe = s.h_moe.as<float>();
        std::fill(moe, moe + T * H, 0.0f);
        MOEMESH_OK(a.experts->RunExperts(static_cast<int32_t>(l), s.h_xn.as<float>(), T, h_ids,
                                         h_w, kmax, moe));
        MOEMESH_CUDA(cudaMemcpyAsync(s.tmp.get(), moe, T * H * 4, cudaMemcpyHostToDevice, st));
        MOEMESH_CUDA(AddInto(d_h, s.tmp.as<float>(), T * H, st));
      }
    }
    if (L.has_mlp) {
      const int64_t w = L.mlp_down.in;
      MOEMESH_OK(s.act.Reserve(T * w * 4));
      MOEMESH_OK(Project(ex, L.mlp_gate_up, 0, d_xn, T, s.act.as<float>(), w, false, true));
      if (L.has_shared_gate) {
        MOEMESH_OK(Project(ex, L.mlp_down, 0, s.act.as<float>(), T, s.tmp.as<float>(), H, false,
                           false));
        MOEMESH_OK(Project(ex, L.shared_gate, 0, d_xn, T, s.g.as<float>(), 1, false, false));
        MOEMESH_CUDA(ScaleRowsBySigmoid(s.tmp.as<float>(), s.g.as<float>(), T, H, st));
        MOEMESH_CUDA(AddInto(d_h, s.tmp.as<float>(), T * H, st));
      } else {
        MOEMESH_OK(Project(ex, L.mlp_down, 0, s.act.as<float>(), T, d_h, H, true, false));
      }
    }
  }

  MOEMESH_OK(s.sel.Reserve(R * H * 4));
  MOEMESH_OK(s.logits.Reserve(R * V * 4));
  MOEMESH_CUDA(GatherRows(d_h, a.d_sel, R, H, s.sel.as<float>(), st));
  // R <= T rows: xn has room for the normalized rows.
  return ProjectNormed(ex, lm_head_, s.sel.as<float>(), final_norm_.as<float>(), eps, d_xn, R,
                       s.logits.as<float>(), V);
}

void CudaAttentionStack::DropGraphs() const {
  for (auto& [key, g] : graphs_) {
    if (g.exec != nullptr) cudaGraphExecDestroy(g.exec);
  }
  graphs_.clear();
}

absl::Status CudaAttentionStack::EnqueueStepGraph(const StepArgs& a) const {
  constexpr size_t kMaxGraphs = 256;  // distinct batch shapes kept
  const uint64_t epoch = DeviceBuffer::Epoch();
  if (epoch != graphs_epoch_) {
    // Some device buffer moved: every graph may point at freed memory.
    DropGraphs();
    graphs_epoch_ = epoch;
  }
  const GraphKey key{a.tokens, a.rows, a.kmax, a.kv.pool, a.same_gpu, a.splits};
  auto it = graphs_.find(key);
  if (it == graphs_.end()) {
    if (graphs_.size() >= kMaxGraphs) return EnqueueStep(a);
    it = graphs_.emplace(key, StepGraph()).first;
  }
  StepGraph& g = it->second;
  cudaStream_t st = exec_->stream();
  if (g.exec != nullptr) {
    MOEMESH_CUDA(cudaGraphLaunch(g.exec, st));
    graphs_replayed.fetch_add(1);
    return absl::OkStatus();
  }
  if (!g.warm) {
    // First step of this shape: run it as is; its buffers grow to their size for the shape.
    MOEMESH_OK(EnqueueStep(a));
    g.warm = DeviceBuffer::Epoch() == epoch;
    return absl::OkStatus();
  }
  // Capture (nothing runs while capturing), instantiate, then launch.
  MOEMESH_CUDA(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
  const absl::Status queued = EnqueueStep(a);
  cudaGraph_t graph = nullptr;
  const cudaError_t ended = cudaStreamEndCapture(st, &graph);
  cudaGraphExec_t exec = nullptr;
  cudaError_t made = cudaErrorUnknown;
  const bool moved = DeviceBuffer::Epoch() != epoch;
  if (queued.ok() && ended == cudaSuccess && graph != nullptr && !moved) {
    made = cudaGraphInstantiate(&exec, graph, 0);
  }
  if (graph != nullptr) cudaGraphDestroy(graph);
  if (made != cudaSuccess || exec == nullptr) {
    cudaGetLastError();  // the capture's error is not kept
    if (exec != nullptr) cudaGraphExecDestroy(exec);
    if (moved && queued.ok() && ended == cudaSuccess) {
      g.warm = false;  // another thread allocated meanwhile: try again later
    } else {
      graphs_failed_ = true;
      std::fprintf(stderr,
                   "CUDA graphs off for this model: capturing a decode step failed (%s; %s; %s)\n",
                   std::string(queued.message()).c_str(), cudaGetErrorString(ended),
                   cudaGetErrorString(made));
    }
    return EnqueueStep(a);
  }
  g.exec = exec;
  graphs_captured.fetch_add(1);
  MOEMESH_CUDA(cudaGraphLaunch(g.exec, st));
  graphs_replayed.fetch_add(1);
  return absl::OkStatus();
}

// ---------------------------------------------------------------- registration

int DeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

void RegisterCudaBackend() {
  DeviceBackend b;
  b.load_attention = [](const CheckpointReader& ckpt, const ModelConfig& cfg,
                        const ArchSpec& arch,
                        const LoadOptions& opt) -> absl::StatusOr<std::unique_ptr<AttentionStack>> {
    auto s = CudaAttentionStack::Load(ckpt, cfg, arch, opt);
    if (!s.ok()) return s.status();
    return std::unique_ptr<AttentionStack>(std::move(*s));
  };
  b.load_experts = [](const CheckpointReader& ckpt, const ModelConfig& cfg, const ArchSpec& arch,
                      const std::set<ExpertId>& shards,
                      const LoadOptions& opt) -> absl::StatusOr<std::unique_ptr<ExpertShard>> {
    auto s = CudaExpertShard::Load(ckpt, cfg, arch, shards, opt);
    if (!s.ok()) return s.status();
    return std::unique_ptr<ExpertShard>(std::move(*s));
  };
  b.describe = [](const Device& d) -> absl::StatusOr<std::string> {
    MOEMESH_OK(CheckDevice(d));
    cudaDeviceProp prop;
    MOEMESH_CUDA(cudaGetDeviceProperties(&prop, d.index));
    return absl::StrCat(d.ToString(), " (", prop.name, ")");
  };
  b.report = []() {
    const GraphCounts c = StepGraphCounts();
    return absl::StrCat("CUDA graphs: ", c.captured, " captured, ", c.replayed,
                        " decode steps replayed; programmatic dependent launch ",
                        ProgrammaticLaunch() ? "on" : "off", "; deep weight loads ",
                        DeepLoads() ? "on" : "off");
  };
  RegisterDeviceBackend(Device::Kind::kCuda, std::move(b));
}

}  // namespace cuda
}  // namespace moemesh
