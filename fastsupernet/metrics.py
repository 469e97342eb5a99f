"""Rank-correlation metrics between predicted and ground-truth accuracies.

The challenge scores a submission by Kendall's tau between predicted and true accuracies;
Spearman, Pearson and the top-k overlap are reported alongside. Correlations of a constant
input are undefined and come back as NaN (``None`` in :meth:`Evaluation.to_json_dict`).
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats

from .io import Score

__all__ = [
    "kendall_tau",
    "spearman",
    "pearson",
    "top_k_overlap",
    "id_sort_key",
    "Evaluation",
    "evaluate",
    "PROXIES",
    "proxy_scores",
]

PROXIES = ("channels", "params", "macs")



def _pair(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(x, dtype=np.float64).ravel()
    b = np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"x and y differ in length: {a.size} vs {b.size}")
    if a.size < 2:
        raise ValueError(f"need at least 2 pairs, got {a.size}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("x and y must be finite")
    return a, b


def _stat(fn: Any, a: np.ndarray, b: np.ndarray, **kw: Any) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan  # undefined for a constant input
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(a, b, **kw).statistic)


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (ties in either input corrected for), as ``scipy.stats.kendalltau``."""
    a, b = _pair(x, y)
    return _stat(stats.kendalltau, a, b, variant="b")


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (ties get average ranks)."""
    a, b = _pair(x, y)
    return _stat(stats.spearmanr, a, b)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's linear correlation."""
    a, b = _pair(x, y)
    return _stat(stats.pearsonr, a, b)


_DIGITS = re.compile(r"(\d+)")


def id_sort_key(key: str) -> tuple:
    """Natural order of ids: digit runs compare as numbers, so ``arch9`` < ``arch10``."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in _DIGITS.split(key) if t)


def _value(v: Any) -> float:
    return float(v.acc) if isinstance(v, Score) else float(v)


def _top(scores: Mapping[str, float], ids: Sequence[str], k: int) -> list[str]:
    return sorted(ids, key=lambda i: (-scores[i], id_sort_key(i)))[:k]


def top_k_overlap(pred: Mapping[str, float | Score], gt: Mapping[str, float | Score], k: int = 10) -> float:
    """Fraction of the ``k`` best ids by ``gt`` that are also among the ``k`` best by ``pred``.

    Only ids present in both mappings take part; higher is better in both. Ties are broken by
    id in natural order (see :func:`id_sort_key`: the earlier id ranks higher), so the result is
    deterministic. ``k`` is capped at the number of common ids.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ids = [i for i in gt if i in pred]
    if not ids:
        raise ValueError("pred and gt have no id in common")
    k = min(k, len(ids))
    p = {i: _value(pred[i]) for i in ids}
    g = {i: _value(gt[i]) for i in ids}
    return len(set(_top(p, ids, k)) & set(_top(g, ids, k))) / k


@dataclass(frozen=True)
class Evaluation:
    """Agreement of a prediction with the ground truth over the ids both hold with the same arch.

    ``missing``: ground-truth ids absent from the prediction; ``mismatched``: ids in both whose
    architecture strings differ (excluded from the scores). Both in ground-truth order.
    ``top10_overlap`` is at k = 10; ``top_k_overlap`` at the requested ``k``.
    """

    n: int
    missing: tuple[str, ...]
    mismatched: tuple[str, ...]
    kendall_tau: float
    spearman: float
    pearson: float
    top10_overlap: float
    k: int = 10
    top_k_overlap: float = math.nan

    def to_json_dict(self) -> dict[str, Any]:
        """The summary the CLI prints (NaN as ``None``; counts for ``missing``/``mismatched``).

        Keys: ``kendall_tau``, ``spearman``, ``pearson``, ``top10_overlap``, ``n``, ``missing``,
        ``mismatched``; plus ``top{k}_overlap`` when ``k`` is not 10.
        """

        def num(x: float) -> float | None:
            return None if math.isnan(x) else x

        d: dict[str, Any] = {
            "kendall_tau": num(self.kendall_tau),
            "spearman": num(self.spearman),
            "pearson": num(self.pearson),
            "top10_overlap": self.top10_overlap,
            "n": self.n,
            "missing": len(self.missing),
            "mismatched": len(self.mismatched),
        }
        if self.k != 10:
            d[f"top{self.k}_overlap"] = self.top_k_overlap
        return d


def evaluate(pred: Mapping[str, Score], gt: Mapping[str, Score], k: int = 10) -> Evaluation:
    """Score ``pred`` against ``gt`` on the ids both hold whose canonical arch strings agree.

    Raises ``ValueError`` when fewer than 2 ids qualify.
    """
    missing: list[str] = []
    mismatched: list[str] = []
    ids: list[str] = []
    for i, g in gt.items():
        p = pred.get(i)
        if p is None:
            missing.append(i)
        elif str(p.arch) != str(g.arch):
            mismatched.append(i)
        else:
            ids.append(i)
    if len(ids) < 2:
        raise ValueError(
            f"only {len(ids)} id(s) are in both prediction and ground truth with the same architecture "
            f"({len(missing)} missing, {len(mismatched)} mismatched); need at least 2"
        )
    x = [pred[i].acc for i in ids]
    y = [gt[i].acc for i in ids]
    sub_p = {i: pred[i].acc for i in ids}
    sub_g = {i: gt[i].acc for i in ids}
    return Evaluation(
        n=len(ids),
        missing=tuple(missing),
        mismatched=tuple(mismatched),
        kendall_tau=kendall_tau(x, y),
        spearman=spearman(x, y),
        pearson=pearson(x, y),
        top10_overlap=top_k_overlap(sub_p, sub_g, 10),
        k=k,
        top_k_overlap=top_k_overlap(sub_p, sub_g, k),
    )


def proxy_scores(
    archs: Sequence[Any],
    by: str,
    space: Any = None,
    **shape: Any,
) -> np.ndarray:
    """Zero-training predictor of each architecture's accuracy: the bigger, the better.

    ``channels``: sum of the network widths; ``params`` / ``macs``: the static network's
    parameter count / multiply-adds (``shape`` passes resolution, in_channels, num_classes,
    shortcut to :meth:`ChannelSpace.costs`). These are the baselines a supernet must beat.
    """
    from .space import Track1Space

    space = space if space is not None else Track1Space()
    if by not in PROXIES:
        raise ValueError(f"unknown proxy {by!r}; known: {list(PROXIES)}")
    if by == "channels":
        return np.array([sum(space.parse(a).widths) for a in archs], dtype=np.float64)
    macs, params = space.costs(archs, **shape)
    return (macs if by == "macs" else params).astype(np.float64)
