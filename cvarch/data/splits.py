"""Splits: images and labels in memory or as files, and the seeded draws that carve and subsample them.

Every draw is seeded by ``data.split_seed`` alone, so all runs of a sweep share one split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# the splits every data module has; what cvarch-eval and cvarch-ensemble score
SPLITS = ("test", "val", "train")


@dataclass
class Split:
    """One split of a dataset held in memory.

    Args:
        images: uint8 tensor (N, C, H, W).
        targets: int64 tensor (N,).
    """

    images: torch.Tensor
    targets: torch.Tensor

    def subset(self, index: np.ndarray | torch.Tensor) -> Split:
        index = torch.as_tensor(index, dtype=torch.long)
        return Split(self.images[index], self.targets[index])

    def __len__(self) -> int:
        return len(self.targets)


@dataclass
class FileSplit:
    """One split of an image folder that is streamed from disk rather than held in memory.

    Args:
        files: paths of the image files, in label order.
        targets: int64 tensor (N,).
    """

    files: list[str]
    targets: torch.Tensor

    def subset(self, index: np.ndarray | torch.Tensor) -> FileSplit:
        index = torch.as_tensor(index, dtype=torch.long)
        return FileSplit([self.files[i] for i in index.tolist()], self.targets[index])

    def __len__(self) -> int:
        return len(self.targets)


def stratified_split(targets: torch.Tensor, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(keep, held_out)`` with ``held_out`` a stratified ``fraction`` of ``targets``."""
    # imported here, not at the top: scikit-learn costs a quarter of a second at every start that splits
    # nothing (a cache hit); its split itself is kept, since another one would change every recorded split
    from sklearn.model_selection import train_test_split

    index = np.arange(len(targets))
    keep, held = train_test_split(index, test_size=fraction, stratify=targets.numpy(), random_state=seed)
    return np.sort(keep), np.sort(held)


def carve(
    train: Split | FileSplit, fraction: float, seed: int, key: str = "fraction"
) -> tuple[Split | FileSplit, Split | FileSplit]:
    """Splits ``train`` into (rest, held-out) with a stratified ``fraction`` held out.

    Raises:
        ValueError: naming ``key`` when the held-out part cannot hold one image of every class.
    """
    classes = int(train.targets.unique().numel())
    held = round(fraction * len(train))
    if not 0 < fraction < 1 or held < classes or len(train) - held < classes:
        raise ValueError(
            f"{key}: holding out {held} of {len(train)} images cannot give a stratified split of "
            f"{classes} classes (each side needs at least one image per class)"
        )
    keep, held = stratified_split(train.targets, fraction, seed)
    return train.subset(keep), train.subset(held)


def per_class_subset(targets: torch.Tensor, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of ``per_class`` images of every label in ``targets``, drawn without replacement.

    Each label gets its own permutation seeded by ``(seed, label)`` and keeps its first ``per_class`` entries,
    so a smaller ``per_class`` picks a subset of a larger one (the "little data" images are among the "more
    data" ones) and one label's draw does not depend on the others.

    Args:
        targets: int64 labels (N,).
        per_class: images kept of each label; every label must have at least this many.
        seed: seed of the permutations.
    """
    labels = targets.numpy()
    kept = []
    for label in np.unique(labels):
        index = np.flatnonzero(labels == label)
        kept.append(index[np.random.default_rng([seed, int(label)]).permutation(len(index))[:per_class]])
    return np.sort(np.concatenate(kept))
