// Stride-2 Winograd kernel of fastsupernet::multi_conv2d (float32, AVX-512): 3x3 stride-2
// padding-1 layers on 16x16 inputs as F(4x4, 2x2) on the input's four stride phases (the
// formulation: conv_winograd_s2.h). Per chunk of 16 images (the 16 lanes of a register: every
// transform is plain vector arithmetic on one value of 16 images) and candidate:
//  1. per input channel, the 16 images' 16x16 planes are transposed into image-minor vectors
//     (16 in-register 16x16 transposes), then each phase's 5x5 patch of each of the 4 output
//     tiles is transformed, V = B^T d B, into V[xi][slot in_w + c][tile][image] (the points
//     whose U is zero for a phase are not stored: conv_winograd_s2.h, s2_phases);
//  2. the GEMM over each point's 4, 2 or 1 in_w transformed channels runs on the direct
//     kernel (a 1x1 job over V: 25 x out_w rows of 64 pixels, runs of 16 pixels per
//     register, weights broadcast);
//  3. per output channel and tile, Y = A^T M A, the epilogue (* scale + shift, activation) on
//     the 16 outputs, and two output rows of the 16 images at a time transposed back and stored
//     as one 64-byte vector per image.
//
// Matrices (points 0, 1, -1, 2 and infinity): B^T = [2 -1 -2 1 0; 0 2 1 -1 0; 0 -2 3 -1 0;
// 0 -1 0 1 0; 0 2 -1 -2 1], G = [1/2 0; 1/2 1/2; 1/6 -1/6; 1/6 1/3; 0 1], A^T = [1 1 1 1 0;
// 0 1 -1 2 0; 0 1 1 4 0; 0 1 -1 8 1].
//
// Rounding (u = 2^-24): V takes 3 roundings per direction (6), U one (computed in float64),
// the GEMM one chain of at most 4 in_w fused multiply-adds, the output transform 3 per direction (6):
// the conv value before the epilogue is within (4 in_w + 12) u A_w (1 + O(u)) of the exact one,
// A_w the same algorithm on absolute values (|A^T| [sum (|G| |K| |G^T|) . (|B^T| |d| |B|)] |A|);
// tests/test_conv_winograd.py checks it per element.

#include "cpu/conv_winograd_s2.h"

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "cpu/conv_plan.h"

#ifdef FASTSUPERNET_HAVE_AVX2

#include "cpu/isa_avx512.h"

namespace fastsupernet {
namespace conv {
namespace {

using Z = __m512;

// r[i] = row i of a 16x16 matrix -> r[j] = its column j.
FSN_TARGET FSN_INLINE void transpose16(Z (&r)[16]) {
  Z t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: (a0 b0 a1 b1), (a2 b2 a3 b3)
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // r[4i + k], lane L: column 4L + k of rows 4i .. 4i + 3
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {  // lanes (0, 2) and (1, 3) of row groups (0, 1) and (2, 3)
    t[k] = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88);
    t[4 + k] = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xDD);
    t[8 + k] = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88);
    t[12 + k] = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xDD);
  }
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {  // lane L of the four row groups: column 4L + k
    r[k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0x88);
    r[8 + k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0xDD);
    r[4 + k] = _mm512_shuffle_f32x4(t[4 + k], t[12 + k], 0x88);
    r[12 + k] = _mm512_shuffle_f32x4(t[4 + k], t[12 + k], 0xDD);
  }
}

// t = B^T d on five vectors (3 roundings on every path).
FSN_TARGET FSN_INLINE void bt5(const Z (&d)[5], Z (&t)[5]) {
  const Z two = _mm512_set1_ps(2.0f);
  const Z d31 = _mm512_sub_ps(d[3], d[1]);
  t[0] = _mm512_fmadd_ps(two, _mm512_sub_ps(d[0], d[2]), d31);                       // 2 d0 - d1 - 2 d2 + d3
  t[1] = _mm512_fmadd_ps(two, d[1], _mm512_sub_ps(d[2], d[3]));                      // 2 d1 + d2 - d3
  t[2] = _mm512_fmsub_ps(_mm512_set1_ps(3.0f), d[2], _mm512_fmadd_ps(two, d[1], d[3]));  // -2 d1 + 3 d2 - d3
  t[3] = d31;                                                                         // d3 - d1
  t[4] = _mm512_fmadd_ps(two, _mm512_sub_ps(d[1], d[3]), _mm512_sub_ps(d[4], d[2]));  // 2 d1 - d2 - 2 d3 + d4
}

