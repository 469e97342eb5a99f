"""Several candidates of one supernet on the same images in one pass, forward and backward.

Training samples K paths per batch (the largest, a few random ones) and runs them all on the
same images. Run one after the other, each conv is K separate small convolutions, each BN
and activation K separate passes. Here the K paths' activations are kept *packed along
channels*, ``(N, sum_k width_k, H, W)``, path k owning its own block of channels, so that:

* every conv layer is one :func:`fastsupernet.ops.multi_conv2d` call (the stem: all K paths
  read the same image, offset 0; later layers: path k reads its own block), its backward
  batched as well (see :func:`fastsupernet.ops.conv.conv_backward`);
* train-mode BatchNorm of all paths is one pass over the packed tensor: its per-channel
  statistics are exactly per-path statistics (taken by the conv's epilogue, in float64), and
  the affine parameters are gathered from the packed BN rows by index, so autograd
  scatter-adds their gradients back into the shared rows (eval mode: BN folded into the
  conv's epilogue);
* ReLU, residual additions and PReLU are elementwise on the packed tensor (on CPU the BN
  affine, residual add and activation are one compiled pass each way, ``fastsupernet::bn_act``);
* global average pooling is one call; only the small classifier runs per path.

Values and gradients (with respect to the input and every parameter) equal those of
``torch.stack([model(x, a) for a in archs])``, in train mode (each path's BN normalises with
its own batch statistics) and in eval mode (running statistics).

Train mode does **not** update the BN running statistics: the paths of one step share BN
rows, so updating them once per path would make them depend on the order of the paths, and
supernet ranking re-estimates BN statistics per candidate before evaluating it anyway.

Two levels:

* :func:`build_plan` turns a supernet and K architectures into a :class:`MultiPathPlan`: per
  conv layer, each path's weight row offset, input channel offset, input and output width;
  per block, where each path's residual comes from; per path, its classifier rows.
* :func:`run_plan` runs a plan on *packed parameter tensors* given by name (the supernet's
  ``named_parameters``/``named_buffers`` names), with no module in sight: a set of K
  independent static networks packed into such tensors (disjoint rows per path, one PReLU
  slope per block shared by the paths) runs through the same function.

:func:`forward_paths` (also ``Supernet.forward_paths``) is the two together; it evaluates a
repeated architecture once and returns its logits in every position that names it.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from . import ops
from .space import Arch

__all__ = [
    "ConvPlan",
    "BlockPlan",
    "MultiPathPlan",
    "build_plan",
    "run_plan",
    "forward_paths",
    "model_tensors",
]


@dataclass(frozen=True)
class ConvPlan:
    """One conv + BN layer run for several paths as one ``multi_conv2d`` call.

    ``name`` prefixes the layer's tensors (``{name}.weight``, ``.bn_weight``, ``.bn_bias``,
    ``.running_mean``, ``.running_var``). Entry j of each tuple describes the j-th path that
    runs this layer: it reads input channels ``[in_offsets[j], in_offsets[j] + in_widths[j])``
    and weight rows ``[row_offsets[j], row_offsets[j] + out_widths[j])``, columns
    ``[:in_widths[j]]``; its outputs sit at ``out_offsets[j]`` of the packed output.
    """

    name: str
    kernel: int
    stride: int
    in_offsets: tuple[int, ...]
    in_widths: tuple[int, ...]
    out_widths: tuple[int, ...]
    row_offsets: tuple[int, ...]

    @property
    def padding(self) -> int:
        return self.kernel // 2

    @property
    def out_offsets(self) -> tuple[int, ...]:
        return tuple(accumulate(self.out_widths, initial=0))[:-1]

    @property
    def out_channels(self) -> int:
        return sum(self.out_widths)

    def rows(self) -> list[int]:
        """The packed BN/weight row of every output channel, in packed order."""
        return [r for ro, ow in zip(self.row_offsets, self.out_widths) for r in range(ro, ro + ow)]


@dataclass(frozen=True)
class BlockPlan:
    """A basic block for K paths: two convs, an optional shortcut conv, and the residual layout.

    ``shortcut`` runs only for the paths listed in ``shortcut_paths`` (in path order); every
    other path adds its block input unchanged (same width, stride 1). ``prelu`` names the
    block's PReLU slope tensor, or is ``None`` for ReLU.
    """

    conv1: ConvPlan
    conv2: ConvPlan
    shortcut: ConvPlan | None
    shortcut_paths: tuple[int, ...]
    prelu: str | None


@dataclass(frozen=True)
class MultiPathPlan:
    """Everything :func:`run_plan` needs to run K paths on the same images, weights aside.

    ``classifier_rows[k]`` is path k's first row in the packed classifier (``num_classes`` rows).
    """

    num_paths: int
    in_channels: int
    num_classes: int
    stem: ConvPlan
    blocks: tuple[BlockPlan, ...]
    classifier_rows: tuple[int, ...]
    eps: float

    @property
    def feature_widths(self) -> tuple[int, ...]:
        """Each path's width entering the classifier."""
        last = self.blocks[-1].conv2 if self.blocks else self.stem
        return last.out_widths


