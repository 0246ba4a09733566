"""The disk cache: decoded splits saved once per source fingerprint, read by the one checkpoint loader."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch

from cvarch.checkpoint import load_checkpoint_file
from cvarch.data.splits import Split

CACHE_VERSION = 2  # bump when the cached layout changes, so old caches are ignored (2: uncarved folders)


def cached_splits(
    cache_dir: Path, kind: str, key: str, load: Callable[[], tuple[dict[str, Split], list[str]]]
) -> tuple[dict[str, Split], list[str]]:
    """The splits and class names of ``kind``'s data with fingerprint ``key``: from the cache file if there is
    one, else from ``load``, then saved for the next start.

    The file is read with ``weights_only=True`` (:func:`cvarch.checkpoint.load_checkpoint_file`): a cache
    folder can be shared, and what it holds is data, not code.

    Args:
        cache_dir: folder of the cache files.
        kind: the data module's class name; part of the file name.
        key: the source's fingerprint (:meth:`cvarch.data.ImageDataModule.fingerprint`).
        load: decodes the splits and names the classes, on a cache miss.
    """
    digest = hashlib.sha256(f"{CACHE_VERSION}|{kind}|{key}".encode()).hexdigest()[:20]
    path = cache_dir / f"{kind}-{digest}.pt"
    if path.exists():
        blob = load_checkpoint_file(path, "data.cache_dir")
        splits = {name: Split(images, targets) for name, (images, targets) in blob["splits"].items()}
        return splits, blob["classes"]
    splits, classes = load()
    path.parent.mkdir(parents=True, exist_ok=True)
    # a temporary file of this process's own: parallel sweep jobs that all missed the cache write side by side
    # (cvarch.checkpoint.atomic_save would delete the others' temporary files as stale)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    blob = {"classes": classes, "splits": {n: (s.images, s.targets) for n, s in splits.items()}}
    torch.save(blob, tmp)
    tmp.replace(path)  # atomic: a crash never leaves a half-written cache behind
    return splits, classes
