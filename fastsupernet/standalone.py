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
from dataclasses import asdict, dataclass, fields, replace
from itertools import accumulate
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from .data import DataInfo, Dataset, augment_batch, load_data, normalize
from .multipath import ConvPlan, MultiPathPlan, build_plan, run_plan
from .space import Arch, ChannelSpace
from .supernet import StaticNet, Supernet, SupernetConfig
from .training.pipeline import lr_at

__all__ = [
    "Recipe",
    "RecipeError",
    "load_recipe",
    "StandaloneData",
    "prepare_standalone_data",
    "train_candidate",
    "train_candidates",
    "pack_networks",
    "unpack_networks",
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


def _recipe_sgd(recipe: Recipe, decay: list, no_decay: list) -> torch.optim.SGD:
    """The recipe's SGD: weight decay on ``decay`` (weights), none on ``no_decay`` (BN, biases)."""
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        momentum=recipe.momentum,
        nesterov=recipe.nesterov and recipe.momentum > 0,
    )


def _recipe_steps(recipe: Recipe, data: StandaloneData, seed: int, opt: torch.optim.Optimizer):
    """(step, batch indices, augmented batch) of every step ``seed`` gives, the lr of ``opt`` set for it."""
    gen = torch.Generator().manual_seed(seed)
    n = data.train_x.shape[0]
    if n < recipe.batch_size:
        raise RecipeError(f"batch_size {recipe.batch_size} exceeds the {n} training images")
    per_epoch = n // recipe.batch_size
    total = per_epoch * recipe.epochs
    warmup = int(round(recipe.warmup_epochs * per_epoch))
    step = 0
    for _ in range(recipe.epochs):
        for idx in _batches(n, recipe.batch_size, gen):
            x = data.train_x[idx]
            if recipe.crop_padding or data.hflip:
                x = augment_batch(x, generator=gen, pad=recipe.crop_padding, hflip=data.hflip)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, recipe.lr, warmup, 0.0)
            yield step, idx, x
            step += 1


def train_candidate(arch: Arch, recipe: Recipe, seed: int, data: StandaloneData, space: ChannelSpace) -> CandidateRun:
    """Train ``arch`` from scratch with ``recipe`` and ``seed``; its test accuracy and loss."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    net = build_standalone(space, arch, data.info, recipe)
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        (no_decay if p.dim() == 1 else decay).append(p)
    opt = _recipe_sgd(recipe, decay, no_decay)
    net.train()
    for step, idx, x in _recipe_steps(recipe, data, seed, opt):
        loss = F.cross_entropy(net(x), data.train_y[idx])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {float(loss)} at step {step} for {arch}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    acc, test_loss = evaluate_network(net, data.test_x, data.test_y)
    return CandidateRun(acc, test_loss, time.perf_counter() - t0)


# ----------------------------------------------------------------- several candidates at once
def _static_layer(net: StaticNet, name: str) -> tuple[torch.nn.Conv2d, torch.nn.BatchNorm2d]:
    """The conv and BN of ``net`` that the supernet layer ``name`` (``stem``, ``stages.s.b.conv1``...) is."""
    if name == "stem":
        return net.stem_conv, net.stem_bn
    _, s, b, which = name.split(".")
    blk = net.stages[int(s)][int(b)]
    return {"conv1": (blk.conv1, blk.bn1), "conv2": (blk.conv2, blk.bn2),
            "shortcut": (blk.shortcut_conv, blk.shortcut_bn)}[which]


def _packed_plan(space: ChannelSpace, archs: Sequence[Arch], info: DataInfo, recipe: Recipe) -> MultiPathPlan:
    """A multi-path plan of ``archs`` in which no two paths share a weight row: K separate networks."""
    sn = Supernet(space, SupernetConfig(shortcut=recipe.shortcut), in_channels=info.in_channels,
                  num_classes=info.num_classes)
    plan = build_plan(sn, archs)

    def own_rows(p: ConvPlan) -> ConvPlan:
        return replace(p, row_offsets=tuple(accumulate(p.out_widths, initial=0))[:-1])

    blocks = tuple(replace(b, conv1=own_rows(b.conv1), conv2=own_rows(b.conv2),
                           shortcut=own_rows(b.shortcut) if b.shortcut is not None else None) for b in plan.blocks)
    n = info.num_classes
    return replace(plan, stem=own_rows(plan.stem), blocks=blocks, classifier_rows=tuple(k * n for k in range(len(archs))))


def _plan_layers(plan: MultiPathPlan) -> list[tuple[ConvPlan, Sequence[int]]]:
    """Every conv layer of the plan with the paths (network indices) that run it, in order."""
    out: list[tuple[ConvPlan, Sequence[int]]] = [(plan.stem, range(plan.num_paths))]
    for b in plan.blocks:
        out += [(b.conv1, range(plan.num_paths)), (b.conv2, range(plan.num_paths))]
        if b.shortcut is not None:
            out.append((b.shortcut, b.shortcut_paths))
    return out


def pack_networks(nets: Sequence[StaticNet], plan: MultiPathPlan) -> dict[str, torch.Tensor]:
    """The packed tensors (:func:`~fastsupernet.multipath.run_plan` names) holding ``nets``' weights."""
    t: dict[str, torch.Tensor] = {}
    for p, paths in _plan_layers(plan):
        pairs = [_static_layer(nets[k], p.name) for k in paths]
        w = torch.zeros(p.out_channels, max(p.in_widths), p.kernel, p.kernel)
        for (conv, _), r in zip(pairs, p.row_offsets):
            w[r : r + conv.out_channels, : conv.in_channels] = conv.weight.detach()
        t[f"{p.name}.weight"] = w
        for key, attr in (("bn_weight", "weight"), ("bn_bias", "bias"), ("running_mean", "running_mean"),
                          ("running_var", "running_var")):
            t[f"{p.name}.{key}"] = torch.cat([getattr(bn, attr).detach() for _, bn in pairs]).clone()
    n = plan.num_classes
    cw = torch.zeros(n * len(nets), max(plan.feature_widths))
    for net, r in zip(nets, plan.classifier_rows):
        cw[r : r + n, : net.classifier.in_features] = net.classifier.weight.detach()
    t["classifier_weight"] = cw
    t["classifier_bias"] = torch.cat([net.classifier.bias.detach() for net in nets]).clone()
    return t


