"""The CIFAR-10 speed-run net: Jordan 2024, "94% on CIFAR-10 in 3.29 Seconds on a Single GPU"
(arXiv:2404.00498).

airbench94's network (§3.1, its ``make_net``): a 2×2 conv stem meant to be fixed to the whitening transform of
2×2 training patches (``init=patch_whitening``), then three conv groups, each conv → max-pool → BN → GELU →
conv → BN → GELU, a global max-pool and a linear head whose logits are scaled by 1/9. The widths (64, 256,
256) are data in ``conf/model/speedrun.yaml``, as the paper's hyperparameter dict keeps them.

Its stages end at each conv group; its classifier is ``fc`` (see :mod:`cvarch.models.layers`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cvarch.models.layers import ActFactory, FeatureInfo, get_act_layer, new_linear
from cvarch.norm import NormFactory, get_norm_layer


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    """A 3×3 'same' conv without bias, its first ``in_channels`` filters the identity (airbench's ``Conv``:
    ``torch.nn.init.dirac_`` on top of PyTorch's default init, so each group starts near a skip path)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(in_channels, out_channels)])
    return conv


class ConvGroup(nn.Module):
    """conv → 2×2 max-pool → norm → act → conv → norm → act (airbench94's ``ConvGroup``, §3.1).

    Pooling right after the first conv runs the norm, the activation and the second conv at a quarter of the
    pixels: most of the net's speed.

    Args:
        in_channels: input channels.
        out_channels: channels of both convs.
        norm: ``norm(num_channels)`` factory.
        act: activation factory.
    """

    def __init__(self, in_channels: int, out_channels: int, norm: NormFactory, act: ActFactory) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = norm(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.norm2 = norm(out_channels)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # (N, out, H, W)
        x = self.pool(x)  # (N, out, H/2, W/2)
        x = self.norm1(x)
        x = self.act(x)
        x = self.conv2(x)
        x = self.norm2(x)
        return self.act(x)


class SpeedrunNet(nn.Module):
    """airbench94's net: whitening stem, three :class:`ConvGroup`\\ s, global max-pool, scaled linear head.

    Parameters: ``w·(C·k² + 1)`` in the stem (``w`` = ``stem_width``, ``k`` = ``stem_kernel``), then per group
    of ``i`` → ``o`` channels ``9·i·o + 9·o² + 4·o`` (two bias-free 3×3 convs and two norms' γ and β), and
    ``widths[-1]·num_classes`` in the bias-free head: 1,972,792 at the paper's widths (64, 256, 256) and
    ``w = 24``, ``k = 2``. About 0.24 GFLOPs per 32×32 image forward.

    Args:
        widths: output channels of each conv group (airbench94: 64, 256, 256).
        num_classes: outputs of the head.
        in_channels: image channels.
        stem_width: output channels of the stem; ``2·C·k²`` holds every whitening eigenvector and its negative
            (airbench94: 24 for RGB and k = 2).
        stem_kernel: side of the stem's patches (airbench94: 2, unpadded, so 32×32 becomes 31×31).
        norm_layer: norm name or ``norm(num_channels)`` factory after every group conv (airbench94: BatchNorm,
            momentum 0.4 in PyTorch's convention, ε = 1e-12).
        act_layer: activation name or factory after the stem and every norm (airbench94: GELU).
        learn_norm_scale: train the norms' γ; airbench94 keeps γ = 1 and trains only β.
        logit_scale: multiplies the logits (airbench94: 1/9), a fixed temperature in place of a tuned head
            init.
    """

    def __init__(
        self,
        widths: Sequence[int] = (64, 256, 256),
        num_classes: int = 10,
        in_channels: int = 3,
        stem_width: int = 24,
        stem_kernel: int = 2,
        norm_layer: str | NormFactory | None = "batchnorm",
        act_layer: str | ActFactory = "gelu",
        learn_norm_scale: bool = False,
        logit_scale: float = 1 / 9,
    ) -> None:
        super().__init__()
        if not widths or any(w < 1 for w in widths):
            raise ValueError(f"model.widths must be a non-empty list of positive widths, got {list(widths)}")
        if stem_width < 1 or stem_kernel < 1:
            raise ValueError(
                f"model.stem_width and model.stem_kernel must be >= 1, got {stem_width}, {stem_kernel}"
            )
        norm = get_norm_layer(norm_layer)
        act = get_act_layer(act_layer)
        self.whiten = nn.Conv2d(in_channels, stem_width, kernel_size=stem_kernel, bias=True)
        self.act = act()
        self.feature_info: list[FeatureInfo] = []
        channels, stride = stem_width, 1
        for i, width in enumerate(widths, start=1):
            setattr(self, f"layer{i}", ConvGroup(channels, width, norm, act))
            channels, stride = width, stride * 2
            self.feature_info.append(FeatureInfo(module=f"layer{i}", num_chs=width, reduction=stride))
        self.num_groups = len(widths)
        self.pool = nn.AdaptiveMaxPool2d(1)  # airbench94's MaxPool2d(3) on the final 3×3 map
        self.fc = nn.Linear(channels, num_classes, bias=False)
        self.logit_scale = logit_scale
        if not learn_norm_scale:  # the norms' γ stay 1 (every weighted module but the convs and the head)
            for m in self.modules():
                if isinstance(getattr(m, "weight", None), nn.Parameter) and not isinstance(
                    m, (nn.Conv2d, nn.Linear)
                ):
                    m.weight.requires_grad_(False)

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """A new bias-free head of ``num_classes`` outputs, PyTorch's default init (as the constructor's)."""
        self.fc = new_linear(self.fc, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.whiten(x)  # (N, 24, 31, 31) at 32×32
        x = self.act(x)
        for i in range(1, self.num_groups + 1):
            x = getattr(self, f"layer{i}")(x)  # (N, 64, 15, 15), (N, 256, 7, 7), (N, 256, 3, 3)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x)  # (N, 256, 1, 1)
        x = torch.flatten(x, 1)  # (N, 256)
        return x if pre_logits else self.fc(x) * self.logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
