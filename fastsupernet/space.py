"""Channel-width search spaces over a ResNet-style topology.

A :class:`ChannelSpace` describes a stem conv followed by stages of basic blocks (two 3x3
convs each), where every conv's output width is chosen from a per-position set. An
architecture is written as dash-joined integers, one per position, in network order:
stem, then each block's first and second conv, stage by stage, then any *trailing*
positions, which are validated but do not change the network (Track 1 has one).

:class:`Track1Space` is the CVPR 2021 Lightweight NAS Challenge, Track 1 preset
(ResNet-20 on CIFAR-100, 20 integers of which the first 19 build the network).
"""
from __future__ import annotations

import random

import numpy as np
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

__all__ = [
    "StageSpec",
    "ChannelSpace",
    "Track1Space",
    "Arch",
    "ConvLayer",
    "space_from_dict",
]


@dataclass(frozen=True)
class StageSpec:
    """One stage: ``blocks`` basic blocks, the first with ``stride``; each conv's width from ``choices``."""

    blocks: int
    stride: int
    choices: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "choices", tuple(int(c) for c in self.choices))
        if self.blocks < 1:
            raise ValueError(f"StageSpec.blocks must be >= 1, got {self.blocks}")
        if self.stride not in (1, 2):
            raise ValueError(f"StageSpec.stride must be 1 or 2, got {self.stride}")
        _check_choices(self.choices, "StageSpec.choices")


def _check_choices(choices: Sequence[int], what: str) -> None:
    if not choices:
        raise ValueError(f"{what} must not be empty")
    if any(c < 1 for c in choices):
        raise ValueError(f"{what} must hold positive widths, got {list(choices)}")
    if list(choices) != sorted(set(choices)):
        raise ValueError(f"{what} must be strictly increasing, got {list(choices)}")


@dataclass(frozen=True)
class ConvLayer:
    """A conv of the network, as the space sees it.

    ``position`` indexes the architecture string (0-based) that sets this conv's output width;
    ``in_position`` the one that sets its input width (``None``: the image). Shortcut convs
    share the position of their block's second conv.
    """

    name: str
    kind: str  # "stem" | "conv1" | "conv2" | "shortcut"
    stage: int  # 0-based; the stem belongs to stage 0
    block: int  # 0-based within the stage; -1 for the stem
    position: int
    in_position: int | None
    kernel: int
    stride: int


@dataclass(frozen=True, eq=True)
class Arch:
    """An immutable, hashable architecture: one width per position of its space.

    ``values`` holds every integer of the string, trailing positions included, so the
    canonical string round-trips; ``widths`` holds only those that build the network.
    Two architectures that differ only in trailing positions are different strings but
    the same network: compare ``a.widths == b.widths`` (or use ``widths`` as a key) to
    deduplicate networks.
    """

    values: tuple[int, ...]
    num_network_positions: int

    @property
    def widths(self) -> tuple[int, ...]:
        """The widths that build the network (trailing positions dropped)."""
        return self.values[: self.num_network_positions]

    def __str__(self) -> str:
        return "-".join(str(v) for v in self.values)

    def __repr__(self) -> str:
        return f"Arch('{self}')"


