// Micro-kernel and item loop of the CPU multi_conv2d, written once and compiled once per
// instruction set. The including file defines, before including this header:
//   FSN_TARGET   the function attribute of its instruction set (empty for the generic build)
//   FSN_INLINE   a forced-inline attribute
//   Vec<T>       in namespace fastsupernet::conv::(anonymous), for T = float and double:
//                register type R, lanes L, and zero/load/store/bcast/set1/fma/add/mul/relu/
//                prelu/copy/copy_even, and statistics accumulators S with stats_zero/stats_add/
//                stats_flush (see conv_generic.cpp for the reference definitions).
// Everything here has internal linkage: each instruction set gets its own copy, and no
// template of this file is shared (ODR) with code compiled for another target.
//
// No torch header may be included here.
#pragma once

#include <algorithm>
#include <atomic>
#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "cpu/conv_plan.h"

namespace fastsupernet {
namespace conv {
namespace {

#if defined(__GNUC__) || defined(__clang__)
#define FSN_NOINLINE __attribute__((noinline))
#define FSN_PREFETCH(p) __builtin_prefetch((p), 0, 3)
#define FSN_PREFETCH_WRITE(p) __builtin_prefetch((p), 1, 3)
#else
#define FSN_NOINLINE
#define FSN_PREFETCH(p) ((void)(p))
#define FSN_PREFETCH_WRITE(p) ((void)(p))
#endif

// The two cache lines from p (the NV * kLanes values of a pixel block start there).
template <bool kWrite, typename T>
FSN_INLINE void prefetch_lines(const T* p) {
  if constexpr (kWrite) {
    FSN_PREFETCH_WRITE(p);
    FSN_PREFETCH_WRITE(p + 64 / sizeof(T));
  } else {
    FSN_PREFETCH(p);
    FSN_PREFETCH(p + 64 / sizeof(T));
  }
}

// Most plan vectors a register tile may have.
constexpr int kMaxTileVecs = 8;

template <typename T>
struct TileArgs {
  const T* a;               // packed (depth, rows) weight panel
  int64_t depth;            // reduction length
  const T* b[kMaxTileVecs]; // per vector: source of lane 0 of tap 0
  const int64_t* tap;       // per tap: offset from b[v]
  T* out;                   // output plane of the block's first row (this image)
  const T* res;             // residual plane of the same row, or nullptr
  int64_t plane;            // Ho * Wo: distance between rows
  const int64_t* dst;       // per vector: offset in the plane
  const int32_t* len;       // per vector: valid lanes
  const T* scale;           // per row (from the block's first row), or nullptr
  const T* shift;
  const T* slope;
  int act;
  int epi;                  // EpilogueKind: which compiled epilogue stores the tile
  bool stream;              // input read in place from memory: prefetch ahead
  bool stream_out;          // whole-vector output stores bypass the caches (ConvJob::stream_out)
  double* lanes;            // per row: kStatLanes sums then kStatLanes sums of squares, or nullptr
};

// Epilogues compiled without run-time tests, for the combinations the ranking engine and the
// trainer run; kEpiGeneric tests each part (any other combination). "Affine" is scale and
// shift both given. Every kind does the same operations in the same order as the generic one.
enum EpilogueKind : int {
  kEpiGeneric = 0,
  kEpiPlain,           // store
  kEpiStats,           // statistics, store (recalibration)
  kEpiAffine,          // * scale + shift
  kEpiAffineRelu,
  kEpiAffinePrelu,
  kEpiAffineResRelu,   // * scale + shift + residual, ReLU
  kEpiAffineResPrelu,
};

inline int epilogue_kind(bool stats, bool scale, bool shift, bool residual, int act) {
  if (scale != shift) return kEpiGeneric;
  if (!scale) return residual || act != kActNone ? kEpiGeneric : (stats ? kEpiStats : kEpiPlain);
  if (stats) return kEpiGeneric;
  if (!residual) return act == kActRelu ? kEpiAffineRelu : act == kActPrelu ? kEpiAffinePrelu : kEpiAffine;
  return act == kActRelu ? kEpiAffineResRelu : act == kActPrelu ? kEpiAffineResPrelu : kEpiGeneric;
}

// A part of the epilogue the template leaves to a run-time test (the generic epilogue).
constexpr int kRuntime = -1;

// Stores a tile's accumulators through the epilogue: statistics of the raw values, then
// * scale + shift (either may be absent), + residual, activation. Each template argument fixes
// its part at compile time (0/1, or the activation) or leaves it to a run-time test
// (kRuntime); kAffine fixes scale and shift together. V: the vector operations (Vec<T>, or
// Vec<T>::Wide for the 2 L-lane runs of tile_runs: the same operations on twice the lanes).
template <typename T, int MR, int NV, int kStats, int kAffine, int kRes, int kAct, typename V = Vec<T>>
FSN_TARGET FSN_INLINE void store_tile(const TileArgs<T>& t, const typename V::R (&acc)[MR][NV]) {
  using R = typename V::R;
  constexpr int L = V::L;
  const bool stats = kStats == kRuntime ? t.lanes != nullptr : kStats != 0;
  const bool scale = kAffine == kRuntime ? t.scale != nullptr : kAffine != 0;
  const bool shift = kAffine == kRuntime ? t.shift != nullptr : kAffine != 0;
  const bool res = kRes == kRuntime ? t.res != nullptr : kRes != 0;
  const int act = kAct == kRuntime ? t.act : kAct;
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    T* orow = t.out + r * t.plane;
    const T* rrow = res ? t.res + r * t.plane : nullptr;
    double* ls = stats ? t.lanes + r * 2 * kStatLanes : nullptr;
    const R sc = V::set1(scale ? t.scale[r] : T(1));
    const R sh = V::set1(shift ? t.shift[r] : T(0));
    const R sl = V::set1(act == kActPrelu ? t.slope[r] : T(0));
    typename V::S vs = V::stats_zero(), vq = V::stats_zero();
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      // A short vector (the end of an output row narrower than a multiple of L) keeps its
      // first len[v] lanes: masked residual load and store, other lanes out of the statistics
      // (they were computed from neighbouring input values).
      const int64_t d = t.dst[v];
      const int n = t.len[v];
      const bool full = n == L;
      R y = acc[r][v];
      if (stats) V::stats_add(vs, vq, full ? y : V::keep_n(y, n));
      if (scale) {
        y = shift ? V::fma(y, sc, sh) : V::mul(y, sc);
      } else if (shift) {
        y = V::add(y, sh);
      }
      if (res) y = V::add(y, full ? V::load(rrow + d) : V::load_n(rrow + d, n));
      if (act == kActRelu) {
        y = V::relu(y);
      } else if (act == kActPrelu) {
        y = V::prelu(y, sl);
      }
      if (full && t.stream_out) {
        V::store_stream(orow + d, y);
      } else if (full) {
        V::store(orow + d, y);
      } else {
        V::store_n(orow + d, y, n);
      }
    }
    if (stats) V::stats_flush(ls, ls + kStatLanes, vs, vq);
  }
}

// Stores a tile's accumulators through the epilogue kind t.epi (V as in store_tile).
template <typename T, int MR, int NV, typename V = Vec<T>>
FSN_TARGET FSN_INLINE void store_epilogue(const TileArgs<T>& t, const typename V::R (&acc)[MR][NV]) {
  switch (t.epi) {
    case kEpiPlain: return store_tile<T, MR, NV, 0, 0, 0, kActNone, V>(t, acc);
    case kEpiStats: return store_tile<T, MR, NV, 1, 0, 0, kActNone, V>(t, acc);
    case kEpiAffine: return store_tile<T, MR, NV, 0, 1, 0, kActNone, V>(t, acc);
    case kEpiAffineRelu: return store_tile<T, MR, NV, 0, 1, 0, kActRelu, V>(t, acc);
    case kEpiAffinePrelu: return store_tile<T, MR, NV, 0, 1, 0, kActPrelu, V>(t, acc);
    case kEpiAffineResRelu: return store_tile<T, MR, NV, 0, 1, 1, kActRelu, V>(t, acc);
    case kEpiAffineResPrelu: return store_tile<T, MR, NV, 0, 1, 1, kActPrelu, V>(t, acc);
    default: return store_tile<T, MR, NV, kRuntime, kRuntime, kRuntime, kRuntime, V>(t, acc);
  }
}

// Whether the instruction set computes tiles as row pairs (its Vec defines the pair register
// P, kTileVecs and the pair operations: conv_avx512.cpp).
template <typename V, typename = void>
struct RowPairs : std::false_type {};
template <typename V>
struct RowPairs<V, std::void_t<decltype(V::kTileVecs)>> : std::true_type {};

// Whether Vec has the whole-plane copy of ConvJob::plane_s2_16 (conv_avx512.cpp).
template <typename V, typename = void>
struct HasPlaneCopy : std::false_type {};
template <typename V>
struct HasPlaneCopy<V, std::void_t<decltype(&V::copy_plane_s2_16)>> : std::true_type {};

// Plan vectors per register tile.
template <typename T>
constexpr int tile_vecs() {
  if constexpr (RowPairs<Vec<T>>::value) {
    return Vec<T>::kTileVecs;
  } else {
    return Blocking<T>::kVecs;
  }
}

// Prefetches for the pixel blocks two ahead of this one (their lines arrive while this tile
// computes): the residual the epilogue will read (1.15-1.25x on 32x32 Track-1 calls with a
// residual); for an input read in place from memory (1x1 convs, memory-bound) its planes and
// the output lines as well (1.2x on Track-1 1x1 calls; for 3x3 convs, whose input sits in the
// scratch, prefetching the output added nothing).
template <typename T, int MR, int NV>
FSN_TARGET FSN_INLINE void prefetch_ahead(const TileArgs<T>& t, const T* b0) {
  constexpr int64_t kAhead = 2 * NV * Vec<T>::L;
  const int64_t next = t.dst[0] + kAhead;
  if (t.stream) {
    for (int64_t k = 0; k < t.depth; ++k) prefetch_lines<false>(b0 + t.tap[k] + kAhead);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) prefetch_lines<true>(t.out + r * t.plane + next);
  }
  if (t.res != nullptr) {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) prefetch_lines<false>(t.res + r * t.plane + next);
  }
}

