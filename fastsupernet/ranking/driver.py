"""``rank``: score every candidate of a challenge file with a trained supernet checkpoint.

The driver around the engines: it validates everything before any computation, evaluates each
distinct network once (ids whose network widths agree share one result), streams results to a
journal so that nothing finished is lost (below), shards the networks over the ranks of a
``torchrun`` group (see :mod:`.shard`) and writes the submission atomically.

Journals (:class:`fastsupernet.journal.Journal`) sit beside the output: ``OUT.json.journal``,
and ``OUT.json.journal.r`` for rank r > 0 under ``torchrun``. The first line is the run's
fingerprint, every further line one finished network ``{"net": widths, "acc": x, "loss": y}``
(``net`` is the dash-joined network widths, so ids that differ only in a trailing position
share one line). Floats are written with Python's shortest round-trip ``repr``, so a resumed
run reproduces the numbers of an uninterrupted one exactly.
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from .. import io as fio
from ..checkpoint import Checkpoint, load_checkpoint
from ..data import Dataset, load_data
from ..journal import Journal, JournalError, existing_journals, journal_path
from ..space import Arch, ChannelSpace
from .engines import ENGINES, PRECISIONS, Protocol, check_conv_route, make_engine, prepare_data
from ..distributed import ProcessGroup, process_group_from_env
from .shard import plan_shards

__all__ = ["RankError", "RankResult", "rank", "network_key", "journal_path", "existing_journals"]

ArchsInput = str | os.PathLike | Mapping[str, Arch | str] | Sequence[Arch | str]


class RankError(ValueError):
    """A ranking that must not start (or cannot finish): the message says what and why."""


@dataclass
class RankResult:
    """What :func:`rank` produced.

    ``scores`` maps every candidate id (in input order) to its :class:`~fastsupernet.io.Score`
    (``acc`` a fraction, ``loss`` the mean cross-entropy). Counts: ``candidates`` ids,
    ``unique`` distinct networks, ``computed`` networks scored by this run (all ranks),
    ``resumed`` networks taken from an earlier run's journal. Multiply-adds per image summed over
    the computed networks: ``macs_per_image_total`` without prefix sharing and
    ``macs_per_image_computed`` as the engine ran them.
    """

    out: Path
    scores: dict[str, fio.Score]
    meta: dict
    candidates: int
    unique: int
    computed: int
    resumed: int
    seconds: float
    scoring_seconds: float
    macs_per_image_total: int
    macs_per_image_computed: int
    world_size: int = 1
    engine: str = "fast"
    precision: str = "fp32"
    conv_route: str = "kernel"

    @property
    def candidates_per_s(self) -> float:
        """Networks computed per second of scoring (all ranks together)."""
        return self.computed / self.scoring_seconds if self.scoring_seconds > 0 else 0.0

    @property
    def prefix_sharing_saved(self) -> float:
        """Fraction of the multiply-adds that prefix sharing saved (0 when nothing was computed)."""
        if self.macs_per_image_total <= 0:
            return 0.0
        return 1.0 - self.macs_per_image_computed / self.macs_per_image_total

    def to_json_dict(self) -> dict[str, Any]:
        """The summary the ``rank`` command prints."""
        return {
            "out": str(self.out),
            "candidates": self.candidates,
            "unique": self.unique,
            "computed": self.computed,
            "resumed": self.resumed,
            "seconds": round(self.seconds, 3),
            "candidates_per_s": round(self.candidates_per_s, 3),
            "macs_per_image_total": self.macs_per_image_total,
            "macs_per_image_computed": self.macs_per_image_computed,
            "prefix_sharing_saved": round(self.prefix_sharing_saved, 4),
            "engine": self.engine,
            "precision": self.precision,
            "conv_route": self.conv_route,
            "world_size": self.world_size,
        }

    def summary_line(self) -> str:
        """One human-readable line: counts, time, rate and what prefix sharing saved."""
        ratio = (
            self.macs_per_image_total / self.macs_per_image_computed if self.macs_per_image_computed > 0 else 1.0
        )
        route = f", conv route {self.conv_route}" if self.conv_route != "kernel" else ""
        return (
            f"ranked {self.candidates} candidates ({self.unique} unique networks: {self.computed} computed, "
            f"{self.resumed} from the journal) in {self.seconds:.1f} s, {self.candidates_per_s:.2f} candidates/s "
            f"({self.engine}, {self.precision}{route}, {self.world_size} process{'es' if self.world_size > 1 else ''}); "
            f"prefix sharing saved {100 * self.prefix_sharing_saved:.1f}% of multiply-adds ({ratio:.2f}x)"
        )


# ---------------------------------------------------------------------------- helpers
def network_key(arch: Arch) -> str:
    """The journal key of a candidate's network: its dash-joined network widths."""
    return "-".join(str(w) for w in arch.widths)


