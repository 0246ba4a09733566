"""ExampleNet: a small conv-pool stack with global average pooling, as a cvarch plugin ships a model.

Each stage is a 3×3 conv, a norm slot, an activation and a 2×2 max-pool (the VGG pattern, Simonyan & Zisserman
2014 §2.1); the head is global average pooling then one linear layer (Network in Network, Lin et al. 2013
§3.2). It follows cvarch's model conventions: ``num_classes`` and ``in_channels`` from the data, the ``norm``
group's factory in ``norm_layer``, torchvision's attribute names (``features``, ``avgpool``, ``fc``), and the
structure every cvarch classifier declares (``feature_info``, ``forward_features``, ``forward_head``,
``get_classifier``, ``reset_classifier``: see ``cvarch.models.layers``) that transfer and stage probes use.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cvarch.models.layers import ActFactory, FeatureInfo, get_act_layer
from cvarch.norm import NormFactory, get_norm_layer


class ExampleNet(nn.Module):
    """``len(widths)`` × (3×3 conv → norm → act → 2×2 max-pool), global average pool, dropout, linear.

    Init: PyTorch's defaults; the ``init`` group re-initializes it like any cvarch model.

    Args:
        widths: output channels of each stage; each halves the resolution (8×8 digits: two stages → 2×2).
        num_classes: outputs of the final ``fc``.
        in_channels: input image channels.
        norm_layer: norm name or ``norm(num_channels)`` factory after every conv.
        act_layer: activation name or factory after every norm.
        dropout: dropout rate before ``fc``.
    """

    def __init__(
        self,
        widths: Sequence[int] = (16, 32),
        num_classes: int = 10,
        in_channels: int = 3,
        norm_layer: str | NormFactory | None = "batchnorm",
        act_layer: str | ActFactory = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        norm = get_norm_layer(norm_layer)
        act = get_act_layer(act_layer)
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            layers += [
                nn.Conv2d(channels, width, 3, padding=1, bias=False),
                norm(width),
                act(),
                nn.MaxPool2d(2),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.feature_info = [
            FeatureInfo(module=f"features.{4 * i + 3}", num_chs=width, reduction=2 ** (i + 1))
            for i, width in enumerate(widths)
        ]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # (N, widths[-1], H / 2^stages, W / 2^stages)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)  # (N, widths[-1])
        x = self.dropout(x)
        return x if pre_logits else self.fc(x)  # (N, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.fc.in_features, num_classes, device=self.fc.weight.device)
