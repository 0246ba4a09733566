"""DenseNet family: Huang et al. 2017, "Densely Connected Convolutional Networks" (arXiv:1608.06993).

Every variant is DenseNet-BC (§3): bottleneck dense layers (BN-ReLU-Conv1×1 to ``bn_size``·k channels,
BN-ReLU-Conv3×3 to k) and compressing transitions (θ = ``compression``). The ImageNet nets (Table 1) and the
CIFAR net (§4, Table 2) are settings of one :class:`DenseNet`. Attribute names follow torchvision's
``densenet.py`` (``features.conv0``, ``denseblock1.denselayer1.norm1``, ``transition1.conv``, ``norm5``,
``classifier``) so its ``state_dict`` loads with ``strict=True``. Its stages end with the dense blocks (the
ImageNet stem is one more); its classifier is ``classifier`` (see :mod:`cvarch.models.layers`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from cvarch.models.layers import ActFactory, FeatureInfo, get_act_layer, new_linear
from cvarch.norm import NormFactory, get_norm_layer


class DenseLayer(nn.Module):
    """Bottleneck dense layer H_ℓ: BN-ReLU-Conv1×1 (``bn_size``·k) then BN-ReLU-Conv3×3 (k), Huang 2017 §3.

    Dropout follows each of its two convs (§4.2: "a dropout layer after each convolutional layer").

    Args:
        in_channels: channels of the concatenation of all earlier feature maps of the block.
        growth_rate: k, the channels this layer adds.
        bn_size: bottleneck width in multiples of k (paper: 4).
        norm: ``norm(num_channels)`` factory.
        act: activation factory.
        dropout: drop probability after each conv.
    """

    def __init__(
        self,
        in_channels: int,
        growth_rate: int,
        bn_size: int,
        norm: NormFactory,
        act: ActFactory,
        dropout: float,
    ) -> None:
        super().__init__()
        width = bn_size * growth_rate
        self.norm1 = norm(in_channels)
        self.relu1 = act()
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.drop1 = nn.Dropout(dropout)
        self.norm2 = norm(width)
        self.relu2 = act()
        self.conv2 = nn.Conv2d(width, growth_rate, 3, padding=1, bias=False)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm1(x)  # x: all earlier feature maps of the block, concatenated
        out = self.relu1(out)
        out = self.conv1(out)  # (N, bn_size·k, H, W)
        out = self.drop1(out)
        out = self.norm2(out)
        out = self.relu2(out)
        out = self.conv2(out)  # (N, k, H, W)
        return self.drop2(out)


class DenseBlock(nn.ModuleDict):
    """Dense block: layer ℓ sees the concatenation [x_0, …, x_{ℓ−1}] of all earlier outputs (Huang 2017 (2)).

    A ``ModuleDict`` of ``denselayer1``… as torchvision's ``_DenseBlock``.

    Args:
        num_layers: dense layers in the block.
        in_channels: channels entering the block (k_0).
        growth_rate: k.
        bn_size: bottleneck width in multiples of k.
        norm: ``norm(num_channels)`` factory.
        act: activation factory.
        dropout: drop probability after each conv.
    """

    def __init__(
        self,
        num_layers: int,
        in_channels: int,
        growth_rate: int,
        bn_size: int,
        norm: NormFactory,
        act: ActFactory,
        dropout: float,
    ) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = DenseLayer(in_channels + i * growth_rate, growth_rate, bn_size, norm, act, dropout)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)  # (N, k_0 + num_layers·k, H, W)


class Transition(nn.Sequential):
    """Transition between dense blocks: BN-ReLU-Conv1×1 to ⌊θ·m⌋ channels, then 2×2 average pool (§3).

    Args:
        in_channels: m, the channels leaving the dense block.
        out_channels: ⌊θ·m⌋.
        norm: ``norm(num_channels)`` factory.
        act: activation factory.
        dropout: drop probability after the conv (§4.2).
    """

    def __init__(
        self, in_channels: int, out_channels: int, norm: NormFactory, act: ActFactory, dropout: float
    ) -> None:
        super().__init__()
        self.norm = norm(in_channels)
        self.relu = act()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.drop = nn.Dropout(dropout)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """DenseNet-BC of Huang et al. 2017 (Table 1, §3); variants are data in ``conf/model/``.

    Args:
        growth_rate: k, the channels each dense layer adds (Table 1: 32; 48 for DenseNet-161; CIFAR: 12).
        block_config: dense layers per block, e.g. ``[6, 12, 24, 16]`` (DenseNet-121) or ``[16, 16, 16]``.
        num_init_features: channels of the stem conv (2k in the paper; 96 for DenseNet-161).
        bn_size: bottleneck 1×1 conv width in multiples of k (§3 DenseNet-B: 4).
        compression: θ, transition output channels ⌊θ·m⌋ for m inputs (§3 DenseNet-C: 0.5).
        stem: ``imagenet`` (7×7/2 conv, BN-ReLU, 3×3/2 max-pool, Table 1) or ``cifar`` (one 3×3 conv and no
            pool, §3 Implementation Details; no BN-ReLU of its own, as the first dense layer starts with one).
        num_classes: outputs of the ``classifier``.
        in_channels: input image channels.
        norm_layer: norm name or ``norm(num_channels)`` factory (the ``norm`` group).
        act_layer: activation name or factory (paper: ReLU).
        dropout: drop probability after every conv but the stem (§4.2: 0.2 without augmentation; tv: 0).
    """

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        compression: float = 0.5,
        stem: str = "imagenet",
        num_classes: int = 1000,
        in_channels: int = 3,
        norm_layer: str | NormFactory | None = "batchnorm",
        act_layer: str | ActFactory = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"model.stem={stem!r} is not one of ['cifar', 'imagenet']")
        if not 0.0 < compression <= 1.0:
            raise ValueError(f"model.compression={compression} must be in (0, 1]")
        norm = get_norm_layer(norm_layer)
        act = get_act_layer(act_layer)
        self.feature_info: list[FeatureInfo] = []
        if stem == "imagenet":
            conv0 = nn.Conv2d(in_channels, num_init_features, 7, stride=2, padding=3, bias=False)
            stem_layers = [
                ("conv0", conv0),
                ("norm0", norm(num_init_features)),
                ("relu0", act()),
                ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
            ]
            # the stem is a stage of its own, ending before its max-pool (timm's DenseNet)
            self.feature_info = [FeatureInfo(module="features.relu0", num_chs=num_init_features, reduction=2)]
            reduction = 4
        else:
            stem_layers = [("conv0", nn.Conv2d(in_channels, num_init_features, 3, padding=1, bias=False))]
            reduction = 1
        self.features = nn.Sequential(OrderedDict(stem_layers))
        channels = num_init_features
        for i, num_layers in enumerate(block_config):
            block = DenseBlock(num_layers, channels, growth_rate, bn_size, norm, act, dropout)
            self.features.add_module(f"denseblock{i + 1}", block)
            channels += num_layers * growth_rate
            if i != len(block_config) - 1:
                # a stage ends with its dense block, before the transition pools (timm's DenseNet)
                self.feature_info.append(
                    FeatureInfo(module=f"features.denseblock{i + 1}", num_chs=channels, reduction=reduction)
                )
                reduction *= 2
                out_channels = int(compression * channels)
                self.features.add_module(
                    f"transition{i + 1}", Transition(channels, out_channels, norm, act, dropout)
                )
                channels = out_channels
        self.features.add_module("norm5", norm(channels))
        self.feature_info.append(FeatureInfo(module="features.norm5", num_chs=channels, reduction=reduction))
        self.relu = act()
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(channels, num_classes)

        for m in self.modules():
            _init_weights(m)

    def get_classifier(self) -> nn.Linear:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        """A new ``classifier`` of ``num_classes`` outputs, initialized as the constructor does."""
        self.classifier = new_linear(self.classifier, num_classes)
        _init_weights(self.classifier)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, C, H/32, W/32) imagenet stem; (N, C, H/4, W/4) cifar stem with 3 blocks
        return self.relu(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.avgpool(x)  # (N, C, 1, 1)
        x = torch.flatten(x, 1)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(m: nn.Module) -> None:
    """torchvision's init ("official init from torch repo"): He normal fan_in convs, γ=1, β=0, fc bias 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.Linear):
        nn.init.constant_(m.bias, 0)
