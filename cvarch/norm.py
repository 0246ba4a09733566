"""The ``norm`` group: what fills every normalization slot of a model.

Each option is a factory called as ``norm(num_channels)``; models resolve a string or a callable once, at the
top of their constructor, through :func:`get_norm_layer` (timm's ``get_norm_layer`` pattern).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

NormFactory = Callable[[int], nn.Module]


class FrozenStatsBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that normalizes with its running statistics, and never updates them, even in training mode.

    The "frozen BN" of transfer learning (Detectron's ``FrozenBatchNorm2d``, but with γ and β still trained):
    small or correlated fine-tuning batches would otherwise overwrite the pretrained statistics. It stays an
    ``nn.BatchNorm2d`` with the same parameters and buffers, so torchvision's state_dicts load with
    ``strict=True`` and ``isinstance`` checks still find it. Ioffe & Szegedy 2015, §3.1 (inference mode).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        # training=False: the lecture's test-time BN (running averages) in every mode; no buffer is touched
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


def batchnorm(
    num_channels: int, momentum: float = 0.1, eps: float = 1e-5, freeze_stats: bool = False
) -> nn.BatchNorm2d:
    """Batch normalization over (N, H, W) per channel. Ioffe & Szegedy 2015, Alg. 1 (train) and Alg. 2 (test).

    As the lecture puts it, BN is usually inserted after FC or conv layers and before the nonlinearity; in
    training it normalizes with the batch's statistics, and at test time BN uses the running averages.

    Args:
        num_channels: channels C of the (N, C, H, W) input.
        momentum: weight of the newest batch in the running mean/variance (PyTorch convention; 0.1).
        eps: added to the variance for numerical stability (paper: ε; 1e-5).
        freeze_stats: keep the running statistics fixed and normalize with them in training too, while γ and β
            still train (:class:`FrozenStatsBatchNorm2d`; fine-tuning a pretrained net on small batches).
    """
    cls = FrozenStatsBatchNorm2d if freeze_stats else nn.BatchNorm2d
    return cls(num_channels, eps=eps, momentum=momentum)


def none(num_channels: int) -> nn.Identity:
    """No normalization: the slot becomes an identity (the pre-2015 nets, e.g. VGG as published).

    Args:
        num_channels: ignored; accepted so every norm is called the same way.
    """
    return nn.Identity()


def lrn(
    num_channels: int, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0
) -> nn.Module:
    """Local response normalization across channels, Krizhevsky et al. 2012 §3.3 (n=5, α=1e-4, β=0.75, k=2).

    Args:
        num_channels: ignored (LRN has no parameters); accepted so every norm is called the same way.
        size: neighbouring channels summed over (n).
        alpha: scale α. PyTorch divides α by ``size``; the paper does not, so α·size is passed here.
        beta: exponent β.
        k: additive constant k.
    """
    return nn.LocalResponseNorm(size, alpha=alpha * size, beta=beta, k=k)


class GroupNorm(nn.GroupNorm):
    """Group normalization (Wu & He 2018) called as ``norm(num_channels)``, with ``groups`` fixed up front.

    A layer narrower than G gets one channel per group (G = C), so G=32 also fills the 16-channel layers of
    the CIFAR ResNets.

    Args:
        num_channels: channels C; must be divisible by ``groups`` when C > ``groups``.
        groups: channel groups G (paper default 32).
        eps: added to the variance.
    """

    def __init__(self, num_channels: int, groups: int = 32, eps: float = 1e-5) -> None:
        groups = min(groups, num_channels)
        if num_channels % groups:
            raise ValueError(f"norm.groups={groups} does not divide a layer's {num_channels} channels")
        super().__init__(groups, num_channels, eps=eps)


class LayerNorm2d(nn.LayerNorm):
    """Layer normalization over the channels of each (n, h, w) position of an (N, C, H, W) map (Ba 2016).

    The channels-only variant conv nets use (ConvNeXt's ``LayerNorm2d``, Liu et al. 2022): per-channel γ and β
    (2C parameters), no running statistics, so training and test behave alike and no sample sees another.

    Args:
        num_channels: channels C, the dimension normalized over.
        eps: added to the variance (PyTorch's ``nn.LayerNorm``: 1e-5; ConvNeXt: 1e-6).
    """

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (N, H, W, C): layer_norm normalizes the trailing dims
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # back to (N, C, H, W)


_BY_NAME: dict[str, NormFactory] = {
    "batchnorm": batchnorm,
    "none": none,
    "lrn": lrn,
    "groupnorm": GroupNorm,
    "layernorm": LayerNorm2d,
}


def get_norm_layer(norm: str | NormFactory | None) -> NormFactory:
    """Resolves a norm given by name (``"batchnorm"``), as a factory, or ``None`` (no norm) to a factory.

    Args:
        norm: the ``norm`` group's instantiated option, a name, or ``None``.
    """
    if norm is None:
        return none
    if isinstance(norm, str):
        if norm not in _BY_NAME:
            raise ValueError(f"unknown norm {norm!r}; expected one of {sorted(_BY_NAME)} or a callable")
        return _BY_NAME[norm]
    if isinstance(norm, partial) and norm.func is none:
        return (
            none  # the norm group's `none` arrives as a partial; unwrapped, `get_norm_layer(x) is none` works
        )
    if callable(norm):
        return norm
    raise TypeError(f"norm_layer must be a name or a callable norm(num_channels), got {type(norm).__name__}")
