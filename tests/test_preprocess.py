"""Preprocess: statistics fitted on the training split, applied as fitted, carried by the state dict."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cvarch.build import build_model, build_module
from cvarch.config import CONFIG_DIR
from cvarch.preprocess import ChannelMean, MeanImage, Rescale, Standardize, Whiten

OPTIONS = sorted(p.stem for p in Path(CONFIG_DIR, "preprocess").glob("*.yaml"))


def _correlated_images(n: int = 2000, seed: int = 0, shift: float = 0.0) -> torch.Tensor:
    """uint8 (n, 3, 4, 4) images whose pixels share a per-image brightness and a per-channel tint."""
    gen = torch.Generator().manual_seed(seed)
    brightness = torch.randn(n, 1, 1, 1, generator=gen) * 30
    tint = torch.randn(n, 3, 1, 1, generator=gen) * 15
    noise = torch.randn(n, 3, 4, 4, generator=gen) * 10
    ramp = torch.linspace(-20, 20, 16).view(1, 1, 4, 4)  # a fixed gradient: the mean image is not flat
    base = torch.tensor([120.0, 100.0, 80.0]).view(1, 3, 1, 1)
    return (base + shift + brightness + tint + noise + ramp).round().clamp(0, 255).to(torch.uint8)


def _flat_cov(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1).double()
    centred = flat - flat.mean(dim=0)
    return centred.T @ centred / flat.shape[0]


def test_standardize_gives_zero_mean_unit_std_per_channel_on_the_training_images():
    gen = torch.Generator().manual_seed(0)
    images = torch.stack(
        [
            torch.randint(0, 100, (64, 8, 8), generator=gen),
            torch.randint(100, 256, (64, 8, 8), generator=gen),
            torch.full((64, 8, 8), 7),
        ],
        dim=1,
    ).to(torch.uint8)
    pre = Standardize()
    pre.fit(images)
    out = pre(images)
    assert torch.allclose(out[:, :2].mean(dim=(0, 2, 3)), torch.zeros(2), atol=1e-5)
    assert torch.allclose(out[:, :2].std(dim=(0, 2, 3), unbiased=False), torch.ones(2), atol=1e-4)
    assert torch.isfinite(out[:, 2]).all()  # a constant channel is floored, not divided by zero
    expected = images[:, 0].double().div(255).mean()
    assert pre.mean[0].item() == pytest.approx(expected.item(), abs=1e-6)


def test_fitted_statistics_travel_in_the_state_dict():
    images = torch.randint(0, 256, (32, 3, 4, 4), dtype=torch.uint8)
    pre = Standardize()
    pre.fit(images)
    restored = Standardize()
    restored.load_state_dict(pre.state_dict(), strict=True)
    assert bool(restored.fitted)
    assert torch.equal(restored(images), pre(images))


def test_unfitted_standardize_refuses_to_run():
    with pytest.raises(RuntimeError, match="before fit"):
        Standardize()(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))


def test_rescale_maps_uint8_to_unit_interval():
    x = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    assert torch.equal(Rescale()(x), torch.tensor([[[[0.0, 1.0]]]]))


def test_mean_image_gives_zero_mean_per_pixel_on_the_training_images():
    images = _correlated_images()
    pre = MeanImage()
    pre.fit(images)
    assert pre.mean.shape == (3, 4, 4)  # the lecture's [32, 32, 3] array, channels first
    out = pre(images)
    assert torch.allclose(out.mean(dim=0), torch.zeros(3, 4, 4), atol=1e-5)
    assert torch.allclose(pre.mean, images.double().div(255).mean(dim=0).float(), atol=1e-6)


def test_channel_mean_gives_zero_mean_per_channel_and_keeps_the_spread():
    images = _correlated_images()
    pre = ChannelMean()
    pre.fit(images)
    assert pre.mean.numel() == 3  # VGG: 3 numbers
    out = pre(images)
    assert torch.allclose(out.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(out.std(dim=(0, 2, 3)), Rescale()(images).std(dim=(0, 2, 3)), atol=1e-6)
    # the ramp stays: the mean is per channel, not per pixel
    assert not torch.allclose(out.mean(dim=0), torch.zeros(3, 4, 4), atol=1e-2)


@pytest.mark.parametrize("mode", ["pca", "zca"])
def test_whitening_gives_identity_covariance_on_the_training_images(mode):
    images = _correlated_images()
    cov = _flat_cov(Rescale()(images))
    assert (cov / cov.diagonal().outer(cov.diagonal()).sqrt()).min() > 0.5  # every pixel pair is correlated
    pre = Whiten(mode=mode, eps=1e-8)
    pre.fit(images)
    out = pre(images)
    assert out.shape == images.shape and out.dtype == torch.float32
    assert torch.allclose(out.flatten(1).mean(dim=0), torch.zeros(48), atol=1e-4)
    assert torch.allclose(_flat_cov(out), torch.eye(48, dtype=torch.float64), atol=1e-3)


def test_pca_components_come_in_order_of_decreasing_variance_with_eps():
    images = _correlated_images()
    pre = Whiten(mode="pca", eps=1e-3)
    pre.fit(images)
    variances = _flat_cov(pre(images)).diagonal()  # λ / (λ + eps): decreasing in λ
    assert torch.all(variances[:-1] >= variances[1:] - 1e-4)
    assert variances.max() <= 1.0 + 1e-4


def test_zca_is_the_whitening_closest_to_the_centred_input():
    images = _correlated_images()
    centred = MeanImage()
    centred.fit(images)
    x = centred(images)
    distance = {}
    for mode in ("pca", "zca"):
        pre = Whiten(mode=mode, eps=1e-8)
        pre.fit(images)
        distance[mode] = (pre(images) - x).flatten(1).norm(dim=1).mean()
    assert distance["zca"] < distance["pca"]
    zca = Whiten(mode="zca", eps=1e-8)
    zca.fit(images)
    assert torch.allclose(zca.matrix, zca.matrix.T, atol=1e-4)  # U Λ^-1/2 Uᵀ is symmetric


PER_PIXEL, PER_CHANNEL = (0,), (0, 2, 3)


@pytest.mark.parametrize(
    ("option", "dims"),
    [
        ("mean_image", PER_PIXEL),
        ("channel_mean", PER_CHANNEL),
        ("standardize", PER_CHANNEL),
        ("pca_whiten", PER_PIXEL),  # per component
        ("zca_whiten", PER_PIXEL),
    ],
)
def test_statistics_come_only_from_the_split_given_to_fit(option, dims, compose_tmp):
    train = _correlated_images(seed=0)
    val = _correlated_images(n=500, seed=1, shift=40.0)  # a brighter split
    pre = instantiate(compose_tmp(f"preprocess={option}").preprocess)
    pre.fit(train)
    assert pre(train).mean(dim=dims).abs().max() < 1e-4
    assert pre(val).mean(dim=dims).norm() > 0.1  # val never contributed to the statistics


@pytest.mark.parametrize("option", OPTIONS)
def test_every_option_round_trips_through_the_state_dict(option, compose_tmp):
    images = torch.randint(0, 256, (32, 3, 4, 4), dtype=torch.uint8)
    pre = instantiate(compose_tmp(f"preprocess={option}").preprocess)
    pre.fit(images)
    restored = instantiate(compose_tmp(f"preprocess={option}").preprocess)
    restored.load_state_dict(pre.state_dict(), strict=True)
    assert bool(restored.fitted)
    assert torch.equal(restored(images), pre(images))


@pytest.mark.parametrize("option", OPTIONS)
def test_every_option_builds_into_the_module_and_fits_on_few_images(option, compose_tmp):
    cfg = compose_tmp(f"preprocess={option}")
    module = build_module(cfg, build_model(cfg))
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)  # N < D: a singular covariance
    module.preprocess.fit(images)
    out = module.preprocess(images)
    assert out.shape == images.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("cls", [MeanImage, ChannelMean, Whiten])
def test_unfitted_options_refuse_to_run(cls):
    with pytest.raises(RuntimeError, match="before fit"):
        cls()(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))


def test_whitening_refuses_images_too_large_for_a_covariance():
    with pytest.raises(ValueError, match=r"preprocess=zca_whiten.*data\.image_size"):
        Whiten(mode="zca").fit(torch.zeros(2, 3, 128, 128, dtype=torch.uint8))


def test_whitening_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="preprocess.mode"):
        Whiten(mode="pcaa")


def test_mean_image_follows_smaller_training_crops_with_its_central_crop():
    images = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8)
    pre = instantiate(OmegaConf.load(Path(CONFIG_DIR) / "preprocess" / "mean_image.yaml"))
    pre.fit(images)
    crops = images[:, :, 1:7, 1:7]  # a 6×6 window, e.g. AlexNet's 224 of 256
    assert torch.allclose(pre(crops), crops.float() / 255 - pre.mean[:, 1:7, 1:7], atol=1e-6)  # fused: ±1 ulp


@pytest.mark.parametrize("option", ["pca_whiten", "zca_whiten"])
def test_whitening_refuses_crops_of_another_size_by_name(option):
    images = torch.randint(0, 256, (40, 1, 4, 4), dtype=torch.uint8)
    pre = instantiate(OmegaConf.load(Path(CONFIG_DIR) / "preprocess" / f"{option}.yaml"))
    pre.fit(images)
    with pytest.raises(ValueError, match=f"preprocess={option}.*crop"):
        pre(images[:, :, :3, :3])