def _read_results(path: Path, fingerprint: Mapping) -> dict[str, tuple[float, float]]:
    """The finished networks of one journal (a torn last line is dropped; the fingerprint must match)."""
    try:
        with Journal(path, fingerprint, resume=True) as journal:  # also cuts a torn last line
            records = journal.records
    except JournalError as e:
        raise JournalError(f"cannot resume: {e} (or pass --force to start over)") from None
    results: dict[str, tuple[float, float]] = {}
    for i, rec in enumerate(records):
        net, acc, loss = rec.get("net"), rec.get("acc"), rec.get("loss")
        if not (isinstance(net, str) and _number(acc) and 0.0 <= acc <= 1.0 and _number(loss)):
            raise JournalError(f"{path}: line {i + 2} is not a ranking result {{net, acc in [0, 1], finite loss}}: {rec!r}")
        results[net] = (float(acc), float(loss))
    return results


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_archs(archs: ArchsInput, space: ChannelSpace) -> dict[str, Arch]:
    """Candidates by id, every one validated against ``space`` (errors name the id)."""
    if isinstance(archs, (str, os.PathLike)):
        where = str(fio.resolve_data_path(archs))
        out = fio.read_candidates(fio.resolve_data_path(archs), space)
        for key in out:
            if not key:
                raise RankError(f"{where}: candidate id {key!r} is not usable (ids are non-empty strings)")
    else:
        items: Iterable[tuple[Any, Any]]
        if isinstance(archs, Mapping):
            items = archs.items()
        else:
            items = ((f"arch{i + 1}", a) for i, a in enumerate(archs))
        out = {}
        for key, a in items:
            if not isinstance(key, str) or not key or key == fio.META_KEY:
                raise RankError(f"candidate id {key!r} is not usable (ids are non-empty strings other than {fio.META_KEY!r})")
            try:
                out[key] = space.parse(a)
            except ValueError as e:
                raise RankError(f"candidate {key!r}: {e}") from None
        where = "the candidate list"
    if not out:
        raise RankError(f"{where} holds no candidates")
    return out


def _check_count(name: str, value: int | None, available: int, what: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RankError(f"{name} must be a positive integer, got {value!r}")
    if value > available:
        raise RankError(f"{name} {value} exceeds the {available} images of {what}")


def _resolve_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else 0)
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        dev = torch.device("cuda", local_rank)
    return dev


def _data_fingerprint(dataset: Dataset) -> dict:
    return {
        "info": dataset.info.to_dict(),
        "train_images": int(dataset.train_images.shape[0]),
        "test_images": int(dataset.test_images.shape[0]),
    }


def _check_data_fits(ckpt: Checkpoint, dataset: Dataset, spec: str) -> None:
    info = dataset.info
    if info.in_channels != ckpt.in_channels or info.num_classes != ckpt.num_classes:
        raise RankError(
            f"data {spec!r} has {info.in_channels} channel(s) and {info.num_classes} classes, but checkpoint "
            f"{ckpt.path} expects {ckpt.in_channels} channel(s) and {ckpt.num_classes} classes"
        )


def _load_previous(
    out: Path, fingerprint: dict, *, resume: bool, force: bool, group: ProcessGroup
) -> dict[str, tuple[float, float]]:
    """Check what an earlier run left beside ``out``; returns the results it finished."""
    journals = existing_journals(out)
    if force:
        if group.rank == 0:
            for j in journals:
                j.unlink()
        return {}
    if not resume:
        if journals:
            raise RankError(
                f"{journals[0]} exists: an earlier ranking into {out} left its journal; pass --resume "
                f"(resume=True) to continue it or --force (force=True) to start over"
            )
        if out.exists():
            raise RankError(f"{out} exists; pass --force (force=True) to overwrite it")
        return {}
    if out.exists() and not journals:
        raise RankError(f"{out} exists but has no journal to resume from; pass --force (force=True) to overwrite it")
    done: dict[str, tuple[float, float]] = {}
    for j in journals:
        done.update(_read_results(j, fingerprint))
    return done


