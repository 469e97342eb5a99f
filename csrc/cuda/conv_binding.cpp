// CUDA kernel registration of fastsupernet::multi_conv2d, fastsupernet::sliced_conv2d and
// fastsupernet::multi_conv2d_tf32: argument checks, the candidate metadata (built on the host,
// copied to the device on the current stream), output allocation, then the plain launchers of
// csrc/cuda/conv.cu (conv_tf32.cu for the TF32 op) on the current stream. Built only when torch
// has CUDA. Op semantics: csrc/README.md.
//
// Supported here: float32 and float64 x (all tensor arguments of the same dtype; float32 only
// for the TF32 op), x in any layout (contiguous NCHW is the fast path; channels_last and strided
// views are read through their strides, no copy), contiguous weight, output contiguous NCHW.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include "kernels.h"

namespace fastsupernet {
namespace {

using OptTensor = std::optional<at::Tensor>;
constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

cuda::Activation parse_activation(c10::string_view activation, const char* op) {
  if (activation == "none") return cuda::Activation::kNone;
  if (activation == "relu") return cuda::Activation::kRelu;
  if (activation == "prelu") return cuda::Activation::kPRelu;
  TORCH_CHECK(false, op, ": activation must be one of 'none', 'relu', 'prelu', got '", std::string(activation),
              "'");
  return cuda::Activation::kNone;
}

// Same device and dtype as x; returns a contiguous tensor, or an undefined one when absent.
at::Tensor check_like_x(const OptTensor& t, const char* name, const at::Tensor& x, const char* op) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->device() == x.device(), op, ": ", name, " is on ", t->device(), " but x is on ", x.device());
  TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t->scalar_type(),
              " but x has dtype ", x.scalar_type());
  return *t;
}

at::Tensor check_channel_vector(const OptTensor& t, const char* name, const at::Tensor& x, int64_t channels,
                                const char* op) {
  at::Tensor v = check_like_x(t, name, x, op);
  if (!v.defined()) return v;
  TORCH_CHECK(v.dim() == 1 && v.size(0) == channels, op, ": ", name,
              " must be 1-D with one value per output channel (sum(out_widths) = ", channels, "), got shape ",
              v.sizes());
  return v.contiguous();
}

template <typename T>
cudaError_t launch(const cuda::MultiConv2dProblem& pr, const at::Tensor& x, const at::Tensor& weight,
                   const at::Tensor& meta, const at::Tensor& scale, const at::Tensor& shift,
                   const at::Tensor& residual, const at::Tensor& slope, at::Tensor& out, at::Tensor& sum,
                   at::Tensor& sumsq, at::Tensor& workspace, size_t workspace_bytes, bool tf32, cudaStream_t stream) {
  const T* scale_p = scale.defined() ? scale.const_data_ptr<T>() : nullptr;
  const T* shift_p = shift.defined() ? shift.const_data_ptr<T>() : nullptr;
  const T* residual_p = residual.defined() ? residual.const_data_ptr<T>() : nullptr;
  const T* slope_p = slope.defined() ? slope.const_data_ptr<T>() : nullptr;
  double* sum_p = pr.stats ? sum.mutable_data_ptr<double>() : nullptr;
  double* sumsq_p = pr.stats ? sumsq.mutable_data_ptr<double>() : nullptr;
  void* ws_p = workspace_bytes > 0 ? workspace.mutable_data_ptr() : nullptr;
  if constexpr (std::is_same_v<T, float>) {
    if (tf32) {
      return cuda::launch_multi_conv2d_tf32(pr, x.const_data_ptr<float>(), weight.const_data_ptr<float>(),
                                            meta.const_data_ptr<int32_t>(), scale_p, shift_p, residual_p, slope_p,
                                            out.mutable_data_ptr<float>(), sum_p, sumsq_p, ws_p, workspace_bytes,
                                            stream);
    }
    return cuda::launch_multi_conv2d_f32(pr, x.const_data_ptr<float>(), weight.const_data_ptr<float>(),
                                         meta.const_data_ptr<int32_t>(), scale_p, shift_p, residual_p, slope_p,
                                         out.mutable_data_ptr<float>(), sum_p, sumsq_p, ws_p, workspace_bytes,
                                         stream);
  } else {
    return cuda::launch_multi_conv2d_f64(pr, x.const_data_ptr<double>(), weight.const_data_ptr<double>(),
                                         meta.const_data_ptr<int32_t>(), scale_p, shift_p, residual_p, slope_p,
                                         out.mutable_data_ptr<double>(), sum_p, sumsq_p, ws_p, workspace_bytes,
                                         stream);
  }
}

