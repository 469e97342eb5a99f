// 256-bit (AVX2 + FMA) vector operations of the CPU multi_conv2d kernel (conv_kernel.h), for
// float and double: Avx2Vec<T>. Included by conv_avx2.cpp and conv_avx512.cpp, which define
// FSN_TARGET (their instruction set's function attribute) and FSN_INLINE first; each gets its
// own copy (internal linkage). No torch header may be included here.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace fastsupernet {
namespace conv {
namespace {

template <typename T>
struct Avx2Vec;

template <>
struct Avx2Vec<float> {
  using R = __m256;
  static constexpr int L = 8;
  static FSN_TARGET FSN_INLINE R zero() { return _mm256_setzero_ps(); }
  static FSN_TARGET FSN_INLINE R load(const float* p) { return _mm256_loadu_ps(p); }
  static FSN_TARGET FSN_INLINE void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  // A store that bypasses the caches (ConvJob::stream_out) where p is 32-byte aligned.
  static FSN_TARGET FSN_INLINE void store_stream(float* p, R v) {
    if ((reinterpret_cast<uintptr_t>(p) & 31) == 0) {
      _mm256_stream_ps(p, v);
    } else {
      _mm256_storeu_ps(p, v);
    }
  }
  static FSN_TARGET FSN_INLINE R bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static FSN_TARGET FSN_INLINE R set1(float v) { return _mm256_set1_ps(v); }
  static FSN_TARGET FSN_INLINE R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static FSN_TARGET FSN_INLINE R add(R a, R b) { return _mm256_add_ps(a, b); }
  static FSN_TARGET FSN_INLINE R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  // Lanes [0, n) of a vector, 1 <= n <= 8: all-ones mask, the masked load/store (no access to
  // the other lanes' memory), and the vector with the other lanes zeroed.
  static FSN_TARGET FSN_INLINE __m256i mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static FSN_TARGET FSN_INLINE R load_n(const float* p, int n) { return _mm256_maskload_ps(p, mask(n)); }
  static FSN_TARGET FSN_INLINE void store_n(float* p, R v, int n) { _mm256_maskstore_ps(p, mask(n), v); }
  static FSN_TARGET FSN_INLINE R keep_n(R v, int n) { return _mm256_and_ps(v, _mm256_castsi256_ps(mask(n))); }
  // max(0, y) returns y when y is NaN (the second operand), as torch.relu does
  static FSN_TARGET FSN_INLINE R relu(R y) { return _mm256_max_ps(_mm256_setzero_ps(), y); }
  static FSN_TARGET FSN_INLINE R prelu(R y, R slope) {
    const R ge = _mm256_cmp_ps(y, _mm256_setzero_ps(), _CMP_GE_OQ);
    return _mm256_blendv_ps(_mm256_mul_ps(y, slope), y, ge);
  }
  static FSN_TARGET FSN_INLINE void copy(float* __restrict dst, const float* __restrict src, int64_t count) {
    if (count == 8) {  // one vector inline: GCC turns the loop below into a call of memmove
      _mm256_storeu_ps(dst, _mm256_loadu_ps(src));
      return;
    }
    int64_t t = 0;
    for (; t + 8 <= count; t += 8) _mm256_storeu_ps(dst + t, _mm256_loadu_ps(src + t));
    for (; t < count; ++t) dst[t] = src[t];
  }
  // dst[t] = src[2 t]. The second load starts one value early (src + 2 t + 7), so that no
  // load reaches past src[2 * count - 2], the last value used.
  static FSN_TARGET FSN_INLINE void copy_even(float* __restrict dst, const float* __restrict src, int64_t count) {
    int64_t t = 0;
    for (; t + 8 <= count; t += 8) {
      const __m256 a = _mm256_loadu_ps(src + 2 * t);      // x0 .. x7
      const __m256 b = _mm256_loadu_ps(src + 2 * t + 7);  // x7 .. x14
      // per 128-bit lane (a0, a2, b1, b3): x0 x2 x8 x10 | x4 x6 x12 x14
      const __m256 e = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 2, 0));
      _mm256_storeu_ps(dst + t, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), _MM_SHUFFLE(3, 1, 2, 0))));
    }
    for (; t < count; ++t) dst[t] = src[2 * t];
  }
  // even[t] = src[2 t], odd[t] = src[2 t + 1], t < count.
  static FSN_TARGET FSN_INLINE void copy_deinterleave(float* __restrict even, float* __restrict odd,
                                                      const float* __restrict src, int64_t count) {
    int64_t t = 0;
    for (; t + 8 <= count; t += 8) {
      const __m256 a = _mm256_loadu_ps(src + 2 * t), b = _mm256_loadu_ps(src + 2 * t + 8);
      // per 128-bit lane: x0 x2 x8 x10 | x4 x6 x12 x14, then the 64-bit pairs in order
      const __m256 e = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
      const __m256 o = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
      _mm256_storeu_ps(even + t, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), _MM_SHUFFLE(3, 1, 2, 0))));
      _mm256_storeu_ps(odd + t, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), _MM_SHUFFLE(3, 1, 2, 0))));
    }
    for (; t < count; ++t) {
      even[t] = src[2 * t];
      odd[t] = src[2 * t + 1];
    }
  }
  // Statistics accumulators: 4 float64 lanes; each vector adds both of its halves, widened
  // (the squares of float32 values are exact in float64).
  using S = __m256d;
  static FSN_TARGET FSN_INLINE S stats_zero() { return _mm256_setzero_pd(); }
  static FSN_TARGET FSN_INLINE void stats_add(S& s, S& q, R y) {
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(y));
    const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(y, 1));
    s = _mm256_add_pd(_mm256_add_pd(s, lo), hi);
    q = _mm256_fmadd_pd(hi, hi, _mm256_fmadd_pd(lo, lo, q));
  }
  // s[0:4] += vs, q[0:4] += vq
  static FSN_TARGET FSN_INLINE void stats_flush(double* s, double* q, S vs, S vq) {
    _mm256_storeu_pd(s, _mm256_add_pd(_mm256_loadu_pd(s), vs));
    _mm256_storeu_pd(q, _mm256_add_pd(_mm256_loadu_pd(q), vq));
  }
};

