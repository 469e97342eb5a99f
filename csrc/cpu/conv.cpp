// CPU kernels of fastsupernet::multi_conv2d and fastsupernet::sliced_conv2d (float32, float64).
//
// Semantics (schemas in csrc/fastsupernet.cpp): candidate k convolves input channels
// [in_offsets[k], + in_widths[k]) of x with weight[row_offsets[k] : + out_widths[k],
// :in_widths[k]] (any strides; packed per call, see below), zero padding, one stride for both axes, no
// dilation or groups, no bias; its out_widths[k] channels go to the packed output at the
// prefix-sum offset. Epilogue per output channel c, in order: y * scale[c] + shift[c]
// (either may be absent), + residual, activation ("none", "relu", or "prelu" with the slope
// prelu_slope[k] of the channel's candidate). With stats, sum/sumsq are the float64
// per-channel sums of the conv output before the epilogue (shape (M,)); otherwise empty
// float64 tensors. sliced_conv2d is the case K = 1, offset 0, in_width = x.size(1).
//
// Layouts. x may have any strides (NCHW, channels_last, a channel-slice view, ...). The
// output is always a new NCHW-contiguous (N, M, H', W') tensor, whatever x's layout; residual
// must have that shape (any layout; a non-contiguous one is copied). scale, shift (1-D, M
// values), prelu_slope and residual of another floating dtype are converted to x's dtype.
// Bad arguments raise ValueError, bad dtypes TypeError.
//
// Algorithms. Candidates of float32 3x3 stride-1 padding-1 layers whose output width is a
// multiple of 8 and height even go to Winograd (conv_winograd.cpp) when the CPU has AVX2 +
// FMA and their input width is at least winograd_min_width: F(4x4, 3x3) where the output is
// 8, 16 or 32 wide and its height a multiple of 4 (x with unit column stride; AVX2: from 8
// channels; AVX-512: 20 on 32-wide outputs, 16 on 16-wide, 8 on 8-wide), F(2x2, 3x3)
// elsewhere (AVX2: 20, or 8 on 8-wide outputs; AVX-512: 36, or 20 on 8-wide outputs); every
// other candidate, below. Float32 3x3 stride-2 padding-1 layers on 16x16 inputs (unit column
// stride, no residual, no statistics) on AVX-512 CPUs take F(4x4, 2x2) on the input's stride
// phases (conv_winograd_s2.cpp) per candidate from input width 16 and output width 32 (calls
// of 64 images or more; candidates reading one input slice share its transform).
// FASTSUPERNET_CPU_WINOGRAD=0 turns Winograd off, =all takes it for every candidate of a
// suitable layer whatever its width; FASTSUPERNET_CPU_WINOGRAD_TILE=2 keeps F(2x2).
//
// Direct algorithm: an implicit GEMM per image, C[row, pixel] = sum_k A[row, k] * B[k, pixel],
// k = (ci, i, j) running over the candidate's in_width * kh * kw taps.
//  * B is never materialised (no im2col). Per image, the channels a group of candidates
//    reads are copied once into a zero-padded scratch in which stride phases are split
//    (column c of a padded row sits at (c % stride) * phase_len + c / stride). Then the input
//    of tap k for kLanes consecutive output pixels of one output row is a contiguous vector
//    at (vector base + tap offset): both tables are built once per call, and one loop serves
//    3x3/1x1 (any kh x kw), stride 1/2 (any), any padding. A 1x1 stride-1 unpadded conv on
//    rows of unit stride reads x in place (no copy). Where it skips rows or the call has
//    several segments, the copy prefetches its source rows ahead, into the next segment and
//    image too; stride 2 deinterleaves each row once, and a 16x16 plane of a 3x3 stride-2
//    layer on AVX-512 is written by whole aligned vectors (rows 17 values apart:
//    ConvJob::plane_s2_16; build_scratch in conv_kernel.h). A tile with a residual
//    prefetches the residual lines of the next pixel blocks of its rows; a 1x1 conv reading x
//    in place (memory-bound) prefetches the next pixel blocks' input planes and output lines.
//    Outputs of 16 MiB and more are written with streaming stores (whole aligned vectors;
//    Winograd's output too): they cannot stay in the L2 for their consumer, and a normal
//    store first reads each line it writes (ConvJob::stream_out; FASTSUPERNET_CPU_STREAM_STORES=0
//    turns it off).
//  * A is packed per call into panels of kRows rows x depth (the weights are tiny next to the
//    activations: this is the only copy of them). Consecutive candidates with the same input
//    offset form a segment and share the scratch; their rows are blocked together, a block's
//    depth being its widest row's, zero-padded for the narrower rows. So K children of one
//    prefix-tree node (one input, different widths) cost one input copy per image and run
//    as one tall GEMM.
//  * Micro-kernel (conv_kernel.h): kRows x kVecs register tile (4 x 3 vectors of 8 floats or
//    4 doubles with AVX2+FMA: 12 accumulators, 3 input loads + 4 weight broadcasts per 12
//    FMAs; it runs at ~90 GFLOP/s on one core of the development VM, about the FMA peak).
//    Runs of rows are cut into blocks of 4, or of 3 where 4 would leave one or two rows
//    (block_rows: tiles of 1-2 rows wait on the FMA latency).
//    The epilogue (scale/shift FMA, residual, ReLU/PReLU), the statistics (widened to float64
//    in registers) and the store are applied to the registers: the output is written once.
//    The combinations in use are compiled without run-time tests (EpilogueKind).
//  * Loop order per image and segment: groups of blocks whose packed weights fit in L2
//    (kPanelKiB), then pixel blocks (kVecs vectors; their input stays in L1), then the
//    group's blocks.
//  * Threads: at::parallel_for over items = (image, range of blocks); ranges of blocks only
//    when there are fewer images than 4 per thread. Every output value is computed by one
//    tile in one fixed order, and the statistics are accumulated per (image, channel) in a
//    fixed order and added over images in order: results are bitwise identical for any
//    number of threads. (The AVX2 and the portable version differ: FMA vs multiply-add.)
//  * Outputs of >= 8 MiB are madvise(MADV_HUGEPAGE)d before the first write: a fresh output
//    of hundreds of MiB otherwise spends more time in page faults than in the convolution.
//  * ISA: conv_avx512.cpp (float32, AVX-512 F/DQ/VL: 16-lane registers over contiguous runs
//    or row pairs), conv_avx2.cpp (AVX2 and FMA) and conv_generic.cpp (portable) compile the
//    same kernel (conv_kernel.h), chosen at run time by what the CPU has (conv::use_avx512,
//    conv::use_avx2). The AVX-512 and AVX2 versions give the same outputs bit for bit
//    (statistics to float64 rounding). FASTSUPERNET_CPU_KERNEL=avx2 or =generic forces one.
//
// Error bounds (u = 2^-24 for float32, 2^-53 for float64; d = in_width * kh * kw of the
// element's candidate; A = sum over the d taps of |w| |x|):
//  * conv output before the epilogue: one sequential chain of d fused multiply-adds from 0,
//    |y - exact| <= d u A / (1 - d u) (2 d u A for the portable version, which rounds the
//    product and the sum). Zero-padded weights of a merged block add exact zeros.
//  * epilogue: at most 3 more roundings (scale/shift as one FMA, or two roundings in the
//    portable version; + residual; PReLU product),
//    each relative to the value at that point.
//  * statistics: the float32 (or float64) outputs before the epilogue, widened to float64
//    (squares of float32 values are exact), added in a fixed order; for n = N H' W' values
//    per channel the float64 sums are within (n + 8) 2^-53 sum|y| (and sum y^2) of the
//    exact sums of those values; relative to the exact conv they inherit sum_i |y_i - exact|.
// For Track-1 shapes (d <= 576) the float32 output is within ~3.5e-5 A of the exact value in
// the worst case, typically ~1e-6 A; tests/test_conv_cpu.py checks these bounds per element.
// Winograd's bound, (in_width + 8) u A_w with A_w the algorithm run on absolute values, is
// stated in conv_winograd.cpp and checked by tests/test_conv_winograd.py.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/conv_host.h"
#include "cpu/conv_plan.h"
#include "cpu/conv_winograd.h"
#include "cpu/conv_winograd_s2.h"

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace fastsupernet {
namespace {

using conv::Block;
using conv::Blocking;
using conv::ConvJob;
using conv::Segment;

using conv::block_rows;
using conv::div_up;
using conv::kPanelKiB;
using conv::kParallelMinMacs;
using conv::run_items_fast;

// Work items per thread wanted when there are fewer images than that (rows are split then).
constexpr int64_t kItemsPerThread = 4;
// Outputs of at least this many bytes are backed by transparent huge pages where possible.
constexpr int64_t kHugePageMinBytes = int64_t{8} << 20;

// A fresh output of hundreds of MiB comes straight from mmap, and first-touch page faults
// then cost several times the writes themselves (measured: 537 MiB, fresh + fill 475 ms,
// refill 100 ms, on the development VM). Asking for transparent huge pages on the 2 MiB
// aligned interior cuts that to about 140 ms. Advisory only: no effect where THP is
// disabled, and memory the allocator recycles is already mapped.
void advise_huge_pages(void* data, int64_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (nbytes < kHugePageMinBytes) return;
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(nbytes)) & ~(kHuge - 1);
  if (end > begin) {
    (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#else
  (void)data;
  (void)nbytes;
#endif
}

int parse_activation(const char* op, c10::string_view activation) {
  if (activation == "none") return conv::kActNone;
  if (activation == "relu") return conv::kActRelu;
  if (activation == "prelu") return conv::kActPrelu;
  TORCH_CHECK_VALUE(false, op, "activation must be 'none', 'relu' or 'prelu', got '",
                    std::string(activation.data(), activation.size()), "'");
  return conv::kActNone;
}

using conv::use_avx2;
using conv::use_avx512;

// A 1-D per-row tensor (scale, shift) as a contiguous tensor of the compute dtype.
at::Tensor per_row(const char* op, const c10::optional<at::Tensor>& t, const char* name, int64_t M,
                   at::ScalarType dtype) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == M, op, name, " must have shape (", M,
                    ",) (one value per output channel), got ", t->sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), op, name, " must be a floating-point tensor, got ",
                   t->scalar_type());
  TORCH_CHECK_VALUE(t->device().is_cpu(), op, name, " must be a CPU tensor");
  return t->to(dtype).contiguous();
}