// x and weight are checked (4-D, CUDA, dtype, kernel, contiguous weight) by the callers.
std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_conv2d_impl(
    const char* op, const at::Tensor& x, const at::Tensor& weight, c10::IntArrayRef in_offsets,
    c10::IntArrayRef in_widths, c10::IntArrayRef out_widths, c10::IntArrayRef row_offsets, int64_t stride,
    int64_t padding, const OptTensor& scale, const OptTensor& shift, const OptTensor& residual,
    c10::string_view activation, const OptTensor& prelu_slope, bool stats, bool tf32 = false) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t R = weight.size(0), C_max = weight.size(1), ks = weight.size(2);

  const int64_t K = static_cast<int64_t>(in_offsets.size());
  TORCH_CHECK(K >= 1, op, ": in_offsets is empty (at least one candidate is needed)");
  TORCH_CHECK(static_cast<int64_t>(in_widths.size()) == K && static_cast<int64_t>(out_widths.size()) == K &&
                  static_cast<int64_t>(row_offsets.size()) == K,
              op, ": in_offsets, in_widths, out_widths and row_offsets must have the same length, got ", K, ", ",
              in_widths.size(), ", ", out_widths.size(), " and ", row_offsets.size());
  TORCH_CHECK(K <= kInt32Max, op, ": too many candidates (", K, ")");
  TORCH_CHECK(C <= kInt32Max && R <= kInt32Max, op, ": x channels (", C, ") or weight rows (", R,
              ") exceed the int32 range of the CUDA kernel");
  int64_t out_channels = 0;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t off = in_offsets[k], iw = in_widths[k], ow = out_widths[k], row = row_offsets[k];
    TORCH_CHECK(iw >= 1, op, ": in_widths[", k, "] must be >= 1, got ", iw);
    TORCH_CHECK(off >= 0 && off + iw <= C, op, ": candidate ", k, " reads x channels [", off, ", ", off + iw,
                ") (in_offsets[", k, "], in_widths[", k, "]), out of range for x with ", C, " channels");
    TORCH_CHECK(iw <= C_max, op, ": in_widths[", k, "] = ", iw, " exceeds the ", C_max, " columns of weight");
    TORCH_CHECK(ow >= 1, op, ": out_widths[", k, "] must be >= 1, got ", ow);
    TORCH_CHECK(row >= 0 && row + ow <= R, op, ": candidate ", k, " uses weight rows [", row, ", ", row + ow,
                ") (row_offsets[", k, "], out_widths[", k, "]), out of range for weight with ", R, " rows");
    out_channels += ow;
  }
  TORCH_CHECK(out_channels <= kInt32Max, op, ": sum(out_widths) = ", out_channels, " exceeds the int32 range");
  TORCH_CHECK(stride >= 1 && stride <= kInt32Max, op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK(padding >= 0 && padding <= kInt32Max, op, ": padding must be >= 0, got ", padding);
  const int64_t Ho = cuda::multi_conv2d_out_size(H, static_cast<int>(ks), static_cast<int>(stride),
                                                 static_cast<int>(padding));
  const int64_t Wo = cuda::multi_conv2d_out_size(W, static_cast<int>(ks), static_cast<int>(stride),
                                                 static_cast<int>(padding));
  TORCH_CHECK(Ho >= 1 && Wo >= 1, op, ": empty output: x is ", H, "x", W, " with a ", ks, "x", ks,
              " kernel, stride ", stride, " and padding ", padding);

  const cuda::Activation act = parse_activation(activation, op);
  at::Tensor slope;  // read only by "prelu"
  if (act == cuda::Activation::kPRelu) {
    TORCH_CHECK(prelu_slope.has_value() && prelu_slope->defined(), op, ": activation 'prelu' needs prelu_slope");
    slope = check_like_x(prelu_slope, "prelu_slope", x, op);
    TORCH_CHECK(slope.numel() == K, op, ": prelu_slope must hold one value per candidate (", K, "), got shape ",
                slope.sizes());
    slope = slope.reshape({K}).contiguous();
  }
  const at::Tensor scale_c = check_channel_vector(scale, "scale", x, out_channels, op);
  const at::Tensor shift_c = check_channel_vector(shift, "shift", x, out_channels, op);
  at::Tensor res = check_like_x(residual, "residual", x, op);
  if (res.defined()) {
    TORCH_CHECK(res.dim() == 4 && res.size(0) == N && res.size(1) == out_channels && res.size(2) == Ho &&
                    res.size(3) == Wo,
                op, ": residual must have the output's shape [", N, ", ", out_channels, ", ", Ho, ", ", Wo,
                "], got ", res.sizes());
  }

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();

  // Candidate metadata: filled in pinned host memory, copied on the current stream (the caching
  // host allocator keeps the buffer until the copy has run).
  const int64_t meta_size = cuda::multi_conv2d_meta_size(static_cast<int>(K), out_widths.data());
  at::Tensor meta_host = at::empty({meta_size}, at::TensorOptions().dtype(at::kInt).pinned_memory(true));
  const int64_t channel_tiles =
      cuda::multi_conv2d_fill_meta(static_cast<int>(K), in_offsets.data(), in_widths.data(), out_widths.data(),
                                   row_offsets.data(), meta_host.mutable_data_ptr<int32_t>());
  const at::Tensor meta = meta_host.to(x.device(), at::kInt, /*non_blocking=*/true);

  cuda::MultiConv2dProblem pr{};
  pr.n = N;
  pr.c_in = C;
  pr.h = H;
  pr.w = W;
  for (int i = 0; i < 4; ++i) {
    pr.x_strides[i] = x.stride(i);
    pr.residual_strides[i] = res.defined() ? res.stride(i) : 0;
  }
  pr.weight_rows = R;
  pr.weight_cols = C_max;
  pr.kernel = static_cast<int>(ks);
  pr.stride = static_cast<int>(stride);
  pr.padding = static_cast<int>(padding);
  pr.num_candidates = static_cast<int>(K);
  pr.channel_tiles = channel_tiles;
  pr.out_channels = out_channels;
  pr.activation = act;
  pr.stats = stats;

  at::Tensor out = at::empty({N, out_channels, Ho, Wo}, x.options());
  const auto stat_options = x.options().dtype(at::kDouble);
  at::Tensor sum = at::empty({stats ? out_channels : 0}, stat_options);
  at::Tensor sumsq = at::empty({stats ? out_channels : 0}, stat_options);
  const size_t workspace_bytes =
      tf32 ? cuda::multi_conv2d_tf32_workspace_bytes(pr) : cuda::multi_conv2d_workspace_bytes(pr);
  at::Tensor workspace;
  if (workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, x.options().dtype(at::kByte));
  }

  const cudaError_t err =
      x.scalar_type() == at::kFloat
          ? launch<float>(pr, x, weight, meta, scale_c, shift_c, res, slope, out, sum, sumsq, workspace,
                          workspace_bytes, tf32, stream)
          : launch<double>(pr, x, weight, meta, scale_c, shift_c, res, slope, out, sum, sumsq, workspace,
                           workspace_bytes, tf32, stream);
  TORCH_CHECK(err == cudaSuccess, op, " CUDA launch failed: ", cudaGetErrorString(err),
              err == cudaErrorInvalidConfiguration
                  ? " (the input patch of a tile does not fit in shared memory: stride too large)"
              : err == cudaErrorNotSupported ? " (TF32 tensor-core kernels need compute capability 8.0 or newer)"
                                             : "");
  return {out, sum, sumsq};
}

