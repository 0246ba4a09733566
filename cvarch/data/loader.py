"""The batch loader of in-memory splits: each batch one gather by index, with no DataLoader worker involved.

The fast CIFAR-10 trainers (Page 2018, Keller Jordan's airbench 2024) keep the whole dataset on the GPU as
uint8 and gather each batch by index; so does :class:`BatchLoader`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DistributedSampler

from cvarch.data.splits import Split


class BatchLoader:
    """The batches of an in-memory split, each one gather by index: no worker processes, no per-image collate.

    The order is the ``sampler``'s (Lightning calls its ``set_epoch`` at every epoch, which reshuffles by a
    new index permutation), or the split's order without one. Batches are gathered on the device the split
    lives on; with ``pin`` (host data, GPU trainer) they are gathered straight into page-locked memory, so
    Lightning's copy to the GPU is asynchronous.

    Args:
        split: the images and targets, on the host or on the accelerator.
        batch_size: images per batch (the last batch may be smaller).
        sampler: the index order, e.g. a seeded ``DistributedSampler``; ``None`` keeps the split's order.
        pin: gather host batches into page-locked memory.
    """

    batch_sampler = None  # what Lightning inspects next to ``sampler`` (to tell whether a loader shuffles)

    def __init__(
        self, split: Split, batch_size: int, sampler: DistributedSampler | None = None, pin: bool = False
    ) -> None:
        self.split = split
        self.batch_size = batch_size
        self.sampler = sampler
        self.pin = pin and split.images.device.type == "cpu"

    def __len__(self) -> int:
        return math.ceil(len(self.sampler if self.sampler is not None else self.split) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.split.images.device
        if self.sampler is None:
            order = torch.arange(len(self.split), device=device)
        else:
            order = torch.tensor(list(self.sampler), dtype=torch.long).to(device)
        for index in order.split(self.batch_size):
            yield self._gather(self.split.images, index), self._gather(self.split.targets, index)

    def _gather(self, tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if not self.pin:
            return tensor[index]
        out = torch.empty((len(index), *tensor.shape[1:]), dtype=tensor.dtype, pin_memory=True)
        return torch.index_select(tensor, 0, index, out=out)
