// AVX-512 version of the float32 multi_conv2d CPU kernel (x86-64, GCC or Clang).
//
// Same plan, blocking and order of operations as the AVX2 version (conv_kernel.h), on 512-bit
// registers of two 8-lane plan vectors each. Where a tile's vectors pair into runs of 16
// contiguous pixels of one row (planes >= 16 wide), a register holds one run of one output row,
// the weights are broadcast and the epilogue works on whole runs (Vec<float>::Wide: tile_runs).
// Elsewhere (8-wide rows) a register holds one vector for two output rows (rows 2p and 2p + 1
// of the block): per reduction step one 128-bit load and two permutes make the pair weights
// (a[2p] x 8 | a[2p + 1] x 8), each input vector is loaded once duplicated into both halves,
// and the epilogue runs on 256-bit halves with the AVX2 code (tile_row_pairs). Each output is
// the same chain of fused multiply-adds as in the AVX2 kernel, so the outputs agree bit for bit
// (the float64 statistics to their rounding: partial sums per tile of 8 vectors, not 3). Tiles
// are MR <= 4 rows x up to kTileVecs = 8 vectors (16 accumulators).
//
// The functions carry a target attribute; conv.cpp calls them only when the CPU reports
// AVX-512 F, DQ and VL. float64 keeps the AVX2 kernel. No torch header is included here.

#include "cpu/conv_plan.h"

#ifdef FASTSUPERNET_HAVE_AVX2

#include "cpu/isa_avx512.h"

#include "cpu/conv_vec_avx2.h"

namespace fastsupernet {
namespace conv {
namespace {

template <typename T>
struct Vec : Avx2Vec<T> {};

template <>
struct Vec<float> : Avx2Vec<float> {
  using P = __m512;                    // (row 2p: 8 lanes | row 2p + 1: 8 lanes)
  static constexpr int kTileVecs = 8;  // plan vectors per tile
  static FSN_TARGET FSN_INLINE P pair_zero() { return _mm512_setzero_ps(); }
  // w[p] = (a[2p] x 8 | a[2p + 1] x 8) for p < MP; reads a[0..3] (the panel is padded).
  template <int MP>
  static FSN_TARGET FSN_INLINE void pair_weights(const float* a, P (&w)[MP]) {
    const __m512 q = _mm512_broadcast_f32x4(_mm_loadu_ps(a));  // a[0..3] in every 128-bit lane
#pragma GCC unroll 2
    for (int p = 0; p < MP; ++p) {
      const int e = 2 * p, o = 2 * p + 1;
      w[p] = _mm512_permutexvar_ps(_mm512_set_epi32(o, o, o, o, o, o, o, o, e, e, e, e, e, e, e, e), q);
    }
  }
  // The 8 values at p in both halves.
  static FSN_TARGET FSN_INLINE P dup_load(const float* p) { return _mm512_broadcast_f32x8(_mm256_loadu_ps(p)); }
  // The 16 values at p; *p in every lane.
  static FSN_TARGET FSN_INLINE P wide_load(const float* p) { return _mm512_loadu_ps(p); }
  static FSN_TARGET FSN_INLINE P wide_bcast(const float* p) { return _mm512_set1_ps(*p); }
  static FSN_TARGET FSN_INLINE P pair_fma(P a, P b, P c) { return _mm512_fmadd_ps(a, b, c); }
  static FSN_TARGET FSN_INLINE R lo(P v) { return _mm512_castps512_ps256(v); }
  static FSN_TARGET FSN_INLINE R hi(P v) { return _mm512_extractf32x8_ps(v, 1); }