template <typename T>
void run_job(const ConvJob<T>& job, int64_t items, int64_t max_width, int64_t macs) {
  const int64_t scratch_n = conv::scratch_elements(job, max_width);
  const int64_t lanes_n = conv::lane_elements(job);
  const bool avx2 = use_avx2(), avx512 = use_avx512();
  auto body = [&](int64_t begin, int64_t end) {
    // 64-byte aligned (ConvJob::plane_s2_16 stores whole aligned vectors)
    std::vector<T> scratch(static_cast<size_t>(scratch_n + 64 / sizeof(T)));
    T* s = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(scratch.data()) + 63) & ~uintptr_t(63));
    std::vector<double> lanes(static_cast<size_t>(lanes_n));
    if (!run_items_fast(job, begin, end, s, lanes.data(), avx2, avx512)) {
      conv::run_items_generic(job, begin, end, s, lanes.data());
    }
  };
  if (macs < kParallelMinMacs || items == 1) {
    body(0, items);
  } else {
    at::parallel_for(0, items, 1, body);
  }
}

}  // namespace

namespace conv {

// Winograd (conv_winograd.cpp): 3x3, stride 1, padding 1, float32, AVX2, output width a
// multiple of 8 and even height; FASTSUPERNET_CPU_WINOGRAD=0 (read at every call) or
// FASTSUPERNET_CPU_KERNEL=generic turn it off, =all lifts the width threshold. Declared in
// conv_winograd.h: the weight gradient (conv_weight_grad.cpp) chooses with them too.
// Transformed input of one chunk: a quarter of the core's L2, 256 KiB to 1 MiB (256 KiB, half
// the L2, was best on a 512 KiB-L2 AMD EPYC; on a 2 MiB-L2 Xeon, K = 32 candidates at 8x8, 512
// KiB chunks ran 1.08-1.1x faster than 256 KiB ones, 1 MiB ones in between; 16x16 unchanged).
int64_t winograd_chunk_bytes() {
  static const int64_t bytes = [] {
    int64_t l2 = 0;
#ifdef _SC_LEVEL2_CACHE_SIZE
    l2 = static_cast<int64_t>(sysconf(_SC_LEVEL2_CACHE_SIZE));
#endif
    return std::min<int64_t>(std::max<int64_t>(l2 / 4, 256 * 1024), 1024 * 1024);
  }();
  return bytes;
}

// Candidates narrower than this keep the direct kernel: there the transforms cost about what
// they save. Measured one candidate at a time, in = out width, batch 256, direct / Winograd
// time (FASTSUPERNET_CPU_WINOGRAD=0 vs =all alternating in one process, best of 2 x 5).
// F(4x4), AVX-512 (direct kernel 1.5-1.8x the AVX2 one), transforms on 512-bit registers:
// 32x32 planes 0.96x at 12, 1.07-1.12x at 16 (but 0.88x at 16 -> 8), 1.18x at 20; 16x16
// 0.95x at 12, 1.09x at 16, 1.55x at 32; 8x8 0.7x at 4, 1.13x at 8, 1.40x at 32, 1.96x at 64
// (with 256-bit transforms: 32x32 0.93-0.97x at 16, 1.14x at 20, 1.26x at 32; 16x16 0.96x at
// 12, 1.03-1.10x at 16, 1.36x at 32; 8x8 1.13x at 8, 1.43x at 32, 1.51x at 64). F(4x4), AVX2
// kernels on the same CPU: 32x32 1.05x at 8, 1.33x at 12; 16x16 1.13x at 8, 1.53x at 12; 8x8
// 0.6x at 4, 1.25x at 8.
// F(2x2), AVX2 (packed inputs: 32x32 and 16x16 planes 0.8x at width 8, 0.9-1.0x at 16, 1.2x
// at 20, 1.4x at 32; 8x8 planes 1.3x at 8, 1.5-1.75x at 16..64); AVX-512: 32x32 planes 0.87x
// at 20, 0.96x at 24, 0.97-1.0x at 28, 1.03-1.08x at 32, 1.15x at 36; 16x16 planes 0.96-0.98x
// at 24..28, 1.02-1.07x at 32, 1.05-1.22x at 36; 8x8 planes 0.85x at 8, 0.94x at 12, 1.02x at
// 16, 1.06x at 20, 1.13-1.19x at 24..32. The choice is per candidate, so a candidate's values
// never depend on the others in the call.
int64_t winograd_min_width(int64_t Wo, int tile, bool wide) {
  const char* env = std::getenv("FASTSUPERNET_CPU_WINOGRAD");
  if (env != nullptr && std::strcmp(env, "all") == 0) return 1;
  if (tile == 4) return wide ? (Wo >= 32 ? 20 : Wo >= 16 ? 16 : 8) : 8;
  if (wide) return Wo <= 8 ? 20 : 36;
  return Wo <= 8 ? 8 : 20;
}

bool winograd_shape(int64_t kh, int64_t kw, int64_t stride, int64_t padding, int64_t Ho, int64_t Wo) {
  if (kh != 3 || kw != 3 || stride != 1 || padding != 1 || Wo % 8 != 0 || Ho % 2 != 0 || Ho == 0) return false;
  const char* env = std::getenv("FASTSUPERNET_CPU_WINOGRAD");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  return use_avx2();
}

// The tile size of a Winograd-shaped layer: 4 (F(4x4, 3x3)) where its kernel takes the shape
// (output width 8, 16 or 32, height a multiple of 4, unit column stride), else 2;
// FASTSUPERNET_CPU_WINOGRAD_TILE=2 keeps F(2x2) everywhere.
int winograd_tile(int64_t Ho, int64_t Wo, int64_t x_sW) {
  const char* env = std::getenv("FASTSUPERNET_CPU_WINOGRAD_TILE");
  if (env != nullptr && std::strcmp(env, "2") == 0) return 2;
  return Ho % 4 == 0 && (Wo == 8 || Wo == 16 || Wo == 32) && x_sW == 1 ? 4 : 2;
}

// Stride-2 Winograd (conv_winograd_s2.cpp): see conv_winograd_s2.h.
bool winograd_s2_shape(int64_t kh, int64_t kw, int64_t stride, int64_t padding, int64_t H, int64_t W, int64_t x_sW,
                       bool residual, bool stats) {
  if (kh != 3 || kw != 3 || stride != 2 || padding != 1 || H != 16 || W != 16 || x_sW != 1 || residual || stats) {
    return false;
  }
  const char* env = std::getenv("FASTSUPERNET_CPU_WINOGRAD");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  return use_avx512();
}

// Which candidates take it. Narrower ones keep the direct kernel: the input transform's cost
// grows with in_w, the GEMM's saving with in_w x out_w. Measured one candidate at a time, batch
// 256, folded BN + ReLU, direct / Winograd time (FASTSUPERNET_CPU_WINOGRAD=0 vs =all
// alternating in one process, 12 pairs): out_w 16: 0.82x at in_w 4, 0.97-1.03x from 8 to 32;
// out_w 32: 1.02x at 12, 1.12-1.19x at 16..32; out_w 48: 1.09-1.25x from 12; out_w 64: 0.85x
// at 4, 0.99-1.01x at 8 and 12, 1.10x at 16, 1.15x at 24 and 32. Small batches keep it too
// (32 -> 64: 0.79x at 32 images, 0.98x at 64, 1.22x-1.29x from 128: the per-call filter
// transform). Candidates reading one input slice share its transform (a segment), so the
// choice depends on nothing but the candidate and the batch.
bool winograd_s2_takes(int64_t N, int64_t in_w, int64_t out_w) {
  const char* env = std::getenv("FASTSUPERNET_CPU_WINOGRAD");
  if (env != nullptr && std::strcmp(env, "all") == 0) return true;
  return N >= kS2MinImages && in_w >= 16 && out_w >= 32;
}

// The input gradient takes it at every width: measured one candidate at a time, batch 256,
// against the phases on the direct kernel (FASTSUPERNET_CPU_WINOGRAD=0 vs =all alternating in
// one process, 15 pairs): 1.32x at 1 -> 4, 1.38-1.48x from 4 -> 16 to 16 -> 64, 1.40-1.51x at
// 32 -> 32 and 32 -> 64 (aten's input gradient: 2.3x-14x slower); from 64 images (32 -> 64:
// 0.55x at 16, 0.74x at 32, 1.03x at 64, 1.31x at 128; 8 -> 16: 0.69x, 0.86x, 1.08x, 1.29x).
bool winograd_s2_grad_takes(int64_t N, int64_t H, int64_t W, int64_t g_sW) {
  if (H != 16 || W != 16 || g_sW != 1) return false;
  const char* env = std::getenv("FASTSUPERNET_CPU_WINOGRAD");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  if (!use_avx512()) return false;
  return N >= kS2MinImages || (env != nullptr && std::strcmp(env, "all") == 0);
}

}  // namespace conv