class ChannelSpace:
    """A stem conv, then stages of basic blocks, every conv width searched.

    Parameters
    ----------
    stem_choices: width choices of the stem conv.
    stages: the stages in order.
    trailing_choices: choices of positions after the network's own; they are parsed and
        validated but change nothing (Track 1's 20th integer).
    name: a short name, kept in checkpoints.
    """

    def __init__(
        self,
        stem_choices: Sequence[int],
        stages: Sequence[StageSpec],
        trailing_choices: Sequence[Sequence[int]] = (),
        name: str = "custom",
    ) -> None:
        self.stem_choices = tuple(int(c) for c in stem_choices)
        _check_choices(self.stem_choices, "stem_choices")
        if not stages:
            raise ValueError("a ChannelSpace needs at least one stage")
        self.stages = tuple(stages)
        self.trailing_choices = tuple(tuple(int(c) for c in ch) for ch in trailing_choices)
        for i, ch in enumerate(self.trailing_choices):
            _check_choices(ch, f"trailing_choices[{i}]")
        self.name = name
        choices: list[tuple[int, ...]] = [self.stem_choices]
        for st in self.stages:
            choices.extend([st.choices] * (2 * st.blocks))
        self.num_network_positions = len(choices)
        choices.extend(self.trailing_choices)
        self.choices: tuple[tuple[int, ...], ...] = tuple(choices)
        self._choice_sets = tuple(frozenset(c) for c in self.choices)
        self.layers: tuple[ConvLayer, ...] = self._build_layers()

    # ------------------------------------------------------------------ structure
    @property
    def num_positions(self) -> int:
        """Number of integers in an architecture string."""
        return len(self.choices)

    def _build_layers(self) -> tuple[ConvLayer, ...]:
        layers = [ConvLayer("stem", "stem", 0, -1, 0, None, 3, 1)]
        pos = 1
        prev_out = 0
        for s, st in enumerate(self.stages):
            for b in range(st.blocks):
                stride = st.stride if b == 0 else 1
                p1, p2 = pos, pos + 1
                layers.append(ConvLayer(f"stages.{s}.{b}.conv1", "conv1", s, b, p1, prev_out, 3, stride))
                layers.append(ConvLayer(f"stages.{s}.{b}.conv2", "conv2", s, b, p2, p1, 3, 1))
                layers.append(ConvLayer(f"stages.{s}.{b}.shortcut", "shortcut", s, b, p2, prev_out, 1, stride))
                prev_out = p2
                pos += 2
        return tuple(layers)

    @property
    def last_position(self) -> int:
        """Position whose width feeds the classifier."""
        return self.num_network_positions - 1

    def stage_of_position(self, position: int) -> int:
        """Stage that owns a network position (the stem belongs to stage 0)."""
        if not 0 <= position < self.num_network_positions:
            raise ValueError(f"position {position} is not a network position (0..{self.num_network_positions - 1})")
        if position == 0:
            return 0
        pos = 1
        for s, st in enumerate(self.stages):
            pos += 2 * st.blocks
            if position < pos:
                return s
        raise AssertionError("unreachable")

    @property
    def max_widths(self) -> tuple[int, ...]:
        """Largest width at each network position."""
        return tuple(c[-1] for c in self.choices[: self.num_network_positions])

    # ------------------------------------------------------------------ parsing
    def parse(self, text: str | Arch | Iterable[int]) -> Arch:
        """Parse a dash-joined string (or a sequence of ints) into an :class:`Arch`.

        Raises ``ValueError`` naming the position (1-based), the value and the allowed set.
        """
        if isinstance(text, Arch):
            return self.parse(text.values)
        if isinstance(text, str):
            parts = text.strip().split("-")
            if len(parts) != self.num_positions:
                raise ValueError(
                    f"architecture {text!r} has {len(parts)} values, expected {self.num_positions} dash-joined integers"
                )
            values = []
            for i, p in enumerate(parts):
                p = p.strip()
                if not p or not (p.isdigit() or (p[0] in "+-" and p[1:].isdigit())):
                    raise ValueError(
                        f"architecture {text!r}: position {i + 1} value {p!r} is not an integer; "
                        f"allowed {list(self.choices[i])}"
                    )
                values.append(int(p))
        else:
            values = list(text)
            if len(values) != self.num_positions:
                raise ValueError(f"architecture {values!r} has {len(values)} values, expected {self.num_positions}")
            for i, v in enumerate(values):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise ValueError(
                        f"architecture {values!r}: position {i + 1} value {v!r} is not an integer; "
                        f"allowed {list(self.choices[i])}"
                    )
        for i, v in enumerate(values):
            if v not in self._choice_sets[i]:
                raise ValueError(
                    f"architecture {'-'.join(map(str, values))!r}: position {i + 1} value {v} is not allowed; "
                    f"allowed {list(self.choices[i])}"
                )
        return Arch(tuple(values), self.num_network_positions)

    def canonical(self, text: str | Arch | Iterable[int]) -> str:
        """Canonical dash-joined string of an architecture."""
        return str(self.parse(text))

    # ------------------------------------------------------------------ sampling
    def size(self) -> int:
        """Number of distinct networks (trailing positions do not count)."""
        n = 1
        for c in self.choices[: self.num_network_positions]:
            n *= len(c)
        return n

    def sample(self, rng: random.Random | int | None = None) -> Arch:
        """One architecture drawn uniformly, every position independent."""
        if not isinstance(rng, random.Random):
            rng = random.Random(rng)
        return Arch(tuple(rng.choice(c) for c in self.choices), self.num_network_positions)

    def sample_many(self, n: int, seed: int = 0) -> list[Arch]:
        """``n`` architectures from one seeded stream (the same seed gives the same list)."""
        rng = random.Random(seed)
        return [self.sample(rng) for _ in range(n)]

    def largest(self) -> Arch:
        return Arch(tuple(c[-1] for c in self.choices), self.num_network_positions)

    def smallest(self) -> Arch:
        return Arch(tuple(c[0] for c in self.choices), self.num_network_positions)

    # ------------------------------------------------------------------ cost
    def _run_widths(self, arch: Arch, width_map: Mapping[int, int] | None) -> tuple[int, ...]:
        m = dict(width_map or {})
        return tuple(m.get(w, w) for w in arch.widths)

    def layer_shapes(
        self,
        arch: str | Arch,
        *,
        resolution: int = 32,
        in_channels: int = 3,
        shortcut: str = "all",
        width_map: Mapping[int, int] | None = None,
    ) -> list[tuple[ConvLayer, int, int, int]]:
        """``(layer, in_width, out_width, out_resolution)`` of every conv the network runs."""
        a = self.parse(arch)
        if shortcut not in ("all", "projection"):
            raise ValueError(f"shortcut must be 'all' or 'projection', got {shortcut!r}")
        w = self._run_widths(a, width_map)
        out = []
        res = {None: resolution}
        for L in self.layers:
            cin = in_channels if L.in_position is None else w[L.in_position]
            cout = w[L.position]
            h_in = res[L.in_position]
            h_out = (h_in + 2 * (L.kernel // 2) - L.kernel) // L.stride + 1
            if L.kind == "shortcut" and shortcut == "projection" and L.stride == 1 and cin == cout:
                continue  # identity shortcut
            res.setdefault(L.position, h_out)
            out.append((L, cin, cout, h_out))
        return out

    def costs(
        self,
        archs: Sequence[str | Arch],
        *,
        resolution: int = 32,
        in_channels: int = 3,
        num_classes: int = 100,
        shortcut: str = "all",
        width_map: Mapping[int, int] | None = None,
        residual_activation: str = "relu",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Multiply-adds and parameter counts of many architectures at once (int64 arrays).

        Multiply-adds: one image through the convs and the classifier (BN, activations and
        pooling excluded). Parameters: conv weights, BN affine, classifier, PReLU slopes.
        """
        if shortcut not in ("all", "projection"):
            raise ValueError(f"shortcut must be 'all' or 'projection', got {shortcut!r}")
        m = dict(width_map or {})
        n = len(archs)
        w = np.array([[m.get(v, v) for v in self.parse(a).widths] for a in archs], dtype=np.int64)
        w = w.reshape(n, self.num_network_positions)
        macs = np.zeros(n, dtype=np.int64)
        params = np.zeros(n, dtype=np.int64)
        res: dict[int | None, int] = {None: resolution}
        for L in self.layers:
            h = (res[L.in_position] + 2 * (L.kernel // 2) - L.kernel) // L.stride + 1
            res.setdefault(L.position, h)
            cin = np.full(n, in_channels, dtype=np.int64) if L.in_position is None else w[:, L.in_position]
            cout = w[:, L.position]
            keep = np.ones(n, dtype=bool)
            if L.kind == "shortcut" and shortcut == "projection" and L.stride == 1:
                keep = cin != cout  # identity shortcut where the width is kept
            kk = L.kernel * L.kernel
            macs += np.where(keep, cin * cout * kk * h * h, 0)
            params += np.where(keep, cin * cout * kk + 2 * cout, 0)
        last = w[:, self.last_position]
        macs += last * num_classes
        params += (last + 1) * num_classes
        if residual_activation == "prelu":
            params += sum(st.blocks for st in self.stages)
        return macs, params

    def macs(self, arch: str | Arch, **kw) -> int:
        """Multiply-adds of one image (see :meth:`costs` for the options)."""
        kw.pop("residual_activation", None)
        return int(self.costs([arch], **kw)[0][0])

    def params(self, arch: str | Arch, **kw) -> int:
        """Learnable parameters of the static network (see :meth:`costs` for the options)."""
        kw.pop("resolution", None)
        return int(self.costs([arch], **kw)[1][0])

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        """Plain-container description (checkpoints store this)."""
        return {
            "name": self.name,
            "stem_choices": list(self.stem_choices),
            "stages": [{"blocks": s.blocks, "stride": s.stride, "choices": list(s.choices)} for s in self.stages],
            "trailing_choices": [list(c) for c in self.trailing_choices],
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ChannelSpace) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.choices)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, positions={self.num_positions}, size={self.size():.3e})"


class Track1Space(ChannelSpace):
    """CVPR 2021 Lightweight NAS Track 1: ResNet-20, 20 integers, the 20th ignored.

    Positions 1-7 (stem and stage 1): {4, 8, 12, 16}; 8-13 (stage 2): {4, ..., 32};
    14-19 (stage 3): {4, ..., 64}; position 20 takes stage 3's choices and changes nothing.
    """

    def __init__(self) -> None:
        c16 = tuple(range(4, 17, 4))
        c32 = tuple(range(4, 33, 4))
        c64 = tuple(range(4, 65, 4))
        super().__init__(
            stem_choices=c16,
            stages=[StageSpec(3, 1, c16), StageSpec(3, 2, c32), StageSpec(3, 2, c64)],
            trailing_choices=[c64],
            name="track1",
        )


def space_from_dict(d: Mapping) -> ChannelSpace:
    """Rebuild a space written by :meth:`ChannelSpace.to_dict`."""
    try:
        stages = [StageSpec(int(s["blocks"]), int(s["stride"]), tuple(s["choices"])) for s in d["stages"]]
        space = ChannelSpace(d["stem_choices"], stages, d.get("trailing_choices", ()), name=str(d.get("name", "custom")))
    except (KeyError, TypeError) as e:
        raise ValueError(f"not a space description: {e!r} in {dict(d)!r}") from e
    if space.name == "track1" and space == Track1Space():
        return Track1Space()
    return space


def get_space(name: str) -> ChannelSpace:
    """A preset space by name (``track1``)."""
    if name == "track1":
        return Track1Space()
    raise ValueError(f"unknown space {name!r}; known: ['track1']")
