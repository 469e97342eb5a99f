// CPU kernel of fastsupernet::multi_conv2d_weight_grad (float32, float64): the weight gradient
// of multi_conv2d for all K candidates of a call at once.
//
// Semantics (schema in csrc/fastsupernet.cpp): with grad_out the packed (N, sum_k out_widths[k],
// H', W') gradient of the conv output (before any epilogue) and x the call's input,
//   grad[row_offsets[k] + o, c, i, j] += sum_{n, h', w'} grad_out[n, o_k + o, h', w']
//                                        * x[n, in_offsets[k] + c, h' s + i - p, w' s + j - p]
// for o < out_widths[k], c < in_widths[k] (zero padding), o_k the prefix-sum offset of
// candidate k. grad has weight's full shape (R, C_max, kh, kw) and is zero outside the
// rows/columns the candidates read; candidates sharing rows add into them in candidate order.
//
// Algorithm. For a candidate, column q = (c, i, j) of its gradient (q = c kh kw + i kw + j,
// which is also the column's offset inside a weight row) is the dot product, over every
// (image, output pixel), of a grad_out row with the input shifted by tap (i, j). Per work item
// (a fixed run of images, sized by the shapes) and candidate, the item's images are packed once:
//  * grad_out rows into [o][image][h'][Wv] (Wv = W' rounded up to whole vectors, zero tail);
//  * input channels into a zero-padded scratch [c][image][row][phase][Wph] whose columns are
//    split by stride phase (padded column u at phase u % s, index u / s), so that tap (i, j)
//    of output row h' is the contiguous vector run at row h' s + i, phase j % s, index j / s.
// Then a tile of kRows gradient rows x kCols columns keeps kRows*kCols vector accumulators
// in registers over all (image, h', vector) of the item: kRows + kCols loads per kRows*kCols
// FMAs, like the forward kernel. Lanes are summed once per tile and item; items run in
// parallel (at::parallel_for) into their own partial sums, which are added in item order:
// the item split depends only on N, so results do not depend on the number of threads.
// The tail lanes of grad_out rows are zero, so the input values they meet contribute nothing.
//
// The tile loops (conv_weight_grad_kernel.h) are compiled three times: AVX-512 (float32, 16
// lanes; where the runs are whole 16-lane vectors: stride 1, or output rows a multiple of 16
// wide), AVX2 + FMA, and portable; the widest the CPU has runs (FASTSUPERNET_CPU_KERNEL=avx2 or
// =generic forces a lower one). Accumulation is in the input's dtype (as aten's convolution
// backward does): per lane about N H' W' / (items * lanes) terms.
//
// Float32 candidates of layers whose forward runs Winograd F(4x4, 3x3) take F(4x4) transposed
// instead (winograd_weight_grad below, kernel in conv_winograd.cpp), from the widths that
// winograd_grad_takes states; their sums go to work item 0's slot, so the final loop adds
// every candidate in the same order.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "cpu/conv_plan.h"
#include "cpu/conv_winograd.h"

