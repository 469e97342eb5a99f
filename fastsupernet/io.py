"""Reading and writing challenge files: candidate lists, scored architectures, submissions.

The challenge's files are one JSON object mapping ids to entries::

    {"arch1": {"arch": "16-4-12-..."}, "arch2": {...}, ...}                 # candidates
    {"arch1": {"arch": "16-4-12-...", "acc": 0.539}, ...}                   # scores / submissions

Conventions of this module:

* Accuracies are fractions in ``[0, 1]``. A file written in percent is recognised on read and
  converted: if the largest ``acc`` is above 1 and every ``acc`` lies within ``[0, 100]``, the
  whole file is taken as percent and every value divided by 100. A negative value, one above
  100, NaN/infinity, or anything that is not a number is an error.
* A top-level ``_meta`` key (an object: free-form provenance such as the recipe, seeds and
  command) may accompany the entries; our writers add it, readers skip it, and
  :func:`read_meta` returns it. ``_meta`` is therefore never an id.
* A path ending in ``.gz`` is written gzip-compressed (deterministic: no timestamp, no name);
  gzip input is recognised on read by its magic bytes, whatever the file's name.
* Every write is atomic (temp file beside the target, fsync, rename).
* A malformed file raises :class:`ChallengeFileError` (a ``ValueError``) naming the file and the
  first bad entry in file order, with what is wrong with it.
"""
from __future__ import annotations

import gzip
import json
import math
import numbers
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from ._atomic import atomic_write_bytes
from .space import Arch, ChannelSpace, Track1Space, get_space

__all__ = [
    "ChallengeFileError",
    "Score",
    "META_KEY",
    "official_candidates_path",
    "ground_truth_path",
    "resolve_data_path",
    "DATA_ALIASES",
    "read_candidates",
    "read_scores",
    "read_meta",
    "write_submission",
    "write_candidates",
]

META_KEY = "_meta"
_FIELDS = ("arch", "acc", "loss")
_RESOURCES = Path(__file__).resolve().parent / "resources"
_GZIP_MAGIC = b"\x1f\x8b"


class ChallengeFileError(ValueError):
    """A challenge file that cannot be used: missing, unreadable, not JSON, or a bad entry.

    ``path`` is the file, ``entry_id`` the first bad entry's id (``None`` when the problem is
    not tied to one entry) and ``reason`` what is wrong.
    """

    def __init__(self, path: str | os.PathLike, reason: str, entry_id: str | None = None) -> None:
        self.path = str(path)
        self.entry_id = entry_id
        self.reason = reason
        where = f"{self.path}: entry {entry_id!r}: " if entry_id is not None else f"{self.path}: "
        super().__init__(where + reason)


@dataclass(frozen=True)
class Score:
    """One scored architecture: ``acc`` a fraction in [0, 1], optional ``loss``.

    ``extra`` keeps any further keys the entry carried (written back by
    :func:`write_submission`); it is compared but not hashed.
    """

    arch: Arch
    acc: float
    loss: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)


# ---------------------------------------------------------------------------- bundled data
def official_candidates_path() -> Path:
    """The bundled official Track-1 candidate list (50,000 entries, gzip-compressed JSON)."""
    return _RESOURCES / "track1_final_archs.json.gz"


def ground_truth_path() -> Path:
    """The bundled ground truth: stand-alone CIFAR-100 accuracies of arch1..arch1000."""
    return _RESOURCES / "gt_first_1000.json"


DATA_ALIASES: dict[str, Any] = {
    "official": official_candidates_path,
    "gt1000": ground_truth_path,
}


def resolve_data_path(spec: str | os.PathLike) -> Path:
    """A path, where the literal ``official`` / ``gt1000`` name the bundled files.

    The alias always wins: write ``./official`` for a file of that name.
    """
    if isinstance(spec, str) and spec in DATA_ALIASES:
        return DATA_ALIASES[spec]()
    return Path(spec)


