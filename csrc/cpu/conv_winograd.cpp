// Winograd kernels of fastsupernet::multi_conv2d (float32, AVX2 + FMA): F(2x2, 3x3) and
// F(4x4, 3x3); and F(4x4) transposed for the weight gradient (multi_conv2d_weight_grad, last
// section: dW = G^T [sum over tiles of (A dY A^T) . (B^T d B)] G, the same input transform,
// the gradient's 4x4 tiles transformed by A and stored with gradient rows contiguous, so that
// the reduction over tiles broadcasts input values into whole vectors of gradient rows).
//
// For a 3x3 stride-1 convolution with padding 1, each t x t output tile is
//   Y = A^T [ sum_c (G g_c G^T) . (B^T d_c B) ] A
// with d_c the (t+2) x (t+2) input patch of channel c, g_c the 3x3 filter, . the elementwise
// product: (t+2)^2 multiply-adds per channel per tile instead of 9 t^2 (F(2x2): 16 for 36,
// 2.25x fewer; F(4x4): 36 for 144, 4x fewer). Per chunk of images and segment (candidates
// reading one input slice):
//  1. the segment's channels are transformed once (V = B^T d B), stored as
//     V[xi][channel][tile], tiles contiguous (the chunk is sized so that V stays in L2);
//  2. per candidate and group of up to 48 tiles (24 without AVX-512), for each xi, the GEMM of
//     the transformed weights (U = G g G^T, per call, conv.cpp; a 4-row panel at a time) with
//     V's panel of those tiles, which stays in L1 for all the candidate's rows, into a buffer
//     M[xi][row][tile];
//  3. the output transform of that buffer, then the epilogue (statistics, scale/shift,
//     residual, activation) and the store, on vectors of 8 contiguous output pixels.
// Statistics are accumulated per (image, row) in a fixed order, so neither the chunking (it
// depends on the widest segment of the call) nor the thread count changes them; the output
// values of a candidate do not depend on the other candidates of the call either.
//
// Matrices. F(2x2): B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], G = [1 0 0; .5 .5 .5;
// .5 -.5 .5; 0 0 1], A^T = [1 1 1 0; 0 1 -1 -1]. F(4x4) (points 0, +-1, +-2):
// B^T = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0; 0 4 0 -5 0 1],
// G = [1/4 0 0; -1/6 -1/6 -1/6; -1/6 1/6 -1/6; 1/24 1/12 1/6; 1/24 -1/12 1/6; 0 0 1],
// A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1].
//
// Rounding (u = 2^-24): F(2x2): V values take 3 roundings, U one (computed in float64), the
// GEMM one FMA chain of in_width steps, the output transform 4 additions: the conv value
// before the epilogue is within (in_width + 8) u A_w (1 + O(u)) of the exact one, where A_w is
// the same algorithm run on absolute values (|A^T| [sum_c (|G| |g_c| |G^T|) . (|B^T| |d_c|
// |B|)] |A|). F(4x4): V 4 roundings (2 per direction), U one, the GEMM in_width, the output
// transform 6 (3 per direction): within (in_width + 11) u A_w. A_w is larger for F(4x4) (the
// matrices' entries reach 5 and 8): its errors are larger than F(2x2)'s, as in every
// implementation of it. tests/test_conv_winograd.py checks both bounds per element.

#include "cpu/conv_winograd.h"

#include "cpu/conv_plan.h"

#ifdef FASTSUPERNET_HAVE_AVX2

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*() and warn about it when inlined
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define FSN_TARGET __attribute__((target("avx2,fma")))
#define FSN_TARGET512 __attribute__((target("avx2,fma,avx512f,avx512dq,avx512vl")))
#define FSN_INLINE inline __attribute__((always_inline))

#include "cpu/conv_vec_avx2.h"  // Avx2Vec<float>::store_stream

namespace fastsupernet {
namespace conv {
namespace {

constexpr int kRowsW = kWinogradRows;  // output rows per register tile
constexpr int kVecsW = 6;      // vectors of 8 tiles per group on 512-bit registers
constexpr int kGroup = 8 * kVecsW;  // (256-bit: groups of 3 vectors, the register tile, as tuned on AVX2)

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

inline int xi_count(const WinogradJob& j) { return (j.tile + 2) * (j.tile + 2); }

struct Scratch {
  float* v;     // [xi][seg_width][pp]
  float* mb;    // [xi][rows, padded to 4][kGroup]
  float* rows;  // F(2x2): 16 arrays of tw + 16 values: even/odd columns of 4 patch rows, then their transforms
  int64_t* pair_base;  // F(4x4): per pair of tiles of a chunk, the offset of its patch's first row in x
  int64_t* pair_ty;    //   and its tile row
  int64_t mb_stride;   // floats per xi in mb
};

// Row stride of V for `used` tiles: whole vectors plus one, so that rows (and the 16 xi
// planes) are not a power of two apart, which would map them to a few L1 sets.
inline int64_t row_stride(int64_t used) { return round_up(used, 8) + 8; }

inline int64_t tiles_per_image(const WinogradJob& j) { return (j.H / j.tile) * (j.W / j.tile); }

int64_t max_pp(const WinogradJob& j) { return row_stride(j.images_per_chunk * tiles_per_image(j)); }

int64_t rows_floats(const WinogradJob& j) { return 16 * (j.W / 2 + 16); }

Scratch carve(const WinogradJob& j, float* base) {
  Scratch s;
  s.mb_stride = round_up(j.max_out_w, kRowsW) * kGroup;
  s.v = base;
  s.mb = s.v + xi_count(j) * j.max_seg_width * max_pp(j);
  s.rows = s.mb + xi_count(j) * s.mb_stride;
  // 8-byte aligned: the scratch is a float array from the heap (16-byte aligned)
  s.pair_base = reinterpret_cast<int64_t*>(s.rows + round_up(rows_floats(j), 2));
  s.pair_ty = s.pair_base + max_pp(j) / 2;
  return s;
}

// Tiles [used, pp) of each of `planes` rows of pp values: zero (read by the last vector).
void zero_tail(float* v, int64_t planes, int64_t pp, int64_t used) {
  if (used == pp) return;
  for (int64_t r = 0; r < planes; ++r) std::fill(v + r * pp + used, v + r * pp + pp, 0.0f);
}

// V = B^T d B for every tile of images [n0, n0 + nb) and channels [c0, c0 + width).
// Columns are split into even and odd padded columns: tile tx reads padded columns
// 2tx .. 2tx+3 = even[tx], odd[tx], even[tx+1], odd[tx+1]; padded column q is input column q-1.
FSN_TARGET void transform_input(const WinogradJob& j, int64_t c0, int64_t width, int64_t n0, int64_t nb, int64_t pp,
                                const Scratch& s) {
  const int64_t th = j.H / 2, tw = j.W / 2, tiles = th * tw, q = tw + 1;
  const int64_t stride = tw + 16;  // of the 16 arrays in s.rows
  float* ev[4];
  float* od[4];
  float* te[4];
  float* to[4];
  for (int i = 0; i < 4; ++i) {
    ev[i] = s.rows + (2 * i) * stride;
    od[i] = s.rows + (2 * i + 1) * stride;
    te[i] = s.rows + (8 + 2 * i) * stride;
    to[i] = s.rows + (8 + 2 * i + 1) * stride;
  }
  const int64_t plane = width * pp;
  for (int64_t nl = 0; nl < nb; ++nl) {
    for (int64_t c = 0; c < width; ++c) {
      const float* xc = j.x + (n0 + nl) * j.x_sN + (c0 + c) * j.x_sC;
      for (int64_t ty = 0; ty < th; ++ty) {
        for (int i = 0; i < 4; ++i) {
          const int64_t iy = 2 * ty - 1 + i;
          if (iy < 0 || iy >= j.H) {
            std::fill(ev[i], ev[i] + q, 0.0f);
            std::fill(od[i], od[i] + q, 0.0f);
            continue;
          }
          const float* row = xc + iy * j.x_sH;
          ev[i][0] = 0.0f;
          for (int64_t t = 1; t < q; ++t) ev[i][t] = row[(2 * t - 1) * j.x_sW];
          for (int64_t t = 0; t < tw; ++t) od[i][t] = row[2 * t * j.x_sW];
          od[i][tw] = 0.0f;
        }
        // B^T along y (patch rows), on the even and the odd columns
        for (int64_t t = 0; t < q; ++t) {
          te[0][t] = ev[0][t] - ev[2][t];
          te[1][t] = ev[1][t] + ev[2][t];
          te[2][t] = ev[2][t] - ev[1][t];
          te[3][t] = ev[1][t] - ev[3][t];
          to[0][t] = od[0][t] - od[2][t];
          to[1][t] = od[1][t] + od[2][t];
          to[2][t] = od[2][t] - od[1][t];
          to[3][t] = od[1][t] - od[3][t];
        }
        // B along x, stored at xi = 4 * iy + ix
        float* dst = s.v + c * pp + nl * tiles + ty * tw;
        for (int iy = 0; iy < 4; ++iy) {
          const float* e = te[iy];
          const float* o = to[iy];
          float* d0 = dst + (4 * iy) * plane;
          float* d1 = d0 + plane;
          float* d2 = d1 + plane;
          float* d3 = d2 + plane;
          for (int64_t t = 0; t < tw; ++t) {
            d0[t] = e[t] - e[t + 1];
            d1[t] = o[t] + e[t + 1];
            d2[t] = e[t + 1] - o[t];
            d3[t] = o[t] - o[t + 1];
          }
        }
      }
    }
  }
  zero_tail(s.v, 16 * width, pp, nb * tiles);
}

// (e[0..8), o[0..8)) = even and odd lanes of the 16 values (a, b).
FSN_TARGET FSN_INLINE void deinterleave(__m256 a, __m256 b, __m256& e, __m256& o) {
  // per 128-bit half: a0 a2 b0 b2 | a4 a6 b4 b6, then the 64-bit pairs in order
  e = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0))),
                                             _MM_SHUFFLE(3, 1, 2, 0)));
  o = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1))),
                                             _MM_SHUFFLE(3, 1, 2, 0)));
}