namespace fastsupernet {
namespace {

constexpr int kRows = 4;
constexpr int kCols = 3;
constexpr int kVecBytes = 32;
// Images per work item: enough for about kItemElems output values per gradient row (so a
// tile's lane sums are amortised over hundreds of vector steps), few enough that a
// candidate's packed gradient rows stay in L2, and at least kMinItems items when N allows
// (both threads busy). Depends on N and the shapes only, never on the thread count.
constexpr int64_t kItemElems = 2048;
constexpr int64_t kMinItems = 4;

#define FSN_WG_INLINE inline __attribute__((always_inline))

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
struct Lanes {
  static constexpr int L = kVecBytes / static_cast<int>(sizeof(T));
};

// 64-byte aligned storage: the packed gradient rows then start on cache lines (whole-line
// vector loads).
template <typename T>
struct AlignedAllocator {
  using value_type = T;
  AlignedAllocator() = default;
  template <typename U>
  AlignedAllocator(const AlignedAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  bool operator==(const AlignedAllocator&) const { return true; }
};

// Geometry of one candidate's packed buffers inside a work item.
struct Packed {
  int64_t images;     // images in the item
  int64_t runs;       // contiguous runs per image (stride 1: one; else one per output row)
  int64_t run_len;    // elements per run (whole vectors)
  int64_t g_img;      // elements per image of one gradient row
  int64_t g_run;      // elements between runs of a gradient row
  int64_t g_row;      // elements per gradient row (images * g_img)
  int64_t x_img;      // elements per image of one input channel
  int64_t x_run;      // elements between runs of an input channel
  int64_t x_row;      // elements per padded input row (stride * wph)
  int64_t x_chan;     // elements per input channel (images * x_img + spare)
  int64_t wph;        // elements per stride phase of a row
  int64_t stride;
};

#ifdef FASTSUPERNET_HAVE_AVX2
#define FSN_WG_HAVE_AVX2 1
// Keeps a loaded vector in a register: without it GCC folds the load into every multiply-add
// that uses it (one load per FMA: the loop becomes load-bound).
#define FSN_WG_IN_REGISTER(v) __asm__("" : "+v"(v))
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "cpu/conv_weight_grad_kernel.h"
}  // namespace avx2
#pragma GCC pop_options
// float32 with 512-bit vectors (16 lanes): the packed runs are whole 16-lane vectors
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512dq,avx512vl")
namespace avx512 {
constexpr int kVecBytes = 64;
template <typename T>
struct Lanes {
  static constexpr int L = kVecBytes / static_cast<int>(sizeof(T));
};
#include "cpu/conv_weight_grad_kernel.h"
}  // namespace avx512
#pragma GCC pop_options
#undef FSN_WG_IN_REGISTER
#endif

#define FSN_WG_IN_REGISTER(v) ((void)0)
namespace portable {
#include "cpu/conv_weight_grad_kernel.h"
}  // namespace portable

// (builds without the AVX2 versions report no AVX2 / AVX-512 CPU: the portable loops run)
using conv::use_avx2;
using conv::use_avx512;

// Which tile loops run: 0 portable, 1 AVX2, 2 AVX-512 (float32 only).
enum Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// Vector lanes of the packed runs for this ISA and dtype.
template <typename T>
int64_t lanes_for(int isa) {
  return isa == kAvx512 && sizeof(T) == 4 ? 64 / static_cast<int64_t>(sizeof(T)) : Lanes<T>::L;
}

void candidate_tiles_any(int isa, const float* g, const float* x, const Packed& p, int64_t ow, int64_t iw,
                         int64_t kh, int64_t kw, float* res) {
#ifdef FSN_WG_HAVE_AVX2
  if (isa == kAvx512) return avx512::candidate_tiles_f32(g, x, p, ow, iw, kh, kw, res);
  if (isa == kAvx2) return avx2::candidate_tiles_f32(g, x, p, ow, iw, kh, kw, res);
#endif
  portable::candidate_tiles_f32(g, x, p, ow, iw, kh, kw, res);
}
void candidate_tiles_any(int isa, const double* g, const double* x, const Packed& p, int64_t ow, int64_t iw,
                         int64_t kh, int64_t kw, double* res) {
#ifdef FSN_WG_HAVE_AVX2
  if (isa != kPortable) return avx2::candidate_tiles_f64(g, x, p, ow, iw, kh, kw, res);
#endif
  portable::candidate_tiles_f64(g, x, p, ow, iw, kh, kw, res);
}

// Winograd F(4x4, 3x3) transposed (conv_winograd.cpp) for float32 layers whose forward takes
// F(4x4) (3x3, stride 1, padding 1, output 8, 16 or 32 wide, height a multiple of 4, x's and
// grad_out's columns contiguous), per candidate from the forward's input-width threshold:
// 36 multiplies per 4x4 tile and (row, column) pair instead of 144.
bool winograd_grad_layer(const at::Tensor& x, const at::Tensor& grad_out, int64_t kh, int64_t kw, int64_t stride,
                         int64_t padding, int64_t Ho, int64_t Wo) {
  return x.scalar_type() == at::kFloat && conv::winograd_shape(kh, kw, stride, padding, Ho, Wo) &&
         conv::winograd_tile(Ho, Wo, x.stride(3)) == 4 && grad_out.stride(3) == 1;
}

// Per candidate from input width 8 and output width 12 (rows are padded to 16). One candidate,
// batch 256, AVX-512, ms, aten / direct kernel / Winograd: 32x32 16->16 7.6 / 7.3 / 4.9, 8->8
// 3.0 / 2.2 / 3.3, 8->16 6.1 / 4.0 / 3.4, 16->8 7.2 / 4.0 / 5.0, 12->12 12.2 / 4.4 / 4.1;
// 16x16 32->32 4.3 / 7.4 / 3.3, 16->16 1.35 / 2.0 / 1.2, 8->8 0.68 / 0.65 / 0.80, 8->16 1.3 /
// 1.2 / 0.84; 8x8 64->64 3.9 / 8.8 / 3.4, 32->32 1.2 / 2.4 / 0.95, 8->8 0.20 / 0.23 / 0.23,
// 8->32 0.64 / 0.74 / 0.43. AVX2 kernels on the same CPU: 16x16 32->32 8.8 / 10.5 / 4.8, 8->8
// 0.68 / 0.85 / 0.94. FASTSUPERNET_CPU_WINOGRAD=0 / =all as for the forward.
bool winograd_grad_takes(int64_t in_w, int64_t out_w) {
  const char* env = std::getenv("FASTSUPERNET_CPU_WINOGRAD");
  if (env != nullptr && std::strcmp(env, "all") == 0) return true;
  return in_w >= 8 && out_w >= 12;
}

constexpr int64_t kWinogradItems = 4;  // work items of images (a fixed split: no thread-count dependence)

// The gradient of one candidate (input channels [c0, + iw), grad_out rows [g0, + ow)) into
// out[(o * iw + c) * 9 + 3 i + j]: items of images in parallel, each summing its chunks in
// float32 (as the direct kernel and aten accumulate), the items added in order in float64,
// then G^T M G in float64.
void winograd_weight_grad(const at::Tensor& grad_out, const at::Tensor& x, int64_t c0, int64_t iw, int64_t g0,
                          int64_t ow, float* out) {
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  conv::WinogradGradJob j;
  j.in.x = x.const_data_ptr<float>();
  j.in.x_sN = x.stride(0);
  j.in.x_sC = x.stride(1);
  j.in.x_sH = x.stride(2);
  j.in.x_sW = x.stride(3);
  j.in.N = N;
  j.in.H = H;
  j.in.W = W;
  j.in.tile = 4;
  j.in.max_seg_width = iw;
  j.in.max_out_w = ow;
  j.in.wide = use_avx512();
  j.c0 = c0;
  j.in_w = iw;
  j.out_w = ow;
  j.g = grad_out.const_data_ptr<float>() + g0 * grad_out.stride(1);
  j.g_sN = grad_out.stride(0);
  j.g_sC = grad_out.stride(1);
  j.g_sH = grad_out.stride(2);
  const int64_t op = conv::winograd_grad_rows_padded(j);
  // Chunks: a chunk's transformed input and gradient (36 positions) within the forward's
  // chunk budget, so that they are still in L2 when the reduction reads them.
  const int64_t tiles = (H / 4) * (W / 4);
  const int64_t per_image = 36 * (iw + op) * tiles * static_cast<int64_t>(sizeof(float));
  const int64_t per_item = div_up(N, std::min(N, kWinogradItems)), items = div_up(N, per_item);
  j.in.images_per_chunk = std::clamp<int64_t>(conv::winograd_chunk_bytes() / per_image, 1, per_item);
  const int64_t mlen = 36 * iw * op;
  std::vector<float> m(static_cast<size_t>(items * mlen), 0.0f);
  const int64_t scratch_n = conv::winograd_grad_scratch_floats(j);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    // not zero-filled: the kernel writes every value it reads (megabytes per call)
    std::unique_ptr<float[]> scratch(new float[static_cast<size_t>(scratch_n)]);
    for (int64_t item = begin; item < end; ++item) {
      const bool ran = conv::winograd_weight_grad_avx2(j, item * per_item, std::min(N, (item + 1) * per_item),
                                                        scratch.get(), m.data() + item * mlen);
      TORCH_INTERNAL_ASSERT(ran, "multi_conv2d_weight_grad: Winograd chosen in a build without its AVX2 kernel");
    }
  });
  std::vector<double> sum(static_cast<size_t>(mlen), 0.0);
  for (int64_t item = 0; item < items; ++item) {
    const float* mi = m.data() + item * mlen;
    for (int64_t i = 0; i < mlen; ++i) sum[i] += mi[i];
  }
  // dW[o][c][a][b] = sum over positions (x1, x2) of G[x1][a] G[x2][b] M[x1 x2][c][o]: per tap
  // (a, b), a weighted sum of the position planes (each iw x op, contiguous)
  const auto& kG = conv::kWinogradG4;
  const int64_t plane = iw * op;
  std::vector<double> tap(static_cast<size_t>(plane));
  for (int a = 0; a < 3; ++a) {
    for (int b = 0; b < 3; ++b) {
      std::fill(tap.begin(), tap.end(), 0.0);
      for (int x1 = 0; x1 < 6; ++x1) {
        for (int x2 = 0; x2 < 6; ++x2) {
          const double coef = kG[x1][a] * kG[x2][b];
          if (coef == 0.0) continue;
          const double* src = sum.data() + (6 * x1 + x2) * plane;
          for (int64_t i = 0; i < plane; ++i) tap[i] += coef * src[i];
        }
      }
      for (int64_t c = 0; c < iw; ++c) {
        for (int64_t o = 0; o < ow; ++o) out[(o * iw + c) * 9 + 3 * a + b] = static_cast<float>(tap[c * op + o]);
      }
    }
  }
}

