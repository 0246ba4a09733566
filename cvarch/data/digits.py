"""The ``data=digits`` dataset: scikit-learn's 8×8 handwritten digits, real data with no download."""

from __future__ import annotations

import numpy as np
import torch

from cvarch.data.datamodule import ImageDataModule
from cvarch.data.decode import resize_images
from cvarch.data.splits import Split, carve


class DigitsDataModule(ImageDataModule):
    """scikit-learn's 1,797 handwritten digits (8×8, 17 grey levels), the default: real data, no download.

    Alpaydin & Kaynak 1998, UCI optdigits. Pixels 0–16 are mapped linearly to 0–255.

    Args:
        val_fraction: stratified share of all images used for validation; 0: none (train on the rest).
        test_fraction: stratified share of all images used for testing.
        **kwargs: see :class:`ImageDataModule`; ``channels`` is 1 (grey) or 3 (the grey digit in three
            identical channels, so a network trained on RGB images takes digits).
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
        if self.val_fraction == 0:  # no validation: train on every non-test image
            return {"train": rest, "val": rest.subset([]), "test": test}
        train, val = carve(
            rest, self.val_fraction / (1.0 - self.test_fraction), self.split_seed, "data.val_fraction"
        )
        return {"train": train, "val": val, "test": test}