FSN_TARGET FSN_INLINE __m256i lane_mask(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// B along x: the 16 values of 8 tiles from (e0 = ev[t], e1 = ev[t + 1], o0 = od[t], o1 =
// od[t + 1]) of patch row iy, stored at d + xi * plane (n < 8: the first n lanes only).
FSN_TARGET FSN_INLINE void transform_x(__m256 e0, __m256 e1, __m256 o0, __m256 o1, float* d, int64_t plane, int64_t n) {
  const __m256 u[4] = {_mm256_sub_ps(e0, e1), _mm256_add_ps(o0, e1), _mm256_sub_ps(e1, o0), _mm256_sub_ps(o0, o1)};
  if (n == 8) {
    for (int ix = 0; ix < 4; ++ix) _mm256_storeu_ps(d + ix * plane, u[ix]);
  } else {
    const __m256i mask = lane_mask(n);
    for (int ix = 0; ix < 4; ++ix) _mm256_maskstore_ps(d + ix * plane, mask, u[ix]);
  }
}

// B^T along y on 8 input columns from `col` of the 4 patch rows (nullptr: zero padding).
FSN_TARGET FSN_INLINE void transform_y8(const float* const* row, int64_t col, __m256* t) {
  __m256 a[4];
  for (int i = 0; i < 4; ++i) a[i] = row[i] != nullptr ? _mm256_loadu_ps(row[i] + col) : _mm256_setzero_ps();
  t[0] = _mm256_sub_ps(a[0], a[2]);
  t[1] = _mm256_add_ps(a[1], a[2]);
  t[2] = _mm256_sub_ps(a[2], a[1]);
  t[3] = _mm256_sub_ps(a[1], a[3]);
}

FSN_TARGET FSN_INLINE void patch_rows(const WinogradJob& j, const float* xc, int64_t ty, const float** row) {
  for (int i = 0; i < 4; ++i) {
    const int64_t iy = 2 * ty - 1 + i;
    row[i] = iy >= 0 && iy < j.H ? xc + iy * j.x_sH : nullptr;
  }
}

// The input transform for rows of unit stride (W % 8 == 0), vectorised; the same arithmetic,
// in the same order, as transform_input's scalar loops. Per tile row, the y-transformed
// even and odd input columns are the padded columns od[t] and ev[t + 1]; ev[t] and od[t + 1]
// are the same vectors moved by one lane, with the neighbouring block's value (or zero)
// shifted in: no store is read back at another offset. W = 8: two tile rows per vector.
FSN_TARGET void transform_input_rows(const WinogradJob& j, int64_t c0, int64_t width, int64_t n0, int64_t nb,
                                     int64_t pp, const Scratch& s) {
  const int64_t th = j.H / 2, tw = j.W / 2, tiles = th * tw, blocks = j.W / 16;
  const int64_t plane = width * pp;
  const __m256i right = _mm256_setr_epi32(7, 0, 1, 2, 3, 4, 5, 6), left = _mm256_setr_epi32(1, 2, 3, 4, 5, 6, 7, 0);
  const __m256 zero = _mm256_setzero_ps();
  float* even = s.rows;              // [iy][block][8]: y-transformed even input columns
  float* odd = s.rows + 4 * tw;      // [iy][block][8]: odd input columns
  // images outer, channels inner: the planes of an image are read in memory order
  for (int64_t nl = 0; nl < nb; ++nl) {
    for (int64_t c = 0; c < width; ++c) {
      const float* xc = j.x + (n0 + nl) * j.x_sN + (c0 + c) * j.x_sC;
      float* dst = s.v + c * pp + nl * tiles;
      const float* row[4];
      if (j.W == 8) {
        for (int64_t ty = 0; ty < th; ty += 2) {
          const bool pair = ty + 1 < th;
          __m256 ta[4], tb[4] = {zero, zero, zero, zero};
          patch_rows(j, xc, ty, row);
          transform_y8(row, 0, ta);
          if (pair) {
            patch_rows(j, xc, ty + 1, row);
            transform_y8(row, 0, tb);
          }
          for (int iy = 0; iy < 4; ++iy) {
            __m256 e, o;
            deinterleave(ta[iy], tb[iy], e, o);  // tile row ty in the low half, ty + 1 in the high
            const __m256 e0 = _mm256_castsi256_ps(_mm256_slli_si256(_mm256_castps_si256(o), 4));
            const __m256 o1 = _mm256_castsi256_ps(_mm256_srli_si256(_mm256_castps_si256(e), 4));
            transform_x(e0, o, e, o1, dst + ty * tw + (4 * iy) * plane, plane, pair ? 8 : 4);
          }
        }
        continue;
      }
      for (int64_t ty = 0; ty < th; ++ty) {
        patch_rows(j, xc, ty, row);
        for (int64_t b = 0; b < blocks; ++b) {
          __m256 ta[4], tb[4];
          transform_y8(row, 16 * b, ta);
          transform_y8(row, 16 * b + 8, tb);
          for (int iy = 0; iy < 4; ++iy) {
            __m256 e, o;
            deinterleave(ta[iy], tb[iy], e, o);
            _mm256_storeu_ps(even + (iy * blocks + b) * 8, e);
            _mm256_storeu_ps(odd + (iy * blocks + b) * 8, o);
          }
        }
        for (int64_t b = 0; b < blocks; ++b) {
          for (int iy = 0; iy < 4; ++iy) {
            const __m256 e = _mm256_loadu_ps(even + (iy * blocks + b) * 8);
            const __m256 o = _mm256_loadu_ps(odd + (iy * blocks + b) * 8);
            const __m256 o_prev = b > 0 ? _mm256_loadu_ps(odd + (iy * blocks + b - 1) * 8) : zero;
            const __m256 e_next = b + 1 < blocks ? _mm256_loadu_ps(even + (iy * blocks + b + 1) * 8) : zero;
            const __m256 e0 = _mm256_blend_ps(_mm256_permutevar8x32_ps(o, right),
                                              _mm256_permutevar8x32_ps(o_prev, right), 0x01);
            const __m256 o1 = _mm256_blend_ps(_mm256_permutevar8x32_ps(e, left),
                                              _mm256_permutevar8x32_ps(e_next, left), 0x80);
            transform_x(e0, o, e, o1, dst + ty * tw + 8 * b + (4 * iy) * plane, plane, 8);
          }
        }
      }
    }
  }
  zero_tail(s.v, 16 * width, pp, nb * tiles);
}

// --- F(4x4, 3x3) ---------------------------------------------------------------------------

// t = B^T d for F(4x4) on six vectors (2 roundings on every path).
FSN_TARGET FSN_INLINE void bt6(const __m256* d, __m256* t) {
  const __m256 two = _mm256_set1_ps(2.0f), four = _mm256_set1_ps(4.0f), five = _mm256_set1_ps(5.0f);
  t[0] = _mm256_fmadd_ps(four, d[0], _mm256_fnmadd_ps(five, d[2], d[4]));
  const __m256 s12 = _mm256_add_ps(d[1], d[2]), s34 = _mm256_add_ps(d[3], d[4]);
  t[1] = _mm256_fnmadd_ps(four, s12, s34);
  const __m256 d12 = _mm256_sub_ps(d[1], d[2]), d43 = _mm256_sub_ps(d[4], d[3]);
  t[2] = _mm256_fmadd_ps(four, d12, d43);
  const __m256 d31 = _mm256_sub_ps(d[3], d[1]), d42 = _mm256_sub_ps(d[4], d[2]);
  t[3] = _mm256_fmadd_ps(two, d31, d42);
  t[4] = _mm256_fnmadd_ps(two, d31, d42);
  t[5] = _mm256_fmadd_ps(four, d[1], _mm256_fnmadd_ps(five, d[3], d[5]));
}

// y = A^T m for F(4x4) on six vectors (3 roundings on every path).
FSN_TARGET FSN_INLINE void at6(const __m256* m, __m256* y) {
  const __m256 a = _mm256_add_ps(m[1], m[2]), b = _mm256_sub_ps(m[1], m[2]);
  const __m256 c = _mm256_add_ps(m[3], m[4]), d = _mm256_sub_ps(m[3], m[4]);
  y[0] = _mm256_add_ps(_mm256_add_ps(m[0], a), c);
  y[1] = _mm256_fmadd_ps(_mm256_set1_ps(2.0f), d, b);
  y[2] = _mm256_fmadd_ps(_mm256_set1_ps(4.0f), c, a);
  y[3] = _mm256_add_ps(_mm256_fmadd_ps(_mm256_set1_ps(8.0f), d, b), m[5]);
}

// Lane of tile g (0..7) of a group: even tiles in lanes 0-3, odd ones in 4-7.
constexpr int lane4(int g) { return g / 2 + 4 * (g % 2); }

// The per-chunk table of tile pairs: pair i = tiles 2i, 2i+1 (one tile row: W/4 is even).
void pair_table(const WinogradJob& j, int64_t n0, int64_t used, const Scratch& s) {
  const int64_t tw = j.W / 4, tiles = tiles_per_image(j);
  for (int64_t i = 0; i < used / 2; ++i) {
    const int64_t p = 2 * i, n = p / tiles, ty = (p % tiles) / tw, tx = p % tw;
    s.pair_base[i] = (n0 + n) * j.x_sN + (4 * ty - 1) * j.x_sH + 4 * tx;
    s.pair_ty[i] = ty;
  }
}

// Lane shifts of an F(4x4) group: column 4tx-1 of tile g is column 4tx+3 of tile g-1 (zero
// where g starts a tile row), column 4tx+4 is column 4tx of tile g+1 (zero where g ends one).
struct LaneShifts {
  alignas(64) int prev_idx[16], next_idx[16], prev_keep[16], next_keep[16];
  explicit LaneShifts(int64_t tw) {
    for (int h = 0; h < 2; ++h) {  // the two 8-tile halves of a 512-bit register
      for (int g = 0; g < 8; ++g) {
        const int l = 8 * h + lane4(g);
        prev_idx[l] = 8 * h + lane4(g > 0 ? g - 1 : 0);
        next_idx[l] = 8 * h + lane4(g < 7 ? g + 1 : 7);
        prev_keep[l] = g % tw != 0 ? -1 : 0;
        next_keep[l] = g % tw != tw - 1 ? -1 : 0;
      }
    }
  }
};

// The 6 patch rows of pair pi of channel plane xc (zero outside the image or past the chunk).
FSN_TARGET FSN_INLINE void patch_pair(const WinogradJob& j, const float* xc, int64_t pi, int64_t used,
                                      const Scratch& s, __m256* d) {
  if (2 * pi >= used) {
    for (int py = 0; py < 6; ++py) d[py] = _mm256_setzero_ps();
    return;
  }
  const float* base = xc + s.pair_base[pi];
  const int64_t ty = s.pair_ty[pi], th = j.H / 4;
  for (int py = 0; py < 6; ++py) {
    const bool outside = (py == 0 && ty == 0) || (py == 5 && ty == th - 1);
    d[py] = outside ? _mm256_setzero_ps() : _mm256_loadu_ps(base + py * j.x_sH);
  }
}

// Input transform of group g (8 tiles) of one channel into vc (that channel's V row).
FSN_TARGET void input_group_f4(const WinogradJob& j, const float* xc, int64_t g, int64_t used, int64_t plane,
                               const Scratch& s, const LaneShifts& ls, float* vc) {
  alignas(32) float tb[6][4][8];  // B^T along y: [patch row][pair][8 columns]
  for (int q = 0; q < 4; ++q) {
    __m256 d[6], t[6];
    patch_pair(j, xc, 4 * g + q, used, s, d);
    bt6(d, t);
    for (int iy = 0; iy < 6; ++iy) _mm256_store_ps(tb[iy][q], t[iy]);
  }
  const __m256i pidx = _mm256_load_si256(reinterpret_cast<const __m256i*>(ls.prev_idx));
  const __m256i nidx = _mm256_load_si256(reinterpret_cast<const __m256i*>(ls.next_idx));
  const __m256 pkeep = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(ls.prev_keep)));
  const __m256 nkeep = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(ls.next_keep)));
  for (int iy = 0; iy < 6; ++iy) {
    const __m256 a = _mm256_load_ps(tb[iy][0]), b = _mm256_load_ps(tb[iy][1]);
    const __m256 c = _mm256_load_ps(tb[iy][2]), d = _mm256_load_ps(tb[iy][3]);
    const __m256 u0 = _mm256_unpacklo_ps(a, b), u1 = _mm256_unpacklo_ps(c, d);
    const __m256 u2 = _mm256_unpackhi_ps(a, b), u3 = _mm256_unpackhi_ps(c, d);
    __m256 p[6], o[6];
    p[1] = _mm256_shuffle_ps(u0, u1, _MM_SHUFFLE(1, 0, 1, 0));  // column 4tx
    p[2] = _mm256_shuffle_ps(u0, u1, _MM_SHUFFLE(3, 2, 3, 2));
    p[3] = _mm256_shuffle_ps(u2, u3, _MM_SHUFFLE(1, 0, 1, 0));
    p[4] = _mm256_shuffle_ps(u2, u3, _MM_SHUFFLE(3, 2, 3, 2));  // column 4tx + 3
    p[0] = _mm256_and_ps(_mm256_permutevar8x32_ps(p[4], pidx), pkeep);
    p[5] = _mm256_and_ps(_mm256_permutevar8x32_ps(p[1], nidx), nkeep);
    bt6(p, o);
    for (int ix = 0; ix < 6; ++ix) _mm256_storeu_ps(vc + (6 * iy + ix) * plane + 8 * g, o[ix]);
  }
}

