"""Candidates as a prefix tree over their layer widths, laid out level by level.

A network position ``d`` (0 = stem, then each block's conv1 and conv2, in network order) is
one *level* of the tree. A node at level ``d`` is a distinct prefix ``widths[: d + 1]`` of the
candidates: everything a candidate computes up to and including position ``d`` (the conv, its
BN, and at a block's conv2 also the shortcut and the residual add) depends only on that prefix,
in recalibration and in evaluation alike, so it is computed once per node. Leaves (level 18 in
Track 1) are distinct networks; candidates with equal network widths share a leaf.

A level's nodes are laid out side by side on the channel axis of one packed activation
(node ``i`` at channels ``[offsets[i], offsets[i] + run[i])``), in the order of the sorted
candidates, so that one ``multi_conv2d`` call computes the whole level, each node reading its
parent's channel slice of the previous level (siblings read the same slice).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ..space import Arch
from ..supernet import PackedConvBN, Supernet

__all__ = ["Level", "TreePlan", "layer_modules", "spatial_sizes", "build_plan", "prefix_sharing", "network_macs", "candidate_macs"]


@dataclass
class Level:
    """The nodes of one network position, packed on the channel axis."""

    position: int
    kind: str  # "stem" | "conv1" | "conv2"
    parent: list[int] = field(default_factory=list)  # node index in the previous level (stem: 0, the image)
    widths: list[int] = field(default_factory=list)  # original width (selects the branch group)
    run: list[int] = field(default_factory=list)  # channels actually run (after the width map)
    rows: list[int] = field(default_factory=list)  # first row of the node's slice in the conv's packed weight
    offsets: list[int] = field(default_factory=list)  # first channel of the node in the packed activation
    # conv2 levels only: the shortcut from the block input (level position - 2)
    block_in: list[int] = field(default_factory=list)  # node index in the block-input level
    shortcut_conv: list[bool] = field(default_factory=list)  # 1x1 conv + BN (else identity)
    shortcut_rows: list[int] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return self.offsets[-1] + self.run[-1] if self.run else 0

    def add(self, parent: int, width: int, run: int, row: int) -> int:
        self.offsets.append(self.channels)
        self.parent.append(parent)
        self.widths.append(width)
        self.run.append(run)
        self.rows.append(row)
        return len(self.run) - 1


@dataclass
class TreePlan:
    """Levels of the tree of some networks and where each network ends (its leaf)."""

    levels: list[Level]
    networks: list[tuple[int, ...]]  # distinct network widths, sorted
    leaf_of: list[int]  # networks[j] ends at node leaf_of[j] of the last level
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


def _node_macs(model: Supernet, mods, sizes, run: Sequence[int], d: int, in_channels: int) -> int:
    """Multiply-adds per image of position d (conv, and the shortcut conv at a conv2) for run widths ``run``."""
    conv, sc = mods[d]
    L = conv.layer
    hw = sizes[d] * sizes[d]
    cin = in_channels if L.in_position is None else run[L.in_position]
    macs = cin * run[d] * L.kernel * L.kernel * hw
    if sc is not None and model.uses_shortcut_conv(sc.layer, run):
        macs += run[sc.layer.in_position] * run[d] * hw
    return macs


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
    """(multiply-adds per image of all candidates one by one, the same with every shared prefix once).

    Pure bookkeeping over the sorted candidates (no tensors): a candidate adds the nodes below
    its longest common prefix with the previous one; equal networks add nothing.
    """
    nets, members = _sorted_networks(model, archs)
    return network_macs(model, nets, [len(ids) for ids in members], resolution=resolution)


def network_macs(model: Supernet, networks: Sequence[tuple[int, ...]], counts: Sequence[int] | None = None, *,
                 resolution: int = 32) -> tuple[int, int]:
    """:func:`prefix_sharing` of distinct sorted network widths, network j standing for ``counts[j]`` candidates."""
    mods, sizes = layer_modules(model), spatial_sizes(model, resolution)
    remap, cin = model.config.remap, model.in_channels
    total = shared = 0
    prev = None
    for j, net in enumerate(networks):
        run = tuple(remap(w) for w in net)
        per_pos = [_node_macs(model, mods, sizes, run, d, cin) for d in range(len(mods))]
        full = sum(per_pos) + run[-1] * model.num_classes
        total += full * (1 if counts is None else counts[j])
        shared += sum(per_pos[_lcp(prev, net):]) + run[-1] * model.num_classes
        prev = net
    return total, shared


def build_plan(model: Supernet, networks: Sequence[tuple[int, ...]]) -> TreePlan:
    """The level layout of ``networks`` (distinct network widths, sorted)."""
    mods = layer_modules(model)
    remap = model.config.remap
    levels = [Level(d, conv.layer.kind) for d, (conv, _) in enumerate(mods)]
    leaf_of, cls_rows = [], []
    prev = None
    path: list[int] = [0] * len(mods)
    for net in networks:
        if prev is not None and not prev < net:
            raise ValueError("build_plan needs distinct networks in sorted order")
        run = tuple(remap(w) for w in net)
        for d in range(_lcp(prev, net), len(mods)):
            conv, sc = mods[d]
            lv = levels[d]
            i = lv.add(path[d - 1] if d > 0 else 0, net[d], run[d], conv.groups.offset_of(net[d]))
            path[d] = i
            if sc is not None:
                lv.block_in.append(path[d - 2] if d >= 2 else 0)
                use = model.uses_shortcut_conv(sc.layer, run)
                lv.shortcut_conv.append(use)
                lv.shortcut_rows.append(sc.groups.offset_of(net[d]))
        leaf_of.append(path[len(mods) - 1])
        cls_rows.append(model.classifier_groups.offset_of(net[model.space.last_position]))
        prev = net
    return TreePlan(levels, list(networks), leaf_of, cls_rows)