namespace {

using conv::winograd_chunk_bytes;
using conv::winograd_min_width;
using conv::winograd_shape;
using conv::winograd_tile;

// U = G g G^T of one 3x3 filter (any strides) for F(4x4), in float64, xi = 6 * (y index) + (x index).
void winograd_filter4(const float* g, int64_t s2, int64_t s3, double u[36]) {
  const auto& kG = conv::kWinogradG4;
  double t[6][3];  // G g
  for (int i = 0; i < 6; ++i) {
    for (int c = 0; c < 3; ++c) {
      t[i][c] = kG[i][0] * g[0 * s2 + c * s3] + kG[i][1] * g[1 * s2 + c * s3] + kG[i][2] * g[2 * s2 + c * s3];
    }
  }
  for (int i = 0; i < 6; ++i) {
    for (int k = 0; k < 6; ++k) u[6 * i + k] = t[i][0] * kG[k][0] + t[i][1] * kG[k][1] + t[i][2] * kG[k][2];
  }
}

// U = G g G^T of one 3x3 filter (any strides), in float64, xi = 4 * (y index) + (x index).
void winograd_filter(const float* g, int64_t s2, int64_t s3, double u[16]) {
  double t[4][3];
  for (int j = 0; j < 3; ++j) {
    const double g0 = g[0 * s2 + j * s3], g1 = g[1 * s2 + j * s3], g2 = g[2 * s2 + j * s3];
    t[0][j] = g0;
    t[1][j] = 0.5 * (g0 + g1 + g2);
    t[2][j] = 0.5 * (g0 - g1 + g2);
    t[3][j] = g2;
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = t[i][0];
    u[4 * i + 1] = 0.5 * (t[i][0] + t[i][1] + t[i][2]);
    u[4 * i + 2] = 0.5 * (t[i][0] - t[i][1] + t[i][2]);
    u[4 * i + 3] = t[i][2];
  }
}

// The candidates k with use[k] of a multi_conv2d call (float32) by Winograd with tile size
// `tile` (winograd_tile): their rows of `out`, and of the per-(image, row) statistics
// part_sum/part_sq (N x M, or nullptr).
void multi_conv2d_winograd(int tile, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef in_offsets,
                           at::IntArrayRef in_widths, at::IntArrayRef out_widths, at::IntArrayRef row_offsets,
                           const std::vector<char>& use, const std::vector<int64_t>& row_start,
                           const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& res, int activation,
                           const std::vector<float>& slope, at::Tensor& out, double* part_sum, double* part_sq) {
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3), M = row_start.back();
  std::vector<int64_t> cands;  // the call's candidates this path computes, in order
  for (size_t k = 0; k < use.size(); ++k) {
    if (use[k]) cands.push_back(static_cast<int64_t>(k));
  }
  const int64_t K = static_cast<int64_t>(cands.size());
  conv::WinogradJob job;
  job.x = x.const_data_ptr<float>();
  job.x_sN = x.stride(0);
  job.x_sC = x.stride(1);
  job.x_sH = x.stride(2);
  job.x_sW = x.stride(3);
  job.N = N;
  job.H = H;
  job.W = W;
  job.tile = tile;
  const int nxi = (job.tile + 2) * (job.tile + 2);

  // Segments: runs of consecutive candidates with one input offset.
  std::vector<int64_t> seg_first, seg_c0, seg_width;
  for (int64_t i = 0; i < K; ++i) {
    const int64_t k = cands[i];
    if (i == 0 || in_offsets[k] != in_offsets[cands[i - 1]]) {
      seg_first.push_back(i);
      seg_c0.push_back(in_offsets[k]);
      seg_width.push_back(0);
    }
    seg_width.back() = std::max(seg_width.back(), in_widths[k]);
  }
  job.num_segments = static_cast<int64_t>(seg_first.size());
  seg_first.push_back(K);
  job.seg_first = seg_first.data();
  job.seg_c0 = seg_c0.data();
  job.seg_width = seg_width.data();
  job.max_seg_width = *std::max_element(seg_width.begin(), seg_width.end());