// bt6 and at6 on 512-bit registers: the same operations lane by lane.
FSN_TARGET512 FSN_INLINE void bt6(const __m512* d, __m512* t) {
  const __m512 two = _mm512_set1_ps(2.0f), four = _mm512_set1_ps(4.0f), five = _mm512_set1_ps(5.0f);
  t[0] = _mm512_fmadd_ps(four, d[0], _mm512_fnmadd_ps(five, d[2], d[4]));
  const __m512 s12 = _mm512_add_ps(d[1], d[2]), s34 = _mm512_add_ps(d[3], d[4]);
  t[1] = _mm512_fnmadd_ps(four, s12, s34);
  const __m512 d12 = _mm512_sub_ps(d[1], d[2]), d43 = _mm512_sub_ps(d[4], d[3]);
  t[2] = _mm512_fmadd_ps(four, d12, d43);
  const __m512 d31 = _mm512_sub_ps(d[3], d[1]), d42 = _mm512_sub_ps(d[4], d[2]);
  t[3] = _mm512_fmadd_ps(two, d31, d42);
  t[4] = _mm512_fnmadd_ps(two, d31, d42);
  t[5] = _mm512_fmadd_ps(four, d[1], _mm512_fnmadd_ps(five, d[3], d[5]));
}

FSN_TARGET512 FSN_INLINE void at6(const __m512* m, __m512* y) {
  const __m512 a = _mm512_add_ps(m[1], m[2]), b = _mm512_sub_ps(m[1], m[2]);
  const __m512 c = _mm512_add_ps(m[3], m[4]), d = _mm512_sub_ps(m[3], m[4]);
  y[0] = _mm512_add_ps(_mm512_add_ps(m[0], a), c);
  y[1] = _mm512_fmadd_ps(_mm512_set1_ps(2.0f), d, b);
  y[2] = _mm512_fmadd_ps(_mm512_set1_ps(4.0f), c, a);
  y[3] = _mm512_add_ps(_mm512_fmadd_ps(_mm512_set1_ps(8.0f), d, b), m[5]);
}

