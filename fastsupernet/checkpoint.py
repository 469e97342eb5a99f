"""The one checkpoint format that training, ``init``, ranking and export share.

A checkpoint is a dict of tensors and plain Python containers/scalars only, so it loads with
``torch.load(..., weights_only=True)`` and never executes pickled code::

    {"format": "fastsupernet.checkpoint", "version": 1,
     "space": {...},            # ChannelSpace.to_dict()
     "supernet": {...},         # SupernetConfig.to_dict()
     "model": {"in_channels": C, "num_classes": K},
     "data": {...},             # DataInfo.to_dict(): spec, channels, classes, resolution, mean/std
     "state_dict": {name: tensor},
     "train_state": {...} | None,   # optimizer, scheduler, step, RNG states as tensors
     "meta": {...}}             # free-form provenance

Writes are atomic (temp file, fsync, rename): a crash leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ._atomic import atomic_open
from .space import ChannelSpace, space_from_dict
from .supernet import Supernet, SupernetConfig

__all__ = [
    "FORMAT",
    "VERSION",
    "CheckpointError",
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
]

FORMAT = "fastsupernet.checkpoint"
VERSION = 1
_REQUIRED = ("format", "version", "space", "supernet", "model", "data", "state_dict")


class CheckpointError(ValueError):
    """A file that is not a readable fastsupernet checkpoint (names the file and what was expected)."""


@dataclass
class Checkpoint:
    """A loaded checkpoint; ``build_supernet()`` turns it back into a model."""

    path: Path | None
    space: ChannelSpace
    config: SupernetConfig
    in_channels: int
    num_classes: int
    data: dict
    state_dict: dict[str, torch.Tensor]
    train_state: dict | None
    meta: dict

    def build_supernet(self, device: torch.device | str | None = None) -> Supernet:
        net = Supernet(self.space, self.config, in_channels=self.in_channels, num_classes=self.num_classes)
        try:
            net.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{self.path}: weights do not fit the stored supernet structure: {e}") from None
        return net.to(device) if device is not None else net

    def data_info(self):
        """The stored data description as a :class:`fastsupernet.data.DataInfo`."""
        from .data import DataInfo

        return DataInfo.from_dict(self.data)


def _data_dict(data: Any) -> dict:
    if data is None:
        return {}
    if hasattr(data, "to_dict"):
        return dict(data.to_dict())
    if isinstance(data, Mapping):
        return dict(data)
    raise TypeError(f"data must be a DataInfo or a mapping, got {type(data).__name__}")


def save_checkpoint(
    path: str | os.PathLike,
    model: Supernet,
    *,
    data: Any = None,
    train_state: Mapping | None = None,
    meta: Mapping | None = None,
) -> Path:
    """Write ``model`` (and optional training state) to ``path`` atomically; returns the path."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    obj = {
        "format": FORMAT,
        "version": VERSION,
        "space": model.space.to_dict(),
        "supernet": model.config.to_dict(),
        "model": {"in_channels": model.in_channels, "num_classes": model.num_classes},
        "data": _data_dict(data),
        "state_dict": state,
        "train_state": dict(train_state) if train_state is not None else None,
        "meta": dict(meta or {}),
    }
    path = Path(path)
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint without executing pickled code; errors name the file and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch.load raises many types on a torn or foreign file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path}: not a readable fastsupernet checkpoint (expected a torch.save zip file holding only "
            f"tensors and plain containers; the file may be truncated, corrupt or foreign): {msg}"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a fastsupernet checkpoint (expected a dict with format={FORMAT!r})")
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks required key(s) {missing}")
    if not isinstance(obj["version"], int) or obj["version"] > VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {obj['version']!r}; this fastsupernet reads up to {VERSION}")
    try:
        space = space_from_dict(obj["space"])
        config = SupernetConfig.from_dict(obj["supernet"])
        in_channels = int(obj["model"]["in_channels"])
        num_classes = int(obj["model"]["num_classes"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: bad structure description: {e}") from None
    if not isinstance(obj["state_dict"], dict) or not all(isinstance(v, torch.Tensor) for v in obj["state_dict"].values()):
        raise CheckpointError(f"{path}: state_dict must map names to tensors")
    return Checkpoint(
        path=path,
        space=space,
        config=config,
        in_channels=in_channels,
        num_classes=num_classes,
        data=dict(obj["data"] or {}),
        state_dict=obj["state_dict"],
        train_state=obj.get("train_state"),
        meta=dict(obj.get("meta") or {}),
    )


def capture_rng_state() -> dict:
    """Every RNG a run draws from, as tensors and plain containers (checkpoint-safe)."""
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping) -> None:
    """Restore what :func:`capture_rng_state` captured."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
