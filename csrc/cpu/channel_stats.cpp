// CPU kernel of fastsupernet::channel_stats: per-channel sum and sum of squares of an
// (N, C, H, W) tensor, accumulated in float64.
//
// Layouts. A contiguous NCHW input is read as N*C planes of H*W contiguous values; a
// channels_last input as N*H*W rows of C contiguous values. Any other stride pattern is
// first copied into the layout torch suggests for it.
//
// Work split. The values of every channel are cut into chunks of L values, L a function of
// the shape alone (never of the thread count); a work item reads one chunk of a group of
// channels, in memory order, and writes float64 partials per (chunk, channel); the partials
// of a channel are then added in chunk order. The result is therefore bitwise identical
// whatever the number of OpenMP threads.
//
// Error. Every value is widened to float64 before it is added. A chunk adds its L values over
// 16 accumulator lanes, then the n / L chunk partials are added in order, so for n values per
// channel the absolute error of the sum is below about (L / 16 + n / L) * 2^-53 * sum|x|
// (likewise for the squares), with 32 <= L <= 32768: for n = 5e6 at most ~2e-11 relative to
// sum|x|, and typically far less; nowhere near float32 resolution (6e-8).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace fastsupernet {
namespace {

// Values one work item reads (a fixed constant: see the header).
constexpr int64_t kItemValues = 32768;
// Fewest values of one channel a work item adds in the NCHW path.
constexpr int64_t kMinRun = 256;
// Channels handled by one work item in the channels_last path (its accumulators stay in L1).
constexpr int64_t kChannelTile = 1024;
// Below this many input values the whole op runs on one thread.
constexpr int64_t kParallelMinElements = 1 << 16;

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The inner loops must be inlined into each ISA version of the work-item functions below.
#if defined(__GNUC__)
#define FASTSUPERNET_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FASTSUPERNET_ALWAYS_INLINE inline
#endif

template <typename scalar_t>
FASTSUPERNET_ALWAYS_INLINE double as_double(scalar_t v) {
  if constexpr (std::is_same_v<scalar_t, double> || std::is_same_v<scalar_t, float>) {
    return static_cast<double>(v);
  } else {  // c10::Half, c10::BFloat16: exact through float
    return static_cast<double>(static_cast<float>(v));
  }
}

inline int num_threads_for(int64_t numel) {
  return numel >= kParallelMinElements ? std::max(1, at::get_num_threads()) : 1;
}

// Adds the per-chunk partials of each channel in chunk order.
// partial_* have shape (num_chunks, C), row-major.
void reduce_partials(const std::vector<double>& partial_sum, const std::vector<double>& partial_sq,
                     int64_t num_chunks, int64_t C, double* __restrict sum,
                     double* __restrict sumsq) {
  for (int64_t c = 0; c < C; ++c) {
    sum[c] = 0.0;
    sumsq[c] = 0.0;
  }
  for (int64_t k = 0; k < num_chunks; ++k) {
    const double* ps = partial_sum.data() + k * C;
    const double* pq = partial_sq.data() + k * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      sum[c] += ps[c];
      sumsq[c] += pq[c];
    }
  }
}

// s += sum(p[0:len]), q += sum(p[0:len]^2). kLanes independent float64 accumulators, so that
// the adds are not one serial dependency chain; the compiler maps the lanes onto SIMD registers.
template <typename scalar_t>
FASTSUPERNET_ALWAYS_INLINE void add_run(const scalar_t* __restrict p, int64_t len, double& s, double& q) {
  constexpr int kLanes = 16;
  double lane_s[kLanes] = {};
  double lane_q[kLanes] = {};
  int64_t t = 0;
  for (; t + kLanes <= len; t += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      const double v = as_double(p[t + l]);
      lane_s[l] += v;
      lane_q[l] += v * v;
    }
  }
  double rs = 0.0, rq = 0.0;
  for (; t < len; ++t) {
    const double v = as_double(p[t]);
    rs += v;
    rq += v * v;
  }
  for (int l = 0; l < kLanes; ++l) {
    rs += lane_s[l];
    rq += lane_q[l];
  }
  s += rs;
  q += rq;
}

