"""Building blocks shared by the model families: activation factory, stochastic depth, declared structure.

Every classifier of the zoo declares its structure as timm's models do (timm ``FeatureInfo`` and
``get_classifier``), so tools that need its stages or its head (``transfer``, stage probes) ask the model and
never guess from module names:

- ``feature_info``: one :class:`FeatureInfo` per stage, bottom to top.
- ``forward_features(x)``: the trunk, up to the last stage's features (``(N, C, H, W)``; MLP: ``(N, C)``).
- ``forward_head(features, pre_logits=False)``: the rest; ``forward_head(forward_features(x))`` is
  ``forward(x)`` in eval mode. ``pre_logits=True`` stops at the input of the classifier that
  :meth:`get_classifier` returns.
- ``get_classifier()``: the module whose outputs are the logits, or a tuple of them with the main one first
  and the auxiliary heads' last layers after it (GoogLeNet with ``aux_logits``): exactly the parameters that
  depend on the class count.
- ``reset_classifier(num_classes)``: replaces those modules with freshly initialized ones (the family's own
  init) of ``num_classes`` outputs, on the old ones' device and dtype, and touches nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypedDict

import torch
from torch import nn

ActFactory = Callable[[], nn.Module]

_ACTIVATIONS: dict[str, ActFactory] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": lambda: nn.LeakyReLU(0.01, inplace=True),
    "gelu": nn.GELU,
    "identity": nn.Identity,
}


class FeatureInfo(TypedDict):
    """One stage of a classifier's trunk, as timm's ``feature_info`` entries describe it.

    ``reduction`` is the product of the strides up to the stage's end: the input side over the feature side,
    up to the rounding of unpadded convs and pools (the lecture's AlexNet: 227 → 27 after a stride of 8).
    """

    module: str  # dotted name of the module whose output ends the stage
    num_chs: int  # channels of that output
    reduction: int  # input side / feature side


def get_act_layer(act: str | ActFactory | None) -> ActFactory:
    """Resolves an activation given by name (``"relu"``, ``"tanh"``, …) or as a factory to a factory.

    Args:
        act: a name, a zero-argument callable returning a module, or ``None`` (identity).
    """
    if act is None:
        return nn.Identity
    if isinstance(act, str):
        if act not in _ACTIVATIONS:
            raise ValueError(f"model.act_layer={act!r} is not one of {sorted(_ACTIVATIONS)}")
        return _ACTIVATIONS[act]
    if callable(act):
        return act
    raise TypeError(f"act_layer must be a name or a callable, got {type(act).__name__}")


def drop_path_rates(num_blocks: int, drop_path: float) -> list[float]:
    """Per-block drop rates of the linear decay rule, Huang et al. 2016 §3 eq. (4).

    Survival p_l = 1 − l/L · (1 − p_L) for block l = 1…L, so the drop rate rises linearly from
    ``drop_path/L`` at the first block to ``drop_path`` at the last.
    """
    return [drop_path * (i + 1) / num_blocks for i in range(num_blocks)]


class DropPath(nn.Module):
    """Stochastic depth on a residual branch (Huang et al. 2016): in training, zero the branch of each sample
    with probability ``p`` and scale survivors by 1/(1−p); at test time the block is used whole.

    Args:
        p: probability of dropping the branch.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop_path rate must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p:.4f}"


def new_linear(old: nn.Linear, out_features: int) -> nn.Linear:
    """A freshly initialized (PyTorch's default) ``nn.Linear`` shaped like ``old`` but with ``out_features``
    outputs, on its device and dtype: what ``reset_classifier`` puts in place of a linear head."""
    return nn.Linear(
        old.in_features,
        out_features,
        bias=old.bias is not None,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
