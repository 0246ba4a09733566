"""The ``regularizer`` group: explicit penalty terms added to the training loss, ``L = data loss + λ·R(W)``.

The LightningModule calls ``regularizer(model)`` each training step, adds what it returns to the loss, and
logs it apart from the data loss (``train/penalty``, ``train/data_loss``). The optimizer's ``weight_decay`` is
the other, implicit route to L2; for plain or momentum SGD, ``weight_decay=wd`` is exactly ``l2`` with
``λ = wd/2`` (the README explains when the two differ).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


class Regularizer:
    """No explicit penalty: the loss is the data term alone. The base of every option.

    Args:
        weight: λ, the strength of the penalty.
        include_biases: also penalize biases (by default they are free, as is usual since AlexNet's code).
        include_norm: also penalize normalization parameters (BatchNorm γ, β …; free by default).
    """

    def __init__(self, weight: float = 0.0, include_biases: bool = False, include_norm: bool = False) -> None:
        if weight < 0:
            raise ValueError(f"regularizer.weight must be >= 0, got {weight}")
        self.weight = weight
        self.include_biases = include_biases
        self.include_norm = include_norm

    def parameters(self, model: nn.Module) -> Iterator[nn.Parameter]:
        """The trainable parameters the penalty covers."""
        for module in model.modules():
            if isinstance(module, NORM_TYPES) and not self.include_norm:
                continue
            for name, param in module.named_parameters(recurse=False):
                if param.requires_grad and (self.include_biases or name != "bias"):
                    yield param

    def term(self, param: torch.Tensor) -> torch.Tensor:
        """R for one parameter tensor; ``None`` in the base class (no penalty)."""
        raise NotImplementedError

    def __call__(self, model: nn.Module) -> torch.Tensor | None:
        """λ·Σ R(W) over the covered parameters, or ``None`` when there is no penalty."""
        if type(self) is Regularizer or self.weight == 0.0:
            return None
        return self.weight * sum(self.term(p) for p in self.parameters(model))


class L2(Regularizer):
    """Weight decay in the loss: ``λ·ΣW²`` (the lecture's L2 regularization; AlexNet: wd 5e-4 in SGD)."""

    def term(self, param: torch.Tensor) -> torch.Tensor:
        return param.square().sum()


class L1(Regularizer):
    """Lasso: ``λ·Σ|W|``, which drives weights to exactly zero more than L2 does (Tibshirani 1996)."""

    def term(self, param: torch.Tensor) -> torch.Tensor:
        return param.abs().sum()


class ElasticNet(Regularizer):
    """Elastic net: ``λ·Σ(β·W² + |W|)`` (Zou & Hastie 2005), the lecture's combination of L1 and L2.

    Args:
        beta: weight of the squared term relative to the absolute one.
        **kwargs: see :class:`Regularizer`.
    """

    def __init__(self, beta: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.beta = beta

    def term(self, param: torch.Tensor) -> torch.Tensor:
        return self.beta * param.square().sum() + param.abs().sum()
