"""SqueezeNet family: Iandola et al. 2016, "SqueezeNet: AlexNet-level accuracy with…" (arXiv:1602.07360).

Versions 1.0 (Table 1) and 1.1 (the authors' GitHub release: 3×3 conv1, earlier pools) are data in
``conf/model/squeezenet1_{0,1}.yaml``, with the bypass connections of §5 (Fig. 2, Table 3) as a setting.
Attribute names follow torchvision's ``squeezenet.py`` (``features``, ``classifier``; ``squeeze``,
``expand1x1``, ``expand3x3`` …), so with ``bypass: none`` its ``state_dict`` loads with ``strict=True``.

Its stages end before the max-pools; its classifier is conv10 (see :mod:`cvarch.models.layers`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cvarch.models.layers import ActFactory, FeatureInfo, get_act_layer
from cvarch.norm import NormFactory, get_norm_layer

BYPASSES = ("none", "simple", "complex")


class Fire(nn.Module):
    """Fire module (Iandola 2016 §3.2, Fig. 1): a 1×1 squeeze, then 1×1 and 3×3 expands, concatenated.

    Args:
        inplanes: input channels.
        squeeze_planes: 1×1 squeeze filters (s1x1).
        expand1x1_planes: 1×1 expand filters (e1x1).
        expand3x3_planes: 3×3 expand filters (e3x3).
        bypass: ``none``; ``simple`` adds the input to the output (only where the channels match); ``complex``
            adds it through a 1×1 conv where they do not (§5, Fig. 2).
        norm_layer: ``norm(num_channels)`` factory after each conv (paper: none).
        act_layer: activation factory after each conv (paper: ReLU).
    """

    def __init__(
        self,
        inplanes: int,
        squeeze_planes: int,
        expand1x1_planes: int,
        expand3x3_planes: int,
        bypass: str = "none",
        norm_layer: NormFactory = nn.Identity,
        act_layer: ActFactory = nn.ReLU,
    ) -> None:
        super().__init__()
        self.inplanes = inplanes
        out_planes = expand1x1_planes + expand3x3_planes
        self.squeeze = nn.Conv2d(inplanes, squeeze_planes, kernel_size=1)
        self.squeeze_norm = norm_layer(squeeze_planes)
        self.squeeze_activation = act_layer()
        self.expand1x1 = nn.Conv2d(squeeze_planes, expand1x1_planes, kernel_size=1)
        self.expand1x1_norm = norm_layer(expand1x1_planes)
        self.expand1x1_activation = act_layer()
        self.expand3x3 = nn.Conv2d(squeeze_planes, expand3x3_planes, kernel_size=3, padding=1)
        self.expand3x3_norm = norm_layer(expand3x3_planes)
        self.expand3x3_activation = act_layer()
        self.shortcut: nn.Module | None = None
        if bypass != "none" and inplanes == out_planes:
            self.shortcut = nn.Identity()
        elif bypass == "complex":
            self.shortcut = nn.Conv2d(inplanes, out_planes, kernel_size=1)  # §5: as many filters as outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.squeeze(x)
        s = self.squeeze_norm(s)
        s = self.squeeze_activation(s)
        e1 = self.expand1x1(s)
        e1 = self.expand1x1_norm(e1)
        e1 = self.expand1x1_activation(e1)
        e3 = self.expand3x3(s)
        e3 = self.expand3x3_norm(e3)
        e3 = self.expand3x3_activation(e3)
        out = torch.cat([e1, e3], 1)  # (N, e1x1 + e3x3, H, W)
        if self.shortcut is not None:  # §5: the bypass adds after the ReLUs, onto the concatenated output
            out = out + self.shortcut(x)
        return out


class SqueezeNet(nn.Module):
    """conv1, max-pools and Fire modules, then dropout and a 1×1 conv to the classes, averaged (Table 1).

    Args:
        stem: conv1 as ``[filters, kernel, stride]`` (1.0: ``[96, 7, 2]``; 1.1: ``[64, 3, 2]``), unpadded.
        features: after conv1 and its ReLU, in order: ``"M"`` for a 3×3 stride-2 max-pool (rounding up, as
            Caffe), ``[s1x1, e1x1, e3x3]`` for a Fire module (Table 1's columns).
        bypass: ``none`` (torchvision's layout), ``simple`` (identity shortcuts around the Fire modules whose
            input and output channels match: fire3, 5, 7, 9) or ``complex`` (1×1 conv shortcuts elsewhere).
        num_classes: filters of the final 1×1 conv (conv10).
        in_channels: input image channels.
        norm_layer: norm name or ``norm(num_channels)`` factory after conv1 and each Fire conv (paper: none).
        act_layer: activation name or factory after every conv (paper: ReLU).
        dropout: dropout before conv10 (§3.3: 50% after fire9).
    """

    def __init__(
        self,
        stem: Sequence[int],
        features: Sequence[Sequence[int] | str],
        bypass: str = "none",
        num_classes: int = 1000,
        in_channels: int = 3,
        norm_layer: str | NormFactory | None = None,
        act_layer: str | ActFactory = "relu",
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if bypass not in BYPASSES:
            raise ValueError(f"model.bypass={bypass!r} is not one of {list(BYPASSES)}")
        norm = get_norm_layer(norm_layer)
        act = get_act_layer(act_layer)
        self.num_classes = num_classes
        filters, kernel, stride = stem
        layers: list[nn.Module] = [nn.Conv2d(in_channels, filters, kernel_size=kernel, stride=stride)]
        slot = norm(filters)
        # an empty slot (norm=none) adds no module, so torchvision's indices hold
        if not isinstance(slot, nn.Identity):
            layers.append(slot)
        layers.append(act())
        channels, reduction = filters, stride
        self.feature_info: list[FeatureInfo] = []
        for spec in features:
            if spec == "M":
                # a stage ends before each max-pool (Table 1: conv1, fire4, fire8 in 1.0)
                self.feature_info.append(
                    FeatureInfo(module=f"features.{len(layers) - 1}", num_chs=channels, reduction=reduction)
                )
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True))
                reduction *= 2
            elif isinstance(spec, str):
                raise ValueError(f"model.features: {spec!r} is neither a Fire spec nor 'M'")
            else:
                squeeze, expand1x1, expand3x3 = spec
                layers.append(Fire(channels, squeeze, expand1x1, expand3x3, bypass, norm, act))
                channels = expand1x1 + expand3x3
        self.features = nn.Sequential(*layers)
        # the last stage ends where the features do (fire9)
        self.feature_info.append(
            FeatureInfo(module=f"features.{len(layers) - 1}", num_chs=channels, reduction=reduction)
        )
        final_conv = nn.Conv2d(channels, num_classes, kernel_size=1)  # conv10: no FC layers (§3.3)
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout), final_conv, act(), nn.AdaptiveAvgPool2d((1, 1))
        )

        # torchvision's init; the final conv, whose outputs are the logits, starts small (Caffe: N(0, 0.01))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m is final_conv:
                    _init_final_conv(m)
                else:
                    nn.init.kaiming_uniform_(m.weight)
                    nn.init.constant_(m.bias, 0)

    def get_classifier(self) -> nn.Conv2d:
        """conv10, the final 1×1 conv: its output channels are the classes (§3.3)."""
        return self.classifier[1]

    def reset_classifier(self, num_classes: int) -> None:
        """A new conv10 of ``num_classes`` filters, initialized as the constructor does."""
        old = self.classifier[1]
        conv10 = nn.Conv2d(
            old.in_channels, num_classes, kernel_size=1, device=old.weight.device, dtype=old.weight.dtype
        )
        _init_final_conv(conv10)
        self.classifier[1] = conv10
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # (N, 512, 13, 13) at 224×224

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The head after ``features``; ``pre_logits`` stops at conv10's input map ``(N, 512, H, W)``."""
        x = self.classifier[0](x)  # dropout
        if pre_logits:
            return x
        x = self.classifier[1](x)  # conv10: (N, num_classes, 13, 13)
        x = self.classifier[2](x)
        x = self.classifier[3](x)  # global average: (N, num_classes, 1, 1)
        return torch.flatten(x, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_final_conv(conv: nn.Conv2d) -> None:
    """conv10's outputs are the logits: it starts small (Caffe release: N(0, 0.01)), as torchvision's."""
    nn.init.normal_(conv.weight, mean=0.0, std=0.01)
    nn.init.constant_(conv.bias, 0)