# ---------------------------------------------------------------------------- rank
def rank(
    checkpoint: str | os.PathLike,
    archs: ArchsInput,
    out: str | os.PathLike,
    *,
    data: str | None = None,
    recal_images: int | None = None,
    recal_batch: int = 128,
    eval_images: int | None = None,
    engine: str = "fast",
    precision: str = "fp32",
    conv_route: str = "kernel",
    resume: bool = False,
    force: bool = False,
    device: str | torch.device | None = None,
    memory_limit: int | None = None,
    progress: bool = True,
) -> RankResult:
    """Score every candidate with BN recalibration, write a submission to ``out``, return it.

    ``archs``: a challenge file (``"official"`` names the bundled 50,000), a mapping of ids to
    architectures, or a sequence (numbered ``arch1``, ``arch2``, ...). ``data`` defaults to the
    checkpoint's data spec. The protocol (README, "Ranking"): the first ``recal_images`` of the
    seeded recalibration split (10% of the training set; all of it by default) in batches of
    ``recal_batch``, then top-1 accuracy and mean cross-entropy on the first ``eval_images`` test
    images (all by default). ``conv_route`` picks how the fast engine runs its convolutions on
    a GPU (:data:`~fastsupernet.ranking.engines.CONV_ROUTES`; ``kernel``, the default, is the
    fastest measured; ``triton`` and ``triton_tf32x3`` are the Triton kernel, README "Ranking").
    Results stream to ``out + ".journal"``; ``resume=True`` continues
    an interrupted run with the same fingerprint, ``force=True`` discards an earlier run's
    output and journals. Under ``torchrun`` (``WORLD_SIZE`` > 1) each rank scores a shard of
    whole prefix subtrees and rank 0 writes ``out``; every rank returns the merged result.

    Everything is validated before any computation: a bad id or architecture raises
    :class:`~fastsupernet.io.ChallengeFileError` / :class:`RankError` naming it.
    """
    t0 = time.perf_counter()
    if resume and force:
        raise RankError("resume and force exclude each other")
    if engine not in ENGINES:
        raise RankError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
    if precision not in PRECISIONS:
        raise RankError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    if isinstance(recal_batch, bool) or not isinstance(recal_batch, int) or recal_batch < 1:
        raise RankError(f"recal_batch must be a positive integer, got {recal_batch!r}")
    if memory_limit is not None and (isinstance(memory_limit, bool) or not isinstance(memory_limit, int) or memory_limit < 1):
        raise RankError(f"memory_limit must be a positive number of bytes, got {memory_limit!r}")
    dev = _resolve_device(device, int(os.environ.get("LOCAL_RANK", "0") or 0))
    if precision == "bf16" and dev.type != "cuda":
        raise RankError(f"precision 'bf16' needs a CUDA device, got {dev} (use fp32 on CPU)")
    try:
        check_conv_route(engine, conv_route, precision, dev)
    except ValueError as e:
        raise RankError(str(e)) from None
    out = Path(out)
    if out.is_dir():
        raise RankError(f"{out} is a directory; expected the path of the submission file to write")

    ckpt_path = Path(checkpoint)
    ckpt = load_checkpoint(ckpt_path)
    space = ckpt.space
    candidates = _read_archs(archs, space)
    networks: dict[str, Arch] = {}
    for a in candidates.values():
        networks.setdefault(network_key(a), a)
    keys = list(networks)

    spec = data if data is not None else ckpt.data.get("spec")
    if not spec:
        raise RankError(f"{ckpt_path} records no data spec; pass --data (data=...)")
    dataset = load_data(spec)
    _check_data_fits(ckpt, dataset, spec)
    fraction = Protocol().recal_fraction
    num_train = int(dataset.train_images.shape[0])
    _check_count("recal_images", recal_images, int(round(fraction * num_train)),
                 f"the recalibration split ({fraction:g} of {num_train} training images)")
    _check_count("eval_images", eval_images, int(dataset.test_images.shape[0]), "the test split")
    protocol = Protocol(recal_images=recal_images, recal_batch=recal_batch, eval_images=eval_images)

    group = process_group_from_env(dev)
    try:
        return _run(
            group=group, t0=t0, ckpt=ckpt, ckpt_path=ckpt_path, candidates=candidates, networks=networks, keys=keys,
            spec=spec, dataset=dataset, protocol=protocol, engine=engine, precision=precision,
            conv_route=conv_route, resume=resume,
            force=force, device=dev, memory_limit=memory_limit,
            progress=progress, out=out,
        )
    finally:
        group.close()