// Whether the tile's vectors pair up into runs of 2 L contiguous pixels, in the source and in
// the output (full vectors of one output row: planes at least 2 L wide).
template <typename T, int NV>
FSN_TARGET FSN_INLINE bool contiguous_pairs(const TileArgs<T>& t) {
  if constexpr (NV % 2 != 0) {
    return false;
  } else {
    constexpr int L = Vec<T>::L;
    bool ok = true;
#pragma GCC unroll 16
    for (int v = 0; v < NV; v += 2) {
      ok = ok && t.b[v + 1] == t.b[v] + L && t.dst[v + 1] == t.dst[v] + L && t.len[v] == L && t.len[v + 1] == L;
    }
    return ok;
  }
}

// acc[i][j] = z for every i, j.
template <typename R, int A, int B>
FSN_TARGET FSN_INLINE void fill(R (&acc)[A][B], R z) {
#pragma GCC unroll 16
  for (int i = 0; i < A; ++i) {
#pragma GCC unroll 16
    for (int j = 0; j < B; ++j) acc[i][j] = z;
  }
}

// The tile as contiguous runs (instruction sets with RowPairs, tiles whose vectors pair into
// runs of 2 L pixels: contiguous_pairs): accumulator [r][z] holds run z (vectors 2z, 2z + 1)
// of row r; the weights are broadcast whole, no shuffles (1.10-1.17x the row-pair tile on 16-
// and 32-wide planes), and the epilogue works on whole runs. Each output is the same chain of
// fused multiply-adds as in tile, and the epilogue does the same operations per element.
template <typename T, int MR, int NV>
FSN_TARGET FSN_INLINE void tile_runs(const TileArgs<T>& t) {
  using V = Vec<T>;
  using P = typename V::P;
  constexpr int NZ = NV / 2;
  P acc[MR][NZ];
  fill(acc, V::pair_zero());
  const T* __restrict a = t.a;
  const int64_t* __restrict tap = t.tap;
  prefetch_ahead<T, MR, NV>(t, t.b[0]);
  for (int64_t k = 0; k < t.depth; ++k) {
    const int64_t o = tap[k];
    P w[MR];
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) w[r] = V::wide_bcast(a + r);
#pragma GCC unroll 16
    for (int z = 0; z < NZ; ++z) {
      const P bv = V::wide_load(t.b[2 * z] + o);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) acc[r][z] = V::pair_fma(w[r], bv, acc[r][z]);
    }
    a += MR;
  }
  // the epilogue on whole runs: run z starts where vector 2z does and has 2 L lanes
  int64_t dst[NZ];
  int32_t len[NZ];