// y = A^T m on five vectors (3 roundings on every path).
FSN_TARGET FSN_INLINE void at5(const Z (&m)[5], Z (&y)[4]) {
  const Z s = _mm512_add_ps(m[1], m[2]), d = _mm512_sub_ps(m[1], m[2]);
  y[0] = _mm512_add_ps(_mm512_add_ps(m[0], s), m[3]);
  y[1] = _mm512_fmadd_ps(_mm512_set1_ps(2.0f), m[3], d);
  y[2] = _mm512_fmadd_ps(_mm512_set1_ps(4.0f), m[3], s);
  y[3] = _mm512_fmadd_ps(_mm512_set1_ps(8.0f), m[3], _mm512_add_ps(d, m[4]));
}

// V = B^T d B of one 5x5 patch, d[r][s] = load(r, s); store(xi, V[xi]) for xi = 5 i + j.
template <typename Load, typename Store>
FSN_TARGET FSN_INLINE void transform_patch(Load&& load, Store&& store) {
  Z t[5][5];  // t[i][s] = (B^T d)[i][s]
#pragma GCC unroll 5
  for (int s = 0; s < 5; ++s) {
    Z col[5];
#pragma GCC unroll 5
    for (int r = 0; r < 5; ++r) col[r] = load(r, s);
    Z out[5];
    bt5(col, out);
#pragma GCC unroll 5
    for (int i = 0; i < 5; ++i) t[i][s] = out[i];
  }
#pragma GCC unroll 5
  for (int i = 0; i < 5; ++i) {
    Z out[5];
    bt5(t[i], out);
#pragma GCC unroll 5
    for (int jj = 0; jj < 5; ++jj) store(i * 5 + jj, out[jj]);
  }
}

// y = A^T M A of one tile, M[xi] = load(xi) for xi = 5 i + j.
template <typename Load>
FSN_TARGET FSN_INLINE void transform_tile_output(Load&& load, Z (&y)[4][4]) {
  Z z[4][5];  // z = A^T M (4 x 5)
#pragma GCC unroll 5
  for (int jj = 0; jj < 5; ++jj) {
    Z col[5];
#pragma GCC unroll 5
    for (int i = 0; i < 5; ++i) col[i] = load(i * 5 + jj);
    Z out[4];
    at5(col, out);
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) z[i][jj] = out[i];
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) at5(z[i], y[i]);
}

// Scratch of one thread: the staged plane, V, M, the output plane before its transpose.
struct Scratch {
  float* staged;  // image-minor plane: forward 16 x 16 vectors ((h * 16 + w) * 16 + image), gradient 8 x 8
  float* v;       // V[xi][channel][tile * 16 + image], xi planes v_stride apart
  float* m;       // M[xi][row][tile * 16 + image], xi planes m_stride apart
  float* planes;  // one output plane of the 16 images as vectors, before the transpose
};

Scratch carve(float* base, int64_t staged_vectors, int64_t v_stride, int64_t m_stride) {
  Scratch s;
  s.staged = base;
  s.v = s.staged + staged_vectors * 16;
  s.m = s.v + kS2Points * v_stride;
  s.planes = s.m + kS2Points * m_stride;
  return s;
}

// Channel c of images [n0, n0 + count) staged image-minor (zero lanes past count).
FSN_TARGET void stage_plane(const WinogradS2Job& j, int64_t n0, int count, int64_t c, float* __restrict xt) {
  const float* base = j.x + n0 * j.x_sN + (j.c0 + c) * j.x_sC;
  for (int h = 0; h < 16; ++h) {
    Z r[16];
#pragma GCC unroll 16
    for (int n = 0; n < 16; ++n) r[n] = n < count ? _mm512_loadu_ps(base + n * j.x_sN + h * j.x_sH) : _mm512_setzero_ps();
    transpose16(r);
#pragma GCC unroll 16
    for (int w = 0; w < 16; ++w) _mm512_store_ps(xt + (h * 16 + w) * 16, r[w]);
  }
}