at::Tensor multi_conv2d_weight_grad_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                        c10::IntArrayRef in_offsets, c10::IntArrayRef in_widths,
                                        c10::IntArrayRef out_widths, c10::IntArrayRef row_offsets, int64_t stride,
                                        int64_t padding) {
  const char* op = "multi_conv2d_weight_grad: ";
  TORCH_CHECK_VALUE(x.dim() == 4 && weight.dim() == 4 && grad_out.dim() == 4, op,
                    "x, weight and grad_out must be 4-D, got ", x.sizes(), ", ", weight.sizes(), ", ",
                    grad_out.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                   "x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type(), op,
                   "x, weight and grad_out must share a dtype, got ", x.scalar_type(), ", ", weight.scalar_type(),
                   ", ", grad_out.scalar_type());
  TORCH_CHECK_VALUE(x.device().is_cpu() && grad_out.device().is_cpu() && weight.device().is_cpu(), op,
                    "expects CPU tensors");
  const int64_t K = static_cast<int64_t>(out_widths.size());
  TORCH_CHECK_VALUE(K >= 1 && static_cast<int64_t>(in_offsets.size()) == K &&
                        static_cast<int64_t>(in_widths.size()) == K && static_cast<int64_t>(row_offsets.size()) == K,
                    op, "in_offsets, in_widths, out_widths, row_offsets must have one entry per candidate (got ",
                    in_offsets.size(), ", ", in_widths.size(), ", ", K, ", ", row_offsets.size(), ")");
  TORCH_CHECK_VALUE(stride >= 1 && padding >= 0, op, "stride must be >= 1 and padding >= 0, got ", stride, ", ",
                    padding);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t R = weight.size(0), Cmax = weight.size(1), kh = weight.size(2), kw = weight.size(3);
  const int64_t Ho = (H + 2 * padding - kh) / stride + 1, Wo = (W + 2 * padding - kw) / stride + 1;
  int64_t M = 0;
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK_VALUE(in_widths[k] >= 1 && in_offsets[k] >= 0 && in_offsets[k] + in_widths[k] <= C, op,
                      "candidate ", k, " reads input channels [", in_offsets[k], ", ", in_offsets[k] + in_widths[k],
                      ") out of range for x with ", C);
    TORCH_CHECK_VALUE(in_widths[k] <= Cmax, op, "candidate ", k, " in_width ", in_widths[k],
                      " exceeds the weight's ", Cmax, " columns");
    TORCH_CHECK_VALUE(out_widths[k] >= 1 && row_offsets[k] >= 0 && row_offsets[k] + out_widths[k] <= R, op,
                      "candidate ", k, " rows [", row_offsets[k], ", ", row_offsets[k] + out_widths[k],
                      ") out of range for a weight with ", R, " rows");
    M += out_widths[k];
  }
  TORCH_CHECK_VALUE(Ho >= 1 && Wo >= 1, op, "output would be empty for input ", x.sizes());
  TORCH_CHECK_VALUE(grad_out.size(0) == N && grad_out.size(1) == M && grad_out.size(2) == Ho &&
                        grad_out.size(3) == Wo,
                    op, "grad_out must have shape (", N, ", ", M, ", ", Ho, ", ", Wo, "), got ", grad_out.sizes());
  at::Tensor grad = at::zeros(weight.sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) return grad;

  const bool avx = use_avx2(), avx512 = avx && use_avx512();
  // candidates whose gradient comes from Winograd (their partial sums: item 0's slot)
  std::vector<char> wino(static_cast<size_t>(K), 0);
  if (winograd_grad_layer(x, grad_out, kh, kw, stride, padding, Ho, Wo)) {
    for (int64_t k = 0; k < K; ++k) wino[k] = winograd_grad_takes(in_widths[k], out_widths[k]);
  }
  const int64_t per_image = std::max<int64_t>(1, Ho * (stride == 1 ? Wo + kw - 1 : Wo));
  const int64_t per_item = std::clamp<int64_t>(div_up(kItemElems, per_image), 1, div_up(N, kMinItems));
  const int64_t items = div_up(N, per_item);
  std::vector<int64_t> res_off(K + 1, 0), g_off(K, 0);
  for (int64_t k = 0; k < K; ++k) {
    res_off[k + 1] = res_off[k] + out_widths[k] * in_widths[k] * kh * kw;
    if (k + 1 < K) g_off[k + 1] = g_off[k] + out_widths[k];
  }
  const int64_t res_len = res_off[K];

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "multi_conv2d_weight_grad", [&] {
    using T = scalar_t;
    // 16-lane vectors where the runs are whole ones anyway (stride 1: one run per image of Ho
    // padded rows; strided: output rows of a multiple of 16); else 8 lanes
    const int isa = !avx ? kPortable
                         : avx512 && sizeof(T) == 4 && (stride == 1 || Wo % 16 == 0) ? kAvx512 : kAvx2;
    const int64_t L = lanes_for<T>(isa);
    // stride 1: one run per image, rows need no whole vectors (their zero tails pad them)
    const int64_t wv = stride == 1 ? Wo : div_up(Wo, L) * L;
    const int64_t wph = wv + (kw - 1) / stride;
    const int64_t rows_in = (Ho - 1) * stride + kh;
    std::vector<T> partial(static_cast<size_t>(items * res_len), T(0));
    const T* xp = x.const_data_ptr<T>();
    const T* gp = grad_out.const_data_ptr<T>();
    const int64_t xs0 = x.stride(0), xs1 = x.stride(1), xs2 = x.stride(2), xs3 = x.stride(3);
    const int64_t gs0 = grad_out.stride(0), gs1 = grad_out.stride(1), gs2 = grad_out.stride(2),
                  gs3 = grad_out.stride(3);
    for (int64_t k = 0; k < K; ++k) {  // float32 only (winograd_grad_layer): T is float here
      if (wino[k]) {
        winograd_weight_grad(grad_out, x, in_offsets[k], in_widths[k], g_off[k], out_widths[k],
                             reinterpret_cast<float*>(partial.data() + res_off[k]));
      }
    }
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      std::vector<T, AlignedAllocator<T>> gbuf, xbuf;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n0 = item * per_item, n1 = std::min(N, n0 + per_item);
        Packed p;
        p.images = n1 - n0;
        p.wph = wph;
        p.stride = stride;
        p.x_row = stride * wph;
        // one spare row (and vector) so that no read of a tail lane leaves the buffer
        p.x_img = (rows_in + 1) * p.x_row;
        p.x_chan = p.images * p.x_img + L;
        if (stride == 1) {
          // gradient rows laid out with the input's row length (zero tails): the taps of a
          // whole image are then one contiguous run, no per-row loop for small images
          p.runs = 1;
          p.run_len = div_up(Ho * wph, L) * L;
          p.g_img = p.run_len;
          p.g_run = 0;
          p.x_run = 0;
        } else {
          p.runs = Ho;
          p.run_len = wv;
          p.g_img = Ho * wv;
          p.g_run = wv;
          p.x_run = stride * p.x_row;
        }
        const int64_t g_h = stride == 1 ? wph : wv;  // elements between output rows in gbuf
        p.g_row = p.images * p.g_img;
        T* res_item = partial.data() + item * res_len;
        for (int64_t k = 0; k < K; ++k) {
          if (wino[k]) continue;
          const int64_t ow = out_widths[k], iw = in_widths[k];
          gbuf.assign(static_cast<size_t>(ow * p.g_row), T(0));
          for (int64_t o = 0; o < ow; ++o)
            for (int64_t n = n0; n < n1; ++n)
              for (int64_t h = 0; h < Ho; ++h) {
                const T* src = gp + n * gs0 + (g_off[k] + o) * gs1 + h * gs2;
                T* dst = gbuf.data() + o * p.g_row + (n - n0) * p.g_img + h * g_h;
                if (gs3 == 1) {
                  std::memcpy(dst, src, static_cast<size_t>(Wo) * sizeof(T));
                } else {
                  for (int64_t w = 0; w < Wo; ++w) dst[w] = src[w * gs3];
                }
              }
          xbuf.assign(static_cast<size_t>(iw * p.x_chan), T(0));
          for (int64_t c = 0; c < iw; ++c)
            for (int64_t n = n0; n < n1; ++n)
              for (int64_t r = 0; r < rows_in; ++r) {
                const int64_t hi = r - padding;
                if (hi < 0 || hi >= H) continue;
                const T* src = xp + n * xs0 + (in_offsets[k] + c) * xs1 + hi * xs2;
                T* dst = xbuf.data() + c * p.x_chan + (n - n0) * p.x_img + r * p.x_row;
                if (stride == 1 && xs3 == 1) {
                  // padded columns [padding, padding + W) hold the row; the rest stays zero
                  const int64_t len = std::min(W, wph - padding);
                  if (len > 0) std::memcpy(dst + padding, src, static_cast<size_t>(len) * sizeof(T));
                  continue;
                }
                for (int64_t q = 0; q < stride; ++q) {  // phase q holds padded columns q, q + s, ...
                  T* dq = dst + q * wph;
                  for (int64_t idx = 0; idx < wph; ++idx) {
                    const int64_t wi = idx * stride + q - padding;
                    if (wi >= 0 && wi < W) dq[idx] = src[wi * xs3];
                  }
                }
              }
          candidate_tiles_any(isa, gbuf.data(), xbuf.data(), p, ow, iw, kh, kw, res_item + res_off[k]);
        }
      }
    });
    T* gw = grad.data_ptr<T>();
    const int64_t row_len = Cmax * kh * kw;
    for (int64_t item = 0; item < items; ++item) {
      const T* res_item = partial.data() + item * res_len;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t ncols = in_widths[k] * kh * kw;
        for (int64_t o = 0; o < out_widths[k]; ++o) {
          T* dst = gw + (row_offsets[k] + o) * row_len;
          const T* src = res_item + res_off[k] + o * ncols;
          for (int64_t q = 0; q < ncols; ++q) dst[q] += src[q];
        }
      }
    }
  });
  return grad;
}

}  // namespace

// Whether the weight gradient of a one-candidate call with these shapes (x, grad_out on CPU)
// comes from Winograd: what autograd asks before choosing aten's weight gradient instead.
bool cpu_weight_grad_winograd(const at::Tensor& grad_out, const at::Tensor& x, int64_t kernel_size, int64_t stride,
                              int64_t padding, int64_t in_width, int64_t out_width) {
  if (x.dim() != 4 || grad_out.dim() != 4) return false;
  return winograd_grad_layer(x, grad_out, kernel_size, kernel_size, stride, padding, grad_out.size(2),
                             grad_out.size(3)) &&
         winograd_grad_takes(in_width, out_width);
}

TORCH_LIBRARY_IMPL(fastsupernet, CPU, m) { m.impl("multi_conv2d_weight_grad", &multi_conv2d_weight_grad_cpu); }

TORCH_LIBRARY_FRAGMENT(fastsupernet, m) {
  m.def("_cpu_weight_grad_winograd(Tensor grad_out, Tensor x, int kernel_size, int stride, int padding, "
        "int in_width, int out_width) -> bool",
        &cpu_weight_grad_winograd);
}

}  // namespace fastsupernet
