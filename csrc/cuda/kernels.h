// Launchers of the CUDA kernels of fastsupernet.
//
// Plain C++ over the CUDA runtime: raw device pointers, a stream, a cudaError_t result; no
// torch types. csrc/cuda/*.cu implement them and compile with nvcc alone (the CMake target
// fastsupernet_cuda_kernels); csrc/cuda/*_binding.cpp wrap them as torch ops.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace fastsupernet {
namespace cuda {

// Element type of an input tensor.
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Memory layout of a dense (N, C, H, W) tensor.
enum class Layout : int {
  kPlanes = 0,  // contiguous NCHW: N * C planes of H * W values
  kRows = 1,    // channels_last (NHWC): N * H * W rows of C values
};

// Bytes of device scratch memory channel_stats needs for this shape (may be 0).
size_t channel_stats_workspace_bytes(int64_t n, int64_t c, int64_t hw, Layout layout);

// Per-channel sum and sum of squares of x, accumulated in float64.
//
// x: device pointer to n * c * hw values of type `dtype`, dense in `layout`.
// sum, sumsq: device pointers to c doubles each (overwritten).
// workspace: at least channel_stats_workspace_bytes(...) bytes of device memory (may be
// null when that is 0), used only on `stream`.
// The result depends only on the shape (no atomics): bitwise reproducible run to run.
cudaError_t channel_stats(const void* x, DType dtype, Layout layout, int64_t n, int64_t c,
                          int64_t hw, double* sum, double* sumsq, void* workspace,
                          size_t workspace_bytes, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastsupernet
