"""AlexNet family: the lecture's AlexNet layer by layer, torchvision's AlexNet exactly, ZFNet's Fig. 3."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision import models as tvm

import cvarch
from cvarch.models.alexnet import AlexNet

IMAGENET = ("data.num_classes=1000", "data.channels=3")


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def layer_shapes(model: nn.Module, size: int) -> list[tuple[str, tuple[int, ...]]]:
    """(layer type, output shape without the batch) of every conv, pool, norm and Linear, in forward order."""
    seen: list[tuple[str, tuple[int, ...]]] = []
    kinds = (nn.Conv2d, nn.MaxPool2d, nn.LocalResponseNorm, nn.Linear)
    hooks = [
        m.register_forward_hook(lambda m, i, o: seen.append((type(m).__name__, tuple(o.shape[1:]))))
        for m in model.modules()
        if isinstance(m, kinds)
    ]
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, size, size))
    for h in hooks:
        h.remove()
    return seen


@pytest.fixture(scope="module")
def lecture() -> nn.Module:
    return cvarch.build_model("model=alexnet", *IMAGENET)


def test_lecture_alexnet_layer_by_layer(lecture):
    assert layer_shapes(lecture, 227) == [
        ("Conv2d", (96, 55, 55)),  # CONV1: 96 11×11 filters at stride 4, pad 0
        ("MaxPool2d", (96, 27, 27)),  # POOL1: 3×3 stride 2
        ("LocalResponseNorm", (96, 27, 27)),  # NORM1
        ("Conv2d", (256, 27, 27)),  # CONV2: 256 5×5, pad 2
        ("MaxPool2d", (256, 13, 13)),  # POOL2
        ("LocalResponseNorm", (256, 13, 13)),  # NORM2
        ("Conv2d", (384, 13, 13)),  # CONV3: 384 3×3, pad 1
        ("Conv2d", (384, 13, 13)),  # CONV4
        ("Conv2d", (256, 13, 13)),  # CONV5
        ("MaxPool2d", (256, 6, 6)),  # POOL3
        ("Linear", (4096,)),  # FC6
        ("Linear", (4096,)),  # FC7
        ("Linear", (1000,)),  # FC8
    ]
    conv1 = lecture.features[0]
    assert conv1.weight.numel() == 11 * 11 * 3 * 96 == 34_848
    assert conv1.bias.numel() == 96
    pools = [m for m in lecture.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 3 and all(params(p) == 0 for p in pools)
    assert lecture.classifier[0].in_features == 6 * 6 * 256  # no adaptive pooling in front of FC6
    dropouts = [m.p for m in lecture.classifier if isinstance(m, nn.Dropout)]
    assert dropouts == [0.5, 0.5]  # on FC6 and FC7


def test_lecture_alexnet_is_the_papers_60m_on_one_tower(lecture):
    assert params(lecture) == 62_378_344
    # Krizhevsky 2012 §3.5: CONV2, CONV4, CONV5 see only their own GPU's half of the previous layer's maps, so
    # the two-tower net has half of their weights: 60,965,224 parameters, the paper's "60 million"
    split = sum(lecture.features[i].weight.numel() // 2 for i in (4, 10, 12))
    assert params(lecture) - split == 60_965_224
    assert params(lecture) - split == pytest.approx(60e6, rel=0.02)


def test_lecture_alexnet_keeps_the_papers_init(lecture):
    convs = [m for m in lecture.features if isinstance(m, nn.Conv2d)]
    fcs = [m for m in lecture.classifier if isinstance(m, nn.Linear)]
    biases = [float(m.bias.mean()) for m in convs + fcs]
    assert biases == [0, 1, 0, 1, 1, 1, 1, 0]  # §5: 1 in CONV2, CONV4, CONV5, FC6, FC7
    assert float(fcs[0].weight.std()) == pytest.approx(0.01, rel=0.01)  # §5: N(0, 0.01²)


def test_lecture_alexnet_takes_227_only_and_says_so():
    with pytest.raises(ValueError, match=r"layer '[\w.]+'.*smallest square input that works is 227×227"):
        cvarch.build_model("model=alexnet", "data.image_size=32", "data.channels=3", "data.num_classes=1000")


def test_norm_none_empties_the_lrn_slots():
    model = cvarch.build_model("model=alexnet", "norm=none", *IMAGENET)
    assert not any(isinstance(m, (nn.LocalResponseNorm, nn.Identity)) for m in model.features)
    assert len(model.features) == 13  # 5 × (conv, ReLU) + 3 pools
    assert params(model) == 62_378_344  # LRN has no parameters
    assert model(torch.randn(1, 3, 227, 227)).shape == (1, 1000)


def test_alexnet_tv_equals_torchvision():
    torch.manual_seed(0)
    reference = tvm.alexnet(weights=None).eval()
    ours = cvarch.build_model("model=alexnet_tv", *IMAGENET).eval()
    assert params(ours) == params(reference) == 61_100_840
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)  # the smallest input torchvision's AlexNet takes is 63×63
    with torch.no_grad():
        assert (ours(x) - reference(x)).abs().max() <= 1e-5


def test_zfnet_follows_fig_3_with_the_lectures_widths():
    model = cvarch.build_model("model=zfnet", *IMAGENET)
    assert layer_shapes(model, 224) == [
        ("Conv2d", (96, 110, 110)),  # CONV1: 7×7 stride 2 (AlexNet: 11×11 stride 4)
        ("MaxPool2d", (96, 55, 55)),
        ("LocalResponseNorm", (96, 55, 55)),
        ("Conv2d", (256, 26, 26)),  # CONV2: 5×5 stride 2
        ("MaxPool2d", (256, 13, 13)),
        ("LocalResponseNorm", (256, 13, 13)),
        ("Conv2d", (512, 13, 13)),  # CONV3-5: 512, 1024, 512 (AlexNet: 384, 384, 256)
        ("Conv2d", (1024, 13, 13)),
        ("Conv2d", (512, 13, 13)),
        ("MaxPool2d", (512, 6, 6)),
        ("Linear", (4096,)),
        ("Linear", (4096,)),
        ("Linear", (1000,)),
    ]
    assert params(model) == 107_627_624
    assert all(
        float(m.bias.abs().sum()) == 0 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    )


def test_bad_layer_specs_are_named():
    with pytest.raises(ValueError, match=r"model.features: 'P'"):
        AlexNet([[8, 3, 1, 1], "P"], pool_size=1)
    with pytest.raises(ValueError, match=r"model.classifier: 'X'"):
        AlexNet([[8, 3, 1, 1]], classifier=[16, "X"], pool_size=1)
    with pytest.raises(ValueError, match=r"model.bias_init has 2 values for 3 weighted layers"):
        AlexNet([[8, 3, 1, 1]], classifier=[16], pool_size=1, bias_init=[0, 1])
