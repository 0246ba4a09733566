"""ResNet family: He et al. 2015, "Deep Residual Learning for Image Recognition" (arXiv:1512.03385).

Basic and bottleneck blocks side by side; the ImageNet nets (§3.4, Table 1) and the CIFAR nets (§4.2) are
settings of one :class:`ResNet`. Attribute names follow torchvision's ``resnet.py`` (``conv1``, ``bn1``,
``layer1``…, ``downsample``, ``fc``) so its ``state_dict`` loads with ``strict=True``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cvarch.norm import NormFactory, get_norm_layer


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """3×3 convolution with padding 1 and no bias (the norm that follows has one)."""
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1×1 convolution without bias."""
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Shortcut option A (He 2015 §3.3, §4.2): identity, subsampled by ``stride``, zero-padded in channels.

    Parameter-free, as the paper's CIFAR nets use.

    Args:
        out_planes: channels of the block's output.
        stride: spatial subsampling of the block.
    """

    def __init__(self, out_planes: int, stride: int) -> None:
        super().__init__()
        self.out_planes = out_planes
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        missing = self.out_planes - x.shape[1]
        return F.pad(x, (0, 0, 0, 0, missing // 2, missing - missing // 2))


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with an identity shortcut (He 2015 Fig. 2 / Fig. 5 left).

    Args:
        inplanes: input channels.
        planes: output channels.
        stride: stride of the first conv (2 where a stage halves the resolution).
        downsample: shortcut for a shape change, or ``None`` for the identity.
        norm_layer: ``norm(num_channels)`` factory.
    """

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        norm_layer: NormFactory = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and width_per_group=64")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def zero_init_last(self) -> None:
        """Zeroes the last norm's γ so the block starts as an identity (Goyal et al. 2017, arXiv:1706.02677)."""
        if getattr(self.bn2, "weight", None) is not None:
            nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = out + identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3, 1×1 expand (×4), with the stride on the 3×3 as torchvision does (He 2015 Fig. 5 right).

    ``groups`` and ``base_width`` make it ResNeXt's block (Xie et al. 2016) and Wide ResNet-50-2's.

    Args:
        inplanes: input channels.
        planes: bottleneck channels before the ×4 expansion.
        stride: stride of the 3×3 conv.
        downsample: shortcut for a shape change, or ``None`` for the identity.
        groups: cardinality of the grouped 3×3 conv.
        base_width: width per group (64 = plain ResNet).
        norm_layer: ``norm(num_channels)`` factory.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        norm_layer: NormFactory = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def zero_init_last(self) -> None:
        """Zeroes the last norm's γ so the block starts as an identity (Goyal et al. 2017, arXiv:1706.02677)."""
        if getattr(self.bn3, "weight", None) is not None:
            nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv3(out)
        out = self.bn3(out)
        out = out + identity
        return self.relu(out)


BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """Residual network of He et al. 2015; variants are data in ``conf/model/`` (block, layers, widths, stem).

    Args:
        block: ``basic`` or ``bottleneck``.
        layers: residual blocks per stage, e.g. ``[3, 3, 3]`` (ResNet-20, §4.2) or ``[3, 4, 6, 3]`` (ResNet-50).
        widths: channels of each stage before the block expansion; stage i > 0 starts with stride 2.
        stem: ``imagenet`` (7×7/2 conv + 3×3/2 max-pool, Table 1) or ``cifar`` (one 3×3 conv, §4.2).
        shortcut: ``A`` (zero-padding identity, parameter-free) or ``B`` (1×1 projection) where shapes change.
        num_classes: outputs of the final ``fc``.
        in_channels: input image channels.
        groups: cardinality of bottleneck 3×3 convs (ResNeXt).
        width_per_group: bottleneck width per group (64 = ResNet; 128 = Wide ResNet-50-2).
        norm_layer: norm name or ``norm(num_channels)`` factory (the ``norm`` group).
        zero_init_residual: zero the last norm of every block (Goyal et al. 2017).
    """

    def __init__(
        self,
        block: str = "basic",
        layers: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        stem: str = "imagenet",
        shortcut: str = "B",
        num_classes: int = 1000,
        in_channels: int = 3,
        groups: int = 1,
        width_per_group: int = 64,
        norm_layer: str | NormFactory | None = "batchnorm",
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"model.block={block!r} is not one of {sorted(BLOCKS)}")
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"model.stem={stem!r} is not one of ['cifar', 'imagenet']")
        if shortcut not in ("A", "B"):
            raise ValueError(f"model.shortcut={shortcut!r} is not one of ['A', 'B']")
        if len(layers) != len(widths):
            raise ValueError(f"model.layers {list(layers)} and model.widths {list(widths)} differ in length")
        norm = get_norm_layer(norm_layer)
        block_cls = BLOCKS[block]
        self.groups = groups
        self.base_width = width_per_group
        self.shortcut = shortcut
        self.inplanes = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = conv3x3(in_channels, self.inplanes)
            self.maxpool = nn.Identity()
        self.bn1 = norm(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.stage_names = []
        for i, (blocks, width) in enumerate(zip(layers, widths, strict=True)):
            name = f"layer{i + 1}"
            self.add_module(name, self._make_layer(block_cls, width, blocks, 1 if i == 0 else 2, norm))
            self.stage_names.append(name)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1] * block_cls.expansion, num_classes)

        # He et al. 2015 init ("MSRA"), as torchvision: fan_out, ReLU gain; norms start at γ=1, β=0
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    m.zero_init_last()

    def _make_layer(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        planes: int,
        blocks: int,
        stride: int,
        norm: NormFactory,
    ) -> nn.Sequential:
        downsample = None
        out_planes = planes * block.expansion
        if stride != 1 or self.inplanes != out_planes:
            if self.shortcut == "A":
                downsample = ZeroPadShortcut(out_planes, stride)
            else:
                downsample = nn.Sequential(conv1x1(self.inplanes, out_planes, stride), norm(out_planes))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, norm)]
        self.inplanes = out_planes
        layers += [
            block(self.inplanes, planes, groups=self.groups, base_width=self.base_width, norm_layer=norm)
            for _ in range(1, blocks)
        ]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # (N, 64, H/2, W/2) imagenet stem; (N, 16, H, W) cifar stem
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        x = self.avgpool(x)  # (N, C, 1, 1)
        x = torch.flatten(x, 1)
        return self.fc(x)
