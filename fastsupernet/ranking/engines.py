"""The two ranking engines: score candidates with BN recalibration, then top-1 and cross-entropy.

The protocol (:class:`Protocol`), the same for every candidate and both engines:

1. reset the BN statistics of every layer the candidate runs;
2. forward the recalibration images (:meth:`fastsupernet.Dataset.recalibration_split`, the
   first ``recal_images`` of it, un-augmented, fixed order) in batches of ``recal_batch`` in
   train mode: each BN normalises a batch with that batch's mean and biased variance; its
   running statistics become the plain average over the batches of the batch mean and of the
   *unbiased* batch variance (PyTorch's ``momentum=None``: every batch weighs the same, a
   short last batch included);
3. in eval mode, top-1 accuracy (a fraction) and mean cross-entropy over the first
   ``eval_images`` test images.

Engines (:func:`make_engine`):

``reference``
    One candidate at a time through :meth:`Supernet.forward` with its plain ops: the oracle.
    It writes the recalibrated statistics into the model's BN buffers while a candidate runs
    (with momentum set to ``None``) and restores the buffers and momenta when ``score``
    finishes or is abandoned.
``fast``
    The candidates are sorted into a prefix tree over their layer widths
    (:mod:`fastsupernet.ranking.tree`): every shared prefix is computed once, siblings that
    differ only in their last width (same weight rows) once at the widest of them (the narrower
    ones are its first channels), and all units of one tree level (one network position) run
    in one ``multi_conv2d`` call, each reading its parent's channel slice of the previous level
    (siblings read the same slice). During
    recalibration BN statistics come from the call's float64 ``stats`` output (one call per
    recalibration batch, so they are that batch's statistics) and the batch is normalised with
    them in a light elementwise pass; for evaluation BN is folded into the call's scale/shift
    epilogue together with the residual add and the (P)ReLU. The model is never modified.

    Memory: candidates are processed in groups of consecutive (sorted) networks; a group holds
    as many networks as keep the engine's working memory (the live packed activations of one
    batch of images, estimated per level) under ``memory_limit_bytes``, whatever the number of
    candidates. The recalibration and test tensors themselves are not counted (they are
    prepared once, :func:`prepare_data`). Each network's numbers do not depend on which other
    networks share its group or run: the kernels compute every candidate's channels
    independently, the BN arithmetic is elementwise with correctly rounded operations (one
    Triton pass per level during recalibration on CUDA), and the classifier and loss run in
    float64; on CPU the numbers are bitwise identical (tested).

    ``conv_route="class"`` (an experiment, :data:`CONV_ROUTES`): at the deep levels every tree
    node has one child, and the units of a level with the same input width, output width and
    weight rows (a *width class*) apply one weight slice to different inputs; this route runs
    each class as ``F.conv2d`` (cuDNN, oneDNN) over its units' gathered inputs as one batch, in
    chunks of ``class_chunk`` units (the last chunk zero-padded, so every call of a class has
    one shape and one algorithm), and scatters the result back, then takes the statistics with
    ``channel_stats`` or applies the BN pass. Slower than ``kernel`` on CPU (oneDNN runs these
    narrow convolutions at 0.4-0.7x the kernel's rate); whether cuDNN's tensor cores win on a
    GPU is what ``benchmarks/gpu_class_conv.py`` and ``gpu_rank.py --precisions tf32/class``
    measure.

Precision: ``fp32`` (TF32 off), ``tf32`` (TF32 tensor cores allowed on CUDA: cuDNN/cuBLAS
for the reference engine; for the fast one the CUDA tensor-core kernel
``fastsupernet::multi_conv2d_tf32``, or the Triton convolution with ``input_precision="tf32"``
in a build without it; the same as ``fp32`` on CPU) and ``bf16`` (bfloat16 activations and weights with float32
accumulation, float64 statistics, float32 BN folding: autocast for the reference engine, the
Triton convolution for the fast one; CUDA only: on CPU it raises ``ValueError``). ``tf32`` and
``bf16`` are checked against ``fp32`` by ``benchmarks/gpu_rank.py`` (Kendall tau >= 0.98).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from .. import ops
from ..ops.conv import _out_hw
from ..ops._extension import has_kernel
from ..ops.dispatch import _triton_installed
from ..data import Dataset, normalize
from ..space import Arch
from ..supernet import Supernet
from . import tree
from .tree import prefix_sharing

__all__ = [
    "ENGINES",
    "PRECISIONS",
    "CONV_ROUTES",
    "check_conv_route",
    "Protocol",
    "RankData",
    "prepare_data",
    "CandidateScore",
    "EngineStats",
    "Engine",
    "ReferenceEngine",
    "FastEngine",
    "make_engine",
    "prefix_sharing",
]

ENGINES = ("fast", "reference")
PRECISIONS = ("fp32", "tf32", "bf16")

#: Working-memory budget of the fast engine when none is given: this fraction of the free GPU
#: memory, or this many bytes on CPU (first 256 official candidates, 512 + 1,024 images, 2-core
#: AVX-512 VM: fast runs 52.0 / 49.1 s with 1 GiB, 61.4 / 51.5 s with 2 GiB: a larger budget
#: only adds fresh pages to touch; 64 candidates: 0.5 to 2 GiB within noise once warm).
DEFAULT_GPU_MEMORY_FRACTION = 0.5
DEFAULT_CPU_MEMORY_BYTES = 1 << 30


# ----------------------------------------------------------------------------- protocol and data
@dataclass(frozen=True)
class Protocol:
    """What every candidate is measured on (see the module docstring)."""

    recal_fraction: float = 0.1  # recalibration split = Dataset.recalibration_split(recal_fraction, recal_seed)
    recal_seed: int = 0
    recal_images: int | None = None  # the first N images of the split (None: all)
    recal_batch: int = 128
    eval_images: int | None = None  # the first M test images (None: all)

    def __post_init__(self) -> None:
        if isinstance(self.recal_fraction, bool) or not isinstance(self.recal_fraction, (int, float)) or not (
            0.0 < float(self.recal_fraction) <= 1.0
        ):
            raise ValueError(f"Protocol.recal_fraction must be in (0, 1], got {self.recal_fraction!r}")
        for name, lo, none_ok in (("recal_seed", None, False), ("recal_images", 1, True), ("recal_batch", 1, False),
                                  ("eval_images", 1, True)):
            v = getattr(self, name)
            if v is None and none_ok:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo):
                want = "an int" if lo is None else f"an int >= {lo}" + (" or None" if none_ok else "")
                raise ValueError(f"Protocol.{name} must be {want}, got {v!r}")

    def to_dict(self) -> dict:
        """Plain values (JSON-safe), for output metadata and fingerprints."""
        return asdict(self)


@dataclass
class RankData:
    """Recalibration images and evaluation images/labels, normalised once, on the device, in fixed order."""

    recal_x: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    recal_batch: int = 128  # the protocol's batch size (set by prepare_data)

    @property
    def device(self) -> torch.device:
        return self.recal_x.device


def prepare_data(dataset: Dataset, protocol: Protocol, device: torch.device | str = "cpu") -> RankData:
    """Select, normalise (float32) and place the protocol's images on ``device`` once."""
    rx, _ = dataset.recalibration_split(protocol.recal_fraction, protocol.recal_seed)
    if protocol.recal_images is not None:
        if protocol.recal_images > rx.shape[0]:
            raise ValueError(
                f"recal_images={protocol.recal_images} exceeds the {rx.shape[0]} images of the recalibration split "
                f"({protocol.recal_fraction} of {dataset.train_images.shape[0]} training images of "
                f"{dataset.info.spec!r})"
            )
        rx = rx[: protocol.recal_images]
    ex, ey = dataset.test_images, dataset.test_labels
    if protocol.eval_images is not None:
        if protocol.eval_images > ex.shape[0]:
            raise ValueError(
                f"eval_images={protocol.eval_images} exceeds the {ex.shape[0]} test images of {dataset.info.spec!r}"
            )
        ex, ey = ex[: protocol.eval_images], ey[: protocol.eval_images]
    if ex.shape[0] == 0:
        raise ValueError(f"{dataset.info.spec!r} has no test images to evaluate on")
    info = dataset.info
    return RankData(
        recal_x=normalize(rx.contiguous(), info, device=device),
        eval_x=normalize(ex.contiguous(), info, device=device),
        eval_y=ey.to(device),
        recal_batch=protocol.recal_batch,
    )


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class CandidateScore:
    index: int  # position in the list given to score()
    acc: float  # top-1 accuracy, a fraction
    loss: float  # mean cross-entropy over the evaluation images


