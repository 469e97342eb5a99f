// CPU kernel of fastsupernet::_cpu_conv2d_s2_input_grad: the input gradient of 3x3 stride-2
// padding-1 convolutions (float32, float64), for the registered backward of multi_conv2d and
// sliced_conv2d (fastsupernet/ops/conv.py). Candidate k's output gradient is the k-th block of
// grad_out's channels (out_widths[k] of them); its weight weight[row_offsets[k] :
// + out_widths[k], :in_widths[k]]; its gradient goes to channels [in_offsets[k], + in_widths[k])
// of grad_x, written (accumulate false: every channel read by exactly one candidate) or added.
//
// For y = conv(x, w) with a 3x3 kernel, stride 2 and padding 1 (Ho = ceil(H / 2)), grad_x
// splits by the parity (p, q) of the input pixel (2a + p, 2b + q) into four stride-1
// correlations of the output gradient g over Ho x Wo planes (the polyphase form): along each
// axis an even position 2a takes g[a] with tap 1, an odd one 2a + 1 takes g[a] with tap 2
// and g[a + 1] with tap 0 (g is zero past its last row and column):
//   gx[c][2a + p][2b + q] = sum_o sum_(di, dj) g[o][a + di][b + dj] w[o][c][u_p(di)][u_q(dj)],
//   u_0(0) = 1, u_1(0) = 2, u_1(1) = 0.
// Per candidate, the direct kernel computes the four phases as 4 * in_width rows over the
// candidate's g channels padded by one (the same copy, tiles and chains of fused multiply-adds
// as the forward): each phase's blocks have their own table of taps (Block::tap0), the
// reduction ordered tap-major, k = t * out_width + o, over the phase's taps (di, dj):
// (even, even) (0, 0); (even, odd) (0, 0), (0, 1); (odd, even) (0, 0), (1, 0); (odd, odd) all
// four: the layer's 9 taps per (o, c) and no more, where a stride-1 pass over the gradient with
// zeros inserted would have 36. Each image's phases go to a per-thread
// buffer (in L1/L2), and are interleaved (or added) into grad_x from there. A value is one
// chain of fused multiply-adds over the candidate's out_width * (taps of its phase) terms, in a
// fixed order, then (with several candidates reading one channel) added in candidate order:
// the bound of the direct kernel with d = out_width * 4, and bitwise the same for any thread
// count.
// Float32 16x16 inputs on AVX-512 CPUs, 64 images or more, take instead one Winograd F(4x4, 2x2)
// transform of each g channel for all four phases (conv_winograd_s2.h, WinogradS2GradJob;
// FASTSUPERNET_CPU_WINOGRAD=0 keeps the phases above, =all takes it at any batch).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "cpu/conv_host.h"
#include "cpu/conv_plan.h"
#include "cpu/conv_winograd_s2.h"

