"""Every model config builds through the public API and trains.

Each builds at its native input size (the build-time input check runs there, on the meta device) and trains:
forward and backward on a batch of 2, finite outputs of the right shape, and a gradient for every trainable
parameter. The ImageNet nets that accept it train at 64×64 (the same layers and the same gradient paths as at
224, a twelfth of the arithmetic); the lecture's AlexNet (227 only) and GoogLeNet (its auxiliary heads need
223) train at their native size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import cvarch
from cvarch.config import CONFIG_DIR

SMALL = 64  # the side the ImageNet nets train at here

MODELS = sorted(p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml"))

# Native input side of the ImageNet-sized nets; every other config is a CIFAR net (32×32) unless listed here.
NATIVE = {
    "alexnet": 227,  # the lecture's AlexNet: 227×227×3, fixed-size FC6
    "inception_module": 28,  # the lecture's cost example: 28×28×256
    "mlp": 8,  # the digits the MLP config is sized for (in_features 64 = 1×8×8)
}
IMAGENET_PREFIXES = (
    "alexnet_tv",
    "zfnet",
    "vgg",
    "googlenet",
    "squeezenet",
    "densenet1",
    "densenet2",
    "wide_resnet50",
    "resnext50",
    "resnext101",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
)
CHANNELS = {"inception_module": 256, "mlp": 1}
ALL_PATHS = ["model.drop_path_local=0", "model.global_fraction=0"]  # every FractalNet path active
OVERRIDES = {"fractalnet": ALL_PATHS, "fractalnet20": ALL_PATHS}


def native_size(name: str) -> int:
    if name in NATIVE:
        return NATIVE[name]
    return 224 if name.startswith(IMAGENET_PREFIXES) else 32


def is_slow(name: str) -> bool:
    return native_size(name) >= 224 or name in (
        "resnet1202",
        "wrn28_10",
        "resnext29_16x64d",
        "resnext29_8x64d",
    )


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if is_slow(n) else n for n in MODELS]
)
def test_model_config_builds_at_its_native_size_and_trains(name):
    size, channels = native_size(name), CHANNELS.get(name, 3)
    overrides = [
        f"model={name}",
        f"data.image_size={size}",
        f"data.channels={channels}",
        "data.num_classes=10",
    ]
    torch.manual_seed(0)
    model = cvarch.build_model(*overrides, *OVERRIDES.get(name, []))  # includes the build-time input check
    model.train()
    try:
        x = torch.randn(2, channels, min(size, SMALL), min(size, SMALL))
        out = model(x)
    # too small for it: a fixed-size classifier (the lecture's AlexNet), GoogLeNet's aux heads
    except RuntimeError:
        x = torch.randn(2, channels, size, size)
        out = model(x)
    outputs = out if isinstance(out, tuple) else (out,)
    for o in outputs:
        assert torch.isfinite(o).all()
        if name != "inception_module":
            assert o.shape == (2, 10)
    sum(o.square().mean() for o in outputs).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reached {missing[:5]}"
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, torch.Tensor) and torch.isfinite(out).all()
