"""Tiny training configs on a synthetic 8x8 data set, for the training tests (fast on 2 CPU cores)."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np


def make_tiny_data(folder: Path, *, train: int = 192, test: int = 64, size: int = 8, seed: int = 0) -> str:
    """An ``npz:`` data spec of grayscale ``size``x``size`` images whose class sets a bright block."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 4, n)
        images = rng.integers(0, 90, (n, size, size)).astype(np.uint8)
        half = size // 2
        for i, c in enumerate(labels):
            r, q = divmod(int(c), 2)
            images[i, r * half : (r + 1) * half, q * half : (q + 1) * half] += 120
        return images, labels.astype(np.int64)

    tr, te = split(train), split(test)
    path = Path(folder) / "tiny.npz"
    np.savez(path, train_images=tr[0], train_labels=tr[1], test_images=te[0], test_labels=te[1], num_classes=np.int64(4))
    return f"npz:{path}"


TINY_STAGES = [
    {
        "name": "largest",
        "supernet": {"branches": [1, 1, 1], "enhanced": True},
        "epochs": 1,
        "max_steps": 3,
        "batch_size": 16,
        "optimizer": {"lr": 0.05},
        "sampling": {"rule": "largest"},
        "augment": {"pad": 1},
    },
    {
        "name": "multi",
        "init": "previous",
        "supernet": {"branches": [2, 2, 2], "classifier_branches": 2, "enhanced": True},
        "epochs": 2,
        "max_steps": 10,
        "batch_size": 16,
        "optimizer": {"lr": 0.02, "nesterov": True},
        "schedule": {"warmup_steps": 2},
        "sampling": {"rule": "sandwich", "paths": 3},
        "loss": {"kind": "distill", "teacher": "frozen", "alpha": 0.3, "temperature": 2.0},
        "max_recover": {"probes": 2},
        "augment": {"pad": 1},
    },
]


def tiny_config(data: str, **top) -> dict:
    """A two-stage config (largest path, then a grown 2-branch supernet with distillation and max-recover)."""
    cfg = {
        "data": data,
        "seed": 3,
        "progress": False,
        "checkpoint": {"every_steps": 2, "keep": 3},
        "metrics": {"probes": 3, "recal_batches": 2, "batch_size": 32, "eval_images": 64},
        "stages": copy.deepcopy(TINY_STAGES),
    }
    cfg.update(top)
    return cfg
