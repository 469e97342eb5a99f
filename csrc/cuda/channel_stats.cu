// CUDA kernels of channel_stats: per-channel sum and sum of squares in float64.
// Needs only the CUDA runtime (see kernels.h).
//
// Work split. Each channel's M = N * H * W values are cut into S chunks, S a function of the
// shape alone. A block reduces one (channel, chunk) pair (planes layout) or one (32-channel
// tile, chunk of rows) pair (rows layout) into float64 partials; when S > 1 a second kernel
// adds a channel's S partials in chunk order. No atomics, so results are reproducible.
//
// Error. Every value is widened to float64 before it is added; each thread adds at most
// ceil(M / (S * threads)) values, then a tree over the block and S partials in order:
// an absolute error below (M / (S * threads) + log2(threads) + S) * 2^-53 * sum|x|.

#include "kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

namespace fastsupernet {
namespace cuda {
namespace {

constexpr int kThreads = 256;           // planes kernel: threads per block
constexpr int kTileC = 32;              // rows kernel: channels per block (one warp wide)
constexpr int kTileR = 8;               // rows kernel: rows read at once (warps per block)
constexpr int64_t kTargetBlocks = 1024; // enough blocks to fill a large GPU
constexpr int64_t kMinChunk = 4096;     // fewest values per channel a block is given
constexpr int kMaxChunks = 1024;

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
__device__ __forceinline__ double load_double(const T* p) {
  return static_cast<double>(*p);
}
template <>
__device__ __forceinline__ double load_double<__half>(const __half* p) {
  return static_cast<double>(__half2float(*p));
}
template <>
__device__ __forceinline__ double load_double<__nv_bfloat16>(const __nv_bfloat16* p) {
  return static_cast<double>(__bfloat162float(*p));
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of (s, q) over a block of kThreads threads; the result is valid in thread 0.
__device__ __forceinline__ void block_sum(double& s, double& q) {
  __shared__ double shared_s[kThreads / 32];
  __shared__ double shared_q[kThreads / 32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  s = warp_sum(s);
  q = warp_sum(q);
  if (lane == 0) {
    shared_s[warp] = s;
    shared_q[warp] = q;
  }
  __syncthreads();
  if (warp == 0) {
    s = lane < kThreads / 32 ? shared_s[lane] : 0.0;
    q = lane < kThreads / 32 ? shared_q[lane] : 0.0;
    s = warp_sum(s);
    q = warp_sum(q);
  }
}

// Planes layout. Block (c, k) adds values j in [k * chunk, (k + 1) * chunk) of channel c,
// j = n * hw + i at x[(n * C + c) * hw + i]; writes out_s[k * C + c], out_q[k * C + c].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    stats_planes_kernel(const T* __restrict__ x, int64_t C, int64_t hw, int64_t M, int64_t chunk,
                        double* __restrict__ out_s, double* __restrict__ out_q) {
  const int64_t c = blockIdx.x;
  const int64_t k = blockIdx.y;
  const int64_t j0 = k * chunk;
  const int64_t j1 = min(M, j0 + chunk);
  double s = 0.0, q = 0.0;
  if (hw >= kThreads) {
    // Whole-plane segments: threads stride along contiguous memory.
    for (int64_t j = j0; j < j1;) {
      const int64_t n = j / hw;
      const int64_t i0 = j - n * hw;
      const int64_t len = min(hw - i0, j1 - j);
      const T* p = x + (n * C + c) * hw + i0;
      for (int64_t t = threadIdx.x; t < len; t += kThreads) {
        const double v = load_double(p + t);
        s += v;
        q += v * v;
      }
      j += len;
    }
  } else {
    // Small planes: index values directly.
    for (int64_t j = j0 + threadIdx.x; j < j1; j += kThreads) {
      const int64_t n = j / hw;
      const double v = load_double(x + (n * C + c) * hw + (j - n * hw));
      s += v;
      q += v * v;
    }
  }
  block_sum(s, q);
  if (threadIdx.x == 0) {
    out_s[k * C + c] = s;
    out_q[k * C + c] = q;
  }
}

// Rows layout. Block (tile, k), threads (kTileC, kTileR): thread (tx, ty) adds channel
// tile * kTileC + tx over rows r = k * chunk + ty, ... + kTileR, ...; the kTileR partials
// of a channel are then added through shared memory.
template <typename T>
__global__ void __launch_bounds__(kTileC* kTileR)
    stats_rows_kernel(const T* __restrict__ x, int64_t C, int64_t R, int64_t chunk,
                      double* __restrict__ out_s, double* __restrict__ out_q) {
  __shared__ double shared_s[kTileR][kTileC];
  __shared__ double shared_q[kTileR][kTileC];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kTileC + tx;
  const int64_t k = blockIdx.y;
  const int64_t r1 = min(R, (k + 1) * chunk);
  double s = 0.0, q = 0.0;
  if (c < C) {
    for (int64_t r = k * chunk + ty; r < r1; r += kTileR) {
      const double v = load_double(x + r * C + c);
      s += v;
      q += v * v;
    }
  }
  shared_s[ty][tx] = s;
  shared_q[ty][tx] = q;
  __syncthreads();
  if (ty == 0 && c < C) {
#pragma unroll
    for (int t = 1; t < kTileR; ++t) {
      s += shared_s[t][tx];
      q += shared_q[t][tx];
    }
    out_s[k * C + c] = s;
    out_q[k * C + c] = q;
  }
}

// sum[c] = sum over k of partial_s[k * C + c], in order of k (and the same for squares).
__global__ void add_chunks_kernel(const double* __restrict__ partial_s,
                                  const double* __restrict__ partial_q, int64_t C, int64_t S,
                                  double* __restrict__ sum, double* __restrict__ sumsq) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double s = 0.0, q = 0.0;
  for (int64_t k = 0; k < S; ++k) {
    s += partial_s[k * C + c];
    q += partial_q[k * C + c];
  }
  sum[c] = s;
  sumsq[c] = q;
}

struct Plan {
  int64_t chunks;  // S
  int64_t chunk;   // planes: values per chunk; rows: rows per chunk
};

Plan make_plan(int64_t n, int64_t c, int64_t hw, Layout layout) {
  const int64_t m = n * hw;
  // Blocks across the channel axis without splitting; split M to reach kTargetBlocks.
  const int64_t channel_blocks = layout == Layout::kPlanes ? c : div_up(c, kTileC);
  const int64_t min_rows = layout == Layout::kPlanes ? kMinChunk : std::max<int64_t>(kTileR, kMinChunk / kTileC);
  int64_t s = div_up(kTargetBlocks, std::max<int64_t>(channel_blocks, 1));
  s = std::min<int64_t>({s, std::max<int64_t>(1, div_up(m, min_rows)), kMaxChunks});
  s = std::max<int64_t>(s, 1);
  const int64_t chunk = std::max<int64_t>(1, div_up(m, s));
  return {div_up(m, chunk), chunk};
}

template <typename T>
cudaError_t launch(const T* x, Layout layout, int64_t n, int64_t c, int64_t hw, const Plan& plan,
                   double* out_s, double* out_q, cudaStream_t stream) {
  if (layout == Layout::kPlanes) {
    const dim3 grid(static_cast<unsigned>(c), static_cast<unsigned>(plan.chunks));
    stats_planes_kernel<T><<<grid, kThreads, 0, stream>>>(x, c, hw, n * hw, plan.chunk, out_s, out_q);
  } else {
    const dim3 grid(static_cast<unsigned>(div_up(c, kTileC)), static_cast<unsigned>(plan.chunks));
    const dim3 block(kTileC, kTileR);
    stats_rows_kernel<T><<<grid, block, 0, stream>>>(x, c, n * hw, plan.chunk, out_s, out_q);
  }
  return cudaGetLastError();
}

}  // namespace

size_t channel_stats_workspace_bytes(int64_t n, int64_t c, int64_t hw, Layout layout) {
  if (n <= 0 || c <= 0 || hw <= 0) return 0;
  const Plan plan = make_plan(n, c, hw, layout);
  return plan.chunks > 1 ? static_cast<size_t>(2 * plan.chunks * c) * sizeof(double) : 0;
}

cudaError_t channel_stats(const void* x, DType dtype, Layout layout, int64_t n, int64_t c,
                          int64_t hw, double* sum, double* sumsq, void* workspace,
                          size_t workspace_bytes, cudaStream_t stream) {
  if (n < 0 || c < 0 || hw < 0) return cudaErrorInvalidValue;
  if (c == 0) return cudaSuccess;
  if (n == 0 || hw == 0) {
    cudaError_t err = cudaMemsetAsync(sum, 0, sizeof(double) * c, stream);
    if (err != cudaSuccess) return err;
    return cudaMemsetAsync(sumsq, 0, sizeof(double) * c, stream);
  }
  if (c > 0x7fffffffLL) return cudaErrorInvalidValue;

  const Plan plan = make_plan(n, c, hw, layout);
  double* out_s = sum;
  double* out_q = sumsq;
  if (plan.chunks > 1) {
    if (workspace == nullptr || workspace_bytes < channel_stats_workspace_bytes(n, c, hw, layout)) {
      return cudaErrorInvalidValue;
    }
    out_s = static_cast<double*>(workspace);
    out_q = out_s + plan.chunks * c;
  }

  cudaError_t err = cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      err = launch(static_cast<const float*>(x), layout, n, c, hw, plan, out_s, out_q, stream);
      break;
    case DType::kFloat64:
      err = launch(static_cast<const double*>(x), layout, n, c, hw, plan, out_s, out_q, stream);
      break;
    case DType::kFloat16:
      err = launch(static_cast<const __half*>(x), layout, n, c, hw, plan, out_s, out_q, stream);
      break;
    case DType::kBFloat16:
      err = launch(static_cast<const __nv_bfloat16*>(x), layout, n, c, hw, plan, out_s, out_q, stream);
      break;
  }
  if (err != cudaSuccess || plan.chunks == 1) return err;

  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>(div_up(c, threads));
  add_chunks_kernel<<<blocks, threads, 0, stream>>>(out_s, out_q, c, plan.chunks, sum, sumsq);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastsupernet
