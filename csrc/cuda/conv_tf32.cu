// Tensor-core (TF32) kernel of multi_conv2d: the same op as csrc/cuda/conv.cu (K candidate
// convolutions of one layer per launch, fused epilogue, float64 statistics) with the products
// taken on the tensor cores in TF32. Needs compute capability 8.0 or newer (mma.sync); only
// the CUDA runtime (see kernels.h).
//
// GEMM view. An mma.sync.m16n8k8 multiplies 16 rows by 8 reduction indices by 8 columns. Its 16
// rows are 16 IMAGES at one output position, its reduction indices 8 input channels at one
// kernel tap, its columns 8 output channels of one candidate. Rows of one position are then
// equally spaced in shared memory whatever the image size, stride or tap, so every operand is
// loaded straight from the staged input patch (no im2col copy).
//
// Work split. A block (4 warps) computes 16 images x 32 output positions (a TH x TW rectangle,
// TW a power of two picked per shape) x one channel tile (at most 16 output channels of one
// candidate, listed by multi_conv2d_fill_meta, as in conv.cu). Warp w owns positions
// 8w..8w+7; for every one it keeps two 16x8 accumulators (channels 0-7 and 8-15; the second is
// skipped for tiles of at most 8 channels). The block walks the candidate's input channels in
// chunks (8 for 3x3, 16 for 1x1); per chunk it stages the weights and the input patch of its 16
// images (with the halo, zero padded; images past N and channels past the candidate's width
// are zeros) in shared memory, rounded to TF32, then each warp runs taps x positions x 1-2 mma.
//
// Shared-memory layouts (bank-conflict free for the mma operand loads):
// - patch: per staged position 16 images x 8 channels; image r's channel c sits at word
//   r * 8 + (c ^ 4 * ((r >> 2) & 1)), positions 132 words apart (the pad makes the staging
//   stores of 8 columns x 4 channels hit 32 banks);
// - weights: one row of 24 words per (tap, input channel), channel n of the tile at word n.
// The epilogue moves the accumulators through shared memory (channel-major, position fastest)
// so that the output and residual are accessed along rows of the image.
//
// Layout. x is read through its strides (contiguous NCHW is the fast path); out is contiguous
// NCHW; the residual is read through its strides.
//
// Statistics: the fp32 conv values (before the epilogue) widened to double, added per channel
// over the block's valid outputs in a fixed order (per lane, then a shuffle tree, then the four
// warps in order), one partial per (channel, pixel tile) in the workspace, merged by the
// second kernel of conv.cu's scheme (conv_common.cuh). No atomics: bitwise
// reproducible for a shape.
//
// Error bound. x and weight are rounded to TF32 (10 explicit mantissa bits, round to nearest,
// ties away: relative error <= 2^-11 each); their products are exact in fp32 and are summed in
// fp32 by the tensor cores over R = in_width * k * k terms. Against the exact convolution of
// the unrounded inputs: |y - y_exact| <= (2^-10 + R * 2^-23) * sum |w * x| (the first term
// dominates: about 1e-3 of sum |w * x|). Against the convolution of the TF32-rounded inputs:
// |y - y_tf32| <= R * 2^-23 * sum |w * x| (the accumulation alone). The epilogue is fp32 as in
// conv.cu.

#include "conv_common.cuh"
#include "kernels.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace fastsupernet {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarp;
constexpr int kImages = 16;                               // rows of one mma
constexpr int kWarpPositions = 8;                          // output positions per warp
constexpr int kTileLog2 = 5;
constexpr int kTilePositions = kWarps * kWarpPositions;    // 32 per block: 1 << kTileLog2
constexpr int kPosStride = kImages * 8 + 4;                // words per staged position (8 channels)
constexpr int kWeightStride = 24;                          // words per (tap, input channel) row
constexpr int kOutPosStride = kTilePositions + 1;          // 33
constexpr int kOutChanStride = kImages * kOutPosStride + 20;  // 548 = 4 (mod 32)
constexpr int kSlots = 8;                                  // 16-byte staging slots per thread (vector path)

template <int KS>
struct ChunkOf {
  static constexpr int value = KS == 1 ? 16 : 8;  // input channels per shared-memory chunk
};