namespace fastsupernet {
namespace {

using conv::Block;
using conv::Blocking;
using conv::block_rows;
using conv::ConvJob;
using conv::div_up;
using conv::kPanelKiB;
using conv::kParallelMinMacs;
using conv::run_items_fast;
using conv::use_avx2;
using conv::use_avx512;

// Taps of phase ph = 2 p + q (p: row parity, q: column parity) as offsets (di, dj) into g.
constexpr int kPhaseTaps[4] = {1, 2, 2, 4};
constexpr int kPhaseTapDi[4][4] = {{0}, {0, 0}, {0, 1}, {0, 0, 1, 1}};
constexpr int kPhaseTapDj[4][4] = {{0}, {0, 1}, {0, 0}, {0, 1, 0, 1}};

// Kernel index along one axis of parity `p` for tap offset `d` (0 or 1): 1 (even), 2 or 0 (odd).
inline int s2_tap(int p, int d) { return p == 0 ? 1 : (d == 0 ? 2 : 0); }

template <typename T>
struct InputGradPlan {
  ConvJob<T> job;  // one image (N = 1); x and out are set per image
  std::vector<conv::Segment> segments;
  std::vector<Block> blocks;
  std::vector<T> a;
  std::vector<int64_t> tap_off, vec_src, vec_dst, copy_rows;
  std::vector<int32_t> vec_len;
  std::vector<conv::PhaseRun> phase_runs;
  int64_t x_c0 = 0, in_w = 0;
};

template <typename T>
void plan_input_grad(InputGradPlan<T>& pl, const at::Tensor& g, const at::Tensor& weight, int64_t g_c0, int64_t x_c0,
                     int64_t in_w, int64_t out_w, int64_t row0) {
  constexpr int L = Blocking<T>::kLanes;
  constexpr int MR = Blocking<T>::kRows;
  const int64_t Ho = g.size(2), Wo = g.size(3);
  pl.x_c0 = x_c0;
  pl.in_w = in_w;
  ConvJob<T>& job = pl.job;
  job.N = 1;
  job.M = 4 * in_w;
  job.out_plane = Ho * Wo;
  job.x_sN = g.stride(0);
  job.x_sC = g.stride(1);
  job.x_sH = g.stride(2);
  job.x_sW = g.stride(3);
  job.H = Ho;
  job.W = Wo;
  job.kh = 3;  // scratch geometry of a 3x3 stride-1 padding-1 pass: one zero row and column each side
  job.kw = 3;
  job.stride = 1;
  job.pad = 1;
  job.phase_len = Wo + 2;
  job.row_len = Wo + 2;
  job.scratch_rows = Ho + 2;
  job.scratch_plane = job.scratch_rows * job.row_len;
  for (int64_t r = 1; r <= Ho; ++r) pl.copy_rows.push_back(r);
  pl.phase_runs.push_back(conv::PhaseRun{1, 0, Wo});
  job.num_copy_rows = Ho;
  job.copy_rows = pl.copy_rows.data();
  job.num_phase_runs = 1;
  job.phase_runs = pl.phase_runs.data();

  // Taps: phase ph's table at tap0[ph], entry t * out_w + o the offset of g[o][a + di][b + dj]
  // from the vector's g[0][a][b].
  int64_t tap0[4];
  for (int ph = 0, at = 0; ph < 4; ++ph) {
    tap0[ph] = at;
    for (int t = 0; t < kPhaseTaps[ph]; ++t) {
      for (int64_t o = 0; o < out_w; ++o, ++at) {
        pl.tap_off.push_back(o * job.scratch_plane + kPhaseTapDi[ph][t] * job.row_len + kPhaseTapDj[ph][t]);
      }
    }
  }
  job.tap_off = pl.tap_off.data();

  // Blocks: per phase, runs of in_w rows; panel a[k * rows + r] = w[row0 + o][c][u][v] for
  // k = t * out_w + o.
  int64_t a_total = 0;
  for (int ph = 0; ph < 4; ++ph) {
    for (int64_t c = 0; c < in_w; c += pl.blocks.back().rows) {
      Block b;
      b.row0 = ph * in_w + c;
      b.rows = block_rows<MR>(in_w - c);
      b.depth = kPhaseTaps[ph] * out_w;
      b.tap0 = tap0[ph];
      b.a_off = a_total;
      a_total += b.depth * b.rows;
      pl.blocks.push_back(b);
    }
  }
  pl.a.assign(static_cast<size_t>(a_total + 4), T(0));  // + 4: as multi_conv2d_direct
  const T* w = weight.const_data_ptr<T>();
  const int64_t s0 = weight.stride(0), s1 = weight.stride(1), s2 = weight.stride(2), s3 = weight.stride(3);
  for (const Block& b : pl.blocks) {
    const int ph = static_cast<int>(b.row0 / in_w), p = ph / 2, q = ph % 2;
    T* panel = pl.a.data() + b.a_off;
    for (int r = 0; r < b.rows; ++r) {
      const int64_t c = b.row0 - ph * in_w + r;
      for (int t = 0; t < kPhaseTaps[ph]; ++t) {
        const int u = s2_tap(p, kPhaseTapDi[ph][t]), v = s2_tap(q, kPhaseTapDj[ph][t]);
        for (int64_t o = 0; o < out_w; ++o) {
          panel[(t * out_w + o) * b.rows + r] = w[(row0 + o) * s0 + c * s1 + u * s2 + v * s3];
        }
      }
    }
  }
  pl.segments.push_back(conv::Segment{g_c0, out_w, 0, static_cast<int64_t>(pl.blocks.size())});
  job.num_segments = 1;
  job.segments = pl.segments.data();
  job.num_blocks = static_cast<int64_t>(pl.blocks.size());
  job.blocks = pl.blocks.data();
  job.a = pl.a.data();
  job.panel_values = kPanelKiB * 1024 / static_cast<int64_t>(sizeof(T));
  job.block_chunks = 1;
  job.blocks_per_chunk = job.num_blocks;

  for (int64_t a = 0; a < Ho; ++a) {  // vector (a, b0) reads padded (a + 1, b0 + 1) at tap (0, 0)
    for (int64_t b0 = 0; b0 < Wo; b0 += L) {
      pl.vec_src.push_back((a + 1) * job.row_len + b0 + 1);
      pl.vec_dst.push_back(a * Wo + b0);
      pl.vec_len.push_back(static_cast<int32_t>(std::min<int64_t>(L, Wo - b0)));
    }
  }
  job.num_vecs = static_cast<int64_t>(pl.vec_src.size());
  job.vec_src = pl.vec_src.data();
  job.vec_dst = pl.vec_dst.data();
  job.vec_len = pl.vec_len.data();
  job.all_vecs_full = Wo % L == 0;
}

// grad_x[n][x_c0 + c] (+)= the four phase planes of buf (rows ph * in_w + c, Ho x Wo each).
template <typename T>
void interleave_phases(const T* __restrict buf, T* __restrict gx, int64_t in_w, int64_t Ho, int64_t Wo, int64_t H,
                       int64_t W, bool add) {
  const int64_t plane = Ho * Wo;
  for (int64_t c = 0; c < in_w; ++c) {
    T* dst = gx + c * H * W;
    for (int64_t h = 0; h < H; ++h) {
      const int64_t a = h / 2, p = h % 2;
      const T* __restrict e = buf + ((2 * p) * in_w + c) * plane + a * Wo;     // q = 0: even columns
      const T* __restrict o = buf + ((2 * p + 1) * in_w + c) * plane + a * Wo;  // q = 1: odd columns
      T* __restrict row = dst + h * W;
      const int64_t pairs = W / 2;
      int64_t b = 0;
#if defined(__SSE2__)
      if constexpr (std::is_same_v<T, float>) {  // 4 pairs at a time (x86-64 baseline)
        for (; b + 4 <= pairs; b += 4) {
          const __m128 ev = _mm_loadu_ps(e + b), od = _mm_loadu_ps(o + b);
          __m128 lo = _mm_unpacklo_ps(ev, od), hi = _mm_unpackhi_ps(ev, od);
          if (add) {
            lo = _mm_add_ps(_mm_loadu_ps(row + 2 * b), lo);
            hi = _mm_add_ps(_mm_loadu_ps(row + 2 * b + 4), hi);
          }
          _mm_storeu_ps(row + 2 * b, lo);
          _mm_storeu_ps(row + 2 * b + 4, hi);
        }
      }
#endif
      if (add) {
        for (; b < pairs; ++b) {
          row[2 * b] += e[b];
          row[2 * b + 1] += o[b];
        }
        if (W % 2 != 0) row[W - 1] += e[pairs];
      } else {
        for (; b < pairs; ++b) {
          row[2 * b] = e[b];
          row[2 * b + 1] = o[b];
        }
        if (W % 2 != 0) row[W - 1] = e[pairs];
      }
    }
  }
}

// One candidate of the Winograd input gradient (conv_winograd_s2.h): the GEMM's plan, rows
// xi * (4 in_w + 1) + slot * in_w + c over V's channels xi * (out_w + 1) + o.
struct WinogradS2GradPlan {
  conv::WinogradS2GradJob job;
  conv::S2Gemm gemm;
};

void plan_winograd_s2_grad(WinogradS2GradPlan& pl, const at::Tensor& weight, int64_t in_w, int64_t out_w,
                           int64_t row_offset) {
  constexpr int MR = Blocking<float>::kRows;
  constexpr int P = conv::kS2Points;
  conv::S2Gemm& gm = pl.gemm;
  int64_t a_total = 0;
  for (int xi = 0; xi < P; ++xi) {
    conv::Segment seg{xi * (out_w + 1), out_w, static_cast<int64_t>(gm.blocks.size()), 0};
    for (int slot = 0; slot < conv::s2g_phases(xi); ++slot) {
      for (int64_t c = 0; c < in_w; c += gm.blocks.back().rows) {
        Block b;
        b.row0 = xi * (4 * in_w + 1) + slot * in_w + c;
        b.rows = block_rows<MR>(in_w - c);
        b.depth = out_w;
        b.a_off = a_total;
        a_total += b.depth * b.rows;
        gm.blocks.push_back(b);
      }
    }
    seg.block_end = static_cast<int64_t>(gm.blocks.size());
    gm.segments.push_back(seg);
    a_total += 16;  // xi's panels not a power of two apart
  }
  gm.a.assign(static_cast<size_t>(a_total + 4), 0.0f);  // + 4: as multi_conv2d_direct
  // G K' per (o, phase, c), K'_pq[di][dj] = w[o][c][t_p(di)][t_q(dj)] (s2_tap; zero for
  // t_0(1)); then U' = (G K') G^T into the panels, in float64 and rounded once.
  const float* w = weight.const_data_ptr<float>() + row_offset * weight.stride(0);
  const int64_t s0 = weight.stride(0), s1 = weight.stride(1), s2 = weight.stride(2), s3 = weight.stride(3);
  std::vector<double> gk(static_cast<size_t>(out_w * 4 * in_w * 10));  // [2p + q][o][c][i][dj]
  const auto tap = [](int p, int d) { return p == 0 && d == 1 ? -1 : s2_tap(p, d); };
  at::parallel_for(0, out_w, 8, [&](int64_t o_begin, int64_t o_end) {
    for (int64_t o = o_begin; o < o_end; ++o) conv::s2_filter_gk(w, s0, s1, s2, s3, in_w, out_w, o, tap, gk.data());
  });
  float* a = gm.a.data();
  at::parallel_for(0, P, 1, [&](int64_t xi_begin, int64_t xi_end) {
    for (int64_t xi = xi_begin; xi < xi_end; ++xi) {
      const int i = static_cast<int>(xi / 5), jj = static_cast<int>(xi % 5);
      const double g0 = conv::kWinogradS2G[jj][0], g1 = conv::kWinogradS2G[jj][1];
      for (int64_t bi = gm.segments[xi].block_begin; bi < gm.segments[xi].block_end; ++bi) {
        const Block& b = gm.blocks[bi];
        const int64_t first = b.row0 - xi * (4 * in_w + 1);
        const int pq = conv::s2g_phase(static_cast<int>(xi), static_cast<int>(first / in_w));
        const int64_t c0 = first % in_w;
        float* panel = a + b.a_off;
        for (int64_t o = 0; o < out_w; ++o) {
          const double* v = gk.data() + ((pq * out_w + o) * in_w + c0) * 10 + i * 2;
          for (int r = 0; r < b.rows; ++r) panel[o * b.rows + r] = static_cast<float>(v[10 * r] * g0 + v[10 * r + 1] * g1);
        }
      }
    }
  });
  gm.finish(P * (4 * in_w + 1), 1, out_w, out_w);
  pl.job.gemm = &gm.job;
}

template <typename T>
void s2_input_grad_impl(const at::Tensor& g, const at::Tensor& weight, at::IntArrayRef in_offsets,
                        at::IntArrayRef in_widths, at::IntArrayRef out_widths, at::IntArrayRef row_offsets,
                        at::Tensor& grad_x, bool accumulate) {
  const int64_t K = static_cast<int64_t>(in_offsets.size());
  const int64_t N = g.size(0), Ho = g.size(2), Wo = g.size(3);
  const int64_t C = grad_x.size(1), H = grad_x.size(2), W = grad_x.size(3);
  if (N == 0) return;
  // Winograd (float32 16x16 on AVX-512, 64 images or more: then every candidate of the call)
  // or the phases on the direct kernel.
  std::vector<InputGradPlan<T>> plans;
  std::vector<std::unique_ptr<WinogradS2GradPlan>> wplans;
  int64_t g_c0 = 0, scratch_n = 0, buf_n = 0, lanes_n = 0, macs = 0, wscratch_n = 0;
  plans.reserve(static_cast<size_t>(K));
  for (int64_t k = 0; k < K; ++k) {
    if (std::is_same<T, float>::value &&
        conv::winograd_s2_grad_takes(N, H, W, g.stride(3))) {
      wplans.push_back(std::make_unique<WinogradS2GradPlan>());
      WinogradS2GradPlan& wp = *wplans.back();
      plan_winograd_s2_grad(wp, weight, in_widths[k], out_widths[k], row_offsets[k]);
      conv::WinogradS2GradJob& j = wp.job;
      j.g = reinterpret_cast<const float*>(g.const_data_ptr<T>());
      j.g_sN = g.stride(0);
      j.g_sC = g.stride(1);
      j.g_sH = g.stride(2);
      j.N = N;
      j.g_c0 = g_c0;
      j.out_w = out_widths[k];
      j.in_w = in_widths[k];
      j.gx = reinterpret_cast<float*>(grad_x.mutable_data_ptr<T>());
      j.C = C;
      j.x_c0 = in_offsets[k];
      j.accumulate = accumulate;
      wscratch_n = std::max(wscratch_n, conv::winograd_s2_grad_scratch_floats(j));
    } else {
      plans.emplace_back();
      plan_input_grad<T>(plans.back(), g, weight, g_c0, in_offsets[k], in_widths[k], out_widths[k], row_offsets[k]);
      scratch_n = std::max(scratch_n, conv::scratch_elements(plans.back().job, out_widths[k]));
      buf_n = std::max(buf_n, plans.back().job.M * Ho * Wo);
      lanes_n = std::max(lanes_n, conv::lane_elements(plans.back().job));
    }
    macs += 9 * in_widths[k] * out_widths[k] * Ho * Wo;
    g_c0 += out_widths[k];
  }
  const int64_t nplans = static_cast<int64_t>(plans.size());
  const T* gp = g.const_data_ptr<T>();
  T* gxp = grad_x.mutable_data_ptr<T>();
  const bool avx2 = use_avx2(), avx512 = use_avx512();
  if (!wplans.empty()) {
    const int64_t chunks = div_up(N, conv::kS2Images);
    auto wbody = [&](int64_t begin, int64_t end) {
      std::unique_ptr<float[]> scratch(new float[static_cast<size_t>(wscratch_n + 16)]);  // all written before read
      float* s = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(scratch.get()) + 63) & ~uintptr_t(63));
      double lanes[2 * conv::kStatLanes];  // unused: the GEMM takes no statistics
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        for (const auto& wp : wplans) conv::winograd_s2_grad_run_avx512(wp->job, chunk, chunk + 1, s, lanes);
      }
    };
    if (macs * N < kParallelMinMacs || chunks == 1) {
      wbody(0, chunks);
    } else {
      at::parallel_for(0, chunks, 1, wbody);
    }
  }
  if (nplans == 0) return;
  auto body = [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(static_cast<size_t>(scratch_n + 64 / sizeof(T)));  // zero: the padding stays zero
    T* s = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(scratch.data()) + 63) & ~uintptr_t(63));
    std::vector<T> buf(static_cast<size_t>(buf_n + 64 / sizeof(T)));
    T* b = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
    std::vector<double> lanes(static_cast<size_t>(lanes_n));
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t k = 0; k < nplans; ++k) {
        ConvJob<T> job = plans[k].job;
        job.x = gp + n * g.stride(0);
        job.out = b;
        if (!run_items_fast(job, 0, 1, s, lanes.data(), avx2, avx512)) {
          conv::run_items_generic(job, 0, 1, s, lanes.data());
        }
        interleave_phases(b, gxp + (n * C + plans[k].x_c0) * H * W, plans[k].in_w, Ho, Wo, H, W, accumulate);
      }
    }
  };
  if (macs * N < kParallelMinMacs || N == 1) {
    body(0, N);
  } else {
    at::parallel_for(0, N, 1, body);
  }
}

