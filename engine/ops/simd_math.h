// Internal vector math for the CPU kernels (AVX-512 with scalar fallbacks).
#ifndef MOEMESH_ENGINE_OPS_SIMD_MATH_H_
#define MOEMESH_ENGINE_OPS_SIMD_MATH_H_

#include <cmath>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace moemesh {
namespace ops {
namespace internal {

#if defined(__AVX512F__)

// exp(x) for 16 floats, within 2 ulp (Cephes expf polynomial; 2^n applied with
// vscalefps, so underflow goes to 0 and overflow to inf). NaN propagates, exp(-inf) = 0.
inline __m512 Exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

inline __mmask16 TailMask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1);
}

#endif  // __AVX512F__

inline float ExpScalar(float x) { return std::exp(x); }

}  // namespace internal
}  // namespace ops
}  // namespace moemesh

#endif  // MOEMESH_ENGINE_OPS_SIMD_MATH_H_
