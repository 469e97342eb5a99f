// What the multi_conv2d kernels of conv.cu (fp32/fp64 FMAs) and conv_tf32.cu (TF32 tensor
// cores) share: the candidate metadata format of multi_conv2d_fill_meta, problem validation,
// asynchronous staging into shared memory, and the deterministic merge of per-tile statistics.
// Everything has internal linkage (each .cu gets its own copy).
#pragma once

#include <cuda_runtime.h>

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