#pragma GCC unroll 16
  for (int z = 0; z < NZ; ++z) {
    dst[z] = t.dst[2 * z];
    len[z] = 2 * V::L;
  }
  TileArgs<T> runs = t;
  runs.dst = dst;
  runs.len = len;
  store_epilogue<T, MR, NZ, typename V::Wide>(runs, acc);
}

// The row-pair tile (instruction sets with RowPairs, any tile): accumulator [p][v] holds
// vector v of rows 2p and 2p + 1, the pair weights made by two permutes per step. Each output
// is the same chain of fused multiply-adds as in tile.
template <typename T, int MR, int NV>
FSN_TARGET FSN_INLINE void tile_row_pairs(const TileArgs<T>& t) {
  using V = Vec<T>;
  using P = typename V::P;
  constexpr int MP = (MR + 1) / 2;
  P acc[MP][NV];
  fill(acc, V::pair_zero());
  const T* __restrict a = t.a;
  const int64_t* __restrict tap = t.tap;
  prefetch_ahead<T, MR, NV>(t, t.b[0]);
  for (int64_t k = 0; k < t.depth; ++k) {
    const int64_t o = tap[k];
    P w[MP];
    V::template pair_weights<MP>(a, w);
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      const P bv = V::dup_load(t.b[v] + o);
#pragma GCC unroll 16
      for (int p = 0; p < MP; ++p) acc[p][v] = V::pair_fma(w[p], bv, acc[p][v]);
    }
    a += MR;
  }
  typename V::R out[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) out[r][v] = (r & 1) ? V::hi(acc[r / 2][v]) : V::lo(acc[r / 2][v]);
  }
  store_epilogue<T, MR, NV>(t, out);
}

