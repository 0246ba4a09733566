"""The ``norm`` group: what fills every normalization slot of a model.

Each option is a factory called as ``norm(num_channels)``; models resolve a string or a callable once, at the top
of their constructor, through :func:`get_norm_layer` (timm's ``get_norm_layer`` pattern).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

NormFactory = Callable[[int], nn.Module]


def batchnorm(num_channels: int, momentum: float = 0.1, eps: float = 1e-5) -> nn.BatchNorm2d:
    """Batch normalization over (N, H, W) per channel. Ioffe & Szegedy 2015, Alg. 1.

    Args:
        num_channels: channels C of the (N, C, H, W) input.
        momentum: weight of the newest batch in the running mean/variance (PyTorch convention; 0.1).
        eps: added to the variance for numerical stability (paper: ε; 1e-5).
    """
    return nn.BatchNorm2d(num_channels, eps=eps, momentum=momentum)


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

    Args:
        num_channels: channels C; must be divisible by ``groups``.
        groups: channel groups G (paper default 32).
        eps: added to the variance.
    """

    def __init__(self, num_channels: int, groups: int = 32, eps: float = 1e-5) -> None:
        if num_channels % groups:
            raise ValueError(f"norm.groups={groups} does not divide a layer's {num_channels} channels")
        super().__init__(groups, num_channels, eps=eps)


_BY_NAME: dict[str, NormFactory] = {"batchnorm": batchnorm, "none": none, "lrn": lrn, "groupnorm": GroupNorm}


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
