"""Image classification data: one spec string selects a dataset, one loader reads it.

A data spec is ``NAME[:PATH]`` and is used the same way everywhere (CLI ``--data``,
YAML ``data:``):

``fashion-mnist``
    The Fashion-MNIST subset bundled with the package (12,000 train / 2,000 test images,
    class-balanced; see ``resources/DATA_SOURCES.md``). Needs nothing but the package.
``fashion-mnist:PATH``
    The full Fashion-MNIST from the standard IDX files in folder ``PATH``
    (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte``, each raw or ``.gz``). A torchvision-style
    ``PATH/FashionMNIST/raw`` folder is found too.
``cifar10:PATH`` / ``cifar100:PATH``
    The standard python-pickle releases: ``PATH`` is the ``cifar-10-batches-py`` /
    ``cifar-100-python`` folder or the folder that contains it. The pickles are read
    with a restricted unpickler that builds only plain containers, bytes, str, numbers
    and numpy arrays; any other global is refused before it can run.
``npz:PATH``
    Your own data in a ``.npz`` file (read with ``allow_pickle=False``). Keys:

    * ``train_images`` -- uint8, ``(N, C, H, W)``, ``(N, H, W, C)`` or ``(N, H, W)``
      (grayscale). C must be 1, 3 or 4 and smaller than H and W; H must equal W.
    * ``train_labels`` -- integer, ``(N,)``, values in ``[0, num_classes)``.
    * ``test_images``, ``test_labels`` -- optional, same layout as train. When absent,
      a fixed seeded 1/6 of the training images (:data:`HOLDOUT_SEED`) is held out as
      the test split and removed from the training split.
    * ``num_classes`` -- optional integer; default ``max(label) + 1``.
    * ``hflip`` -- optional bool; whether horizontal flips suit the images (default True).

Any spec may end in ``@R`` (e.g. ``fashion-mnist@14``): both splits are resized to R x R by
area averaging (rounded back to uint8) at load time, and the statistics are those of the
resized images. Lower resolution is how small machines afford longer training.

Every problem with a file raises :class:`DataError` (a ``ValueError``) naming the file
and what was expected. Loaded images are uint8 ``(N, C, H, W)`` tensors; per-channel
mean/std are computed from the training images at load time and travel in
:class:`DataInfo`, which is all a model or checkpoint needs to know about the data.
"""
from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import re
import zlib
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DataError",
    "DataInfo",
    "Dataset",
    "KNOWN_DATA_NAMES",
    "HOLDOUT_SEED",
    "load_data",
    "parse_data_spec",
    "recalibration_indices",
    "normalize",
    "augment_batch",
    "bundled_fashion_mnist_path",
    "read_idx",
]

#: Data names a spec may start with.
KNOWN_DATA_NAMES: tuple[str, ...] = ("fashion-mnist", "cifar10", "cifar100", "npz")
_PATH_REQUIRED = {"cifar10", "cifar100", "npz"}

#: Seed of the 1/6 test holdout used for ``npz:`` files without a test split.
HOLDOUT_SEED = 0
HOLDOUT_FRACTION = 1.0 / 6.0

_BUNDLED_FASHION_MNIST = "fashion_mnist_subset.npz"
_FASHION_MNIST_CLASSES = 10


class DataError(ValueError):
    """A data file is missing, malformed or inconsistent; the message names the file."""


# ----------------------------------------------------------------------------- data info


