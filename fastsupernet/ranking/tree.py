"""Candidates as a prefix tree over their layer widths, laid out level by level.

A network position ``d`` (0 = stem, then each block's conv1 and conv2, in network order) is
one *level* of the tree. A node at level ``d`` is a distinct prefix ``widths[: d + 1]`` of the
candidates: everything a candidate computes up to and including position ``d`` (the conv, its
BN, and at a block's conv2 also the shortcut and the residual add) depends only on that prefix,
in recalibration and in evaluation alike, so it is computed once per node. Leaves (level 18 in
Track 1) are distinct networks; candidates with equal network widths share a leaf.

Siblings nest. Nodes with the same parent differ only in the width of position ``d``; when
they also use the same branch group (so the same weight rows) and the same kind of shortcut,
the narrower ones are the first channels of the widest: every output channel of a conv
depends only on its own weight row and the (shared) input, and BN normalises each channel
with its own statistics. Such siblings form one *unit*, computed once at the widest width;
a node is a unit and a width (its first channels).

A level's units are laid out side by side on the channel axis of one packed activation
(unit ``i`` at channels ``[offsets[i], offsets[i] + run[i])``), in the order of the sorted
candidates, so that one ``multi_conv2d`` call computes the whole level, each unit reading its
parent node's channels of the previous level: the first ``in_width[i]`` channels of unit
``parent[i]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ..space import Arch
from ..supernet import PackedConvBN, Supernet

__all__ = ["Level", "TreePlan", "layer_modules", "spatial_sizes", "build_plan", "prefix_sharing", "network_macs", "plan_macs", "candidate_macs"]


@dataclass
class Level:
    """The units of one network position, packed on the channel axis."""

    position: int
    kind: str  # "stem" | "conv1" | "conv2"
    parent: list[int] = field(default_factory=list)  # unit index in the previous level (stem: 0, the image)
    in_width: list[int] = field(default_factory=list)  # channels read from the parent unit (the parent node's run)
    widths: list[int] = field(default_factory=list)  # original width of the widest node (selects the branch group)
    run: list[int] = field(default_factory=list)  # channels computed (the widest node's, after the width map)
    rows: list[int] = field(default_factory=list)  # first row of the unit's slice in the conv's packed weight
    offsets: list[int] = field(default_factory=list)  # first channel of the unit in the packed activation
    # conv2 levels only: the shortcut from the block input (level position - 2)
    block_in: list[int] = field(default_factory=list)  # unit index in the block-input level
    block_in_width: list[int] = field(default_factory=list)  # channels read from it (the block-input node's run)
    shortcut_conv: list[bool] = field(default_factory=list)  # 1x1 conv + BN (else identity)
    shortcut_rows: list[int] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return self.offsets[-1] + self.run[-1] if self.run else 0

    def add(self, parent: int, in_width: int, width: int, run: int, row: int, shortcut: tuple | None = None) -> int:
        """The unit of a new node: the last unit when the node is its sibling with the same
        weight rows and shortcut (then widened to the node's run), else a new unit.

        ``shortcut`` (conv2 levels): (block-input unit, its channels read, shortcut conv?, its rows).
        Nodes arrive in sorted order, so a node's siblings are consecutive at its level, widest last.
        """
        i = len(self.run) - 1
        if (i >= 0 and self.parent[i] == parent and self.in_width[i] == in_width and self.rows[i] == row
                and (shortcut is None or (self.block_in[i], self.block_in_width[i], self.shortcut_conv[i],
                                          self.shortcut_rows[i]) == shortcut)):
            if run > self.run[i]:
                self.run[i], self.widths[i] = run, width
            return i
        self.offsets.append(self.channels)
        self.parent.append(parent)
        self.in_width.append(in_width)
        self.widths.append(width)
        self.run.append(run)
        self.rows.append(row)
        if shortcut is not None:
            bi, biw, use, sc_row = shortcut
            self.block_in.append(bi)
            self.block_in_width.append(biw)
            self.shortcut_conv.append(use)
            self.shortcut_rows.append(sc_row)
        return len(self.run) - 1


@dataclass
class TreePlan:
    """Levels of the tree of some networks and where each network ends (its leaf)."""

    levels: list[Level]
    networks: list[tuple[int, ...]]  # distinct network widths, sorted
    leaf_of: list[int]  # networks[j] ends in unit leaf_of[j] of the last level ...
    leaf_width: list[int]  # ... as its first leaf_width[j] channels
    classifier_rows: list[int]  # first classifier row of each network (its branch group)


def layer_modules(model: Supernet) -> list[tuple[PackedConvBN, PackedConvBN | None]]:
    """Per network position: its conv module and, at a block's conv2, the block's shortcut module."""
    out: list[tuple[PackedConvBN, PackedConvBN | None]] = [(model.stem, None)]
    for blocks in model.stages:
        for blk in blocks:
            out.append((blk.conv1, None))
            out.append((blk.conv2, blk.shortcut))
    return out


def spatial_sizes(model: Supernet, resolution: int) -> list[int]:
    """Output height (= width) of the conv at every network position, for square inputs."""
    sizes, h = [], int(resolution)
    for conv, _ in layer_modules(model):
        L = conv.layer
        h = (h + 2 * (L.kernel // 2) - L.kernel) // L.stride + 1
        sizes.append(h)
    return sizes


def _conv_macs(kernel: int, size: int, cin: int, cout: int, shortcut_cin: int = 0) -> int:
    """Multiply-adds per image of a kernel x kernel conv with ``size`` x ``size`` outputs, and of a
    1x1 shortcut conv from ``shortcut_cin`` channels to the same ``cout`` outputs (0: none)."""
    return (cin * kernel * kernel + shortcut_cin) * cout * size * size


def _node_macs(model: Supernet, mods, sizes, run: Sequence[int], d: int, in_channels: int) -> int:
    """Multiply-adds per image of position d (conv, and the shortcut conv at a conv2) for run widths ``run``."""
    conv, sc = mods[d]
    L = conv.layer
    cin = in_channels if L.in_position is None else run[L.in_position]
    sc_cin = run[sc.layer.in_position] if sc is not None and model.uses_shortcut_conv(sc.layer, run) else 0
    return _conv_macs(L.kernel, sizes[d], cin, run[d], sc_cin)


def candidate_macs(model: Supernet, arch: Arch | str, resolution: int = 32) -> int:
    """Multiply-adds per image of one candidate (convs, shortcut convs, classifier)."""
    mods, sizes = layer_modules(model), spatial_sizes(model, resolution)
    run = model.run_widths(arch)
    return sum(_node_macs(model, mods, sizes, run, d, model.in_channels) for d in range(len(mods))) + (
        run[-1] * model.num_classes
    )


def _sorted_networks(model: Supernet, archs: Sequence[Arch | str]) -> tuple[list[tuple[int, ...]], list[list[int]]]:
    """Distinct network widths in sorted order, and the input indices of each."""
    by_net: dict[tuple[int, ...], list[int]] = {}
    for i, a in enumerate(archs):
        by_net.setdefault(model.parse(a).widths, []).append(i)
    nets = sorted(by_net)
    return nets, [by_net[n] for n in nets]


def _lcp(a: Sequence[int] | None, b: Sequence[int]) -> int:
    if a is None:
        return 0
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prefix_sharing(model: Supernet, archs: Sequence[Arch | str], *, resolution: int = 32) -> tuple[int, int]:
    """(multiply-adds per image of all candidates one by one, the same as the fast engine computes them).

    Pure bookkeeping (no tensors): every unit of the candidates' tree (:func:`build_plan`) once,
    at its width, and each distinct network's classifier; equal networks add nothing.
    """
    nets, members = _sorted_networks(model, archs)
    return network_macs(model, nets, [len(ids) for ids in members], resolution=resolution)


def network_macs(model: Supernet, networks: Sequence[tuple[int, ...]], counts: Sequence[int] | None = None, *,
                 resolution: int = 32) -> tuple[int, int]:
    """:func:`prefix_sharing` of distinct sorted network widths, network j standing for ``counts[j]`` candidates."""
    if not networks:
        return 0, 0
    mods, sizes = layer_modules(model), spatial_sizes(model, resolution)
    remap, cin = model.config.remap, model.in_channels
    total = 0
    for j, net in enumerate(networks):
        run = tuple(remap(w) for w in net)
        full = sum(_node_macs(model, mods, sizes, run, d, cin) for d in range(len(mods))) + run[-1] * model.num_classes
        total += full * (1 if counts is None else counts[j])
    return total, plan_macs(model, build_plan(model, networks), resolution=resolution)


def plan_macs(model: Supernet, plan: TreePlan, *, resolution: int = 32) -> int:
    """Multiply-adds per image the fast engine computes for ``plan``: each unit once, at its width
    (conv, and shortcut conv at a conv2), and each network's classifier."""
    mods, sizes = layer_modules(model), spatial_sizes(model, resolution)
    macs = sum(w * model.num_classes for w in plan.leaf_width)
    for d, lv in enumerate(plan.levels):
        kernel = mods[d][0].layer.kernel
        for i, run in enumerate(lv.run):
            sc_cin = lv.block_in_width[i] if lv.shortcut_conv and lv.shortcut_conv[i] else 0
            macs += _conv_macs(kernel, sizes[d], lv.in_width[i], run, sc_cin)
    return macs


def build_plan(model: Supernet, networks: Sequence[tuple[int, ...]]) -> TreePlan:
    """The level layout of ``networks`` (distinct network widths, sorted)."""
    mods = layer_modules(model)
    remap = model.config.remap
    levels = [Level(d, conv.layer.kind) for d, (conv, _) in enumerate(mods)]
    leaf_of, leaf_width, cls_rows = [], [], []
    prev = None
    path: list[int] = [0] * len(mods)  # the current network's unit at every level
    for net in networks:
        if prev is not None and not prev < net:
            raise ValueError("build_plan needs distinct networks in sorted order")
        run = tuple(remap(w) for w in net)
        for d in range(_lcp(prev, net), len(mods)):
            conv, sc = mods[d]
            shortcut = None
            if sc is not None:
                shortcut = (path[d - 2], run[d - 2], model.uses_shortcut_conv(sc.layer, run),
                            sc.groups.offset_of(net[d]))
            in_width = run[d - 1] if d > 0 else model.in_channels
            path[d] = levels[d].add(path[d - 1] if d > 0 else 0, in_width, net[d], run[d],
                                    conv.groups.offset_of(net[d]), shortcut)
        leaf_of.append(path[len(mods) - 1])
        leaf_width.append(run[len(mods) - 1])
        cls_rows.append(model.classifier_groups.offset_of(net[model.space.last_position]))
        prev = net
    return TreePlan(levels, list(networks), leaf_of, leaf_width, cls_rows)
