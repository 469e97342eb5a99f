// CPU kernels of fastsupernet::bn_act and fastsupernet::bn_act_backward: a BatchNorm's
// per-channel affine, an optional residual (itself optionally with a per-channel affine) and
// the activation, in one pass over memory instead of four to six.
//
// Forward, per element of channel c:
//   z = (y * scale[c] + shift[c]) + r,   r = residual * res_scale[c] + res_shift[c] | residual | 0
//   out = act(z)                         none | relu | prelu with one shared slope
// every product and sum rounded on its own (fp-contract off for this file): an element's
// result does not depend on where it sits in the tensor, which the ranking engine relies on
// (a candidate's scores must not depend on which other candidates share its packed tensor).
//
// Backward of train-mode BatchNorm followed by the above, where scale = gamma * invstd and
// shift = beta - mean * scale were made from the batch statistics (mean, invstd) of y:
//   gz      = dL/dz = grad_out * act'(z)                (= the residual's gradient)
//   grad_y  = scale * (gz - sum(gz) / n - (y - mean) * invstd^2 * sum(gz * (y - mean)) / n)
//   grad_gamma = invstd * sum(gz * (y - mean)),  grad_beta = sum(gz),
//   grad_slope = sum over z <= 0 of grad_out * z        (prelu only)
// with n = N * H * W. Without mean and invstd, the backward of the same pass with scale and
// shift as plain per-channel inputs (eval-mode BN folded into them):
//   grad_y = scale * gz,  grad_gamma -> the gradient of scale, sum(gz * y),
//   grad_beta -> the gradient of shift, sum(gz).
// Per-channel sums are accumulated in float64. Channel c is reduced by
// one thread in a fixed order and the slope partials are added in channel order, so the
// results do not depend on the number of threads (resume-exactness of training needs that).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu/conv_plan.h"  // conv::generic_kernel_forced, conv::stream_output, FASTSUPERNET_HAVE_AVX2

// No fused multiply-adds formed from separate products and sums in this file (whatever -march
// the build uses): see the header.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

namespace fastsupernet {
namespace {

enum class Act { kNone, kRelu, kPrelu };

Act parse_activation(c10::string_view s) {
  if (s == "none") return Act::kNone;
  if (s == "relu") return Act::kRelu;
  if (s == "prelu") return Act::kPrelu;
  TORCH_CHECK(false, "fastsupernet::bn_act: activation must be 'none', 'relu' or 'prelu', got '", s, "'");
}

// Elements per parallel work unit in the forward pass (planes are grouped up to this size).
constexpr int64_t kGrain = 1 << 14;

void check_channel_vector(const at::Tensor& v, int64_t C, const at::Tensor& y, const char* name) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == C, "fastsupernet::bn_act: ", name, " must have shape (", C,
              ",), got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == y.scalar_type(), "fastsupernet::bn_act: ", name, " must be ", y.scalar_type(),
              " like y, got ", v.scalar_type());
  TORCH_CHECK(v.device() == y.device(), "fastsupernet::bn_act: ", name, " is on ", v.device(), ", y on ",
              y.device());
}

void check_like_y(const at::Tensor& t, const at::Tensor& y, const char* name) {
  TORCH_CHECK(t.sizes() == y.sizes(), "fastsupernet::bn_act: ", name, " must have y's shape ", y.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == y.scalar_type(), "fastsupernet::bn_act: ", name, " must be ", y.scalar_type(),
              ", got ", t.scalar_type());
}

void check_y(const at::Tensor& y) {
  TORCH_CHECK(y.dim() == 4, "fastsupernet::bn_act expects y of shape (N, C, H, W), got ", y.sizes());
  TORCH_CHECK(y.scalar_type() == at::kFloat || y.scalar_type() == at::kDouble,
              "fastsupernet::bn_act (CPU) takes float32 or float64, got ", y.scalar_type());
}

template <Act A, typename T>
inline T activate(T z, T slope) {
  if constexpr (A == Act::kRelu) {
    return z < T(0) ? T(0) : z;  // NaN passes through, as torch.relu
  } else if constexpr (A == Act::kPrelu) {
    return z > T(0) ? z : slope * z;
  } else {
    return z;
  }
}

