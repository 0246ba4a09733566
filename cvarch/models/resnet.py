"""ResNet family: He et al. 2015, "Deep Residual Learning for Image Recognition" (arXiv:1512.03385).

The post-activation blocks (He 2015), their pre-activation twins (He et al. 2016, "Identity Mappings in Deep
Residual Networks", arXiv:1603.05027) and the plain block without a shortcut (He 2015 §4.1) sit side by side,
so the orderings can be diffed by eye. The ImageNet nets (§3.4, Table 1), the CIFAR nets (§4.2), Wide ResNets
(Zagoruyko & Komodakis 2016, arXiv:1605.07146), ResNeXt (Xie et al. 2016, arXiv:1611.05431) and stochastic
depth (Huang et al. 2016, arXiv:1603.09382) are all settings of one :class:`ResNet`. Attribute names follow
torchvision's ``resnet.py`` (``conv1``, ``bn1``, ``layer1``…, ``downsample``, ``fc``) so its ``state_dict``
loads with ``strict=True``. Its stages are the ``layer<i>``; its classifier is ``fc``
(:mod:`cvarch.models.layers`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cvarch.models.layers import ActFactory, DropPath, FeatureInfo, drop_path_rates, get_act_layer, new_linear
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
        groups: must be 1 (grouped convs are a bottleneck setting).
        base_width: must be 64.
        norm_layer: ``norm(num_channels)`` factory.
        act_layer: ``act()`` factory for every activation.
        dropout: dropout rate between the two convs (Zagoruyko 2016 §2.4).
        drop_path: probability of dropping the residual branch (Huang 2016 stochastic depth).
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
        act_layer: ActFactory = nn.ReLU,
        dropout: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and width_per_group=64")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = act_layer()
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.drop_path = DropPath(drop_path)
        self.downsample = downsample
        self.stride = stride

    def zero_init_last(self) -> None:
        """Zeroes the last norm's γ so the block starts as an identity (Goyal 2017, arXiv:1706.02677)."""
        if getattr(self.bn2, "weight", None) is not None:
            nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.dropout(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = self.drop_path(out) + identity
        return self.relu(out)


class PreActBasicBlock(nn.Module):
    """BasicBlock in the full pre-activation ordering BN-ReLU-conv (He 2016 Fig. 4(e)); nothing after the sum.

    Where the shape changes, the shortcut takes the pre-activated input (He 2016's code, Zagoruyko 2016).

    Args:
        inplanes: input channels.
        planes: output channels.
        stride: stride of the first conv.
        downsample: shortcut for a shape change, or ``None`` for the identity.
        groups: must be 1.
        base_width: must be 64.
        norm_layer: ``norm(num_channels)`` factory.
        act_layer: ``act()`` factory for every activation.
        dropout: dropout rate between the two convs (Zagoruyko 2016 §2.4: 0.3 on CIFAR).
        drop_path: probability of dropping the residual branch (Huang 2016 stochastic depth).
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
        act_layer: ActFactory = nn.ReLU,
        dropout: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("PreActBasicBlock supports only groups=1 and width_per_group=64")
        self.bn1 = norm_layer(inplanes)
        self.relu = act_layer()
        if isinstance(self.bn1, nn.Identity) and hasattr(self.relu, "inplace"):
            self.relu.inplace = False  # norm=none: bn1(x) is x, which an in-place act would overwrite
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = norm_layer(planes)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(planes, planes)
        self.drop_path = DropPath(drop_path)
        self.downsample = downsample
        self.stride = stride

    def zero_init_last(self) -> None:
        """Zeroes the last conv, as no norm follows it, so the block starts as an identity (timm's choice)."""
        nn.init.zeros_(self.conv2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(x)
        out = self.relu(out)
        identity = x if self.downsample is None else self.downsample(out)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.dropout(out)
        out = self.conv2(out)
        return self.drop_path(out) + identity


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3, 1×1 expand (×4), the stride on the 3×3 as in torchvision (He 2015 Fig. 5 right).

    ``groups`` and ``base_width`` make it ResNeXt's block (Xie et al. 2016) and Wide ResNet-50-2's.

    Args:
        inplanes: input channels.
        planes: bottleneck channels before the ×4 expansion.
        stride: stride of the 3×3 conv.
        downsample: shortcut for a shape change, or ``None`` for the identity.
        groups: cardinality of the grouped 3×3 conv.
        base_width: width per group (64 = plain ResNet).
        norm_layer: ``norm(num_channels)`` factory.
        act_layer: ``act()`` factory for every activation.
        dropout: dropout rate before the last 1×1 conv (where Zagoruyko 2016 §2.4 puts it in basic blocks).
        drop_path: probability of dropping the residual branch (Huang 2016 stochastic depth).
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
        act_layer: ActFactory = nn.ReLU,
        dropout: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = norm_layer(width)
        self.dropout = nn.Dropout(dropout)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = act_layer()
        self.drop_path = DropPath(drop_path)
        self.downsample = downsample
        self.stride = stride

    def zero_init_last(self) -> None:
        """Zeroes the last norm's γ so the block starts as an identity (Goyal 2017, arXiv:1706.02677)."""
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
        out = self.dropout(out)
        out = self.conv3(out)
        out = self.bn3(out)
        out = self.drop_path(out) + identity
        return self.relu(out)


class PreActBottleneck(nn.Module):
    """Bottleneck in the full pre-activation ordering BN-ReLU-conv (He 2016 Fig. 4(e); ResNet-164, Table 2).

    Where the shape changes, the shortcut takes the pre-activated input, as in He 2016's code.

    Args:
        inplanes: input channels.
        planes: bottleneck channels before the ×4 expansion.
        stride: stride of the 3×3 conv.
        downsample: shortcut for a shape change, or ``None`` for the identity.
        groups: cardinality of the grouped 3×3 conv.
        base_width: width per group (64 = plain ResNet).
        norm_layer: ``norm(num_channels)`` factory.
        act_layer: ``act()`` factory for every activation.
        dropout: dropout rate before the last 1×1 conv.
        drop_path: probability of dropping the residual branch (Huang 2016 stochastic depth).
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
        act_layer: ActFactory = nn.ReLU,
        dropout: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.bn1 = norm_layer(inplanes)
        self.conv1 = conv1x1(inplanes, width)
        self.bn2 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn3 = norm_layer(width)
        self.dropout = nn.Dropout(dropout)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.relu = act_layer()
        if isinstance(self.bn1, nn.Identity) and hasattr(self.relu, "inplace"):
            self.relu.inplace = False  # norm=none: bn1(x) is x, which an in-place act would overwrite
        self.drop_path = DropPath(drop_path)
        self.downsample = downsample
        self.stride = stride

    def zero_init_last(self) -> None:
        """Zeroes the last conv, as no norm follows it, so the block starts as an identity (timm's choice)."""
        nn.init.zeros_(self.conv3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(x)
        out = self.relu(out)
        identity = x if self.downsample is None else self.downsample(out)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn3(out)
        out = self.relu(out)
        out = self.dropout(out)
        out = self.conv3(out)
        return self.drop_path(out) + identity


class PlainBlock(nn.Module):
    """BasicBlock without its shortcut: the plain nets of the degradation experiment (He 2015 §4.1, Fig. 6).

    Args:
        inplanes: input channels.
        planes: output channels.
        stride: stride of the first conv (2 where a stage halves the resolution).
        downsample: must be ``None``: a plain net has no shortcut.
        groups: must be 1.
        base_width: must be 64.
        norm_layer: ``norm(num_channels)`` factory.
        act_layer: ``act()`` factory for every activation.
        dropout: dropout rate between the two convs.
        drop_path: must be 0: there is no residual branch to drop.
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
        act_layer: ActFactory = nn.ReLU,
        dropout: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if downsample is not None or drop_path != 0.0 or groups != 1 or base_width != 64:
            raise ValueError("PlainBlock takes no shortcut, no drop_path, groups=1 and width_per_group=64")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = act_layer()
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.dropout(out)
        out = self.conv2(out)
        out = self.bn2(out)
        return self.relu(out)


Block = BasicBlock | Bottleneck | PreActBasicBlock | PreActBottleneck | PlainBlock
BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}
PREACT_BLOCKS: dict[str, type[PreActBasicBlock] | type[PreActBottleneck]] = {
    "basic": PreActBasicBlock,
    "bottleneck": PreActBottleneck,
}
SHORTCUTS = ("A", "B", "none")


class ResNet(nn.Module):
    """Residual network of He et al. 2015; variants are data in ``conf/model/`` (block, layers, widths, stem).

    Args:
        block: ``basic`` or ``bottleneck``.
        layers: residual blocks per stage: ``[3, 3, 3]`` (ResNet-20, §4.2), ``[3, 4, 6, 3]`` (ResNet-50).
        widths: channels of each stage before the block expansion; stage i > 0 starts with stride 2. The stem
            has ``widths[0]`` channels.
        stem: ``imagenet`` (7×7/2 conv + 3×3/2 max-pool, Table 1) or ``cifar`` (one 3×3 conv, §4.2).
        shortcut: ``A`` (zero-padding identity, parameter-free) or ``B`` (1×1 projection) where shapes change;
            ``none`` drops every shortcut: the plain net of §4.1 (basic blocks, post-activation only).
        num_classes: outputs of the final ``fc``.
        in_channels: input image channels.
        groups: cardinality of bottleneck 3×3 convs (ResNeXt, Xie 2016 §3.3).
        width_per_group: bottleneck width per group (64 = ResNet; 128 = Wide ResNet-50-2).
        norm_layer: norm name or ``norm(num_channels)`` factory (the ``norm`` group).
        zero_init_residual: start every block as an identity (Goyal et al. 2017).
        act_layer: activation name or ``act()`` factory, in every ReLU slot.
        dropout: dropout rate before the last conv of every block (Zagoruyko 2016 §2.4; 0 in He 2015).
        preact: full pre-activation blocks, a stem without norm and a final BN-ReLU before pooling (He 2016).
        widen_factor: k, multiplying every stage width but not the stem (Zagoruyko 2016 Table 1).
        drop_path: stochastic depth, the drop rate 1 − p_L of the last block; earlier blocks decay linearly to
            0 (Huang 2016 eq. 4; paper: 0.5).
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
        act_layer: str | ActFactory = "relu",
        dropout: float = 0.0,
        preact: bool = False,
        widen_factor: int = 1,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"model.block={block!r} is not one of {sorted(BLOCKS)}")
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"model.stem={stem!r} is not one of ['cifar', 'imagenet']")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"model.shortcut={shortcut!r} is not one of {list(SHORTCUTS)}")
        if len(layers) != len(widths):
            raise ValueError(f"model.layers {list(layers)} and model.widths {list(widths)} differ in length")
        if shortcut == "none" and (block != "basic" or preact or drop_path or zero_init_residual):
            raise ValueError(
                "model.shortcut='none' (plain net, He 2015 §4.1) takes block=basic and no preact, drop_path "
                "or zero_init_residual: they need a residual branch"
            )
        norm = get_norm_layer(norm_layer)
        act = get_act_layer(act_layer)
        if shortcut == "none":
            block_cls = PlainBlock
        else:
            block_cls = PREACT_BLOCKS[block] if preact else BLOCKS[block]
        self.groups = groups
        self.base_width = width_per_group
        self.shortcut = shortcut
        self.preact = preact
        self.inplanes = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = conv3x3(in_channels, self.inplanes)
            self.maxpool = nn.Identity()
        # pre-activation: the first block normalizes the stem's output itself, as Zagoruyko 2016's code (He
        # 2016 App. puts that BN-ReLU on the stem; they differ only under the first block's identity shortcut)
        self.bn1 = nn.Identity() if preact else norm(self.inplanes)
        self.relu = nn.Identity() if preact else act()
        rates = iter(drop_path_rates(sum(layers), drop_path))
        block_args = dict(norm_layer=norm, act_layer=act, dropout=dropout)
        self.stage_names = []
        self.feature_info: list[FeatureInfo] = []
        reduction = 4 if stem == "imagenet" else 1
        for i, (blocks, width) in enumerate(zip(layers, widths, strict=True)):
            name = f"layer{i + 1}"
            stage_rates = [next(rates) for _ in range(blocks)]
            stride = 1 if i == 0 else 2
            self.add_module(
                name, self._make_layer(block_cls, width * widen_factor, stride, stage_rates, block_args)
            )
            self.stage_names.append(name)
            reduction *= stride
            # a stage is a layer<i>, Table 1's conv<i+1>_x: the stem goes with the first
            self.feature_info.append(FeatureInfo(module=name, num_chs=self.inplanes, reduction=reduction))
        # pre-activation: the last block's sum is activated once more before pooling (He 2016 appendix)
        self.final_bn = norm(self.inplanes) if preact else nn.Identity()
        self.final_relu = act() if preact else nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.inplanes, num_classes)

        # He et al. 2015 init ("MSRA"), as torchvision: fan_out, ReLU gain; norms start at γ=1, β=0
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if hasattr(m, "zero_init_last"):
                    m.zero_init_last()

    def _make_layer(
        self,
        block: type[Block],
        planes: int,
        stride: int,
        rates: Sequence[float],
        block_args: dict,
    ) -> nn.Sequential:
        downsample = None
        out_planes = planes * block.expansion
        if self.shortcut != "none" and (stride != 1 or self.inplanes != out_planes):
            if self.shortcut == "A":
                downsample = ZeroPadShortcut(out_planes, stride)
            elif self.preact:  # the input is already normalized: a bare projection (He 2016; Zagoruyko 2016)
                downsample = conv1x1(self.inplanes, out_planes, stride)
            else:
                downsample = nn.Sequential(
                    conv1x1(self.inplanes, out_planes, stride), block_args["norm_layer"](out_planes)
                )
        layers = []
        for i, rate in enumerate(rates):
            layers.append(
                block(
                    self.inplanes,
                    planes,
                    stride if i == 0 else 1,
                    downsample if i == 0 else None,
                    self.groups,
                    self.base_width,
                    drop_path=rate,
                    **block_args,
                )
            )
            self.inplanes = out_planes
        return nn.Sequential(*layers)

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """A new ``fc`` of ``num_classes`` outputs, with PyTorch's default Linear init, as constructed."""
        self.fc = new_linear(self.fc, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # (N, 64, H/2, W/2) imagenet stem; (N, 16, H, W) cifar stem
        x = self.bn1(x)  # identity when pre-activated
        x = self.relu(x)
        x = self.maxpool(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        x = self.final_bn(x)  # pre-activation only: BN-ReLU after the last sum
        return self.final_relu(x)  # (N, C, H/32, W/32) imagenet; (N, C, H/4, W/4) cifar

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.avgpool(x)  # (N, C, 1, 1)
        x = torch.flatten(x, 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