// One register tile: MR rows x NV vectors. Accumulates sum_k a[k][r] * src_v[tap[k]] in the
// order k = 0, 1, ..., depth - 1 (one fused multiply-add per term where the ISA has FMA),
// then applies the epilogue, updates the statistics and stores.
template <typename T, int MR, int NV>
FSN_TARGET void tile(const TileArgs<T>& t) {
  using V = Vec<T>;
  if constexpr (RowPairs<V>::value) {
    if constexpr (NV % 2 == 0) {
      if (contiguous_pairs<T, NV>(t)) return tile_runs<T, MR, NV>(t);
    }
    tile_row_pairs<T, MR, NV>(t);
  } else {
    using R = typename V::R;
    R acc[MR][NV];
    fill(acc, V::zero());
    const T* __restrict a = t.a;
    const int64_t* __restrict tap = t.tap;
    const T* b[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) b[v] = t.b[v];
    prefetch_ahead<T, MR, NV>(t, b[0]);
    const int64_t depth = t.depth;
    if constexpr (MR * NV + NV + 1 <= 16) {
      // NV input vectors live across the MR rows; one broadcast weight at a time
      for (int64_t k = 0; k < depth; ++k) {
        const int64_t o = tap[k];
        R bv[NV];
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) bv[v] = V::load(b[v] + o);
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) {
          const R av = V::bcast(a + r);
#pragma GCC unroll 16
          for (int v = 0; v < NV; ++v) acc[r][v] = V::fma(av, bv[v], acc[r][v]);
        }
        a += MR;
      }
    } else {
      // (too many registers for the order above) MR broadcast weights live across the NV
      // vectors; one input vector at a time. Same products, same order per accumulator.
      for (int64_t k = 0; k < depth; ++k) {
        const int64_t o = tap[k];
        R av[MR];
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) av[r] = V::bcast(a + r);
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) {
          const R bv = V::load(b[v] + o);
#pragma GCC unroll 16
          for (int r = 0; r < MR; ++r) acc[r][v] = V::fma(av[r], bv, acc[r][v]);
        }
        a += MR;
      }
    }
    store_epilogue<T, MR, NV>(t, acc);
  }
}

