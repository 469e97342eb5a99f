// CUDA kernels of multi_conv2d (and sliced_conv2d, its K = 1 case): K candidate convolutions
// of one layer in a single launch, with the fused epilogue and per-channel statistics.
// Needs only the CUDA runtime (see kernels.h); op semantics in csrc/README.md.
//
// Work split. The output is cut into pixel tiles of 64 output pixels, a TH x TW rectangle
// (TH * TW = 64, TW a power of two picked per shape) of one image, and channel tiles of at
// most 16 consecutive output channels of ONE candidate (a candidate of width o has
// ceil(o / 16) tiles; the host lists the tiles in the metadata array). Block (pixel tile,
// channel tile) is one warp: lane l computes output pixels l and l + 32 of the tile for every
// channel of the tile. The block walks the candidate's input channels in chunks of CK (8 for
// 3x3, 32 for 1x1); per chunk it stages the input patch under the tile (with its halo, zero
// padded) and the weights of the chunk in shared memory (from sm_80 with asynchronous copies,
// all of a lane's loads in flight at once), then every lane accumulates
// 2 x NC outputs with fp32 (fp64) FMAs, NC = the tile's width rounded up to 4 (a block-uniform
// switch picks the specialisation, so narrow candidates do not pay for 16 channels).
// Weights are read in place from the packed (R, C_max, k, k) tensor (row stride C_max * k * k).
//
// Images per tile (IMG = 1 or 2). With IMG = 2 a block computes the same 64 positions of two
// consecutive images (a lane: 2 pixels x 2 images x NC channels), so every staged and loaded
// weight serves twice the multiply-adds; pixel tile q covers images 2q and 2q + 1 (the second
// absent when N is odd). An experiment for float only, opt-in per call with the environment
// variable FASTSUPERNET_CUDA_CONV_IMAGES=2 (read on the host at each launch; default 1). The
// numbers are the same as with IMG = 1 except the statistics' order of summation (one partial
// per channel and tile of two images).
//
// Layout. x is read through its four element strides: contiguous NCHW is the fast path
// (coalesced patch rows); channels_last and other strided views are read correctly with less
// coalesced loads. out is contiguous NCHW. residual is read through its strides.
//
// Statistics. With stats, the fp32 (fp64) conv value of every valid output (before the
// epilogue, the same value the epilogue starts from) is widened to double; a block adds its
// 64 pixels per channel in double with a fixed shuffle tree and writes one partial per
// (channel, pixel tile) to the workspace; a second kernel adds each channel's partials in
// double in a fixed order. No atomics: results are bitwise reproducible for a shape.
//
// Error bound (float32). An output is a sequential FMA chain over R = in_width * k * k (576 at 64x3x3)
// products in (input channel, ky, kx) order, so |y - y_exact| <= gamma_R * sum |w * x| with
// gamma_R = R u / (1 - R u), u = 2^-24 (about 3.4e-5 * sum |w * x| at R = 576; rounding errors
// are random in practice, typically sqrt(R) u times the partial sums). The epilogue adds at
// most three roundings of the epilogue's own size (scale FMA, residual add, prelu product).
// The statistics widen the fp32 conv values to double (their squares are exact there) and add
// them with at most 6 + ceil(P / 256) + 8 roundings per term (P = pixel tiles): an error below
// (14 + P / 256) * 2^-53 * sum |y|, i.e. exact sums of the float32 conv outputs for all
// practical purposes. The float64 instantiation has the same bounds with u = 2^-53.

#include "conv_common.cuh"
#include "kernels.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <type_traits>

