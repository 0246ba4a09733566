"""The ``optimizer`` group's parameter groups: which parameters decay, and which learn faster.

The optimizer itself is a ``torch.optim`` class, built from ``conf/optimizer/<option>.yaml`` as a partial.
Its ``groups`` sub-key is not a constructor argument: ``configure_optimizers`` passes it to
:func:`param_groups` and completes the partial with ``params=param_groups(...)``. Each group carries its own
``lr`` and ``weight_decay``, which override the partial's defaults.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import nn

# the norm layers whose shift β norm_bias_lr_mult scales (cvarch's own norms subclass these)
NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def matches(name: str, prefix: str) -> bool:
    """Whether the dotted parameter ``name`` lies under the module ``prefix``: "layer4" matches "layer4" and
    "layer4.0.conv1.weight", never "layer40.weight"."""
    return name == prefix or name.startswith(prefix + ".")


def _check_lr_mult(lr_mult: Mapping[str, float], names: list[str]) -> dict[str, float]:
    checked = {}
    for prefix, mult in lr_mult.items():
        key = f"optimizer.groups.lr_mult.{prefix}"
        if (
            isinstance(mult, bool)
            or not isinstance(mult, (int, float))
            or not math.isfinite(mult)
            or mult < 0
        ):
            raise ValueError(f"{key} must be a finite number >= 0, got {mult!r}")
        if not any(matches(name, str(prefix)) for name in names):
            roots = sorted({name.split(".")[0] for name in names})
            raise ValueError(f"{key} matches no parameter of the model; its top-level modules are {roots}")
        checked[str(prefix)] = float(mult)
    return checked


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    decay_norm_bias: bool = True,
    lr_mult: Mapping[str, float] | None = None,
    norm_bias_lr_mult: float = 1.0,
) -> list[dict[str, Any]]:
    """Splits the trainable parameters of ``model`` into ``torch.optim`` parameter groups.

    No-decay rule: timm's ``param_groups_weight_decay`` (``param.ndim <= 1``: biases, norm scales and
    shifts), the "no bias decay" of He et al. 2019 (Bag of Tricks) §3.1; the classic papers (AlexNet §5,
    ResNet §3.4) decay every weight. Per-layer learning rates: Caffe's ``lr_mult`` (its Flickr-style
    fine-tuning example boosts the new head), the discriminative fine-tuning of ULMFiT (Howard & Ruder 2018)
    §3.2.

    Args:
        model: the network; only parameters with ``requires_grad`` are grouped, frozen ones are left out.
        lr: base learning rate (the optimizer's ``lr``); a group's ``lr`` is ``lr * lr_mult``.
        weight_decay: the optimizer's ``weight_decay``, given to every decaying group.
        decay_norm_bias: ``False`` puts every parameter with ``ndim <= 1`` in a group with weight decay 0.
        lr_mult: module-name prefix (dotted, matched at a ``.`` boundary) → multiplier of ``lr``; the
            longest matching prefix wins and unmatched parameters get 1. Keys are checked against all
            parameters, frozen ones included: a typo fails, a key naming a frozen module does not.
        norm_bias_lr_mult: a further multiplier of the lr of every norm layer's shift β (BatchNorm,
            GroupNorm, LayerNorm). Their weight decay is divided by it, so the decay step lr·λ stays that
            of the other parameters: airbench's ``bias_scaler`` (Jordan 2024 §3.4: 64, "scales up the
            learning rate but not the weight decay" of the BN biases).

    Returns:
        One dict per (weight decay, multiplier) pair, in order of their first parameter in
        ``model.named_parameters()``: ``{"params", "names", "lr", "weight_decay", "lr_mult", "name"}``;
        ``name`` labels the group in Lightning's ``LearningRateMonitor`` (``lr-SGD/decay_x1``).

    Raises:
        ValueError: an ``lr_mult`` key that matches no parameter, or a multiplier that is negative or not a
            number.
    """
    named = list(model.named_parameters())
    prefixes = _check_lr_mult(lr_mult or {}, [name for name, _ in named])
    if isinstance(norm_bias_lr_mult, bool) or not (
        isinstance(norm_bias_lr_mult, (int, float))
        and math.isfinite(norm_bias_lr_mult)
        and norm_bias_lr_mult > 0
    ):
        raise ValueError(
            f"optimizer.groups.norm_bias_lr_mult must be a finite number > 0, got {norm_bias_lr_mult!r}"
        )
    norm_biases = {
        id(m.bias) for m in model.modules() if isinstance(m, NORMS) and getattr(m, "bias", None) is not None
    }
    # longest first: the first match is the most specific module
    by_length = sorted(prefixes, key=len, reverse=True)
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, param in named:
        if not param.requires_grad:
            continue
        mult = next((prefixes[p] for p in by_length if matches(name, p)), 1.0)
        decay = 0.0 if (not decay_norm_bias and param.ndim <= 1) else weight_decay
        if id(param) in norm_biases and norm_bias_lr_mult != 1.0:
            mult, decay = mult * norm_bias_lr_mult, decay / norm_bias_lr_mult
        if (decay, mult) not in groups:
            label = "decay" if decay else "no_decay"
            groups[decay, mult] = {
                "params": [],
                "names": [],
                "lr": lr * mult,
                "weight_decay": decay,
                "lr_mult": mult,
                "name": f"{label}_x{mult:g}",
            }
        groups[decay, mult]["params"].append(param)
        groups[decay, mult]["names"].append(name)
    return list(groups.values())