struct TcParams : ConvArgs<float> {
  int red_offset;  // bytes from the start of shared memory to the statistics scratch
  int raw_offset;  // bytes from the start of shared memory to the 16-byte staging slots
  int row_lanes;   // vector path: lanes per patch row (4 or 8); 0: the scalar path
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// Word of (image row r, input channel c of an 8-channel group) within a staged position: the
// channel index is XOR-swizzled by bit 2 of the row, so that the mma operand loads (lanes over
// rows g and channels t) and the staging stores (lanes over columns and channels) hit 32 banks.
__device__ __forceinline__ int operand_word(int r, int c) { return r * 8 + ((c & 7) ^ (((r >> 2) & 1) << 2)); }

__device__ __forceinline__ uint32_t to_tf32(float v) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
  return r;
}

// d += a * b for one 16x8x8 TF32 tile (fp32 accumulators).
__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Asynchronous 16-byte copy global -> shared (both 16-byte aligned); zero-fills when !valid.
__device__ __forceinline__ void copy_async16(float4* dst, const float* src, bool valid) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0) : "memory");
}

// A staged float, rounded in place to TF32.
__device__ __forceinline__ void round_tf32(uint32_t* v) { *v = to_tf32(__uint_as_float(*v)); }
#endif

// Grid (pixel tiles = image groups x position tiles, channel tiles of this launch).
template <int KS>
__global__ void __launch_bounds__(kThreads, 3) multi_conv2d_tf32_kernel(const TcParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int KK = KS * KS;
  constexpr int CK = ChunkOf<KS>::value;
  constexpr int KG = CK / 8;  // 8-channel groups per chunk
  extern __shared__ __align__(16) unsigned char tc_shared[];
  uint32_t* ws = reinterpret_cast<uint32_t*>(tc_shared);
  uint32_t* xs = ws + CK * KK * kWeightStride;
  float* os = reinterpret_cast<float*>(tc_shared);  // after the main loop
  double* red = reinterpret_cast<double*>(tc_shared + p.red_offset);

  const int lane = threadIdx.x & (kWarp - 1);
  const int warp = threadIdx.x / kWarp;
  const int g = lane >> 2;  // mma row group
  const int t = lane & 3;   // mma thread in group

  const int64_t ptile = blockIdx.x;
  const int tile = p.tile_base + static_cast<int>(blockIdx.y);
  const int32_t* entry = p.meta + static_cast<int64_t>(p.num_candidates) * kCandidateInts +
                         static_cast<int64_t>(tile) * kTileInts;
  const int k = entry[0];
  const int c0 = entry[1];
  const int32_t* cand = p.meta + static_cast<int64_t>(k) * kCandidateInts;
  const int in_offset = cand[0];
  const int in_width = cand[1];
  const int out_width = cand[2];
  const int row0 = cand[3] + c0;
  const int oc0 = cand[4] + c0;
  const int nc = min(kTileChannels, out_width - c0);
  const bool two = nc > 8;  // block-uniform

  // Tile position (image group, position rectangle); a patch step is `pstep` input pixels (the
  // 1x1 patch holds exactly the sampled pixels, the 3x3 patch the dense window).
  const TileOrigin origin = tile_origin(p, ptile, kTileLog2);
  const int tile_w = 1 << p.tile_w_log2;
  const int oh_t = origin.oh;
  const int ow_t = origin.ow;
  const int n0 = static_cast<int>(origin.image) * kImages;
  const int ih_base = origin.ih;
  const int iw_base = origin.iw;
  const int pstep = KS == 1 ? p.stride : 1;
  const int cstep = KS == 1 ? 1 : p.stride;  // patch elements between neighbouring outputs

  // Staged-patch word offsets of this warp's positions and of this lane's operand elements.
  int pbase[kWarpPositions];
#pragma unroll
  for (int i = 0; i < kWarpPositions; ++i) {
    const int pos = warp * kWarpPositions + i;
    const int py = pos >> p.tile_w_log2;
    const int px = pos & (tile_w - 1);
    pbase[i] = (py * cstep * p.patch_w + px * cstep) * kPosStride;
  }
  const int a_off0 = operand_word(g, t);
  const int a_off1 = operand_word(g + 8, t);
  const int a_off2 = operand_word(g, t + 4);
  const int a_off3 = operand_word(g + 8, t + 4);

  float acc[kWarpPositions][2][4];
#pragma unroll
  for (int i = 0; i < kWarpPositions; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][h][j] = 0.f;
    }
  }

  const float* w_rows = p.weight + static_cast<int64_t>(row0) * p.weight_row;
  const int lc = lane & 7;   // staging: column within 8
  const int lq = lane >> 3;  // staging: channel within 4

  for (int ci0 = 0; ci0 < in_width; ci0 += CK) {
    const int ckv = min(CK, in_width - ci0);
    if (ci0 > 0) __syncthreads();  // the previous chunk is consumed

    // Stage the chunk: asynchronous copies (many loads of a thread in flight at once), then each
    // thread rounds to TF32 the elements it copied (so no barrier is needed in between).
    // Weights: ws[((kc * KK + tap) * 8 + kk) * kWeightStride + n] = weight[row0 + n, ci0 + 8 kc + kk, tap].
    for (int i = threadIdx.x; i < kTileChannels * CK * KK; i += kThreads) {
      const int n = i & (kTileChannels - 1);
      const int r = i / kTileChannels;  // (kc * KK + tap) * 8 + kk
      const int kk = r & 7;
      const int kt = r >> 3;
      const int kc = kt / KK;
      const int tap = kt - kc * KK;
      const int c = kc * 8 + kk;
      const bool ok = n < nc && c < ckv;
      stage(reinterpret_cast<float*>(ws + r * kWeightStride + n),
            ok ? w_rows + static_cast<int64_t>(n) * p.weight_row + (ci0 + c) * KK + tap : p.weight, ok);
    }
    if (p.row_lanes > 0) {
      // Vector path (x rows 16-byte aligned, unit column stride, dense patch rows): a warp
      // instruction copies one patch row (the aligned 16-byte vectors covering it) of
      // 32 / row_lanes channels of one image into per-thread slots, kSlots rows per round; the
      // thread then scatters its vectors, rounded, into the patch layout.
      const int lanes = p.row_lanes;
      const int per_inst = kWarp / lanes;      // channels per warp instruction
      const int groups = CK / per_inst;        // channel groups per (image, row)
      const int vi = lane & (lanes - 1);
      const int cl = lane / lanes;
      const int a0 = iw_base & ~3;             // first aligned column (floor, also below 0)
      const int vr = (iw_base - a0 + p.patch_w + 3) >> 2;  // vectors per row (<= lanes)
      const int iw0 = a0 + 4 * vi;
      const bool vec_ok = vi < vr && iw0 >= 0 && iw0 < p.W;  // W % 4 == 0: a vector is all in or all out
      float4* slots = reinterpret_cast<float4*>(tc_shared + p.raw_offset) + threadIdx.x;
      const int items = kImages * p.patch_h * groups;
      for (int base = warp; base < items; base += kWarps * kSlots) {
#pragma unroll
        for (int u = 0; u < kSlots; ++u) {
          const int it = base + u * kWarps;
          if (it >= items) break;
          const int cg = it % groups;
          const int r = it / groups;
          const int pr = r % p.patch_h;
          const int img = r / p.patch_h;
          const int c = cg * per_inst + cl;
          const int n = n0 + img;
          const int ih = ih_base + pr;
          const bool ok = vec_ok && n < p.N && c < ckv && ih >= 0 && ih < p.H;
          const float* src = ok ? p.x + static_cast<int64_t>(n) * p.x_sn +
                                      static_cast<int64_t>(in_offset + ci0 + c) * p.x_sc +
                                      static_cast<int64_t>(ih) * p.x_sh + iw0
                                : p.x;
          copy_async16(slots + u * kThreads, src, ok);
        }
        stage_wait();
#pragma unroll
        for (int u = 0; u < kSlots; ++u) {
          const int it = base + u * kWarps;
          if (it >= items) break;
          if (vi >= vr) continue;
          const int cg = it % groups;
          const int r = it / groups;
          const int pr = r % p.patch_h;
          const int img = r / p.patch_h;
          const int c = cg * per_inst + cl;
          const float4 v = slots[u * kThreads];
          uint32_t* dst = xs + ((c >> 3) * p.patch_elems + pr * p.patch_w) * kPosStride + operand_word(img, c);
          const int col = iw0 - iw_base;  // patch column of v.x
          if (col >= 0 && col < p.patch_w) dst[col * kPosStride] = to_tf32(v.x);
          if (col + 1 >= 0 && col + 1 < p.patch_w) dst[(col + 1) * kPosStride] = to_tf32(v.y);
          if (col + 2 >= 0 && col + 2 < p.patch_w) dst[(col + 2) * kPosStride] = to_tf32(v.z);
          if (col + 3 >= 0 && col + 3 < p.patch_w) dst[(col + 3) * kPosStride] = to_tf32(v.w);
        }
      }
    } else {
      // Scalar path: warp instructions of 8 columns x 4 channels of one image.
      for (int pass = 0; pass < 2; ++pass) {
        for (int iq = warp; iq < kImages * (CK / 4); iq += kWarps) {
          const int img = iq / (CK / 4);
          const int c = (iq - img * (CK / 4)) * 4 + lq;
          const int n = n0 + img;
          const bool live = n < p.N && c < ckv;
          const float* xc = live ? p.x + static_cast<int64_t>(n) * p.x_sn +
                                       static_cast<int64_t>(in_offset + ci0 + c) * p.x_sc
                                 : p.x;
          uint32_t* dst = xs + (c >> 3) * p.patch_elems * kPosStride + operand_word(img, c);
          for (int pr = 0; pr < p.patch_h; ++pr) {
            const int ih = ih_base + pr * pstep;
            const bool row_ok = live && ih >= 0 && ih < p.H;
            for (int col = lc; col < p.patch_w; col += 8) {
              uint32_t* d = dst + (pr * p.patch_w + col) * kPosStride;
              if (pass == 1) {
                round_tf32(d);
                continue;
              }
              const int iw = iw_base + col * pstep;
              const bool ok = row_ok && iw >= 0 && iw < p.W;
              const float* src = ok ? xc + static_cast<int64_t>(ih) * p.x_sh + static_cast<int64_t>(iw) * p.x_sw : p.x;
              stage(reinterpret_cast<float*>(d), src, ok);
            }
          }
        }
        if (pass == 0) stage_wait();  // this thread's copies have landed (it rounds only those)
      }
    }
    stage_wait();  // (the weights)
    for (int i = threadIdx.x; i < kTileChannels * CK * KK; i += kThreads) {
      round_tf32(ws + (i / kTileChannels) * kWeightStride + (i & (kTileChannels - 1)));
    }
    __syncthreads();

#pragma unroll
    for (int kc = 0; kc < KG; ++kc) {
      if (kc * 8 >= ckv) break;  // block-uniform
#pragma unroll
      for (int tap = 0; tap < KK; ++tap) {
        const uint32_t* wr = ws + (kc * KK + tap) * 8 * kWeightStride;
        const uint32_t b0 = wr[t * kWeightStride + g];
        const uint32_t b1 = wr[(t + 4) * kWeightStride + g];
        const uint32_t b2 = wr[t * kWeightStride + 8 + g];
        const uint32_t b3 = wr[(t + 4) * kWeightStride + 8 + g];
        const int ky = tap / KS;
        const int kx = tap - ky * KS;
        const uint32_t* xk = xs + (kc * p.patch_elems + ky * p.patch_w + kx) * kPosStride;
#pragma unroll
        for (int i = 0; i < kWarpPositions; ++i) {
          const uint32_t* xp = xk + pbase[i];
          const uint32_t a[4] = {xp[a_off0], xp[a_off1], xp[a_off2], xp[a_off3]};
          mma_tf32(acc[i][0], a, b0, b1);
          if (two) mma_tf32(acc[i][1], a, b2, b3);
        }
      }
    }
  }

  // Validity of this lane's positions and images.
  bool pos_ok[kWarpPositions];