namespace fastsupernet {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kTileLog2 = 6;     // 64 output pixels per pixel tile (2 per lane)
constexpr int kWeightStride = 20; // shared-memory row of one reduction index: 16 channels + pad
constexpr int kMinBlocksPerSM = 20; // caps registers at 96 (float: no spills)
constexpr int kMinBlocksPerSM2 = 14; // two images per tile: 4 x NC accumulators, cap at 146 registers

template <int KS>
struct ChunkOf {
  static constexpr int value = KS == 1 ? 32 : 8;  // input channels per shared-memory chunk
};

// Four consecutive weights from shared memory as vector loads (one 16-byte load for float,
// two for double; the weight rows are 16-byte aligned).
__device__ __forceinline__ void load4(const float* p, float (&w)[4]) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  w[0] = v.x;
  w[1] = v.y;
  w[2] = v.z;
  w[3] = v.w;
}
__device__ __forceinline__ void load4(const double* p, double (&w)[4]) {
  const double2 a = *reinterpret_cast<const double2*>(p);
  const double2 b = *reinterpret_cast<const double2*>(p + 2);
  w[0] = a.x;
  w[1] = a.y;
  w[2] = b.x;
  w[3] = b.y;
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
struct ConvParams : ConvArgs<T> {
  int step_c, step_h, step_w;  // 32 = step_c * patch_elems + step_h * patch_w + step_w
};

// One (pixel tile, channel tile) block with NC (multiple of 4, >= the tile's nc) channels, for
// IMG images.
template <typename T, int KS, int NC, int IMG>
__device__ __forceinline__ void conv_tile(const ConvParams<T>& p, T* __restrict__ ws,
                                          T* __restrict__ xs, int64_t ptile, int k, int c0, int nc) {
  constexpr int KK = KS * KS;
  constexpr int CK = ChunkOf<KS>::value;
  constexpr int RK = CK * KK;  // reduction indices per chunk
  const int lane = threadIdx.x;
  const int xs_image = CK * p.patch_elems;  // shared-memory elements of one image's patch

  const int32_t* cand = p.meta + static_cast<int64_t>(k) * kCandidateInts;
  const int in_offset = cand[0];
  const int in_width = cand[1];
  const int row0 = cand[3] + c0;
  const int oc0 = cand[4] + c0;

  // Tile position; a patch step is `pstep` input pixels (the 1x1 patch holds exactly the
  // sampled pixels, the 3x3 patch the dense window).
  const TileOrigin origin = tile_origin(p, ptile, kTileLog2);
  const int64_t n0 = origin.image * IMG;  // the tile's first image
  const int tile_w = 1 << p.tile_w_log2;
  const int oh_t = origin.oh;
  const int ow_t = origin.ow;
  const int ih_base = origin.ih;
  const int iw_base = origin.iw;
  const int pstep = KS == 1 ? p.stride : 1;
  const int cstep = KS == 1 ? 1 : p.stride;  // patch elements between neighbouring outputs

  // This lane's two output pixels within the tile, and their patch positions.
  const int oh_a = lane >> p.tile_w_log2;
  const int ow_a = lane & (tile_w - 1);
  const int oh_b = (lane + kWarp) >> p.tile_w_log2;
  const int ow_b = (lane + kWarp) & (tile_w - 1);
  const int base_a = oh_a * cstep * p.patch_w + ow_a * cstep;
  const int base_b = oh_b * cstep * p.patch_w + ow_b * cstep;

  // This lane's first patch element (channel, row, column) in the staging walk.
  const int e_c = lane / p.patch_elems;
  const int e_rem = lane - e_c * p.patch_elems;
  const int e_h = e_rem / p.patch_w;
  const int e_w = e_rem - e_h * p.patch_w;

  const T* w_rows = p.weight + static_cast<int64_t>(row0) * p.weight_row;

  // acc_a[i][c], acc_b[i][c]: pixels a and b of image n0 + i
  T acc_a[IMG][NC];
  T acc_b[IMG][NC];
#pragma unroll
  for (int i = 0; i < IMG; ++i) {
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      acc_a[i][c] = T(0);
      acc_b[i][c] = T(0);
    }
  }

  for (int ci0 = 0; ci0 < in_width; ci0 += CK) {
    const int ckv = min(CK, in_width - ci0);
    __syncthreads();  // the previous chunk is consumed

    // Weights of the chunk: ws[r * kWeightStride + c] = weight[row0 + c, ci0 + r / KK, tap r % KK],
    // zero for channels beyond the tile or inputs beyond the candidate.
    const int rkv = ckv * KK;
    const T* w_chunk = w_rows + static_cast<int64_t>(ci0) * KK;
#pragma unroll 4
    for (int i = lane; i < NC * RK; i += kWarp) {
      const int c = i / RK;
      const int r = i - c * RK;
      const bool ok = c < nc && r < rkv;
      stage(&ws[r * kWeightStride + c], ok ? w_chunk + static_cast<int64_t>(c) * p.weight_row + r : p.weight, ok);
    }

    // Input patch of the chunk for image n0 + img, xs[img * xs_image + cc * patch_elems + h * patch_w + w],
    // zero outside the image (and for an absent second image).
#pragma unroll
    for (int img = 0; img < IMG; ++img) {
      const int total = ckv * p.patch_elems;
      const bool image_ok = n0 + img < p.N;
      const T* x_chunk = p.x + (n0 + img) * p.x_sn + static_cast<int64_t>(in_offset + ci0) * p.x_sc;
      T* xs_img = xs + img * xs_image;
      int cc = e_c, h = e_h, w = e_w;
      for (int i = lane; i < total; i += kWarp) {
        const int ih = ih_base + h * pstep;
        const int iw = iw_base + w * pstep;
        const bool ok = image_ok && ih >= 0 && ih < p.H && iw >= 0 && iw < p.W;
        stage(&xs_img[i],
              ok ? x_chunk + cc * p.x_sc + static_cast<int64_t>(ih) * p.x_sh + static_cast<int64_t>(iw) * p.x_sw : p.x,
              ok);
        w += p.step_w;
        if (w >= p.patch_w) {
          w -= p.patch_w;
          ++h;
        }
        h += p.step_h;
        if (h >= p.patch_h) {
          h -= p.patch_h;
          ++cc;
        }
        cc += p.step_c;
      }
    }
    stage_wait();
    __syncthreads();

    for (int cc = 0; cc < ckv; ++cc) {
      const T* xc = xs + cc * p.patch_elems;
      const T* wc = ws + cc * KK * kWeightStride;
#pragma unroll
      for (int ky = 0; ky < KS; ++ky) {
#pragma unroll
        for (int kx = 0; kx < KS; ++kx) {
          const int off = ky * p.patch_w + kx;
          T a[IMG], b[IMG];
#pragma unroll
          for (int i = 0; i < IMG; ++i) {
            a[i] = xc[i * xs_image + base_a + off];
            b[i] = xc[i * xs_image + base_b + off];
          }
          const T* wr = wc + (ky * KS + kx) * kWeightStride;
#pragma unroll
          for (int c = 0; c < NC; c += 4) {
            T w4[4];
            load4(wr + c, w4);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
#pragma unroll
              for (int i = 0; i < IMG; ++i) {
                acc_a[i][c + j] = fma(a[i], w4[j], acc_a[i][c + j]);
                acc_b[i][c + j] = fma(b[i], w4[j], acc_b[i][c + j]);
              }
            }
          }
        }
      }
    }
  }

  // Epilogue.
  const int oh_pa = oh_t + oh_a, ow_pa = ow_t + ow_a;
  const int oh_pb = oh_t + oh_b, ow_pb = ow_t + ow_b;
  const bool valid_a = oh_pa < p.Ho && ow_pa < p.Wo;
  const bool valid_b = oh_pb < p.Ho && ow_pb < p.Wo;
  const T slope = p.activation == static_cast<int>(Activation::kPRelu) ? p.prelu_slope[k] : T(0);
  const int64_t plane = static_cast<int64_t>(p.Ho) * p.Wo;
  const int64_t pix_a = static_cast<int64_t>(oh_pa) * p.Wo + ow_pa;
  const int64_t pix_b = static_cast<int64_t>(oh_pb) * p.Wo + ow_pb;
  const int64_t res_a = static_cast<int64_t>(oh_pa) * p.r_sh + static_cast<int64_t>(ow_pa) * p.r_sw;
  const int64_t res_b = static_cast<int64_t>(oh_pb) * p.r_sh + static_cast<int64_t>(ow_pb) * p.r_sw;