@dataclass
class EngineStats:
    """What the last ``score`` call did (filled in as it runs)."""

    candidates: int = 0
    networks: int = 0  # distinct networks (equal first widths count once)
    groups: int = 0  # fast engine: groups of networks run together
    macs_per_image_total: int = 0  # sum over candidates of their multiply-adds per image
    macs_per_image_computed: int = 0  # after prefix sharing within each group (reference: = total)
    seconds: float = 0.0

    @property
    def sharing_ratio(self) -> float:
        return self.macs_per_image_total / self.macs_per_image_computed if self.macs_per_image_computed else 1.0


class Engine:
    """Scores candidates under one protocol; ``score`` yields results as they finish."""

    name: str = ""

    def __init__(self, model: Supernet, data: RankData, precision: str = "fp32",
                 memory_limit_bytes: int | None = None, *, recal_batch: int | None = None) -> None:
        recal_batch = data.recal_batch if recal_batch is None else recal_batch
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        dev = data.device
        if precision == "bf16" and dev.type != "cuda":
            raise ValueError(f"precision 'bf16' needs a CUDA device; the data is on {dev} (use fp32 on CPU)")
        if not isinstance(recal_batch, int) or isinstance(recal_batch, bool) or recal_batch < 1:
            raise ValueError(f"recal_batch must be an int >= 1, got {recal_batch!r}")
        if data.recal_x.shape[0] == 0:
            raise ValueError("no recalibration images")
        if data.recal_x.shape[1] != model.in_channels:
            raise ValueError(f"images have {data.recal_x.shape[1]} channels, the supernet expects {model.in_channels}")
        p = next(model.parameters())
        if p.device != dev:
            raise ValueError(f"the model is on {p.device}, the data on {dev}; put both on one device")
        self.model = model
        self.data = data
        self.precision = precision
        self.memory_limit_bytes = memory_limit_bytes
        self.recal_batch = recal_batch
        self.stats = EngineStats()

    @property
    def resolution(self) -> int:
        return int(self.data.recal_x.shape[-1])

    def score(self, archs: Sequence[Arch | str]) -> Iterator[CandidateScore]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _parse_all(self, archs: Sequence[Arch | str]) -> list[Arch]:
        out = []
        for i, a in enumerate(archs):
            try:
                out.append(self.model.parse(a))
            except ValueError as e:
                raise ValueError(f"candidate {i}: {e}") from None
        return out

    def _start(self, archs: Sequence[Arch]) -> None:
        total, computed = prefix_sharing(self.model, archs, resolution=self.resolution)
        self.stats = EngineStats(candidates=len(archs), networks=len({a.widths for a in archs}),
                                 macs_per_image_total=total, macs_per_image_computed=computed)

    @contextlib.contextmanager
    def _precision(self):
        """CUDA: TF32 matmul/cuDNN allowed only under ``tf32``; the global flags are restored on exit.

        Entered around each piece of computation, never across a ``yield``, so the caller's code
        between results runs with its own flags."""
        if self.data.device.type != "cuda":
            yield
            return
        mm, cd = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        det, bench = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
        allow = self.precision == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = allow
        torch.backends.cudnn.allow_tf32 = allow
        if getattr(self, "conv_route", "kernel") == "class":
            # one deterministic algorithm per convolution shape (cuDNN's choice by heuristics)
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = mm
            torch.backends.cudnn.allow_tf32 = cd
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = det, bench


