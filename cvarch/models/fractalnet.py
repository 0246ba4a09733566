"""FractalNet: Larsson et al. 2017, "Ultra-Deep Neural Networks without Residuals" (arXiv:1605.07648).

A block is the truncated fractal f_C of the expansion rule (§2, eq. 1)

    f_1(z) = conv(z),    f_{C+1}(z) = join(f_C ∘ f_C(z), conv(z)),

built here by that recursion: :class:`Fractal` holds the new one-conv column (``conv``) and the two copies of
f_C (``first``, ``second``). Joins that meet at the same depth are one join, as in the paper's Fig. 1: the
last join of f_{C+1} averages the last join's inputs of the second f_C together with conv(z). Columns are
numbered by depth: column c of f_C is a plain chain of 2^c convs, so column C−1 is the deepest.

Drop-path (§3) regularizes training: a mini-batch uses either local drop-path (each join drops each input with
probability ``drop_path_local``, keeping at least one) or, with probability ``global_fraction``, global
drop-path (one column, the same in every block). At test time every path is active; every join is a mean.

Its stages are the blocks; its classifier is ``fc`` (see :mod:`cvarch.models.layers`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from cvarch.models.layers import ActFactory, FeatureInfo, get_act_layer, new_linear
from cvarch.norm import NormFactory, get_norm_layer


def join(inputs: list[torch.Tensor], drop: float = 0.0) -> torch.Tensor:
    """Element-wise mean of the inputs that survive local drop-path (Larsson 2017 §2 join, §3 drop-path).

    Args:
        inputs: the tensors meeting at this join, all of one shape.
        drop: probability of dropping each input; at least one input always survives.
    """
    if drop > 0.0 and len(inputs) > 1:
        keep = (torch.rand(len(inputs)) >= drop).tolist()  # one draw per join per mini-batch (§3)
        if not any(keep):
            keep[int(torch.randint(len(inputs), ()))] = True
        inputs = [x for x, k in zip(inputs, keep, strict=True) if k]
    return torch.stack(inputs).mean(0)


class ConvUnit(nn.Sequential):
    """conv of the expansion rule: 3×3 conv, norm, activation, dropout (Larsson 2017 §2, §4).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        norm: ``norm(num_channels)`` factory (paper: batch norm).
        act: activation factory (paper: ReLU).
        dropout: drop probability of the block this unit belongs to (§4).
    """

    def __init__(
        self, in_channels: int, out_channels: int, norm: NormFactory, act: ActFactory, dropout: float
    ) -> None:
        layers = OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            norm=norm(out_channels),
            act=act(),
            drop=nn.Dropout(dropout),
        )
        super().__init__(layers)


class Fractal(nn.Module):
    """The fractal f_C of Larsson 2017 eq. (1): ``first`` and ``second`` are the two copies of f_{C−1}.

    Args:
        in_channels: input channels.
        out_channels: channels of every conv.
        columns: C.
        norm: ``norm(num_channels)`` factory.
        act: activation factory.
        dropout: drop probability after every conv.
        drop_path_local: local drop-path probability of every join (§3; paper: 0.15).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        columns: int,
        norm: NormFactory,
        act: ActFactory,
        dropout: float,
        drop_path_local: float,
    ) -> None:
        super().__init__()
        self.columns = columns
        self.drop_path_local = drop_path_local
        self.conv = ConvUnit(in_channels, out_channels, norm, act, dropout)
        if columns > 1:
            self.first = Fractal(in_channels, out_channels, columns - 1, norm, act, dropout, drop_path_local)
            self.second = Fractal(
                out_channels, out_channels, columns - 1, norm, act, dropout, drop_path_local
            )

    def branches(self, z: torch.Tensor) -> list[torch.Tensor]:
        """The inputs of f_C's last join: the deeper columns' outputs, then conv(z) (column 0) last."""
        if self.columns == 1:
            return [self.conv(z)]
        drop = self.drop_path_local if self.training else 0.0
        y = join(self.first.branches(z), drop)
        return self.second.branches(y) + [self.conv(z)]

    def column(self, z: torch.Tensor, c: int) -> torch.Tensor:
        """Column c alone, a chain of 2^c convs: what global drop-path trains (§3)."""
        if c == 0:
            return self.conv(z)
        y = self.first.column(z, c - 1)
        return self.second.column(y, c - 1)

    def column_units(self, c: int) -> list[ConvUnit]:
        """The convs of column c, input to output."""
        if c == 0:
            return [self.conv]
        return self.first.column_units(c - 1) + self.second.column_units(c - 1)

    def forward(self, z: torch.Tensor, column: int | None = None) -> torch.Tensor:
        if column is not None:
            return self.column(z, column)
        return join(self.branches(z), self.drop_path_local if self.training else 0.0)