#pragma unroll
  for (int c = 0; c < NC; ++c) {
    if (c < nc) {
      const int64_t oc = oc0 + c;
      if (p.stats) {
        double ys = 0.0, yq = 0.0;  // this lane's valid outputs, image by image, a then b
#pragma unroll
        for (int i = 0; i < IMG; ++i) {
          const bool image_ok = n0 + i < p.N;
          const double ya = valid_a && image_ok ? static_cast<double>(acc_a[i][c]) : 0.0;
          const double yb = valid_b && image_ok ? static_cast<double>(acc_b[i][c]) : 0.0;
          ys += ya + yb;
          yq += ya * ya + yb * yb;
        }
        const double s = warp_sum(ys);
        const double q = warp_sum(yq);
        if (lane == 0) {
          p.part_s[oc * p.pixel_tiles + ptile] = s;
          p.part_q[oc * p.pixel_tiles + ptile] = q;
        }
      }
      const T sc = p.scale != nullptr ? p.scale[oc] : T(1);
      const T sh = p.shift != nullptr ? p.shift[oc] : T(0);
#pragma unroll
      for (int i = 0; i < IMG; ++i) {
        const int64_t n = n0 + i;
        if (n >= p.N) continue;
        T* out_c = p.out + (n * p.out_channels + oc) * plane;
        const T* res_c = p.residual != nullptr ? p.residual + n * p.r_sn + oc * p.r_sc : nullptr;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const bool valid = j == 0 ? valid_a : valid_b;
          if (!valid) continue;
          T y = j == 0 ? acc_a[i][c] : acc_b[i][c];
          if (p.scale != nullptr) y = y * sc;
          if (p.shift != nullptr) y = y + sh;
          if (res_c != nullptr) y = y + res_c[j == 0 ? res_a : res_b];
          if (p.activation == static_cast<int>(Activation::kRelu)) {
            y = y < T(0) ? T(0) : y;  // NaN passes through, as torch.relu
          } else if (p.activation == static_cast<int>(Activation::kPRelu)) {
            y = y > T(0) ? y : slope * y;
          }
          out_c[j == 0 ? pix_a : pix_b] = y;
        }
      }
    }
  }
}

