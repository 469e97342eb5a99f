"""The weight-sharing supernet: a ResNet over a :class:`~fastsupernet.space.ChannelSpace`.

Every conv's output width is chosen per candidate and its weight is the prefix slice
``weight[row_offset : row_offset + out, :in]`` of one packed parameter, read as a view.

Weight-sharing degree (branch groups)
-------------------------------------
Each conv layer (stem, block convs, shortcuts) has a branch count ``G``, set per stage (the
stem follows stage 1; the classifier has its own count). The layer's width choices, in the
space's order, are split into ``G`` contiguous groups as evenly as possible, earlier groups
taking the remainder. A candidate uses the group holding its *original* (un-remapped) output
width; the classifier picks its group by its *input* width. Each group's weight has as many
rows as the group's largest *remapped* width; all groups of a layer are stacked in one packed
parameter (rows = every group's output channels, in group order; columns = the layer's largest
input width), so a candidate's weight is addressed by a row offset. BN affine parameters and
running statistics are packed the same way; a shortcut follows its block's output width.

==============  ==============================  ====================================
G               Track-1 stage 3 (16 choices)    meaning
==============  ==============================  ====================================
1               {4..64}                          fully shared (prefix slicing only)
2               {4..32} {36..64}                 narrow and wide widths split
4               {4..16} {20..32} {36..48} ...    the multi-branch stage of the method
16              one group per width              no sharing between widths
==============  ==============================  ====================================

``grow`` turns a G net into a G' net by copying, for each new group, the prefix of the old
group that holds the new group's largest width: how progressive training adds branches.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import reference as ref
from .space import Arch, ChannelSpace, ConvLayer, Track1Space

__all__ = [
    "SupernetConfig",
    "BranchGroups",
    "split_groups",
    "Supernet",
    "StaticNet",
    "LayerSlice",
]

ENHANCED_WIDTH_MAP = ((4, 5), (8, 9))


@dataclass(frozen=True)
class SupernetConfig:
    """Structure and options of a supernet; stored in checkpoints.

    branches: branch count G per stage (the stem follows stage 1).
    classifier_branches: branch count of the classifier, grouped by its input width.
    width_map: widths run with more channels, e.g. ``((4, 5), (8, 9))`` (candidates enhancement).
    residual_activation: ``"relu"`` or ``"prelu"`` (one learnable slope per block) after each add.
    shortcut: ``"all"`` (1x1 conv + BN in every block) or ``"projection"`` (identity where a
        candidate's block keeps its width and stride 1, 1x1 conv + BN elsewhere).
    bn_momentum: BatchNorm running-statistics momentum (``None``: cumulative average).
    """

    branches: tuple[int, ...] = (1, 1, 1)
    classifier_branches: int = 1
    width_map: tuple[tuple[int, int], ...] = ()
    residual_activation: str = "relu"
    shortcut: str = "all"
    bn_momentum: float | None = 0.1
    bn_eps: float = 1e-5
    prelu_init: float = 0.25

    def __post_init__(self) -> None:
        object.__setattr__(self, "branches", tuple(int(g) for g in self.branches))
        wm = tuple(sorted((int(a), int(b)) for a, b in (dict(self.width_map).items())))
        object.__setattr__(self, "width_map", wm)
        if any(g < 1 for g in self.branches) or self.classifier_branches < 1:
            raise ValueError(f"branch counts must be >= 1, got {self.branches} / {self.classifier_branches}")
        if self.residual_activation not in ("relu", "prelu"):
            raise ValueError(f"residual_activation must be 'relu' or 'prelu', got {self.residual_activation!r}")
        if self.shortcut not in ("all", "projection"):
            raise ValueError(f"shortcut must be 'all' or 'projection', got {self.shortcut!r}")
        if any(b < a for a, b in self.width_map):
            raise ValueError(f"width_map may only widen channels, got {dict(self.width_map)}")
        if self.bn_momentum is not None and not 0.0 <= self.bn_momentum <= 1.0:
            raise ValueError(f"bn_momentum must be in [0, 1] or None, got {self.bn_momentum}")

    @classmethod
    def enhanced(cls, branches: Sequence[int] = (1, 1, 1), classifier_branches: int = 1, **kw) -> "SupernetConfig":
        """Candidates enhancement: widths 4->5 and 8->9, PReLU after each add, 1x1 shortcut everywhere."""
        return cls(
            branches=tuple(branches),
            classifier_branches=classifier_branches,
            width_map=ENHANCED_WIDTH_MAP,
            residual_activation="prelu",
            shortcut="all",
            **kw,
        )

    def remap(self, width: int) -> int:
        return dict(self.width_map).get(width, width)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["branches"] = list(self.branches)
        d["width_map"] = [list(p) for p in self.width_map]
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "SupernetConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown supernet option(s) {sorted(unknown)}; known: {sorted(known)}")
        kw = dict(d)
        if "branches" in kw:
            kw["branches"] = tuple(kw["branches"])
        if "width_map" in kw:
            kw["width_map"] = tuple(tuple(p) for p in kw["width_map"])
        return cls(**kw)


def split_groups(choices: Sequence[int], groups: int) -> tuple[tuple[int, ...], ...]:
    """Split ``choices`` into ``groups`` contiguous runs as evenly as possible, earlier runs longer."""
    n = len(choices)
    if not 1 <= groups <= n:
        raise ValueError(f"branch count {groups} must be between 1 and the number of width choices ({n}) for {list(choices)}")
    base, extra = divmod(n, groups)
    out, start = [], 0
    for g in range(groups):
        size = base + (1 if g < extra else 0)
        out.append(tuple(choices[start : start + size]))
        start += size
    return tuple(out)


@dataclass(frozen=True)
class BranchGroups:
    """Row layout of one packed layer: which width uses which group, and where its rows start."""

    groups: tuple[tuple[int, ...], ...]  # original widths per group
    rows: tuple[int, ...]  # rows per group (largest remapped width, or classes for the classifier)
    offsets: tuple[int, ...]  # first row of each group
    _group_of: dict = field(compare=False, repr=False)

    @classmethod
    def build(cls, choices: Sequence[int], g: int, rows_of_group) -> "BranchGroups":
        groups = split_groups(choices, g)
        rows = tuple(rows_of_group(grp) for grp in groups)
        offsets = tuple(sum(rows[:i]) for i in range(len(rows)))
        group_of = {w: i for i, grp in enumerate(groups) for w in grp}
        return cls(groups, rows, offsets, group_of)

    @property
    def total_rows(self) -> int:
        return sum(self.rows)

    def group_of(self, width: int) -> int:
        try:
            return self._group_of[width]
        except KeyError:
            raise ValueError(f"width {width} is not one of this layer's choices {[w for g in self.groups for w in g]}") from None

    def offset_of(self, width: int) -> int:
        return self.offsets[self.group_of(width)]


@dataclass(frozen=True)
class LayerSlice:
    """Where one candidate's weight sits in a packed layer: rows [row_offset, row_offset+out_width), cols [:in_width)."""

    name: str
    row_offset: int
    out_width: int
    in_width: int
    stride: int
    kernel: int


def sync_group():
    """The process group SyncBN reduces over: ``torch.distributed``'s default group."""
    return torch.distributed.group.WORLD


class PackedConvBN(nn.Module):
    """A conv layer whose branch groups are stacked in one parameter, with its packed BatchNorm."""

    def __init__(self, layer: ConvLayer, groups: BranchGroups, max_in: int, cfg: SupernetConfig) -> None:
        super().__init__()
        self.layer = layer
        self.groups = groups
        rows = groups.total_rows
        k = layer.kernel
        self.weight = nn.Parameter(torch.empty(rows, max_in, k, k))
        # Every group initialised as its own conv of that size would be (Kaiming uniform, fan_in = max_in*k*k).
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.bn_weight = nn.Parameter(torch.ones(rows))
        self.bn_bias = nn.Parameter(torch.zeros(rows))
        self.register_buffer("running_mean", torch.zeros(rows))
        self.register_buffer("running_var", torch.ones(rows))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))
        self.momentum = cfg.bn_momentum
        self.eps = cfg.bn_eps
        self.sync_bn = False  # train-mode statistics over every process (Supernet.set_sync_bn)

    def forward(self, x: torch.Tensor, width: int, run_width: int) -> torch.Tensor:
        off = self.groups.offset_of(width)
        L = self.layer
        y = ref.sliced_conv2d(x, self.weight, run_width, row_offset=off, stride=L.stride, padding=L.kernel // 2)
        return ref.sliced_batch_norm(
            y,
            self.bn_weight,
            self.bn_bias,
            self.running_mean,
            self.running_var,
            row_offset=off,
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
            num_batches_tracked=self.num_batches_tracked,
            group=sync_group() if self.sync_bn and self.training else None,
        )

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()


class Supernet(nn.Module):
    """ResNet supernet over ``space``; ``forward(x, arch)`` runs one candidate.

    The candidate is an argument of every call: the module holds no "active" sub-network.
    """

    def __init__(
        self,
        space: ChannelSpace | None = None,
        config: SupernetConfig | None = None,
        *,
        in_channels: int = 3,
        num_classes: int = 100,
    ) -> None:
        super().__init__()
        self.space = space if space is not None else Track1Space()
        self.config = config if config is not None else SupernetConfig()
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        cfg, sp = self.config, self.space
        if len(cfg.branches) != len(sp.stages):
            raise ValueError(f"config.branches has {len(cfg.branches)} entries, the space has {len(sp.stages)} stages")
        max_run = {p: max(cfg.remap(w) for w in sp.choices[p]) for p in range(sp.num_network_positions)}

        def conv(L: ConvLayer) -> PackedConvBN:
            choices = sp.choices[L.position]
            g = BranchGroups.build(choices, cfg.branches[L.stage], lambda grp: max(cfg.remap(w) for w in grp))
            max_in = self.in_channels if L.in_position is None else max_run[L.in_position]
            return PackedConvBN(L, g, max_in, cfg)

        by_name = {L.name: L for L in sp.layers}
        self.stem = conv(by_name["stem"])
        self.stages = nn.ModuleList()
        for s, st in enumerate(sp.stages):
            blocks = nn.ModuleList()
            for b in range(st.blocks):
                blk = nn.Module()
                blk.conv1 = conv(by_name[f"stages.{s}.{b}.conv1"])
                blk.conv2 = conv(by_name[f"stages.{s}.{b}.conv2"])
                blk.shortcut = conv(by_name[f"stages.{s}.{b}.shortcut"])
                if cfg.residual_activation == "prelu":
                    blk.prelu = nn.Parameter(torch.full((1,), cfg.prelu_init))
                blocks.append(blk)
            self.stages.append(blocks)
        last = sp.last_position
        self.classifier_groups = BranchGroups.build(sp.choices[last], cfg.classifier_branches, lambda grp: self.num_classes)
        cls_in = max_run[last]
        self.classifier_weight = nn.Parameter(torch.empty(self.classifier_groups.total_rows, cls_in))
        self.classifier_bias = nn.Parameter(torch.empty(self.classifier_groups.total_rows))
        nn.init.kaiming_uniform_(self.classifier_weight, a=5**0.5)
        bound = 1.0 / cls_in**0.5
        nn.init.uniform_(self.classifier_bias, -bound, bound)

    # ---------------------------------------------------------------- candidates
    def parse(self, arch: str | Arch | Sequence[int]) -> Arch:
        return arch if isinstance(arch, Arch) and len(arch.values) == self.space.num_positions else self.space.parse(arch)

    def run_widths(self, arch: str | Arch) -> tuple[int, ...]:
        """The channel counts a candidate actually runs (after the width map)."""
        return tuple(self.config.remap(w) for w in self.parse(arch).widths)

    def conv_layers(self) -> list[PackedConvBN]:
        """Every packed conv, in the order of ``space.layers``."""
        out = [self.stem]
        for blocks in self.stages:
            for blk in blocks:
                out += [blk.conv1, blk.conv2, blk.shortcut]
        return out

    def uses_shortcut_conv(self, layer: ConvLayer, run: Sequence[int]) -> bool:
        if self.config.shortcut == "all" or layer.stride != 1:
            return True
        return run[layer.in_position] != run[layer.position]

    def layer_slices(self, arch: str | Arch) -> list[LayerSlice]:
        """The packed-weight slice of every conv a candidate runs, then the classifier's (for kernels)."""
        a = self.parse(arch)
        run = self.run_widths(a)
        out = []
        for m in self.conv_layers():
            L = m.layer
            if L.kind == "shortcut" and not self.uses_shortcut_conv(L, run):
                continue
            cin = self.in_channels if L.in_position is None else run[L.in_position]
            out.append(LayerSlice(L.name, m.groups.offset_of(a.widths[L.position]), run[L.position], cin, L.stride, L.kernel))
        last = self.space.last_position
        out.append(
            LayerSlice("classifier", self.classifier_groups.offset_of(a.widths[last]), self.num_classes, run[last], 1, 1)
        )
        return out

    def forward(self, x: torch.Tensor, arch: str | Arch) -> torch.Tensor:
        a = self.parse(arch)
        w = a.widths
        run = self.run_widths(a)
        if x.shape[1] != self.in_channels:
            raise ValueError(f"input has {x.shape[1]} channels, the supernet expects {self.in_channels}")
        h = F.relu(self.stem(x, w[0], run[0]))
        for blocks in self.stages:
            for blk in blocks:
                p1, p2 = blk.conv1.layer.position, blk.conv2.layer.position
                y = F.relu(blk.conv1(h, w[p1], run[p1]))
                y = blk.conv2(y, w[p2], run[p2])
                if self.uses_shortcut_conv(blk.shortcut.layer, run):
                    y = y + blk.shortcut(h, w[p2], run[p2])
                else:
                    y = y + h
                h = F.prelu(y, blk.prelu) if self.config.residual_activation == "prelu" else F.relu(y)
        h = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)
        last = self.space.last_position
        off = self.classifier_groups.offset_of(w[last])
        return ref.sliced_linear(h, self.classifier_weight, self.classifier_bias, self.num_classes, row_offset=off)

    def forward_paths(
        self, x: torch.Tensor, archs: Sequence[str | Arch], *, backend: str | None = None
    ) -> torch.Tensor:
        """Logits (K, N, num_classes) of K candidates on the same images, run together through
        the multi-candidate kernels; see :func:`fastsupernet.multipath.forward_paths` (equal to
        stacking ``forward`` per candidate, except that train mode leaves BN running statistics untouched)."""
        from .multipath import forward_paths

        return forward_paths(self, x, archs, backend=backend)

    @property
    def sync_bn(self) -> bool:
        """Whether train-mode BN takes its statistics over every process (see :meth:`set_sync_bn`)."""
        return self.stem.sync_bn

    def set_sync_bn(self, on: bool) -> "Supernet":
        """Train-mode BN statistics over the batches of every process of the ``torch.distributed``
        default group (SyncBN; needs an initialised group when on), or per process (off, the
        default). Applies to ``forward`` and ``forward_paths``; returns ``self``."""
        if on and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError("set_sync_bn(True) needs an initialised torch.distributed process group")
        for m in self.conv_layers():
            m.sync_bn = bool(on)
        return self

    def reset_running_stats(self) -> None:
        """Reset every BN layer's running statistics (before BN recalibration)."""
        for m in self.conv_layers():
            m.reset_running_stats()

    # ---------------------------------------------------------------- export / grow
    def export(self, arch: str | Arch) -> "StaticNet":
        """A plain static network with exactly this candidate's widths and copies of its weights."""
        a = self.parse(arch)
        w, run = a.widths, self.run_widths(a)
        cfg = self.config
        net = StaticNet(self.space, run, in_channels=self.in_channels, num_classes=self.num_classes, config=cfg)
        p = next(self.parameters())
        net.to(device=p.device, dtype=p.dtype)
        with torch.no_grad():

            def copy(dst_conv: nn.Conv2d, dst_bn: nn.BatchNorm2d, src: PackedConvBN) -> None:
                L = src.layer
                off = src.groups.offset_of(w[L.position])
                rows = slice(off, off + dst_conv.out_channels)
                dst_conv.weight.copy_(src.weight[rows, : dst_conv.in_channels])
                dst_bn.weight.copy_(src.bn_weight[rows])
                dst_bn.bias.copy_(src.bn_bias[rows])
                dst_bn.running_mean.copy_(src.running_mean[rows])
                dst_bn.running_var.copy_(src.running_var[rows])
                dst_bn.num_batches_tracked.copy_(src.num_batches_tracked)

            copy(net.stem_conv, net.stem_bn, self.stem)
            for sblocks, dblocks in zip(self.stages, net.stages):
                for sb, db in zip(sblocks, dblocks):
                    copy(db.conv1, db.bn1, sb.conv1)
                    copy(db.conv2, db.bn2, sb.conv2)
                    if db.shortcut_conv is not None:
                        copy(db.shortcut_conv, db.shortcut_bn, sb.shortcut)
                    if db.prelu is not None:
                        db.prelu.weight.copy_(sb.prelu)
            last = self.space.last_position
            off = self.classifier_groups.offset_of(w[last])
            net.classifier.weight.copy_(self.classifier_weight[off : off + self.num_classes, : run[last]])
            net.classifier.bias.copy_(self.classifier_bias[off : off + self.num_classes])
        net.train(self.training)
        return net

    def grow(self, branches: Sequence[int], classifier_branches: int | None = None) -> "Supernet":
        """A new supernet with other branch counts, each new group copied from the old group holding its largest width."""
        cfg = replace(
            self.config,
            branches=tuple(branches),
            classifier_branches=self.config.classifier_branches if classifier_branches is None else classifier_branches,
        )
        new = Supernet(self.space, cfg, in_channels=self.in_channels, num_classes=self.num_classes)
        p = next(self.parameters())
        new.to(device=p.device, dtype=p.dtype)
        with torch.no_grad():
            for src, dst in zip(self.conv_layers(), new.conv_layers()):
                for grp, off, rows in zip(dst.groups.groups, dst.groups.offsets, dst.groups.rows):
                    s_off = src.groups.offset_of(grp[-1])
                    for name in ("weight", "bn_weight", "bn_bias", "running_mean", "running_var"):
                        getattr(dst, name)[off : off + rows].copy_(getattr(src, name)[s_off : s_off + rows])
                dst.num_batches_tracked.copy_(src.num_batches_tracked)
            for grp, off in zip(new.classifier_groups.groups, new.classifier_groups.offsets):
                s_off = self.classifier_groups.offset_of(grp[-1])
                n = self.num_classes
                new.classifier_weight[off : off + n].copy_(self.classifier_weight[s_off : s_off + n])
                new.classifier_bias[off : off + n].copy_(self.classifier_bias[s_off : s_off + n])
            for sblocks, dblocks in zip(self.stages, new.stages):
                for sb, db in zip(sblocks, dblocks):
                    if hasattr(db, "prelu"):
                        db.prelu.copy_(sb.prelu)
        new.train(self.training)
        return new