template <typename T>
using TileFn = void (*)(const TileArgs<T>&);

template <typename T, int MR, int... Vs>
constexpr std::array<TileFn<T>, sizeof...(Vs)> tile_row(std::integer_sequence<int, Vs...>) {
  return {{&tile<T, MR, Vs + 1>...}};
}

template <typename T, int NV, int... Rs>
constexpr std::array<std::array<TileFn<T>, NV>, sizeof...(Rs)> tile_table(std::integer_sequence<int, Rs...>) {
  return {{tile_row<T, Rs + 1>(std::make_integer_sequence<int, NV>())...}};
}

// Rows of the input the scratch copy prefetches ahead of the one it copies.
constexpr int64_t kPrefetchRows = 32;

// Position (image, segment, channel, copy row) of the source row the scratch copy prefetches
// next. It runs through the copy rows of the segment's channels in copy order, then on into
// the next segment (the next copy of this image) and into the first segment of the next image.
struct PrefetchCursor {
  int64_t n, seg, c, ri;
};

template <typename T>
FSN_INLINE void prefetch_next(const ConvJob<T>& j, int64_t n_end, PrefetchCursor& p) {
  if (p.n >= n_end) return;
  const Segment& seg = j.segments[p.seg];
  const char* row = reinterpret_cast<const char*>(j.x + p.n * j.x_sN + (seg.channel0 + p.c) * j.x_sC +
                                                  (j.copy_rows[p.ri] - j.pad) * j.x_sH);
  const int64_t bytes = j.W * static_cast<int64_t>(sizeof(T));
  for (int64_t b = 0; b < bytes; b += 64) FSN_PREFETCH(row + b);
  if (++p.ri < j.num_copy_rows) return;
  p.ri = 0;
  if (++p.c < seg.width) return;
  p.c = 0;
  if (++p.seg < j.num_segments) return;
  p.seg = 0;
  ++p.n;
}

