"""GoogLeNet family: Szegedy et al. 2014, "Going Deeper with Convolutions" (arXiv:1409.4842).

One :class:`GoogLeNet` holds the paper's net (Table 1, Fig. 3) and torchvision's ``googlenet`` as settings:

- ``conv_block``: where the norm slots are. ``plain`` is the paper's: every conv is conv (with bias) + ReLU
  and the norm group fills the two LRN positions of the stem (Fig. 3). ``bn`` is torchvision's
  ``BasicConv2d``: conv (no bias) + norm + ReLU in every conv, and no stem norms.
- ``five_by_five_kernel``: 5 in the paper; torchvision's "5×5" branch is really a 3×3 conv, a known deviation
  it keeps for its released weights (pytorch/vision issue #906).
- ``adaptive_pool`` and ``maxpool4_kernel``: the paper's fixed 7×7 average pool, 5×5/3 auxiliary pool and
  3×3/2 max-pool before 5a, or torchvision's adaptive pools and 2×2/2 max-pool (equal at 224×224).
- ``inception``: the paper's module with 1×1 reductions (Fig. 2b), or the naive one (Fig. 2a).

Table 1's filter counts are data in ``conf/model/googlenet*.yaml``. Attribute names follow torchvision's
``googlenet.py`` (``conv1``, ``maxpool1``, ``inception3a``…, ``branch1``…``branch4``, ``aux1``, ``fc``) so its
``state_dict`` loads with ``strict=True``. Its stages end before the max-pools; its classifier is ``fc``, with
each auxiliary classifier's ``fc2`` (see :mod:`cvarch.models.layers`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from cvarch.models.layers import ActFactory, FeatureInfo, get_act_layer
from cvarch.norm import NormFactory, get_norm_layer, none

# Table 1's inception modules in network order; max-pools sit between stages 3→4 and 4→5.
MODULE_NAMES = ("3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b")


class BasicConv2d(nn.Module):
    """Convolution, norm slot, activation: torchvision's ``BasicConv2d`` (Szegedy 2014 §5: ReLU everywhere).

    The conv carries a bias only when the norm slot is empty (a norm's shift replaces it), so with ``none``
    this is the paper's plain conv + ReLU, with a BatchNorm torchvision's conv(bias=False) + BN + ReLU.

    Args:
        in_channels: input channels.
        out_channels: filters.
        kernel_size: square kernel side.
        stride: conv stride.
        padding: zero padding on each side.
        norm_layer: ``norm(num_channels)`` factory for the slot after the conv.
        act_layer: activation factory.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        norm_layer: NormFactory = none,
        act_layer: ActFactory = nn.ReLU,
    ) -> None:
        super().__init__()
        norm = norm_layer(out_channels)
        bias = isinstance(norm, nn.Identity)
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias
        )
        self.bn = norm
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = self.bn(x)
        return self.act(x)