// V of channel c for the four phases and tiles, from the staged plane.
FSN_TARGET void transform_input(const WinogradS2Job& j, int64_t c, const float* __restrict xt, float* __restrict v) {
  const int64_t vs = s2_v_stride(j);
  const Z zero = _mm512_setzero_ps();
  for (int p = 0; p < 2; ++p) {
    for (int q = 0; q < 2; ++q) {
      const int pq = 2 * p + q;
      for (int tile = 0; tile < kS2Tiles; ++tile) {
        const int ty = tile / 2, tx = tile % 2;
        transform_patch(
            [&](int r, int s) FSN_TARGET {
              const int h = 8 * ty + 2 * r + p - 1, w = 8 * tx + 2 * s + q - 1;
              return (h >= 0 && h < 16 && w >= 0 && w < 16) ? _mm512_load_ps(xt + (h * 16 + w) * 16) : zero;
            },
            [&](int xi, Z value) FSN_TARGET {
              const int slot = s2_slot(xi, pq);
              if (slot < s2_phases(xi)) _mm512_store_ps(v + xi * vs + (slot * j.in_w + c) * 64 + tile * 16, value);
            });
      }
    }
  }
}

FSN_TARGET FSN_INLINE Z epilogue(Z y, Z sc, Z sh, bool scale, bool shift, int act, Z slope) {
  if (scale && shift) {
    y = _mm512_fmadd_ps(y, sc, sh);
  } else if (scale) {
    y = _mm512_mul_ps(y, sc);
  } else if (shift) {
    y = _mm512_add_ps(y, sh);
  }
  if (act == kActRelu) {
    y = _mm512_max_ps(_mm512_setzero_ps(), y);  // y when y is NaN, as torch.relu
  } else if (act == kActPrelu) {
    const __mmask16 ge = _mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_GE_OQ);
    y = _mm512_mask_blend_ps(ge, _mm512_mul_ps(y, slope), y);
  }
  return y;
}

// Output channel o of images [n0, n0 + count): Y = A^T M A per tile, the epilogue, and the
// plane transposed back, two rows (16 values, 64 bytes) per image and store.
FSN_TARGET void transform_output(const WinogradS2Job& j, const WinogradS2Output& c, int64_t n0, int count, int64_t o,
                                 const float* __restrict m, float* __restrict ys) {
  const bool scale = c.scale != nullptr, shift = c.shift != nullptr;
  const Z sc = _mm512_set1_ps(scale ? c.scale[o] : 1.0f), sh = _mm512_set1_ps(shift ? c.shift[o] : 0.0f);
  const Z slope = _mm512_set1_ps(c.slope);
  const int64_t ms = s2_m_stride(c.out_w);
  for (int tile = 0; tile < kS2Tiles; ++tile) {
    const int ty = tile / 2, tx = tile % 2;
    Z y[4][4];
    transform_tile_output([&](int xi) FSN_TARGET { return _mm512_load_ps(m + xi * ms + o * 64 + tile * 16); }, y);
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
#pragma GCC unroll 4
      for (int jj = 0; jj < 4; ++jj) {
        _mm512_store_ps(ys + ((4 * ty + i) * 8 + 4 * tx + jj) * 16,
                        epilogue(y[i][jj], sc, sh, scale, shift, j.activation, slope));
      }
    }
  }
  float* out = j.out + (n0 * j.M + c.row0 + o) * 64;
  for (int hp = 0; hp < 4; ++hp) {  // rows 2 hp and 2 hp + 1
    Z r[16];
#pragma GCC unroll 16
    for (int k = 0; k < 16; ++k) r[k] = _mm512_load_ps(ys + (16 * hp + k) * 16);
    transpose16(r);  // r[n] = image n's two rows
    for (int n = 0; n < count; ++n) {
      float* dst = out + n * j.M * 64 + 16 * hp;
      if (j.stream_out) {
        store_stream512(dst, r[n]);
      } else {
        _mm512_storeu_ps(dst, r[n]);
      }
    }
  }
}