  // The padded plane of ConvJob::plane_s2_16 from a 16x16 input plane (rows sH apart, unit
  // column stride): padded row r (1..16) holds input row r - 1 as [0, x1 x3 .. x15, x0 x2 ..
  // x14] (stride phase 0 then 1), row 0 and everything past row 16 zero; rows 17 values apart,
  // 19 vectors stored whole at dst (64-byte aligned), each a permute of two input rows.
  struct PlaneS2Table {
    int row[kPlaneS2Vectors];         // input row of the permute's first source (-1: none)
    __mmask16 mask[kPlaneS2Vectors];  // lanes that take an input value (else zero)
    int idx[kPlaneS2Vectors][16];     // per lane: 16 * (row - row[v]) + column
    PlaneS2Table() {
      for (int v = 0; v < kPlaneS2Vectors; ++v) {
        row[v] = (16 * v) / kPlaneS2RowLen - 1;
        mask[v] = 0;
        for (int l = 0; l < 16; ++l) {
          const int f = 16 * v + l, padded = f / kPlaneS2RowLen, pos = f % kPlaneS2RowLen, r = padded - 1;
          idx[v][l] = 0;
          if (padded < 1 || padded > 16 || pos == 0) continue;
          const int col = pos <= 8 ? 2 * (pos - 1) + 1 : 2 * (pos - 9);
          idx[v][l] = 16 * (r - row[v]) + col;
          mask[v] = static_cast<__mmask16>(mask[v] | (1u << l));
        }
      }
    }
  };
  static FSN_TARGET FSN_INLINE void copy_plane_s2_16(float* __restrict dst, const float* __restrict src, int64_t sH) {
    static const PlaneS2Table t;
    const __m512 zero = _mm512_setzero_ps();
#pragma GCC unroll 19
    for (int v = 0; v < kPlaneS2Vectors; ++v) {
      const int r = t.row[v];
      const __m512 a = r >= 0 ? _mm512_loadu_ps(src + r * sH) : zero;
      const __m512 b = r + 1 < 16 ? _mm512_loadu_ps(src + (r + 1) * sH) : zero;
      const __m512i idx = _mm512_loadu_si512(t.idx[v]);
      _mm512_store_ps(dst + 16 * v, _mm512_maskz_permutex2var_ps(t.mask[v], a, idx, b));
    }
  }

  // The epilogue's operations on runs of 16 lanes (store_tile for tile_runs): the same
  // per-element operations as the 8-lane ones; statistics added half by half, in the order
  // of the two 8-lane vectors, into the same 8-lane-pair accumulators.
  struct Wide {
    using R = __m512;
    using S = Avx2Vec<float>::S;
    static constexpr int L = 16;
    static FSN_TARGET FSN_INLINE R set1(float v) { return _mm512_set1_ps(v); }
    static FSN_TARGET FSN_INLINE R load(const float* p) { return _mm512_loadu_ps(p); }
    static FSN_TARGET FSN_INLINE void store(float* p, R v) { _mm512_storeu_ps(p, v); }
    static FSN_TARGET FSN_INLINE void store_stream(float* p, R v) { store_stream512(p, v); }
    static FSN_TARGET FSN_INLINE __mmask16 mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
    static FSN_TARGET FSN_INLINE R load_n(const float* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }
    static FSN_TARGET FSN_INLINE void store_n(float* p, R v, int n) { _mm512_mask_storeu_ps(p, mask(n), v); }
    static FSN_TARGET FSN_INLINE R keep_n(R v, int n) { return _mm512_maskz_mov_ps(mask(n), v); }
    static FSN_TARGET FSN_INLINE R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
    static FSN_TARGET FSN_INLINE R add(R a, R b) { return _mm512_add_ps(a, b); }
    static FSN_TARGET FSN_INLINE R mul(R a, R b) { return _mm512_mul_ps(a, b); }
    // max(0, y) returns y when y is NaN (the second operand), as torch.relu does
    static FSN_TARGET FSN_INLINE R relu(R y) { return _mm512_max_ps(_mm512_setzero_ps(), y); }
    static FSN_TARGET FSN_INLINE R prelu(R y, R slope) {
      const __mmask16 ge = _mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_GE_OQ);
      return _mm512_mask_blend_ps(ge, _mm512_mul_ps(y, slope), y);
    }
    static FSN_TARGET FSN_INLINE S stats_zero() { return Avx2Vec<float>::stats_zero(); }
    static FSN_TARGET FSN_INLINE void stats_add(S& s, S& q, R y) {
      Avx2Vec<float>::stats_add(s, q, _mm512_castps512_ps256(y));
      Avx2Vec<float>::stats_add(s, q, _mm512_extractf32x8_ps(y, 1));
    }
    static FSN_TARGET FSN_INLINE void stats_flush(double* s, double* q, S vs, S vq) {
      Avx2Vec<float>::stats_flush(s, q, vs, vq);
    }
  };
};

}  // namespace
}  // namespace conv
}  // namespace fastsupernet

#include "cpu/conv_kernel.h"

namespace fastsupernet {
namespace conv {

bool run_items_avx512(const ConvJob<float>& job, int64_t begin, int64_t end, float* scratch, double* lanes) {
  run_items_impl<float>(job, begin, end, scratch, lanes);
  return true;
}

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return cpu_has_avx2_fma() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl");
}

}  // namespace conv
}  // namespace fastsupernet

#else  // no x86-64 GCC/Clang build

namespace fastsupernet {
namespace conv {

bool run_items_avx512(const ConvJob<float>&, int64_t, int64_t, float*, double*) { return false; }
bool cpu_has_avx512() { return false; }

}  // namespace conv
}  // namespace fastsupernet

#endif
