"""A deep MLP for the lecture's weight-initialization study (10 hidden layers of 500 tanh units).

The hidden layers are exposed as ``hidden[i].fc`` / ``hidden[i].act`` so the study can hook their
pre-activations and activations layer by layer, as Glorot & Bengio 2010 §4 plot them.

Its one stage is ``hidden``; its classifier is ``fc`` (see :mod:`cvarch.models.layers`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from cvarch.models.layers import ActFactory, FeatureInfo, get_act_layer, new_linear


class MLP(nn.Module):
    """Multilayer perceptron on flattened images: ``depth`` × (Linear → act), then Linear to the classes.

    Init: PyTorch's ``nn.Linear`` default, U(±1/√fan_in) for weights and biases; the ``init`` group's schemes
    are what the study varies.

    Args:
        in_features: inputs per sample, C·H·W of the images (8×8 digits: 64; the lecture's study: 500).
        depth: hidden layers (lecture: 10).
        width: units per hidden layer (lecture: 500).
        num_classes: outputs of the final ``fc``.
        act_layer: activation name or factory after every hidden Linear (lecture: tanh).
        bias: whether every Linear has a bias.
    """

    def __init__(
        self,
        in_features: int = 64,
        depth: int = 10,
        width: int = 500,
        num_classes: int = 1000,
        act_layer: str | ActFactory = "tanh",
        bias: bool = True,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"model.depth={depth} must be at least 1 hidden layer")
        act = get_act_layer(act_layer)
        self.in_features = in_features
        self.hidden = nn.Sequential()
        for i in range(depth):
            fc = nn.Linear(in_features if i == 0 else width, width, bias=bias)
            self.hidden.append(nn.Sequential(OrderedDict(fc=fc, act=act())))
        self.fc = nn.Linear(width, num_classes, bias=bias)
        # one stage: a fully connected net has no resolutions to group its layers by; transfer.stages can list
        # single layers (hidden.0, hidden.4, …), whose outputs are (N, width) too
        self.feature_info = [FeatureInfo(module="hidden", num_chs=width, reduction=1)]

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """A new ``fc`` of ``num_classes`` outputs, with PyTorch's default Linear init, as constructed."""
        self.fc = new_linear(self.fc, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)  # (N, C·H·W)
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"model.in_features={self.in_features} but each input has {x.shape[1]} values "
                f"(C·H·W); set model.in_features={x.shape[1]}"
            )
        return self.hidden(x)  # (N, width)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