// --- the input gradient -------------------------------------------------------------------

// g channel o of images [n0, n0 + count) staged image-minor: two 8-value rows per load.
FSN_TARGET void stage_grad_plane(const WinogradS2GradJob& j, int64_t n0, int count, int64_t o, float* __restrict gt) {
  const float* base = j.g + n0 * j.g_sN + (j.g_c0 + o) * j.g_sC;
  for (int hp = 0; hp < 4; ++hp) {  // rows 2 hp and 2 hp + 1
    Z r[16];
#pragma GCC unroll 16
    for (int n = 0; n < 16; ++n) {
      if (n >= count) {
        r[n] = _mm512_setzero_ps();
      } else {
        const float* row = base + n * j.g_sN + 2 * hp * j.g_sH;
        r[n] = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(row)), _mm256_loadu_ps(row + j.g_sH), 1);
      }
    }
    transpose16(r);  // r[k] = value k of the two rows: (2 hp, k) for k < 8, (2 hp + 1, k - 8) after
#pragma GCC unroll 16
    for (int k = 0; k < 16; ++k) _mm512_store_ps(gt + (16 * hp + k) * 16, r[k]);
  }
}

// V of g channel o for the 4 tiles: 5x5 patches g[4 ty + r][4 tx + s] (zero past the plane).
FSN_TARGET void transform_grad_input(const WinogradS2GradJob& j, int64_t o, const float* __restrict gt,
                                     float* __restrict v) {
  const int64_t vs = s2g_v_stride(j);
  const Z zero = _mm512_setzero_ps();
  for (int tile = 0; tile < kS2Tiles; ++tile) {
    const int ty = tile / 2, tx = tile % 2;
    transform_patch(
        [&](int r, int s) FSN_TARGET {
          const int h = 4 * ty + r, w = 4 * tx + s;
          return (h < 8 && w < 8) ? _mm512_load_ps(gt + (h * 8 + w) * 16) : zero;
        },
        [&](int xi, Z value) FSN_TARGET { _mm512_store_ps(v + xi * vs + o * 64 + tile * 16, value); });
  }
}

// grad x channel c of images [n0, n0 + count): per phase and tile Y = A^T M A (M zero at the
// points the phase does not take), placed at (2 (4 ty + i) + p, 2 (4 tx + j) + q); then each
// row transposed back and stored (or added) as one 64-byte vector per image.
FSN_TARGET void transform_grad_output(const WinogradS2GradJob& j, int64_t n0, int count, int64_t c,
                                      const float* __restrict m, float* __restrict gxs) {
  const int64_t ms = s2g_m_stride(j);
  const Z zero = _mm512_setzero_ps();
  for (int pq = 0; pq < 4; ++pq) {
    const int p = pq / 2, q = pq % 2;
    // row of (xi, this phase) in M, or -1 where the phase does not take xi
    int64_t row[kS2Points];
    for (int xi = 0; xi < kS2Points; ++xi) {
      row[xi] = -1;
      for (int slot = 0; slot < s2g_phases(xi); ++slot) {
        if (s2g_phase(xi, slot) == pq) row[xi] = xi * ms + (slot * j.in_w + c) * 64;
      }
    }
    for (int tile = 0; tile < kS2Tiles; ++tile) {
      const int ty = tile / 2, tx = tile % 2;
      Z y[4][4];
      transform_tile_output([&](int xi) FSN_TARGET { return row[xi] >= 0 ? _mm512_load_ps(m + row[xi] + tile * 16) : zero; }, y);
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
#pragma GCC unroll 4
        for (int jj = 0; jj < 4; ++jj) {
          _mm512_store_ps(gxs + ((2 * (4 * ty + i) + p) * 16 + 2 * (4 * tx + jj) + q) * 16, y[i][jj]);
        }
      }
    }
  }
  float* out = j.gx + (n0 * j.C + j.x_c0 + c) * 256;
  for (int h = 0; h < 16; ++h) {
    Z r[16];
#pragma GCC unroll 16
    for (int w = 0; w < 16; ++w) r[w] = _mm512_load_ps(gxs + (h * 16 + w) * 16);
    transpose16(r);  // r[n] = image n's row h
    for (int n = 0; n < count; ++n) {
      float* dst = out + n * j.C * 256 + h * 16;
      _mm512_storeu_ps(dst, j.accumulate ? _mm512_add_ps(_mm512_loadu_ps(dst), r[n]) : r[n]);
    }
  }
}

}  // namespace

