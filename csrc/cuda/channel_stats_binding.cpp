// CUDA kernel registration of fastsupernet::channel_stats: checks and layout handling on the
// torch side, then the plain launcher of csrc/cuda/channel_stats.cu on the current stream.
// Built only when torch has CUDA.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kernels.h"

namespace fastsupernet {
namespace {

cuda::DType to_kernel_dtype(at::ScalarType t) {
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "fastsupernet::channel_stats (CUDA) supports float32, float64, float16 and bfloat16, got ", t);
  switch (t) {
    case at::kDouble:
      return cuda::DType::kFloat64;
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      return cuda::DType::kFloat32;
  }
}

std::tuple<at::Tensor, at::Tensor> channel_stats_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "fastsupernet::channel_stats expects an (N, C, H, W) tensor, got ",
              x.dim(), " dimensions");
  TORCH_CHECK(x.is_cuda(), "fastsupernet::channel_stats (CUDA) got a tensor on ", x.device());
  const cuda::DType dtype = to_kernel_dtype(x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());

  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  // Same layout rule as the CPU kernel: odd strides are copied into the suggested layout;
  // with C == 1 or HW == 1 both readings address the same memory.
  at::Tensor xc = x;
  if (!x.is_contiguous() && !x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    xc = x.contiguous(x.suggest_memory_format());
  }
  cuda::Layout layout;
  if (C == 1) {
    layout = cuda::Layout::kPlanes;
  } else if (HW == 1) {
    layout = cuda::Layout::kRows;
  } else {
    layout = xc.is_contiguous() ? cuda::Layout::kPlanes : cuda::Layout::kRows;
  }

  const auto out_options = x.options().dtype(at::kDouble);
  at::Tensor sum = at::empty({C}, out_options);
  at::Tensor sumsq = at::empty({C}, out_options);
  const size_t workspace_bytes = cuda::channel_stats_workspace_bytes(N, C, HW, layout);
  at::Tensor workspace;
  if (workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, x.options().dtype(at::kByte));
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const cudaError_t err = cuda::channel_stats(
      xc.const_data_ptr(), dtype, layout, N, C, HW, sum.mutable_data_ptr<double>(),
      sumsq.mutable_data_ptr<double>(), workspace_bytes > 0 ? workspace.mutable_data_ptr() : nullptr,
      workspace_bytes, stream);
  TORCH_CHECK(err == cudaSuccess, "fastsupernet::channel_stats CUDA launch failed: ",
              cudaGetErrorString(err));
  return {sum, sumsq};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastsupernet, CUDA, m) { m.impl("channel_stats", &channel_stats_cuda); }

}  // namespace fastsupernet
