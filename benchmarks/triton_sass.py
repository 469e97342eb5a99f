"""What the Triton conv kernel compiles to on sm_90 (H100/H200), without a GPU (markdown table).

    python benchmarks/triton_sass.py                      # every configuration, bf16 / tf32 / tf32x3 / fp32
    python benchmarks/triton_sass.py --configs 1 --dtypes bf16 --dump DIR   # also keep PTX and SASS
    python benchmarks/triton_sass.py --bn-act             # also the recalibration pass, per element

Compiles ``fastsupernet.ops.triton_conv._multi_conv2d_kernel`` for ``sm_90`` the way a call of the
ranking engine specialises it (a 3x3 layer of a channels_last activation with 128 packed channels
at 32x32, batch 128, a channels_last weight of 64 columns, folded BN + ReLU; unit channel strides
become constants, 16-divisible sizes and strides get their divisibility, the pixel strides none,
as the kernel's ``do_not_specialize*`` lists say), disassembles the cubin with the ``cuobjdump``
that ships with Triton, and reports for the reduction loop (the backward branch whose body holds
the ``HGMMA`` / ``FFMA``): instructions per thread and iteration, the global loads in it, and
multiply-adds per warp instruction (``BLOCK_M * BLOCK_N * BLOCK_K`` over instructions x warps);
plus registers and stack (spills) per thread. A static measure: it says how much work the
compiled loop issues, not how fast it runs (latency, occupancy and the memory system decide
that); the GPU figures are `gpu_kernels.py`'s. ``vec`` is the kernel's ``VEC_X`` = ``VEC_W``
(4: 4-channel vector loads, see ``_vector_widths``; 1: one channel at a time, what any layout
that does not qualify gets). Run with another checkout first on ``PYTHONPATH`` to compare an
older kernel (one without ``VEC_X`` reports vec 1 only).
"""
from __future__ import annotations

import argparse
import collections
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compile, never interpret (set before triton is imported)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

if not any(Path(p, "fastsupernet").is_dir() for p in sys.path[1:] if p):  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastsupernet.ops import triton_conv as tc  # noqa: E402

PRECISIONS = {"bf16": ("bf16", "ieee"), "tf32": ("fp32", "tf32"), "tf32x3": ("fp32", "tf32x3"),
              "fp32": ("fp32", "ieee")}
N, H, W, C_IN, C_OUT, C_MAX, KSIZE = 128, 32, 32, 128, 64, 64, 3
_PTRS = {"scale_ptr": "*fp32", "shift_ptr": "*fp32", "slope_ptr": "*fp32", "psum_ptr": "*fp64", "psq_ptr": "*fp64",
         "meta_ptr": "*i32"}
_CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _arg_values(vec: int) -> dict[str, int]:
    """The integer arguments a call passes (strides divided by the vector width, as the host does)."""
    v = dict(stride_xn=C_IN * H * W, stride_xc=1, stride_xh=W * C_IN, stride_xw=C_IN,
             stride_on=C_OUT * H * W, stride_oc=1, stride_oh=W * C_OUT, stride_ow=C_OUT,
             stride_rn=0, stride_rc=0, stride_rh=0, stride_rw=0, conv_stride=1,
             stride_wo=C_MAX * KSIZE * KSIZE, stride_wc=1, stride_wh=KSIZE * C_MAX, stride_ww=C_MAX,
             w_row_stride=C_MAX * KSIZE * KSIZE)  # (w_row_stride: kernels before the weight strides)
    if vec > 1:
        for name in ("stride_xn", "stride_xh", "stride_xw", "stride_on", "stride_oh", "stride_ow",
                     "stride_wo", "stride_wh", "stride_ww"):
            v[name] //= vec
    return v


def specialisation(name: str, value: int) -> str:
    """How a call specialises an integer argument of the conv kernel: '1' (a constant), 'D16'
    (divisible by 16, where the kernel allows alignment variants) or '' (neither)."""
    if name in tc._NOT_SPECIALIZED:
        return ""
    if value == 1:
        return "1"
    return "D16" if value % 16 == 0 and name not in getattr(tc, "_NO_ALIGNMENT_VARIANTS", ()) else ""


