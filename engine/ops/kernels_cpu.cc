#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "engine/ops/kernels.h"
#include "engine/ops/simd_math.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace moemesh {
namespace ops {
namespace {

using internal::ExpScalar;
#if defined(__AVX512F__)
using internal::Exp512;
using internal::TailMask;
#endif

// Softmax of one row in place: exp(x - max) / sum, the sum's reciprocal applied as a product
// (as PyTorch's vectorised CPU softmax does).
void SoftmaxRow(float* x, int64_t n) {
  if (n <= 0) return;
#if defined(__AVX512F__)
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 m = TailMask(n - i);
    vmax = _mm512_mask_max_ps(vmax, m, vmax, _mm512_maskz_loadu_ps(m, x + i));
  }
  const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 m = TailMask(n - i);
    __m512 e = Exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), mx));
    e = _mm512_maskz_mov_ps(m, e);
    vsum = _mm512_add_ps(vsum, e);
    _mm512_mask_storeu_ps(x + i, m, e);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 m = TailMask(n - i);
    _mm512_mask_storeu_ps(x + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), inv));
  }
#else
  float mx = x[0];
  for (int64_t i = 1; i < n; ++i) mx = std::max(mx, x[i]);
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = ExpScalar(x[i] - mx);
    sum += x[i];
  }
  const float inv = 1.0f / sum;
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
#endif
}

// inv_freq as transformers computes it: 1.0 / (theta ** (float(2i) / dim)), all in fp32.
const std::vector<float>& InvFreq(int64_t head_dim, float theta) {
  thread_local std::vector<float> cache;
  thread_local int64_t cached_dim = -1;
  thread_local float cached_theta = 0.0f;
  if (cached_dim != head_dim || cached_theta != theta) {
    const int64_t half = head_dim / 2;
    cache.resize(half);
    for (int64_t i = 0; i < half; ++i) {
      const float e = static_cast<float>(2 * i) / static_cast<float>(head_dim);
      const float p =
          static_cast<float>(std::pow(static_cast<double>(theta), static_cast<double>(e)));
      cache[i] = 1.0f / p;
    }
    cached_dim = head_dim;
    cached_theta = theta;
  }
  return cache;
}

}  // namespace

void RmsNorm(const float* x, const float* w, int64_t rows, int64_t dim, float eps, float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* yr = y + r * dim;
#if defined(__AVX512F__)
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= dim; i += 32) {
      __m512 a = _mm512_loadu_ps(xr + i), b = _mm512_loadu_ps(xr + i + 16);
      acc0 = _mm512_fmadd_ps(a, a, acc0);
      acc1 = _mm512_fmadd_ps(b, b, acc1);
    }
    for (; i < dim; i += 16) {
      __m512 a = _mm512_maskz_loadu_ps(TailMask(dim - i), xr + i);
      acc0 = _mm512_fmadd_ps(a, a, acc0);
    }
    const float ss = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#else
    float ss = 0.0f;
    for (int64_t i = 0; i < dim; ++i) ss += xr[i] * xr[i];
#endif
    const float variance = ss / static_cast<float>(dim);
    const float inv = 1.0f / std::sqrt(variance + eps);
#if defined(__AVX512F__)
    const __m512 vinv = _mm512_set1_ps(inv);
    for (int64_t j = 0; j < dim; j += 16) {
      __mmask16 m = TailMask(dim - j);
      __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, xr + j), vinv);
      _mm512_mask_storeu_ps(yr + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, w + j), v));
    }
#else
    for (int64_t j = 0; j < dim; ++j) yr[j] = w[j] * (xr[j] * inv);
#endif
  }
}