// input_group_f4 for groups g and g + 1 at once: group g in the low 256 bits of each register,
// g + 1 in the high ones (the in-lane shuffles act on each half alike).
FSN_TARGET512 void input_groups2_f4(const WinogradJob& j, const float* xc, int64_t g, int64_t used,
                                    int64_t plane, const Scratch& s, const LaneShifts& ls, float* vc) {
  alignas(64) float tb[6][4][16];
  for (int q = 0; q < 4; ++q) {
    __m256 lo[6], hi[6];
    patch_pair(j, xc, 4 * g + q, used, s, lo);
    patch_pair(j, xc, 4 * (g + 1) + q, used, s, hi);
    __m512 d[6], t[6];
    for (int py = 0; py < 6; ++py) d[py] = _mm512_insertf32x8(_mm512_castps256_ps512(lo[py]), hi[py], 1);
    bt6(d, t);
    for (int iy = 0; iy < 6; ++iy) _mm512_store_ps(tb[iy][q], t[iy]);
  }
  const __m512i pidx = _mm512_load_si512(ls.prev_idx), nidx = _mm512_load_si512(ls.next_idx);
  const __mmask16 pkeep = _mm512_movepi32_mask(_mm512_load_si512(ls.prev_keep));
  const __mmask16 nkeep = _mm512_movepi32_mask(_mm512_load_si512(ls.next_keep));
  for (int iy = 0; iy < 6; ++iy) {
    const __m512 a = _mm512_load_ps(tb[iy][0]), b = _mm512_load_ps(tb[iy][1]);
    const __m512 c = _mm512_load_ps(tb[iy][2]), d = _mm512_load_ps(tb[iy][3]);
    const __m512 u0 = _mm512_unpacklo_ps(a, b), u1 = _mm512_unpacklo_ps(c, d);
    const __m512 u2 = _mm512_unpackhi_ps(a, b), u3 = _mm512_unpackhi_ps(c, d);
    __m512 p[6], o[6];
    p[1] = _mm512_shuffle_ps(u0, u1, _MM_SHUFFLE(1, 0, 1, 0));
    p[2] = _mm512_shuffle_ps(u0, u1, _MM_SHUFFLE(3, 2, 3, 2));
    p[3] = _mm512_shuffle_ps(u2, u3, _MM_SHUFFLE(1, 0, 1, 0));
    p[4] = _mm512_shuffle_ps(u2, u3, _MM_SHUFFLE(3, 2, 3, 2));
    p[0] = _mm512_maskz_permutexvar_ps(pkeep, pidx, p[4]);
    p[5] = _mm512_maskz_permutexvar_ps(nkeep, nidx, p[1]);
    bt6(p, o);
    for (int ix = 0; ix < 6; ++ix) _mm512_storeu_ps(vc + (6 * iy + ix) * plane + 8 * g, o[ix]);
  }
}

// V = B^T d B of every tile of the chunk (pair_table filled), channels [c0, c0 + width), for
// W = 8, 16 or 32 (a group of 8 tiles is 8 / (W/4) whole tile rows) and x_sW == 1. Per group
// and channel: B^T along y on the pairs' 8 input columns (patch rows outside the image are
// zero), then a 4x4 transpose per patch row gives the vectors of input columns 4tx .. 4tx+3
// over the 8 tiles; columns 4tx-1 and 4tx+4 are the neighbouring tile's (zero at the row ends).
// With AVX-512, two groups per step (the same values).
void transform_input_f4(const WinogradJob& j, int64_t c0, int64_t width, int64_t used, int64_t pp,
                        const Scratch& s) {
  const int64_t plane = width * pp, groups = (used + 7) / 8;
  const LaneShifts ls(j.W / 4);
  for (int64_t c = 0; c < width; ++c) {
    const float* xc = j.x + (c0 + c) * j.x_sC;
    float* vc = s.v + c * pp;
    int64_t g = 0;
    if (j.wide) {
      for (; g + 1 < groups; g += 2) input_groups2_f4(j, xc, g, used, plane, s, ls, vc);
    }
    for (; g < groups; ++g) input_group_f4(j, xc, g, used, plane, s, ls, vc);
  }
  zero_tail(s.v, 36 * width, pp, groups * 8);
}

// mb[r][v*8 ..] = sum_c ub[c][r] * vb[c][v*8 ..], r < 4, v < NV (mb rows kGroup apart).
template <int NV>
FSN_TARGET FSN_INLINE void gemm_tile(const float* __restrict ub, const float* __restrict vb, int64_t pp,
                                     int64_t depth, float* __restrict mb) {
  __m256 acc[kRowsW][NV];
  for (int r = 0; r < kRowsW; ++r) {
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  }
  for (int64_t c = 0; c < depth; ++c) {
    __m256 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm256_loadu_ps(vb + c * pp + 8 * v);
    for (int r = 0; r < kRowsW; ++r) {
      const __m256 a = _mm256_broadcast_ss(ub + 4 * c + r);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(a, b[v], acc[r][v]);
    }
  }
  for (int r = 0; r < kRowsW; ++r) {
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(mb + r * kGroup + 8 * v, acc[r][v]);
  }
}

// gemm_tile on 512-bit registers, for NV <= kVecsW vectors of 8 tiles: NV / 2 vectors of 16
// contiguous tiles and, for odd NV, one of 8; the 4 row weights of a channel are broadcast
// once each and serve every vector. Every output is the same chain of fused multiply-adds as
// in gemm_tile (the same values), with 16 lanes per instruction and no shuffles.
template <int NV>
FSN_TARGET512 void gemm_tile_wide(
    const float* __restrict ub, const float* __restrict vb, int64_t pp, int64_t depth, float* __restrict mb) {
  constexpr int NZ = NV / 2;
  constexpr bool kHalf = NV % 2 != 0;
  __m512 acc[kRowsW][NZ > 0 ? NZ : 1];
  __m256 acch[kRowsW];
  for (int r = 0; r < kRowsW; ++r) {
    for (int z = 0; z < NZ; ++z) acc[r][z] = _mm512_setzero_ps();
    acch[r] = _mm256_setzero_ps();
  }
  for (int64_t c = 0; c < depth; ++c) {
    __m512 a[kRowsW];
    for (int r = 0; r < kRowsW; ++r) a[r] = _mm512_set1_ps(ub[4 * c + r]);
    const float* v = vb + c * pp;
    for (int z = 0; z < NZ; ++z) {
      const __m512 b = _mm512_loadu_ps(v + 16 * z);
      for (int r = 0; r < kRowsW; ++r) acc[r][z] = _mm512_fmadd_ps(a[r], b, acc[r][z]);
    }
    if constexpr (kHalf) {
      const __m256 b = _mm256_loadu_ps(v + 16 * NZ);
      for (int r = 0; r < kRowsW; ++r) acch[r] = _mm256_fmadd_ps(_mm512_castps512_ps256(a[r]), b, acch[r]);
    }
  }
  for (int r = 0; r < kRowsW; ++r) {
    for (int z = 0; z < NZ; ++z) _mm512_storeu_ps(mb + r * kGroup + 16 * z, acc[r][z]);
    if constexpr (kHalf) _mm256_storeu_ps(mb + r * kGroup + 16 * NZ, acch[r]);
  }
}

