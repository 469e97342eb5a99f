#!/usr/bin/env bash
# GPU check of fastsupernet in one command, on a machine with a CUDA GPU, from the repository root:
#
#     bash benchmarks/gpu_check.sh
#
# Sections ("# --- section: NAME") run in order and stop at the first failure: the card, the
# build of the CUDA extension, the GPU kernel tests, the kernel benchmark tables, the training
# step (batched vs loop, and the projected pipeline time, benchmarks/gpu_train.py) and the
# ranking engine (throughput and precision fidelity, benchmarks/gpu_rank.py). Every step
# has its own time limit, and all steps together at most GPU_CHECK_LIMIT_S seconds (default 240).
#
# Environment: PYTHON (default: the first of python3, python that imports torch), MAX_JOBS
# (default: all cores), TORCH_CUDA_ARCH_LIST (default 9.0: H100/H200), GPU_CHECK_LIMIT_S,
# GPU_CHECK_LOG_DIR (build log; default a fresh temporary directory), GPU_CHECK_KEEP_GOING=1
# (a failed test or benchmark step is listed at the end instead of stopping the run; the device
# and build sections still stop it, and the exit status is still 1), GPU_CHECK_RANK_RESERVE_S
# (default: 40% of the limit): the steps before the ranking section leave this much of the
# limit to it; a step the rest cannot fit is skipped and listed at the end (not a failure).
# Within a section the steps run in order of what they tell: correctness first, then the kernel
# tables, then the experiments.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -z ${PYTHON:-} ]]; then
  for candidate in python3 python; do
    if command -v "${candidate}" >/dev/null 2>&1 && "${candidate}" -c 'import torch' >/dev/null 2>&1; then
      PYTHON=$(command -v "${candidate}")
      break
    fi
  done
  PYTHON=${PYTHON:-python3}
fi
KEEP_GOING=${GPU_CHECK_KEEP_GOING:-0}
FAILURES=()
SKIPPED=()
TOTAL_LIMIT_S=${GPU_CHECK_LIMIT_S:-240}
DEADLINE=$((SECONDS + TOTAL_LIMIT_S))
RESERVE=${GPU_CHECK_RANK_RESERVE_S:-$((TOTAL_LIMIT_S * 2 / 5))}  # kept for the ranking section until it starts
LOG_DIR=${GPU_CHECK_LOG_DIR:-$(mktemp -d)}
SECTION=start
TIMES=()

trap 'echo "gpu_check: FAILED in section ${SECTION} (exit $?) after ${SECONDS} s" >&2' ERR

section() {
  [[ ${SECTION} == start ]] || TIMES+=("${SECTION}: $((SECONDS - SECTION_T0)) s")
  SECTION=$1
  SECTION_T0=${SECONDS}
  echo
  echo "=== ${SECTION} (${SECONDS} s elapsed of ${TOTAL_LIMIT_S})"
}

# step CAP CMD...: run CMD with the smaller of CAP seconds and the time left.
step() {
  local cap=$1 left
  shift
  left=$((DEADLINE - SECONDS))
  if ((left < 5)); then
    echo "gpu_check: out of time (${TOTAL_LIMIT_S} s in all) before: $*" >&2
    return 124
  fi
  ((cap < left)) || cap=${left}
  echo "+ $* (limit ${cap} s)"
  local rc=0
  timeout --kill-after=10 "${cap}" "$@" || rc=$?
  if ((rc == 124 || rc == 137)); then
    echo "gpu_check: timed out after ${cap} s: $*" >&2
  fi
  return "${rc}"
}

# check CAP CMD...: a test or benchmark step; with GPU_CHECK_KEEP_GOING=1 its failure is
# recorded and the run goes on. Before the ranking section it runs only in the time outside
# that section's reserve, and is skipped (listed at the end) when less than 10 s of it is left.
check() {
  local cap=$1 rc=0 avail=$((DEADLINE - RESERVE - SECONDS))
  shift
  if ((avail < 10)); then
    SKIPPED+=("${SECTION}: $*")
    echo "gpu_check: skipped, the time left is the ranking section's (${RESERVE} s reserved): $*" >&2
    return 0
  fi
  ((cap < avail)) || cap=${avail}
  step "${cap}" "$@" || rc=$?
  if ((rc != 0)) && [[ ${KEEP_GOING} == 1 ]]; then
    FAILURES+=("${SECTION}: $* (exit ${rc})")
    echo "gpu_check: step failed (exit ${rc}), going on (GPU_CHECK_KEEP_GOING=1)" >&2
    return 0
  fi
  return "${rc}"
}

# --- section: device
section device
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: nvidia-smi not found: no NVIDIA driver on this machine, so no GPU to check" >&2
  exit 2
