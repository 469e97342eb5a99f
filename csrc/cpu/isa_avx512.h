// Preamble of a file compiled for AVX-512 (F, DQ, VL) through function target attributes:
// FSN_TARGET and FSN_INLINE, and GCC 12's warnings about its own AVX-512 intrinsics (which
// start from _mm512_undefined_*()) silenced. Included first, inside #ifdef
// FASTSUPERNET_HAVE_AVX2 (conv_plan.h), by conv_avx512.cpp and conv_winograd_s2.cpp.
#pragma once

#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define FSN_TARGET __attribute__((target("avx2,fma,avx512f,avx512dq,avx512vl")))
#define FSN_INLINE inline __attribute__((always_inline))
