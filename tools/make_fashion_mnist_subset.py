"""Build the Fashion-MNIST subset bundled as ``fastsupernet/resources/fashion_mnist_subset.npz``.

Selection (seed 0 unless ``--seed`` says otherwise): for every class, the images of that class
are ranked by ``sha256(f"{seed}:{split}:{index}")`` of their index in the original file and the
first 1,200 (train, from the 60,000 training images) resp. 200 (test, from the 10,000 test
images) are kept; the kept images stay in their original relative order. Hash ranking does not
depend on any library's random number generator, so the selection never changes.

The archive is a normal ``.npz`` (``np.load`` reads it) written with fixed zip timestamps, so
the same inputs give the same bytes (given the same zlib). Keys: ``train_images`` (uint8,
N x 1 x 28 x 28), ``train_labels`` (uint8), ``test_images``, ``test_labels``.

Usage::

    python tools/make_fashion_mnist_subset.py [--source /usr/share/datasets/fashion-mnist]
                                              [--out fastsupernet/resources/fashion_mnist_subset.npz]
                                              [--seed 0]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fastsupernet._atomic import atomic_write_bytes  # noqa: E402
from fastsupernet.data import _IDX_NAMES, _find_idx, read_idx  # noqa: E402

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_OUT = REPO / "fastsupernet" / "resources" / "fashion_mnist_subset.npz"
SEED = 0
PER_CLASS = {"train": 1200, "test": 200}
NUM_CLASSES = 10


def select(labels: np.ndarray, per_class: int, seed: int, split: str) -> np.ndarray:
    """Indices of ``per_class`` items of every class, ranked by a seeded hash, in original order."""
    keys = [hashlib.sha256(f"{seed}:{split}:{i}".encode()).digest() for i in range(labels.shape[0])]
    chosen: list[int] = []
    for c in range(NUM_CLASSES):
        members = np.flatnonzero(labels == c).tolist()
        if len(members) < per_class:
            raise SystemExit(f"{split}: class {c} has only {len(members)} images, need {per_class}")
        members.sort(key=lambda i: keys[i])
        chosen.extend(members[:per_class])
    return np.array(sorted(chosen), dtype=np.int64)


def build_subset(source: Path, seed: int = SEED) -> dict[str, np.ndarray]:
    """Read the IDX files in ``source`` and return the subset arrays under their npz keys."""
    out: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        images = read_idx(_find_idx(source, _IDX_NAMES[(split, "images")]), 3)
        labels = read_idx(_find_idx(source, _IDX_NAMES[(split, "labels")]), 1)
        idx = select(labels, PER_CLASS[split], seed, split)
        out[f"{split}_images"] = np.ascontiguousarray(images[idx][:, None, :, :])
        out[f"{split}_labels"] = np.ascontiguousarray(labels[idx].astype(np.uint8))
    return out


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A compressed .npz with fixed member timestamps and order (reproducible bytes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            member = io.BytesIO()
            np.lib.format.write_array(member, arrays[key], allow_pickle=False)
            zf.writestr(info, member.getvalue(), compresslevel=9)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder with the Fashion-MNIST IDX files")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the .npz")
    ap.add_argument("--seed", type=int, default=SEED, help="selection seed (the bundled file uses 0)")
    args = ap.parse_args(argv)
    data = npz_bytes(build_subset(args.source, args.seed))
    atomic_write_bytes(args.out, data)
    args.out.chmod(0o644)  # a package resource, readable by everyone
    print(f"wrote {args.out} ({len(data)} bytes) sha256 {hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