// One element of backward pass 1: z rebuilt from y (and the residual r when R), gz = g * act'(z)
// into gz_out, and the float64 sums of gz, gz * y and (PReLU) g * z where the slope acts.
template <Act A, bool R, typename T>
inline void pass1_element(T y, T r, T g, T a, T b, T slope, T m, T& gz_out, double& s1, double& s2, double& sp) {
  T z = y * a;
  z = z + b;
  if constexpr (R) z = z + r;
  T gz = g;
  if constexpr (A == Act::kRelu) {
    gz = z <= T(0) ? T(0) : g;
  } else if constexpr (A == Act::kPrelu) {
    gz = z > T(0) ? g : slope * g;
    sp += z > T(0) ? 0.0 : static_cast<double>(g) * static_cast<double>(z);
  }
  gz_out = gz * m;
  s1 += static_cast<double>(gz);
  s2 += static_cast<double>(gz) * static_cast<double>(y);
}

// Calls f(std::integral_constant<Act, A>{}) for the runtime activation.
template <typename F>
void with_act(Act act, F&& f) {
  switch (act) {
    case Act::kRelu:
      f(std::integral_constant<Act, Act::kRelu>{});
      break;
    case Act::kPrelu:
      f(std::integral_constant<Act, Act::kPrelu>{});
      break;
    default:
      f(std::integral_constant<Act, Act::kNone>{});
  }
}

template <Act A, typename T>
void forward_planes(const T* y, const T* res, const T* scale, const T* shift, const T* rscale, const T* rshift,
                    T* out, int64_t C, int64_t HW, int64_t plane_begin, int64_t plane_end, T slope) {
  for (int64_t p = plane_begin; p < plane_end; ++p) {
    const int64_t c = p % C;
    const T a = scale[c], b = shift[c];
    const T* yp = y + p * HW;
    T* op = out + p * HW;
    if (res == nullptr) {
#pragma omp simd
      for (int64_t i = 0; i < HW; ++i) {
        T v = yp[i] * a;
        v = v + b;
        op[i] = activate<A>(v, slope);
      }
    } else if (rscale == nullptr) {
      const T* rp = res + p * HW;
#pragma omp simd
      for (int64_t i = 0; i < HW; ++i) {
        T v = yp[i] * a;
        v = v + b;
        v = v + rp[i];
        op[i] = activate<A>(v, slope);
      }
    } else {
      const T ra = rscale[c], rb = rshift[c];
      const T* rp = res + p * HW;
#pragma omp simd
      for (int64_t i = 0; i < HW; ++i) {
        T v = yp[i] * a;
        v = v + b;
        T r = rp[i] * ra;
        r = r + rb;
        v = v + r;
        op[i] = activate<A>(v, slope);
      }
    }
  }
}

#ifdef FASTSUPERNET_HAVE_AVX2
#define FSN_BN_HAVE_AVX2 1
// 8 floats at p, bypassing the caches where `stream` and p is 32-byte aligned (outputs of
// conv::kStreamOutBytes and more). Compiled for AVX2 without FMA like this file's other AVX2
// code, so it cannot call Avx2Vec<float>::store_stream (AVX2 + FMA).
__attribute__((target("avx2"))) inline void store8(float* p, __m256 v, bool stream) {
  if (stream && (reinterpret_cast<uintptr_t>(p) & 31) == 0) {
    _mm256_stream_ps(p, v);
  } else {
    _mm256_storeu_ps(p, v);
  }
}

