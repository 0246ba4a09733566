"""SqueezeNet family: torchvision's 1.0 and 1.1 exactly, and the bypass connections of Iandola 2016 §5."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision import models as tvm

import cvarch
from cvarch.models.squeezenet import Fire, SqueezeNet

IMAGENET = ("data.num_classes=1000", "data.channels=3")


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fires(model: nn.Module) -> list[Fire]:
    return [m for m in model.features if isinstance(m, Fire)]


@pytest.mark.parametrize(("name", "count"), [("squeezenet1_0", 1_248_424), ("squeezenet1_1", 1_235_496)])
def test_equals_torchvision(name, count):
    torch.manual_seed(0)
    reference = getattr(tvm, name)(weights=None).eval()
    ours = cvarch.build_model(f"model={name}", *IMAGENET).eval()
    assert params(ours) == params(reference) == count
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = ours(x)
        assert out.shape == (2, 1000)
        assert (out - reference(x)).abs().max() <= 1e-5


def test_squeezenet1_0_is_table_1():
    model = cvarch.build_model("model=squeezenet1_0", *IMAGENET)
    assert params(model) == pytest.approx(1.248e6, rel=0.02)  # Table 1: 1,248,424 before pruning
    assert [
        (f.squeeze.out_channels, f.expand1x1.out_channels, f.expand3x3.out_channels) for f in fires(model)
    ] == [
        (16, 64, 64),
        (16, 64, 64),
        (32, 128, 128),
        (32, 128, 128),
        (48, 192, 192),
        (48, 192, 192),
        (64, 256, 256),
        (64, 256, 256),
    ]
    shapes = []
    hooks = [f.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:]))) for f in fires(model)]
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 227, 227))
    for h in hooks:
        h.remove()
    assert shapes == [  # Table 1's output sizes, fire2 … fire9, at Caffe's 227×227 crop
        (128, 55, 55),
        (128, 55, 55),
        (256, 55, 55),
        (256, 27, 27),
        (384, 27, 27),
        (384, 27, 27),
        (512, 27, 27),
        (512, 13, 13),
    ]


@pytest.mark.parametrize("name", ["squeezenet1_0", "squeezenet1_1"])
def test_simple_bypass_is_free_and_goes_around_fire3_5_7_9(name):
    plain = cvarch.build_model(f"model={name}", *IMAGENET)
    simple = cvarch.build_model(f"model={name}", "model.bypass=simple", *IMAGENET)
    assert params(simple) == params(plain)
    assert list(simple.state_dict()) == list(plain.state_dict())
    assert [f.shortcut is not None for f in fires(plain)] == [False] * 8  # bypass=none: torchvision's Fire
    assert [isinstance(f.shortcut, nn.Identity) for f in fires(simple)] == [False, True] * 4  # fire3, 5, 7, 9
    fire3 = fires(simple)[1]
    x = torch.randn(1, 128, 8, 8)
    with torch.no_grad():
        with_bypass = fire3(x)
        fire3.shortcut = None
        assert torch.allclose(with_bypass, fire3(x) + x)


def test_complex_bypass_adds_the_1x1_convs():
    plain = cvarch.build_model("model=squeezenet1_0", *IMAGENET)
    complex_ = cvarch.build_model("model=squeezenet1_0", "model.bypass=complex", *IMAGENET)
    shortcuts = [f.shortcut for f in fires(complex_)]
    assert [type(s).__name__ for s in shortcuts] == [
        "Conv2d",
        "Identity",
    ] * 4  # 1×1 conv around fire2, 4, 6, 8
    # (in → out) of fire2, 4, 6, 8 in 1.0: 96 → 128, 128 → 256, 256 → 384, 384 → 512; weights and biases
    added = (96 * 128 + 128) + (128 * 256 + 256) + (256 * 384 + 384) + (384 * 512 + 512)
    assert params(complex_) - params(plain) == added == 341_248
    assert complex_(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_norm_group_fills_the_conv_slots():
    model = cvarch.build_model("model=squeezenet1_1", "norm=batchnorm", *IMAGENET)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 1 + 3 * 8  # conv1 + 3 per Fire
    assert isinstance(model.features[1], nn.BatchNorm2d)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match=r"model.bypass='full'"):
        SqueezeNet([64, 3, 2], ["M", [16, 64, 64]], bypass="full")
    with pytest.raises(ValueError, match=r"model.features: 'P'"):
        SqueezeNet([64, 3, 2], ["P"])
