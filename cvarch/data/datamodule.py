"""The base data module: a dataset's uint8 splits, loaded once (through the cache), checked, and batched."""

from __future__ import annotations

import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

from cvarch.data.cache import cached_splits
from cvarch.data.decode import decode_image_file
from cvarch.data.loader import BatchLoader
from cvarch.data.placement import place
from cvarch.data.splits import FileSplit, Split, per_class_subset
from cvarch.data.stream import fit_sample, stream_loader


class ImageDataModule(pl.LightningDataModule):
    """Base of every cvarch data module: in-memory uint8 splits, a disk cache, and the three dataloaders.

    Subclasses implement :meth:`load_splits` (and :meth:`fingerprint` if decoding is worth caching).

    Args:
        num_classes: number of classes; checked against the data.
        channels: image channels (1 grayscale, 3 RGB).
        image_size: side in pixels that images are resized to once, when loaded; ``None`` keeps their size.
        split_seed: seed of every carved split, fixed so that all runs of a sweep share one split.
        train_per_class: keep exactly this many training images of each class (seeded by ``split_seed``,
            stratified), leaving val and test untouched, so little- and more-data runs are scored on the same
            images; ``None`` keeps all.
        batch_size: images per optimizer step, over all processes (under DDP each loads batch_size ÷ world).
        num_workers: DataLoader worker processes of the streaming path (in-memory splits need none); ``None``
            means one per CPU core.
        pin_memory: gather host batches into page-locked memory; ``None`` means "when the Trainer's device is
            a GPU and the data stays on the host".
        on_device: hold the splits on the Trainer's accelerator: ``True``, ``False``, or ``"auto"`` (when it
            is a GPU and the splits take at most half of its free memory).
        cache_dir: folder of the decoded-tensor cache.
    """

    def __init__(
        self,
        num_classes: int,
        channels: int,
        image_size: int | None = None,
        split_seed: int = 0,
        train_per_class: int | None = None,
        batch_size: int = 128,
        num_workers: int | None = 0,
        pin_memory: bool | None = None,
        on_device: bool | str = "auto",
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if image_size is not None and image_size < 1:
            raise ValueError(f"data.image_size must be a positive number of pixels, got {image_size}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if on_device not in (True, False, "auto"):
            raise ValueError(f"data.on_device must be true, false or auto, got {on_device!r}")
        if train_per_class is not None and train_per_class < 1:
            raise ValueError(
                f"data.train_per_class must be >= 1 (or null for all images), got {train_per_class}"
            )
        self.num_classes = num_classes
        self.channels = channels
        self.image_size = image_size
        self.split_seed = split_seed
        self.train_per_class = train_per_class
        self.batch_size = batch_size
        self.num_workers = (os.cpu_count() or 1) if num_workers is None else num_workers
        self.pin_memory = pin_memory
        self.on_device = on_device
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.splits: dict[str, Split | FileSplit] | None = None
        self._placed: dict[str, Split] = {}  # the splits on the accelerator, when on_device
        self._fit_sample: torch.Tensor | None = None  # streamed splits: the decoded images statistics fit on
        self.classes: list[str] = [str(i) for i in range(num_classes)]

    # --- what subclasses provide -------------------------------------------------------------------------
    def load_splits(self) -> dict[str, Split | FileSplit]:
        """Returns ``{"train", "val", "test"}`` splits of uint8 images at ``image_size`` (or native size)."""
        raise NotImplementedError

    def fingerprint(self) -> str | None:
        """A string that changes whenever the source data changes; ``None`` disables the disk cache."""
        return None

    def carve_splits(self, splits: dict[str, Split | FileSplit]) -> dict[str, Split | FileSplit]:
        """The splits after the cache: a subclass whose :meth:`load_splits` returns the decoded source
        (what the fingerprint covers) carves validation and test here, so a change of ``split_seed`` or of a
        fraction gives new splits of the one cached decode."""
        return splits

    # --- Lightning hooks -------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        splits = self._load()
        for name, split in splits.items():
            if isinstance(split, FileSplit):  # streamed: each file is checked as it is decoded
                continue
            if split.images.ndim != 4 or not (
                split.images.dtype == torch.uint8 or split.images.is_floating_point()
            ):
                raise TypeError(f"{type(self).__name__}: split {name!r} must be uint8 or float (N, C, H, W)")
            if split.images.shape[1] != self.channels:
                raise ValueError(
                    f"data.channels={self.channels} but the {name} images have "
                    f"{split.images.shape[1]} channels"
                )
            if len(split) and int(split.targets.max()) >= self.num_classes:
                raise ValueError(
                    f"data.num_classes={self.num_classes} but the {name} split has label "
                    f"{int(split.targets.max())}"
                )
        # subsampled after the cache, so that every train_per_class reads the one cache file of the full data
        if self.train_per_class is not None:
            splits["train"] = self._subsample(splits["train"])
        self.splits = splits

    def _load(self) -> dict[str, Split | FileSplit]:
        """:meth:`load_splits`, through the disk cache when there is a fingerprint and a ``cache_dir``."""
        key = self.fingerprint()
        if key is None or self.cache_dir is None:
            return self.carve_splits(self.load_splits())

        def load() -> tuple[dict[str, Split], list[str]]:
            splits = self.load_splits()
            return splits, self.classes  # after the load, which may name the classes (CIFAR's archive does)

        splits, self.classes = cached_splits(self.cache_dir, type(self).__name__, key, load)
        return self.carve_splits(splits)

    def _subsample(self, train: Split | FileSplit) -> Split | FileSplit:
        """``train_per_class`` images of each class of ``train`` (see :func:`per_class_subset`)."""
        counts = torch.bincount(train.targets, minlength=self.num_classes)
        for label, count in enumerate(counts.tolist()):
            if count < self.train_per_class:
                name = self.classes[label] if label < len(self.classes) else str(label)
                raise ValueError(
                    f"data.train_per_class={self.train_per_class} but class {name!r} has only {count} "
                    "training images"
                )
        return train.subset(per_class_subset(train.targets, self.train_per_class, self.split_seed))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the model receives."""
        self.setup()
        train = self.splits["train"]
        if isinstance(train, FileSplit):
            return tuple(decode_image_file(train.files[0], self.channels, self.image_size).shape)
        return tuple(train.images.shape[1:])

    @property
    def train_images(self) -> torch.Tensor:
        """The uint8 training images, which the ``preprocess`` group fits its statistics on; of a streamed
        split, a seeded sample of them (:func:`cvarch.data.stream.fit_sample`)."""
        self.setup()
        train = self.splits["train"]
        if isinstance(train, FileSplit):
            if self._fit_sample is None:
                self._fit_sample = fit_sample(train, self.channels, self.image_size, self.split_seed)
            return self._fit_sample
        return train.images

    def world(self) -> tuple[int, int]:
        """``(world size, global rank)`` of the Trainer loading from this module; ``(1, 0)`` without one."""
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def device(self) -> torch.device:
        """The device of the Trainer loading from this module (root device under DDP); CPU without one."""
        strategy = getattr(self.trainer, "strategy", None)
        return strategy.root_device if strategy is not None else torch.device("cpu")

    def placed(self, name: str) -> Split:
        """Split ``name`` where batches are gathered: on the accelerator when ``on_device`` says so, else as
        loaded. All in-memory splits move together, once (see :func:`cvarch.data.placement.place`)."""
        device = self.device()
        if device.type == "cpu" or self.on_device is False:
            return self.splits[name]
        if name not in self._placed or self._placed[name].images.device != device:
            placed = place(self.splits, device, self.on_device)
            if placed is None:  # on_device=auto, and they do not fit
                return self.splits[name]
            self._placed = placed
        return self._placed[name]

    def dataloader(self, split: str, shuffle: bool = False) -> BatchLoader | DataLoader:
        """The batches of one split (``train``, ``val`` or ``test``) for this process.

        ``batch_size`` is the global batch: under DDP each of the ``world`` processes loads ``batch_size ÷
        world`` (and a ``world``-th of the evaluation splits). The training order is a function of the seed
        and the epoch alone (a seeded ``DistributedSampler``, also with one process), so one process and N
        processes see the same global batches, and runs that differ in anything but the seed (init, norm,
        model) see the same data order. In-memory splits give a :class:`BatchLoader`; streamed ones a
        DataLoader whose workers decode the files.
        """
        self.setup()
        if split not in self.splits:
            raise KeyError(f"unknown split {split!r}; expected one of {sorted(self.splits)}")
        world, rank = self.world()
        if self.batch_size % world:
            raise ValueError(
                f"data.batch_size={self.batch_size} is the global batch; it must divide evenly among the "
                f"{world} processes (trainer.devices × trainer.num_nodes)"
            )
        sampler = None
        if shuffle or world > 1:  # Lightning's own seed for its samplers: seed_everything's
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
            sampler = DistributedSampler(
                range(len(self.splits[split])), num_replicas=world, rank=rank, shuffle=shuffle, seed=seed
            )
        gpu = self.device().type == "cuda"
        pin = gpu if self.pin_memory is None else self.pin_memory
        if isinstance(self.splits[split], FileSplit):
            return stream_loader(
                self.splits[split],
                self.channels,
                self.image_size,
                self.batch_size // world,
                sampler,
                self.num_workers,
                pin,
            )
        return BatchLoader(self.placed(split), self.batch_size // world, sampler, pin)

    def train_dataloader(self) -> BatchLoader | DataLoader:
        return self.dataloader("train", shuffle=True)

    def val_dataloader(self) -> BatchLoader | DataLoader:
        return self.dataloader("val")

    def test_dataloader(self) -> BatchLoader | DataLoader:
        return self.dataloader("test")
