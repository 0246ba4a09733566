"""ResNet family: the paper's CIFAR parameter counts and torchvision equality for the ImageNet settings."""

from __future__ import annotations

import pytest
import torch
from torchvision import models as tvm

import cvarch
from cvarch.models.resnet import ResNet


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet20_matches_he_2015_table_6():
    model = cvarch.build_model("model=resnet20", "data.channels=3")  # CIFAR: RGB input
    assert params(model) == pytest.approx(0.27e6, rel=0.02)  # He et al. 2015 Table 6: 0.27M
    assert params(model) == 269_722  # the widely reproduced exact count (option-A shortcuts have no weights)
    n = len([m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))])
    assert n == 20  # 6n+2 weighted layers
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    digits = cvarch.build_model("model=resnet20")  # the default run: 1-channel 8×8 digits
    assert params(model) - params(digits) == 3 * 3 * 2 * 16  # only conv1's input channels differ
    assert digits(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize(("layers", "paper"), [([5, 5, 5], 0.46e6), ([7, 7, 7], 0.66e6), ([9, 9, 9], 0.85e6)])
def test_cifar_resnets_are_settings_of_the_same_class(layers, paper):
    model = ResNet("basic", layers, [16, 32, 64], stem="cifar", shortcut="A", num_classes=10)
    assert params(model) == pytest.approx(paper, rel=0.02)  # He et al. 2015 Table 6


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("resnet18", dict(block="basic", layers=[2, 2, 2, 2])),
        ("resnet50", dict(block="bottleneck", layers=[3, 4, 6, 3])),
        ("resnext50_32x4d", dict(block="bottleneck", layers=[3, 4, 6, 3], groups=32, width_per_group=4)),
    ],
)
def test_imagenet_settings_equal_torchvision(name, kwargs):
    torch.manual_seed(0)
    reference = getattr(tvm, name)(weights=None).eval()
    ours = ResNet(**kwargs).eval()
    assert params(ours) == params(reference)
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - reference(x)).abs().max() <= 1e-5


def test_norm_group_fills_every_norm_slot():
    with_bn = cvarch.build_model("norm=batchnorm")
    without = cvarch.build_model("norm=none")
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in with_bn.modules())
    assert n_bn == 19  # stem + 2 per block × 9 blocks
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in without.modules())
    assert params(with_bn) - params(without) == 2 * (16 + 6 * 16 + 6 * 32 + 6 * 64)


def test_zero_init_residual_makes_every_block_start_as_identity():
    model = ResNet("basic", [1, 1, 1], [16, 32, 64], stem="cifar", shortcut="A", zero_init_residual=True)
    assert all(
        float(b.bn2.weight.detach().abs().sum()) == 0
        for b in [model.layer1[0], model.layer2[0], model.layer3[0]]
    )


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="model.block='triple'"):
        ResNet("triple")
    with pytest.raises(ValueError, match="differ in length"):
        ResNet("basic", [1, 1], [16, 32, 64])
