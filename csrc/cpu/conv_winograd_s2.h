// Plan of the stride-2 Winograd path of fastsupernet::multi_conv2d on CPU (float32, AVX-512):
// a 3x3 stride-2 padding-1 layer on 16x16 inputs (8x8 outputs) as Winograd F(4x4, 2x2) on
// the four stride phases of the input, and the input gradient of such layers by the same
// transform. Shared by the host code (conv.cpp, conv_input_grad.cpp) and the kernels
// (conv_winograd_s2.cpp). Plain C++ (no torch), like conv_plan.h.
//
// The layer is y[i][j] = sum over the phases (p, q) of sum_(u, v < 2) P_pq[i + u][j + v]
// K_pq[u][v], with P_pq[a][b] = x_pad[2a + p][2b + q] (x padded by one zero row and column
// before, zeros after) and K_pq[u][v] = w[2u + p][2v + q] (zero where 2u + p or 2v + q is 3):
// four stride-1 2x2 correlations over 9x9 planes, one 4 C_in-channel 2x2 convolution. Each 4x4
// output tile is then A^T [ sum over (phase, channel) of (G K G^T) . (B^T d B) ] A with d the
// 5x5 patch of the phase plane (25 multiplies per channel and phase for 16 outputs: 6.25 per
// output and input channel, where the direct kernel does 9).
#pragma once

#include <cstdint>

#include "cpu/conv_plan.h"

namespace fastsupernet {
namespace conv {

// Images per chunk: the lanes of a 512-bit register (the transforms run on vectors of one
// value of 16 images).
constexpr int kS2Images = 16;
// Points of a transformed tile (5 x 5) and tiles of an 8x8 output (2 x 2).
constexpr int kS2Points = 25;
constexpr int kS2Tiles = 4;
// Fewer images per call keep the direct kernel: the filter transform is per call (conv.cpp).
constexpr int64_t kS2MinImages = 64;

// G of F(4, 2) (points 0, 1, -1, 2 and infinity): the filter transform U = G K G^T (conv.cpp).
inline constexpr double kWinogradS2G[5][2] = {
    {0.5, 0}, {0.5, 0.5}, {1.0 / 6, -1.0 / 6}, {1.0 / 6, 1.0 / 3}, {0, 1}};

// One candidate of a segment (below): its rows [row0, + out_w) of the output, epilogue per row
// (scale, shift: its out_w values, or nullptr; the segment's activation, PReLU with slope),
// and its GEMM (in_w its input width): M[xi][o][pixel] = sum over its transformed channels ch = slot * in_w + c <
// s2_phases(xi) in_w of U[xi][o][ch] V[xi][slot * W + c][pixel] (pixel = tile * 16 + image,
// W the segment's width; a tap table maps ch to V's channel); rows xi * (out_w + 1) + o,
// segment xi reads V from channel xi * (4 W + 1) on (s2_v_stride); x and out are set per chunk
// (V and M in the thread's scratch).
struct WinogradS2Output {
  int64_t out_w = 0, row0 = 0;
  const float* scale = nullptr;
  const float* shift = nullptr;
  float slope = 0.0f;
  const ConvJob<float>* gemm = nullptr;
};

// Candidates of one call reading one input slice: x's channels [c0, + in_w) are transformed
// once per chunk for all of them (each uses its first in_w channels: its values do not depend
// on the others).
struct WinogradS2Job {
  // Input: x (unit column stride), N images of 16x16; channels [c0, + in_w), in_w the widest
  // candidate's.
  const float* x = nullptr;
  int64_t x_sN = 0, x_sC = 0, x_sH = 0;
  int64_t N = 0;
  int64_t c0 = 0, in_w = 0;

  // Output (N, M, 8, 8) contiguous.
  float* out = nullptr;
  int64_t M = 0;
  int activation = kActNone;
  bool stream_out = false;