// One NCHW work item: adds values j in [j0, j1) of channels [c0, c1) into s[c], q[c].
template <typename scalar_t>
FASTSUPERNET_ALWAYS_INLINE void item_planes_impl(const scalar_t* __restrict x, int64_t C, int64_t HW, int64_t j0,
                             int64_t j1, int64_t c0, int64_t c1, double* __restrict s,
                             double* __restrict q) {
  for (int64_t j = j0; j < j1;) {
    const int64_t n = j / HW;
    const int64_t i = j - n * HW;
    const int64_t len = std::min(HW - i, j1 - j);
    for (int64_t c = c0; c < c1; ++c) {
      add_run(x + (n * C + c) * HW + i, len, s[c], q[c]);
    }
    j += len;
  }
}

// One channels_last work item: adds rows [r0, r1) of channels [c0, c0 + width) into
// s[0:width], q[0:width].
template <typename scalar_t>
FASTSUPERNET_ALWAYS_INLINE void item_rows_impl(const scalar_t* __restrict x, int64_t C, int64_t r0, int64_t r1,
                           int64_t c0, int64_t width, double* __restrict s, double* __restrict q) {
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* __restrict p = x + r * C + c0;
#pragma omp simd
    for (int64_t c = 0; c < width; ++c) {
      const double v = as_double(p[c]);
      s[c] += v;
      q[c] += v * v;
    }
  }
}

// The work-item loops are compiled twice on x86-64, for the baseline ISA and for AVX2, and
// the loader picks the version the CPU runs (GCC/Clang function multiversioning): the default
// build stays portable and still uses 256-bit vectors where they exist. Each lane adds its
// values in the same order in both versions (no FMA contraction, no reassociation), so the
// results are bitwise identical across the two.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__has_attribute) && !defined(FASTSUPERNET_NO_MULTIVERSIONING)
#if __has_attribute(target_clones)
#define FASTSUPERNET_CLONES __attribute__((target_clones("avx2", "default")))
#endif
#endif
#ifndef FASTSUPERNET_CLONES
#define FASTSUPERNET_CLONES
#endif

#define FASTSUPERNET_ITEM_KERNELS(T)                                                            \
  FASTSUPERNET_CLONES void item_planes(const T* x, int64_t C, int64_t HW, int64_t j0,          \
                                       int64_t j1, int64_t c0, int64_t c1, double* s,         \
                                       double* q) {                                            \
    item_planes_impl<T>(x, C, HW, j0, j1, c0, c1, s, q);                                       \
  }                                                                                            \
  FASTSUPERNET_CLONES void item_rows(const T* x, int64_t C, int64_t r0, int64_t r1, int64_t c0, \
                                     int64_t width, double* s, double* q) {                   \
    item_rows_impl<T>(x, C, r0, r1, c0, width, s, q);                                          \
  }

FASTSUPERNET_ITEM_KERNELS(float)
FASTSUPERNET_ITEM_KERNELS(double)
FASTSUPERNET_ITEM_KERNELS(c10::Half)
FASTSUPERNET_ITEM_KERNELS(c10::BFloat16)
#undef FASTSUPERNET_ITEM_KERNELS

// Contiguous NCHW: channel c of image n is the plane x[(n * C + c) * HW : ... + HW].
// Per channel the values are numbered j = n * HW + i, j in [0, N * HW), and cut into chunks
// of L values; work item (chunk k, channel group g) adds chunk k of channels
// [g * G, (g + 1) * G) into partials (k, c). L and G are chosen so that an item reads about
// kItemValues values of contiguous memory (whole images when planes are small), in memory
// order, and so that L >= kMinRun (bounding the size of the partials).
template <typename scalar_t>
void stats_planes(const scalar_t* __restrict x, int64_t N, int64_t C, int64_t HW,
                  double* __restrict sum, double* __restrict sumsq) {
  const int64_t per_channel = N * HW;
  int64_t L, G;
  if (HW >= kItemValues) {
    L = kItemValues;  // part of one plane
    G = 1;
  } else {
    const int64_t images = std::clamp<int64_t>(
        std::max(div_up(kMinRun, HW), kItemValues / (C * HW)), 1, N);
    L = images * HW;
    G = std::clamp<int64_t>(kItemValues / L, 1, C);
  }
  const int64_t num_chunks = div_up(per_channel, L);
  const int64_t num_groups = div_up(C, G);
  const int64_t items = num_chunks * num_groups;
  std::vector<double> partial_sum(static_cast<size_t>(num_chunks * C), 0.0);
  std::vector<double> partial_sq(static_cast<size_t>(num_chunks * C), 0.0);
  const int threads = num_threads_for(per_channel * C);

#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t k = item / num_groups;
    const int64_t c0 = (item - k * num_groups) * G;
    const int64_t c1 = std::min(C, c0 + G);
    const int64_t end = std::min(per_channel, (k + 1) * L);
    item_planes(x, C, HW, k * L, end, c0, c1, partial_sum.data() + k * C, partial_sq.data() + k * C);
  }
  reduce_partials(partial_sum, partial_sq, num_chunks, C, sum, sumsq);
}