fi
if ! step 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; then
  echo "gpu_check: nvidia-smi sees no GPU" >&2
  exit 2
fi
step 60 "${PYTHON}" - <<'EOF'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA GPU (torch.version.cuda={torch.version.cuda})")
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}): {torch.cuda.get_device_name(0)}, "
      f"sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
EOF

# --- section: build
section build
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
echo "MAX_JOBS=${MAX_JOBS} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} nvcc: $(command -v nvcc || echo 'not on PATH')"
BUILD_LOG=${LOG_DIR}/build.log
if ! step 150 "${PYTHON}" -m pip install --no-build-isolation --no-deps -e . >"${BUILD_LOG}" 2>&1; then
  tail -n 60 "${BUILD_LOG}" >&2
  echo "gpu_check: the build failed (full log: ${BUILD_LOG})" >&2
  exit 1
fi
echo "built (log: ${BUILD_LOG})"
step 60 "${PYTHON}" - <<'EOF'
import sys

import fastsupernet._C as C
from fastsupernet.ops import _extension

ops = ("channel_stats", "multi_conv2d", "sliced_conv2d")
missing = [op for op in ops if not _extension.has_kernel(op, "CUDA")]
if missing:
    sys.exit(f"gpu_check: {C.__file__} has no CUDA kernel for {', '.join(missing)} (a CPU-only build?)")
print(f"{C.__file__}: CUDA kernels of {', '.join(ops)} registered")
EOF
# an argument error inside a CUDA kernel's binding must arrive as a Python RuntimeError (a crash
# here means the extension carries its own C++ runtime, e.g. a toolchain linking libstdc++ statically)
if ! step 60 "${PYTHON}" - <<'EOF'
import sys

import torch

import fastsupernet._C  # noqa: F401

x, w = torch.randn(1, 2, 3, 3, device="cuda"), torch.randn(2, 2, 3, 3, device="cuda")
try:
    torch.ops.fastsupernet.multi_conv2d(x, w, [0], [2], [2], [5], 1, 1, None, None, None, "none", None, False)
except RuntimeError as e:
    print(f"a kernel's argument error arrives as RuntimeError ({str(e).splitlines()[0][:80]}...)")
else:
    sys.exit("gpu_check: multi_conv2d accepted weight rows [5, 7) of a 2-row weight")
EOF
then
  echo "gpu_check: raising an error from the extension failed (see above); how the extension links the C++ runtime:" >&2
  so=$(ls fastsupernet/_C*.so | head -n 1)
  { readelf -d "${so}" | grep NEEDED; nm -D "${so}" | grep -E ' T (__cxa_throw|__cxa_begin_catch)$'
    echo "g++: $(command -v g++) -> libstdc++.so: $(g++ -print-file-name=libstdc++.so) libstdc++.a: $(g++ -print-file-name=libstdc++.a)"
  } >&2 || true
  [[ ${KEEP_GOING} == 1 ]] || exit 1
  FAILURES+=("build: an error raised in the extension crashed the process")
fi

# --- section: kernels
section kernels
# pytest-xdist, where installed, spreads the Triton tests (each new specialisation is compiled)
# over several processes; the CUDA kernel tests compile nothing at run time
XDIST=()
if "${PYTHON}" -c 'import xdist' >/dev/null 2>&1; then
  workers=$(($(nproc) / 2))
  ((workers <= 8)) || workers=8
  ((workers < 2)) || XDIST=(-n "${workers}")
fi
check 60 "${PYTHON}" -m pytest -q -p no:cacheprovider tests/test_conv_cuda.py tests/test_conv_cuda_tf32.py
if [[ -f tests/test_conv_triton.py ]]; then
  # (the compile-only Triton check is for machines without a GPU; here the kernels really run)
  check 120 "${PYTHON}" -m pytest -q -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"} tests/test_conv_triton.py \
    -k "not compiles_for_hopper"
