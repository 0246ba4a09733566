"""The lecture's cost figures (CS231n 2017 lecture 9) and the profiles the tests set against them."""

from __future__ import annotations

import cvarch
import cvarch.profile
from cvarch.cost import Profile

# Figures as the lecture slides quote them, next to the counted ones in tests/test_profile.py and the README.
LECTURE = {
    "vgg16_activations": 24_000_000,  # "TOTAL memory: 24M * 4 bytes ~= 96MB / image"
    "vgg16_activation_mb": 96,
    "vgg16_params": 138_000_000,  # "TOTAL params: 138M parameters"
    "inception_naive_macs": 854_000_000,  # "Total: 854M ops"
    "inception_reduced_macs": 358_000_000,  # "Total: 358M ops" (counts the 3×3 conv, 86.7M, twice)
    "googlenet_fewer_params_than_alexnet": 12,  # "12x less params than AlexNet" (Szegedy 2016 §1: 5M vs 60M)
}


def profile(*overrides: str) -> Profile:
    """The profile ``cvarch-profile <overrides>`` computes, e.g. ``profile("model=vgg16")``."""
    return cvarch.profile.profile(cvarch.compose(*overrides, config_name="profile"))


def inception_module_macs(inception: str) -> int:
    """Conv MACs of the lecture's Inception module on 28×28×256 (Szegedy 2014 Fig. 2), ``naive`` or
    ``reduced``."""
    return profile(
        "model=inception_module",
        f"model.inception={inception}",
        "data.channels=256",
        "data.image_size=28",
        "measure_memory=false",
    ).totals.macs


def googlenet_alexnet_param_ratio() -> dict[str, float]:
    """Parameters of the lecture's AlexNet over those of the paper's GoogLeNet without auxiliary classifiers.

    The lecture's "12x less params than AlexNet" is Szegedy et al. 2014 §1 ("12× fewer"), which Szegedy et
    al. 2016 (Inception-v3, §1) spells out as 5M against AlexNet's 60M; the nets built here give about 8.9.
    """
    common = ("data.channels=3", "data.num_classes=1000", "measure_memory=false")
    alexnet = profile("model=alexnet", "data.image_size=227", *common).totals.params
    googlenet = profile(
        "model=googlenet", "model.aux_logits=false", "data.image_size=224", *common
    ).totals.params
    return {"alexnet": alexnet, "googlenet": googlenet, "ratio": alexnet / googlenet}
