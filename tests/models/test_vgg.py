"""VGG family: Table 1's configurations against torchvision's counts, layouts and logits, and the lecture's
VGG16 arithmetic against the real model."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision import models as tvm

import cvarch
from cvarch.models.vgg import VGG

IMAGENET = ("data.num_classes=1000", "data.channels=3")


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_meta(*overrides: str) -> nn.Module:
    """The model as the public API builds it, on the meta device: shapes and counts without 140M draws."""
    with torch.device("meta"):
        return cvarch.build_model(*overrides)


@pytest.mark.parametrize(
    ("name", "norm", "torchvision", "count", "paper"),
    [
        ("vgg11", "none", "vgg11", 132_863_336, 133e6),  # Simonyan 2014 Table 2: A 133M
        ("vgg13", "none", "vgg13", 133_047_848, 133e6),  # B 133M
        ("vgg16", "none", "vgg16", 138_357_544, 138e6),  # D 138M
        ("vgg19", "none", "vgg19", 143_667_240, 144e6),  # E 144M
        ("vgg11", "batchnorm", "vgg11_bn", 132_868_840, 133e6),
        ("vgg13", "batchnorm", "vgg13_bn", 133_053_736, 133e6),
        ("vgg16", "batchnorm", "vgg16_bn", 138_365_992, 138e6),
        ("vgg19", "batchnorm", "vgg19_bn", 143_678_248, 144e6),
    ],
)
def test_configurations_match_torchvision_and_table_2(name, norm, torchvision, count, paper):
    ours = build_meta(f"model={name}", f"norm={norm}", *IMAGENET)
    with torch.device("meta"):
        reference = getattr(tvm, torchvision)(weights=None)
    assert params(ours) == params(reference) == count
    assert params(ours) == pytest.approx(paper, rel=0.02)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, v.shape) for k, v in reference.state_dict().items()
    ]


@pytest.mark.parametrize("name", ["vgg11", "vgg13", "vgg16", "vgg19"])
def test_only_3x3_convs_and_2x2_pools(name):
    model = build_meta(f"model={name}", *IMAGENET)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    pools = [m for m in model.features if isinstance(m, nn.MaxPool2d)]
    assert len(convs) + 3 == int(name[3:])  # weight layers: convs + 3 FCs
    assert all(c.kernel_size == (3, 3) and c.stride == (1, 1) and c.padding == (1, 1) for c in convs)
    assert len(pools) == 5 and all(p.kernel_size == 2 and p.stride == 2 for p in pools)
    assert not any(isinstance(m, (nn.Identity, nn.BatchNorm2d)) for m in model.features)  # norm slots empty


def test_lecture_vgg16_arithmetic():
    model = build_meta("model=vgg16", *IMAGENET)
    convs = [m.weight.numel() for m in model.features if isinstance(m, nn.Conv2d)]
    fcs = [m.weight.numel() for m in model.classifier if isinstance(m, nn.Linear)]
    assert convs == [
        3 * 3 * 3 * 64,  # 1,728
        3 * 3 * 64 * 64,  # 36,864
        3 * 3 * 64 * 128,  # 73,728
        3 * 3 * 128 * 128,  # 147,456
        3 * 3 * 128 * 256,  # 294,912
        3 * 3 * 256 * 256,  # 589,824
        3 * 3 * 256 * 256,
        3 * 3 * 256 * 512,  # 1,179,648
        3 * 3 * 512 * 512,  # 2,359,296
        3 * 3 * 512 * 512,
        3 * 3 * 512 * 512,
        3 * 3 * 512 * 512,
        3 * 3 * 512 * 512,
    ]
    assert convs[:3] == [1_728, 36_864, 73_728] and convs[-1] == 2_359_296
    assert fcs == [7 * 7 * 512 * 4096, 4096 * 4096, 4096 * 1000] == [102_760_448, 16_777_216, 4_096_000]
    biases = sum(m.bias.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert sum(convs) + sum(fcs) + biases == params(model) == 138_357_544
    assert round(params(model) / 1e6) == 138  # the lecture's "TOTAL params: 138M"
    assert fcs[0] / params(model) > 0.74  # most of them in FC6


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "norm", "torchvision"),
    [
        ("vgg11", "none", "vgg11"),
        ("vgg16", "none", "vgg16"),
        ("vgg19", "none", "vgg19"),
        ("vgg16", "batchnorm", "vgg16_bn"),
    ],
)
def test_logits_equal_torchvision(name, norm, torchvision):
    torch.manual_seed(0)
    reference = getattr(tvm, torchvision)(weights=None).eval()
    ours = cvarch.build_model(f"model={name}", f"norm={norm}", *IMAGENET).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)  # the adaptive 7×7 pool takes anything from 32×32 on
    with torch.no_grad():
        out = ours(x)
        assert out.shape == (2, 1000)
        assert (out - reference(x)).abs().max() <= 1e-5


def test_bad_cfg_entry_is_named():
    with pytest.raises(ValueError, match=r"model.cfg: 'P'"):
        VGG([64, "P"])