// The forward planes for float32 with AVX2 (the generic loop's PReLU select is not
// vectorised): the same per-element arithmetic, 8 lanes at a time, then a scalar tail.
template <Act A>
__attribute__((target("avx2"))) void forward_planes_avx2(const float* y, const float* res, const float* scale,
                                                        const float* shift, const float* rscale, const float* rshift,
                                                        float* out, int64_t C, int64_t HW, int64_t plane_begin,
                                                        int64_t plane_end, float slope, bool stream) {
  const __m256 vs = _mm256_set1_ps(slope), zero = _mm256_setzero_ps();
  for (int64_t p = plane_begin; p < plane_end; ++p) {
    const int64_t c = p % C;
    const float a = scale[c], b = shift[c];
    const float ra = rscale != nullptr ? rscale[c] : 1.0f, rb = rshift != nullptr ? rshift[c] : 0.0f;
    const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b), vra = _mm256_set1_ps(ra), vrb = _mm256_set1_ps(rb);
    const float* yp = y + p * HW;
    const float* rp = res != nullptr ? res + p * HW : nullptr;
    float* op = out + p * HW;
    int64_t i = 0;
    for (; i + 8 <= HW; i += 8) {
      __m256 v = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(yp + i), va), vb);
      if (rp != nullptr) {
        __m256 r = _mm256_loadu_ps(rp + i);
        if (rscale != nullptr) r = _mm256_add_ps(_mm256_mul_ps(r, vra), vrb);
        v = _mm256_add_ps(v, r);
      }
      if constexpr (A == Act::kRelu) {
        v = _mm256_blendv_ps(v, zero, _mm256_cmp_ps(v, zero, _CMP_LT_OQ));  // z < 0 ? 0 : z (NaN kept)
      } else if constexpr (A == Act::kPrelu) {
        v = _mm256_blendv_ps(_mm256_mul_ps(vs, v), v, _mm256_cmp_ps(v, zero, _CMP_GT_OQ));
      }
      store8(op + i, v, stream);
    }
    for (; i < HW; ++i) {
      float v = yp[i] * a;
      v = v + b;
      if (rp != nullptr) {
        float r = rp[i];
        if (rscale != nullptr) {
          r = r * ra;
          r = r + rb;
        }
        v = v + r;
      }
      op[i] = activate<A>(v, slope);
    }
  }
}
#endif

// AVX2 when the CPU has it, unless FASTSUPERNET_CPU_KERNEL=generic (read at every call).
bool use_avx2() {
#ifdef FSN_BN_HAVE_AVX2
  static const bool cpu_ok = __builtin_cpu_supports("avx2");
  return cpu_ok && !conv::generic_kernel_forced();
#else
  return false;
#endif
}

at::Tensor bn_act_cpu(const at::Tensor& y_in, const at::Tensor& scale_in, const at::Tensor& shift_in,
                      const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& res_scale,
                      const std::optional<at::Tensor>& res_shift, c10::string_view activation,
                      const std::optional<at::Tensor>& slope) {
  check_y(y_in);
  const Act act = parse_activation(activation);
  const int64_t N = y_in.size(0), C = y_in.size(1), HW = y_in.size(2) * y_in.size(3);
  check_channel_vector(scale_in, C, y_in, "scale");
  check_channel_vector(shift_in, C, y_in, "shift");
  const bool has_res = residual.has_value() && residual->defined();
  const bool has_rs = res_scale.has_value() && res_scale->defined();
  const bool has_rb = res_shift.has_value() && res_shift->defined();
  TORCH_CHECK(has_rs == has_rb, "fastsupernet::bn_act: res_scale and res_shift come together");
  TORCH_CHECK(!has_rs || has_res, "fastsupernet::bn_act: res_scale given without a residual");
  at::Tensor res, rs, rb;
  if (has_res) {
    check_like_y(*residual, y_in, "residual");
    res = residual->contiguous();
  }
  if (has_rs) {
    check_channel_vector(*res_scale, C, y_in, "res_scale");
    check_channel_vector(*res_shift, C, y_in, "res_shift");
    rs = res_scale->contiguous();
    rb = res_shift->contiguous();
  }
  if (act == Act::kPrelu) {
    TORCH_CHECK(slope.has_value() && slope->defined() && slope->numel() == 1,
                "fastsupernet::bn_act: activation 'prelu' needs a 1-element slope tensor");
  }
  const at::Tensor y = y_in.contiguous();
  const at::Tensor scale = scale_in.contiguous(), shift = shift_in.contiguous();
  at::Tensor out = at::empty_like(y, at::MemoryFormat::Contiguous);
  if (y.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "fastsupernet::bn_act", [&] {
    const scalar_t s = act == Act::kPrelu ? slope->to(y.scalar_type()).item<scalar_t>() : scalar_t(0);
    const scalar_t* rp = has_res ? res.data_ptr<scalar_t>() : nullptr;
    const scalar_t* rsp = has_rs ? rs.data_ptr<scalar_t>() : nullptr;
    const scalar_t* rbp = has_rs ? rb.data_ptr<scalar_t>() : nullptr;
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(HW, 1));
    const bool avx = use_avx2();
    const bool stream = conv::stream_output(out.nbytes());  // as the conv kernels: large outputs
    at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
      with_act(act, [&](auto a) {
#ifdef FSN_BN_HAVE_AVX2
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (avx) {
            forward_planes_avx2<decltype(a)::value>(y.data_ptr<float>(), rp, scale.data_ptr<float>(),
                                                    shift.data_ptr<float>(), rsp, rbp, out.data_ptr<float>(), C, HW,
                                                    begin, end, s, stream);
            if (stream) std::atomic_thread_fence(std::memory_order_seq_cst);  // order the streaming stores
            return;
          }
        }
#endif
        forward_planes<decltype(a)::value, scalar_t>(y.data_ptr<scalar_t>(), rp, scale.data_ptr<scalar_t>(),
                                                     shift.data_ptr<scalar_t>(), rsp, rbp, out.data_ptr<scalar_t>(),
                                                     C, HW, begin, end, s);
      });
    });
  });
  return out;
}