  // Candidates and their transformed weights: [xi][block of kWinogradRows rows][channel][row in block].
  std::vector<int64_t> in_w(K), out_w(K), row0(K), u_off(K + 1, 0);
  for (int64_t i = 0; i < K; ++i) {
    in_w[i] = in_widths[cands[i]];
    out_w[i] = out_widths[cands[i]];
    row0[i] = row_start[cands[i]];
    u_off[i + 1] = u_off[i] + nxi * div_up(out_w[i], conv::kWinogradRows) * conv::kWinogradRows * in_w[i];
    job.max_out_w = std::max(job.max_out_w, out_w[i]);
  }
  std::vector<float> u(static_cast<size_t>(u_off[K]), 0.0f);
  {
    const float* w = weight.const_data_ptr<float>();
    const int64_t s0 = weight.stride(0), s1 = weight.stride(1), s2 = weight.stride(2), s3 = weight.stride(3);
    double t[36];
    for (int64_t k = 0; k < K; ++k) {
      const int64_t blocks = div_up(out_w[k], conv::kWinogradRows);
      for (int64_t r = 0; r < out_w[k]; ++r) {
        for (int64_t c = 0; c < in_w[k]; ++c) {
          const float* g = w + (row_offsets[cands[k]] + r) * s0 + c * s1;
          if (job.tile == 4) {
            winograd_filter4(g, s2, s3, t);
          } else {
            winograd_filter(g, s2, s3, t);
          }
          for (int xi = 0; xi < nxi; ++xi) {
            const int64_t rb = r / conv::kWinogradRows, ri = r % conv::kWinogradRows;
            u[u_off[k] + ((xi * blocks + rb) * in_w[k] + c) * conv::kWinogradRows + ri] = static_cast<float>(t[xi]);
          }
        }
      }
    }
  }
  job.K = K;
  job.in_w = in_w.data();
  job.out_w = out_w.data();
  job.row0 = row0.data();
  job.u_off = u_off.data();
  job.u = u.data();

  job.M = M;
  job.out = out.mutable_data_ptr<float>();
  job.residual = res.defined() ? res.const_data_ptr<float>() : nullptr;
  job.scale = scale.defined() ? scale.const_data_ptr<float>() : nullptr;
  job.shift = shift.defined() ? shift.const_data_ptr<float>() : nullptr;
  job.activation = activation;
  job.slope = slope.empty() ? nullptr : slope.data();

  // Chunks: at most as many images as keep the transformed input within winograd_chunk_bytes()
  // (rounded down to whole groups of 24 tiles, the register tile, where that leaves one), and
  // a multiple of the thread count of them, evened out. The chunking changes no value.
  const int64_t tiles = (H / job.tile) * (W / job.tile);
  const int64_t per_image = nxi * job.max_seg_width * tiles * static_cast<int64_t>(sizeof(float));
  int64_t ipc = std::max<int64_t>(1, std::min<int64_t>(N, winograd_chunk_bytes() / per_image));
  for (int64_t i = ipc; i >= 1; --i) {
    if (i * tiles % 24 == 0) {
      ipc = i;
      break;
    }
  }
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t chunks = div_up(div_up(N, ipc), threads) * threads;
  job.images_per_chunk = div_up(N, std::min(chunks, N));
  job.num_chunks = div_up(N, job.images_per_chunk);
  const int64_t t = job.tile, per_block = 8 / t;  // tiles per block of 8 x t output pixels
  std::vector<int64_t> block_off(static_cast<size_t>(job.images_per_chunk * tiles / per_block));
  {
    int64_t bi = 0;
    for (int64_t nl = 0; nl < job.images_per_chunk; ++nl) {
      for (int64_t ty = 0; ty < H / t; ++ty) {
        for (int64_t tx = 0; tx < W / t; tx += per_block) block_off[bi++] = nl * M * H * W + t * ty * W + t * tx;
      }
    }
  }
  job.block_off = block_off.data();
  job.part_sum = part_sum;
  job.part_sq = part_sq;
  job.wide = use_avx512();
  job.stream_out = conv::stream_output(out.numel() * static_cast<int64_t>(sizeof(float)));

  const int64_t scratch_n = conv::winograd_scratch_floats(job);
  const int64_t lanes_n = part_sum != nullptr ? conv::winograd_lane_doubles(job) : 0;
  auto body = [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(static_cast<size_t>(scratch_n));
    std::vector<double> lanes(static_cast<size_t>(lanes_n));
    conv::winograd_run_avx2(job, begin, end, scratch.data(), lanes.data());
  };
  int64_t macs = 0;
  for (int64_t k = 0; k < K; ++k) macs += out_w[k] * in_w[k] * nxi * tiles * N;
  if (macs < kParallelMinMacs || job.num_chunks == 1) {
    body(0, job.num_chunks);
  } else {
    at::parallel_for(0, job.num_chunks, 1, body);
  }
}

