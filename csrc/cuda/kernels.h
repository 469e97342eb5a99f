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

// ---- multi_conv2d / sliced_conv2d (csrc/cuda/conv.cu) -----------------------------------------
//
// K candidate convolutions of one layer in one launch; semantics in csrc/README.md. float32
// and float64 (fp32 / fp64 FMA accumulation); error bounds in conv.cu.

// Activation of the fused epilogue.
enum class Activation : int { kNone = 0, kRelu = 1, kPRelu = 2 };

// Shape of one multi_conv2d call (everything but the data pointers).
struct MultiConv2dProblem {
  int64_t n, c_in, h, w;          // x: (n, c_in, h, w)
  int64_t x_strides[4];           // element strides of x (NCHW, channels_last or any view)
  int64_t weight_rows;            // packed weight: contiguous (weight_rows, weight_cols, kernel, kernel)
  int64_t weight_cols;
  int kernel;                     // 1 or 3
  int stride;                     // >= 1
  int padding;                    // >= 0, zero padding
  int num_candidates;             // K >= 1
  int64_t channel_tiles;          // returned by multi_conv2d_fill_meta
  int64_t out_channels;           // sum of the out widths
  int64_t residual_strides[4];    // element strides of residual (n, c, h, w); unused without one
  Activation activation;
  bool stats;
};

// Output size of one spatial axis: (size + 2 * padding - kernel) / stride + 1 (0 if negative).
int64_t multi_conv2d_out_size(int64_t size, int kernel, int stride, int padding);

// int32 entries of the metadata array of K candidates with these output widths.
int64_t multi_conv2d_meta_size(int num_candidates, const int64_t* out_widths);

// Fills `meta` (host memory of multi_conv2d_meta_size entries): per candidate k its
// in_offset, in_width, out_width, row_offset and output channel offset (prefix sum of the out
// widths), then per output-channel tile its candidate and first channel. Returns the number of
// channel tiles (MultiConv2dProblem::channel_tiles). The arguments must be validated before
// (ranges against x and weight, widths >= 1, everything within int32).
int64_t multi_conv2d_fill_meta(int num_candidates, const int64_t* in_offsets, const int64_t* in_widths,
                               const int64_t* out_widths, const int64_t* row_offsets, int32_t* meta);

// Bytes of device scratch memory a call needs (0 without stats).
size_t multi_conv2d_workspace_bytes(const MultiConv2dProblem& problem);

// out (contiguous (n, out_channels, h_out, w_out)) = the K convolutions of x with the epilogue.
//
// Device pointers: x (read through problem.x_strides), weight (contiguous), meta (the array of
// multi_conv2d_fill_meta copied to the device), scale / shift (out_channels values, or null),
// residual (out's shape, read through problem.residual_strides, or null), prelu_slope (K
// values; needed for kPRelu, else may be null), out. With problem.stats, sum and sumsq
// (out_channels doubles each) receive the float64 per-channel sum and sum of squares of the
// conv output before the epilogue, and workspace must hold multi_conv2d_workspace_bytes.
// Everything runs on `stream`; no atomics, results are bitwise reproducible for a shape.
// cudaErrorInvalidValue: an inconsistent problem; cudaErrorInvalidConfiguration: the staged
// input patch does not fit in shared memory (stride too large).
cudaError_t launch_multi_conv2d_f32(const MultiConv2dProblem& problem, const float* x, const float* weight,
                                    const int32_t* meta, const float* scale, const float* shift,
                                    const float* residual, const float* prelu_slope, float* out, double* sum,
                                    double* sumsq, void* workspace, size_t workspace_bytes,
                                    cudaStream_t stream);
cudaError_t launch_multi_conv2d_f64(const MultiConv2dProblem& problem, const double* x, const double* weight,
                                    const int32_t* meta, const double* scale, const double* shift,
                                    const double* residual, const double* prelu_slope, double* out,
                                    double* sum, double* sumsq, void* workspace, size_t workspace_bytes,
                                    cudaStream_t stream);

// ---- multi_conv2d on the tensor cores in TF32 (csrc/cuda/conv_tf32.cu) -----------------------
//
// The same op, metadata (multi_conv2d_fill_meta) and arguments as launch_multi_conv2d_f32,
// float32 only, with x and weight rounded to TF32 and the products summed in fp32 on the
// tensor cores (error bound in conv_tf32.cu). Needs compute capability >= 8.0
// (cudaErrorNotSupported below); the workspace size is its own.
size_t multi_conv2d_tf32_workspace_bytes(const MultiConv2dProblem& problem);
cudaError_t launch_multi_conv2d_tf32(const MultiConv2dProblem& problem, const float* x, const float* weight,
                                     const int32_t* meta, const float* scale, const float* shift,
                                     const float* residual, const float* prelu_slope, float* out, double* sum,
                                     double* sumsq, void* workspace, size_t workspace_bytes,
                                     cudaStream_t stream);

}  // namespace cuda
}  // namespace fastsupernet