class StaticBlock(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int, shortcut_conv: bool, cfg: SupernetConfig) -> None:
        super().__init__()

        def bn(c: int) -> nn.BatchNorm2d:
            return nn.BatchNorm2d(c, eps=cfg.bn_eps, momentum=cfg.bn_momentum)

        self.conv1 = nn.Conv2d(cin, mid, 3, stride, 1, bias=False)
        self.bn1 = bn(mid)
        self.conv2 = nn.Conv2d(mid, cout, 3, 1, 1, bias=False)
        self.bn2 = bn(cout)
        self.shortcut_conv = nn.Conv2d(cin, cout, 1, stride, 0, bias=False) if shortcut_conv else None
        self.shortcut_bn = bn(cout) if shortcut_conv else None
        self.prelu = nn.PReLU(1, init=cfg.prelu_init) if cfg.residual_activation == "prelu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        y = y + (self.shortcut_bn(self.shortcut_conv(x)) if self.shortcut_conv is not None else x)
        return self.prelu(y) if self.prelu is not None else F.relu(y)


class StaticNet(nn.Module):
    """One candidate as an ordinary network: plain Conv2d/BatchNorm2d/Linear, fixed widths.

    ``run_widths`` are the channel counts it runs (after any width map), one per network position.
    """

    def __init__(
        self,
        space: ChannelSpace,
        run_widths: Sequence[int],
        *,
        in_channels: int = 3,
        num_classes: int = 100,
        config: SupernetConfig | None = None,
    ) -> None:
        super().__init__()
        cfg = config if config is not None else SupernetConfig()
        w = tuple(run_widths)
        if len(w) != space.num_network_positions:
            raise ValueError(f"StaticNet needs {space.num_network_positions} widths, got {len(w)}")
        self.run_widths = w
        self.stem_conv = nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(w[0], eps=cfg.bn_eps, momentum=cfg.bn_momentum)
        self.stages = nn.ModuleList()
        prev, pos = 0, 1
        for st in space.stages:
            blocks = nn.ModuleList()
            for b in range(st.blocks):
                stride = st.stride if b == 0 else 1
                cin, mid, cout = w[prev], w[pos], w[pos + 1]
                conv_sc = cfg.shortcut == "all" or stride != 1 or cin != cout
                blocks.append(StaticBlock(cin, mid, cout, stride, conv_sc, cfg))
                prev, pos = pos + 1, pos + 2
            self.stages.append(blocks)
        self.classifier = nn.Linear(w[space.last_position], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem_bn(self.stem_conv(x)))
        for blocks in self.stages:
            for blk in blocks:
                h = blk(h)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))