# ---------------------------------------------------------------------------- low level
class _Obj(dict):
    """A decoded JSON object that also remembers its key/value pairs in order (duplicates too)."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(pairs)
        self.pairs = pairs

    def first_duplicate(self) -> str | None:
        if len(self) == len(self.pairs):
            return None
        seen: set[str] = set()
        for k, _ in self.pairs:
            if k in seen:
                return k
            seen.add(k)
        return None


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ChallengeFileError(path, "no such file") from None
    except IsADirectoryError:
        raise ChallengeFileError(path, "is a directory, not a file") from None
    except OSError as e:
        raise ChallengeFileError(path, f"cannot be read: {e.strerror or e}") from None
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ChallengeFileError(path, f"corrupt gzip data: {e}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ChallengeFileError(path, f"not UTF-8 text (byte {e.start})") from None


def _load_top(path: str | os.PathLike) -> tuple[Path, _Obj]:
    """Decode a challenge file into its top-level object; checks the top level and ``_meta``."""
    p = Path(path)
    text = _read_text(p)
    try:
        top = json.loads(text, object_pairs_hook=_Obj)
    except json.JSONDecodeError as e:
        raise ChallengeFileError(p, f"not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise ChallengeFileError(p, "not valid JSON: nested too deeply") from None
    if not isinstance(top, _Obj):
        raise ChallengeFileError(
            p, f"top level is {_json_type(top)}, expected an object mapping ids to entries"
        )
    if META_KEY in top and not isinstance(top[META_KEY], dict):
        raise ChallengeFileError(p, f"{META_KEY!r} is {_json_type(top[META_KEY])}, expected an object")
    return p, top


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _resolve_space(space: ChannelSpace | str | None) -> ChannelSpace:
    if space is None:
        return Track1Space()
    if isinstance(space, str):
        return get_space(space)
    return space


def _iter_entries(p: Path, top: _Obj) -> Iterable[tuple[str, _Obj]]:
    """Entries in file order, ``_meta`` skipped; duplicate ids and non-object entries rejected."""
    seen: set[str] = set()
    for key, entry in top.pairs:
        if key in seen:
            raise ChallengeFileError(p, "duplicate id (it appears more than once)", key)
        seen.add(key)
        if key == META_KEY:
            continue
        if not isinstance(entry, _Obj):
            raise ChallengeFileError(p, f"entry is {_json_type(entry)}, expected an object", key)
        dup = entry.first_duplicate()
        if dup is not None:
            raise ChallengeFileError(p, f"duplicate key {dup!r} in the entry", key)
        yield key, entry


def _entry_arch(p: Path, key: str, entry: Mapping, space: ChannelSpace) -> Arch:
    if "arch" not in entry:
        raise ChallengeFileError(p, "missing 'arch'", key)
    s = entry["arch"]
    if not isinstance(s, str):
        raise ChallengeFileError(p, f"'arch' is {_json_type(s)}, expected a string", key)
    try:
        return space.parse(s)
    except ValueError as e:
        raise ChallengeFileError(p, f"bad 'arch': {e}", key) from None


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


# ---------------------------------------------------------------------------- readers
def read_candidates(path: str | os.PathLike, space: ChannelSpace | str | None = None) -> dict[str, Arch]:
    """Read ``{"archN": {"arch": s, ...}, ...}`` into ``{id: Arch}`` in file order.

    Keys other than ``arch`` are ignored, so a scores file reads as candidates too.
    ``space`` defaults to :class:`Track1Space`; a name such as ``"track1"`` is accepted.
    """
    sp = _resolve_space(space)
    p, top = _load_top(path)
    return {key: _entry_arch(p, key, entry, sp) for key, entry in _iter_entries(p, top)}


def read_scores(path: str | os.PathLike, space: ChannelSpace | str | None = None) -> dict[str, Score]:
    """Read ``{"archN": {"arch": s, "acc": x[, "loss": y], ...}, ...}`` into ``{id: Score}``.

    Accuracies come back as fractions: a percent file (largest ``acc`` above 1, every ``acc``
    within [0, 100]) is divided by 100. ``loss`` is optional (``null`` allowed) and must be a
    finite number; other keys are kept in :attr:`Score.extra`.
    """
    sp = _resolve_space(space)
    p, top = _load_top(path)
    rows: list[tuple[str, Arch, float, float | None, dict]] = []
    for key, entry in _iter_entries(p, top):
        arch = _entry_arch(p, key, entry, sp)
        if "acc" not in entry:
            raise ChallengeFileError(p, "missing 'acc'", key)
        acc = entry["acc"]
        if not _is_number(acc):
            raise ChallengeFileError(p, f"'acc' is {_json_type(acc)}, expected a number", key)
        acc = float(acc)
        if math.isnan(acc):
            raise ChallengeFileError(p, "'acc' is NaN", key)
        if acc < 0:
            raise ChallengeFileError(p, f"'acc' {acc!r} is negative", key)
        if acc > 100:
            raise ChallengeFileError(p, f"'acc' {acc!r} is above 100 (neither a fraction nor a percent)", key)
        loss = entry.get("loss")
        if loss is not None:
            if not _is_number(loss):
                raise ChallengeFileError(p, f"'loss' is {_json_type(loss)}, expected a number or null", key)
            loss = float(loss)
            if not math.isfinite(loss):
                raise ChallengeFileError(p, f"'loss' {loss!r} is not finite", key)
        extra = {k: _plain(v) for k, v in entry.items() if k not in _FIELDS}
        rows.append((key, arch, acc, loss, extra))
    scale = 100.0 if rows and max(r[2] for r in rows) > 1.0 else 1.0
    return {key: Score(arch, acc / scale, loss, extra) for key, arch, acc, loss, extra in rows}


def read_meta(path: str | os.PathLike) -> dict | None:
    """The file's top-level ``_meta`` object, or ``None`` when it has none."""
    _, top = _load_top(path)
    meta = top.get(META_KEY)
    return None if meta is None else _plain(meta)


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


