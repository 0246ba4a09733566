"""Datasets as LightningDataModules: decoded once into uint8 tensors, split with a fixed seed, cached on disk.

Every data module yields ``(uint8 image (C, H, W), int64 label)`` samples. Turning pixels into model inputs is
the job of the ``preprocess`` group (fitted on the training split and saved in the checkpoint), and random
training-time transforms are the job of the ``augment`` group, which the LightningModule runs batched on the
device (so the data path only indexes tensors).

The fast CIFAR-10 trainers (Page 2018, Keller Jordan's airbench 2024) keep the whole dataset on the GPU as
uint8 and gather each batch by index; so does :class:`BatchLoader`: the splits go to the accelerator when they
fit (``on_device``), otherwise batches are gathered into page-locked host memory for an asynchronous copy, and
no DataLoader worker is involved. Image folders too big for memory take the streaming path instead
(``ImageFolderDataModule(stream=...)``): files decoded per batch by DataLoader worker processes.

One concern per module:

- :mod:`~cvarch.data.splits`: :class:`Split`, :class:`FileSplit` and the seeded carves and subsamples;
- :mod:`~cvarch.data.decode`: image files to uint8 tensors;
- :mod:`~cvarch.data.scan`: the ``(file, label)`` pairs of an image folder;
- :mod:`~cvarch.data.cache`: the decoded-tensor cache on disk;
- :mod:`~cvarch.data.placement`: the splits on the accelerator when they fit;
- :mod:`~cvarch.data.loader`: :class:`BatchLoader`, the in-memory batches;
- :mod:`~cvarch.data.stream`: the streaming path's DataLoader and its statistics sample;
- :mod:`~cvarch.data.datamodule`: :class:`ImageDataModule`, the base of every data module;
- one module per ``conf/data`` target: :mod:`~cvarch.data.digits`, :mod:`~cvarch.data.cifar`,
  :mod:`~cvarch.data.imagefolder`, :mod:`~cvarch.data.synthetic` (``fake``, ``gaussian``).

The configs name their targets as ``cvarch.data.<Class>``, as do the run configs saved in checkpoints: the
names below are part of the package's interface.
"""

from __future__ import annotations

from cvarch.data.cifar import CIFARDataModule
from cvarch.data.datamodule import ImageDataModule
from cvarch.data.decode import decode_files, decode_image_file, resize_images
from cvarch.data.digits import DigitsDataModule
from cvarch.data.imagefolder import ImageFolderDataModule
from cvarch.data.loader import BatchLoader
from cvarch.data.splits import SPLITS, FileSplit, Split, carve, per_class_subset, stratified_split
from cvarch.data.synthetic import FakeDataModule, GaussianDataModule

__all__ = [
    "SPLITS",
    "BatchLoader",
    "CIFARDataModule",
    "DigitsDataModule",
    "FakeDataModule",
    "FileSplit",
    "GaussianDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "Split",
    "carve",
    "decode_files",
    "decode_image_file",
    "per_class_subset",
    "resize_images",
    "stratified_split",
]