// The direct kernel for the candidates k with use[k]: their rows of `out` and of the
// per-(image, row) statistics part_sum/part_sq (N x M, or nullptr).
template <typename T>
void multi_conv2d_direct(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef in_offsets,
                         at::IntArrayRef in_widths, at::IntArrayRef row_offsets, const std::vector<char>& use,
                         const std::vector<int64_t>& row_start, const std::vector<int64_t>& cand, int64_t stride,
                         int64_t padding, int64_t Ho, int64_t Wo, const at::Tensor& scale, const at::Tensor& shift,
                         const at::Tensor& res, int activation, const std::vector<T>& slope, at::Tensor& out,
                         double* part_sum, double* part_sq) {
  constexpr int L = Blocking<T>::kLanes;
  constexpr int MR = Blocking<T>::kRows;
  const int64_t K = static_cast<int64_t>(in_offsets.size());
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3), M = row_start[K];
  const int64_t kh = weight.size(2), kw = weight.size(3), taps = kh * kw;

  ConvJob<T> job;
  job.N = N;
  job.M = M;
  job.out_plane = Ho * Wo;
  job.out = out.mutable_data_ptr<T>();
  if (res.defined()) job.residual = res.const_data_ptr<T>();

  // Input addressing.
  job.x = x.const_data_ptr<T>();
  job.x_sN = x.stride(0);
  job.x_sC = x.stride(1);
  job.x_sH = x.stride(2);
  job.x_sW = x.stride(3);
  job.H = H;
  job.W = W;
  job.kh = kh;
  job.kw = kw;
  job.stride = stride;
  job.pad = padding;
  job.direct = kh == 1 && kw == 1 && stride == 1 && padding == 0 && x.stride(3) == 1 && Wo % L == 0;
  job.stream_out = conv::stream_output(out.numel() * static_cast<int64_t>(sizeof(T)));
  std::vector<int64_t> copy_rows;
  std::vector<conv::PhaseRun> phase_runs;
  if (!job.direct) {
    const int64_t Wp = W + 2 * padding;
    job.phase_len = div_up(Wp, stride);
    job.row_len = job.phase_len * stride;
    job.scratch_rows = stride * (Ho - 1) + kh;
    job.scratch_plane = job.scratch_rows * job.row_len;
    job.plane_s2_16 = std::is_same_v<T, float> && use_avx512() && kh == 3 && kw == 3 && stride == 2 &&
                      padding == 1 && H == 16 && W == 16 && x.stride(3) == 1;
    if (job.plane_s2_16) {  // conv_plan.h
      job.row_len = conv::kPlaneS2RowLen;
      job.scratch_plane = conv::kPlaneS2Vectors * 16;
    }
    // padded row r holds input row r - padding; output rows read rows stride * oh + i, i < kh
    for (int64_t r = padding; r < std::min(padding + H, job.scratch_rows); ++r) {
      if (r % stride < kh) copy_rows.push_back(r);
    }
    // phase ph (read by the taps j with j % stride == ph) holds the padded columns
    // ph + stride * q, i.e. the input columns iw = ph + stride * q - padding
    for (int64_t ph = 0; ph < std::min(stride, kw); ++ph) {
      const int64_t q0 = padding > ph ? div_up(padding - ph, stride) : 0;
      const int64_t iw0 = ph + stride * q0 - padding;
      if (iw0 >= W) continue;
      phase_runs.push_back(conv::PhaseRun{ph * job.phase_len + q0, iw0, (W - 1 - iw0) / stride + 1});
    }
    job.num_copy_rows = static_cast<int64_t>(copy_rows.size());
    job.copy_rows = copy_rows.data();
    job.num_phase_runs = static_cast<int64_t>(phase_runs.size());
    job.phase_runs = phase_runs.data();
    if (stride == 2 && x.stride(3) == 1 && phase_runs.size() == 2 && phase_runs[0].count == phase_runs[1].count &&
        std::abs(phase_runs[0].src - phase_runs[1].src) == 1) {
      job.deinterleave_even = phase_runs[0].src < phase_runs[1].src ? 0 : 1;
    }
  }

  // Segments: runs of consecutive candidates (of those this kernel computes) with one input
  // offset; a segment's rows are one or more runs of contiguous rows (another kernel may
  // compute the candidates in between).
  std::vector<Segment> segments;
  std::vector<std::vector<std::pair<int64_t, int64_t>>> seg_rows;
  int64_t max_width = 0;
  for (int64_t k = 0, prev = -1; k < K; ++k) {
    if (!use[k]) continue;
    if (prev < 0 || in_offsets[k] != in_offsets[prev]) {
      segments.push_back(Segment{in_offsets[k], 0, 0, 0});
      seg_rows.emplace_back();
    }
    segments.back().width = std::max(segments.back().width, in_widths[k]);
    auto& runs = seg_rows.back();
    if (!runs.empty() && runs.back().second == row_start[k]) {
      runs.back().second = row_start[k + 1];
    } else {
      runs.emplace_back(row_start[k], row_start[k + 1]);
    }
    max_width = std::max(max_width, in_widths[k]);
    prev = k;
  }

  // Blocks of up to MR rows inside each segment, and their packed weights: panel
  // a[a_off + k * rows + r] = weight[row_offsets[c] + (row - row_start[c]), tap k] for the
  // candidate c of row0 + r, zero beyond its depth in_widths[c] * kh * kw.
  std::vector<Block> blocks;
  int64_t a_total = 0;
  {
    for (size_t s = 0; s < segments.size(); ++s) {
      segments[s].block_begin = static_cast<int64_t>(blocks.size());
      for (const auto& run : seg_rows[s]) {
        for (int64_t row = run.first; row < run.second; row += blocks.back().rows) {
          Block b;
          b.row0 = row;
          b.rows = block_rows<MR>(run.second - row);
          b.depth = 0;
          for (int r = 0; r < b.rows; ++r) b.depth = std::max(b.depth, in_widths[cand[row + r]] * taps);
          b.a_off = a_total;
          a_total += b.depth * b.rows;
          blocks.push_back(b);
        }
      }
      segments[s].block_end = static_cast<int64_t>(blocks.size());
    }
  }
  // + 4: the AVX-512 tile reads 4 weights per step whatever the block's rows (conv_avx512.cpp)
  std::vector<T> a(static_cast<size_t>(a_total + 4), T(0));
  {
    const T* w = weight.const_data_ptr<T>();
    const int64_t s0 = weight.stride(0), s1 = weight.stride(1), s2 = weight.stride(2), s3 = weight.stride(3);
    for (const Block& b : blocks) {
      T* panel = a.data() + b.a_off;
      for (int r = 0; r < b.rows; ++r) {
        const int64_t row = b.row0 + r, c = cand[row];
        const T* wrow = w + (row_offsets[c] + row - row_start[c]) * s0;
        int64_t k = 0;
        for (int64_t ci = 0; ci < in_widths[c]; ++ci) {
          for (int64_t i = 0; i < kh; ++i) {
            for (int64_t j = 0; j < kw; ++j, ++k) panel[k * b.rows + r] = wrow[ci * s1 + i * s2 + j * s3];
          }
        }
      }
    }
  }
  job.num_segments = static_cast<int64_t>(segments.size());
  job.segments = segments.data();
  // the copy prefetches where rows are skipped or it jumps between segments (build_scratch)
  const bool skips_rows = !copy_rows.empty() && copy_rows.back() - copy_rows.front() + 1 != job.num_copy_rows;
  job.copy_prefetch = job.x_sW == 1 && !copy_rows.empty() && (skips_rows || job.num_segments > 1);
  job.num_blocks = static_cast<int64_t>(blocks.size());
  job.blocks = blocks.data();
  job.a = a.data();
  job.panel_values = kPanelKiB * 1024 / static_cast<int64_t>(sizeof(T));

  // Taps: offset of (ci, i, j) in the source planes relative to the tap (0, 0, 0) of a vector.
  std::vector<int64_t> tap_off(static_cast<size_t>(max_width * taps));
  for (int64_t ci = 0; ci < max_width; ++ci) {
    for (int64_t i = 0; i < kh; ++i) {
      for (int64_t j = 0; j < kw; ++j) {
        tap_off[(ci * kh + i) * kw + j] =
            job.direct ? ci * job.x_sC
                       : ci * job.scratch_plane + i * job.row_len + (j % stride) * job.phase_len + j / stride;
      }
    }
  }
  job.tap_off = tap_off.data();

  // Output vectors of one image.
  std::vector<int64_t> vec_src, vec_dst;
  std::vector<int32_t> vec_len;
  for (int64_t oh = 0; oh < Ho; ++oh) {
    for (int64_t ow = 0; ow < Wo; ow += L) {
      vec_src.push_back(job.direct ? oh * job.x_sH + ow : stride * oh * job.row_len + ow);
      vec_dst.push_back(oh * Wo + ow);
      vec_len.push_back(static_cast<int32_t>(std::min<int64_t>(L, Wo - ow)));
    }
  }
  job.num_vecs = static_cast<int64_t>(vec_src.size());
  job.vec_src = vec_src.data();
  job.vec_dst = vec_dst.data();
  job.vec_len = vec_len.data();
  job.all_vecs_full = Wo % L == 0;

  // Epilogue.
  job.scale = scale.defined() ? scale.const_data_ptr<T>() : nullptr;
  job.shift = shift.defined() ? shift.const_data_ptr<T>() : nullptr;
  job.activation = activation;
  job.slope = slope.empty() ? nullptr : slope.data();
  job.part_sum = part_sum;
  job.part_sq = part_sq;

  // Work items: images, and when there are fewer images than wanted, ranges of blocks too.
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t want = threads * kItemsPerThread;
  const int64_t chunks = N >= want ? 1 : std::min<int64_t>(job.num_blocks, div_up(want, N));
  job.blocks_per_chunk = div_up(job.num_blocks, chunks);
  job.block_chunks = div_up(job.num_blocks, job.blocks_per_chunk);
  const int64_t items = N * job.block_chunks;

  int64_t macs_per_pixel = 0;
  for (const Block& b : blocks) macs_per_pixel += b.depth * b.rows;
  run_job(job, items, max_width, macs_per_pixel * N * Ho * Wo);
}

