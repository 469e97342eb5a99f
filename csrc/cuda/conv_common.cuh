// What the multi_conv2d kernels of conv.cu (fp32/fp64 FMAs) and conv_tf32.cu (TF32 tensor
// cores) share: the candidate metadata format of multi_conv2d_fill_meta, problem validation,
// asynchronous staging into shared memory, and the deterministic merge of per-tile statistics.
// Everything has internal linkage (each .cu gets its own copy).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kernels.h"

namespace fastsupernet {
namespace cuda {
namespace {

constexpr int kTileChannels = 16;  // most output channels per channel tile (one candidate's)
constexpr int kCandidateInts = 5;  // metadata per candidate: in_offset, in_width, out_width, row_offset, out_channel_offset
constexpr int kTileInts = 2;       // metadata per channel tile: candidate index, first channel within the candidate
constexpr int kMaxGridY = 65535;
constexpr int kReduceThreads = 256;
constexpr size_t kDefaultSharedBytes = 48 * 1024;

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool valid_problem(const MultiConv2dProblem& pr) {
  return pr.n >= 0 && pr.c_in >= 0 && pr.h >= 0 && pr.w >= 0 && (pr.kernel == 1 || pr.kernel == 3) &&
         pr.stride >= 1 && pr.padding >= 0 && pr.num_candidates >= 1 && pr.channel_tiles >= 1 &&
         pr.out_channels >= 1 && pr.weight_rows >= 1 && pr.weight_cols >= 1 &&
         static_cast<int>(pr.activation) >= 0 && static_cast<int>(pr.activation) <= 2;
}

// Output size, the position tile (TH x TW = 2^tile_log2 outputs, TW a power of two) whose staged
// input patch is least over the layer (fewer tiles of the same cost win, then the widest), the
// tile counts and one tile's patch: the dense window for 3x3, exactly the sampled pixels for 1x1.
struct TileGeometry {
  int64_t h_out, w_out;
  int tile_w_log2;
  int64_t tiles_h, tiles_w;
  int patch_h, patch_w;
};

inline TileGeometry choose_tiles(const MultiConv2dProblem& pr, int tile_log2) {
  TileGeometry g{};
  g.h_out = multi_conv2d_out_size(pr.h, pr.kernel, pr.stride, pr.padding);
  g.w_out = multi_conv2d_out_size(pr.w, pr.kernel, pr.stride, pr.padding);
  const int positions = 1 << tile_log2;
  int64_t best = -1;
  for (int lw = tile_log2; lw >= 0; --lw) {
    const int tw = 1 << lw;
    const int th = positions >> lw;
    const int64_t tiles = div_up(std::max<int64_t>(g.h_out, 1), th) * div_up(std::max<int64_t>(g.w_out, 1), tw);
    const int ph = pr.kernel == 1 ? th : (th - 1) * pr.stride + pr.kernel;
    const int pw = pr.kernel == 1 ? tw : (tw - 1) * pr.stride + pr.kernel;
    const int64_t cost = tiles * ph * pw;
    if (best < 0 || cost < best) {
      best = cost;
      g.tile_w_log2 = lw;
      g.patch_h = ph;
      g.patch_w = pw;
    }
  }
  g.tiles_h = div_up(g.h_out, positions >> g.tile_w_log2);
  g.tiles_w = div_up(g.w_out, int64_t{1} << g.tile_w_log2);
  return g;
}

// The parameters every conv kernel takes (each kernel's own block adds its fields).
template <typename T>
struct ConvArgs {
  const T* x;
  const T* weight;
  const int32_t* meta;
  const T* scale;
  const T* shift;
  const T* residual;
  const T* prelu_slope;
  T* out;
  double* part_s;  // (out_channels, pixel_tiles), only with stats
  double* part_q;
  int64_t x_sn, x_sc, x_sh, x_sw;
  int64_t r_sn, r_sc, r_sh, r_sw;
  int64_t weight_row;  // elements between weight rows: C_max * k * k
  int64_t out_channels;
  int64_t pixel_tiles;
  int N, H, W, Ho, Wo;
  int stride, padding;
  int num_candidates;
  int tile_base;  // channel tile of blockIdx.y == 0
  int tile_w_log2, tiles_w, tiles_per_image;
  int patch_h, patch_w, patch_elems;  // staged input patch of one channel
  int activation;
  int stats;
};

// Where a block's position tile lies: its image (conv.cu) or image group (conv_tf32.cu), the
// output coordinates of its first position, and the input coordinates of its patch element
// (0, 0) (tiles of 2^tile_log2 positions, p.tile_w_log2 of them along a row).
struct TileOrigin {
  int64_t image;
  int oh, ow;  // first output row and column of the tile
  int ih, iw;  // input row and column of patch element (0, 0)
};

template <typename T>
__device__ __forceinline__ TileOrigin tile_origin(const ConvArgs<T>& p, int64_t ptile, int tile_log2) {
  TileOrigin o;
  o.image = ptile / p.tiles_per_image;
  const int t = static_cast<int>(ptile - o.image * p.tiles_per_image);
  const int th = t / p.tiles_w;
  const int tw = t - th * p.tiles_w;
  o.oh = th * ((1 << tile_log2) >> p.tile_w_log2);
  o.ow = tw << p.tile_w_log2;
  o.ih = o.oh * p.stride - p.padding;
  o.iw = o.ow * p.stride - p.padding;
  return o;
}

// Bytes of the statistics partials of a call: the per-(channel, pixel tile) sums, then the
// sums of squares (the workspace layout fill_args sets up).
inline size_t partials_bytes(int64_t out_channels, int64_t pixel_tiles) {
  return static_cast<size_t>(2 * out_channels * pixel_tiles) * sizeof(double);
}

// Fills the shared parameters of a call (pixel_tiles: the kernel's grid.x; the statistics
// partials, when asked for, are the first partials_bytes(...) of workspace).
template <typename T>
void fill_args(ConvArgs<T>& p, const MultiConv2dProblem& pr, const TileGeometry& g, int64_t pixel_tiles, const T* x,
               const T* weight, const int32_t* meta, const T* scale, const T* shift, const T* residual,
               const T* prelu_slope, T* out, void* workspace) {
  p.x = x;
  p.weight = weight;
  p.meta = meta;
  p.scale = scale;
  p.shift = shift;
  p.residual = residual;
  p.prelu_slope = prelu_slope;
  p.out = out;
  p.part_s = pr.stats ? static_cast<double*>(workspace) : nullptr;
  p.part_q = pr.stats ? p.part_s + pr.out_channels * pixel_tiles : nullptr;
  p.x_sn = pr.x_strides[0];
  p.x_sc = pr.x_strides[1];
  p.x_sh = pr.x_strides[2];
  p.x_sw = pr.x_strides[3];
  p.r_sn = pr.residual_strides[0];
  p.r_sc = pr.residual_strides[1];
  p.r_sh = pr.residual_strides[2];
  p.r_sw = pr.residual_strides[3];
  p.weight_row = pr.weight_cols * pr.kernel * pr.kernel;
  p.out_channels = pr.out_channels;
  p.pixel_tiles = pixel_tiles;
  p.N = static_cast<int>(pr.n);
  p.H = static_cast<int>(pr.h);
  p.W = static_cast<int>(pr.w);
  p.Ho = static_cast<int>(g.h_out);
  p.Wo = static_cast<int>(g.w_out);
  p.stride = pr.stride;
  p.padding = pr.padding;
  p.num_candidates = pr.num_candidates;
  p.tile_base = 0;
  p.tile_w_log2 = g.tile_w_log2;
  p.tiles_w = static_cast<int>(g.tiles_w);
  p.tiles_per_image = static_cast<int>(g.tiles_h * g.tiles_w);
  p.patch_h = g.patch_h;
  p.patch_w = g.patch_w;
  p.patch_elems = g.patch_h * g.patch_w;
  p.activation = static_cast<int>(pr.activation);
  p.stats = pr.stats ? 1 : 0;
}

// Launches `kernel` over (pixel_tiles, channel_tiles) blocks, the channel tiles in slices of at
// most 65535 (grid.y's limit; p.tile_base is each slice's first), after raising the kernel's
// dynamic shared-memory limit when it needs more than the default 48 KB.
template <typename P>
cudaError_t launch_tiles(void (*kernel)(const P), P p, int64_t pixel_tiles, int64_t channel_tiles, int threads,
                         size_t smem, cudaStream_t stream) {
  if (smem > kDefaultSharedBytes) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  for (int64_t t0 = 0; t0 < channel_tiles; t0 += kMaxGridY) {
    p.tile_base = static_cast<int>(t0);
    const dim3 grid(static_cast<unsigned>(pixel_tiles), static_cast<unsigned>(std::min<int64_t>(kMaxGridY, channel_tiles - t0)));
    kernel<<<grid, threads, smem, stream>>>(p);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// dst (shared) = *src, or zero when !valid (src is then not read). From compute capability 8.0
// an asynchronous copy, so that every load a thread stages is in flight at once; stage_wait()
// waits for the thread's own copies (a __syncthreads() must follow before other threads read them).
template <typename T>
__device__ __forceinline__ void stage(T* dst, const T* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(d), "l"(src), "n"(sizeof(T)),
               "r"(valid ? static_cast<int>(sizeof(T)) : 0)
               : "memory");
#else
  *dst = valid ? *src : T(0);
#endif
}

__device__ __forceinline__ void stage_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// sum[c] = sum over tiles t of part_s[c * P + t] (and the same for squares): thread i adds
// t = i, i + 256, ... in order, then a fixed tree over the block.
__global__ void __launch_bounds__(kReduceThreads)
    reduce_partials_kernel(const double* __restrict__ part_s, const double* __restrict__ part_q, int64_t P,
                           double* __restrict__ sum, double* __restrict__ sumsq) {
  __shared__ double shared_s[kReduceThreads];
  __shared__ double shared_q[kReduceThreads];
  const int64_t c = blockIdx.x;
  const int tid = threadIdx.x;
  double s = 0.0, q = 0.0;
  for (int64_t t = tid; t < P; t += kReduceThreads) {
    s += part_s[c * P + t];
    q += part_q[c * P + t];
  }
  shared_s[tid] = s;
  shared_q[tid] = q;
  __syncthreads();
  for (int half = kReduceThreads / 2; half > 0; half >>= 1) {
    if (tid < half) {
      shared_s[tid] += shared_s[tid + half];
      shared_q[tid] += shared_q[tid + half];
    }
    __syncthreads();
  }
  if (tid == 0) {
    sum[c] = shared_s[0];
    sumsq[c] = shared_q[0];
  }
}

// The per-channel statistics of a call from its partials (out_channels x pixel_tiles doubles each).
inline cudaError_t merge_partials(const double* part_s, const double* part_q, int64_t pixel_tiles,
                                  int64_t out_channels, double* sum, double* sumsq, cudaStream_t stream) {
  reduce_partials_kernel<<<static_cast<unsigned>(out_channels), kReduceThreads, 0, stream>>>(part_s, part_q,
                                                                                           pixel_tiles, sum, sumsq);
  return cudaGetLastError();
}

// The n == 0 case of a call with statistics: zero sums.
inline cudaError_t zero_stats(double* sum, double* sumsq, int64_t out_channels, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(sum, 0, sizeof(double) * out_channels, stream);
  if (err != cudaSuccess) return err;
  return cudaMemsetAsync(sumsq, 0, sizeof(double) * out_channels, stream);
}

}  // namespace
}  // namespace cuda
}  // namespace fastsupernet