// Pass 1 of channel c: gz = grad_out * act'(z) into gz_out, and the channel's float64 sums.
// (kStore false: the sums only; gz_out is not touched.)
template <Act A, bool R, typename T, bool kStore = true>
void channel_pass1(const T* g, const T* y, const T* res, T a, T b, T slope, T m, T* gz_out, int64_t N, int64_t C,
                   int64_t HW, int64_t c, double& sum_gz, double& sum_gz_y, double& sum_slope) {
  double s1 = 0.0, s2 = 0.0, sp = 0.0;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t off = (n * C + c) * HW;
    const T* gp = g + off;
    const T* yp = y + off;
    const T* rp = R ? res + off : nullptr;
    T* zp = kStore ? gz_out + off : nullptr;
#pragma omp simd reduction(+ : s1, s2, sp)
    for (int64_t i = 0; i < HW; ++i) {
      T gz;
      pass1_element<A, R>(yp[i], R ? rp[i] : T(0), gp[i], a, b, slope, m, gz, s1, s2, sp);
      if constexpr (kStore) zp[i] = gz;
    }
  }
  sum_gz = s1;
  sum_gz_y = s2;
  sum_slope = sp;
}

// One element of pass 2: grad_y = gz * k1 + k0 - y * k2, each step rounded on its own.
template <typename T>
inline T pass2_element(T gz, T y, T k1, T k0, T k2) {
  T v = gz * k1;
  v = v + k0;
  T w = y * k2;
  return v - w;
}

// Pass 2 of channel c: grad_y = gz * k1 + k0 - y * k2 (in place over gz allowed).
template <typename T>
void channel_pass2(const T* gz, const T* y, T k1, T k0, T k2, T* gy, int64_t N, int64_t C, int64_t HW, int64_t c) {
  for (int64_t n = 0; n < N; ++n) {
    const int64_t off = (n * C + c) * HW;
    const T* zp = gz + off;
    const T* yp = y + off;
    T* op = gy + off;
#pragma omp simd
    for (int64_t i = 0; i < HW; ++i) op[i] = pass2_element(zp[i], yp[i], k1, k0, k2);
  }
}