// channels_last: row r = n * HW + i holds the C channels x[r * C : r * C + C]. Work item
// (chunk k, tile t) adds rows [k * rows_per_chunk, ...) for channels [t * tile, ...).
template <typename scalar_t>
void stats_rows(const scalar_t* __restrict x, int64_t rows, int64_t C, double* __restrict sum,
                double* __restrict sumsq) {
  const int64_t tile = std::min(C, kChannelTile);
  const int64_t num_tiles = div_up(C, tile);
  const int64_t rows_per_chunk = std::max<int64_t>(1, kItemValues / tile);
  const int64_t num_chunks = div_up(rows, rows_per_chunk);
  const int64_t items = num_chunks * num_tiles;
  std::vector<double> partial_sum(static_cast<size_t>(num_chunks * C), 0.0);
  std::vector<double> partial_sq(static_cast<size_t>(num_chunks * C), 0.0);
  const int threads = num_threads_for(rows * C);

#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t k = item / num_tiles;
    const int64_t c0 = (item - k * num_tiles) * tile;
    const int64_t width = std::min(tile, C - c0);
    const int64_t row_end = std::min(rows, (k + 1) * rows_per_chunk);
    item_rows(x, C, k * rows_per_chunk, row_end, c0, width, partial_sum.data() + k * C + c0,
              partial_sq.data() + k * C + c0);
  }
  reduce_partials(partial_sum, partial_sq, num_chunks, C, sum, sumsq);
}

std::tuple<at::Tensor, at::Tensor> channel_stats_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "fastsupernet::channel_stats expects an (N, C, H, W) tensor, got ",
              x.dim(), " dimensions");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "fastsupernet::channel_stats expects a floating-point tensor, got ", x.scalar_type());
  TORCH_INTERNAL_ASSERT(x.device().is_cpu());

  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  at::Tensor sum = at::zeros({C}, x.options().dtype(at::kDouble));
  at::Tensor sumsq = at::zeros({C}, x.options().dtype(at::kDouble));
  if (C == 0 || N * HW == 0) {
    return {sum, sumsq};
  }

  // Bring odd strides into the layout torch suggests; then the tensor is contiguous either as
  // NCHW or as channels_last. With C == 1 or HW == 1 the two layouts address the same memory,
  // and the loop that reads long contiguous runs is taken.
  at::Tensor xc = x;
  if (!x.is_contiguous() && !x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    xc = x.contiguous(x.suggest_memory_format());
  }
  bool rows_layout;
  if (C == 1) {
    rows_layout = false;
  } else if (HW == 1) {
    rows_layout = true;
  } else {
    rows_layout = !xc.is_contiguous();
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "channel_stats_cpu", [&] {
    const scalar_t* data = xc.const_data_ptr<scalar_t>();
    double* s = sum.mutable_data_ptr<double>();
    double* q = sumsq.mutable_data_ptr<double>();
    if (rows_layout) {
      stats_rows<scalar_t>(data, N * HW, C, s, q);
    } else {
      stats_planes<scalar_t>(data, N, C, HW, s, q);
    }
  });
  return {sum, sumsq};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastsupernet, CPU, m) { m.impl("channel_stats", &channel_stats_cpu); }

}  // namespace fastsupernet