// Grid (pixel tiles, channel tiles of this launch), one warp per block.
template <typename T, int KS, int IMG>
__global__ void __launch_bounds__(kWarp, IMG == 1 ? kMinBlocksPerSM : kMinBlocksPerSM2)
    multi_conv2d_kernel(const ConvParams<T> p) {
  extern __shared__ __align__(16) unsigned char conv_shared[];
  constexpr int CK = ChunkOf<KS>::value;
  T* ws = reinterpret_cast<T*>(conv_shared);
  T* xs = ws + CK * KS * KS * kWeightStride;

  const int64_t ptile = blockIdx.x;
  const int tile = p.tile_base + static_cast<int>(blockIdx.y);
  const int32_t* entry = p.meta + static_cast<int64_t>(p.num_candidates) * kCandidateInts +
                         static_cast<int64_t>(tile) * kTileInts;
  const int k = entry[0];
  const int c0 = entry[1];
  const int out_width = p.meta[static_cast<int64_t>(k) * kCandidateInts + 2];
  const int nc = min(kTileChannels, out_width - c0);
  // Block-uniform: the whole block takes one branch.
  if (nc <= 4) {
    conv_tile<T, KS, 4, IMG>(p, ws, xs, ptile, k, c0, nc);
  } else if (nc <= 8) {
    conv_tile<T, KS, 8, IMG>(p, ws, xs, ptile, k, c0, nc);
  } else if (nc <= 12) {
    conv_tile<T, KS, 12, IMG>(p, ws, xs, ptile, k, c0, nc);
  } else {
    conv_tile<T, KS, 16, IMG>(p, ws, xs, ptile, k, c0, nc);
  }
}

