"""Stand-alone training of candidates: the ground truth a supernet's ranking is judged against.

Each candidate is built as its own :class:`~fastsupernet.supernet.StaticNet` (fresh default
initialisation, no shared weights) and trained from scratch with one fixed :class:`Recipe`;
its test accuracy and loss, averaged over seeds, form a challenge-shape ground-truth file.

A recipe is a small YAML file; every key is optional (defaults below) and an unknown key or a
value of the wrong type is an error naming the key and the file::

    data: fashion-mnist@14  # data spec (fastsupernet.data.load_data); "@14": resized to 14x14
    train_images: 12000     # first N of a seeded permutation of the training split; null = all
    epochs: 8
    batch_size: 128
    lr: 0.1                 # SGD, linear warm-up then cosine to 0, stepped per batch
    momentum: 0.9
    nesterov: true
    weight_decay: 0.0005
    warmup_epochs: 0.5
    crop_padding: 2         # random-crop padding of the batch augmentation; 0 disables it
    hflip: null             # null: flip when the data says flips are label-preserving
    shortcut: all           # 1x1 conv shortcut in every block ("all") or only where needed

Seeds fix the initialisation, the batch order and the augmentation; the training subset does
not depend on the seed, so two seeds of a candidate see the same images.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from .data import DataInfo, Dataset, augment_batch, load_data, normalize
from .space import Arch, ChannelSpace
from .supernet import StaticNet, SupernetConfig
from .training.pipeline import lr_at

__all__ = [
    "Recipe",
    "RecipeError",
    "load_recipe",
    "StandaloneData",
    "prepare_standalone_data",
    "train_candidate",
    "CandidateRun",
]


class RecipeError(ValueError):
    """A stand-alone recipe that cannot be used (names the file, the key and what was expected)."""


@dataclass(frozen=True)
class Recipe:
    """How every candidate of a ground truth is trained (see the module docstring for the keys)."""

    data: str = "fashion-mnist"
    train_images: int | None = None
    epochs: int = 8
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.5
    crop_padding: int = 2
    hflip: bool | None = None
    shortcut: str = "all"

    def to_dict(self) -> dict:
        return asdict(self)


_TYPES: dict[str, tuple[type, ...]] = {
    "data": (str,),
    "train_images": (int, type(None)),
    "epochs": (int,),
    "batch_size": (int,),
    "lr": (float, int),
    "momentum": (float, int),
    "nesterov": (bool,),
    "weight_decay": (float, int),
    "warmup_epochs": (float, int),
    "crop_padding": (int,),
    "hflip": (bool, type(None)),
    "shortcut": (str,),
}


def _type_names(types: tuple[type, ...]) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def load_recipe(source: str | os.PathLike | Mapping[str, Any] | Recipe | None) -> Recipe:
    """A validated :class:`Recipe` from a YAML file, a mapping, or ``None`` (the defaults)."""
    if isinstance(source, Recipe):
        return source
    where = "recipe"
    if source is None:
        raw: Any = {}
    elif isinstance(source, Mapping):
        raw = dict(source)
    else:
        import yaml

        path = Path(source)
        where = str(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise RecipeError(f"{where}: cannot read the recipe ({e.strerror or e})") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise RecipeError(f"{where}: not valid YAML ({e})") from None
        raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise RecipeError(f"{where}: expected a mapping of recipe keys, got {type(raw).__name__}")
    known = {f.name for f in fields(Recipe)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise RecipeError(f"{where}: unknown key {key!r} (known keys: {', '.join(sorted(known))})")
        types = _TYPES[key]
        if isinstance(value, bool) and bool not in types:
            ok = False
        else:
            ok = isinstance(value, types)
        if not ok:
            raise RecipeError(f"{where}: key {key!r} must be {_type_names(types)}, got {value!r}")
        values[key] = float(value) if float in types and isinstance(value, int) else value
    r = Recipe(**values)
    positive = ("epochs", "batch_size", "lr")
    for key in positive:
        if getattr(r, key) <= 0:
            raise RecipeError(f"{where}: key {key!r} must be positive, got {getattr(r, key)!r}")
    if r.train_images is not None and r.train_images < 1:
        raise RecipeError(f"{where}: key 'train_images' must be a positive int or null, got {r.train_images!r}")
    for key in ("momentum", "weight_decay", "warmup_epochs", "crop_padding"):
        if getattr(r, key) < 0:
            raise RecipeError(f"{where}: key {key!r} must not be negative, got {getattr(r, key)!r}")
    if r.shortcut not in ("all", "projection"):
        raise RecipeError(f"{where}: key 'shortcut' must be 'all' or 'projection', got {r.shortcut!r}")
    return r


@dataclass
class StandaloneData:
    """Normalised training and test tensors of the recipe's data, built once per run."""

    info: DataInfo
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    hflip: bool