#pragma unroll
  for (int i = 0; i < kWarpPositions; ++i) {
    const int pos = warp * kWarpPositions + i;
    pos_ok[i] = oh_t + (pos >> p.tile_w_log2) < p.Ho && ow_t + (pos & (tile_w - 1)) < p.Wo;
  }
  const bool img_lo = n0 + g < p.N;
  const bool img_hi = n0 + g + 8 < p.N;

  if (p.stats) {
    // Channel nh * 8 + 2t + j of this lane: images g and g + 8 at its 8 positions.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        double s = 0.0, q = 0.0;
#pragma unroll
        for (int i = 0; i < kWarpPositions; ++i) {
          if (!pos_ok[i]) continue;
          if (img_lo) {
            const double y = static_cast<double>(acc[i][h][j]);
            s += y;
            q += y * y;
          }
          if (img_hi) {
            const double y = static_cast<double>(acc[i][h][2 + j]);
            s += y;
            q += y * y;
          }
        }
#pragma unroll
        for (int m = 4; m < kWarp; m <<= 1) {  // over g (lanes with the same t)
          s += __shfl_xor_sync(0xffffffffu, s, m);
          q += __shfl_xor_sync(0xffffffffu, q, m);
        }
        if (g == 0) {
          const int ch = h * 8 + 2 * t + j;
          red[(warp * kTileChannels + ch) * 2] = s;
          red[(warp * kTileChannels + ch) * 2 + 1] = q;
        }
      }
    }
  }
  __syncthreads();  // every warp is done with the patch (and wrote its statistics)
  if (p.stats && static_cast<int>(threadIdx.x) < nc) {
    const int ch = threadIdx.x;
    double s = 0.0, q = 0.0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      s += red[(w * kTileChannels + ch) * 2];
      q += red[(w * kTileChannels + ch) * 2 + 1];
    }
    p.part_s[static_cast<int64_t>(oc0 + ch) * p.pixel_tiles + ptile] = s;
    p.part_q[static_cast<int64_t>(oc0 + ch) * p.pixel_tiles + ptile] = q;
  }

  // Accumulators to shared memory: os[ch * kOutChanStride + img * kOutPosStride + pos].
