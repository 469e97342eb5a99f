"""The GPU benchmark scripts run end to end on CPU (--dry-run, tiny sizes): a GPU session only
gets a few minutes of device time, so a script must not fail there on a typo or a stale
argument. The numbers of a dry run mean nothing; what is checked is that every script goes
through its whole code path and prints its tables."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _run(script: str, *args: str, timeout: float = 240) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                         timeout=timeout, env=env, cwd=ROOT)
    assert out.returncode == 0, f"{script} {' '.join(args)} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def test_gpu_kernels_dry_run():
    pytest.importorskip("fastsupernet._C")
    out = _run("gpu_kernels.py", "--dry-run")
    assert "| layer |" in out and "x loop" in out


def test_gpu_kernels_triton_x3_column(monkeypatch):
    """The fp32 table's triton_x3 column (channels_last, tf32x3, static tiles) computes the loop's
    result: here through Triton's interpreter, as the GPU table would call it."""
    pytest.importorskip("triton")
    import torch

    from fastsupernet.ops import triton_conv

    if not triton_conv._interpreted():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest on machines without a GPU)")
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_kernels

    cols = {c: fn for c, fn, _, _ in gpu_kernels.backends("cuda", "fp32")}
    assert list(cols)[-1] == "triton_x3" and "triton_x3" not in {c for c, *_ in gpu_kernels.backends("cuda", "bf16")}
    monkeypatch.delenv(triton_conv.CONFIG_ENV_VAR, raising=False)
    case = gpu_kernels.make_case(6, 8, 3, 2, "cpu", seed=1)
    out = cols["triton_x3"](*case.op_args())[0]
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert triton_conv.CONFIG_ENV_VAR not in os.environ  # the static tiles were for that call only
    torch.testing.assert_close(out, torch.cat(gpu_kernels.peer_loop(case), 1), rtol=1e-4, atol=1e-4)