def prepare_standalone_data(recipe: Recipe, dataset: Dataset | None = None) -> StandaloneData:
    """The recipe's data: loaded (unless given), subset and normalised once."""
    ds = dataset if dataset is not None else load_data(recipe.data)
    info = ds.info
    n = ds.train_images.shape[0]
    if recipe.train_images is not None and recipe.train_images > n:
        raise RecipeError(f"recipe asks for train_images={recipe.train_images}, the data {info.spec!r} has {n}")
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    if recipe.train_images is not None:
        idx = idx[: recipe.train_images]
    idx, _ = idx.sort()
    train_x = normalize(ds.train_images[idx], info).contiguous()
    test_x = normalize(ds.test_images, info).contiguous()
    hflip = info.hflip if recipe.hflip is None else recipe.hflip
    return StandaloneData(info, train_x, ds.train_labels[idx].clone(), test_x, ds.test_labels.clone(), hflip)


@dataclass(frozen=True)
class CandidateRun:
    """One stand-alone training: test accuracy (fraction), mean test cross-entropy, seconds."""

    acc: float
    loss: float
    seconds: float


def _batches(n: int, batch: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=gen)
    for i in range(0, n - batch + 1, batch):  # full batches only: BN never sees a tiny batch
        yield order[i : i + batch]


def build_standalone(space: ChannelSpace, arch: Arch, info: DataInfo, recipe: Recipe) -> StaticNet:
    """A fresh, default-initialised static network for ``arch`` (no width map)."""
    return StaticNet(
        space,
        arch.widths,
        in_channels=info.in_channels,
        num_classes=info.num_classes,
        config=SupernetConfig(shortcut=recipe.shortcut),
    )


