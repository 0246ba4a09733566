"""Streaming: image folders too big for memory, decoded per batch by DataLoader worker processes."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cvarch.data.decode import decode_files, decode_image_file
from cvarch.data.splits import FileSplit

# streamed image folders fit the preprocess and augment statistics on this many training images: the channel
# mean and std of CIFAR-10 from 10,000 images are within 0.002 of the full 50,000's
STREAM_FIT_IMAGES = 10_000


class StreamedImages(Dataset):
    """The images of a :class:`FileSplit`, decoded when read (by DataLoader workers) to uint8 (C, H, W).

    Args:
        split: the files and targets.
        channels: 1 (grey) or 3 (RGB).
        size: side every image is resized to; ``None`` keeps the files' size, which must then agree.
    """

    def __init__(self, split: FileSplit, channels: int, size: int | None) -> None:
        self.split = split
        self.channels = channels
        self.size = size
        self.shape = decode_image_file(split.files[0], channels, size).shape

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = decode_image_file(self.split.files[i], self.channels, self.size)
        if image.shape != self.shape:
            raise ValueError(
                f"{self.split.files[i]} is {tuple(image.shape[1:])} but {self.split.files[0]} is "
                f"{tuple(self.shape[1:])}: set data.image_size to resize all images to one size"
            )
        return image, self.split.targets[i]


def stream_loader(
    split: FileSplit,
    channels: int,
    size: int | None,
    batch_size: int,
    sampler: DistributedSampler | None,
    num_workers: int,
    pin: bool,
) -> DataLoader:
    """The DataLoader of a streamed split: ``num_workers`` processes decode the files of each batch.

    Args:
        split: the files and targets.
        channels: 1 (grey) or 3 (RGB).
        size: side every image is resized to; ``None`` keeps the files' size.
        batch_size: images per batch.
        sampler: the index order; ``None`` keeps the split's order.
        num_workers: decoding processes (0 decodes in the training process).
        pin: copy batches into page-locked memory.
    """
    return DataLoader(
        StreamedImages(split, channels, size),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin,
        persistent_workers=num_workers > 0,
    )


def fit_sample(split: FileSplit, channels: int, size: int | None, seed: int) -> torch.Tensor:
    """The uint8 images the statistics of a streamed training split are fitted on: ``STREAM_FIT_IMAGES`` of
    them (all, if it has fewer), drawn with ``seed`` and decoded in file order."""
    count = min(STREAM_FIT_IMAGES, len(split))
    index = np.random.default_rng(seed).choice(len(split), count, replace=False)
    return decode_files([(split.files[i], 0) for i in np.sort(index)], channels, size).images
