"""Datasets as LightningDataModules: decoded once into uint8 tensors, split with a fixed seed, cached on disk.

Every data module yields ``(uint8 image (C, H, W), int64 label)`` samples. Turning pixels into model inputs is
the job of the ``preprocess`` group (fitted on the training split and saved in the checkpoint), and random
training-time transforms are the job of the ``augment`` group, which the LightningModule runs batched on the
device (so the data path only indexes tensors).

The fast CIFAR-10 trainers (Page 2018, Keller Jordan's airbench 2024) keep the whole dataset on the GPU as uint8
and gather each batch by index; so does :class:`BatchLoader`: the splits go to the accelerator when they fit
(``on_device``), otherwise batches are gathered into page-locked host memory for an asynchronous copy, and no
DataLoader worker is involved. Image folders too big for memory take the streaming path instead
(``ImageFolderDataModule(stream=...)``): files decoded per batch by DataLoader worker processes.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms.v2 import functional as TF

# the splits every data module has; what cvarch-eval and cvarch-ensemble score
SPLITS = ("test", "val", "train")
CACHE_VERSION = 1  # bump when the cached layout changes, so old caches are ignored
# streamed image folders fit the preprocess and augment statistics on this many training images: the channel
# mean and std of CIFAR-10 from 10,000 images are within 0.002 of the full 50,000's
STREAM_FIT_IMAGES = 10_000


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


class TensorImageDataset(Dataset):
    """A map-style dataset over an in-memory :class:`Split`.

    Args:
        split: images and targets.
    """

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split.images[i], self.split.targets[i]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch by one fancy index, which the DataLoader uses instead of N ``__getitem__`` calls and a
        stack (the batch then passes :func:`batched` unchanged)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.split.images[index], self.split.targets[index]


def batched(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The DataLoader's ``collate_fn`` for :meth:`TensorImageDataset.__getitems__`: already a batch."""
    return batch


class BatchLoader:
    """The batches of an in-memory split, each one gather by index: no worker processes, no per-image collate.

    The order is the ``sampler``'s (Lightning calls its ``set_epoch`` at every epoch, which reshuffles by a new
    index permutation), or the split's order without one. Batches are gathered on the device the split lives
    on; with ``pin`` (host data, GPU trainer) they are gathered straight into page-locked memory, so Lightning's
    copy to the GPU is asynchronous.

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


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors on ``device``: the GPU's free memory, or the host's ``MemAvailable``."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def stratified_split(targets: torch.Tensor, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(keep, held_out)`` with ``held_out`` a stratified ``fraction`` of ``targets``."""
    # imported here, not at the top: scikit-learn costs a quarter of a second at every start that splits nothing
    # (a cache hit); its split itself is kept, since another one would change every recorded split
    from sklearn.model_selection import train_test_split

    index = np.arange(len(targets))
    keep, held = train_test_split(index, test_size=fraction, stratify=targets.numpy(), random_state=seed)
    return np.sort(keep), np.sort(held)