# ---------------------------------------------------------------------------- writers
def _check_id(key: Any) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"ids must be non-empty strings, got {key!r}")
    if key == META_KEY:
        raise ValueError(f"{META_KEY!r} is reserved for provenance and cannot be an id")
    return key


def _arch_string(key: str, arch: Any, space: ChannelSpace) -> str:
    if isinstance(arch, Arch):
        return str(arch)
    try:
        return str(space.parse(arch))
    except ValueError as e:
        raise ValueError(f"entry {key!r}: bad arch: {e}") from None


def _finite(key: str, name: str, v: Any) -> float:
    if not _is_number(v):
        raise ValueError(f"entry {key!r}: {name} {v!r} is not a number")
    x = float(v)
    if not math.isfinite(x):
        raise ValueError(f"entry {key!r}: {name} {x!r} is not finite")
    return x


def _dump(path: str | os.PathLike, lines: list[str]) -> None:
    data = ("{\n" + ",\n".join(lines) + "\n}\n").encode("utf-8")
    if str(path).endswith(".gz"):
        data = gzip.compress(data, compresslevel=9, mtime=0)
    atomic_write_bytes(path, data)


def _meta_line(meta: Mapping | None) -> list[str]:
    if meta is None:
        return []
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a mapping, got {type(meta).__name__}")
    return [f"{json.dumps(META_KEY)}: {json.dumps(dict(meta), allow_nan=False, sort_keys=False)}"]


def write_submission(
    path: str | os.PathLike,
    scores: Mapping[str, Score | Mapping[str, Any]],
    meta: Mapping | None = None,
    *,
    space: ChannelSpace | str | None = None,
) -> None:
    """Write ``{"archN": {"arch": s, "acc": x[, "loss": y]}, ..., "_meta": {...}}`` atomically.

    Ids keep the mapping's order. Values are :class:`Score` objects or mappings with ``arch``
    (an :class:`Arch` or a string, validated against ``space``, Track 1 by default), ``acc``
    and optionally ``loss``; further keys (and :attr:`Score.extra`) are written after them.
    ``acc`` must be a fraction in [0, 1]. Nothing is written unless every entry is valid;
    a ``meta`` that is not JSON-serialisable raises ``TypeError`` and leaves any old file intact.
    """
    sp = _resolve_space(space)
    lines: list[str] = []
    for key, value in scores.items():
        key = _check_id(key)
        if isinstance(value, Score):
            arch, acc, loss, extra = value.arch, value.acc, value.loss, dict(value.extra)
        elif isinstance(value, Mapping):
            if "arch" not in value or "acc" not in value:
                raise ValueError(f"entry {key!r}: needs 'arch' and 'acc', got keys {sorted(value)}")
            arch, acc, loss = value["arch"], value["acc"], value.get("loss")
            extra = {k: v for k, v in value.items() if k not in _FIELDS}
        else:
            raise TypeError(f"entry {key!r}: expected a Score or a mapping, got {type(value).__name__}")
        entry: dict[str, Any] = {"arch": _arch_string(key, arch, sp)}
        a = _finite(key, "acc", acc)
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"entry {key!r}: acc {a!r} is outside [0, 1] (accuracies are written as fractions)")
        entry["acc"] = a
        if loss is not None:
            entry["loss"] = _finite(key, "loss", loss)
        clash = sorted(set(extra) & set(_FIELDS))
        if clash:
            raise ValueError(f"entry {key!r}: extra keys {clash} would overwrite the entry's own fields")
        entry.update(extra)
        lines.append(f"{json.dumps(key)}: {json.dumps(entry, allow_nan=False)}")
    lines.extend(_meta_line(meta))
    _dump(path, lines)


def write_candidates(
    path: str | os.PathLike,
    archs: Mapping[str, Arch | str] | Iterable[Arch | str],
    meta: Mapping | None = None,
    *,
    space: ChannelSpace | str | None = None,
) -> None:
    """Write a candidate list ``{"archN": {"arch": s}, ...}`` atomically.

    A plain sequence is numbered ``arch1``, ``arch2``, ... in order.
    """
    sp = _resolve_space(space)
    if not isinstance(archs, Mapping):
        archs = {f"arch{i + 1}": a for i, a in enumerate(archs)}
    lines = []
    for key, arch in archs.items():
        key = _check_id(key)
        lines.append(f"{json.dumps(key)}: {json.dumps({'arch': _arch_string(key, arch, sp)})}")
    lines.extend(_meta_line(meta))
    _dump(path, lines)