def build_plan(model, archs: Sequence[str | Arch]) -> MultiPathPlan:
    """The plan of ``archs`` (K >= 1) on ``model`` (a :class:`~fastsupernet.supernet.Supernet`)."""
    if len(archs) == 0:
        raise ValueError("build_plan needs at least one architecture")
    parsed = [model.parse(a) for a in archs]
    widths = [a.widths for a in parsed]
    runs = [model.run_widths(a) for a in parsed]
    k_all = tuple(range(len(parsed)))
    names = {id(m): name for name, m in model.named_modules()}

    def conv_plan(m, paths: Sequence[int], in_packed: bool) -> ConvPlan:
        L = m.layer
        if L.in_position is None:
            in_w = [model.in_channels] * len(paths)
        else:
            in_w = [runs[k][L.in_position] for k in paths]
        # packed input: path k's block starts after the blocks of the paths before it
        if in_packed:
            starts = list(accumulate((runs[k][L.in_position] for k in k_all), initial=0))
            in_off = [starts[k] for k in paths]
        else:
            in_off = [0] * len(paths)
        return ConvPlan(
            name=names[id(m)],
            kernel=L.kernel,
            stride=L.stride,
            in_offsets=tuple(in_off),
            in_widths=tuple(in_w),
            out_widths=tuple(runs[k][L.position] for k in paths),
            row_offsets=tuple(m.groups.offset_of(widths[k][L.position]) for k in paths),
        )

    stem = conv_plan(model.stem, k_all, in_packed=False)
    blocks = []
    for s, stage in enumerate(model.stages):
        for b, blk in enumerate(stage):
            sc_paths = tuple(k for k in k_all if model.uses_shortcut_conv(blk.shortcut.layer, runs[k]))
            blocks.append(
                BlockPlan(
                    conv1=conv_plan(blk.conv1, k_all, in_packed=True),
                    conv2=conv_plan(blk.conv2, k_all, in_packed=True),
                    shortcut=conv_plan(blk.shortcut, sc_paths, in_packed=True) if sc_paths else None,
                    shortcut_paths=sc_paths,
                    prelu=f"stages.{s}.{b}.prelu" if model.config.residual_activation == "prelu" else None,
                )
            )
    last = model.space.last_position
    return MultiPathPlan(
        num_paths=len(parsed),
        in_channels=model.in_channels,
        num_classes=model.num_classes,
        stem=stem,
        blocks=tuple(blocks),
        classifier_rows=tuple(model.classifier_groups.offset_of(w[last]) for w in widths),
        eps=model.config.bn_eps,
    )