class FractalNet(nn.Module):
    """FractalNet of Larsson et al. 2017 (§2 Fig. 1, §4): B fractal blocks, each followed by a 2×2 max-pool.

    Init: the paper does not state one; He normal (fan_in, ReLU gain) for convs, γ=1, β=0 for norms.

    Args:
        channels: conv channels of each block; its length is B (§4: 64, 128, 256, 512, 512).
        columns: C, columns per block; the deepest path has B·2^(C−1) convs.
        drop_path_local: probability that a join drops each of its inputs in a local mini-batch (§4: 0.15).
        global_fraction: share of mini-batches that use global drop-path (§3: 0.5).
        num_classes: outputs of the final ``fc``.
        in_channels: input image channels.
        norm_layer: norm name or ``norm(num_channels)`` factory (the ``norm`` group; paper: batch norm).
        act_layer: activation name or factory (paper: ReLU).
        dropout: drop probability after every conv, one per block or one for all
            (§4 without augmentation: 0, 0.1, 0.2, 0.3, 0.4).
    """

    def __init__(
        self,
        channels: Sequence[int] = (64, 128, 256, 512, 512),
        columns: int = 4,
        drop_path_local: float = 0.15,
        global_fraction: float = 0.5,
        num_classes: int = 1000,
        in_channels: int = 3,
        norm_layer: str | NormFactory | None = "batchnorm",
        act_layer: str | ActFactory = "relu",
        dropout: float | Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4),
    ) -> None:
        super().__init__()
        if columns < 1:
            raise ValueError(f"model.columns={columns} must be at least 1")
        if not 0.0 <= drop_path_local < 1.0:
            raise ValueError(f"model.drop_path_local={drop_path_local} must be in [0, 1)")
        if not 0.0 <= global_fraction <= 1.0:
            raise ValueError(f"model.global_fraction={global_fraction} must be in [0, 1]")
        rates = [float(dropout)] * len(channels) if isinstance(dropout, (int, float)) else list(dropout)
        if len(rates) != len(channels):
            raise ValueError(f"model.dropout {rates} and model.channels {list(channels)} differ in length")
        norm = get_norm_layer(norm_layer)
        act = get_act_layer(act_layer)
        self.columns = columns
        self.global_fraction = global_fraction
        self.blocks = nn.ModuleList()
        self.feature_info: list[FeatureInfo] = []
        for i, (width, rate) in enumerate(zip(channels, rates, strict=True)):
            self.blocks.append(Fractal(in_channels, width, columns, norm, act, rate, drop_path_local))
            in_channels = width
            # a stage is a block; the max-pool after it is one module shared by all blocks, so cannot end one
            self.feature_info.append(FeatureInfo(module=f"blocks.{i}", num_chs=width, reduction=2**i))
        self.pool = nn.MaxPool2d(2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))  # 32×32 input is 1×1 after 5 pools; other sizes average
        self.fc = nn.Linear(in_channels, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def sample_drop_path(self) -> int | None:
        """Draws this mini-batch's drop-path (§3): a global column with probability ``global_fraction``, else
        ``None`` for local drop-path at every join."""
        if float(torch.rand(())) < self.global_fraction:
            return int(torch.randint(self.columns, ()))
        return None

    def extract_column(self, c: int) -> nn.Sequential:
        """Column c of every block as a plain chain sharing this net's weights, B·2^c convs deep: the
        fixed-depth subnetwork that drop-path makes usable on its own (Table 1's "deepest column alone":
        c = C−1)."""
        layers: list[nn.Module] = []
        for block in self.blocks:
            layers += [*block.column_units(c), self.pool]
        return nn.Sequential(*layers, self.avgpool, nn.Flatten(1), self.fc)

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """A new ``fc`` of ``num_classes`` outputs, with PyTorch's default Linear init, as constructed."""
        self.fc = new_linear(self.fc, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        column = self.sample_drop_path() if self.training else None
        for block in self.blocks:
            x = block(x, column)  # (N, channels[b], H, W)
            x = self.pool(x)  # (N, channels[b], H/2, W/2)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.avgpool(x)  # (N, channels[-1], 1, 1)
        x = torch.flatten(x, 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