// Pass 2 of channel c in train mode without a residual, for large outputs (see
// bn_act_backward_cpu): gz rebuilt from grad_out and y (the same arithmetic as pass 1, which
// then stores nothing), grad_y = gz * k1 + k0 - y * k2.
template <Act A, typename T>
void channel_pass2_recompute(const T* g, const T* y, T a, T b, T slope, T k1, T k0, T k2, T* gy, int64_t N,
                             int64_t C, int64_t HW, int64_t c) {
  for (int64_t n = 0; n < N; ++n) {
    const int64_t off = (n * C + c) * HW;
    const T* gp = g + off;
    const T* yp = y + off;
    T* op = gy + off;
    for (int64_t i = 0; i < HW; ++i) {
      double d0 = 0.0, d1 = 0.0, d2 = 0.0;
      T gz;
      pass1_element<A, false>(yp[i], T(0), gp[i], a, b, slope, T(1), gz, d0, d1, d2);
      op[i] = pass2_element(gz, yp[i], k1, k0, k2);
    }
  }
}

// Eval-mode pass 2 of channel c: grad_y = gz * a (in place over gz allowed).
template <typename T>
void channel_scale(const T* gz, T a, T* gy, int64_t N, int64_t C, int64_t HW, int64_t c) {
  for (int64_t n = 0; n < N; ++n) {
    const int64_t off = (n * C + c) * HW;
    const T* zp = gz + off;
    T* op = gy + off;
#pragma omp simd
    for (int64_t i = 0; i < HW; ++i) op[i] = zp[i] * a;
  }
}

#ifdef FSN_BN_HAVE_AVX2
// Pass 1 for float32 with AVX2 (the compiler does not vectorise the generic version's selects):
// the same per-element arithmetic; the float64 sums run over 4-lane accumulators.
template <Act A, bool R, bool kStore = true>
__attribute__((target("avx2"))) void channel_pass1_avx2(const float* g, const float* y, const float* res, float a,
                                                        float b, float slope, float m, float* gz_out, int64_t N,
                                                        int64_t C, int64_t HW, int64_t c, double& sum_gz,
                                                        double& sum_gz_y, double& sum_slope) {
  const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b), vs = _mm256_set1_ps(slope), vm = _mm256_set1_ps(m);
  const __m256 zero = _mm256_setzero_ps();
  __m256d s1 = _mm256_setzero_pd(), s2 = _mm256_setzero_pd(), sp = _mm256_setzero_pd();
  double t1 = 0.0, t2 = 0.0, tp = 0.0;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t off = (n * C + c) * HW;
    const float* gp = g + off;
    const float* yp = y + off;
    const float* rp = R ? res + off : nullptr;
    float* zp = kStore ? gz_out + off : nullptr;
    int64_t i = 0;
    for (; i + 8 <= HW; i += 8) {
      const __m256 yv = _mm256_loadu_ps(yp + i);
      __m256 z = _mm256_add_ps(_mm256_mul_ps(yv, va), vb);
      if constexpr (R) z = _mm256_add_ps(z, _mm256_loadu_ps(rp + i));
      const __m256 gv = _mm256_loadu_ps(gp + i);
      __m256 gz = gv;
      if constexpr (A == Act::kRelu) {
        gz = _mm256_and_ps(_mm256_cmp_ps(z, zero, _CMP_NLE_UQ), gv);  // z <= 0 ? 0 : g (NaN: g)
      } else if constexpr (A == Act::kPrelu) {
        const __m256 pos = _mm256_cmp_ps(z, zero, _CMP_GT_OQ);
        gz = _mm256_blendv_ps(_mm256_mul_ps(vs, gv), gv, pos);
        const __m256 gneg = _mm256_andnot_ps(pos, gv);  // g where z <= 0 (or NaN), else 0
        const __m256 zneg = _mm256_andnot_ps(pos, z);
        sp = _mm256_add_pd(sp, _mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(gneg)),
                                             _mm256_cvtps_pd(_mm256_castps256_ps128(zneg))));
        sp = _mm256_add_pd(sp, _mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(gneg, 1)),
                                             _mm256_cvtps_pd(_mm256_extractf128_ps(zneg, 1))));
      }
      if constexpr (kStore) _mm256_storeu_ps(zp + i, _mm256_mul_ps(gz, vm));
      const __m256d glo = _mm256_cvtps_pd(_mm256_castps256_ps128(gz));
      const __m256d ghi = _mm256_cvtps_pd(_mm256_extractf128_ps(gz, 1));
      s1 = _mm256_add_pd(s1, _mm256_add_pd(glo, ghi));
      s2 = _mm256_add_pd(s2, _mm256_mul_pd(glo, _mm256_cvtps_pd(_mm256_castps256_ps128(yv))));
      s2 = _mm256_add_pd(s2, _mm256_mul_pd(ghi, _mm256_cvtps_pd(_mm256_extractf128_ps(yv, 1))));
    }
    for (; i < HW; ++i) {
      float gz;
      pass1_element<A, R>(yp[i], R ? rp[i] : 0.0f, gp[i], a, b, slope, m, gz, t1, t2, tp);
      if constexpr (kStore) zp[i] = gz;
    }
  }
  alignas(32) double l1[4], l2[4], lp[4];
  _mm256_store_pd(l1, s1);
  _mm256_store_pd(l2, s2);
  _mm256_store_pd(lp, sp);
  sum_gz = ((l1[0] + l1[1]) + (l1[2] + l1[3])) + t1;
  sum_gz_y = ((l2[0] + l2[1]) + (l2[2] + l2[3])) + t2;
  sum_slope = ((lp[0] + lp[1]) + (lp[2] + lp[3])) + tp;
}