struct RowEpilogue {
  __m256 sc, sh, sl;
  bool has_scale, has_shift, stream;
  int act;
};

// The epilogue constants of output row `orow`.
FSN_TARGET FSN_INLINE RowEpilogue row_epilogue(const WinogradJob& j, int64_t orow) {
  RowEpilogue e;
  e.has_scale = j.scale != nullptr;
  e.has_shift = j.shift != nullptr;
  e.sc = _mm256_set1_ps(e.has_scale ? j.scale[orow] : 1.0f);
  e.sh = _mm256_set1_ps(e.has_shift ? j.shift[orow] : 0.0f);
  e.sl = _mm256_set1_ps(j.slope != nullptr ? j.slope[orow] : 0.0f);
  e.act = j.activation;
  e.stream = j.stream_out;
  return e;
}

// Statistics (added to the image's lanes l[0..4) and l[4..8), vector by vector), epilogue and
// store of 8 contiguous output pixels at `o`.
FSN_TARGET FSN_INLINE void emit(const RowEpilogue& e, float* o, const float* res, __m256 y, double* l) {
  if (l != nullptr) {
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(y));
    const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(y, 1));
    _mm256_storeu_pd(l, _mm256_add_pd(_mm256_add_pd(_mm256_loadu_pd(l), lo), hi));
    _mm256_storeu_pd(l + 4, _mm256_fmadd_pd(hi, hi, _mm256_fmadd_pd(lo, lo, _mm256_loadu_pd(l + 4))));
  }
  if (e.has_scale) {
    y = e.has_shift ? _mm256_fmadd_ps(y, e.sc, e.sh) : _mm256_mul_ps(y, e.sc);
  } else if (e.has_shift) {
    y = _mm256_add_ps(y, e.sh);
  }
  if (res != nullptr) y = _mm256_add_ps(y, _mm256_loadu_ps(res));
  if (e.act == kActRelu) {
    y = _mm256_max_ps(_mm256_setzero_ps(), y);
  } else if (e.act == kActPrelu) {
    const __m256 ge = _mm256_cmp_ps(y, _mm256_setzero_ps(), _CMP_GE_OQ);
    y = _mm256_blendv_ps(_mm256_mul_ps(y, e.sl), y, ge);
  }
  if (e.stream) {
    Avx2Vec<float>::store_stream(o, y);
  } else {
    _mm256_storeu_ps(o, y);
  }
}

// Output transform of the GEMM buffer for `rows` rows starting at output row `row`, tiles
// [p0, p0 + 8 NV) of the chunk (those below `tiles_used`), then epilogue and store; with
// `lanes`, the statistics of (chunk image i, row r) go to lanes + (i * rows + r) * 8.
template <int NV>
FSN_TARGET void output_group(const WinogradJob& j, const float* __restrict mb, int64_t mb_stride, int64_t rows,
                             int64_t row, int64_t p0, int64_t tiles_used, float* chunk_out, double* lanes) {
  const int64_t hw = j.H * j.W, tiles = (j.H / 2) * (j.W / 2);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t orow = row + r;
    const RowEpilogue e = row_epilogue(j, orow);
    float* out_row = chunk_out + orow * hw;
    const float* res_row = j.residual != nullptr ? j.residual + (chunk_out - j.out) + orow * hw : nullptr;
    for (int v = 0; v < NV; ++v) {
      const int64_t p = p0 + 8 * v;
      if (p >= tiles_used) break;
      const float* m = mb + r * kGroup + 8 * v;
      __m256 s0[4], s1[4];
      for (int ix = 0; ix < 4; ++ix) {
        const __m256 m0 = _mm256_loadu_ps(m + (0 + ix) * mb_stride);
        const __m256 m1 = _mm256_loadu_ps(m + (4 + ix) * mb_stride);
        const __m256 m2 = _mm256_loadu_ps(m + (8 + ix) * mb_stride);
        const __m256 m3 = _mm256_loadu_ps(m + (12 + ix) * mb_stride);
        s0[ix] = _mm256_add_ps(_mm256_add_ps(m0, m1), m2);
        s1[ix] = _mm256_sub_ps(_mm256_sub_ps(m1, m2), m3);
      }
      const __m256 y00 = _mm256_add_ps(_mm256_add_ps(s0[0], s0[1]), s0[2]);
      const __m256 y01 = _mm256_sub_ps(_mm256_sub_ps(s0[1], s0[2]), s0[3]);
      const __m256 y10 = _mm256_add_ps(_mm256_add_ps(s1[0], s1[1]), s1[2]);
      const __m256 y11 = _mm256_sub_ps(_mm256_sub_ps(s1[1], s1[2]), s1[3]);
      // interleave columns: lanes 0-3 (one quad) and lanes 4-7 (the next) as 8 pixels each
      const __m256 lo0 = _mm256_unpacklo_ps(y00, y01), hi0 = _mm256_unpackhi_ps(y00, y01);
      const __m256 lo1 = _mm256_unpacklo_ps(y10, y11), hi1 = _mm256_unpackhi_ps(y10, y11);
      const __m256 top[2] = {_mm256_permute2f128_ps(lo0, hi0, 0x20), _mm256_permute2f128_ps(lo0, hi0, 0x31)};
      const __m256 bot[2] = {_mm256_permute2f128_ps(lo1, hi1, 0x20), _mm256_permute2f128_ps(lo1, hi1, 0x31)};
      for (int h = 0; h < 2; ++h) {
        const int64_t t = p + 4 * h;
        if (t >= tiles_used) break;
        const int64_t off = j.block_off[t / 4];
        double* l = lanes != nullptr ? lanes + ((t / tiles) * rows + r) * 8 : nullptr;
        emit(e, out_row + off, res_row != nullptr ? res_row + off : nullptr, top[h], l);
        emit(e, out_row + off + j.W, res_row != nullptr ? res_row + off + j.W : nullptr, bot[h], l);
      }
    }
  }
}

// The F(4x4) output transform of 8 tiles (lane4 order) of one row of the GEMM buffer, from m:
// runs[output row in tile][pair] = 8 contiguous output pixels.
FSN_TARGET FSN_INLINE void output_runs_f4(const float* m, int64_t mb_stride, __m256 runs[4][4]) {
  __m256 sy[4][6];  // A^T along y: [output row in tile][x index]
  for (int ix = 0; ix < 6; ++ix) {
    __m256 col[6], y[4];
    for (int iy = 0; iy < 6; ++iy) col[iy] = _mm256_loadu_ps(m + (6 * iy + ix) * mb_stride);
    at6(col, y);
    for (int yr = 0; yr < 4; ++yr) sy[yr][ix] = y[yr];
  }
  for (int yr = 0; yr < 4; ++yr) {
    __m256 y[4];
    at6(sy[yr], y);
    const __m256 v0 = _mm256_unpacklo_ps(y[0], y[1]), v1 = _mm256_unpacklo_ps(y[2], y[3]);
    const __m256 v2 = _mm256_unpackhi_ps(y[0], y[1]), v3 = _mm256_unpackhi_ps(y[2], y[3]);
    runs[yr][0] = _mm256_shuffle_ps(v0, v1, _MM_SHUFFLE(1, 0, 1, 0));
    runs[yr][1] = _mm256_shuffle_ps(v0, v1, _MM_SHUFFLE(3, 2, 3, 2));
    runs[yr][2] = _mm256_shuffle_ps(v2, v3, _MM_SHUFFLE(1, 0, 1, 0));
    runs[yr][3] = _mm256_shuffle_ps(v2, v3, _MM_SHUFFLE(3, 2, 3, 2));
  }
}

