"""The speed-run net (airbench94, Jordan 2024): its parameter count against the stated formula, its FLOPs,
shapes and stages, and the airbench-specific pieces (dirac convs, frozen γ, logit scale)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import cvarch
from cvarch.models.speedrun import SpeedrunNet

CIFAR = ("model=speedrun", "data.channels=3", "data.image_size=32", "data.num_classes=10")


def formula(widths: list[int], classes: int = 10, channels: int = 3, stem: int = 24, k: int = 2) -> int:
    """stem w·(C·k² + 1); per group i → o: 9·i·o + 9·o² + 4·o; head widths[-1]·classes (no bias)."""
    total, previous = stem * (channels * k * k + 1), stem
    for width in widths:
        total += 9 * previous * width + 9 * width * width + 4 * width
        previous = width
    return total + previous * classes


@pytest.mark.parametrize(
    ("widths", "classes"), [([64, 256, 256], 10), ([32, 64, 128], 10), ([64, 256, 256], 100), ([16], 7)]
)
def test_parameter_count_matches_its_formula(widths, classes):
    model = SpeedrunNet(widths=widths, num_classes=classes)
    assert sum(p.numel() for p in model.parameters()) == formula(widths, classes)


def test_the_config_builds_airbench94s_1_97m_parameter_net_of_0_24_gflops():
    model = cvarch.build_model(*CIFAR)
    assert sum(p.numel() for p in model.parameters()) == formula([64, 256, 256]) == 1_972_792
    with FlopCounterMode(display=False) as counter:
        model.eval()(torch.randn(1, 3, 32, 32))
    assert counter.get_total_flops() / 1e9 == pytest.approx(0.236, abs=0.001)  # the "about 0.24"


def test_shapes_stages_and_head():
    model = cvarch.build_model(*CIFAR).eval()
    x = torch.randn(2, 3, 32, 32)
    features = model.forward_features(x)
    assert features.shape == (2, 256, 3, 3)  # 32 → 31 (2×2 stem) → 15 → 7 → 3
    assert [(f["module"], f["num_chs"], f["reduction"]) for f in model.feature_info] == [
        ("layer1", 64, 2),
        ("layer2", 256, 4),
        ("layer3", 256, 8),
    ]
    pooled = model.forward_head(features, pre_logits=True)
    assert torch.allclose(model(x), model.fc(pooled) / 9, atol=1e-6)  # logits × 1/9
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.get_classifier().bias is None


def test_group_convs_start_with_identity_filters_for_their_input_channels():
    """airbench's Conv: dirac_ on the first in_channels filters, so a conv starts passing its input on."""
    model = SpeedrunNet()
    conv = model.layer2.conv1  # 64 → 256
    x = torch.randn(1, 64, 7, 7)
    assert torch.allclose(conv(x)[:, :64], x, atol=1e-6)
    assert isinstance(model.layer1.norm1, nn.BatchNorm2d) and not model.layer1.norm1.weight.requires_grad
