"""Float64 oracle pieces shared by the CPU convolution tests (test_conv_cpu.py,
test_conv_winograd.py): the epilogue with the magnitude its roundings are relative to, the
bounds of the float64 channel statistics, and the kernel switches (environment variables the
CPU kernels read at every call)."""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

U64 = 2.0**-53


@contextlib.contextmanager
def cpu_env(**settings: str | None):
    """Within the block, each named environment variable set to its value (None: unset); the
    previous values are restored afterwards, also on failure."""
    old = {k: os.environ.get(k) for k in settings}

    def apply(values):
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    apply(settings)
    try:
        yield
    finally:
        apply(old)


def epilogue(y, mag, scale, shift, residual, activation, slope, cand):
    """(z, mag): the epilogue (``* scale``, ``+ shift``, ``+ residual``, activation) applied to the
    exact float64 conv ``y``, and ``mag`` (the conv's absolute-value magnitude) carried through it:
    ``(mag |scale| + |shift| + |residual|) max(1, |slope|)``. ``cand`` is each output channel's
    candidate (for its PReLU slope)."""
    z, mag = y.clone(), mag.clone()
    if scale is not None:
        s = scale.double().view(1, -1, 1, 1)
        z, mag = z * s, mag * s.abs()
    if shift is not None:
        s = shift.double().view(1, -1, 1, 1)
        z, mag = z + s, mag + s.abs()
    if residual is not None:
        r = residual.double()
        z, mag = z + r, mag + r.abs()
    if activation == "relu":
        z = F.relu(z)
    elif activation == "prelu":
        sl = slope.double()[torch.tensor(cand)].view(1, -1, 1, 1)
        z = torch.where(z >= 0, z, z * sl)
        mag = mag * sl.abs().clamp(min=1.0)
    return z, mag


def assert_stats_within(s, q, y, e):
    """The kernel's channel sums ``s`` and sums of squares ``q`` against those of the exact conv
    ``y``, given ``e``, a per-element bound of the kernel's conv values: ``sum_i e_i + (n + 2) u64
    sum_i |y_i|`` and ``sum_i e_i (2 |y_i| + e_i) + (n + 2) u64 sum_i y_i^2``."""
    n = y.shape[0] * y.shape[2] * y.shape[3]
    bs = e.sum((0, 2, 3)) + (n + 2) * U64 * y.abs().sum((0, 2, 3)) + 1e-300
    bq = (e * (2 * y.abs() + e)).sum((0, 2, 3)) + (n + 2) * U64 * (y * y).sum((0, 2, 3)) + 1e-300
    assert ((s - y.sum((0, 2, 3))).abs() <= bs).all()
    assert ((q - (y * y).sum((0, 2, 3))).abs() <= bq).all()


def assert_stats_match_output(s, q, out):
    """Without epilogue the output holds the very values the statistics add: their float64 sums
    to ``(n + 2) u64`` relative."""
    o = out.double()
    n = o.shape[0] * o.shape[2] * o.shape[3]
    assert ((s - o.sum((0, 2, 3))).abs() <= (n + 2) * U64 * o.abs().sum((0, 2, 3)) + 1e-300).all()
    assert ((q - (o * o).sum((0, 2, 3))).abs() <= (n + 2) * U64 * (o * o).sum((0, 2, 3)) + 1e-300).all()
