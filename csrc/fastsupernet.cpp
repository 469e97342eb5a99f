// Operator schemas of the `fastsupernet` library and the Python entry point of the
// extension module `fastsupernet._C`.
//
// Each schema is defined exactly once, here. Backends add kernels elsewhere with
// TORCH_LIBRARY_IMPL(fastsupernet, <DispatchKey>, m):
//   csrc/cpu/channel_stats.cpp, csrc/cpu/conv.cpp, csrc/cpu/conv_weight_grad.cpp,
//   csrc/cpu/bn_act.cpp -> CPU
//   csrc/cuda/channel_stats_binding.cpp, csrc/cuda/conv_binding.cpp  -> CUDA (only built when torch has CUDA)
// The exception: the CPU block cache's two configuration ops (no tensor arguments, so no
// dispatch key) are defined with their implementation in csrc/cpu/block_cache.cpp.
//
// The module itself exports nothing to Python: importing it runs the static registrations
// below, after which the ops live under torch.ops.fastsupernet. Because nothing here
// touches the Python/C++ bindings of torch, the module builds against the stable
// (limited) Python ABI and one binary serves every CPython >= 3.10.

#include <Python.h>

#include <torch/library.h>

extern "C" {
// Minimal module init so that `import fastsupernet._C` works.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C", /* name */
      "Compiled kernels of fastsupernet; the ops are registered under torch.ops.fastsupernet.", /* doc */
      -1,   /* size of per-interpreter state, -1: global state only */
      NULL, /* methods */
  };
  return PyModule_Create(&module_def);
}
}

// Full op semantics (argument meaning, epilogue order, statistics, validation): csrc/README.md
TORCH_LIBRARY(fastsupernet, m) {
  // Per-channel sum and sum of squares of an (N, C, H, W) tensor, accumulated and returned
  // in float64 (shape (C,) each). Statistics only: the op has no autograd formula.
  m.def("channel_stats(Tensor x) -> (Tensor sum, Tensor sumsq)");

  // K candidate convolutions in one call (forward only; autograd is registered in Python).
  // Candidate k reads input channels [in_offsets[k], in_offsets[k] + in_widths[k]) of x
  // (N, C_in, H, W), uses weight[row_offsets[k] : row_offsets[k] + out_widths[k], :in_widths[k]]
  // of the packed (R, C_max, kh, kw) weight in place, and writes its out_widths[k] channels to
  // the packed output (N, sum(out_widths), H', W') at the prefix-sum channel offset.
  // Epilogue per output channel c, in order: y * scale[c] + shift[c], + residual, activation
  // ("none" | "relu" | "prelu" with slope prelu_slope[k] of the channel's candidate).
  // With stats, sum/sumsq are the float64 per-channel sum and sum of squares of the conv
  // output before the epilogue; otherwise they are empty float64 tensors.
  m.def(
      "multi_conv2d(Tensor x, Tensor weight, int[] in_offsets, int[] in_widths, int[] out_widths, "
      "int[] row_offsets, int stride, int padding, Tensor? scale, Tensor? shift, Tensor? residual, "
      "str activation, Tensor? prelu_slope, bool stats) -> (Tensor out, Tensor sum, Tensor sumsq)");
  // multi_conv2d with x and weight rounded to TF32 and the products summed in fp32 on the tensor
  // cores (CUDA only, float32, compute capability >= 8.0; error bound in csrc/cuda/conv_tf32.cu).
  m.def(
      "multi_conv2d_tf32(Tensor x, Tensor weight, int[] in_offsets, int[] in_widths, int[] out_widths, "
      "int[] row_offsets, int stride, int padding, Tensor? scale, Tensor? shift, Tensor? residual, "
      "str activation, Tensor? prelu_slope, bool stats) -> (Tensor out, Tensor sum, Tensor sumsq)");
  // One candidate (K = 1, input offset 0, in_width = x.size(1)); prelu_slope has one element.
  m.def(
      "sliced_conv2d(Tensor x, Tensor weight, int out_rows, int row_offset, int stride, int padding, "
      "Tensor? scale, Tensor? shift, Tensor? residual, str activation, Tensor? prelu_slope, bool stats) "
      "-> (Tensor out, Tensor sum, Tensor sumsq)");
  // Weight gradient of multi_conv2d for all K candidates at once (a building block of its
  // backward): grad_out is the packed (N, sum(out_widths), H', W') gradient of the conv output
  // before any epilogue; the result has weight's full shape, zero outside the rows/columns the
  // candidates read (candidates sharing rows add into them). CPU kernel: csrc/cpu/conv_weight_grad.cpp.
  m.def(
      "multi_conv2d_weight_grad(Tensor grad_out, Tensor x, Tensor weight, int[] in_offsets, int[] in_widths, "
      "int[] out_widths, int[] row_offsets, int stride, int padding) -> Tensor");

  // BatchNorm affine + residual + activation in one pass (CPU; CUDA runs the Triton version):
  // out = act((y * scale[c] + shift[c]) + r), r = residual * res_scale[c] + res_shift[c] (both
  // given), residual (neither), or 0 (no residual); act "none" | "relu" | "prelu" with one shared
  // slope (1 element). Each product and sum is rounded on its own.
  m.def(
      "bn_act(Tensor y, Tensor scale, Tensor shift, Tensor? residual, Tensor? res_scale, Tensor? res_shift, "
      "str activation, Tensor? slope) -> Tensor");
  // Backward of train-mode BatchNorm (batch statistics mean/invstd of y, scale = gamma * invstd,
  // shift = beta - mean * scale) followed by bn_act without residual affine: gradients of y
  // (through the statistics too), of the residual (empty without one), of gamma, beta and the
  // shared PReLU slope (empty unless prelu). Without mean and invstd: the backward of bn_act
  // itself, scale and shift plain inputs (eval-mode BN folded into them): grad_gamma and
  // grad_beta are then the gradients of scale and shift. CPU kernel: csrc/cpu/bn_act.cpp.
  m.def(
      "bn_act_backward(Tensor grad_out, Tensor y, Tensor scale, Tensor shift, Tensor? residual, str activation, "
      "Tensor? slope, Tensor? mean, Tensor? invstd) -> (Tensor grad_y, Tensor grad_residual, Tensor grad_gamma, "
      "Tensor grad_beta, Tensor grad_slope)");
}
