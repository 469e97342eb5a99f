// Operator schemas of the `fastsupernet` library and the Python entry point of the
// extension module `fastsupernet._C`.
//
// Each schema is defined exactly once, here. Backends add kernels elsewhere with
// TORCH_LIBRARY_IMPL(fastsupernet, <DispatchKey>, m):
//   csrc/cpu/channel_stats.cpp           -> CPU
//   csrc/cuda/channel_stats_binding.cpp  -> CUDA (only built when torch has CUDA)
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

TORCH_LIBRARY(fastsupernet, m) {
  // Per-channel sum and sum of squares of an (N, C, H, W) tensor, accumulated and returned
  // in float64 (shape (C,) each). Statistics only: the op has no autograd formula.
  m.def("channel_stats(Tensor x) -> (Tensor sum, Tensor sumsq)");
}