// channel_pass2_recompute for float32 with AVX2: the same per-element arithmetic, 8 lanes at a
// time; aligned whole vectors of grad_y bypass the caches (it runs for large outputs only).
template <Act A>
__attribute__((target("avx2"))) void channel_pass2_recompute_avx2(const float* g, const float* y, float a, float b,
                                                                  float slope, float k1, float k0, float k2,
                                                                  float* gy, int64_t N, int64_t C, int64_t HW,
                                                                  int64_t c) {
  const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b), vs = _mm256_set1_ps(slope);
  const __m256 v1 = _mm256_set1_ps(k1), v0 = _mm256_set1_ps(k0), v2 = _mm256_set1_ps(k2), zero = _mm256_setzero_ps();
  for (int64_t n = 0; n < N; ++n) {
    const int64_t off = (n * C + c) * HW;
    const float* gp = g + off;
    const float* yp = y + off;
    float* op = gy + off;
    int64_t i = 0;
    for (; i + 8 <= HW; i += 8) {
      const __m256 yv = _mm256_loadu_ps(yp + i);
      const __m256 z = _mm256_add_ps(_mm256_mul_ps(yv, va), vb);
      const __m256 gv = _mm256_loadu_ps(gp + i);
      __m256 gz = gv;
      if constexpr (A == Act::kRelu) {
        gz = _mm256_and_ps(_mm256_cmp_ps(z, zero, _CMP_NLE_UQ), gv);
      } else if constexpr (A == Act::kPrelu) {
        gz = _mm256_blendv_ps(_mm256_mul_ps(vs, gv), gv, _mm256_cmp_ps(z, zero, _CMP_GT_OQ));
      }
      store8(op + i, _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(gz, v1), v0), _mm256_mul_ps(yv, v2)), true);
    }
    for (; i < HW; ++i) {
      double d0 = 0.0, d1 = 0.0, d2 = 0.0;
      float gz;
      pass1_element<A, false>(yp[i], 0.0f, gp[i], a, b, slope, 1.0f, gz, d0, d1, d2);
      op[i] = pass2_element(gz, yp[i], k1, k0, k2);
    }
  }
}
#endif

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& y_in, const at::Tensor& scale_in, const at::Tensor& shift_in,
    const std::optional<at::Tensor>& residual, c10::string_view activation, const std::optional<at::Tensor>& slope,
    const std::optional<at::Tensor>& mean_opt, const std::optional<at::Tensor>& invstd_opt) {
  const bool train = mean_opt.has_value() && mean_opt->defined();
  TORCH_CHECK_VALUE(train == (invstd_opt.has_value() && invstd_opt->defined()),
                    "fastsupernet::bn_act_backward: mean and invstd must be given together (train mode) or both "
                    "omitted (scale and shift as plain inputs)");
  check_y(y_in);
  const Act act = parse_activation(activation);
  const int64_t N = y_in.size(0), C = y_in.size(1), HW = y_in.size(2) * y_in.size(3);
  check_like_y(grad_out_in, y_in, "grad_out");
  check_channel_vector(scale_in, C, y_in, "scale");
  check_channel_vector(shift_in, C, y_in, "shift");
  if (train) {
    check_channel_vector(*mean_opt, C, y_in, "mean");
    check_channel_vector(*invstd_opt, C, y_in, "invstd");
  }
  const bool has_res = residual.has_value() && residual->defined();
  at::Tensor res;
  if (has_res) {
    check_like_y(*residual, y_in, "residual");
    res = residual->contiguous();
  }
  if (act == Act::kPrelu) {
    TORCH_CHECK(slope.has_value() && slope->defined() && slope->numel() == 1,
                "fastsupernet::bn_act_backward: activation 'prelu' needs a 1-element slope tensor");
  }
  const at::Tensor g = grad_out_in.contiguous(), y = y_in.contiguous();
  const at::Tensor scale = scale_in.contiguous(), shift = shift_in.contiguous();
  const at::Tensor mean = train ? mean_opt->contiguous() : at::Tensor();
  const at::Tensor invstd = train ? invstd_opt->contiguous() : at::Tensor();
  // gz is the residual's gradient when there is a residual; otherwise grad_y overwrites it.
  // In train mode without a residual and a grad_y of 16 MiB or more (conv::stream_output), pass
  // 1 stores nothing and pass 2 rebuilds gz from grad_out and y (the same arithmetic, so the
  // same bits) and writes grad_y with streaming stores: one tensor written instead of two, no
  // read of the lines it writes (interleaved with FASTSUPERNET_CPU_STREAM_STORES=0, two runs:
  // 64x144x32x32 1.07x-1.17x, 256x64x16x16 1.20x-1.27x; rebuilding without the streaming
  // stores was 0.90x-0.97x, so smaller outputs keep pass 1's store).
  at::Tensor gz = at::empty_like(y, at::MemoryFormat::Contiguous);
  at::Tensor gy = has_res ? at::empty_like(y, at::MemoryFormat::Contiguous) : gz;
  const bool recompute = train && !has_res && conv::stream_output(gy.nbytes());
  at::Tensor grad_gamma = at::empty({C}, scale.options());
  at::Tensor grad_beta = at::empty({C}, scale.options());
  at::Tensor grad_slope = act == Act::kPrelu ? at::empty({1}, slope->options()) : at::empty({0}, scale.options());
  std::vector<double> slope_part(static_cast<size_t>(C), 0.0);
  const double n_total = static_cast<double>(N * HW);
  const bool avx = use_avx2();
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "fastsupernet::bn_act_backward", [&] {
    const scalar_t s = act == Act::kPrelu ? slope->to(y.scalar_type()).item<scalar_t>() : scalar_t(0);
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* rp = has_res ? res.data_ptr<scalar_t>() : nullptr;
    const scalar_t* ap = scale.data_ptr<scalar_t>();
    const scalar_t* bp = shift.data_ptr<scalar_t>();
    const scalar_t* mp = train ? mean.data_ptr<scalar_t>() : nullptr;
    const scalar_t* ip = train ? invstd.data_ptr<scalar_t>() : nullptr;
    scalar_t* zp = gz.data_ptr<scalar_t>();
    scalar_t* op = gy.data_ptr<scalar_t>();
    scalar_t* ggp = grad_gamma.data_ptr<scalar_t>();
    scalar_t* gbp = grad_beta.data_ptr<scalar_t>();
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        double s1 = 0.0, s2 = 0.0, sp = 0.0;
        // eval mode without residual: pass 1 writes grad_y = gz * scale itself (no pass 2);
        // otherwise gz (times 1, exact)
        const scalar_t mul = !train && rp == nullptr ? ap[c] : scalar_t(1);
        with_act(act, [&](auto a_) {
          constexpr Act A = decltype(a_)::value;
#ifdef FSN_BN_HAVE_AVX2
          if constexpr (std::is_same_v<scalar_t, float>) {
            if (avx) {
              if (rp != nullptr) {
                channel_pass1_avx2<A, true>(gp, yp, rp, ap[c], bp[c], s, mul, zp, N, C, HW, c, s1, s2, sp);
              } else if (recompute) {
                channel_pass1_avx2<A, false, false>(gp, yp, rp, ap[c], bp[c], s, mul, zp, N, C, HW, c, s1, s2, sp);
              } else {
                channel_pass1_avx2<A, false>(gp, yp, rp, ap[c], bp[c], s, mul, zp, N, C, HW, c, s1, s2, sp);
              }
              return;
            }
          }
#endif
          if (rp != nullptr) {
            channel_pass1<A, true, scalar_t>(gp, yp, rp, ap[c], bp[c], s, mul, zp, N, C, HW, c, s1, s2, sp);
          } else if (recompute) {
            channel_pass1<A, false, scalar_t, false>(gp, yp, rp, ap[c], bp[c], s, mul, zp, N, C, HW, c, s1, s2, sp);
          } else {
            channel_pass1<A, false, scalar_t>(gp, yp, rp, ap[c], bp[c], s, mul, zp, N, C, HW, c, s1, s2, sp);
          }
        });
        const double a = static_cast<double>(ap[c]);
        if (!train) {  // grad_y = gz * a (gz + 0 - y * 0 would turn an infinite y into NaN)
          if (rp != nullptr) channel_scale<scalar_t>(zp, ap[c], op, N, C, HW, c);
          ggp[c] = static_cast<scalar_t>(s2);
          gbp[c] = static_cast<scalar_t>(s1);
          slope_part[static_cast<size_t>(c)] = sp;
          continue;
        }
        const double m = static_cast<double>(mp[c]), is = static_cast<double>(ip[c]);
        const double dot = s2 - m * s1;  // sum(gz * (y - mean))
        const double k2 = n_total > 0 ? a * is * is * dot / n_total : 0.0;
        const double k0 = n_total > 0 ? -a * s1 / n_total + k2 * m : 0.0;
        if (recompute) {
          with_act(act, [&](auto a_) {
            constexpr Act A = decltype(a_)::value;
#ifdef FSN_BN_HAVE_AVX2
            if constexpr (std::is_same_v<scalar_t, float>) {
              if (avx) {
                channel_pass2_recompute_avx2<A>(gp, yp, ap[c], bp[c], s, ap[c], static_cast<float>(k0),
                                                static_cast<float>(k2), op, N, C, HW, c);
                return;
              }
            }
#endif
            channel_pass2_recompute<A, scalar_t>(gp, yp, ap[c], bp[c], s, ap[c], static_cast<scalar_t>(k0),
                                                 static_cast<scalar_t>(k2), op, N, C, HW, c);
          });
        } else {
          channel_pass2<scalar_t>(zp, yp, static_cast<scalar_t>(a), static_cast<scalar_t>(k0),
                                  static_cast<scalar_t>(k2), op, N, C, HW, c);
        }
        ggp[c] = static_cast<scalar_t>(is * dot);
        gbp[c] = static_cast<scalar_t>(s1);
        slope_part[static_cast<size_t>(c)] = sp;
      }
      if (recompute) std::atomic_thread_fence(std::memory_order_seq_cst);  // order the streaming stores
    });
  });
  if (act == Act::kPrelu) {
    double total = 0.0;
    for (double v : slope_part) total += v;
    grad_slope.fill_(total);
  }
  at::Tensor grad_res = has_res ? gz : at::empty({0}, y.options());
  return {gy, grad_res, grad_gamma, grad_beta, grad_slope};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastsupernet, CPU, m) {
  m.impl("bn_act", &bn_act_cpu);
  m.impl("bn_act_backward", &bn_act_backward_cpu);
}

}  // namespace fastsupernet