// Copies the channels segment si reads, of image n, into the padded, phase-split scratch.
//
// Only the positions that hold input values are written: the scratch is zeroed once when it
// is allocated, and the padding positions are the same for every image and segment of a
// call, so they stay zero. Rows and stride phases that no tap reads (kh < stride, or
// kw < stride, as in a strided 1x1 conv) are skipped. Where rows are skipped (they defeat the
// hardware prefetcher) or the call has several segments (each copy jumps to other channels),
// the source rows are prefetched kPrefetchRows copy steps ahead, continuing into the next
// segment or image so that its first rows arrive while this one is computed; the consecutive
// rows of one segment are a stream the hardware follows (prefetching them too was 1.0x-1.06x
// slower on one-candidate Track-1 3x3 calls; with 32 packed candidates at 32x32 the prefetch
// into the next segment gained 1.03x-1.05x and stays: ConvJob::copy_prefetch). Stride 2 with
// rows of unit stride deinterleaves each row once where the two phases take adjacent columns
// (ConvJob::deinterleave_even: 1.02x-1.05x), and a 16x16 plane of a 3x3 stride-2 layer on
// AVX-512 has a whole-plane copy (ConvJob::plane_s2_16: 1.08x on 16x16 32->64 at batch 256).
template <typename T>
FSN_TARGET void build_scratch(const ConvJob<T>& j, int64_t n, int64_t si, T* __restrict s) {
  const int64_t W = j.W, pad = j.pad, row_len = j.row_len, sW = j.x_sW, sH = j.x_sH;
  const int64_t c0 = j.segments[si].channel0, width = j.segments[si].width;
  if constexpr (HasPlaneCopy<Vec<T>>::value) {
    if (j.plane_s2_16) {
      for (int64_t c = 0; c < width; ++c) {
        Vec<T>::copy_plane_s2_16(s + c * j.scratch_plane, j.x + n * j.x_sN + (c0 + c) * j.x_sC, sH);
      }
      return;
    }
  }
  const bool prefetch = j.copy_prefetch;
  const int64_t n_end = std::min(n + 2, j.N);
  PrefetchCursor pf{n, si, 0, 0};
  if (prefetch) {
    for (int64_t i = 0; i < kPrefetchRows; ++i) prefetch_next(j, n_end, pf);
  }
  for (int64_t c = 0; c < width; ++c) {
    const T* src = j.x + n * j.x_sN + (c0 + c) * j.x_sC;
    T* plane = s + c * j.scratch_plane;
    for (int64_t ri = 0; ri < j.num_copy_rows; ++ri) {
      if (prefetch) prefetch_next(j, n_end, pf);
      const int64_t r = j.copy_rows[ri];
      const T* __restrict srow = src + (r - pad) * sH;
      T* __restrict row = plane + r * row_len;
      if (j.stride == 1) {
        if (sW == 1) {
          Vec<T>::copy(row + pad, srow, W);
        } else {
          for (int64_t iw = 0; iw < W; ++iw) row[pad + iw] = srow[iw * sW];
        }
        continue;
      }
      if (j.deinterleave_even >= 0) {
        const PhaseRun& ev = j.phase_runs[j.deinterleave_even];
        const PhaseRun& od = j.phase_runs[j.deinterleave_even ^ 1];
        Vec<T>::copy_deinterleave(row + ev.dst, row + od.dst, srow + ev.src, ev.count);
        continue;
      }
      for (int64_t p = 0; p < j.num_phase_runs; ++p) {
        const PhaseRun& run = j.phase_runs[p];
        T* __restrict dst = row + run.dst;
        const T* __restrict from = srow + run.src * sW;
        const int64_t count = run.count;
        if (sW == 1 && j.stride == 2) {
          Vec<T>::copy_even(dst, from, count);
        } else {
          const int64_t stride_w = j.stride * sW;
          for (int64_t t = 0; t < count; ++t) dst[t] = from[t * stride_w];
        }
      }
    }
  }
}

