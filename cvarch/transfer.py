"""The ``transfer`` group: how a model starts from, or reuses, pretrained weights.

``scratch`` trains every weight from its initialization.
"""

from __future__ import annotations

from torch import nn

STRATEGIES = ("scratch",)


def apply_transfer(model: nn.Module, strategy: str = "scratch") -> nn.Module:
    """Prepares ``model`` for a transfer strategy in place and returns it.

    Args:
        model: the built, initialized model.
        strategy: ``scratch`` (no pretrained weights; every parameter trains).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"transfer.strategy={strategy!r} is not one of {STRATEGIES}")
    return model