// One candidate of the stride-2 Winograd path: its output and its GEMM (rows xi * (out_w + 1)
// + o, segment xi over V's channels from xi * (4 W + 1), W the width its segment transforms).
struct WinogradS2Plan {
  conv::WinogradS2Output output;
  conv::S2Gemm gemm;
};

void plan_winograd_s2(WinogradS2Plan& pl, const at::Tensor& weight, int64_t in_w, int64_t out_w, int64_t row_offset,
                      int64_t seg_w) {
  constexpr int MR = Blocking<float>::kRows;
  constexpr int P = conv::kS2Points;
  const int64_t chans = 4 * in_w;
  conv::S2Gemm& gm = pl.gemm;
  // Every xi's rows split alike into blocks; xi's panels start xi * xi_pitch values in, one
  // vector more than they hold (not a power of two apart: the filter transform below writes
  // to all 25 at once).
  const int64_t xi_pitch = out_w * chans + 16;
  std::vector<int64_t> blk_row0(static_cast<size_t>(out_w));  // first row of row o's block
  std::vector<int32_t> blk_rows(static_cast<size_t>(out_w));
  for (int64_t o = 0; o < out_w; o += blk_rows[o]) {
    const int32_t rows = block_rows<MR>(out_w - o);
    for (int r = 0; r < rows; ++r) {
      blk_row0[o + r] = o;
      blk_rows[o + r] = rows;
    }
  }
  for (int xi = 0; xi < P; ++xi) {
    const int64_t depth = conv::s2_phases(xi) * in_w;
    conv::Segment seg{xi * (4 * seg_w + 1), depth, static_cast<int64_t>(gm.blocks.size()), 0};  // conv::s2_v_stride
    for (int64_t o = 0; o < out_w; o += blk_rows[o]) {
      Block b;
      b.row0 = xi * (out_w + 1) + o;
      b.rows = blk_rows[o];
      b.depth = depth;
      b.a_off = xi * xi_pitch + o * depth;
      gm.blocks.push_back(b);
    }
    seg.block_end = static_cast<int64_t>(gm.blocks.size());
    gm.segments.push_back(seg);
  }
  const int64_t a_total = P * xi_pitch;
  // U[xi][o][s2_slot(xi, 2p + q) in_w + c] = (G K G^T)[xi], K[u][v] = w[2u + p][2v + q] (0
  // past the kernel), in float64 and rounded once, written straight into the panels
  // (a[xi * xi_pitch + o0 * depth + k * rows + r] for row o = o0 + r of a block of `rows`).
  gm.a.assign(static_cast<size_t>(a_total + 4), 0.0f);  // + 4: as multi_conv2d_direct
  // Two passes: G K per (o, phase, c) (10 values each), then the panels in the order they
  // are laid out, one xi at a time.
  const float* w = weight.const_data_ptr<float>() + row_offset * weight.stride(0);
  const int64_t s0 = weight.stride(0), s1 = weight.stride(1), s2 = weight.stride(2), s3 = weight.stride(3);
  std::vector<double> gk(static_cast<size_t>(out_w * chans * 10));  // [2p + q][o][c][i][b]
  const auto tap = [](int p, int u) { return 2 * u + p <= 2 ? 2 * u + p : -1; };  // K_pq[u][v] = w[2u + p][2v + q]
  at::parallel_for(0, out_w, 8, [&](int64_t o_begin, int64_t o_end) {
    for (int64_t o = o_begin; o < o_end; ++o) conv::s2_filter_gk(w, s0, s1, s2, s3, in_w, out_w, o, tap, gk.data());
  });
  float* a = gm.a.data();
  at::parallel_for(0, P, 1, [&](int64_t xi_begin, int64_t xi_end) {
    for (int64_t xi = xi_begin; xi < xi_end; ++xi) {
      const int i = static_cast<int>(xi / 5), jj = static_cast<int>(xi % 5), phases = conv::s2_phases(static_cast<int>(xi));
      const double g0 = conv::kWinogradS2G[jj][0], g1 = conv::kWinogradS2G[jj][1];
      int pq_of_slot[4];
      for (int pq = 0; pq < 4; ++pq) pq_of_slot[conv::s2_slot(static_cast<int>(xi), pq)] = pq;
      for (int64_t o0 = 0; o0 < out_w; o0 += blk_rows[o0]) {
        const int rows = blk_rows[o0];
        float* panel = a + xi * xi_pitch + o0 * phases * in_w;
        for (int slot = 0; slot < phases; ++slot) {
          for (int64_t c = 0; c < in_w; ++c) {
            const int64_t k = slot * in_w + c;
            const double* v = gk.data() + ((pq_of_slot[slot] * out_w + o0) * in_w + c) * 10 + i * 2;
            for (int r = 0; r < rows; ++r) {
              panel[k * rows + r] = static_cast<float>(v[r * in_w * 10] * g0 + v[r * in_w * 10 + 1] * g1);
            }
          }
        }
      }
    }
  });
  gm.finish(P * (out_w + 1), 4, in_w, seg_w);  // conv::s2_m_stride: a spare row after each xi's out_w
  pl.output.gemm = &gm.job;
}