class InceptionModule(nn.Module):
    """Inception module, Szegedy 2014 §4, Fig. 2: parallel 1×1, 3×3, 5×5 convs and 3×3 max-pool, concatenated.

    ``reduced`` (Fig. 2b, the one GoogLeNet uses) puts 1×1 reductions before the 3×3 and 5×5 convs and a 1×1
    projection after the pool; ``naive`` (Fig. 2a) has none, so its pool branch passes all input channels on
    and the depth grows with every module.

    Args:
        in_channels: input channels.
        ch1x1: filters of the 1×1 branch (Table 1 "#1×1").
        ch3x3red: 1×1 reduction before the 3×3 ("#3×3 reduce"); unused by ``naive``.
        ch3x3: filters of the 3×3 conv ("#3×3").
        ch5x5red: 1×1 reduction before the 5×5 ("#5×5 reduce"); unused by ``naive``.
        ch5x5: filters of the 5×5 conv ("#5×5").
        pool_proj: 1×1 projection after the max-pool ("pool proj"); unused by ``naive``.
        inception: ``reduced`` (Fig. 2b) or ``naive`` (Fig. 2a).
        five_by_five_kernel: kernel of the "5×5" branch (paper 5; torchvision 3).
        norm_layer: norm name or factory for the slot in every conv block (``None``: the paper's plain convs).
        act_layer: activation name or factory.
    """

    def __init__(
        self,
        in_channels: int,
        ch1x1: int,
        ch3x3red: int,
        ch3x3: int,
        ch5x5red: int,
        ch5x5: int,
        pool_proj: int,
        inception: str = "reduced",
        five_by_five_kernel: int = 5,
        norm_layer: str | NormFactory | None = None,
        act_layer: str | ActFactory = "relu",
    ) -> None:
        super().__init__()
        if inception not in ("naive", "reduced"):
            raise ValueError(f"model.inception={inception!r} is not one of ['naive', 'reduced']")
        norm = get_norm_layer(norm_layer)
        act = get_act_layer(act_layer)
        k5 = five_by_five_kernel
        self.branch1 = BasicConv2d(in_channels, ch1x1, 1, norm_layer=norm, act_layer=act)
        # ceil_mode as torchvision; with stride 1 and padding 1 it changes nothing
        pool = nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True)
        if inception == "reduced":
            self.branch2 = nn.Sequential(
                BasicConv2d(in_channels, ch3x3red, 1, norm_layer=norm, act_layer=act),
                BasicConv2d(ch3x3red, ch3x3, 3, padding=1, norm_layer=norm, act_layer=act),
            )
            self.branch3 = nn.Sequential(
                BasicConv2d(in_channels, ch5x5red, 1, norm_layer=norm, act_layer=act),
                BasicConv2d(ch5x5red, ch5x5, k5, padding=k5 // 2, norm_layer=norm, act_layer=act),
            )
            self.branch4 = nn.Sequential(
                pool, BasicConv2d(in_channels, pool_proj, 1, norm_layer=norm, act_layer=act)
            )
            self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj
        else:
            self.branch2 = BasicConv2d(in_channels, ch3x3, 3, padding=1, norm_layer=norm, act_layer=act)
            self.branch3 = BasicConv2d(
                in_channels, ch5x5, k5, padding=k5 // 2, norm_layer=norm, act_layer=act
            )
            self.branch4 = pool
            self.out_channels = ch1x1 + ch3x3 + ch5x5 + in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # every branch keeps H×W, so the outputs stack depth-wise: (N, out_channels, H, W)
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
    """Auxiliary classifier, Szegedy 2014 §5: avg-pool 5×5/3, 1×1 conv 128 + ReLU, FC 1024 + ReLU, dropout
    70%, linear. Names follow torchvision's ``InceptionAux`` (``conv``, ``fc1``, ``fc2``, ``dropout``).

    Args:
        in_channels: channels of the module it branches from (512 after 4a, 528 after 4d).
        num_classes: outputs.
        adaptive_pool: pool to 4×4 adaptively (torchvision), not with the paper's fixed 5×5/3 (4×4 at 14×14).
        dropout: drop probability before the last linear (paper 0.7).
        norm_layer: ``norm(num_channels)`` factory for the conv block's slot.
        act_layer: activation factory.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        adaptive_pool: bool,
        dropout: float,
        norm_layer: NormFactory,
        act_layer: ActFactory,
    ) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d((4, 4)) if adaptive_pool else nn.AvgPool2d(5, stride=3)
        self.conv = BasicConv2d(in_channels, 128, 1, norm_layer=norm_layer, act_layer=act_layer)
        self.fc1 = nn.Linear(128 * 4 * 4, 1024)
        self.act = act_layer()
        self.dropout = nn.Dropout(p=dropout)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(x)  # (N, 512 or 528, 4, 4)
        x = self.conv(x)  # (N, 128, 4, 4)
        x = torch.flatten(x, 1)  # (N, 2048)
        x = self.fc1(x)  # (N, 1024)
        x = self.act(x)
        x = self.dropout(x)
        return self.fc2(x)


class GoogLeNet(nn.Module):
    """GoogLeNet of Szegedy et al. 2014 (Table 1, Fig. 3); torchvision's ``googlenet`` is a setting of it.

    In training mode with ``aux_logits`` the forward returns ``(logits, aux1_logits, aux2_logits)`` so the
    loss can add the auxiliary losses with weight 0.3 (§5); otherwise it returns the logits alone.
    ``forward_features`` never runs the auxiliary classifiers: ``forward_head(forward_features(x))`` is the
    eval-mode forward.

    Args:
        inception_widths: Table 1 per module ``3a``…``5b``: [#1×1, #3×3 reduce, #3×3, #5×5 reduce, #5×5,
            pool proj].
        stem_channels: filters of conv1 (7×7/2), conv2 (1×1 reduce) and conv3 (3×3) (Table 1: 64, 64, 192).
        inception: ``reduced`` (Fig. 2b, the paper's net) or ``naive`` (Fig. 2a, same 1×1/3×3/5×5 counts).
        conv_block: ``plain`` (paper: conv + ReLU, norm slots at the stem's two LRNs) or ``bn`` (torchvision:
            conv without bias + norm + ReLU everywhere, no stem norms).
        five_by_five_kernel: kernel of the "5×5" branches (paper 5; torchvision 3).
        maxpool4_kernel: kernel of the stride-2 max-pool before 5a (paper 3; torchvision 2).
        adaptive_pool: adaptive final and auxiliary pools (torchvision), not the paper's fixed 7×7 and 5×5/3.
        aux_logits: build the two auxiliary classifiers after 4a and 4d (§5).
        num_classes: outputs of ``fc``.
        in_channels: input image channels.
        norm_layer: norm name or ``norm(num_channels)`` factory for the norm slots (the ``norm`` group).
        act_layer: activation name or factory.
        dropout: drop probability before ``fc`` (paper 0.4; torchvision 0.2).
        dropout_aux: drop probability in the auxiliary classifiers (paper and torchvision 0.7).
    """

    def __init__(
        self,
        inception_widths: Mapping[str, Sequence[int]],
        stem_channels: Sequence[int] = (64, 64, 192),
        inception: str = "reduced",
        conv_block: str = "plain",
        five_by_five_kernel: int = 5,
        maxpool4_kernel: int = 3,
        adaptive_pool: bool = False,
        aux_logits: bool = True,
        num_classes: int = 1000,
        in_channels: int = 3,
        norm_layer: str | NormFactory | None = "lrn",
        act_layer: str | ActFactory = "relu",
        dropout: float = 0.4,
        dropout_aux: float = 0.7,
    ) -> None:
        super().__init__()
        if conv_block not in ("plain", "bn"):
            raise ValueError(f"model.conv_block={conv_block!r} is not one of ['bn', 'plain']")
        if sorted(inception_widths) != sorted(MODULE_NAMES):
            raise ValueError(
                f"model.inception_widths has modules {sorted(inception_widths)}; "
                f"expected {list(MODULE_NAMES)}"
            )
        if any(len(widths) != 6 for widths in inception_widths.values()):
            raise ValueError(
                "model.inception_widths: each module takes 6 widths (Table 1 columns #1×1…pool proj)"
            )
        if len(stem_channels) != 3:
            raise ValueError(f"model.stem_channels={list(stem_channels)} must list conv1, conv2, conv3")
        norm = get_norm_layer(norm_layer)
        act = get_act_layer(act_layer)
        block_norm = norm if conv_block == "bn" else none
        stem_norm = none if conv_block == "bn" else norm
        c1, c2, c3 = stem_channels

        self.conv1 = BasicConv2d(
            in_channels, c1, 7, stride=2, padding=3, norm_layer=block_norm, act_layer=act
        )
        # Caffe rounds pooled sizes up, hence ceil_mode: 112 → 56 → 28 → 14 → 7 as in Table 1
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.norm1 = stem_norm(c1)
        self.conv2 = BasicConv2d(c1, c2, 1, norm_layer=block_norm, act_layer=act)
        self.conv3 = BasicConv2d(c2, c3, 3, padding=1, norm_layer=block_norm, act_layer=act)
        self.norm2 = stem_norm(c3)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        channels = c3
        widths_at: dict[str, int] = {}
        for name in MODULE_NAMES:
            module = InceptionModule(
                channels,
                *inception_widths[name],
                inception=inception,
                five_by_five_kernel=five_by_five_kernel,
                norm_layer=block_norm,
                act_layer=act,
            )
            self.add_module(f"inception{name}", module)
            channels = widths_at[name] = module.out_channels
            if name == "3b":
                self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
            elif name == "4e":
                self.maxpool4 = nn.MaxPool2d(maxpool4_kernel, stride=2, ceil_mode=True)

        if aux_logits:
            self.aux1 = InceptionAux(
                widths_at["4a"], num_classes, adaptive_pool, dropout_aux, block_norm, act
            )
            self.aux2 = InceptionAux(
                widths_at["4d"], num_classes, adaptive_pool, dropout_aux, block_norm, act
            )
        else:
            self.aux1 = None
            self.aux2 = None
        # a stage ends before each max-pool (Table 1's rows: the stem, 3a-3b, 4a-4e, 5a-5b)
        self.feature_info: list[FeatureInfo] = [
            FeatureInfo(module="conv1", num_chs=c1, reduction=2),
            FeatureInfo(module="norm2", num_chs=c3, reduction=4),
            FeatureInfo(module="inception3b", num_chs=widths_at["3b"], reduction=8),
            FeatureInfo(module="inception4e", num_chs=widths_at["4e"], reduction=16),
            FeatureInfo(module="inception5b", num_chs=widths_at["5b"], reduction=32),
        ]
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1)) if adaptive_pool else nn.AvgPool2d(7, stride=1)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(channels, num_classes)

        self.conv_block = conv_block
        for m in self.modules():
            _init_weights(m, conv_block)

    def get_classifier(self) -> nn.Linear | tuple[nn.Linear, nn.Linear, nn.Linear]:
        """``fc``; with the auxiliary classifiers, ``(fc, aux1.fc2, aux2.fc2)``: every layer whose outputs are
        classes (each auxiliary head's conv and ``fc1`` do not depend on the class count)."""
        if self.aux1 is None or self.aux2 is None:
            return self.fc
        return self.fc, self.aux1.fc2, self.aux2.fc2

    def reset_classifier(self, num_classes: int) -> None:
        """A new ``fc`` (and ``fc2`` of each auxiliary classifier) of ``num_classes`` outputs, initialized as
        the constructor does."""
        self.fc = self._new_linear(self.fc, num_classes)
        for aux in (self.aux1, self.aux2):
            if aux is not None:
                aux.fc2 = self._new_linear(aux.fc2, num_classes)

    def _new_linear(self, old: nn.Linear, num_classes: int) -> nn.Linear:
        fc = nn.Linear(old.in_features, num_classes, device=old.weight.device, dtype=old.weight.dtype)
        _init_weights(fc, self.conv_block)
        return fc

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk up to inception5b, ``(N, 1024, 7, 7)`` at 224×224, without the auxiliary classifiers."""
        return self._trunk(x, aux=False)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.avgpool(x)  # (N, 1024, 1, 1)
        x = torch.flatten(x, 1)
        x = self.dropout(x)
        return x if pre_logits else self.fc(x)  # (N, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits; in training with the auxiliary classifiers, ``(logits, aux1, aux2)`` (§5)."""
        aux = self.training and self.aux1 is not None
        x, aux1, aux2 = self._trunk(x, aux)
        x = self.forward_head(x)
        return (x, aux1, aux2) if aux else x

    def _trunk(
        self, x: torch.Tensor, aux: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The features, and the auxiliary classifiers' logits after 4a and 4d if ``aux`` (else ``None``)."""
        x = self.conv1(x)  # (N, 64, 112, 112) at 224×224
        x = self.maxpool1(x)  # (N, 64, 56, 56)
        x = self.norm1(x)
        x = self.conv2(x)  # (N, 64, 56, 56)
        x = self.conv3(x)  # (N, 192, 56, 56)
        x = self.norm2(x)
        x = self.maxpool2(x)  # (N, 192, 28, 28)
        x = self.inception3a(x)  # (N, 256, 28, 28)
        x = self.inception3b(x)  # (N, 480, 28, 28)
        x = self.maxpool3(x)  # (N, 480, 14, 14)
        x = self.inception4a(x)  # (N, 512, 14, 14)
        aux1 = self.aux1(x) if aux else None
        x = self.inception4b(x)  # (N, 512, 14, 14)
        x = self.inception4c(x)  # (N, 512, 14, 14)
        x = self.inception4d(x)  # (N, 528, 14, 14)
        aux2 = self.aux2(x) if aux else None
        x = self.inception4e(x)  # (N, 832, 14, 14)
        x = self.maxpool4(x)  # (N, 832, 7, 7)
        x = self.inception5a(x)  # (N, 832, 7, 7)
        x = self.inception5b(x)  # (N, 1024, 7, 7)
        return x, aux1, aux2


def _init_weights(m: nn.Module, conv_block: str) -> None:
    """The init of ``conv_block``'s GoogLeNet.

    ``bn``: torchvision's (``init_weights=True``): truncated normal σ=0.01 on conv and linear weights.
    ``plain``: the paper gives none; BVLC's Caffe reproduction (bvlc_googlenet) uses the "xavier" filler,
    U(±√(3/fan_in)), with conv biases 0.2 so the ReLUs of the 22-layer plain net start active.
    """
    if conv_block == "bn":
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_uniform_(m.weight, nonlinearity="linear")
        nn.init.constant_(m.bias, 0.2 if isinstance(m, nn.Conv2d) else 0.0)
