"""VGG family: Simonyan & Zisserman 2014, "Very Deep Convolutional Networks…" (arXiv:1409.1556).

Configurations A, B, D, E of Table 1 are lists in ``conf/model/vgg{11,13,16,19}.yaml``, as torchvision's
``cfgs`` dict keeps them. Attribute names follow torchvision's ``vgg.py`` (``features``, ``avgpool``,
``classifier``): ``vgg16`` loads torchvision's ``vgg16`` weights, ``vgg16 norm=batchnorm`` ``vgg16_bn``'s.

Its stages end at the max-pools; its classifier is the last Linear (see :mod:`cvarch.models.layers`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cvarch.models.layers import ActFactory, FeatureInfo, get_act_layer, new_linear
from cvarch.norm import NormFactory, get_norm_layer


class VGG(nn.Module):
    """Stacks of 3×3 convs and 2×2 max-pools, then three fully connected layers (Simonyan 2014 Table 1).

    Every conv is 3×3, stride 1, padding 1 (§2.1), so only the max-pools (2×2, stride 2) halve the resolution.
    A norm slot follows every conv; it holds no module when the norm is ``none`` (the paper's nets), and a
    BatchNorm2d with ``norm=batchnorm``, which gives torchvision's ``vgg*_bn`` layout.

    Args:
        cfg: a column of Table 1: conv widths, and ``"M"`` for a max-pool; configuration A (VGG-11) is
            ``[64, M, 128, M, 256, 256, M, ...]``.
        num_classes: outputs of the last fully connected layer.
        in_channels: input image channels.
        norm_layer: norm name or ``norm(num_channels)`` factory after every conv (paper: none).
        act_layer: activation name or factory after every conv and hidden FC (paper: ReLU, §2.1).
        dropout: dropout on the outputs of the two hidden FCs (§3.1: 0.5).
    """

    def __init__(
        self,
        cfg: Sequence[int | str],
        num_classes: int = 1000,
        in_channels: int = 3,
        norm_layer: str | NormFactory | None = None,
        act_layer: str | ActFactory = "relu",
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        norm = get_norm_layer(norm_layer)
        act = get_act_layer(act_layer)
        layers: list[nn.Module] = []
        self.feature_info: list[FeatureInfo] = []
        channels, stride = in_channels, 1
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                stride *= 2
                # each max-pool ends a stage: Table 1's five groups of convs
                self.feature_info.append(
                    FeatureInfo(module=f"features.{len(layers) - 1}", num_chs=channels, reduction=stride)
                )
            elif isinstance(v, str):
                raise ValueError(f"model.cfg: {v!r} is neither a conv width nor 'M'")
            else:
                layers.append(nn.Conv2d(channels, v, kernel_size=3, padding=1))
                slot = norm(v)
                # an empty slot (norm=none) adds no module, so torchvision's indices hold
                if not isinstance(slot, nn.Identity):
                    layers.append(slot)
                layers.append(act())
                channels = v
        self.features = nn.Sequential(*layers)
        # the last stage ends where the features do: at the last pool, or at the convs after it
        if self.feature_info and self.feature_info[-1]["reduction"] == stride:
            self.feature_info.pop()
        self.feature_info.append(
            FeatureInfo(module=f"features.{len(layers) - 1}", num_chs=channels, reduction=stride)
        )
        # torchvision's addition: any input ≥ 32×32 reaches FC6 as 7×7 (the paper's 224 → 7 after five pools)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(channels * 7 * 7, 4096),
            act(),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            act(),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )

        for m in self.modules():
            _init_weights(m)

    def get_classifier(self) -> nn.Linear:
        """The last fully connected layer (FC-1000 of Table 1): FC6 and FC7 are pretrained features."""
        return self.classifier[-1]

    def reset_classifier(self, num_classes: int) -> None:
        """A new last Linear of ``num_classes`` outputs, initialized as the constructor does."""
        fc = new_linear(self.classifier[-1], num_classes)
        _init_weights(fc)
        self.classifier[-1] = fc

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # (N, 512, 7, 7) at 224×224

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.avgpool(x)  # (N, 512, 7, 7)
        x = torch.flatten(x, 1)  # (N, 25088)
        for layer in self.classifier[:-1]:  # FC6, FC7 with their activations and dropouts
            x = layer(x)  # (N, 4096)
        return x if pre_logits else self.classifier[-1](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(m: nn.Module) -> None:
    """torchvision's init (the paper pre-trained A and used it to start the deeper nets, §3.1; it notes after
    submission that Glorot & Bengio 2010 init works without pre-training)."""
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.constant_(m.bias, 0)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0, 0.01)
        nn.init.constant_(m.bias, 0)