def per_class_subset(targets: torch.Tensor, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of ``per_class`` images of every label in ``targets``, drawn without replacement.

    Each label gets its own permutation seeded by ``(seed, label)`` and keeps its first ``per_class`` entries, so
    a smaller ``per_class`` picks a subset of a larger one (the "little data" images are among the "more data"
    ones) and one label's draw does not depend on the others.

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


def resize_images(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Resizes a uint8 (N, C, H, W) batch to ``size``×``size`` (bilinear, antialiased); ``None`` keeps it."""
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    return TF.resize(images, [size, size], antialias=True)


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
        pin_memory: gather host batches into page-locked memory; ``None`` means "when the Trainer's device is a
            GPU and the data stays on the host".
        on_device: hold the splits on the Trainer's accelerator: ``True``, ``False``, or ``"auto"`` (when it is
            a GPU and the splits take at most half of its free memory).
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
        self.splits: dict[str, Split] | None = None
        self._placed: dict[str, Split] = {}  # the splits on the accelerator, when on_device
        self._fit_sample: torch.Tensor | None = None  # streamed splits: the decoded images statistics fit on
        self.classes: list[str] = [str(i) for i in range(num_classes)]

    # --- what subclasses provide -------------------------------------------------------------------------
    def load_splits(self) -> dict[str, Split]:
        """Returns ``{"train", "val", "test"}`` splits of uint8 images at ``image_size`` (or native size)."""
        raise NotImplementedError

    def fingerprint(self) -> str | None:
        """A string that changes whenever the source data changes; ``None`` disables the disk cache."""
        return None

    # --- Lightning hooks -------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        splits = self._cached(self.load_splits)
        for name, split in splits.items():
            if isinstance(split, FileSplit):  # streamed: each file is checked as it is decoded
                continue
            if split.images.ndim != 4 or not (
                split.images.dtype == torch.uint8 or split.images.is_floating_point()
            ):
                raise TypeError(f"{type(self).__name__}: split {name!r} must be uint8 or float (N, C, H, W)")
            if split.images.shape[1] != self.channels:
                raise ValueError(
                    f"data.channels={self.channels} but the {name} images have {split.images.shape[1]} channels"
                )
            if len(split) and int(split.targets.max()) >= self.num_classes:
                raise ValueError(
                    f"data.num_classes={self.num_classes} but the {name} split has label {int(split.targets.max())}"
                )
        # subsampled after the cache, so that every train_per_class reads the one cache file of the full data
        if self.train_per_class is not None:
            splits["train"] = self._subsample(splits["train"])
        self.splits = splits

    def _subsample(self, train: Split) -> Split:
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
        split, a sample of ``STREAM_FIT_IMAGES`` of them drawn with ``split_seed``."""
        self.setup()
        train = self.splits["train"]
        if isinstance(train, FileSplit):
            if self._fit_sample is None:
                count = min(STREAM_FIT_IMAGES, len(train))
                index = np.random.default_rng(self.split_seed).choice(len(train), count, replace=False)
                files = [(train.files[i], 0) for i in np.sort(index)]
                self._fit_sample = decode_files(files, self.channels, self.image_size).images
            return self._fit_sample
        return train.images

    def world(self) -> tuple[int, int]:
        """``(world size, global rank)`` of the Trainer that loads from this module; ``(1, 0)`` without one."""
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def device(self) -> torch.device:
        """The device of the Trainer that loads from this module (its root device under DDP); CPU without one."""
        strategy = getattr(self.trainer, "strategy", None)
        return strategy.root_device if strategy is not None else torch.device("cpu")

    def placed(self, name: str) -> Split:
        """Split ``name`` where batches are gathered: on the accelerator when ``on_device`` says so, else as
        loaded. All in-memory splits move together, once (their uint8 bytes are checked against ``auto``)."""
        device = self.device()
        if device.type == "cpu" or self.on_device is False:
            return self.splits[name]
        if name not in self._placed or self._placed[name].images.device != device:
            splits = {k: v for k, v in self.splits.items() if isinstance(v, Split)}
            size = sum(v.images.nbytes + v.targets.nbytes for v in splits.values())
            if self.on_device == "auto" and size > available_memory(device) // 2:
                return self.splits[name]
            self._placed = {k: Split(v.images.to(device), v.targets.to(device)) for k, v in splits.items()}
        return self._placed[name]

    def dataloader(self, split: str, shuffle: bool = False) -> BatchLoader | DataLoader:
        """The batches of one split (``train``, ``val`` or ``test``) for this process.

        ``batch_size`` is the global batch: under DDP each of the ``world`` processes loads ``batch_size ÷
        world`` (and a ``world``-th of the evaluation splits). The training order is a function of the seed and
        the epoch alone (a seeded ``DistributedSampler``, also with one process), so one process and N
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
        if not isinstance(self.splits[split], Split):
            return self.stream(self.splits[split], self.batch_size // world, sampler, pin)
        return BatchLoader(self.placed(split), self.batch_size // world, sampler, pin)

    def stream(
        self, split: FileSplit, batch_size: int, sampler: DistributedSampler | None, pin: bool
    ) -> DataLoader:
        """The streaming path's DataLoader: ``num_workers`` processes decode the files of each batch."""
        return DataLoader(
            StreamedImages(split, self.channels, self.image_size),
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=pin,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test")

    # --- the disk cache --------------------------------------------------------------------------------
    def _cached(self, load: Callable[[], dict[str, Split]]) -> dict[str, Split]:
        key = self.fingerprint()
        if key is None or self.cache_dir is None:
            return load()
        digest = hashlib.sha256(f"{CACHE_VERSION}|{type(self).__name__}|{key}".encode()).hexdigest()[:20]
        path = self.cache_dir / f"{type(self).__name__}-{digest}.pt"
        if path.exists():
            blob = torch.load(path, map_location="cpu", weights_only=True)
            self.classes = blob["classes"]
            return {name: Split(images, targets) for name, (images, targets) in blob["splits"].items()}
        splits = load()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        blob = {"classes": self.classes, "splits": {n: (s.images, s.targets) for n, s in splits.items()}}
        torch.save(blob, tmp)
        tmp.replace(path)  # atomic: a crash never leaves a half-written cache behind
        return splits


def carve(train: Split, fraction: float, seed: int, key: str = "fraction") -> tuple[Split, Split]:
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


class DigitsDataModule(ImageDataModule):
    """scikit-learn's 1,797 handwritten digits (8×8, 17 grey levels), the default: real data, no download.

    Alpaydin & Kaynak 1998, UCI optdigits. Pixels 0–16 are mapped linearly to 0–255.

    Args:
        val_fraction: stratified share of all images used for validation.
        test_fraction: stratified share of all images used for testing.
        **kwargs: see :class:`ImageDataModule`; ``channels`` is 1 (grey) or 3 (the grey digit in three identical
            channels, so a network trained on RGB images takes digits).
    """

    def __init__(self, val_fraction: float = 0.15, test_fraction: float = 0.15, **kwargs) -> None:
        super().__init__(**kwargs)
        if self.channels not in (1, 3):
            raise ValueError(
                f"data.channels must be 1 (grey) or 3 (grey replicated to RGB), got {self.channels}"
            )
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction

    def load_splits(self) -> dict[str, Split]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
        images = resize_images(images, self.image_size).expand(-1, self.channels, -1, -1).contiguous()
        full = Split(images, torch.from_numpy(digits.target).long())
        rest, test = carve(full, self.test_fraction, self.split_seed, "data.test_fraction")
        train, val = carve(
            rest, self.val_fraction / (1.0 - self.test_fraction), self.split_seed, "data.val_fraction"
        )
        return {"train": train, "val": val, "test": test}


class CIFARDataModule(ImageDataModule):
    """CIFAR-10 / CIFAR-100 through torchvision (Krizhevsky 2009), with the official test split.

    Args:
        name: ``cifar10`` or ``cifar100``.
        root: torchvision's download folder.
        download: download the archive if it is missing.
        val_size: images carved from the training split for validation (stratified).
        **kwargs: see :class:`ImageDataModule`.
    """

    def __init__(
        self, name: str = "cifar10", root: str = "data", download: bool = True, val_size: int = 5000, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        if name not in ("cifar10", "cifar100"):
            raise ValueError(f"data.name must be cifar10 or cifar100, got {name!r}")
        self.name = name
        self.root = root
        self.download = download
        self.val_size = val_size

    def prepare_data(self) -> None:
        self._dataset(train=True)
        self._dataset(train=False)

    def _dataset(self, train: bool):
        from torchvision import datasets

        cls = datasets.CIFAR10 if self.name == "cifar10" else datasets.CIFAR100
        try:
            return cls(self.root, train=train, download=self.download)
        except (RuntimeError, OSError) as err:  # no archive in root, and no network (or download=false)
            raise FileNotFoundError(
                f"data.root: {self.name} is not in {self.root} and could not be downloaded ({err}); put "
                f"{cls.filename} (from {cls.url}) there, or use data=imagefolder on an image-folder copy"
            ) from None

    def load_splits(self) -> dict[str, Split]:
        def to_split(ds) -> Split:
            images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32) uint8
            return Split(resize_images(images, self.image_size), torch.tensor(ds.targets, dtype=torch.long))

        train_ds = self._dataset(train=True)
        self.classes = list(train_ds.classes)
        full = to_split(train_ds)
        train, val = carve(full, self.val_size / len(full), self.split_seed, "data.val_size")
        return {"train": train, "val": val, "test": to_split(self._dataset(train=False))}


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def decode_image_file(path: str | Path, channels: int, size: int | None) -> torch.Tensor:
    """Decodes one image file to uint8 (C, H, W), resized to ``size`` if given.

    Raises:
        ValueError: naming the file, if it is not a decodable image.
    """
    from torchvision.io import ImageReadMode, decode_image

    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    try:
        image = decode_image(str(path), mode=mode)
    except (RuntimeError, ValueError):
        try:  # formats torchvision.io cannot read (BMP, TIFF, PPM) go through Pillow
            from PIL import Image

            with Image.open(path) as im:
                array = np.asarray(im.convert("RGB" if channels == 3 else "L"))
            image = (
                torch.from_numpy(array.copy()).reshape(array.shape[0], array.shape[1], -1).permute(2, 0, 1)
            )
        except Exception as err:
            raise ValueError(f"not a decodable image: {path} ({type(err).__name__}: {err})") from None
    if size is not None:
        image = resize_images(image.unsqueeze(0), size)[0]
    return image


def decode_files(
    files: Sequence[tuple[str | Path, int]], channels: int, size: int | None, skip_corrupt: bool = False
) -> Split:
    """Decodes ``(file, label)`` pairs, in threads, into one in-memory :class:`Split`.

    Args:
        files: the files and their labels.
        channels: 1 (grey) or 3 (RGB).
        size: side every image is resized to; ``None`` keeps the files' size, which must then agree.
        skip_corrupt: leave out files that cannot be decoded (truncated, not an image), with a warning that
            counts them, instead of raising.

    Raises:
        ValueError: naming the file, if one cannot be decoded (unless ``skip_corrupt``) or if the sizes differ
            and ``size`` is ``None``.
    """

    def decode(item: tuple[str | Path, int]) -> torch.Tensor | ValueError:
        try:
            return decode_image_file(item[0], channels, size)
        except ValueError as err:
            if not skip_corrupt:
                raise
            return err

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        images = list(pool.map(decode, files))
    skipped = [err for err in images if isinstance(err, ValueError)]
    if skipped:
        warnings.warn(
            f"data.on_corrupt=skip: skipped {len(skipped)} of {len(files)} files that cannot be decoded "
            f"(first: {skipped[0]})",
            RuntimeWarning,
            stacklevel=2,
        )
        files = [f for f, image in zip(files, images, strict=True) if not isinstance(image, ValueError)]
        images = [image for image in images if not isinstance(image, ValueError)]
    first = images[0].shape
    for (path, _), image in zip(files, images, strict=True):
        if image.shape != first:
            raise ValueError(
                f"{path} is {tuple(image.shape[1:])} but {files[0][0]} is {tuple(first[1:])}: "
                "set data.image_size to resize all images to one size"
            )
    return Split(torch.stack(images), torch.tensor([label for _, label in files], dtype=torch.long))


def _files_under(folder: Path) -> list[str]:
    """Every non-hidden file below ``folder``, recursively, as path strings sorted as ``Path`` objects sort (by
    their parts).

    ``os.walk`` reads the file types from the directory entries, the sort compares tuples of strings, and the
    paths stay strings: on the 2-core machine the 50,000 CIFAR-10 files take 0.2 s, where a ``Path`` each would
    add 0.6 s to every start.
    """
    entries = []
    for top, _, names in os.walk(folder):
        parts = Path(top).relative_to(folder).parts
        entries += [((*parts, name), top, name) for name in names if not name.startswith(".")]
    entries.sort(key=lambda entry: entry[0])
    return [os.path.join(top, name) for _, top, name in entries]


class ImageFolderDataModule(ImageDataModule):
    """An image-folder tree ``root/{train,val,test}/<class>/<image>``; missing val/test are carved from train.

    Images are decoded once (in threads) into uint8 tensors and cached on disk; the cache key covers every
    file's path, size and modification time, so a changed file invalidates it. A tree too big for memory is
    streamed instead: ``num_workers`` DataLoader processes decode each batch's files, and the preprocess and
    augment statistics are fitted on a seeded sample of the training images.

    Args:
        root: folder holding ``train/`` and optionally ``val/`` and ``test/``.
        val_fraction: stratified share of ``train/`` held out for validation when ``val/`` is absent.
        test_fraction: stratified share of ``train/`` held out for testing when ``test/`` is absent.
        max_per_class: keep only the first N files (sorted by name) of each class; ``None`` keeps all.
        classes: class folders of ``train/`` to use, labelled in this order (label i is ``classes[i]``); the
            other folders, in every split, are ignored. ``None`` uses all folders, sorted by name.
        stream: decode files per batch instead of holding the tree in memory: ``True``, ``False``, or
            ``"auto"`` (when the decoded images would take more than half the host's available memory).
        on_corrupt: a file that cannot be decoded (truncated JPEG, not an image) is an error naming it
            (``"error"``), or is left out with a warning counting the skipped files (``"skip"``; in-memory
            trees only, since a streamed tree is decoded batch by batch).
        **kwargs: see :class:`ImageDataModule`.
    """

    def __init__(
        self,
        root: str,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        max_per_class: int | None = None,
        classes: list[str] | None = None,
        stream: bool | str = "auto",
        on_corrupt: str = "error",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if on_corrupt not in ("error", "skip"):
            raise ValueError(f"data.on_corrupt must be error or skip, got {on_corrupt!r}")
        self.on_corrupt = on_corrupt
        if stream not in (True, False, "auto"):
            raise ValueError(f"data.stream must be true, false or auto, got {stream!r}")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root: image folder {self.root} does not exist")
        if not (self.root / "train").is_dir():
            raise FileNotFoundError(
                f"data.root: {self.root} has no train/ folder (expected root/train/<class>/...)"
            )
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.max_per_class = max_per_class
        self._folders = sorted(d.name for d in (self.root / "train").iterdir() if d.is_dir())
        if classes is None:
            self.classes = self._folders
            if len(self.classes) != self.num_classes:
                raise ValueError(
                    f"data.num_classes={self.num_classes} but {self.root / 'train'} has {len(self.classes)} "
                    f"class folders: {self.classes[:10]}{' …' if len(self.classes) > 10 else ''}"
                )
        else:
            self.classes = [str(name) for name in classes]  # Hydra passes a ListConfig
            missing = [name for name in self.classes if name not in self._folders]
            if missing:
                raise ValueError(
                    f"data.classes: {missing} have no folder in {self.root / 'train'}; "
                    f"available: {self._folders}"
                )
            repeated = sorted({name for name in self.classes if self.classes.count(name) > 1})
            if repeated:  # one folder under two labels would make the task unlearnable
                raise ValueError(f"data.classes lists {repeated} more than once")
            if len(self.classes) != self.num_classes:
                raise ValueError(
                    f"data.num_classes={self.num_classes} but data.classes lists {len(self.classes)} classes: "
                    f"{self.classes}"
                )
        self._files = {
            name: self._scan(name) for name in ("train", "val", "test") if (self.root / name).is_dir()
        }
        self.streamed = stream is True or (
            stream == "auto" and self.decoded_bytes() > available_memory(torch.device("cpu")) // 2
        )
        if self.streamed and self.on_corrupt == "skip":
            raise ValueError(
                "data.on_corrupt=skip works on a tree decoded into memory, but this one is streamed "
                "(data.stream): check its files first, or set data.on_corrupt=error"
            )

    def decoded_bytes(self) -> int:
        """Bytes the whole tree takes decoded, estimated from the size of its first training image (read from
        the file's header, not decoded) or from ``image_size``."""
        if self.image_size is None:
            from PIL import Image

            with Image.open(self._files["train"][0][0]) as image:
                width, height = image.size
        else:
            width = height = self.image_size
        return self.channels * width * height * sum(len(files) for files in self._files.values())

    def _scan(self, split: str) -> list[tuple[str, int]]:
        """``(file, label)`` pairs of one split folder; hidden files are skipped, every other file counts."""
        folder = self.root / split
        unknown = sorted(d.name for d in folder.iterdir() if d.is_dir() and d.name not in self._folders)
        if unknown:
            raise ValueError(f"{folder} has class folders that train/ lacks: {unknown}")
        absent = [name for name in self.classes if not (folder / name).is_dir()]
        if absent:  # its accuracy would be over other classes than training's: a copy gone wrong
            raise ValueError(f"{folder} lacks class folders that train/ has: {absent}")
        files = []
        for label, name in enumerate(self.classes):
            paths = _files_under(folder / name)
            if not paths:  # an empty class folder is a copy gone wrong, not a class with no examples
                raise ValueError(f"{folder / name} is an empty class folder: it holds no image files")
            files += [(p, label) for p in paths[: self.max_per_class]]
        if not files:
            selected = f" of data.classes {self.classes}" if self.classes != self._folders else ""
            raise ValueError(f"{folder} holds no image files{selected}")
        return files

    def fingerprint(self) -> str | None:
        if self.streamed:  # nothing decoded to cache
            return None
        # on_corrupt=skip caches a tree without its bad files; error must still see them: part of the key
        skip = "|skip" if self.on_corrupt == "skip" else ""
        h = hashlib.sha256(f"{self.image_size}|{self.channels}{skip}".encode())
        root = len(str(self.root)) + 1
        for split, files in self._files.items():
            for path, label in files:
                st = os.stat(path)
                h.update(f"{split}|{path[root:]}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def load_splits(self) -> dict[str, Split]:
        if self.streamed:
            decoded = {
                name: FileSplit([f for f, _ in files], torch.tensor([y for _, y in files], dtype=torch.long))
                for name, files in self._files.items()
            }
        else:
            decoded = {
                name: decode_files(files, self.channels, self.image_size, self.on_corrupt == "skip")
                for name, files in self._files.items()
            }
        train = decoded["train"]
        if "test" not in decoded:
            train, decoded["test"] = carve(train, self.test_fraction, self.split_seed, "data.test_fraction")
        if "val" not in decoded:
            share = self.val_fraction / (1.0 - (self.test_fraction if "test" not in self._files else 0.0))
            train, decoded["val"] = carve(train, share, self.split_seed, "data.val_fraction")
        decoded["train"] = train
        return decoded


class FakeDataModule(ImageDataModule):
    """torchvision's FakeData: random images and labels, for smoke tests; accuracy stays at chance.

    Args:
        train_size: images in the training split.
        val_size: images in the validation split.
        test_size: images in the test split.
        **kwargs: see :class:`ImageDataModule`; ``image_size`` is required.
    """

    def __init__(self, train_size: int = 256, val_size: int = 64, test_size: int = 64, **kwargs) -> None:
        super().__init__(**kwargs)
        if self.image_size is None:
            raise ValueError("data.image_size is required for data=fake")
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}

    def load_splits(self) -> dict[str, Split]:
        from torchvision.datasets import FakeData
        from torchvision.transforms.v2.functional import pil_to_tensor

        splits, offset = {}, self.split_seed * 1_000_003
        for name, size in self.sizes.items():
            ds = FakeData(
                size,
                (self.channels, self.image_size, self.image_size),
                self.num_classes,
                random_offset=offset,
            )
            offset += size
            pairs = [ds[i] for i in range(size)]
            images = torch.stack([pil_to_tensor(img) for img, _ in pairs])
            if images.shape[1] != self.channels:  # FakeData gives PIL "L" or "RGB"
                images = images.expand(-1, self.channels, -1, -1).contiguous()
            splits[name] = Split(images, torch.tensor([int(t) for _, t in pairs], dtype=torch.long))
        return splits


class GaussianDataModule(ImageDataModule):
    """Unit-Gaussian input vectors with random labels: the lecture's weight-initialization study ("assume some
    unit gaussian 10-D input data": ``D = np.random.randn(1000, 500)``).

    Samples are float (N, features, 1, 1) tensors, so a flattening model (``model=mlp``) sees 500-vectors; use
    ``preprocess=none`` (floats pass through unchanged).

    Args:
        train_size: vectors in the training split (lecture: 1000).
        val_size: vectors in the validation split.
        test_size: vectors in the test split.
        **kwargs: see :class:`ImageDataModule`; ``channels`` is the vector length (lecture: 500).
    """

    def __init__(self, train_size: int = 1000, val_size: int = 100, test_size: int = 100, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}

    def load_splits(self) -> dict[str, Split]:
        gen = torch.Generator().manual_seed(self.split_seed)
        return {
            name: Split(
                torch.randn(size, self.channels, 1, 1, generator=gen),
                torch.randint(0, self.num_classes, (size,), generator=gen),
            )
            for name, size in self.sizes.items()
        }