struct Geometry : TileGeometry {
  int64_t pixel_tiles;
};

// images: per pixel tile (1, or 2 for the two-image kernel)
Geometry make_geometry(const MultiConv2dProblem& pr, int images = 1) {
  Geometry g{};
  static_cast<TileGeometry&>(g) = choose_tiles(pr, kTileLog2);
  g.pixel_tiles = div_up(pr.n, images) * g.tiles_h * g.tiles_w;
  return g;
}

size_t shared_bytes(int kernel, const Geometry& g, size_t elem, int images) {
  const int ck = kernel == 1 ? ChunkOf<1>::value : ChunkOf<3>::value;
  return (static_cast<size_t>(ck) * kernel * kernel * kWeightStride +
          static_cast<size_t>(images) * ck * g.patch_h * g.patch_w) *
         elem;
}

// Images per pixel tile of the float kernel: FASTSUPERNET_CUDA_CONV_IMAGES (1 or 2; default 1).
int images_per_tile() {
  const char* v = std::getenv("FASTSUPERNET_CUDA_CONV_IMAGES");
  return v != nullptr && v[0] == '2' && v[1] == '\0' ? 2 : 1;
}

template <typename T>
cudaError_t launch_impl(const MultiConv2dProblem& pr, const T* x, const T* weight, const int32_t* meta,
                        const T* scale, const T* shift, const T* residual, const T* prelu_slope, T* out,
                        double* sum, double* sumsq, void* workspace, size_t workspace_bytes,
                        cudaStream_t stream) {
  if (!valid_problem(pr)) return cudaErrorInvalidValue;
  const int images = std::is_same<T, float>::value ? images_per_tile() : 1;  // (double: registers)
  const Geometry g = make_geometry(pr, images);
  if (g.h_out < 1 || g.w_out < 1) return cudaErrorInvalidValue;
  if (pr.activation == Activation::kPRelu && prelu_slope == nullptr) return cudaErrorInvalidValue;
  if (pr.h > 0x7fffffffLL || pr.w > 0x7fffffffLL || pr.channel_tiles > 0x7fffffffLL ||
      pr.num_candidates > 0x7fffffff || g.pixel_tiles > 0x7fffffffLL ||
      pr.weight_cols * pr.kernel * pr.kernel > 0x7fffffffLL) {
    return cudaErrorInvalidValue;
  }
  if (pr.n == 0) return pr.stats ? zero_stats(sum, sumsq, pr.out_channels, stream) : cudaSuccess;
  if (pr.stats && (workspace == nullptr || workspace_bytes < multi_conv2d_workspace_bytes(pr))) {
    return cudaErrorInvalidValue;
  }

  const size_t smem = shared_bytes(pr.kernel, g, sizeof(T), images);
  int device = 0;
  int max_smem = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  if (smem > static_cast<size_t>(max_smem)) return cudaErrorInvalidConfiguration;  // stride too large

  ConvParams<T> p{};
  fill_args<T>(p, pr, g, g.pixel_tiles, x, weight, meta, scale, shift, residual, prelu_slope, out, workspace);
  p.step_c = kWarp / p.patch_elems;
  p.step_h = (kWarp - p.step_c * p.patch_elems) / p.patch_w;
  p.step_w = kWarp - p.step_c * p.patch_elems - p.step_h * p.patch_w;

  if constexpr (std::is_same<T, float>::value) {
    if (images == 2) {
      err = pr.kernel == 1
                ? launch_tiles(multi_conv2d_kernel<T, 1, 2>, p, g.pixel_tiles, pr.channel_tiles, kWarp, smem, stream)
                : launch_tiles(multi_conv2d_kernel<T, 3, 2>, p, g.pixel_tiles, pr.channel_tiles, kWarp, smem, stream);
      if (err != cudaSuccess || !pr.stats) return err;
      return merge_partials(p.part_s, p.part_q, g.pixel_tiles, pr.out_channels, sum, sumsq, stream);
    }
  }
  err = pr.kernel == 1
            ? launch_tiles(multi_conv2d_kernel<T, 1, 1>, p, g.pixel_tiles, pr.channel_tiles, kWarp, smem, stream)
            : launch_tiles(multi_conv2d_kernel<T, 3, 1>, p, g.pixel_tiles, pr.channel_tiles, kWarp, smem, stream);
  if (err != cudaSuccess || !pr.stats) return err;

  return merge_partials(p.part_s, p.part_q, g.pixel_tiles, pr.out_channels, sum, sumsq, stream);
}

}  // namespace