bool winograd_s2_grad_run_avx512(const WinogradS2GradJob& j, int64_t begin, int64_t end, float* scratch,
                                 double* lanes) {
  const Scratch s = carve(scratch, 64, s2g_v_stride(j), s2g_m_stride(j));
  ConvJob<float> gemm = *j.gemm;
  gemm.x = s.v;
  gemm.out = s.m;
  for (int64_t chunk = begin; chunk < end; ++chunk) {
    const int64_t n0 = chunk * kS2Images;
    const int count = static_cast<int>(std::min<int64_t>(kS2Images, j.N - n0));
    for (int64_t o = 0; o < j.out_w; ++o) {
      stage_grad_plane(j, n0, count, o, s.staged);
      transform_grad_input(j, o, s.staged, s.v);
    }
    run_items_avx512(gemm, 0, 1, s.v, lanes);
    for (int64_t c = 0; c < j.in_w; ++c) transform_grad_output(j, n0, count, c, s.m, s.planes);
  }
  return true;
}

bool winograd_s2_run_avx512(const WinogradS2Job& j, int64_t begin, int64_t end, float* scratch, double* lanes) {
  const Scratch s = carve(scratch, 256, s2_v_stride(j), s2_m_stride(j.max_out_w));
  for (int64_t chunk = begin; chunk < end; ++chunk) {
    const int64_t n0 = chunk * kS2Images;
    const int count = static_cast<int>(std::min<int64_t>(kS2Images, j.N - n0));
    for (int64_t c = 0; c < j.in_w; ++c) {
      stage_plane(j, n0, count, c, s.staged);
      transform_input(j, c, s.staged, s.v);
    }
    for (int64_t k = 0; k < j.num_outputs; ++k) {
      const WinogradS2Output& cand = j.outputs[k];
      ConvJob<float> gemm = *cand.gemm;
      gemm.x = s.v;
      gemm.out = s.m;
      run_items_avx512(gemm, 0, 1, s.v, lanes);
      for (int64_t o = 0; o < cand.out_w; ++o) transform_output(j, cand, n0, count, o, s.m, s.planes);
    }
  }
  if (j.stream_out) std::atomic_thread_fence(std::memory_order_seq_cst);  // order the streaming stores
  return true;
}

}  // namespace conv
}  // namespace fastsupernet

#else  // no x86-64 GCC/Clang build

namespace fastsupernet {
namespace conv {

bool winograd_s2_run_avx512(const WinogradS2Job&, int64_t, int64_t, float*, double*) { return false; }
bool winograd_s2_grad_run_avx512(const WinogradS2GradJob&, int64_t, int64_t, float*, double*) { return false; }

}  // namespace conv
}  // namespace fastsupernet

#endif

namespace fastsupernet {
namespace conv {

int64_t winograd_s2_scratch_floats(const WinogradS2Job& j) {
  // xt, V, M, ys (each a whole number of vectors) + 16: the caller aligns the base to 64 bytes
  return 256 * 16 + kS2Points * (s2_v_stride(j) + s2_m_stride(j.max_out_w)) + 64 * 16 + 16;
}

int64_t winograd_s2_grad_scratch_floats(const WinogradS2GradJob& j) {
  // gt, V, M, gxs + 16: the caller aligns the base to 64 bytes
  return 64 * 16 + kS2Points * (s2g_v_stride(j) + s2g_m_stride(j)) + 256 * 16 + 16;
}

}  // namespace conv
}  // namespace fastsupernet
