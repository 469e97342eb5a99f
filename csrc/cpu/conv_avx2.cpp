// AVX2 + FMA version of the multi_conv2d CPU kernel (x86-64, GCC or Clang).
//
// The file is compiled with the project's baseline flags; the functions carry
// __attribute__((target("avx2,fma"))) and conv.cpp calls them only when the CPU reports both
// features. Nothing outside this file runs AVX2 code, and no torch header is included here.

#include "cpu/conv_plan.h"

#ifdef FASTSUPERNET_HAVE_AVX2

#define FSN_TARGET __attribute__((target("avx2,fma")))
#define FSN_INLINE inline __attribute__((always_inline))

#include "cpu/conv_vec_avx2.h"

namespace fastsupernet {
namespace conv {
namespace {

template <typename T>
struct Vec : Avx2Vec<T> {};

}  // namespace
}  // namespace conv
}  // namespace fastsupernet

#include "cpu/conv_kernel.h"

namespace fastsupernet {
namespace conv {

bool run_items_avx2(const ConvJob<float>& job, int64_t begin, int64_t end, float* scratch, double* lanes) {
  run_items_impl<float>(job, begin, end, scratch, lanes);
  return true;
}

bool run_items_avx2(const ConvJob<double>& job, int64_t begin, int64_t end, double* scratch, double* lanes) {
  run_items_impl<double>(job, begin, end, scratch, lanes);
  return true;
}

bool cpu_has_avx2_fma() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

}  // namespace conv
}  // namespace fastsupernet

#else  // no AVX2 build: the generic kernel serves every CPU

namespace fastsupernet {
namespace conv {

bool run_items_avx2(const ConvJob<float>&, int64_t, int64_t, float*, double*) { return false; }
bool run_items_avx2(const ConvJob<double>&, int64_t, int64_t, double*, double*) { return false; }
bool cpu_has_avx2_fma() { return false; }

}  // namespace conv
}  // namespace fastsupernet

#endif