int64_t multi_conv2d_out_size(int64_t size, int kernel, int stride, int padding) {
  if (stride < 1) return 0;
  const int64_t span = size + 2 * static_cast<int64_t>(padding) - kernel;
  return span < 0 ? 0 : span / stride + 1;
}

int64_t multi_conv2d_meta_size(int num_candidates, const int64_t* out_widths) {
  int64_t tiles = 0;
  for (int k = 0; k < num_candidates; ++k) tiles += div_up(std::max<int64_t>(out_widths[k], 0), kTileChannels);
  return static_cast<int64_t>(num_candidates) * kCandidateInts + tiles * kTileInts;
}

int64_t multi_conv2d_fill_meta(int num_candidates, const int64_t* in_offsets, const int64_t* in_widths,
                               const int64_t* out_widths, const int64_t* row_offsets, int32_t* meta) {
  int64_t out_offset = 0;
  int32_t* tiles = meta + static_cast<int64_t>(num_candidates) * kCandidateInts;
  int64_t t = 0;
  for (int k = 0; k < num_candidates; ++k) {
    int32_t* c = meta + static_cast<int64_t>(k) * kCandidateInts;
    c[0] = static_cast<int32_t>(in_offsets[k]);
    c[1] = static_cast<int32_t>(in_widths[k]);
    c[2] = static_cast<int32_t>(out_widths[k]);
    c[3] = static_cast<int32_t>(row_offsets[k]);
    c[4] = static_cast<int32_t>(out_offset);
    for (int64_t c0 = 0; c0 < out_widths[k]; c0 += kTileChannels) {
      tiles[t * kTileInts] = k;
      tiles[t * kTileInts + 1] = static_cast<int32_t>(c0);
      ++t;
    }
    out_offset += out_widths[k];
  }
  return t;
}

size_t multi_conv2d_workspace_bytes(const MultiConv2dProblem& problem) {
  if (!problem.stats || !valid_problem(problem)) return 0;
  return partials_bytes(problem.out_channels, make_geometry(problem).pixel_tiles);
}

cudaError_t launch_multi_conv2d_f32(const MultiConv2dProblem& problem, const float* x, const float* weight,
                                    const int32_t* meta, const float* scale, const float* shift,
                                    const float* residual, const float* prelu_slope, float* out, double* sum,
                                    double* sumsq, void* workspace, size_t workspace_bytes,
                                    cudaStream_t stream) {
  return launch_impl<float>(problem, x, weight, meta, scale, shift, residual, prelu_slope, out, sum, sumsq,
                            workspace, workspace_bytes, stream);
}

cudaError_t launch_multi_conv2d_f64(const MultiConv2dProblem& problem, const double* x, const double* weight,
                                    const int32_t* meta, const double* scale, const double* shift,
                                    const double* residual, const double* prelu_slope, double* out,
                                    double* sum, double* sumsq, void* workspace, size_t workspace_bytes,
                                    cudaStream_t stream) {
  return launch_impl<double>(problem, x, weight, meta, scale, shift, residual, prelu_slope, out, sum, sumsq,
                             workspace, workspace_bytes, stream);
}

}  // namespace cuda
}  // namespace fastsupernet