void check_x_weight(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(x.is_cuda(), op, " (CUDA): x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              " (CUDA): x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be 4-D (R, C_max, k, k), got shape ", weight.sizes());
  TORCH_CHECK(weight.device() == x.device(), op, ": weight is on ", weight.device(), " but x is on ", x.device());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight has dtype ", weight.scalar_type(),
              " but x has dtype ", x.scalar_type());
  TORCH_CHECK(weight.size(2) == weight.size(3) && (weight.size(2) == 1 || weight.size(2) == 3), op,
              ": weight must have a 1x1 or 3x3 kernel, got ", weight.size(2), "x", weight.size(3));
  TORCH_CHECK(weight.is_contiguous(), op, ": weight must be contiguous (candidates read their slices in place)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_conv2d_cuda(
    const at::Tensor& x, const at::Tensor& weight, c10::IntArrayRef in_offsets, c10::IntArrayRef in_widths,
    c10::IntArrayRef out_widths, c10::IntArrayRef row_offsets, int64_t stride, int64_t padding,
    const OptTensor& scale, const OptTensor& shift, const OptTensor& residual, c10::string_view activation,
    const OptTensor& prelu_slope, bool stats) {
  constexpr const char* op = "fastsupernet::multi_conv2d";
  check_x_weight(x, weight, op);
  return multi_conv2d_impl(op, x, weight, in_offsets, in_widths, out_widths, row_offsets, stride, padding, scale,
                           shift, residual, activation, prelu_slope, stats);
}

// The same op with the products on the tensor cores in TF32 (float32 tensors only).
std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_conv2d_tf32_cuda(
    const at::Tensor& x, const at::Tensor& weight, c10::IntArrayRef in_offsets, c10::IntArrayRef in_widths,
    c10::IntArrayRef out_widths, c10::IntArrayRef row_offsets, int64_t stride, int64_t padding,
    const OptTensor& scale, const OptTensor& shift, const OptTensor& residual, c10::string_view activation,
    const OptTensor& prelu_slope, bool stats) {
  constexpr const char* op = "fastsupernet::multi_conv2d_tf32";
  check_x_weight(x, weight, op);
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32 (TF32 rounds float32 inputs), got ",
              x.scalar_type());
  return multi_conv2d_impl(op, x, weight, in_offsets, in_widths, out_widths, row_offsets, stride, padding, scale,
                           shift, residual, activation, prelu_slope, stats, /*tf32=*/true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sliced_conv2d_cuda(
    const at::Tensor& x, const at::Tensor& weight, int64_t out_rows, int64_t row_offset, int64_t stride,
    int64_t padding, const OptTensor& scale, const OptTensor& shift, const OptTensor& residual,
    c10::string_view activation, const OptTensor& prelu_slope, bool stats) {
  constexpr const char* op = "fastsupernet::sliced_conv2d";
  check_x_weight(x, weight, op);
  const int64_t C = x.size(1);
  TORCH_CHECK(C >= 1, op, ": x has no channels");
  TORCH_CHECK(C <= weight.size(1), op, ": x has ", C, " channels but weight only ", weight.size(1), " columns");
  TORCH_CHECK(out_rows >= 1, op, ": out_rows must be >= 1, got ", out_rows);
  TORCH_CHECK(row_offset >= 0 && row_offset + out_rows <= weight.size(0), op, ": rows [", row_offset, ", ",
              row_offset + out_rows, ") (row_offset, out_rows) out of range for weight with ", weight.size(0),
              " rows");
  const int64_t in_offsets[1] = {0};
  const int64_t in_widths[1] = {C};
  const int64_t out_widths[1] = {out_rows};
  const int64_t row_offsets[1] = {row_offset};
  return multi_conv2d_impl(op, x, weight, in_offsets, in_widths, out_widths, row_offsets, stride, padding, scale,
                           shift, residual, activation, prelu_slope, stats);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastsupernet, CUDA, m) {
  m.impl("multi_conv2d", &multi_conv2d_cuda);
  m.impl("sliced_conv2d", &sliced_conv2d_cuda);
  m.impl("multi_conv2d_tf32", &multi_conv2d_tf32_cuda);
}

}  // namespace fastsupernet
