// Preamble of a file compiled for AVX-512 (F, DQ, VL) through function target attributes:
// FSN_TARGET and FSN_INLINE, GCC 12's warnings about its own AVX-512 intrinsics (which start
// from _mm512_undefined_*()) silenced, and the helpers such files share. Included first,
// inside #ifdef FASTSUPERNET_HAVE_AVX2 (conv_plan.h), by conv_avx512.cpp and
// conv_winograd_s2.cpp.
#pragma once

#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define FSN_TARGET __attribute__((target("avx2,fma,avx512f,avx512dq,avx512vl")))
#define FSN_INLINE inline __attribute__((always_inline))

#include <immintrin.h>

#include <cstdint>

namespace fastsupernet {
namespace conv {

// A store of 16 floats that bypasses the caches where p is 64-byte aligned (outputs of
// kStreamOutBytes and more: conv_plan.h), a plain store elsewhere.
FSN_TARGET FSN_INLINE void store_stream512(float* p, __m512 v) {
  if ((reinterpret_cast<uintptr_t>(p) & 63) == 0) {
    _mm512_stream_ps(p, v);
  } else {
    _mm512_storeu_ps(p, v);
  }
}

}  // namespace conv
}  // namespace fastsupernet
