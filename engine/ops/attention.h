// Causal grouped-query attention over a KV cache (CPU; fp32 arithmetic, fp32, bf16 or int8 cache).
#ifndef MOEMESH_ENGINE_OPS_ATTENTION_H_
#define MOEMESH_ENGINE_OPS_ATTENTION_H_

#include <cstdint>

namespace moemesh {
namespace ops {

// Causal grouped-query attention for ONE sequence over its KV cache, one pass with online
// softmax, fp32 throughout.
// q: [n_new, n_heads, head_dim] for positions start_pos .. start_pos+n_new-1.
// k_cache, v_cache: kv head g's row for position p at g * head_stride + p * row_stride
// (defaults, 0: row_stride = n_kv_heads*head_dim, head_stride = head_dim, i.e. rows
// [position, n_kv_heads, head_dim]; a head-major cache passes head_dim and its head block size),
// already holding this step's keys/values. Query i attends to cache rows
// 0 .. start_pos+i. Head h uses kv head h / (n_heads / n_kv_heads). Scores are
// (q . k) * (1/sqrt(head_dim)). out: [n_new, n_heads, head_dim]; must not alias q.
void Attention(const float* q, const float* k_cache, const float* v_cache, int64_t start_pos,
               int64_t n_new, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, float* out,
               int64_t row_stride = 0, int64_t head_stride = 0);

// The same with the KV cache in bf16 (uint16_t bit patterns, widened to fp32 as they are read;
// all arithmetic fp32).
void Attention(const float* q, const uint16_t* k_cache, const uint16_t* v_cache,
               int64_t start_pos, int64_t n_new, int64_t n_heads, int64_t n_kv_heads,
               int64_t head_dim, float* out, int64_t row_stride = 0, int64_t head_stride = 0);

// The same with the KV cache in int8 with one fp32 scale per (position, kv head) row: the row's
// values are scale * int8. Kv head g's scale for position p is at g * scale_head_stride +
// p * scale_row_stride (defaults, 0: n_kv_heads and 1, i.e. [position, n_kv_heads]; a
// head-major cache passes 1 and its head block size). A key's scale multiplies its score, a
// value's scale its softmax weight; all arithmetic fp32.
void Attention(const float* q, const int8_t* k_cache, const int8_t* v_cache,
               const float* k_scale, const float* v_scale, int64_t start_pos, int64_t n_new,
               int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, float* out,
               int64_t row_stride = 0, int64_t head_stride = 0, int64_t scale_row_stride = 0,
               int64_t scale_head_stride = 0);

// The same computation split for callers that run their own parallel region: computes part
// `part` of `num_parts` of the work units (kv head x chunk of new tokens) on the calling
// thread. Calling every part once gives Attention()'s result exactly.
void AttentionPart(const float* q, const float* k_cache, const float* v_cache, int64_t start_pos,
                   int64_t n_new, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, float* out,
                   int part, int num_parts, int64_t row_stride = 0, int64_t head_stride = 0);

}  // namespace ops
}  // namespace moemesh

#endif  // MOEMESH_ENGINE_OPS_ATTENTION_H_