def test_gpu_kernels_two_images_is_a_gpu_fp32_experiment():
    out = subprocess.run([sys.executable, str(BENCH / "gpu_kernels.py"), "--dry-run", "--two-images"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "--two-images is an experiment of the CUDA fp32 kernel" in out.stderr


def test_gpu_class_conv_dry_run():
    pytest.importorskip("fastsupernet._C")
    out = _run("gpu_class_conv.py", "--dry-run")
    rows = [line for line in out.splitlines() if line.startswith("| ") and "x" in line.split("|")[1]
            and "class (" not in line]
    assert len(rows) == 2 and all("failed" not in r for r in rows), out
    # the two routes computed the same numbers (last column: max diff)
    assert all(float(r.rstrip(" |").rsplit("|", 1)[1]) < 1e-4 for r in rows), out


def test_gpu_class_conv_rejects_an_unknown_precision():
    out = subprocess.run([sys.executable, str(BENCH / "gpu_class_conv.py"), "--precisions", "fp16"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "--precisions" in out.stderr and "'fp16'" in out.stderr


def test_gpu_rank_dry_run():
    pytest.importorskip("fastsupernet._C")
    # the runs gpu_check.sh asks for (tf32 computes fp32 on CPU)
    out = _run("gpu_rank.py", "--dry-run", "--precisions", "fp32,fp32/img2,tf32,tf32/class",
               "--fidelity-runs", "tf32,tf32/class,fp32/img2,bf16")
    assert "tf32/class (width classes through F.conv2d" in out and "fp32/img2: " in out
    assert "Kendall tau tf32/class vs fp32" in out and "done in" in out
    assert "(class route): a candidate's logits alone vs among 8: largest difference 0" in out


def test_gpu_rank_rejects_an_unknown_run():
    out = subprocess.run([sys.executable, str(BENCH / "gpu_rank.py"), "--precisions", "fp32,fp16/class"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "--precisions: unknown fp16/class" in out.stderr


def test_gpu_train_dry_run():
    out = _run("gpu_train.py", "--dry-run")
    assert "projected" in out


def test_gpu_check_script_parses():
    out = subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_gpu_rank_a_failing_run_costs_only_itself(monkeypatch, capsys):
    """An experiment that raises on the GPU is reported, the other runs still go, exit status 1."""
    pytest.importorskip("fastsupernet._C")
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_rank

    from fastsupernet.ranking import engines

    def boom(self, *args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(engines.FastEngine, "_conv_by_class", boom)
    rc = gpu_rank.main(["--dry-run", "--precisions", "fp32,tf32/class,tf32", "--fidelity-runs", "tf32/class,tf32"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "tf32/class: FAILED (RuntimeError: injected failure)" in out
    assert "fidelity: tf32/class FAILED" in out
    assert "Kendall tau tf32 vs fp32" in out and "\ntf32: " in out  # the runs after it


def test_triton_variants_replay():
    """benchmarks/triton_variants.py replays a ranking run's Triton launches on the CPU: every call
    but the stem's (3 input channels) takes the vector path, in a handful of compile variants."""
    out = _run("triton_variants.py", "--candidates", "4")
    m = re.search(r"(\d+) multi_conv2d_triton calls .* (\d+) compile variants .* (\d+) of (\d+) calls on the "
                  r"4-channel vector path", out)
    assert m, out
    calls, variants, vector, calls2 = (int(g) for g in m.groups())
    assert calls == calls2 > 20 and vector == calls - 2 and 2 <= variants <= 16
    # FASTSUPERNET_TRITON_CONFIG=static: one configuration per call, a few per variant at most
    m = re.search(r"FASTSUPERNET_TRITON_CONFIG=static: (\d+) compiles, calls per configuration (.*)", out)
    assert m, out
    per_config = {int(i): int(c) for i, c in re.findall(r"(\d+) \(\d+x\d+x\d+\): (\d+)", m.group(2))}
    assert variants <= int(m.group(1)) <= 3 * variants and sum(per_config.values()) == calls


def test_triton_sass_counts_the_vector_path():
    """benchmarks/triton_sass.py compiles the Triton conv for sm_90 without a GPU; on the vector
    path its bfloat16 reduction loop copies 8-byte vectors asynchronously and issues fewer
    instructions than one channel at a time (a regression check on the compiled code)."""
    pytest.importorskip("triton")
    out = _run("triton_sass.py", "--configs", "1", "--dtypes", "bf16")
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] == "bf16":
            rows[int(cells[2])] = cells
    assert set(rows) == {1, 4}, out
    assert "LDGSTS.E.64" in rows[4][5] and "U16" not in rows[4][5], rows[4]
    assert int(rows[4][4]) * 2 < int(rows[1][4]), (rows[1], rows[4])
    assert "stack" not in rows[4][3], rows[4]


def test_gpu_rank_verdict_picks_the_fastest_run_that_ranks_like_fp32(monkeypatch):
    """The summary line of gpu_rank.py: the fastest throughput run whose Kendall tau vs fp32 met
    the target, with the rank command that reproduces it; unmeasured fidelity never qualifies."""
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_rank

    def row(run, secs):
        precision, route = gpu_rank._run_kind(run)
        return {"run": run, "precision": precision, "conv_route": route, "projected_50000_s": secs}

    out = {"throughput": [row("fp32", 1200), row("bf16", 500), row("tf32/triton", 400), row("fp32/triton_tf32x3", 550),
                          row("tf32", float("nan"))],
           "fidelity": {"tau_bf16_vs_fp32": 0.97, "tau_fp32/triton_tf32x3_vs_fp32": 0.999}}
    v = gpu_rank.verdict(out)
    assert v["run"] == "fp32/triton_tf32x3" and v["meets_target"] and v["tau_vs_fp32"] == 0.999
    assert v["command"] == "python -m fastsupernet rank --precision fp32 --conv-route triton_tf32x3"
    assert v["faster_but_unchecked"] == ["tf32/triton"]  # bf16 missed its tau: not listed, not chosen
    out["fidelity"] = {}
    v = gpu_rank.verdict(out)
    assert v["run"] == "fp32" and not v["meets_target"] and v["command"] == "python -m fastsupernet rank --precision fp32"
    out["throughput"] = [row("fp32/img2", 590)]
    assert gpu_rank.verdict(out) is None  # fp32/img2 is not fp32: its tau must be measured
    out["fidelity"] = {"tau_fp32/img2_vs_fp32": 1.0}
    assert gpu_rank.verdict(out)["command"].startswith("FASTSUPERNET_CUDA_CONV_IMAGES=2 python -m fastsupernet rank")
    # a Triton run timed with static tiles is reproduced with them
    out["throughput"] = [dict(row("tf32/triton", 300), triton_config="static")]
    out["fidelity"] = {"tau_tf32/triton_vs_fp32": 0.999}
    assert gpu_rank.verdict(out)["command"] == (
        "FASTSUPERNET_TRITON_CONFIG=static python -m fastsupernet rank --precision tf32 --conv-route triton")


def test_gpu_ncu_dry_run():
    """benchmarks/gpu_ncu.py makes its launches on CPU (the Triton variants through the interpreter)."""
    pytest.importorskip("fastsupernet._C")
    pytest.importorskip("triton")
    out = _run("gpu_ncu.py", "--dry-run")
    assert "5 launches" in out and "triton_cl_tf32x3 6x6 w<=8 K=3 [Triton interpreter, torch.float32, tf32x3]" in out


_NCU_HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
               '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')
_CUDA_LAUNCH = ('"0","9","python3","h","void fastsupernet::cuda::multi_conv2d_kernel<float, 3, 1>(ConvParams<float>)",'
                '"1","7","(32, 1, 1)","(4096, 128, 1)","0","9.0"')
_TRITON_LAUNCH = '"1","9","python3","h","_multi_conv2d_kernel","1","7","(128, 1, 1)","(512, 64, 1)","0","9.0"'
_CLI = "Command line profiler metrics"
_CUDA_METRICS = [
    ("GPU Speed Of Light Throughput", "Duration", "ms", "3.78"),
    ("Occupancy", "Achieved Occupancy", "%", "29.5"),
    (_CLI, "smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio", "", "2.5"),
    (_CLI, "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio", "", "0.4"),
    (_CLI, "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio", "", "1.25"),
    (_CLI, "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio", "", "0.9"),
    (_CLI, "smsp__inst_executed_op_shared_ld.sum", "inst", "1,000"),
    (_CLI, "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum", "", "2,000"),
    (_CLI, "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum", "", "500"),
    (_CLI, "sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active", "%", "31.2"),
]
NCU_CSV = "\n".join(
    ["==PROF== Connected to process 1", _NCU_HEADER]
    + [f'{_CUDA_LAUNCH},"{sec}","{name}","{unit}","{value}"' for sec, name, unit, value in _CUDA_METRICS]
    + [f'{_TRITON_LAUNCH},"GPU Speed Of Light Throughput","Duration","us","812.5"']
) + "\n"


def test_gpu_ncu_reads_ncu_details_csv(monkeypatch, capsys):
    """The table gpu_ncu.py prints from ncu's --csv --page details output: a column per conv
    launch, the shared-load wavefronts per instruction, the conflicts' share, the largest stalls."""
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_ncu

    details = gpu_ncu.parse_details(NCU_CSV)
    assert sorted(details) == [0, 1] and details[1]["kernel"] == "_multi_conv2d_kernel"
    rows = dict(gpu_ncu.summary(details[0]["metrics"]))
    assert rows["duration"] == "3.78 ms" and rows["achieved occupancy"] == "29.5%"
    assert rows["shared-load wavefronts/instr"] == "2.00"
    assert rows["shared-load bank conflicts"] == "500 (25% of wavefronts)"
    assert rows["pipe_fma_cycles_active"] == "31.2%"
    assert rows["largest stalls (cycles/issue)"] == "mio_throttle 2.50, long_scoreboard 1.25, wait 0.90"
    gpu_ncu.print_table(["cuda 32x32", "triton 32x32"], details)
    out = capsys.readouterr().out
    assert out.startswith("| figure | cuda 32x32 | triton 32x32 |")
    assert "| duration | 3.78 ms | 812.5 us |" in out and "| achieved occupancy | 29.5% | n/a |" in out
    gpu_ncu.print_table(["only one label"], details)
    assert "2 conv kernels profiled for 1 launches" in capsys.readouterr().out


def test_gpu_ncu_kills_a_run_past_its_time(monkeypatch):
    """A profiled run that outlives its time is killed with everything it started."""
    monkeypatch.syspath_prepend(str(BENCH))
    import time

    import gpu_ncu

    t = time.monotonic()
    r = gpu_ncu._run_group(["bash", "-c", "sleep 30 & sleep 30; echo never"], timeout=1.0)
    assert time.monotonic() - t < 10 and r.returncode != 0 and "never" not in r.stdout
    assert "killed after 1 s" in r.stderr