  int64_t num_outputs = 0;
  const WinogradS2Output* outputs = nullptr;
  int64_t max_out_w = 0;
};

// The phase kernels other than K_00 are zero in their second column (K_01), row (K_10) or
// both (K_11), and G's last row is (0, 1): so U = G K G^T is zero in column 4 for K_01 and
// K_11 and in row 4 for K_10 and K_11, and point xi = 5 i + j takes 4 phases where i, j < 4,
// 2 where one of them is 4 and 1 at (4, 4): 81 of 100 (5.06 multiplies per output and input
// channel). V and U hold point xi's channels in the order of its phases' slots, the phases it
// takes first (its GEMM's depth is a prefix): (p, q) = (0, 0), (0, 1), (1, 0), (1, 1) in
// slots 0..3, except in column j = 4, where (1, 0) comes before (0, 1).
inline int s2_phases(int xi) {
  const int i = xi / 5, j = xi % 5;
  return i < 4 && j < 4 ? 4 : (i == 4 && j == 4 ? 1 : 2);
}
inline int s2_slot(int xi, int pq) {
  if (xi % 5 == 4 && (pq == 1 || pq == 2)) return 3 - pq;
  return pq;
}

// Distance between the xi planes of V (4 W channels of 64 pixels, W the segment's width) and
// of M (out_w rows of 64): one channel or row more than they hold, so that the 25 planes a transform reads or
// writes are not a power of two apart (which maps them to one L1 set). The GEMM's segment xi
// starts at channel xi * (4 W + 1), its rows at xi * (out_w + 1) (row xi * (out_w + 1) +
// out_w is never written).
inline int64_t s2_v_stride(const WinogradS2Job& j) { return (4 * j.in_w + 1) * 64; }
inline int64_t s2_m_stride(int64_t out_w) { return (out_w + 1) * 64; }

// The input gradient of such a layer by the same transform (conv_input_grad.cpp): grad x
// in phase (p, q) is a 2x2 correlation of the output gradient g over 8x8 planes,
// gx[c][2a + p][2b + q] = sum_o sum_(di, dj < 2) g[o][a + di][b + dj] K'_pq[di][dj] with
// K'_pq[di][dj] = w[o][c][t_p(di)][t_q(dj)], t_0(0) = 1, t_1(0) = 2, t_1(1) = 0 (zero for
// t_0(1)): one F(4x4, 2x2) transform of each g channel serves the four phases. K'_0q is zero
// in its second row and K'_p0 in its second column, so point xi = 5 i + j takes the phases
// with (i < 4 or p = 1) and (j < 4 or q = 1): 81 of 100. The GEMM's rows are, per point, the
// in_w channels of each phase it takes (in order of 2p + q: slot s2g_phase(xi, slot)).
inline int s2g_phases(int xi) { return s2_phases(xi); }
inline int s2g_phase(int xi, int slot) {
  const int i = xi / 5, j = xi % 5;
  if (i < 4 && j < 4) return slot;
  if (i < 4) return slot == 0 ? 1 : 3;  // j = 4: q = 1
  if (j < 4) return slot == 0 ? 2 : 3;  // i = 4: p = 1
  return 3;
}

struct WinogradS2GradJob {
  // Output gradient g (unit column stride), N images of 8x8; the candidate reads its
  // channels [g_c0, + out_w).
  const float* g = nullptr;
  int64_t g_sN = 0, g_sC = 0, g_sH = 0;
  int64_t N = 0, g_c0 = 0, out_w = 0, in_w = 0;
  // grad x (N, C, 16, 16) contiguous: channels [x_c0, + in_w) are written, or added to.
  float* gx = nullptr;
  int64_t C = 0, x_c0 = 0;
  bool accumulate = false;
  // The GEMM of a chunk: rows xi * (4 in_w + 1) + slot * in_w + c (slot < s2g_phases(xi)),
  // segment xi reads V's channels [xi * (out_w + 1), + out_w) (one per g channel); x and out
  // set per chunk.
  const ConvJob<float>* gemm = nullptr;
};
inline int64_t s2g_v_stride(const WinogradS2GradJob& j) { return (j.out_w + 1) * 64; }
inline int64_t s2g_m_stride(const WinogradS2GradJob& j) { return (4 * j.in_w + 1) * 64; }
int64_t winograd_s2_grad_scratch_floats(const WinogradS2GradJob& job);
bool winograd_s2_grad_run_avx512(const WinogradS2GradJob& job, int64_t begin, int64_t end, float* scratch,
                                 double* lanes);
// Whether a float32 input gradient takes it: a 16x16 input, g with unit column stride, an
// AVX-512 CPU, FASTSUPERNET_CPU_WINOGRAD not 0, and N >= kS2MinImages (=all: any N; every
// width: conv.cpp).
bool winograd_s2_grad_takes(int64_t N, int64_t H, int64_t W, int64_t g_sW);

// Whether the layer takes the path (the candidate's width aside): float32 3x3 stride-2
// padding-1 on a 16x16 input with unit column stride, no residual, no statistics, an AVX-512
// CPU, and FASTSUPERNET_CPU_WINOGRAD not 0 (read at every call).
bool winograd_s2_shape(int64_t kh, int64_t kw, int64_t stride, int64_t padding, int64_t H, int64_t W, int64_t x_sW,
                       bool residual, bool stats);
// Whether a candidate of such a layer takes it: N >= kS2MinImages, in_w >= 16 and out_w >= 32
// (FASTSUPERNET_CPU_WINOGRAD=all: every one). Nothing else: its values never depend on the
// other candidates of the call.
bool winograd_s2_takes(int64_t N, int64_t in_w, int64_t out_w);

// float32 values of one thread's scratch (staged input plane, V, M, staged output).
int64_t winograd_s2_scratch_floats(const WinogradS2Job& job);

// Runs chunks [begin, end) of kS2Images images; false when the build has no AVX-512 version.
bool winograd_s2_run_avx512(const WinogradS2Job& job, int64_t begin, int64_t end, float* scratch, double* lanes);

}  // namespace conv
}  // namespace fastsupernet
