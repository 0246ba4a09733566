"""DenseNet family: torchvision equality for the ImageNet nets, the paper's DenseNet-BC (L=100, k=12)."""

from __future__ import annotations

import pytest
import torch
from torchvision import models as tvm

import cvarch
from cvarch.models.densenet import DenseNet

IMAGENET = ["data.num_classes=1000", "data.channels=3"]


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count(model: torch.nn.Module, kind: type | tuple[type, ...]) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize(
    ("name", "torchvision_params"),
    [
        ("densenet121", 7_978_856),
        pytest.param("densenet161", 28_681_000, marks=pytest.mark.slow),
        pytest.param("densenet169", 14_149_480, marks=pytest.mark.slow),
        pytest.param("densenet201", 20_013_928, marks=pytest.mark.slow),
    ],
)
def test_imagenet_configs_equal_torchvision(name, torchvision_params):
    torch.manual_seed(0)
    reference = getattr(tvm, name)(weights=None).eval()
    torch.manual_seed(0)
    ours = cvarch.build_model(f"model={name}", *IMAGENET).eval()
    assert params(ours) == params(reference) == torchvision_params
    # same seed, same construction order: torchvision's init reproduced tensor for tensor
    theirs = reference.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - reference(x)).abs().max() <= 1e-5


def test_densenet_bc100_12_matches_huang_2017_table_2():
    model = cvarch.build_model("model=densenet_bc100_12", "data.channels=3")  # CIFAR-10: RGB, 10 classes
    assert params(model) == 769_162  # the widely reproduced exact count (bias-free convs)
    assert params(model) == pytest.approx(0.8e6, abs=0.05e6)  # Table 2 prints 0.8M, rounded to 0.1M
    assert count(model, (torch.nn.Conv2d, torch.nn.Linear)) == 100  # L = 100 weighted layers
    assert count(model.features.denseblock1, torch.nn.Conv2d) == 2 * 16  # 16 bottleneck layers per block
    assert model.features.conv0.out_channels == 24  # stem: 2k channels
    assert model.features.conv0.kernel_size == (3, 3) and "pool0" not in model.features._modules
    assert model.features.transition1.conv.out_channels == (24 + 16 * 12) // 2  # θ = 0.5
    assert model.classifier.in_features == 150 + 16 * 12  # 342 channels leave the last block
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    digits = cvarch.build_model("model=densenet_bc100_12")  # the default run: 1-channel 8×8 digits
    assert params(model) - params(digits) == 3 * 3 * 2 * 24  # only conv0's input channels differ
    assert digits(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_norm_group_fills_every_norm_slot():
    with_bn = cvarch.build_model("model=densenet_bc100_12")
    without = cvarch.build_model("model=densenet_bc100_12", "norm=none")
    n_bn = count(with_bn, torch.nn.BatchNorm2d)
    assert n_bn == 3 * 16 * 2 + 2 + 1  # two per dense layer, one per transition, norm5
    assert count(without, torch.nn.BatchNorm2d) == 0
    bn_channels = sum(m.num_features for m in with_bn.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert params(with_bn) - params(without) == 2 * bn_channels
    assert without(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_dropout_follows_every_conv_but_the_first():
    model = DenseNet(12, [16, 16, 16], 24, stem="cifar", num_classes=10, dropout=0.2)
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(drops) == count(model, torch.nn.Conv2d) - 1  # Huang 2017 §4.2: all but the stem conv
    assert all(m.p == 0.2 for m in drops)
    model = DenseNet(12, [4, 4], 24, stem="cifar", num_classes=10, dropout=0.2)
    x = torch.randn(2, 3, 16, 16)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_act_layer_fills_every_activation():
    model = DenseNet(12, [2, 2], 24, stem="imagenet", num_classes=10, act_layer="gelu")
    assert count(model, torch.nn.ReLU) == 0
    assert count(model, torch.nn.GELU) == 1 + 2 * 4 + 1 + 1  # relu0, 2 per dense layer, transition, final
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="model.stem='tiny'"):
        DenseNet(stem="tiny")
    with pytest.raises(ValueError, match="model.compression=0"):
        DenseNet(compression=0)