@torch.no_grad()
def unpack_networks(tensors: Mapping[str, torch.Tensor], plan: MultiPathPlan, nets: Sequence[StaticNet]) -> None:
    """Copy the packed tensors back into ``nets`` (the inverse of :func:`pack_networks`)."""
    for p, paths in _plan_layers(plan):
        for k, r in zip(paths, p.row_offsets):
            conv, bn = _static_layer(nets[k], p.name)
            conv.weight.copy_(tensors[f"{p.name}.weight"][r : r + conv.out_channels, : conv.in_channels])
            for key, attr in (("bn_weight", "weight"), ("bn_bias", "bias"), ("running_mean", "running_mean"),
                              ("running_var", "running_var")):
                getattr(bn, attr).copy_(tensors[f"{p.name}.{key}"][r : r + conv.out_channels])
    n = plan.num_classes
    for net, r in zip(nets, plan.classifier_rows):
        net.classifier.weight.copy_(tensors["classifier_weight"][r : r + n, : net.classifier.in_features])
        net.classifier.bias.copy_(tensors["classifier_bias"][r : r + n])


def train_candidates(
    archs: Sequence[Arch], recipe: Recipe, seed: int, data: StandaloneData, space: ChannelSpace,
    *, backend: str | None = None, nets_out: list[StaticNet] | None = None,
) -> list[CandidateRun]:
    """Train several candidates at once, each exactly as :func:`train_candidate` would with ``seed``.

    The K networks are packed side by side along channels and every layer of all K runs as one
    ``multi_conv2d`` call (forward and backward). Each keeps its own initialisation, weights,
    BN statistics and optimizer state; all K see the batches and augmentation that ``seed``
    gives any one of them, so each result equals its :func:`train_candidate` result up to
    float rounding. Each run's ``seconds`` is its share of the whole. ``nets_out`` (a list)
    receives the trained networks.
    """
    if not archs:
        return []
    t0 = time.perf_counter()
    cfg = SupernetConfig(shortcut=recipe.shortcut)
    if cfg.residual_activation != "relu":  # one shared PReLU slope per block would couple the networks
        raise ValueError("train_candidates packs ReLU networks only")
    nets = []
    for a in archs:
        torch.manual_seed(seed)  # the initialisation train_candidate gives this arch
        nets.append(build_standalone(space, a, data.info, recipe))
    plan = _packed_plan(space, archs, data.info, recipe)
    t = pack_networks(nets, plan)
    decay = [v for k, v in t.items() if k.endswith("weight") and v.dim() > 1]
    no_decay = [v for k, v in t.items() if k.endswith(("bn_weight", "bn_bias", "classifier_bias"))]
    for v in decay + no_decay:
        v.requires_grad_(True)
    opt = _recipe_sgd(recipe, decay, no_decay)
    momentum = nets[0].stem_bn.momentum
    for step, idx, x in _recipe_steps(recipe, data, seed, opt):
        logits = run_plan(plan, x, t, training=True, backend=backend, running_momentum=momentum)
        y = data.train_y[idx]
        losses = torch.stack([F.cross_entropy(z, y) for z in logits])
        bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
        if bad:
            raise FloatingPointError(f"loss became {float(losses[bad[0]])} at step {step} for {archs[bad[0]]}")
        opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        opt.step()
    correct = torch.zeros(len(archs), dtype=torch.long)
    loss_sum = torch.zeros(len(archs), dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, data.test_x.shape[0], 1000):
            logits = run_plan(plan, data.test_x[i : i + 1000], t, training=False, backend=backend)
            tgt = data.test_y[i : i + 1000]
            correct += (logits.argmax(2) == tgt).sum(1)
            loss_sum += torch.stack([F.cross_entropy(z.double(), tgt, reduction="sum") for z in logits])
    if nets_out is not None:
        unpack_networks(t, plan, nets)
        nets_out.extend(nets)
    m = max(1, data.test_x.shape[0])
    share = (time.perf_counter() - t0) / len(archs)
    return [CandidateRun(int(c) / m, float(l) / m, share) for c, l in zip(correct, loss_sum)]


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