#pragma unroll
  for (int i = 0; i < kWarpPositions; ++i) {
    const int pos = warp * kWarpPositions + i;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int ch = h * 8 + 2 * t + j;
        os[ch * kOutChanStride + g * kOutPosStride + pos] = acc[i][h][j];
        os[ch * kOutChanStride + (g + 8) * kOutPosStride + pos] = acc[i][h][2 + j];
      }
    }
  }
  __syncthreads();

  // Epilogue: one (image, channel) row of the tile per warp instruction, lanes along positions.
  const float slope = p.activation == static_cast<int>(Activation::kPRelu) ? p.prelu_slope[k] : 0.f;
  const int64_t plane = static_cast<int64_t>(p.Ho) * p.Wo;
  const int oh = oh_t + (lane >> p.tile_w_log2);
  const int ow = ow_t + (lane & (tile_w - 1));
  if (oh < p.Ho && ow < p.Wo) {
    for (int pc = warp; pc < kImages * nc; pc += kWarps) {
      const int img = pc / nc;
      const int ch = pc - img * nc;
      const int n = n0 + img;
      if (n >= p.N) break;  // images only grow along pc
      const int64_t oc = oc0 + ch;
      float y = os[ch * kOutChanStride + img * kOutPosStride + lane];
      if (p.scale != nullptr) y = y * p.scale[oc];
      if (p.shift != nullptr) y = y + p.shift[oc];
      if (p.residual != nullptr) {
        y = y + p.residual[n * p.r_sn + oc * p.r_sc + static_cast<int64_t>(oh) * p.r_sh +
                           static_cast<int64_t>(ow) * p.r_sw];
      }
      if (p.activation == static_cast<int>(Activation::kRelu)) {
        y = y < 0.f ? 0.f : y;  // NaN passes through, as torch.relu
      } else if (p.activation == static_cast<int>(Activation::kPRelu)) {
        y = y > 0.f ? y : slope * y;
      }
      p.out[(static_cast<int64_t>(n) * p.out_channels + oc) * plane + static_cast<int64_t>(oh) * p.Wo + ow] = y;
    }
  }
