"""Preprocess: statistics fitted on the training split, applied as fitted, carried by the state dict."""

from __future__ import annotations

import pytest
import torch

from cvarch.preprocess import Rescale, Standardize


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