// The candidates k with use[k] of a float32 multi_conv2d call of winograd_s2_shape: their rows
// of `out` by F(4x4, 2x2) on the stride phases (conv_winograd_s2.cpp).
void multi_conv2d_winograd_s2(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef in_offsets,
                              at::IntArrayRef in_widths, at::IntArrayRef out_widths, at::IntArrayRef row_offsets,
                              const std::vector<char>& use, const std::vector<int64_t>& row_start,
                              const at::Tensor& scale, const at::Tensor& shift, int activation,
                              const std::vector<float>& slope, at::Tensor& out) {
  const int64_t N = x.size(0), M = row_start.back();
  // Segments: the candidates reading one input slice, in call order; each candidate's plan.
  std::vector<int64_t> seg_of(use.size(), -1), seg_c0, seg_w;
  for (size_t k = 0; k < use.size(); ++k) {
    if (!use[k]) continue;
    const auto it = std::find(seg_c0.begin(), seg_c0.end(), in_offsets[k]);
    if (it == seg_c0.end()) {
      seg_of[k] = static_cast<int64_t>(seg_c0.size());
      seg_c0.push_back(in_offsets[k]);
      seg_w.push_back(in_widths[k]);
    } else {
      seg_of[k] = it - seg_c0.begin();
      seg_w[seg_of[k]] = std::max(seg_w[seg_of[k]], in_widths[k]);
    }
  }
  const int64_t S = static_cast<int64_t>(seg_c0.size());
  std::vector<std::unique_ptr<WinogradS2Plan>> plans;
  std::vector<std::vector<conv::WinogradS2Output>> outputs(static_cast<size_t>(S));
  int64_t macs = 0;
  for (size_t k = 0; k < use.size(); ++k) {
    if (!use[k]) continue;
    plans.push_back(std::make_unique<WinogradS2Plan>());
    WinogradS2Plan& pl = *plans.back();
    plan_winograd_s2(pl, weight, in_widths[k], out_widths[k], row_offsets[k], seg_w[seg_of[k]]);
    conv::WinogradS2Output& o = pl.output;
    o.out_w = out_widths[k];
    o.row0 = row_start[k];
    o.scale = scale.defined() ? scale.const_data_ptr<float>() + row_start[k] : nullptr;
    o.shift = shift.defined() ? shift.const_data_ptr<float>() + row_start[k] : nullptr;
    o.slope = slope.empty() ? 0.0f : slope[row_start[k]];
    outputs[seg_of[k]].push_back(o);
    macs += N * 64 * out_widths[k] * in_widths[k] * 9;
  }
  std::vector<conv::WinogradS2Job> jobs(static_cast<size_t>(S));
  int64_t scratch_n = 0;
  for (int64_t si = 0; si < S; ++si) {
    conv::WinogradS2Job& j = jobs[si];
    j.x = x.const_data_ptr<float>();
    j.x_sN = x.stride(0);
    j.x_sC = x.stride(1);
    j.x_sH = x.stride(2);
    j.N = N;
    j.c0 = seg_c0[si];
    j.in_w = seg_w[si];
    j.out = out.mutable_data_ptr<float>();
    j.M = M;
    j.activation = activation;
    j.stream_out = conv::stream_output(out.numel() * static_cast<int64_t>(sizeof(float)));
    j.num_outputs = static_cast<int64_t>(outputs[si].size());
    j.outputs = outputs[si].data();
    for (const auto& o : outputs[si]) j.max_out_w = std::max(j.max_out_w, o.out_w);
    scratch_n = std::max(scratch_n, conv::winograd_s2_scratch_floats(j));
  }
  const int64_t chunks = div_up(N, conv::kS2Images);
  auto body = [&](int64_t begin, int64_t end) {
    // not zeroed: every value is written before it is read
    std::unique_ptr<float[]> scratch(new float[static_cast<size_t>(scratch_n + 16)]);
    float* s = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(scratch.get()) + 63) & ~uintptr_t(63));
    double lanes[2 * conv::kStatLanes];  // unused: the GEMM takes no statistics
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      for (const auto& j : jobs) conv::winograd_s2_run_avx512(j, chunk, chunk + 1, s, lanes);
    }
  };
  if (macs < kParallelMinMacs || chunks == 1) {
    body(0, chunks);
  } else {
    at::parallel_for(0, chunks, 1, body);
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_conv2d_impl(
    const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef in_offsets, at::IntArrayRef in_widths,
    at::IntArrayRef out_widths, at::IntArrayRef row_offsets, int64_t stride, int64_t padding,
    const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& residual, int activation,
    const c10::optional<at::Tensor>& prelu_slope, bool stats, int64_t Ho, int64_t Wo) {
  const int64_t K = static_cast<int64_t>(in_offsets.size());
  const int64_t N = x.size(0);
  const int64_t kh = weight.size(2), kw = weight.size(3);

  // Rows of each candidate in the packed output.
  std::vector<int64_t> row_start(static_cast<size_t>(K + 1), 0);
  for (int64_t k = 0; k < K; ++k) row_start[k + 1] = row_start[k] + out_widths[k];
  const int64_t M = row_start[K];

  at::Tensor out = at::empty({N, M, Ho, Wo}, x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor sum, sumsq;
  if (stats) {
    sum = at::zeros({M}, x.options().dtype(at::kDouble));
    sumsq = at::zeros({M}, x.options().dtype(at::kDouble));
  } else {
    sum = at::empty({0}, x.options().dtype(at::kDouble));
    sumsq = at::empty({0}, x.options().dtype(at::kDouble));
  }
  if (N == 0) return {out, sum, sumsq};
  advise_huge_pages(out.mutable_data_ptr(), out.numel() * static_cast<int64_t>(sizeof(T)));
  at::Tensor res;
  if (residual.defined()) res = residual.to(x.scalar_type()).contiguous();

  // Candidate of every row; PReLU slope of every row.
  std::vector<int64_t> cand(static_cast<size_t>(M));
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t r = row_start[k]; r < row_start[k + 1]; ++r) cand[r] = k;
  }
  std::vector<T> slope;
  if (activation == conv::kActPrelu) {
    const at::Tensor ps = prelu_slope->to(at::kDouble).contiguous();
    const double* p = ps.const_data_ptr<double>();
    slope.resize(static_cast<size_t>(M));
    for (int64_t r = 0; r < M; ++r) slope[r] = static_cast<T>(p[cand[r]]);
  }
  // Statistics per (image, row), added over images in order at the end.
  std::vector<double> part_sum, part_sq;
  if (stats) {
    part_sum.assign(static_cast<size_t>(N * M), 0.0);
    part_sq.assign(static_cast<size_t>(N * M), 0.0);
  }

  // Winograd for the candidates it suits, the direct kernel for the others.
  std::vector<char> direct_cand(static_cast<size_t>(K), 1);
  if constexpr (std::is_same<T, float>::value) {
    if (winograd_shape(kh, kw, stride, padding, Ho, Wo)) {
      std::vector<char> wino(static_cast<size_t>(K), 0);
      bool any = false;
      const int tile = winograd_tile(Ho, Wo, x.stride(3));
      const int64_t least = winograd_min_width(Wo, tile, use_avx512());
      for (int64_t k = 0; k < K; ++k) {
        wino[k] = in_widths[k] >= least;
        direct_cand[k] = !wino[k];
        any = any || wino[k];
      }
      if (any) {
        multi_conv2d_winograd(tile, x, weight, in_offsets, in_widths, out_widths, row_offsets, wino, row_start, scale,
                              shift, res, activation, slope, out, stats ? part_sum.data() : nullptr,
                              stats ? part_sq.data() : nullptr);
      }
    }
  }
  if constexpr (std::is_same<T, float>::value) {
    if (conv::winograd_s2_shape(kh, kw, stride, padding, x.size(2), x.size(3), x.stride(3), res.defined(), stats)) {
      std::vector<char> ws2(static_cast<size_t>(K), 0);
      bool any = false;
      for (int64_t k = 0; k < K; ++k) {
        ws2[k] = direct_cand[k] && conv::winograd_s2_takes(x.size(0), in_widths[k], out_widths[k]);
        direct_cand[k] = direct_cand[k] && !ws2[k];
        any = any || ws2[k];
      }
      if (any) {
        multi_conv2d_winograd_s2(x, weight, in_offsets, in_widths, out_widths, row_offsets, ws2, row_start, scale,
                                 shift, activation, slope, out);
      }
    }
  }
  if (std::find(direct_cand.begin(), direct_cand.end(), 1) != direct_cand.end()) {
    multi_conv2d_direct<T>(x, weight, in_offsets, in_widths, row_offsets, direct_cand, row_start, cand, stride,
                           padding, Ho, Wo, scale, shift, res, activation, slope, out,
                           stats ? part_sum.data() : nullptr, stats ? part_sq.data() : nullptr);
  }

  if (stats) {
    double* s = sum.mutable_data_ptr<double>();
    double* q = sumsq.mutable_data_ptr<double>();
    for (int64_t n = 0; n < N; ++n) {
      const double* ps = part_sum.data() + n * M;
      const double* pq = part_sq.data() + n * M;
      for (int64_t r = 0; r < M; ++r) {
        s[r] += ps[r];
        q[r] += pq[r];
      }
    }
  }
  return {out, sum, sumsq};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_conv2d_checked(
    const char* op, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef in_offsets,
    at::IntArrayRef in_widths, at::IntArrayRef out_widths, at::IntArrayRef row_offsets, int64_t stride,
    int64_t padding, const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
    const c10::optional<at::Tensor>& residual, c10::string_view activation,
    const c10::optional<at::Tensor>& prelu_slope, bool stats) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, "x must be (N, C, H, W), got ", x.dim(), " dimensions");
  TORCH_CHECK_VALUE(weight.dim() == 4, op, "weight must be (R, C_max, kh, kw), got ", weight.dim(), " dimensions");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                   "x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), op, "weight dtype ", weight.scalar_type(),
                   " differs from x dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(weight.device().is_cpu(), op, "weight must be a CPU tensor");
  const int64_t K = static_cast<int64_t>(in_offsets.size());
  TORCH_CHECK_VALUE(K >= 1, op, "at least one candidate is needed");
  TORCH_CHECK_VALUE(static_cast<int64_t>(in_widths.size()) == K && static_cast<int64_t>(out_widths.size()) == K &&
                        static_cast<int64_t>(row_offsets.size()) == K,
                    op, "in_offsets, in_widths, out_widths and row_offsets must have one entry per candidate, got ",
                    K, ", ", in_widths.size(), ", ", out_widths.size(), " and ", row_offsets.size());
  TORCH_CHECK_VALUE(stride >= 1, op, "stride must be >= 1, got ", stride);
  TORCH_CHECK_VALUE(padding >= 0, op, "padding must be >= 0, got ", padding);
  const int64_t C = x.size(1), R = weight.size(0), Cmax = weight.size(1);
  const int64_t kh = weight.size(2), kw = weight.size(3);
  TORCH_CHECK_VALUE(kh >= 1 && kw >= 1, op, "empty kernel ", weight.sizes());
  int64_t M = 0;
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK_VALUE(in_widths[k] >= 1 && in_offsets[k] >= 0 && in_offsets[k] + in_widths[k] <= C, op,
                      "candidate ", k, " reads input channels [", in_offsets[k], ", ", in_offsets[k] + in_widths[k],
                      ") of an input with ", C, " channels");
    TORCH_CHECK_VALUE(in_widths[k] <= Cmax, op, "candidate ", k, " reads ", in_widths[k],
                      " input channels, the packed weight has only ", Cmax, " columns");
    TORCH_CHECK_VALUE(out_widths[k] >= 1 && row_offsets[k] >= 0 && row_offsets[k] + out_widths[k] <= R, op,
                      "candidate ", k, " uses weight rows [", row_offsets[k], ", ", row_offsets[k] + out_widths[k],
                      ") of a packed weight with ", R, " rows");
    M += out_widths[k];
  }
  const int64_t Hp = x.size(2) + 2 * padding, Wp = x.size(3) + 2 * padding;
  TORCH_CHECK_VALUE(Hp >= kh && Wp >= kw, op, "kernel ", kh, "x", kw, " larger than the padded input ", Hp, "x", Wp);
  const int64_t Ho = (Hp - kh) / stride + 1, Wo = (Wp - kw) / stride + 1;

  const int act = parse_activation(op, activation);
  if (act == conv::kActPrelu) {
    TORCH_CHECK_VALUE(prelu_slope.has_value() && prelu_slope->defined(), op, "activation 'prelu' needs prelu_slope");
    TORCH_CHECK_VALUE(prelu_slope->numel() == K, op, "prelu_slope must have one value per candidate (", K,
                      "), got ", prelu_slope->numel());
    TORCH_CHECK_TYPE(at::isFloatingType(prelu_slope->scalar_type()), op, "prelu_slope must be floating point");
  }
  const at::Tensor sc = per_row(op, scale, "scale", M, x.scalar_type());
  const at::Tensor sh = per_row(op, shift, "shift", M, x.scalar_type());
  at::Tensor res;
  if (residual.has_value() && residual->defined()) {
    res = *residual;
    TORCH_CHECK_VALUE(res.dim() == 4 && res.size(0) == x.size(0) && res.size(1) == M && res.size(2) == Ho &&
                          res.size(3) == Wo,
                      op, "residual must have the output shape (", x.size(0), ", ", M, ", ", Ho, ", ", Wo,
                      "), got ", res.sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(res.scalar_type()), op, "residual must be floating point");
    TORCH_CHECK_VALUE(res.device().is_cpu(), op, "residual must be a CPU tensor");
  }

  if (x.scalar_type() == at::kFloat) {
    return multi_conv2d_impl<float>(x, weight, in_offsets, in_widths, out_widths, row_offsets, stride, padding, sc,
                                    sh, res, act, prelu_slope, stats, Ho, Wo);
  }
  return multi_conv2d_impl<double>(x, weight, in_offsets, in_widths, out_widths, row_offsets, stride, padding, sc, sh,
                                   res, act, prelu_slope, stats, Ho, Wo);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_conv2d_cpu(
    const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef in_offsets, at::IntArrayRef in_widths,
    at::IntArrayRef out_widths, at::IntArrayRef row_offsets, int64_t stride, int64_t padding,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
    const c10::optional<at::Tensor>& residual, c10::string_view activation,
    const c10::optional<at::Tensor>& prelu_slope, bool stats) {
  return multi_conv2d_checked("fastsupernet::multi_conv2d: ", x, weight, in_offsets, in_widths, out_widths,
                              row_offsets, stride, padding, scale, shift, residual, activation, prelu_slope, stats);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sliced_conv2d_cpu(
    const at::Tensor& x, const at::Tensor& weight, int64_t out_rows, int64_t row_offset, int64_t stride,
    int64_t padding, const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
    const c10::optional<at::Tensor>& residual, c10::string_view activation,
    const c10::optional<at::Tensor>& prelu_slope, bool stats) {
  TORCH_CHECK_VALUE(x.dim() == 4, "fastsupernet::sliced_conv2d: x must be (N, C, H, W), got ", x.dim(),
                    " dimensions");
  const int64_t zero = 0, width = x.size(1);
  return multi_conv2d_checked("fastsupernet::sliced_conv2d: ", x, weight, at::IntArrayRef(&zero, 1),
                              at::IntArrayRef(&width, 1), at::IntArrayRef(&out_rows, 1),
                              at::IntArrayRef(&row_offset, 1), stride, padding, scale, shift, residual, activation,
                              prelu_slope, stats);
}

}  // namespace