void Rope(float* x, const int32_t* positions, int64_t tokens, int64_t heads, int64_t head_dim,
          float theta) {
  const int64_t half = head_dim / 2;
  const std::vector<float>& inv_freq = InvFreq(head_dim, theta);
  constexpr int64_t kStackHalf = 256;
  float cos_buf[kStackHalf], sin_buf[kStackHalf];
  std::vector<float> heap;
  float* cs = cos_buf;
  float* sn = sin_buf;
  if (half > kStackHalf) {
    heap.resize(2 * half);
    cs = heap.data();
    sn = heap.data() + half;
  }
  for (int64_t t = 0; t < tokens; ++t) {
    const float pos = static_cast<float>(positions[t]);
    for (int64_t i = 0; i < half; ++i) {
      const double angle = static_cast<double>(pos * inv_freq[i]);  // fp32 product.
      cs[i] = static_cast<float>(std::cos(angle));
      sn[i] = static_cast<float>(std::sin(angle));
    }
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + (t * heads + h) * head_dim;
      int64_t i = 0;
#if defined(__AVX512F__)
      for (; i < half; i += 16) {
        __mmask16 m = TailMask(half - i);
        __m512 x1 = _mm512_maskz_loadu_ps(m, v + i);
        __m512 x2 = _mm512_maskz_loadu_ps(m, v + half + i);
        __m512 c = _mm512_maskz_loadu_ps(m, cs + i);
        __m512 s = _mm512_maskz_loadu_ps(m, sn + i);
        _mm512_mask_storeu_ps(v + i, m, _mm512_sub_ps(_mm512_mul_ps(x1, c), _mm512_mul_ps(x2, s)));
        _mm512_mask_storeu_ps(v + half + i, m,
                              _mm512_add_ps(_mm512_mul_ps(x2, c), _mm512_mul_ps(x1, s)));
      }
#else
      for (; i < half; ++i) {
        const float x1 = v[i], x2 = v[half + i];
        const float a = x1 * cs[i], b = x2 * sn[i];
        const float c = x2 * cs[i], d = x1 * sn[i];
        v[i] = a - b;
        v[half + i] = c + d;
      }
#endif
    }
  }
}

void SiluMul(const float* gate, const float* up, int64_t n, float* out) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.0f);
  for (; i < n; i += 16) {
    __mmask16 m = TailMask(n - i);
    __m512 g = _mm512_maskz_loadu_ps(m, gate + i);
    __m512 u = _mm512_maskz_loadu_ps(m, up + i);
    __m512 e = Exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
    __m512 s = _mm512_div_ps(g, _mm512_add_ps(one, e));
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(s, u));
  }
#else
  for (; i < n; ++i) {
    const float g = gate[i];
    const float s = g / (1.0f + ExpScalar(-g));
    out[i] = s * up[i];
  }
#endif
}

void SiluMulRows(const float* gate_up, int64_t rows, int64_t width, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gate_up + r * 2 * width;
    SiluMul(g, g + width, width, out + r * width);
  }
}

void Sigmoid(const float* x, int64_t n, float* out) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.0f);
  for (; i < n; i += 16) {
    __mmask16 m = TailMask(n - i);
    __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    __m512 e = Exp512(_mm512_sub_ps(_mm512_setzero_ps(), v));
    _mm512_mask_storeu_ps(out + i, m, _mm512_div_ps(one, _mm512_add_ps(one, e)));
  }
#else
  for (; i < n; ++i) out[i] = 1.0f / (1.0f + ExpScalar(-x[i]));
#endif
}

void Softmax(float* x, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) SoftmaxRow(x + r * n, n);
}

void TopKRouting(const float* logits, int64_t rows, int64_t num_experts, int64_t k, bool normalize,
                 int32_t* ids, float* weights) {
  constexpr int64_t kStackExperts = 512;
  float prob_buf[kStackExperts];
  int32_t idx_buf[kStackExperts];
  std::vector<float> prob_heap;
  std::vector<int32_t> idx_heap;
  float* probs = prob_buf;
  int32_t* idx = idx_buf;
  if (num_experts > kStackExperts) {
    prob_heap.resize(num_experts);
    idx_heap.resize(num_experts);
    probs = prob_heap.data();
    idx = idx_heap.data();
  }
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(probs, logits + r * num_experts, num_experts * sizeof(float));
    SoftmaxRow(probs, num_experts);
    for (int64_t e = 0; e < num_experts; ++e) idx[e] = static_cast<int32_t>(e);
    std::partial_sort(idx, idx + k, idx + num_experts, [probs](int32_t a, int32_t b) {
      return probs[a] > probs[b] || (probs[a] == probs[b] && a < b);
    });
    int32_t* ids_r = ids + r * k;
    float* w_r = weights + r * k;
    float sum = 0.0f;
    for (int64_t j = 0; j < k; ++j) {
      ids_r[j] = idx[j];
      w_r[j] = probs[idx[j]];
      sum += w_r[j];
    }
    if (normalize) {
      for (int64_t j = 0; j < k; ++j) w_r[j] /= sum;
    }
  }
}

}  // namespace ops
}  // namespace moemesh
