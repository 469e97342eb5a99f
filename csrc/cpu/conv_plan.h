// Plan of one fastsupernet::multi_conv2d call on CPU, shared by the host code (conv.cpp) and
// the per-instruction-set kernels (conv_avx2.cpp, conv_generic.cpp).
//
// This header is plain C++ (no torch): the kernels are compiled with function-level target
// attributes, and nothing from torch may be instantiated inside them.
//
// Vocabulary (see conv.cpp for the algorithm):
//   row      one output channel of the packed output, 0 <= row < M = sum(out_widths)
//   segment  a run of consecutive candidates with the same input offset; its rows share one
//            source of input planes per image
//   block    up to kRows<T> consecutive rows of a segment, computed together; the block's
//            weights are packed as a (depth, rows) panel, zero beyond each row's own depth
//   vector   kLanes<T> consecutive output pixels of one output row (fewer at the end of a
//            row when the output width is not a multiple of kLanes<T>)
//   item     one unit of parallel work: one image and a contiguous range of blocks
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

// x86-64 builds with GCC or Clang compile AVX2 + FMA versions of the CPU kernels (function
// target attributes, chosen at run time); FASTSUPERNET_NO_AVX2 leaves them out.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(FASTSUPERNET_NO_AVX2)
#define FASTSUPERNET_HAVE_AVX2 1
#endif

namespace fastsupernet {
namespace conv {

// Register tile of the micro-kernel: kRows rows x kVecs vectors of kLanes values. Both
// instruction-set versions use the same blocking, so the plan does not depend on the ISA.
template <typename T>
struct Blocking;
template <>
struct Blocking<float> {
  static constexpr int kLanes = 8;
  static constexpr int kRows = 4;
  static constexpr int kVecs = 3;
};
template <>
struct Blocking<double> {
  static constexpr int kLanes = 4;
  static constexpr int kRows = 4;
  static constexpr int kVecs = 3;
};

// Outputs from this size on are written with streaming stores (ConvJob::stream_out), unless
// FASTSUPERNET_CPU_STREAM_STORES=0 (read at every call). Measured on a 2-core AVX-512 VM:
// fast ranking 1.07x, Track-1 multi-candidate calls 1.07x-1.27x, training step 1.01x.
constexpr int64_t kStreamOutBytes = int64_t(16) << 20;

// ConvJob::plane_s2_16: padded rows of 9 + 8 values, 17 padded rows, in 19 vectors of 16.
constexpr int kPlaneS2RowLen = 17;
constexpr int kPlaneS2Vectors = 19;
inline bool stream_output(int64_t bytes) {
  const char* env = std::getenv("FASTSUPERNET_CPU_STREAM_STORES");
  return bytes >= kStreamOutBytes && (env == nullptr || std::strcmp(env, "0") != 0);
}

enum Activation : int { kActNone = 0, kActRelu = 1, kActPrelu = 2 };

// Statistics accumulators per row in a thread's `lanes` buffer: kStatLanes float64 partial
// sums, then kStatLanes partial sums of squares (an instruction set uses as many as it likes).
constexpr int kStatLanes = 8;

struct Segment {
  int64_t channel0;     // first channel of x the segment reads
  int64_t width;        // channels read (the widest candidate of the segment)
  int64_t block_begin;  // blocks [block_begin, block_end) of the plan
  int64_t block_end;
};

struct Block {
  int64_t row0;   // first row
  int64_t depth;  // reduction length: max over its rows of in_width * kh * kw
  int64_t a_off;  // offset of the packed (depth, rows) panel in ConvJob::a
  int32_t rows;   // 1..kRows
  // Reduction index k of the block reads ConvJob::tap_off[tap0 + k] (one table for all
  // blocks of multi_conv2d; the phases of the stride-2 input gradient have their own).
  int64_t tap0 = 0;
};

// In a strided scratch row, stride phase ph holds the input columns iw = src, src + stride, ...
// (count of them) at positions dst, dst + 1, ... of the row.
struct PhaseRun {
  int64_t dst, src, count;
};

template <typename T>
struct ConvJob {
  // Output: (N, M, Ho, Wo) contiguous; residual (if any) has the same shape and layout.
  int64_t N = 0, M = 0, out_plane = 0;  // out_plane = Ho * Wo
  T* out = nullptr;
  const T* residual = nullptr;

  // Output vectors of one image, in row-major order; identical for every image.
  int64_t num_vecs = 0;
  const int64_t* vec_src = nullptr;  // offset of lane 0's input (tap 0) in the source planes
  const int64_t* vec_dst = nullptr;  // offset of lane 0 in an output plane
  const int32_t* vec_len = nullptr;  // lanes used, 1..kLanes
  bool all_vecs_full = true;

  // Offset of tap k = (ci * kh + i) * kw + j in the source planes, relative to vec_src.
  const int64_t* tap_off = nullptr;

