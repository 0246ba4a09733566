"""AlexNet family: Krizhevsky et al. 2012, "ImageNet Classification with Deep Convolutional Neural Networks".

One :class:`AlexNet` whose layer stack is data: the lecture's single-tower AlexNet
(``conf/model/alexnet.yaml``), torchvision's variant (``alexnet_tv.yaml``) and Zeiler & Fergus 2013's ZFNet
(``zfnet.yaml``, arXiv:1311.2901) are three lists of convolutions, max-pools and norm slots. Attribute names
follow torchvision's ``alexnet.py`` (``features``, ``avgpool``, ``classifier``) so its ``state_dict`` loads
with ``strict=True``. Its stages end at the max-pools; its classifier is FC8 (see :mod:`cvarch.models.layers`
for the structure every model declares).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from cvarch.models.layers import ActFactory, FeatureInfo, get_act_layer, new_linear
from cvarch.norm import NormFactory, get_norm_layer


class AlexNet(nn.Module):
    """AlexNet-style conv stack + three fully connected layers (Krizhevsky 2012 §3.5, Fig. 2; ZFNet Fig. 3).

    ``features`` lists the layers of ``self.features`` in order: ``[out_channels, kernel, stride, padding]``
    is a convolution followed by the activation, ``"M"`` a 3×3 stride-2 max-pool (overlapping pooling, §3.4),
    ``"N"`` a norm slot, which holds no module at all when the norm is ``none`` (so torchvision's indices
    hold). ``classifier`` lists the hidden layers: an integer is a Linear of that width followed by the
    activation, ``"D"`` a dropout; the last Linear, to ``num_classes``, is appended.

    Args:
        features: the conv stack, e.g. ``[[96, 11, 4, 0], M, N, [256, 5, 1, 2], M, N, ...]``.
        classifier: hidden fully connected layers and dropouts: ``[4096, D, 4096, D]`` drops the outputs of
            FC6 and FC7 as §4.2 does; torchvision's ``[D, 4096, D, 4096]`` drops their inputs.
        pool_size: side of an adaptive average pool before the classifier (torchvision: 6), or ``None``.
        image_size: input side the classifier is sized for when ``pool_size`` is ``None`` (lecture: 227, so
            FC6 takes exactly 6·6·256 inputs); ignored with adaptive pooling, which takes any large input.
        ceil_mode: round pooled sizes up, as Caffe does (ZFNet Fig. 3: 110 → 55, 26 → 13).
        weight_std: std of the zero-mean normal init of every weight (§5: 0.01), or ``None`` for PyTorch's
            default init, which torchvision's AlexNet keeps.
        bias_init: constant init of each weighted layer's bias, convs then Linears (§5: 1 in conv2, conv4,
            conv5 and the hidden FCs, 0 elsewhere), or ``None`` to keep the default.
        num_classes: outputs of the last Linear (FC8).
        in_channels: input image channels.
        norm_layer: norm name or ``norm(num_channels)`` factory filling the ``"N"`` slots (paper: LRN, §3.3).
        act_layer: activation name or factory after every conv and hidden Linear (paper: ReLU, §3.1).
        dropout: probability of each ``"D"`` dropout (§4.2: 0.5).
    """

    def __init__(
        self,
        features: Sequence[Sequence[int] | str],
        classifier: Sequence[int | str] = (4096, "D", 4096, "D"),
        pool_size: int | None = None,
        image_size: int | None = 227,
        ceil_mode: bool = False,
        weight_std: float | None = 0.01,
        bias_init: Sequence[float] | None = (0, 1, 0, 1, 1, 1, 1, 0),
        num_classes: int = 1000,
        in_channels: int = 3,
        norm_layer: str | NormFactory | None = "lrn",
        act_layer: str | ActFactory = "relu",
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if pool_size is None and image_size is None:
            raise ValueError("model.pool_size and model.image_size are both null: FC6's input is unknown")
        norm = get_norm_layer(norm_layer)
        act = get_act_layer(act_layer)
        layers: list[nn.Module] = []
        self.feature_info: list[FeatureInfo] = []
        channels, side = in_channels, image_size or 0  # side: feature map side at image_size, sizes FC6
        stride = 1
        for spec in features:
            if spec == "M":
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=ceil_mode))
                side = (math.ceil if ceil_mode else math.floor)((side - 3) / 2) + 1
                stride *= 2
                # each max-pool ends a stage (Fig. 2: after CONV1, CONV2 and CONV5)
                self.feature_info.append(
                    FeatureInfo(module=f"features.{len(layers) - 1}", num_chs=channels, reduction=stride)
                )
            elif spec == "N":
                slot = norm(channels)
                # an empty slot (norm=none) adds no module, so torchvision's indices hold
                if not isinstance(slot, nn.Identity):
                    layers.append(slot)
            elif isinstance(spec, str):
                raise ValueError(f"model.features: {spec!r} is neither a conv spec nor 'M' or 'N'")
            else:
                out_channels, kernel, conv_stride, padding = spec
                conv = nn.Conv2d(channels, out_channels, kernel, stride=conv_stride, padding=padding)
                layers += [conv, act()]
                channels, side = out_channels, (side + 2 * padding - kernel) // conv_stride + 1
                stride *= conv_stride
        self.features = nn.Sequential(*layers)
        # the last stage ends where the features do: at the last pool, or at the layers after it
        if self.feature_info and self.feature_info[-1]["reduction"] == stride:
            self.feature_info.pop()
        self.feature_info.append(
            FeatureInfo(module=f"features.{len(layers) - 1}", num_chs=channels, reduction=stride)
        )
        if pool_size:
            self.avgpool = nn.AdaptiveAvgPool2d(pool_size)
            side = pool_size
        else:
            self.avgpool = nn.Identity()
            if side < 1:
                raise ValueError(f"model.image_size={image_size} collapses to nothing before the classifier")
        head: list[nn.Module] = []
        width = channels * side * side
        for spec in classifier:
            if spec == "D":
                head.append(nn.Dropout(p=dropout))
            elif isinstance(spec, str):
                raise ValueError(f"model.classifier: {spec!r} is neither a width nor 'D'")
            else:
                head += [nn.Linear(width, spec), act()]
                width = spec
        head.append(nn.Linear(width, num_classes))
        self.classifier = nn.Sequential(*head)

        weighted = [m for m in self.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        if bias_init is not None and len(bias_init) != len(weighted):
            raise ValueError(
                f"model.bias_init has {len(bias_init)} values for {len(weighted)} weighted layers"
            )
        for i, m in enumerate(weighted):
            if weight_std is not None:
                nn.init.normal_(m.weight, 0.0, weight_std)
            if bias_init is not None:
                nn.init.constant_(m.bias, bias_init[i])
        self.weight_std = weight_std
        self.fc8_bias = bias_init[-1] if bias_init is not None else None  # reset_classifier inits FC8 alike

    def get_classifier(self) -> nn.Linear:
        """FC8, the last Linear: FC6 and FC7 are pretrained features, not class-specific."""
        return self.classifier[-1]

    def reset_classifier(self, num_classes: int) -> None:
        """A new FC8 of ``num_classes`` outputs, initialized as the constructor does (§5)."""
        fc8 = new_linear(self.classifier[-1], num_classes)
        if self.weight_std is not None:
            nn.init.normal_(fc8.weight, 0.0, self.weight_std)
        if self.fc8_bias is not None:
            nn.init.constant_(fc8.bias, self.fc8_bias)
        self.classifier[-1] = fc8

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # (N, 256, 6, 6) for the lecture's net at 227×227

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.avgpool(x)  # torchvision: adaptive to (N, 256, 6, 6); identity without adaptive pooling
        x = torch.flatten(x, 1)  # (N, 9216)
        for layer in self.classifier[:-1]:  # FC6, FC7 with their activations and dropouts
            x = layer(x)  # (N, 4096)
        return x if pre_logits else self.classifier[-1](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