// output_runs_f4 for 16 tiles (two groups of 8: runs of the first group, then the second's).
FSN_TARGET512 FSN_INLINE void output_runs2_f4(const float* m, int64_t mb_stride, __m256 runs[2][4][4]) {
  __m512 sy[4][6];
  for (int ix = 0; ix < 6; ++ix) {
    __m512 col[6], y[4];
    for (int iy = 0; iy < 6; ++iy) col[iy] = _mm512_loadu_ps(m + (6 * iy + ix) * mb_stride);
    at6(col, y);
    for (int yr = 0; yr < 4; ++yr) sy[yr][ix] = y[yr];
  }
  for (int yr = 0; yr < 4; ++yr) {
    __m512 y[4];
    at6(sy[yr], y);
    const __m512 v0 = _mm512_unpacklo_ps(y[0], y[1]), v1 = _mm512_unpacklo_ps(y[2], y[3]);
    const __m512 v2 = _mm512_unpackhi_ps(y[0], y[1]), v3 = _mm512_unpackhi_ps(y[2], y[3]);
    const __m512 r[4] = {_mm512_shuffle_ps(v0, v1, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(v0, v1, _MM_SHUFFLE(3, 2, 3, 2)),
                         _mm512_shuffle_ps(v2, v3, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(v2, v3, _MM_SHUFFLE(3, 2, 3, 2))};
    for (int q = 0; q < 4; ++q) {
      runs[0][yr][q] = _mm512_castps512_ps256(r[q]);
      runs[1][yr][q] = _mm512_extractf32x8_ps(r[q], 1);
    }
  }
}

// Statistics, epilogue and store of the runs of the 8 tiles from p (per pair of tiles: 8
// contiguous pixels in each of 4 rows, the rows of a pair in order), row r of `rows`.
FSN_TARGET FSN_INLINE void emit_runs_f4(const WinogradJob& j, const RowEpilogue& e, const __m256 runs[4][4],
                                        int64_t p, int64_t tiles_used, int64_t rows, int64_t r, float* out_row,
                                        const float* res_row, double* lanes) {
  const int64_t tiles = tiles_per_image(j);
  for (int q = 0; q < 4; ++q) {
    const int64_t t = p + 2 * q;
    if (t >= tiles_used) break;
    const int64_t off = j.block_off[t / 2];
    double* l = lanes != nullptr ? lanes + ((t / tiles) * rows + r) * 8 : nullptr;
    for (int yr = 0; yr < 4; ++yr) {
      const int64_t o = off + yr * j.W;
      emit(e, out_row + o, res_row != nullptr ? res_row + o : nullptr, runs[yr][q], l);
    }
  }
}

// output_group for F(4x4): the same job on groups of 8 tiles in lane4 order. Every image's
// statistics add in the same order in both builds below.
template <int NV>
FSN_TARGET void output_group_f4(const WinogradJob& j, const float* __restrict mb, int64_t mb_stride, int64_t rows,
                                int64_t row, int64_t p0, int64_t tiles_used, float* chunk_out, double* lanes) {
  const int64_t hw = j.H * j.W;
  for (int64_t r = 0; r < rows; ++r) {
    const RowEpilogue e = row_epilogue(j, row + r);
    float* out_row = chunk_out + (row + r) * hw;
    const float* res_row = j.residual != nullptr ? j.residual + (chunk_out - j.out) + (row + r) * hw : nullptr;
    for (int v = 0; v < NV && p0 + 8 * v < tiles_used; ++v) {
      __m256 runs[4][4];
      output_runs_f4(mb + r * kGroup + 8 * v, mb_stride, runs);
      emit_runs_f4(j, e, runs, p0 + 8 * v, tiles_used, rows, r, out_row, res_row, lanes);
    }
  }
}

// The same with two groups per step on 512-bit registers (CPUs with AVX-512 F/DQ/VL).
template <int NV>
FSN_TARGET512 void output_group_f4_wide(const WinogradJob& j, const float* __restrict mb, int64_t mb_stride,
                                        int64_t rows, int64_t row, int64_t p0, int64_t tiles_used, float* chunk_out,
                                        double* lanes) {
  const int64_t hw = j.H * j.W;
  for (int64_t r = 0; r < rows; ++r) {
    const RowEpilogue e = row_epilogue(j, row + r);
    float* out_row = chunk_out + (row + r) * hw;
    const float* res_row = j.residual != nullptr ? j.residual + (chunk_out - j.out) + (row + r) * hw : nullptr;
    for (int v = 0; v < NV && p0 + 8 * v < tiles_used;) {
      const float* m = mb + r * kGroup + 8 * v;
      if (v + 1 < NV && p0 + 8 * (v + 1) < tiles_used) {
        __m256 runs[2][4][4];
        output_runs2_f4(m, mb_stride, runs);
        emit_runs_f4(j, e, runs[0], p0 + 8 * v, tiles_used, rows, r, out_row, res_row, lanes);
        emit_runs_f4(j, e, runs[1], p0 + 8 * (v + 1), tiles_used, rows, r, out_row, res_row, lanes);
        v += 2;
      } else {
        __m256 runs[4][4];
        output_runs_f4(m, mb_stride, runs);
        emit_runs_f4(j, e, runs, p0 + 8 * v, tiles_used, rows, r, out_row, res_row, lanes);
        v += 1;
      }
    }
  }
}

// One candidate, one group of NV vectors of tiles from p0: the 16 GEMMs (every 4-row panel
// against V's panel, which stays in L1), then the output transform and epilogue.
template <int NV>
FSN_TARGET void run_group(const WinogradJob& j, int64_t k, const float* v, int64_t pp, int64_t width,
                          const Scratch& s, int64_t p0, int64_t tiles_used, float* chunk_out, double* lanes) {
  const int64_t depth = j.in_w[k], blocks = (j.out_w[k] + kRowsW - 1) / kRowsW;
  const float* uk = j.u + j.u_off[k];
  if (j.residual != nullptr) {  // the lines output_group reads, while the GEMMs run (1.1x at 16x16)
    const int64_t hw = j.H * j.W;
    const float* res = j.residual + (chunk_out - j.out) + j.row0[k] * hw;
    const int64_t per_block = 8 / j.tile;
    for (int64_t r = 0; r < j.out_w[k]; ++r) {
      for (int64_t t = p0; t < std::min(p0 + 8 * NV, tiles_used); t += per_block) {
        const int64_t off = j.block_off[t / per_block];
        for (int i = 0; i < j.tile; ++i) __builtin_prefetch(res + r * hw + off + i * j.W, 0, 3);
      }
    }
  }
  const int nxi = xi_count(j);
  for (int xi = 0; xi < nxi; ++xi) {
    const float* vb = v + xi * width * pp + p0;
    for (int64_t rb = 0; rb < blocks; ++rb) {
      const float* ub = uk + (xi * blocks + rb) * depth * kRowsW;
      float* mb = s.mb + xi * s.mb_stride + rb * kRowsW * kGroup;
      if (j.wide) {
        gemm_tile_wide<NV>(ub, vb, pp, depth, mb);
      } else if constexpr (NV <= 3) {  // 256-bit groups are one register tile (16 AVX2 registers)
        gemm_tile<NV>(ub, vb, pp, depth, mb);
      }
    }
  }
  if (j.tile == 4 && j.wide) {
    output_group_f4_wide<NV>(j, s.mb, s.mb_stride, j.out_w[k], j.row0[k], p0, tiles_used, chunk_out, lanes);
  } else if (j.tile == 4) {
    output_group_f4<NV>(j, s.mb, s.mb_stride, j.out_w[k], j.row0[k], p0, tiles_used, chunk_out, lanes);
  } else {
    output_group<NV>(j, s.mb, s.mb_stride, j.out_w[k], j.row0[k], p0, tiles_used, chunk_out, lanes);
  }
}

// --- F(4x4) weight gradient -------------------------------------------------------------

// t = A g for F(4x4) (A = (A^T)^T, 6 x 4) on four vectors.
FSN_TARGET FSN_INLINE void a64(const __m256* g, __m256* t) {
  const __m256 two = _mm256_set1_ps(2.0f), four = _mm256_set1_ps(4.0f), eight = _mm256_set1_ps(8.0f);
  const __m256 e = _mm256_add_ps(g[0], g[2]), o = _mm256_add_ps(g[1], g[3]);
  t[0] = g[0];
  t[1] = _mm256_add_ps(e, o);
  t[2] = _mm256_sub_ps(e, o);
  const __m256 e4 = _mm256_fmadd_ps(four, g[2], g[0]), o4 = _mm256_fmadd_ps(eight, g[3], _mm256_mul_ps(two, g[1]));
  t[3] = _mm256_add_ps(e4, o4);
  t[4] = _mm256_sub_ps(e4, o4);
  t[5] = g[3];
}

// In-place transpose of the 8 x 8 floats r[0..8).
FSN_TARGET FSN_INLINE void transpose8(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

inline int64_t grad_rows_padded(const WinogradGradJob& j) { return round_up(j.out_w, 16); }

struct GradScratch {
  Scratch in;       // V and the input pair table, as for the forward
  float* gtt;       // [xi][pp][out_w padded to 16]: A dY A^T of every tile, gradient rows contiguous
  int64_t* g_pair;  // per pair of tiles of a chunk: offset of its first gradient value
};

inline int64_t grad_pp(const WinogradGradJob& j) { return max_pp(j.in); }

GradScratch carve_grad(const WinogradGradJob& j, float* base) {
  GradScratch s;
  const int64_t pp = grad_pp(j);
  s.in.v = base;
  s.in.mb = nullptr;
  s.in.rows = nullptr;
  s.in.mb_stride = 0;
  s.gtt = base + 36 * j.in_w * pp;
  s.in.pair_base = reinterpret_cast<int64_t*>(s.gtt + 36 * grad_rows_padded(j) * pp);
  s.in.pair_ty = s.in.pair_base + pp / 2;
  s.g_pair = s.in.pair_ty + pp / 2;
  return s;
}

// Gtt = A dY A^T of every tile of the chunk (images from n0, `used` tiles), tile positions as
// in V (lane4 order in groups of 8), 8 gradient rows at a time transposed so that rows are
// contiguous; rows past out_w and positions past the last group are zero.
FSN_TARGET void transform_grad_f4(const WinogradGradJob& j, int64_t n0, int64_t used, int64_t pp,
                                  const GradScratch& s) {
  const int64_t tw = j.in.W / 4, tiles = tiles_per_image(j.in), groups = (used + 7) / 8;
  const int64_t op = grad_rows_padded(j);
  for (int64_t i = 0; i < used / 2; ++i) {
    const int64_t t = 2 * i, n = t / tiles, ty = (t % tiles) / tw, tx = t % tw;
    s.g_pair[i] = (n0 + n) * j.g_sN + 4 * ty * j.g_sH + 4 * tx;
  }
  alignas(32) float tb[6][4][8];
  alignas(32) float blk[36][8][8];  // [xi][row in block][tile lane]
  for (int64_t o0 = 0; o0 < op; o0 += 8) {
    for (int64_t g = 0; g < groups; ++g) {
      for (int r = 0; r < 8; ++r) {
        const int64_t o = o0 + r;
        if (o >= j.out_w) {
          for (int xi = 0; xi < 36; ++xi) _mm256_store_ps(blk[xi][r], _mm256_setzero_ps());
          continue;
        }
        const float* go = j.g + o * j.g_sC;
        for (int q = 0; q < 4; ++q) {
          const int64_t pi = 4 * g + q;
          __m256 d[4], t[6];
          for (int y = 0; y < 4; ++y) {
            d[y] = 2 * pi < used ? _mm256_loadu_ps(go + s.g_pair[pi] + y * j.g_sH) : _mm256_setzero_ps();
          }
          a64(d, t);
          for (int iy = 0; iy < 6; ++iy) _mm256_store_ps(tb[iy][q], t[iy]);
        }
        for (int iy = 0; iy < 6; ++iy) {
          const __m256 a = _mm256_load_ps(tb[iy][0]), b = _mm256_load_ps(tb[iy][1]);
          const __m256 c = _mm256_load_ps(tb[iy][2]), d = _mm256_load_ps(tb[iy][3]);
          const __m256 u0 = _mm256_unpacklo_ps(a, b), u1 = _mm256_unpacklo_ps(c, d);
          const __m256 u2 = _mm256_unpackhi_ps(a, b), u3 = _mm256_unpackhi_ps(c, d);
          const __m256 cols[4] = {_mm256_shuffle_ps(u0, u1, _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm256_shuffle_ps(u0, u1, _MM_SHUFFLE(3, 2, 3, 2)),
                                  _mm256_shuffle_ps(u2, u3, _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm256_shuffle_ps(u2, u3, _MM_SHUFFLE(3, 2, 3, 2))};
          __m256 t[6];
          a64(cols, t);
          for (int ix = 0; ix < 6; ++ix) _mm256_store_ps(blk[6 * iy + ix][r], t[ix]);
        }
      }
      for (int xi = 0; xi < 36; ++xi) {
        __m256 m[8];
        for (int r = 0; r < 8; ++r) m[r] = _mm256_load_ps(blk[xi][r]);
        transpose8(m);  // m[lane] = the 8 rows of tile position 8g + lane
        float* dst = s.gtt + (xi * pp + 8 * g) * op + o0;
        for (int l = 0; l < 8; ++l) _mm256_storeu_ps(dst + l * op, m[l]);
      }
    }
  }
  for (int xi = 0; xi < 36; ++xi) {
    float* tail = s.gtt + (xi * pp + 8 * groups) * op;
    std::fill(tail, tail + (pp - 8 * groups) * op, 0.0f);
  }
}

// acc[c][o] += v[c][p] * gtt[p][o] over tile positions p < np, for NC input rows and NV
// vectors of 8 gradient rows, then added into m (rows of `op` floats): the input values are
// broadcast, the gradient rows loaded whole, no lane sums.
template <int NC, int NV>
FSN_TARGET void reduce_tile(const float* v, int64_t pp, const float* gtt, int64_t op, int64_t np, float* m) {
  __m256 acc[NC][NV];
  for (int c = 0; c < NC; ++c) {
    for (int k = 0; k < NV; ++k) acc[c][k] = _mm256_setzero_ps();
  }
  for (int64_t p = 0; p < np; ++p) {
    __m256 b[NV];
    for (int k = 0; k < NV; ++k) b[k] = _mm256_loadu_ps(gtt + p * op + 8 * k);
    for (int c = 0; c < NC; ++c) {
      const __m256 a = _mm256_broadcast_ss(v + c * pp + p);
      for (int k = 0; k < NV; ++k) acc[c][k] = _mm256_fmadd_ps(a, b[k], acc[c][k]);
    }
  }
  for (int c = 0; c < NC; ++c) {
    for (int k = 0; k < NV; ++k) {
      float* mk = m + c * op + 8 * k;
      _mm256_storeu_ps(mk, _mm256_add_ps(_mm256_loadu_ps(mk), acc[c][k]));
    }
  }
}

// The same on 512-bit registers: NV vectors of 16 gradient rows.
template <int NC, int NV>
FSN_TARGET512 void reduce_tile_wide(const float* v, int64_t pp, const float* gtt, int64_t op, int64_t np,
                                    float* m) {
  __m512 acc[NC][NV];
  for (int c = 0; c < NC; ++c) {
    for (int k = 0; k < NV; ++k) acc[c][k] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < np; ++p) {
    __m512 b[NV];
    for (int k = 0; k < NV; ++k) b[k] = _mm512_loadu_ps(gtt + p * op + 16 * k);
    for (int c = 0; c < NC; ++c) {
      const __m512 a = _mm512_set1_ps(v[c * pp + p]);
      for (int k = 0; k < NV; ++k) acc[c][k] = _mm512_fmadd_ps(a, b[k], acc[c][k]);
    }
  }
  for (int c = 0; c < NC; ++c) {
    for (int k = 0; k < NV; ++k) {
      float* mk = m + c * op + 16 * k;
      _mm512_storeu_ps(mk, _mm512_add_ps(_mm512_loadu_ps(mk), acc[c][k]));
    }
  }
}

// m[c][o] += sum_p v[c][p] gtt[p][o] for c < nc, o < op (a multiple of 16), p < np.
template <int NC>
FSN_TARGET512 void reduce_rows_wide(const float* v, int64_t pp, const float* gtt, int64_t op, int64_t np, float* m) {
  int64_t o = 0;
  for (; o + 32 <= op; o += 32) reduce_tile_wide<NC, 2>(v, pp, gtt + o, op, np, m + o);
  if (o < op) reduce_tile_wide<NC, 1>(v, pp, gtt + o, op, np, m + o);
}

template <int NC>
FSN_TARGET void reduce_rows(const float* v, int64_t pp, const float* gtt, int64_t op, int64_t np, float* m) {
  for (int64_t o = 0; o < op; o += 16) reduce_tile<NC, 2>(v, pp, gtt + o, op, np, m + o);
}

// One position xi: m[c][o] += sum_p v[c][p] gtt[p][o] for every input row c < nc.
FSN_TARGET void reduce_position(bool wide, const float* v, int64_t pp, int64_t nc, const float* gtt, int64_t op,
                                int64_t np, float* m) {
  int64_t c = 0;
  if (wide) {
    for (; c + 8 <= nc; c += 8) reduce_rows_wide<8>(v + c * pp, pp, gtt, op, np, m + c * op);
    for (; c + 4 <= nc; c += 4) reduce_rows_wide<4>(v + c * pp, pp, gtt, op, np, m + c * op);
    for (; c < nc; ++c) reduce_rows_wide<1>(v + c * pp, pp, gtt, op, np, m + c * op);
    return;
  }
  for (; c + 4 <= nc; c += 4) reduce_rows<4>(v + c * pp, pp, gtt, op, np, m + c * op);
  for (; c < nc; ++c) reduce_rows<1>(v + c * pp, pp, gtt, op, np, m + c * op);
}

}  // namespace

int64_t winograd_scratch_floats(const WinogradJob& j) {
  return xi_count(j) * (j.max_seg_width * max_pp(j) + round_up(j.max_out_w, kRowsW) * kGroup) +
         round_up(rows_floats(j), 2) + 2 * max_pp(j) + 8;
}

int64_t winograd_lane_doubles(const WinogradJob& j) { return j.images_per_chunk * j.max_out_w * 8; }

bool winograd_run_avx2(const WinogradJob& j, int64_t begin, int64_t end, float* scratch, double* lanes) {
  const int64_t tiles = tiles_per_image(j);
  const Scratch s = carve(j, scratch);
  const bool stats = j.part_sum != nullptr;
  for (int64_t chunk = begin; chunk < end; ++chunk) {
    const int64_t n0 = chunk * j.images_per_chunk;
    const int64_t nb = std::min(j.images_per_chunk, j.N - n0);
    const int64_t used = nb * tiles, pp = row_stride(used);
    float* chunk_out = j.out + n0 * j.M * j.H * j.W;
    for (int64_t sg = 0; sg < j.num_segments; ++sg) {
      const int64_t width = j.seg_width[sg];
      if (j.tile == 4) {
        if (sg == 0) pair_table(j, n0, used, s);
        transform_input_f4(j, j.seg_c0[sg], width, used, pp, s);
      } else if (j.x_sW == 1 && (j.W == 8 || j.W % 16 == 0)) {
        transform_input_rows(j, j.seg_c0[sg], width, n0, nb, pp, s);
      } else {
        transform_input(j, j.seg_c0[sg], width, n0, nb, pp, s);
      }
      for (int64_t k = j.seg_first[sg]; k < j.seg_first[sg + 1]; ++k) {
        double* kl = stats ? lanes : nullptr;
        if (stats) std::fill(lanes, lanes + nb * j.out_w[k] * 8, 0.0);
        const int64_t group_vecs = j.wide ? kVecsW : 3;
        for (int64_t p0 = 0; p0 < used; p0 += 8 * group_vecs) {
          const int64_t nv = std::min<int64_t>(group_vecs, (used - p0 + 7) / 8);
          switch (nv) {
            case 6: run_group<6>(j, k, s.v, pp, width, s, p0, used, chunk_out, kl); break;
            case 5: run_group<5>(j, k, s.v, pp, width, s, p0, used, chunk_out, kl); break;
            case 4: run_group<4>(j, k, s.v, pp, width, s, p0, used, chunk_out, kl); break;
            case 3: run_group<3>(j, k, s.v, pp, width, s, p0, used, chunk_out, kl); break;
            case 2: run_group<2>(j, k, s.v, pp, width, s, p0, used, chunk_out, kl); break;
            default: run_group<1>(j, k, s.v, pp, width, s, p0, used, chunk_out, kl); break;
          }
        }
        if (!stats) continue;
        for (int64_t i = 0; i < nb; ++i) {
          for (int64_t r = 0; r < j.out_w[k]; ++r) {
            const double* l = lanes + (i * j.out_w[k] + r) * 8;
            j.part_sum[(n0 + i) * j.M + j.row0[k] + r] = (l[0] + l[1]) + (l[2] + l[3]);
            j.part_sq[(n0 + i) * j.M + j.row0[k] + r] = (l[4] + l[5]) + (l[6] + l[7]);
          }
        }
      }
    }
  }
  if (j.stream_out) std::atomic_thread_fence(std::memory_order_seq_cst);  // order the streaming stores
  return true;
}

int64_t winograd_grad_scratch_floats(const WinogradGradJob& j) {
  return 36 * (j.in_w + grad_rows_padded(j)) * grad_pp(j) + 4 * grad_pp(j) + 8;
}

int64_t winograd_grad_rows_padded(const WinogradGradJob& j) { return grad_rows_padded(j); }

bool winograd_weight_grad_avx2(const WinogradGradJob& j, int64_t n_begin, int64_t n_end, float* scratch,
                               float* m) {
  const GradScratch s = carve_grad(j, scratch);
  const int64_t tiles = tiles_per_image(j.in), op = grad_rows_padded(j);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += j.in.images_per_chunk) {
    const int64_t nb = std::min(j.in.images_per_chunk, n_end - n0), used = nb * tiles, pp = row_stride(used);
    pair_table(j.in, n0, used, s.in);
    transform_input_f4(j.in, j.c0, j.in_w, used, pp, s.in);
    transform_grad_f4(j, n0, used, pp, s);
    const int64_t np = (used + 7) / 8 * 8;
    for (int xi = 0; xi < 36; ++xi) {
      reduce_position(j.in.wide, s.in.v + xi * j.in_w * pp, pp, j.in_w, s.gtt + xi * pp * op, op, np,
                      m + xi * j.in_w * op);
    }
  }
  return true;
}

}  // namespace conv
}  // namespace fastsupernet

#else  // no AVX2 build: the direct kernel serves every call

namespace fastsupernet {
namespace conv {

int64_t winograd_scratch_floats(const WinogradJob&) { return 0; }
int64_t winograd_lane_doubles(const WinogradJob&) { return 0; }
bool winograd_run_avx2(const WinogradJob&, int64_t, int64_t, float*, double*) { return false; }
int64_t winograd_grad_scratch_floats(const WinogradGradJob&) { return 0; }
int64_t winograd_grad_rows_padded(const WinogradGradJob&) { return 0; }
bool winograd_weight_grad_avx2(const WinogradGradJob&, int64_t, int64_t, float*, float*) { return false; }

}  // namespace conv
}  // namespace fastsupernet

#endif