@dataclass(frozen=True)
class DataInfo:
    """What a model or checkpoint needs to know about the data; plain values only."""

    spec: str
    name: str
    in_channels: int
    num_classes: int
    resolution: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if not isinstance(self.spec, str):
            raise ValueError(f"DataInfo.spec must be a str, got {type(self.spec).__name__}")
        if self.name not in KNOWN_DATA_NAMES:
            raise ValueError(f"DataInfo.name must be one of {', '.join(KNOWN_DATA_NAMES)}; got {self.name!r}")
        for key in ("in_channels", "num_classes", "resolution"):
            value = getattr(self, key)
            if not _is_int(value) or value < 1:
                raise ValueError(f"DataInfo.{key} must be a positive int, got {value!r}")
        if not isinstance(self.hflip, bool):
            raise ValueError(f"DataInfo.hflip must be a bool, got {self.hflip!r}")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if len(value) != self.in_channels:
                raise ValueError(
                    f"DataInfo.{key} must have one value per channel ({self.in_channels}), got {len(value)}"
                )
            if not all(math.isfinite(v) for v in value):
                raise ValueError(f"DataInfo.{key} must be finite, got {value}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"DataInfo.std must be positive, got {self.std}")

    def to_dict(self) -> dict:
        """Plain dict (str, int, float, bool, lists) that survives JSON and YAML safe_dump."""
        return {
            "spec": self.spec,
            "name": self.name,
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "resolution": self.resolution,
            "mean": list(self.mean),
            "std": list(self.std),
            "hflip": self.hflip,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "DataInfo":
        """Inverse of :meth:`to_dict`; ``ValueError`` naming missing, unknown or mistyped keys."""
        if not isinstance(d, Mapping):
            raise ValueError(f"DataInfo.from_dict expects a mapping, got {type(d).__name__}")
        expected = [f.name for f in fields(cls)]
        missing = [k for k in expected if k not in d]
        unknown = sorted(str(k) for k in d if k not in expected)
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing key(s) {', '.join(missing)}")
            if unknown:
                parts.append(f"unknown key(s) {', '.join(unknown)}")
            raise ValueError(f"DataInfo.from_dict: {'; '.join(parts)} (expected keys: {', '.join(expected)})")
        for key in ("mean", "std"):
            value = d[key]
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                raise ValueError(f"DataInfo.from_dict: {key!r} must be a list of numbers, got {value!r}")
            if not all(_is_real(v) for v in value):
                raise ValueError(f"DataInfo.from_dict: {key!r} must be a list of numbers, got {value!r}")
        for key in ("spec", "name"):
            if not isinstance(d[key], str):
                raise ValueError(f"DataInfo.from_dict: {key!r} must be a str, got {d[key]!r}")
        return cls(**{k: d[k] for k in expected})


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


# ----------------------------------------------------------------------------- dataset


@dataclass
class Dataset:
    """Train and test images (uint8 ``(N, C, H, W)``, contiguous) with int64 labels."""

    info: DataInfo
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    def __post_init__(self) -> None:
        c, r = self.info.in_channels, self.info.resolution
        for split in ("train", "test"):
            images = getattr(self, f"{split}_images")
            labels = getattr(self, f"{split}_labels")
            if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (c, r, r):
                raise ValueError(
                    f"Dataset.{split}_images must be uint8 (N, {c}, {r}, {r}), "
                    f"got {images.dtype} {tuple(images.shape)}"
                )
            if not images.is_contiguous():
                raise ValueError(f"Dataset.{split}_images must be contiguous")
            if labels.dtype != torch.int64 or labels.dim() != 1 or labels.shape[0] != images.shape[0]:
                raise ValueError(
                    f"Dataset.{split}_labels must be int64 ({images.shape[0]},), "
                    f"got {labels.dtype} {tuple(labels.shape)}"
                )
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.info.num_classes):
                raise ValueError(f"Dataset.{split}_labels must lie in [0, {self.info.num_classes})")
        if self.train_images.shape[0] == 0:
            raise ValueError("Dataset.train_images must not be empty")

    def recalibration_split(self, fraction: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """A seeded, un-augmented subset of the training set (images, labels), same every call.

        Used to re-estimate batch-norm statistics of a sub-network; the order is the one of
        :func:`recalibration_indices`.
        """
        idx = recalibration_indices(self.train_images.shape[0], fraction, seed)
        return self.train_images[idx], self.train_labels[idx]


def recalibration_indices(num_train: int, fraction: float = 0.1, seed: int = 0) -> torch.Tensor:
    """The first ``round(fraction * num_train)`` entries of a seeded ``randperm(num_train)``.

    Depends only on the arguments (a private ``torch.Generator``), never on global RNG state.
    """
    if not _is_int(num_train) or num_train < 1:
        raise ValueError(f"num_train must be a positive int, got {num_train!r}")
    if not _is_real(fraction) or not (0.0 < fraction <= 1.0):
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if not _is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    count = int(round(fraction * num_train))
    if count < 1:
        raise ValueError(f"fraction {fraction} of {num_train} training images selects no image")
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(int(num_train), generator=gen)[:count]


# ----------------------------------------------------------------------------- transforms


def normalize(
    images: torch.Tensor,
    info: DataInfo,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """uint8 images ``(N, C, H, W)`` or ``(C, H, W)`` -> ``(x / 255 - mean) / std`` as ``dtype``.

    The uint8 tensor is moved to ``device`` before conversion (4x less to copy).
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images, got {images.dtype}")
    if images.dim() not in (3, 4) or images.shape[-3] != info.in_channels:
        raise ValueError(
            f"normalize expects (N, {info.in_channels}, H, W) or ({info.in_channels}, H, W) images, "
            f"got {tuple(images.shape)}"
        )
    x = images.to(device) if device is not None else images
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    mean = torch.tensor(info.mean, dtype=torch.float64)
    std = torch.tensor(info.std, dtype=torch.float64)
    scale = (1.0 / (255.0 * std)).to(device=x.device, dtype=work).view(-1, 1, 1)
    shift = (-mean / std).to(device=x.device, dtype=work).view(-1, 1, 1)
    out = torch.addcmul(shift, x.to(work), scale)
    return out if out.dtype == dtype else out.to(dtype)


def augment_batch(
    x: torch.Tensor,
    *,
    generator: torch.Generator,
    pad: int = 4,
    hflip: bool = True,
) -> torch.Tensor:
    """Random crop with zero padding ``pad`` and random horizontal flip, per image, whole batch.

    ``x`` is ``(N, C, H, W)`` of any dtype on any device. Each image gets its own offset in
    ``[0, 2 * pad]`` along both axes of the padded image and, if ``hflip``, a flip with
    probability 1/2. The random numbers come from ``generator`` only (on its device), so the
    result is fixed by the generator's state. Returns a new contiguous tensor.
    """
    if x.dim() != 4:
        raise ValueError(f"augment_batch expects (N, C, H, W), got {tuple(x.shape)}")
    if not _is_int(pad) or pad < 0:
        raise ValueError(f"pad must be a non-negative int, got {pad!r}")
    n, _, h, w = x.shape
    gdev = generator.device
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=gdev).to(x.device)
    flips = None
    if hflip:
        flips = torch.randint(0, 2, (n,), generator=generator, device=gdev).to(x.device).bool()
    if n == 0 or (pad == 0 and flips is None):
        return x.clone(memory_format=torch.contiguous_format)
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
    rows = offsets[0].view(n, 1) + torch.arange(h, device=x.device).view(1, h)  # (N, H)
    col_range = torch.arange(w, device=x.device).view(1, w)
    if flips is not None:
        col_range = torch.where(flips.view(n, 1), (w - 1) - col_range, col_range)  # (N, W)
    cols = offsets[1].view(n, 1) + col_range
    # Two gathers: each image's rows, then each row's columns (flipped where chosen).
    c, wp = x.shape[1], padded.shape[3]
    picked_rows = padded.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, wp))
    out = picked_rows.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))
    return out.contiguous()


# ----------------------------------------------------------------------------- spec


def parse_data_spec(spec: str) -> tuple[str, str | None]:
    """Split ``NAME[:PATH]`` into ``(name, path)``; ``DataError`` (a ValueError) if malformed.

    NAME is matched case-insensitively and returned in canonical lower case; PATH is
    everything after the first colon (so ``npz:C:\\x.npz`` works) and is required for
    ``cifar10``, ``cifar100`` and ``npz``.
    """
    if not isinstance(spec, str):
        raise DataError(f"data spec must be a string NAME[:PATH], got {type(spec).__name__}")
    text = spec.strip()
    if not text:
        raise DataError(f"empty data spec; expected NAME[:PATH] with NAME one of {', '.join(KNOWN_DATA_NAMES)}")
    name, sep, path = text.partition(":")
    name = name.strip().lower()
    if name not in KNOWN_DATA_NAMES:
        raise DataError(f"unknown data name {name!r} in spec {spec!r}; known names: {', '.join(KNOWN_DATA_NAMES)}")
    if sep:
        path = path.strip()
        if not path:
            raise DataError(f"data spec {spec!r} has an empty PATH after ':'")
        return name, path
    if name in _PATH_REQUIRED:
        hint = {
            "cifar10": "the cifar-10-batches-py folder or its parent",
            "cifar100": "the cifar-100-python folder or its parent",
            "npz": "a .npz file",
        }[name]
        raise DataError(f"data spec {spec!r}: {name} needs a path, '{name}:PATH' with PATH {hint}")
    return name, None


def bundled_fashion_mnist_path() -> Path:
    """Path of the Fashion-MNIST subset that ships inside the package."""
    return Path(__file__).resolve().parent / "resources" / _BUNDLED_FASHION_MNIST


_RESIZE = re.compile(r"^(.*)@(\d+)$")


def split_resolution(spec: str) -> tuple[str, int | None]:
    """``"NAME[:PATH]@R"`` -> ``("NAME[:PATH]", R)``; no suffix -> ``(spec, None)``."""
    m = _RESIZE.match(spec.strip()) if isinstance(spec, str) else None
    if m is None:
        return spec, None
    side = int(m.group(2))
    if side < 1:
        raise DataError(f"data spec {spec!r}: resolution after '@' must be a positive int, got {side}")
    return m.group(1), side


def _resized(images: torch.Tensor, side: int) -> torch.Tensor:
    if images.shape[-1] == side and images.shape[-2] == side:
        return images
    out = torch.empty((images.shape[0], images.shape[1], side, side), dtype=torch.uint8)
    for i in range(0, images.shape[0], 4096):  # bounded float memory
        x = F.interpolate(images[i : i + 4096].float(), size=(side, side), mode="area")
        out[i : i + 4096] = x.round_().clamp_(0, 255).to(torch.uint8)
    return out


def load_data(spec: str) -> Dataset:
    """Load the dataset a spec names (see the module docstring); ``DataError`` on any problem."""
    base, side = split_resolution(spec)
    if side is None:
        return _load_base(spec)
    ds = _load_base(base)
    train, test = _resized(ds.train_images, side), _resized(ds.test_images, side)
    mean, std = _channel_stats(train)
    info = DataInfo(**{**ds.info.to_dict(), "spec": spec, "resolution": side, "mean": mean, "std": std})
    return Dataset(info, train, ds.train_labels, test, ds.test_labels)


def _load_base(spec: str) -> Dataset:
    name, path = parse_data_spec(spec)
    if name == "fashion-mnist":
        if path is None:
            src = bundled_fashion_mnist_path()
            if not src.is_file():
                raise DataError(f"{src}: bundled Fashion-MNIST subset is missing; reinstall the package")
            arrays = _read_npz(src)
            return _build(spec, name, src, arrays, num_classes=_FASHION_MNIST_CLASSES, hflip=True)
        return _build(spec, name, None, _read_fashion_mnist_folder(_as_path(path)),
                      num_classes=_FASHION_MNIST_CLASSES, hflip=True)
    if name in ("cifar10", "cifar100"):
        return _build(spec, name, None, _read_cifar(name, _as_path(path)),
                      num_classes=10 if name == "cifar10" else 100, hflip=True)
    assert name == "npz" and path is not None
    src = _as_path(path)
    arrays = _read_npz(src)
    return _build(spec, name, src, arrays, num_classes=None, hflip=None)


def _as_path(path: str) -> Path:
    return Path(os.path.expanduser(path))


# ----------------------------------------------------------------------------- assembly


class _Split:
    """Images (N, C, H, W) uint8 + labels, each with the file they came from (for messages)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, images_src: Path, labels_src: Path) -> None:
        self.images, self.labels = images, labels
        self.images_src, self.labels_src = images_src, labels_src


def _build(
    spec: str,
    name: str,
    src: Path | None,
    arrays: dict[str, Any],
    *,
    num_classes: int | None,
    hflip: bool | None,
) -> Dataset:
    """Check splits against each other, hold out a test split if needed, compute stats."""
    train: _Split = arrays["train"]
    test: _Split | None = arrays.get("test")
    if num_classes is None:
        num_classes = arrays.get("num_classes")
    if hflip is None:
        hflip = arrays.get("hflip", True)

    _check_pair(train)
    if test is not None:
        _check_pair(test)
        if test.images.shape[1:] != train.images.shape[1:]:
            raise DataError(
                f"{test.images_src}: test images have shape (C, H, W) = {tuple(test.images.shape[1:])}, "
                f"train images {tuple(train.images.shape[1:])}"
            )
    if num_classes is None:
        top = int(train.labels.max())
        if test is not None and test.labels.size:
            top = max(top, int(test.labels.max()))
        num_classes = top + 1
    for split in (train, test):
        if split is None or not split.labels.size:
            continue
        lo, hi = int(split.labels.min()), int(split.labels.max())
        if lo < 0 or hi >= num_classes:
            raise DataError(
                f"{split.labels_src}: labels must lie in [0, {num_classes}), found values in [{lo}, {hi}]"
            )

    if test is None:
        n = train.images.shape[0]
        if n < 2:
            raise DataError(f"{train.images_src}: need at least 2 training images to hold out a test split")
        gen = torch.Generator().manual_seed(HOLDOUT_SEED)
        perm = torch.randperm(n, generator=gen).numpy()
        k = min(max(1, int(round(n * HOLDOUT_FRACTION))), n - 1)
        test_idx, train_idx = np.sort(perm[:k]), np.sort(perm[k:])
        test = _Split(train.images[test_idx], train.labels[test_idx], train.images_src, train.labels_src)
        train = _Split(train.images[train_idx], train.labels[train_idx], train.images_src, train.labels_src)

    train_images = _to_uint8_tensor(train.images)
    mean, std = _channel_stats(train_images)
    info = DataInfo(
        spec=spec,
        name=name,
        in_channels=int(train_images.shape[1]),
        num_classes=int(num_classes),
        resolution=int(train_images.shape[2]),
        mean=mean,
        std=std,
        hflip=bool(hflip),
    )
    return Dataset(
        info=info,
        train_images=train_images,
        train_labels=torch.from_numpy(np.ascontiguousarray(train.labels, dtype=np.int64)),
        test_images=_to_uint8_tensor(test.images),
        test_labels=torch.from_numpy(np.ascontiguousarray(test.labels, dtype=np.int64)),
    )


def _check_pair(split: _Split) -> None:
    if split.images.ndim != 4:
        raise DataError(f"{split.images_src}: images must be (N, C, H, W) after layout detection")
    if split.images.shape[2] != split.images.shape[3]:
        raise DataError(
            f"{split.images_src}: images must be square, got H x W = "
            f"{split.images.shape[2]} x {split.images.shape[3]}"
        )
    if split.labels.ndim != 1:
        raise DataError(f"{split.labels_src}: labels must be 1-D, got shape {tuple(split.labels.shape)}")
    if split.labels.shape[0] != split.images.shape[0]:
        raise DataError(
            f"{split.labels_src}: {split.labels.shape[0]} labels for {split.images.shape[0]} images "
            f"(from {split.images_src}); counts must match"
        )
    if split.images.shape[0] == 0:
        raise DataError(f"{split.images_src}: no images")


def _to_uint8_tensor(images: np.ndarray) -> torch.Tensor:
    arr = np.ascontiguousarray(images, dtype=np.uint8)
    if not arr.flags.writeable:
        arr = arr.copy()
    return torch.from_numpy(arr)


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std on the [0, 1] scale from exact 256-bin histograms (float64).

    A channel with zero spread gets std 1.0 so that normalising never divides by zero.
    """
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        total = hist.sum()
        mean = float((hist * values).sum() / total)
        var = float((hist * (values - mean) ** 2).sum() / total)
        std = math.sqrt(max(var, 0.0))
        means.append(mean)
        stds.append(std if std > 1e-6 else 1.0)
    return tuple(means), tuple(stds)


# ----------------------------------------------------------------------------- npz


_NPZ_KEYS = ("train_images", "train_labels", "test_images", "test_labels", "num_classes", "hflip")


def _read_npz(path: Path) -> dict[str, Any]:
    """Read a documented-key .npz (never unpickling) into splits + optional num_classes/hflip."""
    if not path.exists():
        raise DataError(f"{path}: file not found (expected a .npz with train_images, train_labels)")
    if not path.is_file():
        raise DataError(f"{path}: expected a .npz file, found a folder or special file")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as exc:  # ValueError (pickled data refused), BadZipFile, OSError, ...
        raise DataError(f"{path}: cannot read as .npz without pickles ({type(exc).__name__}: {exc})") from exc
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: expected a .npz archive of named arrays, found a single .npy array")
    try:
        keys = list(z.files)
        unknown = [k for k in keys if k not in _NPZ_KEYS]
        if unknown:
            raise DataError(
                f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; allowed keys: {', '.join(_NPZ_KEYS)}"
            )
        for k in ("train_images", "train_labels"):
            if k not in keys:
                raise DataError(f"{path}: missing key {k!r} (found keys: {', '.join(keys) or 'none'})")
        if ("test_images" in keys) != ("test_labels" in keys):
            have, lack = ("test_images", "test_labels") if "test_images" in keys else ("test_labels", "test_images")
            raise DataError(f"{path}: has key {have!r} but missing key {lack!r}; give both or neither")
        raw = {k: z[k] for k in keys}
    except DataError:
        raise
    except Exception as exc:  # object arrays (pickles), corrupt members, ...
        raise DataError(f"{path}: cannot read as .npz without pickles ({type(exc).__name__}: {exc})") from exc
    finally:
        z.close()

    out: dict[str, Any] = {}
    for split in ("train", "test"):
        if f"{split}_images" not in raw:
            continue
        images = _npz_images(path, f"{split}_images", raw[f"{split}_images"])
        labels = _npz_labels(path, f"{split}_labels", raw[f"{split}_labels"])
        out[split] = _Split(images, labels, path, path)
    if "num_classes" in raw:
        nc = raw["num_classes"]
        if nc.shape != () or nc.dtype.kind not in "iu" or int(nc) < 1:
            raise DataError(f"{path}: 'num_classes' must be a positive integer scalar, got {nc!r}")
        out["num_classes"] = int(nc)
    if "hflip" in raw:
        hf = raw["hflip"]
        if hf.shape != () or hf.dtype.kind not in "biu" or int(hf) not in (0, 1):
            raise DataError(f"{path}: 'hflip' must be a bool scalar, got {hf!r}")
        out["hflip"] = bool(hf)
    return out


def _npz_images(path: Path, key: str, a: np.ndarray) -> np.ndarray:
    """Validate dtype and bring NHW / NHWC / NCHW to NCHW."""
    if a.dtype != np.uint8:
        raise DataError(
            f"{path}: {key!r} must be uint8 (0..255), got {a.dtype}; "
            f"convert e.g. with (x * 255).round().astype(np.uint8)"
        )
    if a.ndim == 3:
        a = a[:, None, :, :]
    elif a.ndim == 4:
        _, d1, d2, d3 = a.shape
        if d1 in (1, 3, 4) and d1 < d2 and d1 < d3:
            pass  # NCHW
        elif d3 in (1, 3, 4) and d3 < d1 and d3 < d2:
            a = a.transpose(0, 3, 1, 2)  # NHWC -> NCHW
        else:
            raise DataError(
                f"{path}: {key!r} has shape {a.shape}; cannot tell the channel axis. Expected (N, C, H, W) "
                f"or (N, H, W, C) with C in 1, 3, 4 and smaller than H and W"
            )
    else:
        raise DataError(f"{path}: {key!r} must be (N, H, W), (N, C, H, W) or (N, H, W, C), got shape {a.shape}")
    if a.shape[2] != a.shape[3]:
        raise DataError(f"{path}: {key!r} images must be square, got H x W = {a.shape[2]} x {a.shape[3]}")
    return np.ascontiguousarray(a)


def _npz_labels(path: Path, key: str, a: np.ndarray) -> np.ndarray:
    if a.dtype.kind not in "iu":
        raise DataError(f"{path}: {key!r} must be integer class indices, got dtype {a.dtype}")
    if a.ndim != 1:
        raise DataError(f"{path}: {key!r} must be 1-D, got shape {a.shape}")
    return a.astype(np.int64)


# ----------------------------------------------------------------------------- IDX

_IDX_NAMES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
_IDX_MAGIC = {1: 2049, 3: 2051}


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (raw, or gzip if the name ends in ``.gz``).

    ``ndim`` is 1 for label files (magic 2049) and 3 for image files (magic 2051).
    """
    path = Path(path)
    magic = _IDX_MAGIC[ndim]
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read gzip-compressed IDX ({type(exc).__name__}: {exc})") from exc
    header = 4 + 4 * ndim
    if len(data) < 4:
        raise DataError(f"{path}: file is truncated: expected an IDX header, got {len(data)} bytes")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        what = "image" if ndim == 3 else "label"
        raise DataError(f"{path}: IDX magic {magic} expected for an {what} file, found {found}")
    if len(data) < header:
        raise DataError(f"{path}: file is truncated: expected a {header}-byte IDX header, got {len(data)} bytes")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = math.prod(dims)
    body = len(data) - header
    if body < expected:
        raise DataError(
            f"{path}: file is truncated: expected {expected} bytes of data for shape {tuple(dims)}, found {body}"
        )
    if body > expected:
        raise DataError(f"{path}: {body - expected} unexpected bytes after the data for shape {tuple(dims)}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _find_idx(folder: Path, base: str) -> Path:
    for candidate in (folder / base, folder / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{folder}: missing Fashion-MNIST file {base!r} (or {base}.gz)")


def _read_fashion_mnist_folder(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found (expected the Fashion-MNIST IDX files)")
    nested = folder / "FashionMNIST" / "raw"
    if not any((folder / f"{b}{s}").is_file() for b in _IDX_NAMES.values() for s in ("", ".gz")) and nested.is_dir():
        folder = nested
    out: dict[str, Any] = {}
    for split in ("train", "test"):
        img_path = _find_idx(folder, _IDX_NAMES[(split, "images")])
        lab_path = _find_idx(folder, _IDX_NAMES[(split, "labels")])
        images = read_idx(img_path, 3)
        labels = read_idx(lab_path, 1)
        if images.shape[1] != images.shape[2]:
            raise DataError(f"{img_path}: images must be square, got {images.shape[1]} x {images.shape[2]}")
        out[split] = _Split(images[:, None], labels.astype(np.int64), img_path, lab_path)
    return out


# ----------------------------------------------------------------------------- CIFAR


def _safe_codecs_encode(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Python 3 pickles bytes at protocol <= 2 as _codecs.encode(str, 'latin1'); allow only that.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError("_codecs.encode is only allowed as encode(str, 'latin1')")
    return text.encode("latin-1")


def _safe_dtype(*args: Any) -> np.dtype:
    dt = np.dtype(*args)
    if dt.hasobject:
        raise pickle.UnpicklingError("numpy dtype with Python objects refused")
    return dt


_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1, dtype=np.uint8))[0]
# The only globals a CIFAR pickle may name (read-only mapping).
_SAFE_GLOBALS: Mapping[tuple[str, str], Callable[..., Any] | type] = MappingProxyType({
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _safe_dtype,
    ("_codecs", "encode"): _safe_codecs_encode,
})


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds containers, bytes, str, numbers and numpy arrays; refuses every other global."""

    def __init__(self, file: io.BufferedIOBase, source: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(
                f"{self._source}: refused to unpickle global '{module}.{name}'; CIFAR files may only "
                f"contain containers, bytes, str, numbers and numpy arrays"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self._source}: refused persistent id in pickle")


def _unpickle(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as exc:  # any malformed pickle: EOFError, UnpicklingError, TypeError, ...
        raise DataError(f"{path}: not a readable CIFAR pickle ({type(exc).__name__}: {exc})") from exc


def _get(d: Any, key: str, path: Path) -> Any:
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(d).__name__}")
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DataError(f"{path}: missing key {key!r} (found: {', '.join(_key_str(k) for k in d)})")


def _key_str(k: Any) -> str:
    return repr(k.decode("latin-1")) if isinstance(k, bytes) else repr(k)


def _cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    data = _get(d, "data", path)
    labels = _get(d, label_key, path)
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", type(data).__name__)
        raise DataError(f"{path}: 'data' must be a (N, 3072) uint8 array, got {shape}")
    if data.dtype != np.uint8:
        if data.dtype.kind not in "iu" or (data.size and (data.min() < 0 or data.max() > 255)):
            raise DataError(f"{path}: 'data' must be uint8 (0..255), got {data.dtype}")
    if isinstance(labels, np.ndarray):
        lab = labels
    elif isinstance(labels, (list, tuple)) and all(_is_int(v) for v in labels):
        lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    else:
        raise DataError(f"{path}: {label_key!r} must be a list of ints")
    if lab.dtype.kind not in "iu" or lab.ndim != 1:
        raise DataError(f"{path}: {label_key!r} must be 1-D integers, got {lab.dtype} {lab.shape}")
    if lab.shape[0] != data.shape[0]:
        raise DataError(f"{path}: {lab.shape[0]} labels for {data.shape[0]} images; counts must match")
    return data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32), lab.astype(np.int64)


def _read_cifar(name: str, path: Path) -> dict[str, Any]:
    if name == "cifar10":
        sub, train_files, test_file, label_key = (
            "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels")
    else:
        sub, train_files, test_file, label_key = ("cifar-100-python", ["train"], "test", "fine_labels")
    if not path.is_dir():
        raise DataError(f"{path}: folder not found (expected {sub} or the folder that contains it)")
    folder = path / sub if (path / sub).is_dir() else path
    if not (folder / train_files[0]).is_file():
        raise DataError(f"{path}: no {sub} folder and no {train_files[0]!r} file here; expected {sub} "
                        f"({', '.join(train_files + [test_file])}) or the folder that contains it")
    parts = [_cifar_batch(folder / f, label_key) for f in train_files]
    test_images, test_labels = _cifar_batch(folder / test_file, label_key)
    train_images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    train_labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    # One label-range error should name the batch file that holds the bad label.
    num_classes = 10 if name == "cifar10" else 100
    for f, (_, lab) in zip(train_files + [test_file], parts + [(test_images, test_labels)]):
        if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
            raise DataError(f"{folder / f}: {label_key!r} must lie in [0, {num_classes}), "
                            f"found values in [{int(lab.min())}, {int(lab.max())}]")
    train_src = folder if len(train_files) > 1 else folder / train_files[0]
    return {
        "train": _Split(train_images, train_labels, train_src, train_src),
        "test": _Split(test_images, test_labels, folder / test_file, folder / test_file),
    }