def _packs(work: Sequence[tuple[Arch, int]], pack: int) -> list[list[tuple[Arch, int]]]:
    """``work`` cut into runs of at most ``pack`` trainings of one seed, in order of first appearance."""
    by_seed: dict[int, list[tuple[Arch, int]]] = {}
    for item in work:
        by_seed.setdefault(item[1], []).append(item)
    return [items[i : i + pack] for items in by_seed.values() for i in range(0, len(items), pack)]


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
    pack: int = 1,
) -> GroundTruthResult:
    """Train every candidate of ``archs`` with every seed; write their mean test accuracy to ``out``.

    Finished trainings stream to the journal ``OUT.journal`` (one JSON line per candidate and
    seed); with ``resume=True`` they are skipped, so a killed run loses at most the trainings in
    progress. Candidates that are the same network (equal first 19 widths) are trained once.
    Under ``torchrun --nproc_per_node N`` the trainings are shared out over the ranks (balanced
    by multiply-adds; rank r > 0 journals to ``OUT.journal.r``) and rank 0 writes the output.
    The output is a challenge-shape file: per id ``acc`` (mean over seeds), ``accs`` and
    ``losses`` per seed, and ``_meta`` with the recipe and seeds.

    ``pack`` > 1 trains up to that many candidates of one seed at once (:func:`train_candidates`,
    the same function up to float rounding); they are journaled when the pack finishes. On the
    2-core CPU at 14x14 packing measured slower than one at a time (benchmarks/RESULTS.md), so
    the default is 1.
    """
    from . import io as fio
    from .distributed import process_group_from_env
    from .journal import Journal, JournalError, existing_journals, journal_path, read_journal
    from .space import Track1Space

    rec = load_recipe(recipe)
    sp = space if space is not None else Track1Space()
    seeds = [int(s) for s in seeds]
    if isinstance(pack, bool) or not isinstance(pack, int) or pack < 1:
        raise ValueError(f"pack must be a positive integer, got {pack!r}")
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
            for chunk in _packs(mine, pack):
                s = chunk[0][1]
                if len(chunk) == 1:
                    runs = [train_candidate(chunk[0][0], rec, s, data, sp)]
                else:
                    runs = train_candidates([a for a, _ in chunk], rec, s, data, sp)
                for (a, _), run in zip(chunk, runs):
                    journal.append({"arch": str(a), "seed": s, "acc": run.acc, "loss": run.loss,
                                    "seconds": round(run.seconds, 3)})
                if bar is not None:
                    bar.set_postfix(acc=f"{runs[-1].acc:.4f}")
                    bar.update(len(chunk))
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