template <>
struct Avx2Vec<double> {
  using R = __m256d;
  static constexpr int L = 4;
  static FSN_TARGET FSN_INLINE R zero() { return _mm256_setzero_pd(); }
  static FSN_TARGET FSN_INLINE R load(const double* p) { return _mm256_loadu_pd(p); }
  static FSN_TARGET FSN_INLINE void store(double* p, R v) { _mm256_storeu_pd(p, v); }
  static FSN_TARGET FSN_INLINE void store_stream(double* p, R v) {
    if ((reinterpret_cast<uintptr_t>(p) & 31) == 0) {
      _mm256_stream_pd(p, v);
    } else {
      _mm256_storeu_pd(p, v);
    }
  }
  static FSN_TARGET FSN_INLINE R bcast(const double* p) { return _mm256_broadcast_sd(p); }
  static FSN_TARGET FSN_INLINE R set1(double v) { return _mm256_set1_pd(v); }
  static FSN_TARGET FSN_INLINE R fma(R a, R b, R c) { return _mm256_fmadd_pd(a, b, c); }
  static FSN_TARGET FSN_INLINE R add(R a, R b) { return _mm256_add_pd(a, b); }
  static FSN_TARGET FSN_INLINE R mul(R a, R b) { return _mm256_mul_pd(a, b); }
  static FSN_TARGET FSN_INLINE __m256i mask(int n) {
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
  }
  static FSN_TARGET FSN_INLINE R load_n(const double* p, int n) { return _mm256_maskload_pd(p, mask(n)); }
  static FSN_TARGET FSN_INLINE void store_n(double* p, R v, int n) { _mm256_maskstore_pd(p, mask(n), v); }
  static FSN_TARGET FSN_INLINE R keep_n(R v, int n) { return _mm256_and_pd(v, _mm256_castsi256_pd(mask(n))); }
  static FSN_TARGET FSN_INLINE R relu(R y) { return _mm256_max_pd(_mm256_setzero_pd(), y); }
  static FSN_TARGET FSN_INLINE R prelu(R y, R slope) {
    const R ge = _mm256_cmp_pd(y, _mm256_setzero_pd(), _CMP_GE_OQ);
    return _mm256_blendv_pd(_mm256_mul_pd(y, slope), y, ge);
  }
  static FSN_TARGET FSN_INLINE void copy(double* __restrict dst, const double* __restrict src, int64_t count) {
    int64_t t = 0;
    for (; t + 4 <= count; t += 4) _mm256_storeu_pd(dst + t, _mm256_loadu_pd(src + t));
    for (; t < count; ++t) dst[t] = src[t];
  }
  static FSN_TARGET FSN_INLINE void copy_even(double* __restrict dst, const double* __restrict src, int64_t count) {
    int64_t t = 0;
    for (; t + 4 <= count; t += 4) {
      const __m256d a = _mm256_loadu_pd(src + 2 * t);      // x0 .. x3
      const __m256d b = _mm256_loadu_pd(src + 2 * t + 3);  // x3 .. x6
      const __m256d e = _mm256_shuffle_pd(a, b, 0xA);      // x0 x4 x2 x6
      _mm256_storeu_pd(dst + t, _mm256_permute4x64_pd(e, _MM_SHUFFLE(3, 1, 2, 0)));
    }
    for (; t < count; ++t) dst[t] = src[2 * t];
  }
  static FSN_TARGET FSN_INLINE void copy_deinterleave(double* __restrict even, double* __restrict odd,
                                                      const double* __restrict src, int64_t count) {
    for (int64_t t = 0; t < count; ++t) {
      even[t] = src[2 * t];
      odd[t] = src[2 * t + 1];
    }
  }
  using S = __m256d;
  static FSN_TARGET FSN_INLINE S stats_zero() { return _mm256_setzero_pd(); }
  static FSN_TARGET FSN_INLINE void stats_add(S& s, S& q, R y) {
    s = _mm256_add_pd(s, y);
    q = _mm256_fmadd_pd(y, y, q);
  }
  static FSN_TARGET FSN_INLINE void stats_flush(double* s, double* q, S vs, S vq) {
    _mm256_storeu_pd(s, _mm256_add_pd(_mm256_loadu_pd(s), vs));
    _mm256_storeu_pd(q, _mm256_add_pd(_mm256_loadu_pd(q), vq));
  }
};

}  // namespace
}  // namespace conv
}  // namespace fastsupernet
