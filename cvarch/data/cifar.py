"""The ``data=cifar10`` and ``data=cifar100`` datasets, through torchvision, with the official test split."""

from __future__ import annotations

import torch

from cvarch.data.datamodule import ImageDataModule
from cvarch.data.decode import resize_images
from cvarch.data.splits import Split, carve


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
