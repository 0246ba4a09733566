"""The ``preprocess`` group: the lecture's "Step 1: preprocess the data", as a module inside the model wrapper.

Statistics are fitted on the training split only, before the first step, and live in buffers, so they are saved
in the checkpoint and evaluation reuses exactly the transform training used.
"""

from __future__ import annotations

import torch
from torch import nn


class Rescale(nn.Module):
    """Maps uint8 pixels to floats in [0, 1]; fits nothing. Every other option builds on it."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("fitted", torch.tensor(False))

    def fit(self, images: torch.Tensor) -> None:
        """Fits the statistics on the uint8 (N, C, H, W) training images."""
        self.fitted.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().div(255.0) if x.dtype == torch.uint8 else x


class Standardize(Rescale):
    """Per-channel standardization: subtract the channel mean and divide by the channel std.

    Both are computed over every pixel of the training split (the lecture's "subtract per-channel mean", VGG,
    plus the common division by the std).

    Args:
        eps: floor on the std, for constant channels.
    """

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(0))
        self.register_buffer("std", torch.ones(0))

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> None:
        channels = images.shape[1]
        total = torch.zeros(channels, dtype=torch.float64)
        squares = torch.zeros(channels, dtype=torch.float64)
        for chunk in images.split(4096):  # chunks keep float64 memory small on big splits
            x = chunk.to(torch.float64).div_(255.0)
            total += x.sum(dim=(0, 2, 3))
            squares += x.square().sum(dim=(0, 2, 3))
        count = images.numel() // channels
        mean = total / count
        std = (squares / count - mean.square()).clamp_min(0).sqrt().clamp_min(self.eps)
        self.mean = mean.float().view(channels, 1, 1)
        self.std = std.float().view(channels, 1, 1)
        self.fitted.fill_(True)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the buffers are empty until fitted: take the checkpoint's shapes before the strict copy
        for name in ("mean", "std"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean.numel() == 0:  # a shape test: no device sync per step
            raise RuntimeError("preprocess=standardize was used before fit() on the training images")
        return (super().forward(x) - self.mean) / self.std
