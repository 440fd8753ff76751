// Element-wise and row-wise CPU kernels used by the MoE transformer layers. All fp32,
// following transformers' formulas.
#ifndef MOEMESH_ENGINE_OPS_KERNELS_H_
#define MOEMESH_ENGINE_OPS_KERNELS_H_

#include <cstdint>

namespace moemesh {
namespace ops {

// y[r, :] = w * (x[r, :] * rsqrt(mean(x[r, :]^2) + eps)) for rows of length dim (fp32, as
// transformers' RMSNorm). In place allowed (x == y).
void RmsNorm(const float* x, const float* w, int64_t rows, int64_t dim, float eps, float* y);

// Rotary embedding, transformers' rotate_half convention, in place on x: [tokens, heads,
// head_dim] (head_dim even). inv_freq[i] = 1 / theta^(2i/head_dim) in fp32 and angle =
// float(pos) * inv_freq[i] in fp32, then cos/sin; x[i] and x[i + head_dim/2] rotate together:
//   x[i]     <- x[i] cos - x[i + h] sin
//   x[i + h] <- x[i + h] cos + x[i] sin
void Rope(float* x, const int32_t* positions, int64_t tokens, int64_t heads, int64_t head_dim,
          float theta);

// out[i] = silu(gate[i]) * up[i] with silu(g) = g / (1 + exp(-g)); n elements. out may alias
// gate or up.
void SiluMul(const float* gate, const float* up, int64_t n, float* out);
// gate_up rows are [gate(width) | up(width)]; out is [rows, width]. out may alias gate_up.
void SiluMulRows(const float* gate_up, int64_t rows, int64_t width, float* out);

// out[i] = 1 / (1 + exp(-x[i])) (torch.sigmoid in fp32; e.g. qwen2_moe's shared-expert gate).
// out may alias x.
void Sigmoid(const float* x, int64_t n, float* out);

// Row-wise softmax in place: x [rows, n].
void Softmax(float* x, int64_t rows, int64_t n);

// Top-k routing as transformers does it: probs = softmax(logits[r, :num_experts]) in fp32;
// take the k largest (ties: lower index first), in descending order; if normalize, divide the
// k weights by their sum. ids: [rows, k], weights: [rows, k]. Requires k <= num_experts.
void TopKRouting(const float* logits, int64_t rows, int64_t num_experts, int64_t k, bool normalize,
                 int32_t* ids, float* weights);

}  // namespace ops
}  // namespace moemesh

#endif  // MOEMESH_ENGINE_OPS_KERNELS_H_
