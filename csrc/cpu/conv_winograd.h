// Plan of the Winograd paths of fastsupernet::multi_conv2d on CPU (float32, AVX2 + FMA),
// F(2x2, 3x3) and F(4x4, 3x3), and of F(4x4) transposed for multi_conv2d_weight_grad, shared
// by the host code (conv.cpp, conv_weight_grad.cpp) and the kernel (conv_winograd.cpp).
//
// Plain C++ (no torch), like conv_plan.h. Vocabulary (t = the tile size, 2 or 4):
//   tile   t x t output pixels, computed from a (t+2) x (t+2) input patch; an image has
//          (H/t) x (W/t)
//   xi     one of the (t+2)^2 positions of a transformed tile, xi = (t+2) * (y index) + (x index)
//   block  8/t consecutive tiles of one tile row: 8 contiguous output pixels in each of t rows
//   chunk  a fixed number of consecutive images, one unit of parallel work; its tiles are
//          numbered image-major, row-major (p = image * tiles_per_image + ty * W/t + tx); with
//          t = 4 the 8 tiles of each group of 8 sit in the lanes of a vector in the order
//          0 2 4 6 1 3 5 7 (what the input transform's transposes produce)
#pragma once

#include <cstdint>

namespace fastsupernet {
namespace conv {

// G of F(4x4, 3x3) (6 x 3; points 0, +-1, +-2): the filter transform U = G g G^T (conv.cpp) and,
// transposed, the last step of the weight gradient dW = G^T M G (conv_weight_grad.cpp).
inline constexpr double kWinogradG4[6][3] = {{0.25, 0, 0},
                                             {-1.0 / 6, -1.0 / 6, -1.0 / 6},
                                             {-1.0 / 6, 1.0 / 6, -1.0 / 6},
                                             {1.0 / 24, 1.0 / 12, 1.0 / 6},
                                             {1.0 / 24, -1.0 / 12, 1.0 / 6},
                                             {0, 0, 1}};

// Output rows per register tile; the transformed weights are packed in blocks of this many rows.
constexpr int kWinogradRows = 4;

struct WinogradJob {
  // Tile size: 2, or 4 (then W is 8, 16 or 32, H a multiple of 4 and x_sW == 1).
  int tile = 2;

  // Input: x (any strides), N images of H x W (= the output size: 3x3, stride 1, padding 1).
  const float* x = nullptr;
  int64_t x_sN = 0, x_sC = 0, x_sH = 0, x_sW = 0;
  int64_t N = 0, H = 0, W = 0;

  // Segments: runs of consecutive candidates with one input offset; segment s holds
  // candidates [seg_first[s], seg_first[s + 1]) and reads channels [seg_c0[s], + seg_width[s])
  // (its widest candidate), transformed once per chunk for all of them.
  int64_t num_segments = 0;
  const int64_t* seg_first = nullptr;
  const int64_t* seg_c0 = nullptr;
  const int64_t* seg_width = nullptr;
  int64_t max_seg_width = 0;

  // Candidates: the first in_w[k] channels of their segment, output rows [row0[k], +
  // out_w[k]); transformed weights at u + u_off[k], laid out [xi][block of kWinogradRows
  // rows][channel][row in block] (rows past out_w[k] are zero).
  int64_t K = 0;
  const int64_t* in_w = nullptr;
  const int64_t* out_w = nullptr;
  const int64_t* row0 = nullptr;
  const int64_t* u_off = nullptr;
  const float* u = nullptr;
  int64_t max_out_w = 0;

  // Output (N, M, H, W) contiguous; epilogue per row as in conv_plan.h's ConvJob.
  int64_t M = 0;
  float* out = nullptr;
  const float* residual = nullptr;  // the output's shape, contiguous, or nullptr
  const float* scale = nullptr;
  const float* shift = nullptr;
  const float* slope = nullptr;
  int activation = 0;

  // Chunks of images_per_chunk images (the last may have fewer); block_off[b] = offset of
  // block b of a chunk (its first pixel, in an output plane) from the chunk's first output value.
  int64_t images_per_chunk = 0;
  int64_t num_chunks = 0;
  const int64_t* block_off = nullptr;

  // Statistics: float64 sums per (image, row), part_sum[n * M + row], or nullptr. Each is
  // accumulated in 4 lanes over the image's output vectors in a fixed order and then summed,
  // so it depends neither on the chunking nor on the other candidates of the call.
  double* part_sum = nullptr;
  double* part_sq = nullptr;

  // Output stores of whole aligned vectors bypass the caches (as ConvJob::stream_out).
  bool stream_out = false;

  // The GEMM step on 512-bit registers (CPUs with AVX-512 F/DQ/VL): 16 tiles per vector, the
  // same chains of fused multiply-adds as the 256-bit step, so the same values.
  bool wide = false;
};

// Host-side choices (conv.cpp), read at every call: whether a layer's shape takes Winograd
// (and the CPU and FASTSUPERNET_CPU_WINOGRAD allow it), its tile size (x_sW: the input's
// column stride), the least input width of a candidate that takes it, and the bytes of
// transformed input per chunk.
bool winograd_shape(int64_t kh, int64_t kw, int64_t stride, int64_t padding, int64_t Ho, int64_t Wo);
int winograd_tile(int64_t Ho, int64_t Wo, int64_t x_sW);
int64_t winograd_min_width(int64_t Wo, int tile, bool wide);
int64_t winograd_chunk_bytes();

// float32 values and float64 statistics lanes of one thread's scratch.
int64_t winograd_scratch_floats(const WinogradJob& job);
int64_t winograd_lane_doubles(const WinogradJob& job);

// Runs chunks [begin, end); false when the build has no AVX2 version.
bool winograd_run_avx2(const WinogradJob& job, int64_t begin, int64_t end, float* scratch, double* lanes);

// The weight gradient of one candidate by F(4x4, 3x3) transposed:
//   dW[o][c] = G^T [ sum over images and tiles of (A dY A^T) . (B^T d B) ] G
// (dY the 4x4 tiles of grad_out row o, d the 6x6 input patches of channel c). `in` describes
// x as for the forward (tile 4, its channels [c0, c0 + in_w) as the one segment,
// images_per_chunk, wide); grad rows [0, out_w) at g with strides g_sN, g_sC, g_sH (columns
// contiguous).
struct WinogradGradJob {
  WinogradJob in;
  int64_t c0 = 0, in_w = 0, out_w = 0;
  const float* g = nullptr;
  int64_t g_sN = 0, g_sC = 0, g_sH = 0;
};

int64_t winograd_grad_scratch_floats(const WinogradGradJob& job);

// Gradient rows per input row of the sums below: out_w rounded up to 16.
int64_t winograd_grad_rows_padded(const WinogradGradJob& job);

// m[(xi * in_w + c) * rows_padded + o] += the sums over images [n_begin, n_end), in chunks of
// in.images_per_chunk images from n_begin, in float32 (each chunk's sums added as it ends);
// false when the build has no AVX2 version.
bool winograd_weight_grad_avx2(const WinogradGradJob& job, int64_t n_begin, int64_t n_end, float* scratch,
                               float* m);

}  // namespace conv
}  // namespace fastsupernet