template <typename T>
FSN_TARGET void run_items_impl(const ConvJob<T>& j, int64_t begin, int64_t end, T* scratch, double* lanes) {
  constexpr int NV = tile_vecs<T>();
  static_assert(NV <= kMaxTileVecs, "TileArgs holds at most kMaxTileVecs input vectors");
  static constexpr auto table = tile_table<T, NV>(std::make_integer_sequence<int, Blocking<T>::kRows>());
  const bool stats = j.part_sum != nullptr;
  const int64_t plane = j.out_plane;

  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / j.block_chunks;
    const int64_t chunk = item - n * j.block_chunks;
    const int64_t blo = chunk * j.blocks_per_chunk;
    const int64_t bhi = std::min(j.num_blocks, blo + j.blocks_per_chunk);
    if (blo >= bhi) continue;
    const int64_t row_lo = j.blocks[blo].row0;
    const int64_t row_hi = j.blocks[bhi - 1].row0 + j.blocks[bhi - 1].rows;
    if (stats) std::fill(lanes, lanes + (row_hi - row_lo) * 2 * kStatLanes, 0.0);
    T* out_img = j.out + n * j.M * plane;
    const T* res_img = j.residual != nullptr ? j.residual + n * j.M * plane : nullptr;

    for (int64_t si = 0; si < j.num_segments; ++si) {
      const Segment& seg = j.segments[si];
      const int64_t b0 = std::max(seg.block_begin, blo);
      const int64_t b1 = std::min(seg.block_end, bhi);
      if (b0 >= b1) continue;
      const T* src;
      if (j.direct) {
        src = j.x + n * j.x_sN + seg.channel0 * j.x_sC;
      } else {
        build_scratch(j, n, si, scratch);
        src = scratch;
      }
      TileArgs<T> t;
      t.plane = plane;
      t.act = j.activation;
      t.epi = epilogue_kind(stats, j.scale != nullptr, j.shift != nullptr, j.residual != nullptr, j.activation);
      t.stream = j.direct;
      t.stream_out = j.stream_out;
      // Blocks are taken in groups whose packed weights stay in the L2 cache while every
      // pixel block of the image passes by; within a group, each pixel block's input stays
      // in L1 across the group's blocks.
      for (int64_t g0 = b0; g0 < b1;) {
        int64_t g1 = g0 + 1;
        int64_t values = j.blocks[g0].depth * j.blocks[g0].rows;
        while (g1 < b1 && values + j.blocks[g1].depth * j.blocks[g1].rows <= j.panel_values) {
          values += j.blocks[g1].depth * j.blocks[g1].rows;
          ++g1;
        }
        for (int64_t pv = 0; pv < j.num_vecs; pv += NV) {
          const int nv = static_cast<int>(std::min<int64_t>(NV, j.num_vecs - pv));
          for (int v = 0; v < nv; ++v) t.b[v] = src + j.vec_src[pv + v];
          t.dst = j.vec_dst + pv;
          t.len = j.vec_len + pv;
          for (int64_t bi = g0; bi < g1; ++bi) {
            const Block& blk = j.blocks[bi];
            t.a = j.a + blk.a_off;
            t.tap = j.tap_off + blk.tap0;
            t.depth = blk.depth;
            t.out = out_img + blk.row0 * plane;
            t.res = res_img != nullptr ? res_img + blk.row0 * plane : nullptr;
            t.scale = j.scale != nullptr ? j.scale + blk.row0 : nullptr;
            t.shift = j.shift != nullptr ? j.shift + blk.row0 : nullptr;
            t.slope = j.slope != nullptr ? j.slope + blk.row0 : nullptr;
            t.lanes = stats ? lanes + (blk.row0 - row_lo) * 2 * kStatLanes : nullptr;
            table[blk.rows - 1][nv - 1](t);
          }
        }
        g0 = g1;
      }
    }

    if (stats) {  // the rows of the item's blocks (other rows of the span may be another kernel's)
      for (int64_t bi = blo; bi < bhi; ++bi) {
        for (int64_t row = j.blocks[bi].row0; row < j.blocks[bi].row0 + j.blocks[bi].rows; ++row) {
          const double* ls = lanes + (row - row_lo) * 2 * kStatLanes;
          double s = 0.0, q = 0.0;
          for (int l = 0; l < kStatLanes; ++l) {
            s += ls[l];
            q += ls[kStatLanes + l];
          }
          j.part_sum[n * j.M + row] = s;
          j.part_sq[n * j.M + row] = q;
        }
      }
    }
  }
  if (j.stream_out) std::atomic_thread_fence(std::memory_order_seq_cst);  // order the streaming stores
}

}  // namespace
}  // namespace conv
}  // namespace fastsupernet