def model_tensors(model) -> dict[str, torch.Tensor]:
    """The supernet's parameters and buffers by name: the tensors :func:`run_plan` reads."""
    out = dict(model.named_buffers())
    out.update(model.named_parameters())
    return out


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def _batch_affine(y: torch.Tensor, s: torch.Tensor, q: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, 1/std, scale, shift) of train-mode BN from the float64 per-channel sums ``s``, ``q``
    of ``y``: normalising is ``y * scale + shift``."""
    n = y.numel() // y.shape[1]
    mean = s / n
    var = (q / n - mean * mean).clamp_min(0.0)  # float64 sums: no cancellation trouble
    # statistics in float32 for half-precision outputs, as aten's batch norm keeps them
    stat_dtype = torch.float32 if y.dtype in (torch.float16, torch.bfloat16) else y.dtype
    mean_t = mean.to(stat_dtype)
    invstd_t = torch.rsqrt(var + eps).to(stat_dtype)
    a = gamma.to(stat_dtype) * invstd_t
    return mean_t, invstd_t, a, beta.to(stat_dtype) - mean_t * a


class _BatchNormFromSums(torch.autograd.Function):
    """Train-mode BatchNorm of a conv output whose per-channel float64 sum and sum of squares the
    conv's epilogue already took: one pass (``y * a + b``) instead of a statistics pass and a
    normalising pass. Backward: aten's batch-norm backward with the saved mean and 1/std, so
    the gradient (through the batch statistics too) is the one ``F.batch_norm`` gives."""

    @staticmethod
    def forward(ctx, y, s, q, gamma, beta, eps):
        mean_t, invstd_t, a, b = _batch_affine(y, s, q, gamma, beta, eps)
        ctx.save_for_backward(y, gamma, mean_t, invstd_t)
        ctx.eps = eps
        return torch.addcmul(b.to(y.dtype).view(1, -1, 1, 1), y, a.to(y.dtype).view(1, -1, 1, 1))

    @staticmethod
    def backward(ctx, grad_out):
        y, gamma, mean, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        gy, gg, gb = torch.ops.aten.native_batch_norm_backward(
            grad_out.to(y.dtype).contiguous(), y, gamma, None, None, mean, invstd, True, ctx.eps,
            [need[0], need[3], need[4]],
        )
        return gy, None, None, gg, gb, None


class _BatchNormAct(torch.autograd.Function):
    """``act(BN(y) + residual)`` in train mode from the conv's sums, one compiled pass each way
    (``fastsupernet::bn_act`` / ``bn_act_backward``, CPU) instead of the separate affine,
    residual add, activation and their backwards. Same values and gradients as
    :class:`_BatchNormFromSums` followed by the add and the activation."""

    @staticmethod
    def forward(ctx, y, s, q, gamma, beta, eps, residual, activation, slope):
        mean_t, invstd_t, a, b = _batch_affine(y, s, q, gamma, beta, eps)  # y is float32/float64 here
        sl = slope.reshape(1) if activation == "prelu" else None
        out = torch.ops.fastsupernet.bn_act(y, a, b, residual, None, None, activation, sl)
        ctx.save_for_backward(y, a, b, residual, sl, mean_t, invstd_t)
        ctx.activation = activation
        ctx.param_dtype = gamma.dtype
        ctx.slope_shape = slope.shape if sl is not None else None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        y, a, b, residual, sl, mean, invstd = ctx.saved_tensors
        gy, gr, gg, gb, gs = torch.ops.fastsupernet.bn_act_backward(
            grad_out.to(y.dtype), y, a, b, residual, ctx.activation, sl, mean, invstd
        )
        g_res = gr if residual is not None else None
        g_slope = gs.reshape(ctx.slope_shape) if sl is not None else None
        return gy, None, None, gg.to(ctx.param_dtype), gb.to(ctx.param_dtype), None, g_res, None, g_slope


def _fused_bn_act(y: torch.Tensor, residual: torch.Tensor | None, backend: str | None) -> bool:
    """Whether :class:`_BatchNormAct` serves this layer: the compiled CPU backend is in use and
    the tensors are float32/float64 of one dtype."""
    if y.device.type != "cpu" or y.dtype not in (torch.float32, torch.float64):
        return False
    if residual is not None and (residual.dtype != y.dtype or residual.shape != y.shape):
        return False
    if ops.resolve_backend(y.device, backend, "multi_conv2d") != "cpp":
        return False
    from .ops._extension import has_kernel

    return has_kernel("bn_act", "CPU")


@torch.no_grad()
def _update_running(t: Mapping[str, torch.Tensor], name: str, idx: torch.Tensor, s: torch.Tensor, q: torch.Tensor,
                    n: int, momentum: float) -> None:
    """``nn.BatchNorm2d``'s running-statistics update (batch mean, unbiased batch variance) of rows ``idx``."""
    mean = s / n
    var = (q / n - mean * mean).clamp_min(0.0) * (n / max(n - 1, 1))
    for key, batch in ((f"{name}.running_mean", mean), (f"{name}.running_var", var)):
        run = t[key]
        run.index_copy_(0, idx, torch.lerp(run.index_select(0, idx), batch.to(run.dtype), momentum))


