"""The profiles the tests set against the lecture's cost figures (CS231n 2017 lecture 9); the slides'
own values are in cvarch/lecture.py, which ``cvarch-lecture`` checks."""

from __future__ import annotations

import cvarch
import cvarch.profile
from cvarch.cost import Profile


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
