"""Synthetic datasets: random images (``data=fake``) and the lecture's Gaussian vectors (``data=gaussian``).

Random images are for smoke tests (accuracy stays at chance); the vectors for the weight-initialization study.
"""

from __future__ import annotations

import torch

from cvarch.data.datamodule import ImageDataModule
from cvarch.data.splits import Split


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