def compile_kernel(dtype: str, precision: str, config: int, vec: int):
    """The kernel compiled for sm_90 as a call with these flags would specialise it."""
    kernel = tc._multi_conv2d_kernel
    params = list(inspect.signature(kernel.fn).parameters.items())
    names = [p for p, _ in params]
    values = _arg_values(vec)
    sig, constexprs, attrs = {}, {}, {}
    for i, (p, v) in enumerate(params):
        spec = specialisation(p, values[p]) if p in values else ""
        if v.annotation is not inspect.Parameter.empty:
            sig[p] = "constexpr"
        elif p.endswith("_ptr"):
            sig[p] = _PTRS.get(p, "*" + dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif spec == "1":
            sig[p] = "constexpr"
            constexprs[p] = 1
        else:
            sig[p] = "i32"
            if spec == "D16":
                attrs[(i,)] = [["tt.divisibility", 16]]
    cfg = tc._CONFIGS[config]
    constexprs.update(KSIZE=KSIZE, HAS_SCALE=True, HAS_SHIFT=True, HAS_RESIDUAL=False, ACTIVATION=1, STATS=False,
                      STATS_CHUNK=tc.STATS_CHUNK, INPUT_PRECISION=precision, CBLOCKS=0, **cfg.kwargs)
    if "VEC_X" in names:
        constexprs.update(VEC_X=vec, VEC_W=vec)
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def bn_act_counts(dump: Path) -> None:
    """Instructions per element of the recalibration pass (``fastsupernet.ranking.triton_bn``), bf16,
    residual with its own BN, ReLU: the whole kernel over the elements one thread handles."""
    from fastsupernet.ranking import triton_bn as tb

    kernel = tb._bn_act_kernel
    params = list(inspect.signature(kernel.fn).parameters.items())
    names = [p for p, _ in params]
    print("\n| recalibration pass (bf16) | vec | instructions per thread | elements per thread | per element | "
          "global loads |")
    print("|---|---|---|---|---|---|")
    for layout, vec in (("channels_last", 1), ("channels_last", 4), ("NCHW", 1), ("NCHW", 4)):
        sig, attrs = {}, {}
        for i, (p, v) in enumerate(params):
            if v.annotation is not inspect.Parameter.empty:
                sig[p] = "constexpr"
            elif p.endswith("_ptr"):
                sig[p] = "*bf16" if p in ("y_ptr", "out_ptr", "r_ptr") else "*fp32"
                attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                sig[p] = "i32"
                # divisible by 16 at batch 128 on 32x32..8x8 images: the rows, H*W (NCHW's cols),
                # the element count (total, of the kernel before the 2-D tiles); not a packed
                # channel count (channels_last's cols)
                if p in ("rows", "total", "HW") or (p == "cols" and layout == "NCHW"):
                    attrs[(i,)] = [["tt.divisibility", 16]]
        consts = dict(CHANNELS_LAST=layout == "channels_last", HAS_RES=True, RES_AFFINE=True, ACT=1)
        if "VEC" in names:
            consts.update(VEC=vec, BLOCK_ROWS=tb._BLOCK_ROWS, BLOCK_COLS=tb._BLOCK_COLS)
            per_thread = tb._BLOCK_ROWS * tb._BLOCK_COLS // (4 * 32)
        elif vec == 1:
            consts.update(BLOCK=tb._BLOCK)
            per_thread = tb._BLOCK // (4 * 32)
        else:
            continue
        out = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                             target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        cubin = dump / f"bn_act_{layout}_v{vec}.cubin"
        cubin.write_bytes(out.asm["cubin"])
        ops = [_opcode(m.group(1)) for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+([^;]*);", _cuobjdump("-sass", cubin))]
        loads = collections.Counter(op for op in ops if op.startswith("LDG"))
        print(f"| {layout} | {vec} | {len(ops)} | {per_thread} | {len(ops) / per_thread:.1f} | "
              f"{', '.join(f'{k} x{n}' for k, n in sorted(loads.items()))} |", flush=True)


def _cuobjdump(flag: str, cubin: Path) -> str:
    return subprocess.run([str(_CUOBJDUMP), flag, str(cubin)], capture_output=True, text=True, check=True).stdout


def reduction_loop(sass: str) -> list[str]:
    """The instructions of the longest loop (a backward branch) that holds the MMA or the FMAs."""
    ins = [(int(m.group(1), 16), m.group(2).strip())
           for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    best: list[str] = []
    for addr, text in ins:
        target = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            lo = int(target.group(1), 16)
            body = [t for a, t in ins if lo <= a <= addr]
            if any("GMMA" in t or "FFMA" in t or "HMMA" in t for t in body) and len(body) > len(best):
                best = body
    return best


def _opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=",".join(str(i) for i in range(len(tc._CONFIGS))),
                    help="indices into the kernel's configuration list (default: all)")
    ap.add_argument("--dtypes", default="bf16,tf32,tf32x3,fp32", help=f"of {sorted(PRECISIONS)}")
    ap.add_argument("--dump", type=Path, default=None, help="keep each kernel's PTX, SASS and cubin in this folder")
    ap.add_argument("--bn-act", action="store_true", help="also the recalibration pass (triton_bn), per element")
    args = ap.parse_args(argv)
    if not _CUOBJDUMP.is_file():
        print(f"triton_sass: {_CUOBJDUMP} not found (Triton without its NVIDIA tools)", file=sys.stderr)
        return 2
    has_vec = "VEC_X" in inspect.signature(tc._multi_conv2d_kernel.fn).parameters
    dump = args.dump or Path(os.environ.get("TMPDIR", "/tmp")) / f"triton_sass_{os.getpid()}"
    dump.mkdir(parents=True, exist_ok=True)
    print(f"## Triton conv kernel on sm_90 ({tc.__file__})\n")
    print(f"3x3 layer, channels_last, {C_IN} packed input channels at {H}x{W}, weight of {C_MAX} columns, "
          f"folded BN + ReLU; the reduction loop per thread and iteration\n")
    print("| precision | config (M x N x K, warps, stages) | vec | registers | loop instructions | "
          "global loads in the loop | multiply-adds per warp instruction |")
    print("|---|---|---|---|---|---|---|")
    for name in args.dtypes.split(","):
        dtype, precision = PRECISIONS[name]
        for i in (int(c) for c in args.configs.split(",")):
            cfg = tc._CONFIGS[i]
            kw = cfg.kwargs
            for vec in ((1, tc.VECTOR) if has_vec else (1,)):
                out = compile_kernel(dtype, precision, i, vec)
                stem = dump / f"{name}_c{i}_v{vec}"
                stem.with_suffix(".cubin").write_bytes(out.asm["cubin"])
                stem.with_suffix(".ptx").write_text(out.asm["ptx"])
                sass = _cuobjdump("-sass", stem.with_suffix(".cubin"))
                stem.with_suffix(".sass").write_text(sass)
                res = _cuobjdump("-res-usage", stem.with_suffix(".cubin"))
                regs = re.search(r"REG:(\d+)", res).group(1)
                stack = re.search(r"STACK:(\d+)", res).group(1)
                loop = reduction_loop(sass)
                ops = map(_opcode, loop)
                loads = collections.Counter(op for op in ops if op.startswith("LDG") and op != "LDGDEPBAR")
                macs = kw["BLOCK_M"] * kw["BLOCK_N"] * kw["BLOCK_K"]
                per_instr = f"{macs / (len(loop) * cfg.num_warps):.0f}" if loop else "n/a"
                print(f"| {name} | {i}: {kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}, {cfg.num_warps}, "
                      f"{cfg.num_stages} | {vec} | {regs}{f' (stack {stack} B)' if stack != '0' else ''} | "
                      f"{len(loop) or 'n/a'} | {', '.join(f'{k} x{n}' for k, n in sorted(loads.items())) or '-'} | "
                      f"{per_instr} |", flush=True)
    if args.bn_act:
        bn_act_counts(dump)
    print(f"\n(PTX, SASS and cubins in {dump})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