fi
# (no xdist here: its worker start-up costs more than these tests gain)
check 60 "${PYTHON}" -m pytest -q -p no:cacheprovider tests/test_ops.py -k "cuda or gpu or triton"
# (triton_cl: the Triton kernel on channels_last tensors, its 4-channel vector path; in the fp32
# table also triton_x3: the same with each product as three TF32 products, static tiles)
check 120 "${PYTHON}" benchmarks/gpu_kernels.py
check 90 "${PYTHON}" benchmarks/gpu_kernels.py --precision bf16
check 90 "${PYTHON}" benchmarks/gpu_kernels.py --precision tf32
# one width class of a deep ranking level: multi_conv2d vs one batched cuDNN conv (fp32 and tf32);
# decides how the fast engine should run the levels where every node has one child
check 45 "${PYTHON}" benchmarks/gpu_class_conv.py
# the fp32 kernel's two-image experiment, apart: a fault in it cannot take the steps above down
check 30 "${PYTHON}" -m pytest -q -p no:cacheprovider tests/test_conv_cuda_two_images.py
check 45 "${PYTHON}" benchmarks/gpu_kernels.py --two-images
# why the kernels take the time the tables show: Nsight Compute's counters for one launch of each
# kernel on two Track-1 layers (occupancy, pipe use, shared-memory wavefronts, stall reasons)
if command -v ncu >/dev/null 2>&1; then
  check 90 "${PYTHON}" benchmarks/gpu_ncu.py --timeout-s 80
else
  echo "gpu_check: ncu not on PATH: no hardware counters (benchmarks/gpu_ncu.py skipped)"
fi

# --- section: training
section training
# one K-path training step, batched vs loop (fp32/bf16, NCHW/channels_last), and the projected
# time of configs/track1_seed.yaml; the script stops starting configurations after --budget-s
check 45 "${PYTHON}" benchmarks/gpu_train.py --reps 3 --budget-s 15

# --- section: ranking
# The fast ranking engine at the full protocol (5,000 + 10,000 images): fp32 throughput on the
# first 1,000 official candidates (three groups under the 16 GiB limit, about 30 s on an H200)
# and, on the first group of them (426), bf16 (the Triton kernel, 4-channel vector loads),
# fp32/triton_tf32x3 (the same kernel, fp32 as three TF32 products), tf32/triton (its tf32
# dot), tf32 (the CUDA tensor-core kernel), prefix-sharing
# ratios and a projection for all 50,000; tf32/class: the engine's conv_route="class" experiment
# (one cuDNN convolution per chunk of a width class) on the same first group; then the Kendall
# tau vs fp32 (>= 0.98) of fp32/triton_tf32x3, tf32/triton (never measured: first), bf16, tf32
# and tf32/class on a briefly trained supernet, and fp32 fast vs reference. Triton does not
# autotune here (that compiles every configuration for each set of epilogue flags, about a
# minute per precision on a fresh machine): FASTSUPERNET_TRITON_CONFIG=static picks one tile
# per call from the sm_90 loop counts of benchmarks/triton_sass.py (for the first 100 official
# candidates 20 compiles: 128x16x16 at 32x32, 128x32x32 and 128x64x32 deeper, where one fixed
# 128x16x16 tile issues 2x-2.5x the instructions; the H200 runs before used 64x32x32 everywhere,
# the static choice replay: benchmarks/triton_variants.py). Last, with whatever time is left (the script
# skips what its deadline cannot fit: from the section times of the last H200 run, the bf16
# fidelity may not fit in the default 240 s; GPU_CHECK_LIMIT_S=300 gives it a minute more).
# tf32 / bf16 throughput, autotuned: python benchmarks/gpu_rank.py
section ranking
RESERVE=0
RANK_LEFT=$((DEADLINE - SECONDS))
check "${RANK_LEFT}" "${PYTHON}" benchmarks/gpu_rank.py --candidates 1000 --other-candidates 426 \
  --precisions fp32,bf16,fp32/triton_tf32x3,tf32/triton,tf32,tf32/class \
  --fidelity-runs fp32/triton_tf32x3,tf32/triton,bf16,tf32,tf32/class \
  --fp32-s 20 --throughput-s 100 --tau-candidates 100 --tau-recal 512 --tau-eval 1000 --ref-candidates 10 \
  --deadline-s $((RANK_LEFT - 78)) --triton-config static --json "${LOG_DIR}/rank.json"
# the fp32 kernel's two-image tiles in the engine (the 70 s kept above), in a process of its own: a
# fault in the experiment cannot cost the runs above
RANK_LEFT=$((DEADLINE - SECONDS))
check "${RANK_LEFT}" "${PYTHON}" benchmarks/gpu_rank.py --candidates 426 --other-candidates 426 \
  --precisions fp32/img2 --skip-fidelity --throughput-s 60 --deadline-s $((RANK_LEFT - 5))

section done
printf '%s\n' "${TIMES[@]}"
if ((${#SKIPPED[@]})); then
  printf 'SKIPPED %s\n' "${SKIPPED[@]}"
fi
if ((${#FAILURES[@]})); then
  printf 'FAILED %s\n' "${FAILURES[@]}"
  echo "gpu_check: ${#FAILURES[@]} step(s) failed; ${SECONDS} s in all" >&2
  exit 1
fi
echo "gpu_check: all sections passed in ${SECONDS} s"
