// Host-side pieces shared by the CPU convolution files (conv.cpp, conv_input_grad.cpp): work
// sizes, the split of a run of rows into blocks, the compiled kernel call, and the GEMM plan
// of the stride-2 Winograd paths. Plain C++ (no torch), like conv_plan.h.
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/conv_plan.h"
#include "cpu/conv_winograd_s2.h"

namespace fastsupernet {
namespace conv {

// Below this many multiply-adds the whole call runs on the calling thread.
constexpr int64_t kParallelMinMacs = int64_t{1} << 21;
// Packed weights of one group of blocks (see conv_kernel.h): well inside a 512 KiB L2.
constexpr int64_t kPanelKiB = 128;

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows of the next block of a run of `left` rows. A tile's accumulators are fused
// multiply-add chains, one step per reduction index: a tile of one or two rows (3 or 6 chains)
// waits on the FMA latency, while three rows (9 chains) already keep both FMA pipes busy. So a
// run is cut into blocks of MR = 4 rows except where that would leave one or two rows over:
// 5 = 3 + 2, 6 = 3 + 3, 9 = 3 + 3 + 3, 10 = 4 + 3 + 3 (measured on 32x32 3x3 calls, widths 5
// and 9: see benchmarks/RESULTS.md). The block shape never changes a row's value: every
// tile adds a row's products in the same order.
template <int MR>
inline int32_t block_rows(int64_t left) {
  static_assert(MR == 4, "the split below is written for blocks of 4 rows");
  if (left <= MR) return static_cast<int32_t>(left);
  if (left == 5 || left == 6 || left == 9) return 3;
  return MR;
}

// Items [begin, end) of a job on the widest compiled kernel allowed (avx2, avx512: use_avx2(),
// use_avx512() read once per call); false where none is (the caller runs run_items_generic).
inline bool run_items_fast(const ConvJob<float>& job, int64_t begin, int64_t end, float* scratch, double* lanes,
                           bool avx2, bool avx512) {
  return (avx512 && run_items_avx512(job, begin, end, scratch, lanes)) ||
         (avx2 && run_items_avx2(job, begin, end, scratch, lanes));
}
inline bool run_items_fast(const ConvJob<double>& job, int64_t begin, int64_t end, double* scratch, double* lanes,
                           bool avx2, bool) {
  return avx2 && run_items_avx2(job, begin, end, scratch, lanes);
}

// G K for output row o of a stride-2 Winograd path's filter transform U = (G K) G^T, in float64:
// gk[((pq * out_w + o) * in_w + c) * 10 + 2 i + b] = sum_u G[i][u] K_pq[u][b] for the phases
// pq = 2 p + q and channels c < in_w, K_pq[u][b] = w[o][c][tap(p, u)][tap(q, b)] (zero where
// tap gives -1); w at row o, strides s0..s3.
template <typename Tap>
inline void s2_filter_gk(const float* w, int64_t s0, int64_t s1, int64_t s2, int64_t s3, int64_t in_w, int64_t out_w,
                         int64_t o, Tap tap, double* gk) {
  for (int pq = 0; pq < 4; ++pq) {
    const int p = pq / 2, q = pq % 2;
    for (int64_t c = 0; c < in_w; ++c) {
      const float* f = w + o * s0 + c * s1;
      double* dst = gk + ((pq * out_w + o) * in_w + c) * 10;
      for (int i = 0; i < 5; ++i) {
        for (int b = 0; b < 2; ++b) {
          double acc = 0.0;
          for (int u = 0; u < 2; ++u) {
            const int ku = tap(p, u), kb = tap(q, b);
            if (ku >= 0 && kb >= 0) acc += kWinogradS2G[i][u] * static_cast<double>(f[ku * s2 + kb * s3]);
          }
          dst[i * 2 + b] = acc;
        }
      }
    }
  }
}

// The GEMM of one chunk of a stride-2 Winograd path (conv_winograd_s2.h): a 1x1 direct job over
// the transformed input, kS2Tiles x kS2Images pixels per channel, reading channel k of a
// segment at k pixels-planes from its first; the caller adds the blocks and segments
// (reading the panels at `a`) and sets x and out per chunk.
struct S2Gemm {
  ConvJob<float> job;
  std::vector<Segment> segments;
  std::vector<Block> blocks;
  std::vector<float> a;
  std::vector<int64_t> tap_off, vec_src, vec_dst;
  std::vector<int32_t> vec_len;

  static constexpr int64_t kPixels = kS2Images * kS2Tiles;

  // Job fields of an M-row pass; after the blocks, segments and panels are in place. Reduction
  // index k = s * width + c (s < slots, c < width) reads the segment's channel s * stride + c.
  void finish(int64_t M, int64_t slots, int64_t width, int64_t stride) {
    ConvJob<float>& g = job;
    g.N = 1;
    g.M = M;
    g.out_plane = kPixels;
    g.x_sN = 0;
    g.x_sC = kPixels;
    g.x_sH = kPixels;
    g.x_sW = 1;
    g.H = 1;
    g.W = kPixels;
    g.direct = true;
    g.panel_values = kPanelKiB * 1024 / static_cast<int64_t>(sizeof(float));
    g.num_segments = static_cast<int64_t>(segments.size());
    g.segments = segments.data();
    g.num_blocks = static_cast<int64_t>(blocks.size());
    g.blocks = blocks.data();
    g.a = a.data();
    g.block_chunks = 1;
    g.blocks_per_chunk = g.num_blocks;
    for (int64_t sl = 0; sl < slots; ++sl) {
      for (int64_t c = 0; c < width; ++c) tap_off.push_back((sl * stride + c) * kPixels);
    }
    g.tap_off = tap_off.data();
    for (int64_t v = 0; v < kPixels; v += Blocking<float>::kLanes) {
      vec_src.push_back(v);
      vec_dst.push_back(v);
      vec_len.push_back(Blocking<float>::kLanes);
    }
    g.num_vecs = static_cast<int64_t>(vec_src.size());
    g.vec_src = vec_src.data();
    g.vec_dst = vec_dst.data();
    g.vec_len = vec_len.data();
    g.all_vecs_full = true;
  }
};

}  // namespace conv
}  // namespace fastsupernet
