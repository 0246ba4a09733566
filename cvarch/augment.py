"""The ``augment`` group: random transforms of training images, applied to uint8 (C, H, W) tensors.

Options list torchvision ``transforms.v2`` transforms as data (``transforms: [{_target_: ...}, ...]``);
validation and test images are never augmented.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2


class Augment:
    """A composition of per-sample training transforms; an empty list is the identity.

    Args:
        transforms: callables on uint8 (C, H, W) tensors, applied in order.
    """

    def __init__(self, transforms: Sequence[Callable[[torch.Tensor], torch.Tensor]] = ()) -> None:
        self.transforms = list(transforms)
        self.pipeline = v2.Compose(self.transforms) if self.transforms else None

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image if self.pipeline is None else self.pipeline(image)

    def __repr__(self) -> str:
        return f"Augment({self.transforms})"
