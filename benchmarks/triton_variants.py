"""How many Triton conv kernels a GPU ranking run compiles, replayed on the CPU (no GPU needed).

    python benchmarks/triton_variants.py                  # the first 100 official candidates
    python benchmarks/triton_variants.py --candidates 1000

Runs the fast engine on the CPU as its Triton path would run on CUDA (channels_last activations
and weights), with every ``multi_conv2d_triton`` call replaced by a stand-in that records what the
compiled kernel would be specialised on, then computes the call with the CPU kernel so that the
run goes on exactly as it would: the constexpr flags (kernel size, epilogue, statistics, input
precision, ``VEC_X`` / ``VEC_W``) and, per integer argument, Triton's specialisation (equal to 1,
or divisible by 16 where the kernel allows alignment variants). Each distinct set is one compile
per tile configuration; each distinct autotuning key (size buckets and flags) one timing sweep.
Also printed: how many calls take the 4-channel vector path, and what
``FASTSUPERNET_TRITON_CONFIG=static`` would compile (one configuration per call, chosen from the
bf16 loop counts: distinct (variant, configuration) pairs, and the calls per configuration). One recalibration and one
evaluation batch of 128 images (the shapes of every later batch are the same), randomly
initialised Track-1 supernet, the engine's 16 GiB default GPU limit for the grouping.
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch
from triton_sass import specialisation  # (benchmarks/, this script's folder; imports triton compiled)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from fastsupernet import Supernet  # noqa: E402
from fastsupernet.io import official_candidates_path, read_candidates  # noqa: E402
from fastsupernet.ops import multi_conv2d  # noqa: E402
from fastsupernet.ops import triton_conv as tc  # noqa: E402
from fastsupernet.ranking.engines import FastEngine, RankData  # noqa: E402

_STRIDES = [f"stride_{t}{d}" for t in "xor" for d in "nchw"] + [f"stride_w{d}" for d in "ochw"]


class Recorder:
    """Stands in for ``multi_conv2d_triton``: records the compile variant and autotuning key of
    the call, computes it with the CPU kernel (NCHW), returns it channels_last like the kernel."""

    def __init__(self) -> None:
        self.variants: collections.Counter = collections.Counter()
        self.tune_keys: collections.Counter = collections.Counter()
        self.vector_calls = 0
        self.calls = 0
        self.static_variants: set = set()
        self.static_configs: collections.Counter = collections.Counter()

    def __call__(self, x, weight, io, iw, ow, ro, stride, padding, scale, shift, residual, activation, slope, stats,
                 *, input_precision: str = "ieee"):
        n, _, h, w = x.shape
        k = weight.shape[2]
        h_out, w_out = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
        out = torch.empty(n, sum(ow), h_out, w_out, memory_format=torch.channels_last)
        vec = tc._vector_widths(x, out, residual, weight, io, iw, ow)
        strides = [*tc._strides(x, vec["VEC_X"]), *tc._strides(out, vec["VEC_X"]),
                   *(tc._strides(residual, vec["VEC_X"]) if residual is not None else (0, 0, 0, 0)),
                   *tc._strides(weight, vec["VEC_W"])]
        flags = (k, scale is not None, shift is not None, residual is not None, activation, bool(stats),
                 input_precision, vec["VEC_X"], vec["VEC_W"])
        ints = (specialisation("conv_stride", stride),) + tuple(
            specialisation(name, v) for name, v in zip(_STRIDES, strides))
        self.variants[flags + ints] += 1
        chosen = tc.static_config(n * h_out * w_out, iw, ow, tc.LOOP_RATES["bf16"])
        self.static_variants.add((flags + ints, chosen))
        self.static_configs[chosen] += 1
        self.tune_keys[(tc._bucket(n * h_out * w_out, hi=tc._TUNE_M_CAP), tc._bucket(max(ow), hi=64),
                        tc._bucket(max(iw), hi=64)) + flags] += 1
        self.calls += 1
        self.vector_calls += vec["VEC_X"] > 1
        result = multi_conv2d(x.contiguous(), weight.contiguous(), io, iw, ow, ro, stride=stride, padding=padding,
                              scale=scale, shift=shift, residual=None if residual is None else residual.contiguous(),
                              activation=activation, prelu_slope=slope, stats=stats)
        empty = torch.empty(0, dtype=torch.float64)
        y, s, q = result if stats else (result, empty, empty)
        return y.contiguous(memory_format=torch.channels_last), s, q


def _tile(index: int) -> str:
    kw = tc._CONFIGS[index].kwargs
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--candidates", type=int, default=100, help="the first N official candidates (default 100)")
    ap.add_argument("--memory-limit", type=int, default=16 << 30, help="the engine's working memory, bytes")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = Supernet()
    x = torch.randn(128, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    data = RankData(recal_x=x, eval_x=x, eval_y=torch.zeros(128, dtype=torch.long), recal_batch=128)
    archs = list(read_candidates(official_candidates_path()).values())[: args.candidates]
    recorder = Recorder()
    real = tc.multi_conv2d_triton
    tc.multi_conv2d_triton = recorder
    try:
        engine = FastEngine(model, data, memory_limit_bytes=args.memory_limit)
        engine._triton = True  # the CUDA tf32/bf16 path: channels_last activations and weights
        engine._weights = {k: w.contiguous(memory_format=torch.channels_last) for k, w in engine._weights.items()}
        t0 = time.perf_counter()
        list(engine.score(archs))
        seconds = time.perf_counter() - t0
    finally:
        tc.multi_conv2d_triton = real
    print(f"{len(archs)} official candidates ({seconds:.0f} s on the CPU): {recorder.calls} multi_conv2d_triton calls "
          f"(one recalibration and one evaluation batch per group of candidates), {len(recorder.variants)} compile "
          f"variants (each compiled once per tile "
          f"configuration), {len(recorder.tune_keys)} autotuning keys, "
          f"{recorder.vector_calls} of {recorder.calls} calls on the 4-channel vector path; "
          f"FASTSUPERNET_TRITON_CONFIG=static: {len(recorder.static_variants)} compiles, calls per configuration "
          + ", ".join(f"{i} ({_tile(i)}): {c}" for i, c in sorted(recorder.static_configs.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