def _run(
    *,
    group: ProcessGroup,
    t0: float,
    ckpt: Checkpoint,
    ckpt_path: Path,
    candidates: dict[str, Arch],
    networks: dict[str, Arch],
    keys: list[str],
    spec: str,
    dataset: Dataset,
    protocol: Protocol,
    engine: str,
    precision: str,
    conv_route: str,
    resume: bool,
    force: bool,
    device: torch.device,
    memory_limit: int | None,
    progress: bool,
    out: Path,
) -> RankResult:
    fingerprint = {
        "journal": "fastsupernet rank",
        "checkpoint_sha256": _sha256(ckpt_path),
        "protocol": protocol.to_dict(),
        "data": {"spec": spec, **_data_fingerprint(dataset)},
        "engine": engine,
        "precision": precision,
        "device": device.type,
    }
    if conv_route != "kernel":  # the default route is left out: journals written before routes existed resume
        fingerprint["conv_route"] = conv_route
    done = _load_previous(out, fingerprint, resume=resume, force=force, group=group)

    space = ckpt.space
    macs, _ = space.costs(
        [networks[k] for k in keys],
        resolution=dataset.info.resolution,
        in_channels=ckpt.in_channels,
        num_classes=ckpt.num_classes,
        shortcut=ckpt.config.shortcut,
        width_map=dict(ckpt.config.width_map),
    )
    plan = plan_shards([networks[k].widths for k in keys], [int(m) for m in macs], group.world_size)
    mine = [keys[i] for i in plan.shards[group.rank]]
    pending = [k for k in mine if k not in done]
    # No rank writes before every rank has checked what earlier runs left.
    group.barrier()

    own = journal_path(out, group.rank)
    t_score = time.perf_counter()
    stats = {"computed": 0, "macs_total": 0, "macs_computed": 0, "seconds": 0.0}
    # fsync each slow reference result at once; the fast engine's come in bursts, fsynced in groups
    sync_every = 1 if engine == "reference" else 64
    with Journal(own, fingerprint, resume=resume, sync_every=sync_every) as journal:
        if pending:
            model = ckpt.build_supernet(device)
            rank_data = prepare_data(dataset, protocol, device=device)
            eng = make_engine(engine, model, rank_data, precision=precision, memory_limit_bytes=memory_limit,
                              conv_route=conv_route)
            archs = [networks[k] for k in pending]
            bar = _progress_bar(progress and group.rank == 0, len(mine), len(mine) - len(pending), group)
            try:
                for result in eng.score(archs):
                    net = pending[result.index]
                    if not (_number(result.acc) and 0.0 <= result.acc <= 1.0 and _number(result.loss)):
                        raise RankError(f"network {net}: engine {engine!r} returned acc {result.acc!r}, loss {result.loss!r}")
                    journal.append({"net": net, "acc": float(result.acc), "loss": float(result.loss)})
                    stats["computed"] += 1
                    if bar is not None:
                        bar.update(1)
            finally:
                if bar is not None:
                    bar.close()
            if stats["computed"] != len(pending):
                raise RankError(f"engine {engine!r} returned {stats['computed']} results for {len(pending)} networks")
            stats["macs_total"] = int(eng.stats.macs_per_image_total)
            stats["macs_computed"] = int(eng.stats.macs_per_image_computed)
        stats["seconds"] = time.perf_counter() - t_score

    gathered = group.all_gather(stats)  # also the barrier: every shard is on disk after this
    results: dict[str, tuple[float, float]] = {}
    for j in existing_journals(out):
        results.update(_read_results(j, fingerprint))
    missing = [k for k in keys if k not in results]
    if missing:
        raise RankError(f"{len(missing)} network(s) have no result in the journals of {out}, e.g. {missing[0]}")

    scores = {cid: fio.Score(a, results[network_key(a)][0], results[network_key(a)][1]) for cid, a in candidates.items()}
    computed = sum(s["computed"] for s in gathered)
    result = RankResult(
        out=out,
        scores=scores,
        meta={},
        candidates=len(candidates),
        unique=len(keys),
        computed=computed,
        resumed=len(keys) - computed,
        seconds=time.perf_counter() - t0,
        scoring_seconds=max(s["seconds"] for s in gathered),
        macs_per_image_total=sum(s["macs_total"] for s in gathered),
        macs_per_image_computed=sum(s["macs_computed"] for s in gathered),
        world_size=group.world_size,
        engine=engine,
        precision=precision,
        conv_route=conv_route,
    )
    result.meta = {
        "command": "rank",
        "checkpoint": {"path": str(ckpt_path), "sha256": fingerprint["checkpoint_sha256"]},
        "protocol": fingerprint["protocol"],
        "data": fingerprint["data"],
        "engine": engine,
        "precision": precision,
        "conv_route": conv_route,
        "device": device.type,
        "world_size": group.world_size,
        "counts": {
            "candidates": result.candidates,
            "unique": result.unique,
            "computed": result.computed,
            "resumed": result.resumed,
        },
        "seconds": round(result.seconds, 3),
        "macs_per_image_total": result.macs_per_image_total,
        "macs_per_image_computed": result.macs_per_image_computed,
    }
    if group.rank == 0:
        fio.write_submission(out, scores, meta=result.meta, space=ckpt.space)
        if progress:
            sys.stderr.write(result.summary_line() + "\n")
            sys.stderr.flush()
    group.barrier()
    return result


def _progress_bar(enabled: bool, total: int, initial: int, group: ProcessGroup):
    if not enabled:
        return None
    from tqdm import tqdm

    desc = "rank" if not group.distributed else f"rank 0/{group.world_size}"
    return tqdm(total=total, initial=initial, unit="cand", desc=desc, file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
