"""The training config: a YAML file (or dict) checked against a typed schema on load.

The schema is the set of dataclasses below; their fields, types and defaults are the
documentation of every key. Loading walks the document against them, so an unknown key, a
missing required key or a value of the wrong type raises :class:`ConfigError` naming the file
and the key's path, e.g. ``mini.yaml: stages[1].optimizer.lr: expected a number, got 'fast'``.

Values are plain (str, int, float, bool, lists, None), so :meth:`TrainConfig.to_dict` is what
a checkpoint stores to refuse resuming a run with a different config.
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Union

import yaml

from ..data import parse_data_spec, split_resolution
from ..space import ChannelSpace, get_space
from ..supernet import SupernetConfig

__all__ = [
    "ConfigError",
    "TrainConfig",
    "StageConfig",
    "SupernetSection",
    "OptimizerConfig",
    "ScheduleConfig",
    "SamplingConfig",
    "LossConfig",
    "MaxRecoverConfig",
    "AugmentConfig",
    "SpeedConfig",
    "CheckpointConfig",
    "MetricsConfig",
    "load_config",
    "config_diff",
]


class ConfigError(ValueError):
    """A training config that does not fit the schema; the message names the file and the key path."""


Auto = Literal["auto"]


# ----------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class SupernetSection:
    """Structure of a stage's supernet (see :class:`fastsupernet.SupernetConfig`).

    ``enhanced: true`` is candidates enhancement (widths 4/8 run as 5/9, PReLU after each add,
    a 1x1 shortcut in every block); ``width_map``, ``residual_activation`` and ``shortcut``
    given explicitly override what ``enhanced`` sets.
    """

    branches: list[int]
    classifier_branches: int = 1
    enhanced: bool = False
    width_map: Union[list[list[int]], None] = None
    residual_activation: Union[Literal["relu", "prelu"], None] = None
    shortcut: Union[Literal["all", "projection"], None] = None
    bn_momentum: Union[float, None] = 0.1

    def build(self) -> SupernetConfig:
        """The :class:`SupernetConfig` this section describes."""
        base = SupernetConfig.enhanced() if self.enhanced else SupernetConfig()
        return SupernetConfig(
            branches=tuple(self.branches),
            classifier_branches=self.classifier_branches,
            width_map=base.width_map if self.width_map is None else tuple(tuple(p) for p in self.width_map),
            residual_activation=self.residual_activation or base.residual_activation,
            shortcut=self.shortcut or base.shortcut,
            bn_momentum=self.bn_momentum,
        )


@dataclass(frozen=True)
class OptimizerConfig:
    """SGD; ``lr`` is the peak learning rate of the schedule."""

    lr: float
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4


@dataclass(frozen=True)
class ScheduleConfig:
    """Linear warm-up from ``lr / warmup_steps`` to ``lr`` over ``warmup_steps`` steps, then cosine to ``min_lr``."""

    warmup_steps: int = 0
    min_lr: float = 0.0


@dataclass(frozen=True)
class SamplingConfig:
    """Which paths a step trains.

    ``largest``: only the full-width path. ``uniform``: ``paths`` random paths. ``sandwich``:
    the largest, the smallest and ``paths - 2`` random ones. ``fair``: ``paths`` paths in which,
    at every position, each width choice appears equally often (as equally as ``paths`` allows:
    counts differ by at most one; exactly equal when the choice count divides ``paths``).
    """

    rule: Literal["largest", "uniform", "sandwich", "fair"] = "uniform"
    paths: int = 1


@dataclass(frozen=True)
class LossConfig:
    """``ce``: cross-entropy on every trained path. ``distill``: the largest path is the teacher
    (``live``: its own detached output this step; ``frozen``: a copy of the supernet taken at the
    stage start) and each sampled path gets ``alpha * CE + (1 - alpha) * T^2 * KL(teacher || student)``
    at temperature ``T``. ``train_largest``: also train the largest path with CE in each step
    (always on for ``live``, whose teacher output comes from that pass).
    """

    kind: Literal["ce", "distill"] = "ce"
    alpha: float = 0.2
    temperature: float = 1.0
    teacher: Literal["live", "frozen"] = "live"
    train_largest: bool = True


@dataclass(frozen=True)
class MaxRecoverConfig:
    """Score ``probes`` random paths on the batch before the update; each whose loss rose after it
    gets one more backward pass and optimizer step (0: off)."""

    probes: int = 0


@dataclass(frozen=True)
class AugmentConfig:
    """Random crop (zero padding ``pad``) and horizontal flip (``auto``: when the data allows it)."""

    pad: int = 4
    hflip: Union[bool, Auto] = "auto"


@dataclass(frozen=True)
class SpeedConfig:
    """GPU speed options; ``auto`` turns bf16 autocast and channels_last on for CUDA only.

    ``batched_paths``: run a step's paths in one batched pass (``Supernet.forward_paths``)
    instead of one after the other; ``auto`` uses it when the supernet provides it.
    (There is no ``torch.compile`` option: the widths differ at every step, so a compiled
    forward would recompile for almost every path.)
    """

    bf16: Union[bool, Auto] = "auto"
    channels_last: Union[bool, Auto] = "auto"
    batched_paths: Union[bool, Auto] = "auto"


@dataclass(frozen=True)
class StageConfig:
    """One stage of progressive training.

    ``init``: ``scratch`` (new weights), ``previous`` (the previous stage's final weights, grown
    to this stage's branch counts) or a checkpoint path (its weights, grown likewise).
    ``epochs``: passes over the training images; ``max_steps`` caps the stage's steps (tiny
    runs). ``batch_size`` is the global batch of one step; it is split over the ranks and then
    into ``accumulate`` shards per rank, each forwarded alone (its own BN batch statistics),
    gradients averaged over all shards. ``sync_bn``: under ``torchrun``, BN takes its batch
    statistics over the shards of every rank (SyncBN; the shards of one rank's ``accumulate``
    still normalise separately); no effect in a single process.
    """

    supernet: SupernetSection
    optimizer: OptimizerConfig
    name: str = ""
    init: str = "scratch"
    epochs: int = 1
    max_steps: Union[int, None] = None
    batch_size: int = 128
    accumulate: int = 1
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    max_recover: MaxRecoverConfig = field(default_factory=MaxRecoverConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    sync_bn: bool = False


@dataclass(frozen=True)
class CheckpointConfig:
    """Training checkpoints: every ``every_steps`` steps (0: only at epoch ends) and at each epoch end;
    the newest ``keep`` are kept."""

    every_steps: int = 500
    keep: int = 3


@dataclass(frozen=True)
class MetricsConfig:
    """Per-epoch metrics: ``probes`` fixed candidates (largest, smallest, then seeded random ones)
    scored on ``eval_images`` test images after BN recalibration on ``recal_batches`` un-augmented
    training batches of ``batch_size``; ``probes: 0`` turns the probe scoring off."""

    probes: int = 4
    recal_batches: int = 4
    batch_size: int = 256
    eval_images: int = 2000
    tensorboard: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """A whole training run: space, data, stages and run-wide options.

    ``train_images`` keeps only the first N images of a seeded permutation of the training set
    (small runs). ``out`` is the run folder (``--out`` overrides it; default ``runs/<file stem>``).
    ``device``: ``auto`` (CUDA when available, the local rank's GPU under torchrun), ``cpu``,
    ``cuda`` or ``cuda:N``. ``progress``: the tqdm bar (``auto``: when stderr is a terminal).
    """

    data: str
    stages: list[StageConfig]
    space: str = "track1"
    seed: int = 0
    train_images: Union[int, None] = None
    out: Union[str, None] = None
    device: str = "auto"
    progress: Union[bool, Auto] = "auto"
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    source: str = field(default="<dict>", compare=False)

    def to_dict(self) -> dict:
        """Plain dict of every setting, defaults included (``source`` left out)."""
        d = dataclasses.asdict(self)
        d.pop("source", None)
        return d

    def get_space(self) -> ChannelSpace:
        return get_space(self.space)

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with top-level keys changed, validated again (``data``, ``out``, ...)."""
        d = self.to_dict()
        d.update(changes)
        return load_config(d, source=self.source)


# ----------------------------------------------------------------------------- walking


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is float:
        return "a number"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list (items: {_type_name(typing.get_args(tp)[0])})"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return str(tp)


def _fail(source: str, path: str, msg: str) -> ConfigError:
    return ConfigError(f"{source}: {path or '<top>'}: {msg}")


def _convert(value: Any, tp: Any, path: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, path, source)
    if origin in (Union, types.UnionType):
        errors = []
        for alt in typing.get_args(tp):
            try:
                return _convert(value, alt, path, source)
            except ConfigError as e:
                errors.append(e)
        # A single mapping alternative gives the more useful nested error.
        nested = [e for e, alt in zip(errors, typing.get_args(tp)) if dataclasses.is_dataclass(alt)]
        if nested and isinstance(value, Mapping):
            raise nested[0]
        raise _fail(source, path, f"expected {_type_name(tp)}, got {_describe(value)}")
    if origin is Literal:
        if isinstance(value, (str, bool, int)) and any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            return value
        raise _fail(source, path, f"expected {_type_name(tp)}, got {_describe(value)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _fail(source, path, f"expected {_type_name(tp)}, got {_describe(value)}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{path}[{i}]", source) for i, v in enumerate(value)]
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise _fail(source, path, f"expected {_type_name(tp)}, got {_describe(value)}")


def _build_dataclass(cls: type, value: Any, path: str, source: str) -> Any:
    if not isinstance(value, Mapping):
        raise _fail(source, path, f"expected a mapping with keys {_public_fields(cls)}, got {_describe(value)}")
    hints = typing.get_type_hints(cls)
    known = _public_fields(cls)
    for key in value:
        if key not in known:
            where = f"{path}.{key}" if path else str(key)
            raise _fail(source, where, f"unknown key; known keys here: {', '.join(known)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in known:
            continue
        where = f"{path}.{f.name}" if path else f.name
        if f.name in value:
            kwargs[f.name] = _convert(value[f.name], hints[f.name], where, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _fail(source, where, f"required key is missing (expected {_type_name(hints[f.name])})")
    return cls(**kwargs)


def _public_fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name != "source"]


# ----------------------------------------------------------------------------- semantics


def _check(cfg: TrainConfig) -> None:
    """Checks that need more than one value (ranges, stage-to-stage consistency)."""
    src = cfg.source

    def need(ok: bool, path: str, msg: str) -> None:
        if not ok:
            raise _fail(src, path, msg)

    try:
        space = get_space(cfg.space)
    except ValueError as e:
        raise _fail(src, "space", str(e)) from None
    try:
        parse_data_spec(split_resolution(cfg.data)[0])
    except ValueError as e:
        raise _fail(src, "data", str(e)) from None
    need(cfg.train_images is None or cfg.train_images >= 1, "train_images", f"must be >= 1 or null, got {cfg.train_images}")
    need(cfg.device == "auto" or re.fullmatch(r"cpu|cuda(:\d+)?", cfg.device) is not None, "device",
         f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {cfg.device!r}")
    need(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps", f"must be >= 0, got {cfg.checkpoint.every_steps}")
    need(cfg.checkpoint.keep >= 1, "checkpoint.keep", f"must be >= 1, got {cfg.checkpoint.keep}")
    m = cfg.metrics
    for key in ("probes", "recal_batches", "batch_size", "eval_images"):
        need(getattr(m, key) >= (0 if key == "probes" else 1), f"metrics.{key}", f"must be positive, got {getattr(m, key)}")
    need(len(cfg.stages) >= 1, "stages", "at least one stage is needed")
    names = set()
    prev: SupernetConfig | None = None
    for i, st in enumerate(cfg.stages):
        p = f"stages[{i}]"
        name = st.name or f"stage{i}"
        need(name not in names and re.fullmatch(r"[A-Za-z0-9_.-]+", name) is not None, f"{p}.name",
             f"must be a unique name of letters, digits, '_', '.', '-', got {name!r}")
        names.add(name)
        sn = st.supernet
        need(len(sn.branches) == len(space.stages), f"{p}.supernet.branches",
             f"needs one branch count per stage of space {cfg.space!r} ({len(space.stages)}), got {sn.branches}")
        for s, g in enumerate(sn.branches):
            choices = space.stages[s].choices
            need(1 <= g <= len(choices) and (s > 0 or g <= len(space.stem_choices)), f"{p}.supernet.branches[{s}]",
                 f"must be between 1 and {len(choices)} (the stage's width choices), got {g}")
        need(1 <= sn.classifier_branches <= len(space.choices[space.last_position]), f"{p}.supernet.classifier_branches",
             f"must be between 1 and {len(space.choices[space.last_position])}, got {sn.classifier_branches}")
        if sn.width_map is not None:
            need(all(len(pair) == 2 for pair in sn.width_map), f"{p}.supernet.width_map",
                 f"expected a list of [width, run_width] pairs, got {sn.width_map}")
        try:
            built = sn.build()
        except ValueError as e:
            raise _fail(src, f"{p}.supernet", str(e)) from None
        if i == 0:
            need(st.init != "previous", f"{p}.init", "the first stage has no previous stage; use 'scratch' or a checkpoint path")
        if st.init == "previous" and prev is not None:
            diff = [k for k in ("width_map", "residual_activation", "shortcut", "bn_momentum", "bn_eps", "prelu_init")
                    if getattr(built, k) != getattr(prev, k)]
            need(not diff, f"{p}.supernet", f"init: previous can only change branch counts, but {', '.join(diff)} differ "
                 f"from stages[{i - 1}]")
        prev = built
        need(st.epochs >= 1, f"{p}.epochs", f"must be >= 1, got {st.epochs}")
        need(st.max_steps is None or st.max_steps >= 1, f"{p}.max_steps", f"must be >= 1 or null, got {st.max_steps}")
        need(st.batch_size >= 1, f"{p}.batch_size", f"must be >= 1, got {st.batch_size}")
        need(st.accumulate >= 1, f"{p}.accumulate", f"must be >= 1, got {st.accumulate}")
        need(st.batch_size % st.accumulate == 0, f"{p}.batch_size",
             f"{st.batch_size} is not divisible by accumulate={st.accumulate}")
        o = st.optimizer
        need(o.lr > 0, f"{p}.optimizer.lr", f"must be > 0, got {o.lr}")
        need(0 <= o.momentum < 1, f"{p}.optimizer.momentum", f"must be in [0, 1), got {o.momentum}")
        need(not o.nesterov or o.momentum > 0, f"{p}.optimizer.nesterov", "needs momentum > 0")
        need(o.weight_decay >= 0, f"{p}.optimizer.weight_decay", f"must be >= 0, got {o.weight_decay}")
        need(st.schedule.warmup_steps >= 0, f"{p}.schedule.warmup_steps", f"must be >= 0, got {st.schedule.warmup_steps}")
        need(0 <= st.schedule.min_lr <= o.lr, f"{p}.schedule.min_lr", f"must be in [0, lr={o.lr}], got {st.schedule.min_lr}")
        sm = st.sampling
        need(sm.paths >= 1, f"{p}.sampling.paths", f"must be >= 1, got {sm.paths}")
        need(sm.rule != "largest" or sm.paths == 1, f"{p}.sampling.paths", f"rule 'largest' trains one path, got paths={sm.paths}")
        need(sm.rule != "sandwich" or sm.paths >= 2, f"{p}.sampling.paths", f"rule 'sandwich' needs paths >= 2, got {sm.paths}")
        ls = st.loss
        need(0 <= ls.alpha <= 1, f"{p}.loss.alpha", f"must be in [0, 1], got {ls.alpha}")
        need(ls.temperature > 0, f"{p}.loss.temperature", f"must be > 0, got {ls.temperature}")
        need(ls.kind != "distill" or sm.rule != "largest", f"{p}.loss.kind",
             "distill needs sampled paths besides the largest; rule 'largest' has none")
        need(st.max_recover.probes >= 0, f"{p}.max_recover.probes", f"must be >= 0, got {st.max_recover.probes}")
        need(st.augment.pad >= 0, f"{p}.augment.pad", f"must be >= 0, got {st.augment.pad}")
        if st.init not in ("scratch", "previous"):
            need(bool(st.init.strip()), f"{p}.init", "expected 'scratch', 'previous' or a checkpoint path")


# ----------------------------------------------------------------------------- loading


class _Loader(yaml.SafeLoader):
    """Safe YAML that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_config(cfg: "str | os.PathLike | Mapping | TrainConfig", *, source: str | None = None) -> TrainConfig:
    """A validated :class:`TrainConfig` from a YAML path, a mapping or a config (returned as is)."""
    if isinstance(cfg, TrainConfig):
        return cfg
    if isinstance(cfg, (str, os.PathLike)):
        path = Path(cfg)
        src = source or str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{src}: no such config file") from None
        except OSError as e:
            raise ConfigError(f"{src}: cannot read: {e}") from None
        try:
            doc = yaml.load(text, Loader=_Loader)
        except yaml.YAMLError as e:
            raise ConfigError(f"{src}: not valid YAML: {' '.join(str(e).split())}") from None
    elif isinstance(cfg, Mapping):
        src, doc = source or "<dict>", cfg
    else:
        raise TypeError(f"config must be a path, a mapping or a TrainConfig, got {type(cfg).__name__}")
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{src}: expected a mapping at the top level, got {_describe(doc)}")
    out = _build_dataclass(TrainConfig, doc, "", src)
    out = dataclasses.replace(out, source=src)
    _check(out)
    return out


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(d, (list, tuple)) and d and all(isinstance(v, Mapping) for v in d):
        out = {}
        for i, v in enumerate(d):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: list(d) if isinstance(d, tuple) else d}


def config_diff(a: Mapping, b: Mapping) -> list[str]:
    """Key paths (``stages[1].optimizer.lr``) whose values differ between two ``to_dict()`` configs."""
    fa, fb = _flatten(a), _flatten(b)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k, object()) != fb.get(k, object()))