def _batches(n: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def _ce_and_correct(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy and whether the top-1 prediction is right; logits (..., N, C).

    In float64, so a row's value does not depend on how many rows are computed with it.
    """
    ld = logits.double()
    ce = F.cross_entropy(ld.reshape(-1, ld.shape[-1]), y.expand(ld.shape[:-1]).reshape(-1), reduction="none")
    correct = logits.argmax(-1) == y
    return ce.view(ld.shape[:-1]), correct


# ----------------------------------------------------------------------------- reference engine
class ReferenceEngine(Engine):
    """One candidate at a time through ``Supernet.forward``: the oracle."""

    name = "reference"

    def __init__(self, *args, eval_batch: int = 500, **kw) -> None:
        super().__init__(*args, **kw)
        self.eval_batch = eval_batch

    @contextlib.contextmanager
    def _recal_mode(self):
        """momentum=None on every BN; the BN buffers, momenta and train flag restored afterwards."""
        convs = self.model.conv_layers()
        saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
                 for m in convs]
        was_training = self.model.training
        try:
            for m in convs:
                m.momentum = None
            yield
        finally:
            with torch.no_grad():
                for m, (mom, rm, rv, nb) in zip(convs, saved):
                    m.momentum = mom
                    m.running_mean.copy_(rm)
                    m.running_var.copy_(rv)
                    m.num_batches_tracked.copy_(nb)
            self.model.train(was_training)

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def recalibrate(self, arch: Arch) -> None:
        """Reset BN statistics and re-estimate them for ``arch`` (call inside ``_recal_mode``)."""
        model = self.model
        model.reset_running_stats()
        model.train()
        x = self.data.recal_x
        with torch.no_grad(), self._autocast():
            for sl in _batches(x.shape[0], self.recal_batch):
                model(x[sl], arch)
        model.eval()

    def _logits(self, arch: Arch, images: torch.Tensor) -> torch.Tensor:
        """Eval-mode logits of ``arch`` after recalibration (float32)."""
        with self._recal_mode(), self._precision():
            self.recalibrate(arch)
            with torch.no_grad(), self._autocast():
                return torch.cat([self.model(images[sl], arch).float()
                                  for sl in _batches(images.shape[0], self.eval_batch)])

    def _score_one(self, arch: Arch) -> tuple[float, float]:
        x, y = self.data.eval_x, self.data.eval_y
        ce_sum = torch.zeros((), dtype=torch.float64, device=x.device)
        correct = torch.zeros((), dtype=torch.int64, device=x.device)
        with self._precision():
            self.recalibrate(arch)
            with torch.no_grad(), self._autocast():
                for sl in _batches(x.shape[0], self.eval_batch):
                    ce, ok = _ce_and_correct(self.model(x[sl], arch), y[sl])
                    ce_sum += ce.sum()
                    correct += ok.sum()
        n = x.shape[0]
        return int(correct) / n, float(ce_sum) / n

    def score(self, archs: Sequence[Arch | str]) -> Iterator[CandidateScore]:
        parsed = self._parse_all(archs)
        self._start(parsed)
        self.stats.macs_per_image_computed = self.stats.macs_per_image_total
        t0 = time.perf_counter()
        with self._recal_mode():
            for i, a in enumerate(parsed):
                acc, loss = self._score_one(a)
                self.stats.seconds = time.perf_counter() - t0
                yield CandidateScore(i, acc, loss)


# ----------------------------------------------------------------------------- fast engine
@dataclass
class _LevelTensors:
    """Device-side constants of one level for one group: BN parameters gathered to its packed channels."""

    gamma: torch.Tensor  # float64, (C,)
    beta: torch.Tensor
    sc_gamma: torch.Tensor | None = None  # shortcut BN of the units with a shortcut conv (packed in their order)
    sc_beta: torch.Tensor | None = None
    sc_channels: torch.Tensor | None = None  # the level channels those shortcut outputs land on (mixed case)
    id_src: torch.Tensor | None = None  # block-input channels copied as identity shortcut
    id_dst: torch.Tensor | None = None  # the level channels they land on
    slope: torch.Tensor | None = None  # the block's PReLU slope (1 element)
    # running statistics being accumulated (sum over batches) and the folded eval scale/shift
    mean_sum: torch.Tensor | None = None
    var_sum: torch.Tensor | None = None
    sc_mean_sum: torch.Tensor | None = None
    sc_var_sum: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    sc_scale: torch.Tensor | None = None
    sc_shift: torch.Tensor | None = None


def _affine(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``y * scale + shift`` per channel, as two rounded steps (no FMA), in place on ``y`` when float32.

    Two separately rounded elementwise ops give every element the same result wherever it
    sits in the packed tensor; a fused multiply-add on the vector body and a plain one on the
    tail would not.
    """
    y = y.float() if y.dtype != torch.float32 else y
    return y.mul_(scale.view(1, -1, 1, 1)).add_(shift.view(1, -1, 1, 1))


#: How the fast engine runs a level's convolutions: ``kernel``, one multi-candidate kernel call
#: (``multi_conv2d``) per level, the compiled kernel of the precision where built (Triton for
#: bf16, and for tf32 without the CUDA tensor-core kernel); ``triton``, the same calls on the
#: Triton kernel at every precision (fp32 exact, tf32, bf16; on CPU only under
#: ``TRITON_INTERPRET=1``, for tests); ``triton_tf32x3`` (fp32 only), the same with each fp32
#: product as three TF32 tensor-core products (Triton's ``tf32x3``: errors near fp32's, at
#: tensor-core speed); ``class``, one ``F.conv2d`` (cuDNN, oneDNN) per chunk of a width class
#: (an experiment for the GPU: ``benchmarks/gpu_class_conv.py``).
CONV_ROUTES = ("kernel", "triton", "triton_tf32x3", "class")
#: Units per ``F.conv2d`` call of the ``class`` route (a short chunk is padded to this many).
CLASS_CHUNK = 4


def check_conv_route(engine: str, route: str, precision: str, device: torch.device | str) -> None:
    """``ValueError`` saying why ``route`` (:data:`CONV_ROUTES`) cannot run ``engine`` at
    ``precision`` on ``device``; nothing when it can."""
    if route not in CONV_ROUTES:
        raise ValueError(f"conv_route must be one of {', '.join(CONV_ROUTES)}, got {route!r}")
    if route == "kernel":
        return
    if engine != "fast":
        raise ValueError(f"conv_route {route!r} is an option of the fast engine, not of {engine!r}")
    if route == "class" and precision == "bf16":
        raise ValueError("conv_route 'class' runs fp32 or tf32 convolutions; precision 'bf16' needs 'kernel'")
    if route == "triton_tf32x3" and precision != "fp32":
        raise ValueError(f"conv_route 'triton_tf32x3' computes fp32 convolutions; precision {precision!r} "
                         "needs 'kernel' or 'triton'")
    if route in ("triton", "triton_tf32x3"):
        if not _triton_installed():
            raise ValueError(f"conv_route {route!r} needs triton (pip install triton)")
        from ..ops import triton_conv

        if torch.device(device).type == "cpu" and not triton_conv._interpreted():
            raise ValueError(f"conv_route {route!r} on CPU needs TRITON_INTERPRET=1 set before triton is imported "
                             "(the interpreter, for tests); on CUDA it runs compiled")


def _ranges(starts: Sequence[int], lengths: Sequence[int]) -> list[int]:
    return [s + j for s, n in zip(starts, lengths) for j in range(n)]


class FastEngine(Engine):
    """Prefix tree, level-wide multi-candidate convolutions, fused BN; see the module docstring."""

    name = "fast"

    def __init__(self, *args, eval_batch: int | None = None, conv_route: str = "kernel",
                 class_chunk: int = CLASS_CHUNK, **kw) -> None:
        super().__init__(*args, **kw)
        self.eval_batch = eval_batch or self.recal_batch
        dev = self.data.device
        check_conv_route("fast", conv_route, self.precision, dev)
        if not isinstance(class_chunk, int) or isinstance(class_chunk, bool) or class_chunk < 1:
            raise ValueError(f"class_chunk must be an int >= 1, got {class_chunk!r}")
        self.conv_route = conv_route
        self.class_chunk = class_chunk
        self._class_plans: dict[tuple, list] = {}
        self._mods = tree.layer_modules(self.model)
        self._sizes = tree.spatial_sizes(self.model, self.resolution)
        self._act_dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        # tf32: the CUDA tensor-core kernel (multi_conv2d_tf32) where built, else Triton's tf32 dot; bf16: Triton
        # (the kernel's mma.sync needs sm_80 or newer: older cards take the Triton route)
        self._tf32_cuda = (dev.type == "cuda" and self.precision == "tf32" and has_kernel("multi_conv2d_tf32", "CUDA")
                           and torch.cuda.get_device_capability(dev)[0] >= 8)
        self._triton = dev.type == "cuda" and self.precision in ("tf32", "bf16") and not self._tf32_cuda
        if self.conv_route == "class":  # F.conv2d under the precision's TF32 setting, NCHW
            self._tf32_cuda = self._triton = False
        if self.conv_route in ("triton", "triton_tf32x3"):
            self._tf32_cuda, self._triton = False, True
        # Weights in the dtype of the activations (bf16 copies are made once per engine, not per
        # candidate), in their layout: channels_last for the Triton kernel (input channels
        # contiguous, so that 4 of them load as one vector), (R, C, k, k) for the compiled ones.
        self._weights: dict[int, torch.Tensor] = {}
        for conv, sc in self._mods:
            for m in (conv, sc):
                if m is not None:
                    self._weights[id(m)] = m.weight.detach().to(self._act_dtype).contiguous(
                        memory_format=self._act_format)
        self._fused_light = dev.type == "cuda" and _triton_installed()
        # the compiled one-pass CPU version (float32 activations; bf16 runs the torch ops)
        self._compiled_light = (dev.type == "cpu" and self._act_dtype == torch.float32
                                and ops.resolve_backend(dev, None, "multi_conv2d") == "cpp"
                                and has_kernel("bn_act", "CPU"))
        if self.memory_limit_bytes is None:
            if dev.type == "cuda":
                free, _ = torch.cuda.mem_get_info(dev)
                self.memory_limit_bytes = int(free * DEFAULT_GPU_MEMORY_FRACTION)
            else:
                self.memory_limit_bytes = DEFAULT_CPU_MEMORY_BYTES
        if self.memory_limit_bytes <= 0:
            raise ValueError(f"memory_limit_bytes must be positive, got {self.memory_limit_bytes}")

    # ------------------------------------------------------------------ grouping by memory
    def _bytes_per_image(self, channels: Sequence[int]) -> int:
        """Working bytes per image of a group whose levels have ``channels`` packed channels.

        At level d the live tensors are the block input (d-2), the conv input (d-1), the level's
        conv and shortcut outputs, the residual and the kernels' temporaries; counted generously:
        2 x A(d-2) + 2 x A(d-1) + 5 x A(d) elements, A = channels x height x width.
        """
        elt = torch.finfo(self._act_dtype).bits // 8
        area = [c * s * s for c, s in zip(channels, self._sizes)]
        img = self.model.in_channels * self.resolution**2
        worst = 0
        for d, a in enumerate(area):
            prev = area[d - 1] if d >= 1 else img
            prev2 = area[d - 2] if d >= 2 else img
            worst = max(worst, 2 * prev2 + 2 * prev + 5 * a)
        return elt * worst + 4 * img

    def _fits(self, channels: Sequence[int], n_img: int) -> bool:
        """Working memory under the limit, and every packed level below 2**31 elements (the
        kernels index a tensor with 32-bit offsets)."""
        largest = max(c * s * s for c, s in zip(channels, self._sizes))
        return n_img * self._bytes_per_image(channels) <= self.memory_limit_bytes and n_img * largest < 2**31

    def _groups(self, networks: Sequence[tuple[int, ...]]) -> list[list[int]]:
        """Consecutive runs of the sorted networks whose working memory fits the limit."""
        n_img = max(self.recal_batch, self.eval_batch)
        remap = self.model.config.remap
        depth = len(self._mods)
        groups: list[list[int]] = []
        channels = [0] * depth
        cur: list[int] = []
        prev = None
        for j, net in enumerate(networks):
            run = [remap(w) for w in net]
            lcp = tree._lcp(prev, net) if cur else 0
            trial = channels[:lcp] + [c + r for c, r in zip(channels[lcp:], run[lcp:])]
            if cur and not self._fits(trial, n_img):
                groups.append(cur)
                cur, channels = [], [0] * depth
                trial = list(run)
            if not cur and not self._fits(trial, n_img):
                need = n_img * self._bytes_per_image(trial)
                raise ValueError(
                    f"memory_limit_bytes={self.memory_limit_bytes} is too small for one network "
                    f"{'-'.join(map(str, net))} at {n_img} images per batch (needs about {need} bytes)"
                )
            cur.append(j)
            channels = trial
            prev = net
        if cur:
            groups.append(cur)
        return groups

    # ------------------------------------------------------------------ one conv call
    def _conv(self, x, weight, in_offsets, in_widths, out_widths, rows, stride, padding, *, scale=None, shift=None,
              residual=None, activation="none", slope=None, stats=False):
        if self.conv_route == "class":
            return self._conv_by_class(x, weight, in_offsets, in_widths, out_widths, rows, stride, padding,
                                       scale=scale, shift=shift, residual=residual, activation=activation,
                                       slope=slope, stats=stats)
        if self._tf32_cuda:
            out, s, q = torch.ops.fastsupernet.multi_conv2d_tf32(
                x, weight, in_offsets, in_widths, out_widths, rows, stride, padding, scale, shift, residual, activation,
                slope, stats)
            return (out, s, q) if stats else out
        if self._triton:
            from ..ops.triton_conv import multi_conv2d_triton

            out, s, q = multi_conv2d_triton(
                x, weight, in_offsets, in_widths, out_widths, rows, stride, padding, scale, shift, residual,
                activation, slope, stats, input_precision=self._triton_input_precision(),
            )
            # the kernel keeps channels_last from x, except from a 1-channel image (ambiguous strides)
            out = out.contiguous(memory_format=torch.channels_last)
            return (out, s, q) if stats else out
        return ops.multi_conv2d(x, weight, in_offsets, in_widths, out_widths, rows, stride=stride, padding=padding,
                                scale=scale, shift=shift, residual=residual, activation=activation,
                                prelu_slope=slope, stats=stats)

    @property
    def _act_format(self) -> torch.memory_format:
        """The layout of the activations (and weights): channels_last for the Triton kernels,
        whose loads then run along the channels; NCHW for the compiled kernels."""
        return torch.channels_last if self._triton else torch.contiguous_format

    def _triton_input_precision(self) -> str:
        """The Triton dot's input precision for float32 operands (bfloat16 ones ignore it)."""
        if self.precision == "tf32":
            return "tf32"
        return "tf32x3" if self.conv_route == "triton_tf32x3" else "ieee"

    def _class_plan(self, weight, in_offsets, in_widths, out_widths, rows):
        """The level's width classes (input width, output width, weight rows), in order of first
        unit: a list of (a, o, weight slice, units), and the input and output channel indices of
        all units in that class order."""
        key = (weight.data_ptr(), tuple(in_offsets), tuple(in_widths), tuple(out_widths), tuple(rows))
        plan = self._class_plans.get(key)
        if plan is not None:
            return plan
        out_offsets = [0]
        for o in out_widths[:-1]:
            out_offsets.append(out_offsets[-1] + o)
        classes: dict[tuple[int, int, int], list[int]] = {}
        for k, cls in enumerate(zip(in_widths, out_widths, rows)):
            classes.setdefault(cls, []).append(k)
        listed, idx_in, idx_out = [], [], []
        for (a, o, r), units in classes.items():
            idx_in += _ranges([in_offsets[k] for k in units], [a] * len(units))
            idx_out += _ranges([out_offsets[k] for k in units], [o] * len(units))
            listed.append((a, o, weight[r : r + o, :a].contiguous(), len(units)))
        dev = weight.device
        plan = (listed, torch.tensor(idx_in, device=dev), torch.tensor(idx_out, device=dev))
        self._class_plans[key] = plan
        return plan

    def _conv_by_class(self, x, weight, in_offsets, in_widths, out_widths, rows, stride, padding, *, scale, shift,
                       residual, activation, slope, stats):
        """``_conv`` by width classes: the units of a class apply one weight slice to their own
        inputs, so the class is a convolution of its units' gathered channel slices as one batch
        of units x N images, run in chunks of ``class_chunk`` units (the last one padded with
        zeros: every call of a class has one shape, hence one algorithm, and a unit's numbers do
        not depend on the others) and scattered back into the packed layout; then the level's
        statistics in float64 (``channel_stats``) or its BN/residual/activation pass. One gather
        and one scatter per level; per class a copy into its (padded) batch, per chunk a conv and
        a copy of its units' outputs."""
        n, _, h, w = x.shape
        ho, wo = _out_hw(h, w, weight.shape[2], stride, padding)
        p_in, p_out = h * w, ho * wo
        ch = self.class_chunk
        classes, idx_in, idx_out = self._class_plan(weight, in_offsets, in_widths, out_widths, rows)
        gathered = x.index_select(1, idx_in)  # (n, sum g a, h, w), class order
        c_out = idx_out.numel()
        by_class = x.new_empty((n, c_out, p_out))  # outputs in class order
        batch_len = sum(-(-g // ch) * ch * a for a, _, _, g in classes)
        batches = x.new_empty((batch_len * n * p_in,))
        gi = go = bi = 0
        for a, o, wk, g in classes:
            chunks = -(-g // ch)
            batch = batches[bi * n * p_in : (bi + chunks * ch * a) * n * p_in].view(chunks * ch, n, a, h, w)
            batch[:g].copy_(gathered[:, gi : gi + g * a].view(n, g, a, h, w).transpose(0, 1))
            if chunks * ch > g:
                batch[g:].zero_()
            for c in range(chunks):
                y = F.conv2d(batch[c * ch : (c + 1) * ch].view(ch * n, a, h, w), wk, stride=stride, padding=padding)
                real = min(ch, g - c * ch)
                dst = by_class[:, go + c * ch * o : go + (c * ch + real) * o].view(n, real, o, p_out)
                dst.copy_(y.view(ch, n, o, p_out)[:real].transpose(0, 1))
            gi, go, bi = gi + g * a, go + g * o, bi + chunks * ch * a
        out = x.new_empty((n, c_out, ho, wo))
        out.view(n, c_out, p_out).index_copy_(1, idx_out, by_class)
        if stats:
            s, q = ops.channel_stats(out)
            return out, s, q
        if scale is None and residual is None and activation == "none":
            return out
        return self._light(out, scale, shift, residual, None, None, activation,
                           slope[:1] if slope is not None else None)

    # ------------------------------------------------------------------ per-group constants
    def _level_tensors(self, plan: tree.TreePlan) -> list[_LevelTensors]:
        dev = self.data.device
        out = []
        for d, lv in enumerate(plan.levels):
            conv, sc = self._mods[d]
            idx = torch.tensor(_ranges(lv.rows, lv.run), device=dev)
            t = _LevelTensors(gamma=conv.bn_weight.detach()[idx].double(), beta=conv.bn_bias.detach()[idx].double())
            c = lv.channels
            t.mean_sum = torch.zeros(c, dtype=torch.float64, device=dev)
            t.var_sum = torch.zeros(c, dtype=torch.float64, device=dev)
            if sc is not None:
                use = lv.shortcut_conv
                k_sc = [i for i, u in enumerate(use) if u]
                if k_sc:
                    sidx = torch.tensor(_ranges([lv.shortcut_rows[i] for i in k_sc], [lv.run[i] for i in k_sc]),
                                        device=dev)
                    t.sc_gamma = sc.bn_weight.detach()[sidx].double()
                    t.sc_beta = sc.bn_bias.detach()[sidx].double()
                    t.sc_mean_sum = torch.zeros_like(t.sc_gamma)
                    t.sc_var_sum = torch.zeros_like(t.sc_gamma)
                    if len(k_sc) < len(use):
                        t.sc_channels = torch.tensor(_ranges([lv.offsets[i] for i in k_sc], [lv.run[i] for i in k_sc]),
                                                     device=dev)
                if len(k_sc) < len(use):
                    ids = [i for i, u in enumerate(use) if not u]
                    src_level = plan.levels[d - 2]
                    t.id_src = torch.tensor(_ranges([src_level.offsets[lv.block_in[i]] for i in ids],
                                                    [lv.run[i] for i in ids]), device=dev)
                    t.id_dst = torch.tensor(_ranges([lv.offsets[i] for i in ids], [lv.run[i] for i in ids]), device=dev)
                blk = self._block_of(d)
                if hasattr(blk, "prelu"):
                    t.slope = blk.prelu.detach().float().reshape(1)
            out.append(t)
        return out

    def _block_of(self, d: int):
        conv, _ = self._mods[d]
        L = conv.layer
        return self.model.stages[L.stage][L.block]

    # ------------------------------------------------------------------ the level-wise forward
    def _inputs(self, plan: tree.TreePlan, d: int) -> tuple[list[int], list[int]]:
        lv = plan.levels[d]
        if d == 0:
            return [0] * len(lv.run), lv.in_width
        prev = plan.levels[d - 1]
        return [prev.offsets[p] for p in lv.parent], lv.in_width

    def _shortcut_inputs(self, plan: tree.TreePlan, d: int, units: Sequence[int]) -> tuple[list[int], list[int]]:
        lv, src = plan.levels[d], plan.levels[d - 2]
        return [src.offsets[lv.block_in[i]] for i in units], [lv.block_in_width[i] for i in units]

    def _forward(self, plan: tree.TreePlan, meta: list, consts: list[_LevelTensors], x: torch.Tensor,
                 recal: bool) -> torch.Tensor:
        """The last level's packed activation of the images ``x``.

        recal: train-mode BN from each call's statistics (accumulated into ``consts``); else the
        folded eval BN in the epilogue.
        """
        x = x.to(self._act_dtype)
        if self._triton:  # the Triton kernels' fast layout; every later activation keeps it
            x = x.contiguous(memory_format=self._act_format)
        acts: dict[int, torch.Tensor] = {-1: x}
        eps = self.model.config.bn_eps
        for d, lv in enumerate(plan.levels):
            conv, sc = self._mods[d]
            L = conv.layer
            t = consts[d]
            io, iw, sc_units, sio, siw, sc_rows, sc_out, slope_k = meta[d]
            inp = acts[d - 1]
            block_in = acts.get(d - 2) if d >= 2 else acts[-1]
            act = "relu"
            if sc is not None and t.slope is not None:
                act = "prelu"
            w = self._weights[id(conv)]
            if recal:
                y, s, q = self._conv(inp, w, io, iw, lv.run, lv.rows, L.stride, L.kernel // 2, stats=True)
                n = y.shape[0] * y.shape[2] * y.shape[3]
                scale, shift = self._batch_bn(s, q, n, t.gamma, t.beta, t, "", eps)
                r = r_scale = r_shift = None
                if sc is not None:
                    r, r_scale, r_shift = self._shortcut(block_in, lv, t, sc, meta[d], eps, recal=True)
                y = self._light(y, scale, shift, r, r_scale, r_shift, act, t.slope)
            else:
                residual = None
                if sc is not None:
                    residual, _, _ = self._shortcut(block_in, lv, t, sc, meta[d], eps, recal=False)
                y = self._conv(inp, w, io, iw, lv.run, lv.rows, L.stride, L.kernel // 2, scale=t.scale,
                               shift=t.shift, residual=residual, activation=act, slope=slope_k)
            acts[d] = y
            acts.pop(d - 3, None)
        return acts[len(plan.levels) - 1]

    def _light(self, y, scale, shift, r, r_scale, r_shift, act: str, slope) -> torch.Tensor:
        """Recalibration: ``act(y * scale + shift + residual)``, the residual with its own BN when
        ``r_scale`` is given; one pass (Triton on CUDA, compiled on CPU) or separately rounded
        torch ops, every product and sum rounded on its own in all three."""
        if self._fused_light:
            from .triton_bn import bn_act

            return bn_act(y, scale, shift, r, r_scale, r_shift, act, slope)
        if (self._compiled_light and y.dtype == torch.float32 and y.is_contiguous()
                and (r is None or r.dtype == torch.float32)):
            return torch.ops.fastsupernet.bn_act(y, scale, shift, r, r_scale, r_shift, act,
                                                 slope if act == "prelu" else None)
        y = _affine(y, scale, shift)
        if r is not None:
            y.add_(_affine(r, r_scale, r_shift) if r_scale is not None else r.float())
        y = y.relu_() if act == "relu" else ops.apply_activation(y, act, slope)
        return y.to(self._act_dtype)

    def _batch_bn(self, s, q, n, gamma, beta, t: _LevelTensors, which: str, eps: float):
        """Scale/shift normalising with this batch's statistics; adds them to the running sums."""
        mean = s / n
        var = (q / n - mean * mean).clamp_min_(0.0)
        getattr(t, f"{which}mean_sum").add_(mean)
        getattr(t, f"{which}var_sum").add_(var * (n / (n - 1)) if n > 1 else var)
        scale = gamma / torch.sqrt(var + eps)  # correctly rounded (rsqrt is not): position-independent
        shift = beta - mean * scale
        return scale.float(), shift.float()

    def _shortcut(self, block_in, lv, t: _LevelTensors, sc, meta_d, eps: float, recal: bool):
        """The level's shortcut as ``(r, r_scale, r_shift)``.

        recal: when every node has a shortcut conv, its raw output and the scale/shift of its
        batch statistics (applied in the light pass); otherwise the finished residual (BN applied,
        identities copied) and ``None``s. eval: the folded shortcut, ready as the conv's residual.
        """
        _, _, sc_units, sio, siw, sc_rows, sc_out, _ = meta_d
        L = sc.layer
        w = self._weights[id(sc)]
        r = scale = shift = None
        if sc_units:
            if recal:
                r, s, q = self._conv(block_in, w, sio, siw, sc_out, sc_rows, L.stride, 0, stats=True)
                n = r.shape[0] * r.shape[2] * r.shape[3]
                scale, shift = self._batch_bn(s, q, n, t.sc_gamma, t.sc_beta, t, "sc_", eps)
                if t.id_src is None:
                    return r, scale, shift
                r, scale, shift = _affine(r, scale, shift), None, None
            else:
                r = self._conv(block_in, w, sio, siw, sc_out, sc_rows, L.stride, 0, scale=t.sc_scale,
                               shift=t.sc_shift)
        # in the activations' layout (channels_last for the Triton kernels: their residual loads
        # are then vectors along the channels, and the recalibration pass copies nothing)
        fmt = self._act_format
        if t.id_src is not None:  # some (or all) units keep an identity shortcut
            full = torch.empty((block_in.shape[0], lv.channels, *block_in.shape[2:]), dtype=block_in.dtype,
                               device=block_in.device, memory_format=fmt).zero_()
            full.index_copy_(1, t.id_dst, block_in.index_select(1, t.id_src))
            if r is not None:
                full.index_copy_(1, t.sc_channels, r.to(full.dtype))
            r = full
        return r.to(self._act_dtype).contiguous(memory_format=fmt), None, None

    def _meta(self, plan: tree.TreePlan) -> list:
        meta = []
        for d, lv in enumerate(plan.levels):
            io, iw = self._inputs(plan, d)
            _, sc = self._mods[d]
            sc_units, sio, siw, sc_rows, sc_out, slope_k = [], [], [], [], [], None
            if sc is not None:
                sc_units = [i for i, u in enumerate(lv.shortcut_conv) if u]
                sio, siw = self._shortcut_inputs(plan, d, sc_units)
                sc_rows = [lv.shortcut_rows[i] for i in sc_units]
                sc_out = [lv.run[i] for i in sc_units]
            meta.append((io, iw, sc_units, sio, siw, sc_rows, sc_out, slope_k))
        return meta

    # ------------------------------------------------------------------ one group
    def _recalibrate(self, plan: tree.TreePlan, meta: list) -> list[_LevelTensors]:
        consts = self._level_tensors(plan)
        x = self.data.recal_x
        batches = _batches(x.shape[0], self.recal_batch)
        for sl in batches:
            self._forward(plan, meta, consts, x[sl], recal=True)
        nb = len(batches)
        eps = self.model.config.bn_eps
        fold_dtype = torch.float32
        for d, t in enumerate(consts):
            rm, rv = t.mean_sum / nb, t.var_sum / nb
            scale = t.gamma / torch.sqrt(rv + eps)
            t.scale, t.shift = scale.to(fold_dtype), (t.beta - rm * scale).to(fold_dtype)
            if t.sc_mean_sum is not None:
                rm, rv = t.sc_mean_sum / nb, t.sc_var_sum / nb
                scale = t.sc_gamma / torch.sqrt(rv + eps)
                t.sc_scale, t.sc_shift = scale.to(fold_dtype), (t.sc_beta - rm * scale).to(fold_dtype)
            if t.slope is not None:
                k = len(plan.levels[d].run)
                meta[d] = meta[d][:7] + (t.slope.expand(k).contiguous(),)
        return consts

    def _classifier(self, plan: tree.TreePlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per network: padded feature index into the pooled last level, weight (L, classes, F), bias (L, classes)."""
        dev = self.data.device
        last = plan.levels[-1]
        f = max(plan.leaf_width)
        sentinel = last.channels  # a zero column appended to the pooled features
        feat_idx = []
        for leaf, r in zip(plan.leaf_of, plan.leaf_width):
            feat_idx.append([last.offsets[leaf] + c for c in range(r)] + [sentinel] * (f - r))
        feat_idx_t = torch.tensor(feat_idx, device=dev)
        W = self.model.classifier_weight.detach()
        b = self.model.classifier_bias.detach()
        k = self.model.num_classes
        rows = torch.tensor(plan.classifier_rows, device=dev)
        row_idx = rows.view(-1, 1) + torch.arange(k, device=dev).view(1, -1)  # (L, classes)
        weights = W[row_idx]  # (L, classes, W.cols)
        if weights.shape[-1] < f:
            weights = F.pad(weights, (0, f - weights.shape[-1]))
        weights = weights[..., :f].clone()
        widths = torch.tensor(plan.leaf_width, device=dev)
        weights.masked_fill_(torch.arange(f, device=dev).view(1, 1, -1) >= widths.view(-1, 1, 1), 0.0)
        return feat_idx_t, weights.double(), b[row_idx].double()

    def _eval_logits(self, plan, meta, consts, cls, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode logits (networks, images, classes), float32."""
        h = self._forward(plan, meta, consts, x, recal=False)
        # float64 pooling and classifier: a network's logits do not depend on its place in the batch
        pooled = h.double().mean(dim=(2, 3))
        pooled = torch.cat([pooled, pooled.new_zeros(pooled.shape[0], 1)], 1)
        feat_idx, weights, bias = cls
        feats = pooled[:, feat_idx].transpose(0, 1)  # (L, N, F)
        return torch.baddbmm(bias.unsqueeze(1), feats, weights.transpose(1, 2)).float()

    def _run_group(self, networks: Sequence[tuple[int, ...]]):
        """(plan, eval meta, folded constants, classifier) of one group after recalibration."""
        plan = tree.build_plan(self.model, networks)
        self._class_plans.clear()  # the previous group's
        meta = self._meta(plan)
        consts = self._recalibrate(plan, meta)
        return plan, meta, consts, self._classifier(plan)

    def _logits(self, archs: Sequence[Arch | str], images: torch.Tensor) -> torch.Tensor:
        """Eval-mode logits (candidates, images, classes) of ``archs`` run as one group (tests)."""
        parsed = self._parse_all(archs)
        nets = sorted({a.widths for a in parsed})
        with torch.no_grad(), self._precision():
            plan, meta, consts, cls = self._run_group(nets)
            out = torch.cat([self._eval_logits(plan, meta, consts, cls, images[sl])
                             for sl in _batches(images.shape[0], self.eval_batch)], 1)
        pos = {n: j for j, n in enumerate(nets)}
        return out[[pos[a.widths] for a in parsed]]

    def candidate_groups(self, archs: Sequence[Arch | str]) -> list[list[int]]:
        """The indices into ``archs`` that ``score`` computes together, group by group, in the
        order it yields them (results of a group arrive together once the group is done)."""
        nets, members = tree._sorted_networks(self.model, self._parse_all(archs))
        return [[i for j in g for i in members[j]] for g in self._groups(nets)]

    def score(self, archs: Sequence[Arch | str]) -> Iterator[CandidateScore]:
        parsed = self._parse_all(archs)
        self._start(parsed)
        t0 = time.perf_counter()
        nets, members = tree._sorted_networks(self.model, parsed)
        groups = self._groups(nets)
        self.stats.groups = len(groups)
        # what is really computed: prefixes are shared within a group, not across groups
        self.stats.macs_per_image_computed = sum(
            tree.network_macs(self.model, [nets[j] for j in g], resolution=self.resolution)[1] for g in groups)
        x, y = self.data.eval_x, self.data.eval_y
        n = x.shape[0]
        for g in groups:
            group_nets = [nets[j] for j in g]
            with torch.no_grad(), self._precision():
                plan, meta, consts, cls = self._run_group(group_nets)
                ce_sum = torch.zeros(len(g), dtype=torch.float64, device=x.device)
                correct = torch.zeros(len(g), dtype=torch.int64, device=x.device)
                for sl in _batches(n, self.eval_batch):
                    ce, ok = _ce_and_correct(self._eval_logits(plan, meta, consts, cls, x[sl]), y[sl])
                    ce_sum += ce.sum(1)
                    correct += ok.sum(1)
                ce_list, ok_list = ce_sum.tolist(), correct.tolist()
            self.stats.seconds = time.perf_counter() - t0
            for j, ce_j, ok_j in zip(g, ce_list, ok_list):
                for i in members[j]:
                    yield CandidateScore(i, ok_j / n, ce_j / n)


# ----------------------------------------------------------------------------- factory
def make_engine(name: str, model: Supernet, data: RankData, *, precision: str = "fp32",
                memory_limit_bytes: int | None = None, conv_route: str = "kernel") -> Engine:
    """An engine by name (:data:`ENGINES`) for ``model`` on ``data``'s device.

    The model is moved to the data's device (``nn.Module.to``, in place). The recalibration
    batch size is ``data.recal_batch`` (the protocol's, set by :func:`prepare_data`).
    ``memory_limit_bytes`` bounds the fast engine's working memory (default: half the free GPU
    memory, or 1 GiB on CPU); the reference engine needs one batch at a time and ignores it.
    ``conv_route`` (fast engine, :data:`CONV_ROUTES`): ``kernel`` (default), ``triton`` (the
    Triton kernel at every precision), ``triton_tf32x3`` (fp32 on the tensor cores, three TF32
    products each) or the ``class`` experiment (one ``F.conv2d`` per chunk of a width class;
    fp32 and tf32).
    """
    if name not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {name!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    check_conv_route(name, conv_route, precision, data.device)
    model.to(data.device)
    if name == "fast":
        return FastEngine(model, data, precision, memory_limit_bytes, conv_route=conv_route)
    return ReferenceEngine(model, data, precision, memory_limit_bytes)