def _conv_dtype(h: torch.Tensor, backend: str | None) -> torch.dtype | None:
    """The dtype a conv runs in under autocast (``None``: autocast off, keep the input's).

    The autocast dtype where the backend computes in it (Triton: float16/bfloat16), else
    float32 (the compiled kernels take float32/float64).
    """
    dev = h.device.type
    if not torch.is_autocast_enabled(dev):
        return None
    want = torch.get_autocast_dtype(dev)
    name = ops.resolve_backend(h.device, backend, "multi_conv2d")
    if name == "triton" and want in (torch.float16, torch.bfloat16):
        return want
    return torch.float32


def _conv_bn(
    h: torch.Tensor,
    p: ConvPlan,
    t: Mapping[str, torch.Tensor],
    training: bool,
    eps: float,
    backend: str | None,
    *,
    residual: torch.Tensor | None = None,
    activation: str = "none",
    slope: torch.Tensor | None = None,
    running_momentum: float | None = None,
    sync_bn: bool = False,
) -> torch.Tensor:
    """``multi_conv2d``, each path's BN, ``+ residual``, activation (``slope``: one shared PReLU slope).

    Train mode: BN with batch statistics after the conv (statistics must exist before a batch
    can be normalised); with ``running_momentum`` the running statistics of the rows read are
    updated as ``nn.BatchNorm2d`` does. Eval mode: BN folded into scale/shift and everything in
    the conv's epilogue.
    """
    weight = t[f"{p.name}.weight"]
    dt = _conv_dtype(h, backend)
    if dt is not None:  # under autocast: the custom conv op is not autocast-aware, cast explicitly
        h, weight = h.to(dt), weight.to(dt)
    idx = _index(p.rows(), h.device)
    gamma = t[f"{p.name}.bn_weight"].index_select(0, idx)
    beta = t[f"{p.name}.bn_bias"].index_select(0, idx)
    meta = (p.in_offsets, p.in_widths, p.out_widths, p.row_offsets)
    if training and sync_bn:  # statistics over every process: the all-reducing plain BatchNorm
        from .ops.reference import sync_batch_norm
        from .supernet import sync_group

        y = ops.multi_conv2d(h, weight, *meta, stride=p.stride, padding=p.padding, backend=backend)
        y = sync_batch_norm(y, gamma, beta, None, None, momentum=None, eps=eps, group=sync_group())
        if residual is not None:
            y = y + residual
        if activation == "relu":
            return F.relu(y)
        return F.prelu(y, slope.reshape(1)) if activation == "prelu" else y
    if training:
        y, s, q = ops.multi_conv2d(h, weight, *meta, stride=p.stride, padding=p.padding, stats=True, backend=backend)
        if running_momentum is not None:
            _update_running(t, p.name, idx, s, q, y.numel() // y.shape[1], running_momentum)
        if _fused_bn_act(y, residual, backend):
            return _BatchNormAct.apply(y, s, q, gamma, beta, eps, residual, activation, slope)
        y = _BatchNormFromSums.apply(y, s, q, gamma, beta, eps)
        if residual is not None:
            y = y + residual
        if activation == "relu":
            return F.relu(y)
        return F.prelu(y, slope.reshape(1)) if activation == "prelu" else y
    mean = t[f"{p.name}.running_mean"].index_select(0, idx)
    var = t[f"{p.name}.running_var"].index_select(0, idx)
    scale = gamma * torch.rsqrt(var + eps)
    shift = beta - mean * scale
    slopes = slope.reshape(1).expand(len(p.out_widths)).contiguous() if activation == "prelu" else None
    return ops.multi_conv2d(h, weight, *meta, stride=p.stride, padding=p.padding, scale=scale, shift=shift,
                            residual=residual, activation=activation, prelu_slope=slopes, backend=backend)


def _residual(h: torch.Tensor, sc: torch.Tensor | None, blk: BlockPlan, num_paths: int) -> torch.Tensor:
    """The packed tensor each path adds after its second conv: shortcut output or block input."""
    if len(blk.shortcut_paths) == num_paths:
        return sc
    if not blk.shortcut_paths:  # every path keeps its width: h is laid out like the output
        return h
    sc_at = {k: i for i, k in enumerate(blk.shortcut_paths)}
    parts = []
    for k in range(num_paths):
        if k in sc_at:
            i = sc_at[k]
            o, w = blk.shortcut.out_offsets[i], blk.shortcut.out_widths[i]
            parts.append(sc[:, o : o + w])
        else:  # identity: path k's block of the block input (conv1 reads it there), same width
            o, w = blk.conv1.in_offsets[k], blk.conv2.out_widths[k]
            parts.append(h[:, o : o + w])
    return torch.cat(parts, 1)


def run_plan(
    plan: MultiPathPlan,
    x: torch.Tensor,
    tensors: Mapping[str, torch.Tensor],
    *,
    training: bool,
    backend: str | None = None,
    running_momentum: float | None = None,
    sync_bn: bool = False,
) -> torch.Tensor:
    """Logits (K, N, num_classes) of the plan's K paths on ``x``, from packed tensors by name.

    ``tensors`` maps each layer's ``{name}.weight/.bn_weight/.bn_bias/.running_mean/
    .running_var``, each block's PReLU slope and ``classifier_weight``/``classifier_bias`` to
    packed tensors (:func:`model_tensors` of a supernet). ``training``: BN with each path's
    batch statistics (running statistics are read only in eval mode and written only with
    ``running_momentum``: an ``nn.BatchNorm2d``-style update, meaningful when no two paths
    share a BN row, as for packed independent networks). ``sync_bn``: train-mode statistics over
    the batches of every process of ``torch.distributed``'s default group (SyncBN; no running
    statistics update then).
    ``backend`` is passed to every ``multi_conv2d`` call. Under autocast each conv runs in the
    autocast dtype where its backend computes in it (Triton), else in float32.
    """
    if x.dim() != 4 or x.shape[1] != plan.in_channels:
        raise ValueError(f"input has shape {tuple(x.shape)}, the plan expects (N, {plan.in_channels}, H, W)")
    eps, K = plan.eps, plan.num_paths
    o = {"running_momentum": running_momentum, "sync_bn": sync_bn}
    h = _conv_bn(x, plan.stem, tensors, training, eps, backend, activation="relu", **o)
    for blk in plan.blocks:
        y = _conv_bn(h, blk.conv1, tensors, training, eps, backend, activation="relu", **o)
        sc = _conv_bn(h, blk.shortcut, tensors, training, eps, backend, **o) if blk.shortcut else None
        h = _conv_bn(y, blk.conv2, tensors, training, eps, backend, residual=_residual(h, sc, blk, K),
                     activation="prelu" if blk.prelu else "relu",
                     slope=tensors[blk.prelu] if blk.prelu else None, **o)
    feats = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)
    w, b = tensors["classifier_weight"], tensors["classifier_bias"]
    n, logits = plan.num_classes, []
    for o, fw, r in zip(accumulate(plan.feature_widths, initial=0), plan.feature_widths, plan.classifier_rows):
        logits.append(F.linear(feats[:, o : o + fw], w[r : r + n, :fw], b[r : r + n]))
    return torch.stack(logits)


