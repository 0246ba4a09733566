"""The ``regularizer`` group: explicit penalty terms added to the training loss.

The LightningModule calls ``regularizer(model)`` each training step and adds what it returns to the loss.
Weight decay inside the optimizer (``optimizer.weight_decay``) is the other, implicit, L2 route.
"""

from __future__ import annotations

import torch
from torch import nn


class Regularizer:
    """No explicit penalty: the loss is the data term alone.

    Subclasses return a scalar tensor from :meth:`__call__`.
    """

    def __call__(self, model: nn.Module) -> torch.Tensor | None:
        """The penalty for ``model``'s current weights, or ``None`` when there is none."""
        return None
