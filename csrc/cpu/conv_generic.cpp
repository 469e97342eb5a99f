// Portable version of the multi_conv2d CPU kernel: the same blocking and order of operations
// as the AVX2 version, with "registers" of plain arrays that the compiler vectorises for the
// baseline instruction set. It serves CPUs without AVX2/FMA and is what runs when
// FASTSUPERNET_CPU_KERNEL=generic. Without FMA, each term is a rounded product then a
// rounded sum, so results differ from the AVX2 version by a few units of the last place.

#include "cpu/conv_plan.h"

#define FSN_TARGET
#if defined(__GNUC__) || defined(__clang__)
#define FSN_INLINE inline __attribute__((always_inline))
#else
#define FSN_INLINE inline
#endif

namespace fastsupernet {
namespace conv {
namespace {

template <typename T>
struct Vec {
  static constexpr int L = Blocking<T>::kLanes;
  struct R {
    T v[L];
  };
  static FSN_INLINE R zero() {
    R r;
    for (int l = 0; l < L; ++l) r.v[l] = T(0);
    return r;
  }
  static FSN_INLINE R load(const T* p) {
    R r;
    for (int l = 0; l < L; ++l) r.v[l] = p[l];
    return r;
  }
  static FSN_INLINE void store(T* p, const R& x) {
    for (int l = 0; l < L; ++l) p[l] = x.v[l];
  }
  static FSN_INLINE void store_stream(T* p, const R& x) { store(p, x); }  // no streaming stores here

  // Lanes [0, n) only, 1 <= n <= L (no access to the other lanes' memory; keep_n zeroes them).
  static FSN_INLINE R load_n(const T* p, int n) {
    R r = zero();
    for (int l = 0; l < n; ++l) r.v[l] = p[l];
    return r;
  }
  static FSN_INLINE void store_n(T* p, const R& x, int n) {
    for (int l = 0; l < n; ++l) p[l] = x.v[l];
  }
  static FSN_INLINE R keep_n(const R& x, int n) {
    R r = zero();
    for (int l = 0; l < n; ++l) r.v[l] = x.v[l];
    return r;
  }
  static FSN_INLINE R bcast(const T* p) { return set1(*p); }
  static FSN_INLINE R set1(T s) {
    R r;
    for (int l = 0; l < L; ++l) r.v[l] = s;
    return r;
  }
  static FSN_INLINE R fma(const R& a, const R& b, const R& c) {
    R r;
    for (int l = 0; l < L; ++l) r.v[l] = a.v[l] * b.v[l] + c.v[l];
    return r;
  }
  static FSN_INLINE R add(const R& a, const R& b) {
    R r;
    for (int l = 0; l < L; ++l) r.v[l] = a.v[l] + b.v[l];
    return r;
  }
  static FSN_INLINE R mul(const R& a, const R& b) {
    R r;
    for (int l = 0; l < L; ++l) r.v[l] = a.v[l] * b.v[l];
    return r;
  }
  static FSN_INLINE R relu(const R& y) {
    R r;
    for (int l = 0; l < L; ++l) r.v[l] = y.v[l] > T(0) ? y.v[l] : (y.v[l] == y.v[l] ? T(0) : y.v[l]);
    return r;
  }
  static FSN_INLINE R prelu(const R& y, const R& slope) {
    R r;
    for (int l = 0; l < L; ++l) r.v[l] = y.v[l] >= T(0) ? y.v[l] : y.v[l] * slope.v[l];
    return r;
  }
  // dst[0:count] = src[0:count]
  static FSN_INLINE void copy(T* __restrict dst, const T* __restrict src, int64_t count) {
    for (int64_t t = 0; t < count; ++t) dst[t] = src[t];
  }
  // dst[0:count] = src[0:2*count:2] (reads src[0 : 2 * count - 1] only)
  static FSN_INLINE void copy_even(T* __restrict dst, const T* __restrict src, int64_t count) {
    for (int64_t t = 0; t < count; ++t) dst[t] = src[2 * t];
  }
  // even[t] = src[2 t], odd[t] = src[2 t + 1], t < count
  static FSN_INLINE void copy_deinterleave(T* __restrict even, T* __restrict odd, const T* __restrict src,
                                           int64_t count) {
    for (int64_t t = 0; t < count; ++t) {
      even[t] = src[2 * t];
      odd[t] = src[2 * t + 1];
    }
  }
  // Statistics accumulators: L float64 lanes.
  struct S {
    double v[L];
  };
  static FSN_INLINE S stats_zero() {
    S r;
    for (int l = 0; l < L; ++l) r.v[l] = 0.0;
    return r;
  }
  static FSN_INLINE void stats_add(S& s, S& q, const R& y) {
    for (int l = 0; l < L; ++l) {
      const double w = static_cast<double>(y.v[l]);
      s.v[l] += w;
      q.v[l] += w * w;
    }
  }
  static FSN_INLINE void stats_flush(double* s, double* q, const S& vs, const S& vq) {
    for (int l = 0; l < L; ++l) {
      s[l] += vs.v[l];
      q[l] += vq.v[l];
    }
  }
};

}  // namespace
}  // namespace conv
}  // namespace fastsupernet

#include "cpu/conv_kernel.h"

namespace fastsupernet {
namespace conv {

void run_items_generic(const ConvJob<float>& job, int64_t begin, int64_t end, float* scratch, double* lanes) {
  run_items_impl<float>(job, begin, end, scratch, lanes);
}

void run_items_generic(const ConvJob<double>& job, int64_t begin, int64_t end, double* scratch, double* lanes) {
  run_items_impl<double>(job, begin, end, scratch, lanes);
}

}  // namespace conv
}  // namespace fastsupernet