def forward_paths(
    model, x: torch.Tensor, archs: Sequence[str | Arch], *, backend: str | None = None
) -> torch.Tensor:
    """Logits (K, N, num_classes) of every architecture in ``archs`` on the same images ``x``.

    Equal (values and gradients) to ``torch.stack([model(x, a) for a in archs])``; in train
    mode BN uses each path's batch statistics and the running statistics are NOT updated.
    A repeated architecture runs once. ``backend`` picks the conv backend (see
    :mod:`fastsupernet.ops.dispatch`; default: the fastest for ``x``'s device).
    """
    parsed = [model.parse(a) for a in archs]
    if not parsed:
        raise ValueError("forward_paths needs at least one architecture")
    if x.dim() != 4 or x.shape[1] != model.in_channels:
        raise ValueError(f"input has shape {tuple(x.shape)}, the supernet expects (N, {model.in_channels}, H, W)")
    first: dict[tuple[int, ...], int] = {}
    unique: list[Arch] = []
    where = []
    for a in parsed:
        if a.widths not in first:
            first[a.widths] = len(unique)
            unique.append(a)
        where.append(first[a.widths])
    plan = build_plan(model, unique)
    out = run_plan(plan, x, model_tensors(model), training=model.training, backend=backend,
                   sync_bn=bool(getattr(model, "sync_bn", False)))
    if len(unique) == len(parsed):
        return out
    return out.index_select(0, torch.tensor(where, device=out.device))
