"""cvarch.cost on hand-built nets, where every count can be done by hand: receptive fields of stacked 3×3
convs, their parameters against one 7×7 (CS231n 2017 lecture 9), MACs per layer, FlopCounterMode's total, the
measured memory of a training step, and the MACs cvarch-train records."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import cvarch
from cvarch.cost import count_flops, count_macs, profile_model


def stack(depth: int, channels: int) -> nn.Sequential:
    layers = []
    for _ in range(depth):
        layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def conv_net() -> nn.Sequential:
    """Two convolutions (one grouped) and a linear layer on 3×32×32 inputs."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, groups=2),
        nn.Flatten(),
        nn.Linear(16 * 14 * 14, 10),
    )


CONV_NET_MACS = [
    8 * 16 * 16 * 3 * 25,
    16 * 14 * 14 * 4 * 9,
    16 * 14 * 14 * 10,
]  # out elements × (fan-in / groups)


@pytest.mark.parametrize("depth, rf", [(1, 3), (2, 5), (3, 7)])
def test_stacked_3x3_convs_see_2n_plus_1(depth, rf):
    p = profile_model(stack(depth, 8), (8, 16, 16))
    assert [r.rf for r in p.rows] == [1, *range(3, rf + 1, 2)]
    assert len(p.rows) == depth + 1  # in-place ReLUs add no row


class TwoPaths(nn.Module):
    """A residual block with a projection shortcut: two convs on the main path, one on the shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.downsample, self.norm = nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv2(self.conv1(x))) + self.downsample(x)


def test_depth_counts_convs_and_linear_layers_on_the_longest_path():
    """Szegedy et al. 2014 §5 ("22 layers … counting only layers with parameters"): norms and pools add
    nothing, a parallel shortcut does not add to the main path."""
    p = profile_model(conv_net(), (3, 32, 32))
    assert [r.depth for r in p.rows] == [0, 1, 2, 3] and p.totals.depth == 3
    block = profile_model(nn.Sequential(TwoPaths(), nn.MaxPool2d(2)), (4, 8, 8))
    depths = {r.name: r.depth for r in block.rows}
    assert depths == {"input": 0, "0.conv1": 1, "0.conv2": 2, "0.norm": 2, "0.downsample": 1, "1": 2}
    assert block.totals.depth == 2


def test_three_3x3_convs_cost_fewer_parameters_than_one_7x7():
    c = 16
    three = profile_model(stack(3, c), (c, 16, 16)).totals
    seven = profile_model(nn.Conv2d(c, c, 7, padding=3, bias=False), (c, 16, 16)).totals
    assert three.params == 3 * (3**2 * c**2) == 6_912
    assert seven.params == 7**2 * c**2 == 12_544
    assert seven.activations == 16 * 16 * c
    assert three.activations == 3 * 16 * 16 * c


def test_flops_equal_flop_counter_for_conv_and_linear_nets():
    p = profile_model(conv_net(), (3, 32, 32))
    assert [r.type for r in p.rows] == ["Input", "Conv2d", "Conv2d", "Linear"]
    assert [r.macs for r in p.rows[1:]] == CONV_NET_MACS
    assert p.totals.flops == p.totals.flops_counter == 2 * p.totals.macs
    assert p.totals.flops_diff == 0
    assert p.row("4").rf == 9 + (14 - 1) * 2  # the linear layer sees the whole 14×14 map of rf 9, jump 2


def test_row_macs_are_the_flop_counters_split_and_work_outside_rows_is_the_diff():
    """One counter: a row's MACs are FlopCounterMode's count during its call / 2; a matmul in no leaf module
    is in ``flops_counter`` only."""

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 4)
            self.mix = nn.Parameter(torch.zeros(4, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.flatten(1)) @ self.mix  # in Head's own forward: no row

    p = profile_model(Head(), (1, 4, 4))
    assert [(r.name, r.macs) for r in p.rows[1:]] == [("fc", 4 * 16)]
    assert p.totals.flops_counter == 2 * (4 * 16 + 4 * 3) == count_flops(Head(), (1, 1, 4, 4))
    assert p.totals.flops_diff == 2 * 4 * 3


def test_measured_memory_of_a_training_step():
    model = stack(2, 8)
    p = profile_model(model, (8, 32, 32), batch_size=4, measure_memory=True)
    t = p.totals
    assert t.measured_with and t.measured_peak_mb > 0
    # at least the two stored conv outputs of the batch in fp32
    assert t.measured_peak_mb * 1e6 >= 2 * 4 * 8 * 32 * 32 * 4
    assert all(q.grad is None for q in model.parameters())


def test_count_macs_is_the_hand_count_per_image_and_scales_with_the_batch():
    model = conv_net()
    assert count_macs(model, torch.zeros(1, 3, 32, 32)) == sum(CONV_NET_MACS)
    assert count_macs(model, torch.zeros(4, 3, 32, 32)) == 4 * sum(CONV_NET_MACS)
    assert count_flops(model, (1, 3, 32, 32)) == 2 * sum(CONV_NET_MACS)


def test_count_macs_of_resnet20_equals_a_real_forward_and_leaves_the_model_alone():
    """What cvarch-train records as ``gmacs``: counted on the meta device, the same as FlopCounterMode on a
    real forward, with no update of the BatchNorm running statistics even in training mode."""
    model = cvarch.build_model("model=resnet20", "data.channels=3", "data.num_classes=10")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    macs = count_macs(model, torch.randn(1, 3, 32, 32))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.eval()(torch.randn(1, 3, 32, 32))
    assert macs == counter.get_total_flops() // 2 == 40_551_040  # 0.041 GMACs: 3 stages of 3×3 convs