#else
  __trap();  // the host launcher refuses devices below compute capability 8.0
#endif
}

struct TcGeometry : TileGeometry {
  int64_t groups, pixel_tiles;  // pixel tile = (group of 16 images, position tile)
  int row_lanes;  // vector staging: lanes per patch row (4 or 8), 0 when the patch rows are too wide
  size_t raw_offset, red_offset, smem;
};

// Position tiles of 32 outputs (choose_tiles), the grid, and the shared-memory layout.
TcGeometry make_geometry(const MultiConv2dProblem& pr) {
  TcGeometry g{};
  static_cast<TileGeometry&>(g) = choose_tiles(pr, kTileLog2);
  g.groups = div_up(pr.n, kImages);
  g.pixel_tiles = g.groups * g.tiles_h * g.tiles_w;
  const int ck = pr.kernel == 1 ? ChunkOf<1>::value : ChunkOf<3>::value;
  const size_t main_words = static_cast<size_t>(ck) * pr.kernel * pr.kernel * kWeightStride +
                            static_cast<size_t>(ck / 8) * g.patch_h * g.patch_w * kPosStride;
  const size_t out_words = static_cast<size_t>(kTileChannels) * kOutChanStride;
  // The vector path copies 16-byte vectors of dense patch rows (a 1x1 kernel samples with the stride).
  const int vectors = (3 + g.patch_w + 3) / 4;  // most vectors a patch row can touch
  g.row_lanes = (pr.kernel == 1 && pr.stride != 1) ? 0 : vectors <= 4 ? 4 : vectors <= 8 ? 8 : 0;
  g.raw_offset = (main_words * 4 + 15) / 16 * 16;
  const size_t raw_bytes = static_cast<size_t>(kSlots) * kThreads * 16;
  const size_t region = (std::max(g.raw_offset + raw_bytes, out_words * 4) + 15) / 16 * 16;
  g.red_offset = region;
  g.smem = region + static_cast<size_t>(kWarps) * kTileChannels * 2 * sizeof(double);
  return g;
}

}  // namespace