@torch.no_grad()
def evaluate_network(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> tuple[float, float]:
    """Top-1 accuracy (fraction) and mean cross-entropy of ``net`` in eval mode."""
    net.eval()
    correct, loss = 0, 0.0
    for i in range(0, x.shape[0], batch):
        logits = net(x[i : i + batch])
        t = y[i : i + batch]
        correct += int((logits.argmax(1) == t).sum())
        loss += float(F.cross_entropy(logits.double(), t, reduction="sum"))
    n = max(1, x.shape[0])
    return correct / n, loss / n


def train_candidate(arch: Arch, recipe: Recipe, seed: int, data: StandaloneData, space: ChannelSpace) -> CandidateRun:
    """Train ``arch`` from scratch with ``recipe`` and ``seed``; its test accuracy and loss."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    net = build_standalone(space, arch, data.info, recipe)
    gen = torch.Generator().manual_seed(seed)
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        (no_decay if p.dim() == 1 else decay).append(p)
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        momentum=recipe.momentum,
        nesterov=recipe.nesterov and recipe.momentum > 0,
    )
    n = data.train_x.shape[0]
    if n < recipe.batch_size:
        raise RecipeError(f"batch_size {recipe.batch_size} exceeds the {n} training images")
    per_epoch = n // recipe.batch_size
    total = per_epoch * recipe.epochs
    warmup = int(round(recipe.warmup_epochs * per_epoch))
    step = 0
    net.train()
    for _ in range(recipe.epochs):
        for idx in _batches(n, recipe.batch_size, gen):
            x = data.train_x[idx]
            if recipe.crop_padding or data.hflip:
                x = augment_batch(x, generator=gen, pad=recipe.crop_padding, hflip=data.hflip)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, recipe.lr, warmup, 0.0)
            loss = F.cross_entropy(net(x), data.train_y[idx])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {float(loss)} at step {step} for {arch}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    acc, test_loss = evaluate_network(net, data.test_x, data.test_y)
    return CandidateRun(acc, test_loss, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- ground truth
@dataclass(frozen=True)
class GroundTruthResult:
    """Where a ground-truth run wrote its file, and how many trainings it ran this time."""

    out: Path
    journal: Path
    trained: int
    reused: int


def _fingerprint(recipe: Recipe, space: ChannelSpace) -> dict:
    return {"kind": "fastsupernet.groundtruth", "recipe": recipe.to_dict(), "space": space.to_dict()}


def _assign(todo: list[tuple[Arch, int]], costs: Sequence[float], world: int, rank: int) -> list[tuple[Arch, int]]:
    """This rank's share: largest trainings first, each to the least-loaded rank (same on every rank)."""
    loads = [0.0] * world
    mine = []
    for i in sorted(range(len(todo)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda q: (loads[q], q))
        loads[r] += costs[i]
        if r == rank:
            mine.append(todo[i])
    return mine


def groundtruth(
    archs: Mapping[str, Arch],
    out: str | os.PathLike,
    recipe: Recipe | Mapping[str, Any] | str | os.PathLike | None = None,
    *,
    seeds: Sequence[int] = (0, 1),
    space: ChannelSpace | None = None,
    resume: bool = False,
    progress: bool = True,
    meta: Mapping[str, Any] | None = None,
) -> GroundTruthResult:
    """Train every candidate of ``archs`` with every seed; write their mean test accuracy to ``out``.

    Finished trainings stream to the journal ``OUT.journal`` (one JSON line per candidate and
    seed); with ``resume=True`` they are skipped, so a killed run loses at most the trainings in
    progress. Candidates that are the same network (equal first 19 widths) are trained once.
    Under ``torchrun --nproc_per_node N`` the trainings are shared out over the ranks (balanced
    by multiply-adds; rank r > 0 journals to ``OUT.journal.r``) and rank 0 writes the output.
    The output is a challenge-shape file: per id ``acc`` (mean over seeds), ``accs`` and
    ``losses`` per seed, and ``_meta`` with the recipe and seeds.
    """
    from . import io as fio
    from .distributed import process_group_from_env
    from .journal import Journal, JournalError, existing_journals, journal_path, read_journal
    from .space import Track1Space

    rec = load_recipe(recipe)
    sp = space if space is not None else Track1Space()
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    out = Path(out)
    fp = _fingerprint(rec, sp)
    unique: dict[tuple[int, ...], Arch] = {}
    for a in archs.values():
        unique.setdefault(tuple(a.widths), a)

    def finished() -> dict[tuple[str, int], dict]:
        done: dict[tuple[str, int], dict] = {}
        for path in existing_journals(out):
            for r in read_journal(path, fp)[0]:
                done[(r["arch"], int(r["seed"]))] = r
        return done

    if not resume and existing_journals(out):
        raise JournalError(f"{journal_path(out)}: a journal of an earlier run exists; resume it (--resume) or remove it")
    done = finished()
    group = process_group_from_env("cpu")
    try:
        group.barrier()  # every rank has read the journals before any rank appends
        todo = [(a, s) for a in unique.values() for s in seeds if (str(a), s) not in done]
        costs = [float(c) for c in sp.costs([a for a, _ in todo])[0]] if todo else []
        mine = _assign(todo, costs, group.world_size, group.rank)
        data = prepare_standalone_data(rec) if mine else None
        bar = None
        if progress and mine and group.rank == 0:
            from tqdm import tqdm

            desc = "stand-alone" if group.world_size == 1 else f"stand-alone rank 0/{group.world_size}"
            bar = tqdm(total=len(mine), desc=desc, unit="run", dynamic_ncols=True)
        own = journal_path(out, group.rank)
        with Journal(own, fp, resume=True) as journal:
            for a, s in mine:
                run = train_candidate(a, rec, s, data, sp)
                journal.append({"arch": str(a), "seed": s, "acc": run.acc, "loss": run.loss,
                                "seconds": round(run.seconds, 3)})
                if bar is not None:
                    bar.set_postfix(acc=f"{run.acc:.4f}")
                    bar.update(1)
        if bar is not None:
            bar.close()
        group.barrier()
        trained = sum(group.all_gather(len(mine)))
        if group.rank == 0:
            done = finished()
            scores: dict[str, dict] = {}
            for key, a in archs.items():
                canon = str(unique[tuple(a.widths)])
                accs = [done[(canon, s)]["acc"] for s in seeds]
                losses = [done[(canon, s)]["loss"] for s in seeds]
                scores[key] = {"arch": str(a), "acc": sum(accs) / len(accs), "loss": sum(losses) / len(losses),
                               "accs": accs, "losses": losses}
            info = {"recipe": rec.to_dict(), "seeds": seeds, "trainings": len(unique) * len(seeds)}
            info.update(meta or {})
            fio.write_submission(out, scores, info, space=sp)
        group.barrier()
    finally:
        group.close()
    return GroundTruthResult(out, own, trained, len(unique) * len(seeds) - len(todo))