  // Input x (element strides), and how the source planes are made from it.
  const T* x = nullptr;
  int64_t x_sN = 0, x_sC = 0, x_sH = 0, x_sW = 0, H = 0, W = 0, kh = 1, kw = 1;
  // direct: the source planes are x's own planes (1x1, stride 1, no padding, unit W stride).
  // Otherwise, per image and segment, the channels are copied into a zero-padded scratch of
  // `width` planes of `scratch_plane` values: padded row r (r < scratch_rows) holds stride
  // phases of `phase_len` values each; padded column c sits at (c % stride) * phase_len + c / stride.
  // The scratch must be zero-filled when allocated: only input positions are written, the
  // same ones for every image and segment, so the padding stays zero. Rows no tap reads
  // (kh < stride) and phases no tap reads (kw < stride) are not written: copy_rows lists the
  // padded rows to fill, phase_runs the pieces of a row (strided convs only).
  bool direct = false;
  // A 16x16 input of a 3x3 stride-2 padding-1 layer (float32, unit column stride) on the
  // AVX-512 kernel: its padded rows are row_len = 17 values apart (the one phase value no tap
  // reads dropped), planes scratch_plane = 304 values (19 aligned vectors; the scratch is
  // 64-byte aligned), and each plane is written by 19 whole-vector stores, each a permute of
  // two input rows (Vec<float>::copy_plane_s2_16) instead of a misaligned store per phase and row.
  bool plane_s2_16 = false;
  // The copy prefetches its source rows ahead (rows skipped, or several segments: build_scratch).
  bool copy_prefetch = false;
  // Stride 2, unit column stride: phase runs deinterleave_even and deinterleave_even ^ 1 take
  // the same number of adjacent input columns (padding 1), so one deinterleave per row fills
  // both; -1: each run is copied on its own.
  int deinterleave_even = -1;
  // Output stores of whole aligned vectors bypass the caches (streaming stores) when the
  // output is large (kStreamOutBytes and up): it cannot stay in the L2 for its consumer
  // anyway, and a normal store first reads the line it writes.
  bool stream_out = false;
  int64_t stride = 1, pad = 0, phase_len = 0, row_len = 0, scratch_rows = 0, scratch_plane = 0;
  int64_t num_copy_rows = 0;
  const int64_t* copy_rows = nullptr;
  int64_t num_phase_runs = 0;
  const PhaseRun* phase_runs = nullptr;

  // Segments, blocks, packed weights.
  int64_t num_segments = 0;
  const Segment* segments = nullptr;
  int64_t num_blocks = 0;
  const Block* blocks = nullptr;
  const T* a = nullptr;
  // Blocks are processed in groups of at most this many packed weight values (one block at least).
  int64_t panel_values = 1;

  // Epilogue, per row (nullptr: absent).
  const T* scale = nullptr;
  const T* shift = nullptr;
  const T* slope = nullptr;  // per-row copy of the candidate's PReLU slope
  int activation = kActNone;

  // Statistics: when non-null, item (n, .) writes sum/sumsq of its rows to [n * M + row].
  double* part_sum = nullptr;
  double* part_sq = nullptr;

  // Work items: item = n * block_chunks + chunk; a chunk is blocks_per_chunk blocks.
  int64_t block_chunks = 1, blocks_per_chunk = 1;
};

// Scratch values (T) and statistics lanes (double) one thread needs for run_items.
template <typename T>
inline int64_t scratch_elements(const ConvJob<T>& job, int64_t max_width) {
  if (job.direct) return 0;
  // + a margin: the lanes beyond the end of a short vector read past the last plane
  return max_width * job.scratch_plane + job.row_len + 4 * Blocking<T>::kLanes;
}
template <typename T>
inline int64_t lane_elements(const ConvJob<T>& job) {
  return job.M * 2 * kStatLanes;
}

// Kernels: process items [begin, end). `scratch` and `lanes` are per-thread buffers of the
// sizes above. The AVX2 entry points return false (doing nothing) when the binary has no
// AVX2 version; callers check the CPU first.
bool run_items_avx2(const ConvJob<float>& job, int64_t begin, int64_t end, float* scratch, double* lanes);
bool run_items_avx2(const ConvJob<double>& job, int64_t begin, int64_t end, double* scratch, double* lanes);
// AVX-512 (F, DQ, VL) float kernel, conv_avx512.cpp: the same outputs as the AVX2 one, bit for bit.
bool run_items_avx512(const ConvJob<float>& job, int64_t begin, int64_t end, float* scratch, double* lanes);
bool cpu_has_avx512();
void run_items_generic(const ConvJob<float>& job, int64_t begin, int64_t end, float* scratch, double* lanes);
void run_items_generic(const ConvJob<double>& job, int64_t begin, int64_t end, double* scratch, double* lanes);
bool cpu_has_avx2_fma();

// FASTSUPERNET_CPU_KERNEL=generic forces the portable version of every CPU kernel, =avx2 the
// AVX2 version where an AVX-512 one exists (read at every call, so tests can switch it).
inline bool generic_kernel_forced() {
  const char* env = std::getenv("FASTSUPERNET_CPU_KERNEL");
  return env != nullptr && std::strcmp(env, "generic") == 0;
}
inline bool avx512_kernel_allowed() {
  const char* env = std::getenv("FASTSUPERNET_CPU_KERNEL");
  return env == nullptr || (std::strcmp(env, "generic") != 0 && std::strcmp(env, "avx2") != 0);
}

// Whether the AVX2 (+ FMA) / AVX-512 kernels run: the CPU has the instructions and
// FASTSUPERNET_CPU_KERNEL does not force a lower version (the conv and weight-gradient kernels).
inline bool use_avx2() {
  static const bool cpu_ok = cpu_has_avx2_fma();
  return cpu_ok && !generic_kernel_forced();
}
inline bool use_avx512() {
  static const bool cpu_ok = cpu_has_avx512();
  return cpu_ok && avx512_kernel_allowed();
}

}  // namespace conv
}  // namespace fastsupernet