size_t multi_conv2d_tf32_workspace_bytes(const MultiConv2dProblem& problem) {
  if (!problem.stats || !valid_problem(problem)) return 0;
  return partials_bytes(problem.out_channels, make_geometry(problem).pixel_tiles);
}

cudaError_t launch_multi_conv2d_tf32(const MultiConv2dProblem& pr, const float* x, const float* weight,
                                     const int32_t* meta, const float* scale, const float* shift,
                                     const float* residual, const float* prelu_slope, float* out, double* sum,
                                     double* sumsq, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (!valid_problem(pr)) return cudaErrorInvalidValue;
  const TcGeometry g = make_geometry(pr);
  if (g.h_out < 1 || g.w_out < 1) return cudaErrorInvalidValue;
  if (pr.activation == Activation::kPRelu && prelu_slope == nullptr) return cudaErrorInvalidValue;
  if (pr.n > 0x7fffffffLL || pr.h > 0x7fffffffLL || pr.w > 0x7fffffffLL || pr.channel_tiles > 0x7fffffffLL ||
      pr.num_candidates > 0x7fffffff || g.pixel_tiles > 0x7fffffffLL ||
      pr.weight_cols * pr.kernel * pr.kernel > 0x7fffffffLL) {
    return cudaErrorInvalidValue;
  }
  int device = 0, major = 0, max_smem = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) return err;
  if (major < 8) return cudaErrorNotSupported;  // mma.sync with TF32 needs sm_80
  if (pr.n == 0) return pr.stats ? zero_stats(sum, sumsq, pr.out_channels, stream) : cudaSuccess;
  if (pr.stats && (workspace == nullptr || workspace_bytes < multi_conv2d_tf32_workspace_bytes(pr))) {
    return cudaErrorInvalidValue;
  }
  err = cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  if (g.smem > static_cast<size_t>(max_smem)) return cudaErrorInvalidConfiguration;  // stride too large

  TcParams p{};
  fill_args<float>(p, pr, g, g.pixel_tiles, x, weight, meta, scale, shift, residual, prelu_slope, out, workspace);
  p.red_offset = static_cast<int>(g.red_offset);
  p.raw_offset = static_cast<int>(g.raw_offset);
  // Vector staging needs 16-byte aligned rows with unit column stride and whole vectors per row.
  const bool aligned = reinterpret_cast<uintptr_t>(x) % 16 == 0 && pr.x_strides[3] == 1 && pr.x_strides[2] % 4 == 0 &&
                       pr.x_strides[1] % 4 == 0 && pr.x_strides[0] % 4 == 0 && pr.w % 4 == 0;
  p.row_lanes = aligned ? g.row_lanes : 0;

  err = pr.kernel == 1
            ? launch_tiles(multi_conv2d_tf32_kernel<1>, p, g.pixel_tiles, pr.channel_tiles, kThreads, g.smem, stream)
            : launch_tiles(multi_conv2d_tf32_kernel<3>, p, g.pixel_tiles, pr.channel_tiles, kThreads, g.smem, stream);
  if (err != cudaSuccess || !pr.stats) return err;

  return merge_partials(p.part_s, p.part_q, g.pixel_tiles, pr.out_channels, sum, sumsq, stream);
}

}  // namespace cuda
}  // namespace fastsupernet
