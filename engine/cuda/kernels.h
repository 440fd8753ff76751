// CUDA kernels of the engine's device path, behind plain launch functions (no CUDA syntax here,
// so gcc-compiled code can call them). Every pointer is device memory unless said otherwise;
// every function launches on `stream` and returns cudaGetLastError() (launch errors only;
// execution errors surface at the next synchronisation).
//
// Layouts match the CPU engine: row-major activations in fp32, weights in PyTorch nn.Linear
// layout [out, in] in fp32 or bf16.
#ifndef MOEMESH_ENGINE_CUDA_KERNELS_H_
#define MOEMESH_ENGINE_CUDA_KERNELS_H_

#include <cstdint>

#include <cuda_runtime_api.h>

namespace moemesh {
namespace cuda {

enum class WType { kF32, kBF16 };
inline int64_t WTypeSize(WType t) { return t == WType::kF32 ? 4 : 2; }

// Groups of rows that share one weight matrix (the routed experts of a MoE layer; one group for
// a dense projection). Group g multiplies rows [row_begin[g], row_begin[g+1]) of x by the
// matrix at w + slot[g] * out * in. Either all pointers are device arrays (num_groups read on
// the device, so routing needs no host round trip) or all null (one group: all m rows, slot 0).
struct Groups {
  const int32_t* num_groups = nullptr;  // [1]
  const int32_t* slot = nullptr;        // [max_groups]
  const int32_t* row_begin = nullptr;   // [max_groups + 1]
  int32_t max_groups = 1;               // grid size; groups beyond *num_groups do nothing
  // Row r of the product's input is row x_rows[r] of the x given (device [m]; null: row r), so
  // routed rows are read in place rather than gathered first. SmallMLinear only.
  const int32_t* x_rows = nullptr;
};

// Small-batch projection, weights streamed once per pass over up to 8 rows of x:
//   y[r, o] (+)= sum_i x[r, i] * W[o, i] (+ bias[o])
// With `swiglu`, W is a fused [2 * out, in] gate/up matrix and y[r, o] = silu(g) * u, where
// g, u are rows o and out + o. x: [m, in], y: [m, out] (row stride `ldy`, >= out).
// Kernels: kOne, a warp per output row, one x row at a time up to m = 8 (the decode of one
// sequence; when that gives too few warps for the GPU, each sum is split over 2 or 4 warps and
// the partial sums added in order), 8 rows per pass above; kMulti, a warp per 4 output rows (2
// with SwiGLU) sharing each x load among them (several rows per matrix: batched decode), 4 x
// rows per pass while the groups average at most 4 rows, 8 above. kAuto:
// kMulti when there are >= 2 rows per group on average (or m > 8 without groups). kMulti and the
// 8-row kOne add in the same order (same results bit for bit). The vector kernels need in % 8 == 0
// and 16-byte aligned w and x; otherwise a scalar variant of kOne runs. For benchmarks: kSplitN,
// kOne's one-row kernel with each sum split over exactly N warps where kOne would run it (m <= 8,
// vector loads), kOne otherwise; kMultiDeep, kMulti with two steps of weight loads in flight per
// lane instead of one (bf16 weights; fp32 as kMulti), the same sums; kOneDeep, kOne's split
// kernel (at kOne's split, 1 included) issuing 4 steps' weight loads (SwiGLU: 2) before it uses
// them, rather than leaving that to the compiler (bf16 weights, no fused norm or tail; otherwise
// as kOne), the same sums as the split kernel; kMulti8, kMulti with 8 x rows per pass whatever
// the mean (fewer passes over the weights of groups above 4 rows; more registers), the same sums.
enum class SmallMChoice {
  kAuto, kOne, kMulti, kSplit1, kSplit2, kSplit4, kSplit8, kMultiDeep, kOneDeep, kMulti8
};

// Programmatic dependent launch (Hopper's griddepcontrol), process-wide, off by default
// (LoadOptions::cuda_pdl turns it on). While on, the kernels of a decode step (the small-batch
// products, RmsNorm, PrepareQkv, PagedAttention and its combine, RouteAndGroup, GatherRows,
// CombineExperts, ArgMaxRows) are launched with cudaLaunchAttributeProgrammaticStreamSerialization:
// each may be scheduled once every block of the kernel before it has started, and waits
// (griddepcontrol.wait) for that kernel's completion before it touches memory. Products of one
// matrix first ask L2 for their weights, so the fetch overlaps the previous kernel's end. The
// results are the same bits either way. Also in captured CUDA graphs (programmatic edges).
void SetProgrammaticLaunch(bool on);
bool ProgrammaticLaunch();

// Deep weight loads, process-wide, off by default (LoadOptions::cuda_deep_loads turns it on):
// SmallMChoice::kAuto then runs kOneDeep where it would run kOne's one-row kernel on a plain
// product (bf16, no fused norm or tail) and kMultiDeep where it would run kMulti. The same
// results bit for bit.
void SetDeepLoads(bool on);
bool DeepLoads();

// The warps each output's sum is split over in kOne's one-row kernel (kAuto, kOne) for a product
// of `out` outputs in `groups` groups (1 without): doubled up to 4 while the product has fewer
// than 2 warps' worth of outputs per SM slot of this GPU.
int SmallMSplit(int64_t out, int64_t groups);

// Per-token attention input preparation. qkv: [T, q_dim + 2 kv_dim] (after bias). For token t
// at position pos[t]: clip (clip > 0), q/k norm (mode 0 none, 1 per head, 2 over the whole
// projection; weights q_norm, k_norm), rotary embedding (inv_freq: [head_dim / 2]), then
// q -> q_out[t], and k, v into the paged cache: page row_pages[t][pos / page_size],
// slot pos % page_size, where row_pages[t] = pages + page_off[t].
// Cache layout: [page][layer][2 (k, v)][page_size][kv_dim] fp32.
struct PagedKv {
  void* pool = nullptr;  // fp32 elements, or bf16 ones (bit patterns) with `bf16`
  bool bf16 = false;
  int64_t page_size = 16;
  int64_t num_layers = 0;
  int64_t kv_dim = 0;
  const int32_t* pages = nullptr;     // flat page lists of the batch's sequences
  const int32_t* page_off = nullptr;  // [T] start of token t's sequence's list in `pages`
  const int32_t* pos = nullptr;       // [T] position of token t
};

// PrepareQkv's arguments other than qkv and the token count.
struct QkvArgs {
  int32_t heads = 0, kv_heads = 0, head_dim = 0;
  float clip = 0.0f;
  int32_t mode = 0;  // qk_norm_mode
  const float* q_norm = nullptr;
  const float* k_norm = nullptr;
  float eps = 0.0f;
  const float* inv_freq = nullptr;
  int64_t layer = 0;
  PagedKv kv;
  float* q_out = nullptr;  // null: none
};

// RouteAndGroup's arguments other than the logits (see there).
struct RouteArgs {
  const int32_t* k_per_row = nullptr;
  int32_t kmax = 0;
  bool normalize = false;
  int32_t* ids = nullptr;  // null: no routing
  float* weights = nullptr;
  const int32_t* slot_of_expert = nullptr;
  int32_t* num_groups = nullptr;
  int32_t* group_slot = nullptr;
  int32_t* row_begin = nullptr;
  int32_t* perm = nullptr;
  int32_t* where = nullptr;
};

// What a small-batch product can take in with it, so that a decode step launches fewer kernels
// (each optional; the norm goes with the routing, not with the combine).
// - RMSNorm of the input (norm_w set; no groups, no SwiGLU): the product multiplies
//   RmsNorm(x, norm_w, eps) rather than x, and that normalized x is written to xn ([m, in], not
//   x's memory). In the one-row kernels (m <= 8, vector loads) each warp sums its row's squares
//   as it streams the weights and scales its sum by the row's rsqrt(mean(x^2) + eps): the norm's
//   value up to rounding; block 0 writes xn. Otherwise RmsNorm runs first, into xn.
// - The MoE combine of the product's output (out set; no SwiGLU; y's row stride = out):
//   CombineExperts(y, where, weights, n, k, out dim, out), the same sums bit for bit. In kOne's
//   kernels, for n <= 8, the last warp to finish each column of blocks adds its outputs (the
//   blocks count themselves in `counters`: device [out dim] zeros, left zero); otherwise a
//   separate launch.
// - The routing of the product's output logits (route.ids set; no groups, no SwiGLU; y's row
//   stride = out): RouteAndGroup(y, m, out, route...), the same results bit for bit. In the
//   one-row kernel with split sums (a router's shape), for m <= 8, by the grid's last block
//   (counted in counters[0]: a device zero, left zero); otherwise a separate launch.
// - PrepareQkv of the product's output (qkv.q_out set; no groups, no SwiGLU; y's row stride =
//   out): the q/k norm, RoPE, q rows and the KV cache's rows of the m tokens, the same bits as
//   PrepareQkv(y, m, qkv...). In the one-row kernel with split sums (the qkv projection's shape
//   on a GPU of many SMs), for m <= 8 and a per-head q/k norm or none, by the last block to
//   finish each head's outputs, token by token (counters: device [heads + 2 kv_heads] zeros,
//   left zero); otherwise a separate launch. Goes with the norm.
struct SmallMFusion {
  const float* norm_w = nullptr;  // [in]
  float eps = 0.0f;
  float* xn = nullptr;  // [m, in]
  const int32_t* where = nullptr;  // [n * k]
  const float* weights = nullptr;  // [n * k]
  int32_t n = 0, k = 0;
  float* out = nullptr;  // [n, out dim]
  uint32_t* counters = nullptr;
  RouteArgs route;
  QkvArgs qkv;
};
constexpr int64_t kFusedCombineRows = 8;

cudaError_t SmallMLinear(const void* w, WType wt, const float* bias, int64_t out, int64_t in,
                         const float* x, int64_t m, float* y, int64_t ldy, bool accumulate,
                         bool swiglu, const Groups& groups, cudaStream_t stream,
                         SmallMChoice kernel = SmallMChoice::kAuto,
                         const SmallMFusion& fusion = SmallMFusion());

// The kernels of a fusion's combine, routing or qkv preparation (not its norm) on a product's
// output y ([m, out]) that was computed without them: SmallMLinear's separate launch, for
// products computed some other way (cuBLAS).
cudaError_t FusionTail(const float* y, int64_t m, int64_t out, const SmallMFusion& fusion,
                       cudaStream_t stream);

// y[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * w, rows of `dim`; y may equal x.
cudaError_t RmsNorm(const float* x, const float* w, int64_t rows, int64_t dim, float eps,
                    float* y, cudaStream_t stream);

// PrepareQkv: see PagedKv above.
cudaError_t PrepareQkv(const float* qkv, int64_t tokens, int64_t heads, int64_t kv_heads,
                       int64_t head_dim, float clip, int qk_norm_mode, const float* q_norm,
                       const float* k_norm, float eps, const float* inv_freq, int64_t layer,
                       const PagedKv& kv, float* q_out, cudaStream_t stream);

// Copies positions [begin, begin + n) of every layer's K and V rows in the paged pool (the
// layout of PagedKv: page p's block for (layer, K or V) holds page_size rows of kv_dim elements
// of elem_bytes, 4 or 2)
// from the sequence whose pages are src_pages to the one whose pages are dst_pages (device
// arrays, covering those positions). The prefix cache's copy on a GPU.
cudaError_t CopyKvRows(void* pool, int64_t elem_bytes, int64_t num_layers, int64_t page_size,
                       int64_t kv_dim, const int32_t* src_pages, const int32_t* dst_pages,
                       int64_t begin, int64_t n, cudaStream_t stream);

// Causal attention of each token's query over its sequence's cached positions [0, pos[t]],
// one pass over the cache with an online softmax. q: [T, heads * head_dim], out likewise.
// With splits > 1 (flash-decoding), each (token, head) is split over that many blocks, each
// taking an equal share of the positions, and their partial softmaxes are combined (partial:
// device scratch of tokens * heads * splits * (head_dim + 2) floats): a decode step of one
// sequence has only `heads` blocks otherwise, each reading its whole context. The combine is a
// second kernel, or with `counters` (device [tokens * heads] zeros, left zero) the last of each
// (token, head)'s blocks to finish: the same values bit for bit.
cudaError_t PagedAttention(const float* q, int64_t tokens, int64_t heads, int64_t kv_heads,
                           int64_t head_dim, int64_t layer, const PagedKv& kv, float* out,
                           cudaStream_t stream, int splits = 1, float* partial = nullptr,
                           uint32_t* counters = nullptr);

// Splits for PagedAttention, a power of 2 up to 16: doubled while the tokens * heads * splits
// blocks would fill each multiprocessor at most twice and every split keeps at least
// kAttentionSplitRows positions of the step's longest context.
constexpr int64_t kAttentionSplitRows = 32;
int AttentionSplits(int64_t tokens, int64_t heads, int64_t max_context);

// Per row: softmax over `experts` logits, the top k (ties to the lower index), renormalised to
// sum 1 when `normalize`. k[r] may vary per row (k_per_row, device [rows]) up to kmax; slots
// j >= k[r] get id -1 and weight 0. ids/weights: [rows, kmax].
cudaError_t TopKRouting(const float* logits, int64_t rows, int64_t experts,
                        const int32_t* k_per_row, int64_t kmax, bool normalize, int32_t* ids,
                        float* weights, cudaStream_t stream);

// Groups the (row, j) assignments of ids [n, k] by expert (ascending; rows ascending within an
// expert), for the experts whose `slot_of_expert[e]` >= 0 (others must not be routed to).
// Outputs: num_groups, group_slot [<= experts], row_begin [<= experts + 1], perm [n * k]
// (source row of each grouped row), where [n * k] (grouped row of assignment (r, j), -1 for
// id -1). One block: for n * k up to a few thousand.
cudaError_t BuildGroups(const int32_t* ids, int64_t n, int64_t k, int64_t experts,
                        const int32_t* slot_of_expert, int32_t* num_groups, int32_t* group_slot,
                        int32_t* row_begin, int32_t* perm, int32_t* where, cudaStream_t stream);

// TopKRouting then BuildGroups (ids [rows, kmax]) in one launch, for decode-sized steps:
// rows <= kRouteMaxRows and RouteAndGroupSmem(rows, experts, kmax) <= 48 KiB (else
// cudaErrorInvalidValue). Same outputs as the two calls.
constexpr int64_t kRouteMaxRows = 32;
inline size_t RouteAndGroupSmem(int64_t rows, int64_t experts, int64_t kmax) {
  return static_cast<size_t>(rows * experts) * sizeof(float) +
         static_cast<size_t>(4 * experts + 1 + rows * kmax) * sizeof(int32_t);
}
cudaError_t RouteAndGroup(const float* logits, int64_t rows, int64_t experts,
                          const int32_t* k_per_row, int64_t kmax, bool normalize, int32_t* ids,
                          float* weights, const int32_t* slot_of_expert, int32_t* num_groups,
                          int32_t* group_slot, int32_t* row_begin, int32_t* perm, int32_t* where,
                          cudaStream_t stream);

// dst[i, :] = src[perm[i], :], i < rows.
cudaError_t GatherRows(const float* src, const int32_t* perm, int64_t rows, int64_t dim,
                       float* dst, cudaStream_t stream);

// out[r, :] += sum_j weights[r, j] * y[where[r, j], :] (j ascending; where -1 skipped).
cudaError_t CombineExperts(const float* y, const int32_t* where, const float* weights, int64_t n,
                           int64_t k, int64_t dim, float* out, cudaStream_t stream);

// y[r, :] = y[r, :] * sigmoid(g[r]) (qwen2_moe's shared-expert gate).
cudaError_t ScaleRowsBySigmoid(float* y, const float* g, int64_t rows, int64_t dim,
                               cudaStream_t stream);

// y[r, o] += bias[o], rows of `out` at stride ldy.
cudaError_t AddBias(float* y, const float* bias, int64_t rows, int64_t out, int64_t ldy,
                    cudaStream_t stream);

// dst += src (n elements).
cudaError_t AddInto(float* dst, const float* src, int64_t n, cudaStream_t stream);

// act[r, o] = silu(gu[r, o]) * gu[r, width + o]; gu: [rows, 2 * width]. Output fp32 or bf16.
cudaError_t SiluMul(const float* gu, int64_t rows, int64_t width, void* act, WType act_type,
                    cudaStream_t stream);

// The same with bf16 in and out (gu: [rows, 2 * width] bf16, act: [rows, width] bf16).
cudaError_t SiluMulBf16(const void* gu, int64_t rows, int64_t width, void* act,
                        cudaStream_t stream);

// bf16 -> fp32.
cudaError_t Bf16ToF32(const void* x, int64_t n, float* y, cudaStream_t stream);

// fp32 -> bf16 (round to nearest even).
cudaError_t ToBf16(const float* x, int64_t n, void* y, cudaStream_t stream);

// out[r] = the index of row r's largest value (lowest index on ties; NaNs passed over, and 0
// when the row's first value is NaN): engine/argmax.h's ArgMax, exactly. x: [rows, n].
cudaError_t ArgMaxRows(const float* x, int64_t rows, int64_t n, int32_t* out,
                       cudaStream_t stream);

// Grouped rows laid out for batched GEMMs (engine/expert_groups.h's PadGroups): group g's rows
// [src_begin[g], src_begin[g + 1]) of a dense grouped matrix sit at rows starting at
// dst_begin[g] of a padded one, whose other rows are zero. Passed by value (kernel parameter
// space), so launches need no host-to-device copy and can be captured in a CUDA graph.
constexpr int kMaxPadGroups = 256;
struct PadMap {
  int32_t groups = 0;
  int32_t src_begin[kMaxPadGroups + 1];
  int32_t dst_begin[kMaxPadGroups + 1];  // dst_begin[groups]: padded rows
};

// xp (bf16, [padded rows, dim]) from x (fp32, [src rows, dim]): rows moved and rounded to bf16,
// padding rows zero. With x_rows (device [src rows]), source row i is row x_rows[i] of x (the
// routed rows read in place, as Groups::x_rows).
cudaError_t PadRowsToBf16(const float* x, int64_t dim, const PadMap& map, void* xp,
                          cudaStream_t stream, const int32_t* x_rows = nullptr);

// y (fp32, [src rows, dim]) from the padded bf16 yp: the inverse move, widened to fp32.
cudaError_t UnpadRowsToF32(const void* yp, int64_t dim, const PadMap& map, float* y,
                           cudaStream_t stream);

// CombineExperts reading y from the padded bf16 rows yp (grouped row r of group g at padded row
// map.dst_begin[g] + r - map.src_begin[g]): the unpadding folded into the combine, the same sums
// bit for bit as UnpadRowsToF32 then CombineExperts.
cudaError_t CombineExpertsPadded(const void* yp, const PadMap& map, const int32_t* where,
                                 const float* weights, int64_t n, int64_t k, int64_t dim,
                                 float* out, cudaStream_t stream);

// Pointer arrays of a batched GEMM over groups listed in `order`: for j < n, g = order[j],
//   out[j] = a + slot[g] * a_stride, out[n + j] = b + row[g] * b_row, out[2n + j] = c + row[g] * c_row
// (byte offsets). out: device array of 3n pointers.
struct BatchList {
  int32_t n = 0;
  int32_t slot[kMaxPadGroups];  // by group
  int32_t row[kMaxPadGroups];   // by group: first padded row
  int32_t order[kMaxPadGroups];
};
cudaError_t FillBatchPointers(const BatchList& list, const void* a, int64_t a_stride,
                              const void* b, int64_t b_row, void* c, int64_t c_row, void** out,
                              cudaStream_t stream);

// Pointer arrays of a batched GEMM over blocks of `block` padded rows, the groups of `map` padded
// to multiples of `block` (PadGroupsToBlocks): for entry j < n = map.dst_begin[groups] / block,
// with g the group of padded row j * block,
//   out[j] = a + slot[g] * a_stride, out[n + j] = b + j * block * b_row,
//   out[2n + j] = c + j * block * c_row (byte offsets). out: device array of 3n pointers.
struct SlotList {
  int32_t slot[kMaxPadGroups];  // by group
};
cudaError_t FillBlockPointers(const PadMap& map, const SlotList& slots, int32_t block,
                              const void* a, int64_t a_stride, const void* b, int64_t b_row,
                              void* c, int64_t c_row, void** out, cudaStream_t stream);

// Random weights for --load_format=dummy: uniform in [-scale, scale] from (seed, index), or
// the constant `scale` when `constant`. n elements of type wt.
cudaError_t FillRandom(void* dst, WType wt, int64_t n, uint64_t seed, float scale, bool constant,
                       cudaStream_t stream);

}  // namespace cuda
}  // namespace moemesh

#endif  // MOEMESH_ENGINE_CUDA_KERNELS_H_
