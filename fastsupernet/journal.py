"""Append-only JSON-lines journals: long runs stream results here so a crash loses nothing finished.

The first line is the run's fingerprint (a JSON object); every later line is one finished
record. Each append is flushed to the OS before the call returns, so a killed process loses
nothing finished, and fsynced at once (or every ``sync_every`` appends and on close, for runs
that write many small records; a power loss may then cost the last few). On resume a torn last line
(the process was killed mid-write) is dropped and the file truncated back to the last whole
record; a fingerprint that differs from the stored one is refused, naming the keys that changed.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

__all__ = ["Journal", "JournalError", "fingerprint_diff", "read_journal", "journal_path", "existing_journals"]


class JournalError(ValueError):
    """A journal that cannot be started or resumed (names the file and why)."""


def fingerprint_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the keys whose values differ between two fingerprints."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            p = f"{prefix}.{k}" if prefix else str(k)
            if k not in old or k not in new:
                out.append(p)
            else:
                out += fingerprint_diff(old[k], new[k], p)
        return out
    return [] if old == new else [prefix or "(fingerprint)"]


def read_journal(path: str | os.PathLike, fingerprint: Mapping[str, Any]) -> tuple[list[dict], int]:
    """Read-only: the finished records of a journal and the byte length of its whole lines.

    A torn last line is ignored (not removed); a fingerprint differing from ``fingerprint`` or a
    damaged line elsewhere raises :class:`JournalError` naming the file.
    """
    path = Path(path)
    expected = json.loads(json.dumps(fingerprint))
    lines = path.read_bytes().split(b"\n")
    records: list[dict] = []
    good = 0
    for i, raw in enumerate(lines[:-1]):  # lines[-1]: after the last newline, empty or torn
        try:
            obj = json.loads(raw)
        except ValueError:
            if i == len(lines) - 2 and not lines[-1]:
                break  # torn final line that happened to end in a newline byte
            raise JournalError(f"{path}: line {i + 1} is not JSON; the journal is damaged") from None
        if i == 0:
            changed = fingerprint_diff(obj, expected)
            if changed:
                raise JournalError(
                    f"{path}: the journal belongs to a run with different settings "
                    f"(changed: {', '.join(changed)}); use the same settings or a new output"
                )
        else:
            records.append(obj)
        good += len(raw) + 1
    return records, good


def journal_path(out: str | os.PathLike, rank: int = 0) -> Path:
    """Where the process of ``rank`` journals the run whose output is ``out``."""
    out = Path(out)
    return out.with_name(out.name + (".journal" if rank == 0 else f".journal.{int(rank)}"))


_JOURNAL_SUFFIX = re.compile(r"^\.journal(?:\.(\d+))?$")


def existing_journals(out: str | os.PathLike) -> list[Path]:
    """Every journal of ``out`` on disk (any rank of any earlier run), in rank order."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    found = []
    for p in out.parent.iterdir():
        m = _JOURNAL_SUFFIX.match(p.name[len(out.name):]) if p.name.startswith(out.name) else None
        if m and p.is_file():
            found.append((int(m.group(1) or 0), p))
    return [p for _, p in sorted(found)]


class Journal:
    """``Journal(path, fingerprint, resume=...)``: ``records`` already finished, ``append(record)``.

    Without ``resume`` an existing journal is refused (its results would otherwise be lost or
    mixed); with ``resume`` and no journal on disk, a new one is started. ``sync_every``: fsync
    after this many appends (default 1: every append is durable when the call returns).
    """

    def __init__(
        self, path: str | os.PathLike, fingerprint: Mapping[str, Any], *, resume: bool, sync_every: int = 1
    ) -> None:
        if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
            raise ValueError(f"sync_every must be an int >= 1, got {sync_every!r}")
        self._sync_every = sync_every
        self._unsynced = 0
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # plain JSON values, as stored
        self.records: list[dict] = []
        if self.path.exists():
            if not resume:
                raise JournalError(
                    f"{self.path}: a journal of an earlier run exists; resume it (--resume) or remove it"
                )
            good = self._read()
            self._file = open(self.path, "r+b")
            self._file.truncate(good)
            self._file.seek(good)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "wb")
            self._write(self.fingerprint)

    def _read(self) -> int:
        """Load the stored records; returns the byte length of the whole lines kept."""
        self.records, good = read_journal(self.path, self.fingerprint)
        if good == 0:  # not even the fingerprint survived: start afresh
            head = json.dumps(self.fingerprint, allow_nan=False).encode() + b"\n"
            with open(self.path, "wb") as f:
                f.write(head)
                f.flush()
                os.fsync(f.fileno())
            return len(head)
        return good

    def _write(self, obj: Mapping[str, Any], sync: bool = True) -> None:
        self._file.write(json.dumps(obj, allow_nan=False).encode() + b"\n")
        self._file.flush()
        if sync:
            os.fsync(self._file.fileno())

    def append(self, record: Mapping[str, Any]) -> None:
        """Add one finished record: flushed now, fsynced now or with its group (``sync_every``)."""
        self._unsynced += 1
        sync = self._unsynced >= self._sync_every
        self._write(record, sync=sync)
        if sync:
            self._unsynced = 0
        self.records.append(dict(record))

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            if self._unsynced:
                os.fsync(self._file.fileno())
                self._unsynced = 0
            self._file.close()

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