// The instruction set the float32 CPU convolution kernels run with now (the CPU's, or the one
// FASTSUPERNET_CPU_KERNEL forces): "avx512", "avx2" or "generic".
std::string cpu_conv_isa() { return use_avx512() ? "avx512" : use_avx2() ? "avx2" : "generic"; }

// The Winograd tile (2 or 4) of a float32 3x3 stride-1 padding-1 layer with this output size
// and an NCHW-contiguous input, or 0 where it never runs Winograd.
int64_t cpu_winograd_tile(int64_t out_height, int64_t out_width) {
  return winograd_shape(3, 3, 1, 1, out_height, out_width) ? winograd_tile(out_height, out_width, 1) : 0;
}

// The least input width from which a candidate of that layer runs Winograd, or -1 where it never does.
int64_t cpu_winograd_min_width(int64_t out_height, int64_t out_width) {
  const int tile = static_cast<int>(cpu_winograd_tile(out_height, out_width));
  return tile != 0 ? winograd_min_width(out_width, tile, use_avx512()) : -1;
}

// Whether a float32 candidate of a 3x3 stride-2 padding-1 layer on an NCHW input of this size,
// the only one of its call reading its input, runs the stride-2 Winograd path
// (conv_winograd_s2.h) in the forward.
bool cpu_winograd_s2(int64_t batch, int64_t height, int64_t width, int64_t in_width, int64_t out_width) {
  return conv::winograd_s2_shape(3, 3, 2, 1, height, width, 1, false, false) &&
         conv::winograd_s2_takes(batch, in_width, out_width);
}

TORCH_LIBRARY_FRAGMENT(fastsupernet, m) {
  m.def("_cpu_conv_isa() -> str", &cpu_conv_isa);
  m.def("_cpu_winograd_s2(int batch, int height, int width, int in_width, int out_width) -> bool", &cpu_winograd_s2);
  m.def("_cpu_winograd_tile(int out_height, int out_width) -> int", &cpu_winograd_tile);
  m.def("_cpu_winograd_min_width(int out_height, int out_width) -> int", &cpu_winograd_min_width);
}

TORCH_LIBRARY_IMPL(fastsupernet, CPU, m) {
  m.impl("multi_conv2d", &multi_conv2d_cpu);
  m.impl("sliced_conv2d", &sliced_conv2d_cpu);
}

}  // namespace fastsupernet