void s2_input_grad_cpu(const at::Tensor& grad_out, const at::Tensor& weight, at::IntArrayRef in_offsets,
                       at::IntArrayRef in_widths, at::IntArrayRef out_widths, at::IntArrayRef row_offsets,
                       at::Tensor& grad_x, bool accumulate) {
  const char* op = "fastsupernet::_cpu_conv2d_s2_input_grad: ";
  TORCH_CHECK_VALUE(grad_out.dim() == 4 && grad_x.dim() == 4 && weight.dim() == 4, op,
                    "grad_out, weight and grad_x must be 4-D, got ", grad_out.dim(), ", ", weight.dim(), " and ",
                    grad_x.dim(), " dimensions");
  TORCH_CHECK_TYPE((grad_out.scalar_type() == at::kFloat || grad_out.scalar_type() == at::kDouble) &&
                       weight.scalar_type() == grad_out.scalar_type() &&
                       grad_x.scalar_type() == grad_out.scalar_type(),
                   op, "grad_out, weight and grad_x must all be float32 or all float64, got ",
                   grad_out.scalar_type(), ", ", weight.scalar_type(), " and ", grad_x.scalar_type());
  TORCH_CHECK_VALUE(grad_out.device().is_cpu() && weight.device().is_cpu() && grad_x.device().is_cpu(), op,
                    "CPU tensors only");
  TORCH_CHECK_VALUE(grad_x.is_contiguous(), op, "grad_x must be contiguous (NCHW)");
  TORCH_CHECK_VALUE(weight.size(2) == 3 && weight.size(3) == 3, op, "a 3x3 kernel is needed, got ",
                    weight.size(2), "x", weight.size(3));
  const int64_t N = grad_x.size(0), C = grad_x.size(1), H = grad_x.size(2), W = grad_x.size(3);
  TORCH_CHECK_VALUE(grad_out.size(0) == N && grad_out.size(2) == (H + 1) / 2 && grad_out.size(3) == (W + 1) / 2, op,
                    "grad_out ", grad_out.sizes(), " is not the output of a 3x3 stride-2 padding-1 layer on ",
                    grad_x.sizes());
  const int64_t K = static_cast<int64_t>(in_offsets.size());
  TORCH_CHECK_VALUE(K >= 1 && static_cast<int64_t>(in_widths.size()) == K &&
                        static_cast<int64_t>(out_widths.size()) == K && static_cast<int64_t>(row_offsets.size()) == K,
                    op, "in_offsets, in_widths, out_widths and row_offsets must have one entry per candidate");
  std::vector<int> cover(static_cast<size_t>(C), 0);
  int64_t M = 0;
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK_VALUE(in_widths[k] >= 1 && in_offsets[k] >= 0 && in_offsets[k] + in_widths[k] <= C &&
                          in_widths[k] <= weight.size(1),
                      op, "candidate ", k, " reads input channels [", in_offsets[k], ", ",
                      in_offsets[k] + in_widths[k], ") of ", C, " (weight columns: ", weight.size(1), ")");
    TORCH_CHECK_VALUE(out_widths[k] >= 1 && row_offsets[k] >= 0 && row_offsets[k] + out_widths[k] <= weight.size(0),
                      op, "candidate ", k, " uses weight rows [", row_offsets[k], ", ", row_offsets[k] + out_widths[k],
                      ") of ", weight.size(0));
    for (int64_t c = in_offsets[k]; c < in_offsets[k] + in_widths[k]; ++c) ++cover[c];
    M += out_widths[k];
  }
  TORCH_CHECK_VALUE(grad_out.size(1) == M, op, "grad_out has ", grad_out.size(1),
                    " channels, the candidates' out_widths add up to ", M);
  if (!accumulate) {
    TORCH_CHECK_VALUE(std::all_of(cover.begin(), cover.end(), [](int v) { return v == 1; }), op,
                      "accumulate=False needs the candidates to read every channel of grad_x exactly once");
  }
  if (grad_out.scalar_type() == at::kFloat) {
    s2_input_grad_impl<float>(grad_out, weight, in_offsets, in_widths, out_widths, row_offsets, grad_x, accumulate);
  } else {
    s2_input_grad_impl<double>(grad_out, weight, in_offsets, in_widths, out_widths, row_offsets, grad_x, accumulate);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastsupernet, m) {
  m.def("_cpu_conv2d_s2_input_grad(Tensor grad_out, Tensor weight, int[] in_offsets, int[] in_widths, "
        "int[] out_widths, int[] row_offsets, Tensor(a!) grad_x, bool accumulate) -> ()");
}

TORCH_LIBRARY_IMPL(fastsupernet, CPU, m) { m.impl("_cpu_conv2d_s2_input_grad", &s2_input_grad_cpu); }

}  // namespace fastsupernet
