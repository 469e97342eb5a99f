// Register-tiled loops of the multi_conv2d_weight_grad CPU kernel (see conv_weight_grad.cpp).
// No include guard and no includes: conv_weight_grad.cpp includes this file twice, into a
// namespace compiled for AVX2 + FMA (between `#pragma GCC push_options / target` and
// `pop_options`, so no other header is compiled with those flags) and into a portable one.
// Expects in scope: int64_t, std::min, std::memcpy, struct Packed, Lanes<T>, kRows, kCols,
// kVecBytes and the FSN_WG_INLINE and FSN_WG_IN_REGISTER macros.

// acc[r][c] += sum over the item of g row r * x column c; res[r * res_stride + c] += lane sums.
// (Loads through an unaligned vector type and fully unrolled r/c loops keep the R*C
// accumulators and the C input vectors in registers.)
template <typename T, int R, int C>
FSN_WG_INLINE void tile(const T* g, const T* const* xcol, const Packed& p, T* res, int64_t res_stride) {
  typedef T vec __attribute__((vector_size(kVecBytes)));
  typedef T uvec __attribute__((vector_size(kVecBytes), aligned(sizeof(T))));
  constexpr int L = Lanes<T>::L;
  static_assert(C >= 1 && C <= 3, "tile: 1 to 3 columns");
  vec acc[R][C];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[r][c] = vec{};
  const int64_t row_len = p.run_len;
  const int64_t g_row = p.g_row;
  for (int64_t img = 0; img < p.images; ++img) {
    for (int64_t h = 0; h < p.runs; ++h) {
      const T* gr = g + img * p.g_img + h * p.g_run;
      const int64_t xo = img * p.x_img + h * p.x_run;
      const T* x0 = xcol[0] + xo;
      const T* x1 = xcol[C > 1 ? 1 : 0] + xo;
      const T* x2 = xcol[C > 2 ? 2 : 0] + xo;
      for (int64_t v = 0; v < row_len; v += L) {
        vec xv[C];
        xv[0] = *reinterpret_cast<const uvec*>(x0 + v);
        if (C > 1) xv[C > 1 ? 1 : 0] = *reinterpret_cast<const uvec*>(x1 + v);
        if (C > 2) xv[C > 2 ? 2 : 0] = *reinterpret_cast<const uvec*>(x2 + v);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          vec gv = *reinterpret_cast<const uvec*>(gr + r * g_row + v);
          FSN_WG_IN_REGISTER(gv);  // one load per row, not one per multiply-add
#pragma GCC unroll 4
          for (int c = 0; c < C; ++c) acc[r][c] += gv * xv[c];
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      T s = 0;
      for (int l = 0; l < L; ++l) s += acc[r][c][l];
      res[r * res_stride + c] += s;
    }
  }
}

template <typename T, int R>
FSN_WG_INLINE void tile_cols(int cols, const T* g, const T* const* xcol, const Packed& p, T* res, int64_t rs) {
  if (cols == 3) tile<T, R, 3>(g, xcol, p, res, rs);
  else if (cols == 2) tile<T, R, 2>(g, xcol, p, res, rs);
  else tile<T, R, 1>(g, xcol, p, res, rs);
}

// All tiles of one candidate in one item: rows [0, ow), columns [0, ncols). Column blocks
// outside, row blocks inside: a block's column addresses are worked out once, and its input
// runs stay in L1 while the gradient rows stream past.
template <typename T>
FSN_WG_INLINE void candidate_tiles(const T* gbuf, const T* xbuf, const Packed& p, int64_t ow, int64_t iw, int64_t kh,
                                   int64_t kw, T* res) {
  const int64_t ncols = iw * kh * kw;
  const T* xcol[kCols];
  for (int64_t o0 = 0; o0 < ow; o0 += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, ow - o0));
    const T* g = gbuf + o0 * p.g_row;
    for (int64_t q0 = 0; q0 < ncols; q0 += kCols) {
      const int cols = static_cast<int>(std::min<int64_t>(kCols, ncols - q0));
      for (int c = 0; c < cols; ++c) {
        const int64_t q = q0 + c;
        const int64_t ch = q / (kh * kw), i = (q / kw) % kh, j = q % kw;
        xcol[c] = xbuf + ch * p.x_chan + i * p.x_row + (j % p.stride) * p.wph + j / p.stride;
      }
      T* out = res + o0 * ncols + q0;
      switch (rows) {
        case 4: tile_cols<T, 4>(cols, g, xcol, p, out, ncols); break;
        case 3: tile_cols<T, 3>(cols, g, xcol, p, out, ncols); break;
        case 2: tile_cols<T, 2>(cols, g, xcol, p, out, ncols); break;
        default: tile_cols<T, 1>(cols, g, xcol, p, out, ncols); break;
      }
    }
  }
}

// The entry points of this instruction set.
inline void candidate_tiles_f32(const float* g, const float* x, const Packed& p, int64_t ow, int64_t iw, int64_t kh,
                                int64_t kw, float* res) {
  candidate_tiles<float>(g, x, p, ow, iw, kh, kw, res);
}
inline void candidate_tiles_f64(const double* g, const double* x, const Packed& p, int64_t ow, int64_t iw,
                                int64_t kh, int64_t kw, double* res) {
  candidate_tiles<double>(g, x, p, ow, iw, kh, kw, res);
}
