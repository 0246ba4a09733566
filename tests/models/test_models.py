"""The build-time input-size guard shared by every model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cvarch.models import check_input_size


def tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 5), nn.Flatten())


def test_a_fitting_input_passes_without_touching_weights():
    model = tiny()
    before = [p.clone() for p in model.parameters()]
    check_input_size(model, (3, 14, 14))  # 14 → 10 → 5 → 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_too_small_input_names_the_layer_and_the_smallest_size():
    # 12 → conv5 → 8 → pool → 4 → conv5 → 0: collapses at layer '3'; 14 → 10 → 5 → 1 is the smallest to work
    with pytest.raises(
        ValueError, match=r"collapses at layer '3'; the smallest square input that works is 14×14"
    ):
        check_input_size(tiny(), (3, 12, 12))


def test_wrong_channels_is_reported_with_the_layer():
    with pytest.raises(ValueError, match=r"layer '0'"):
        check_input_size(tiny(), (1, 32, 32))


class FixedHead(nn.Module):
    """A classifier with no adaptive pooling, like the lecture's AlexNet: only one input size fits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.MaxPool2d(2))
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


def test_fixed_size_nets_report_the_size_that_fits():
    check_input_size(FixedHead(), (3, 18, 18))  # 18 → 8 → 4
    with pytest.raises(ValueError, match=r"too small .* layer 'features.1'; .* works is 17×17"):
        check_input_size(FixedHead(), (3, 4, 4))  # 4 → 1 → 0 at the pool
    with pytest.raises(ValueError, match=r"does not fit FixedHead at layer 'fc' .* works is 17×17"):
        check_input_size(FixedHead(), (3, 32, 32))
