"""The norm factory: names and callables resolve to ``norm(num_channels)`` factories."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cvarch.norm import batchnorm, get_norm_layer, none


def test_names_and_callables_resolve():
    assert isinstance(get_norm_layer("batchnorm")(8), nn.BatchNorm2d)
    assert isinstance(get_norm_layer(None)(8), nn.Identity)
    assert get_norm_layer(none) is none
    with pytest.raises(ValueError, match="unknown norm 'batchnrom'"):
        get_norm_layer("batchnrom")


def test_batchnorm_uses_batch_statistics_in_training_and_running_ones_in_eval():
    bn = batchnorm(4, momentum=1.0)  # momentum 1: the running stats become the last batch's
    x = torch.randn(16, 4, 5, 5) * 3 + 2
    y = bn(x)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5)
    bn.eval()
    # same statistics, from the running buffers (which keep the unbiased variance: n/(n-1) = 1.0025)
    assert torch.allclose(bn(x), y, atol=5e-3)
    assert torch.allclose(bn(x[:1]), y[:1], atol=5e-3)  # and independent of the batch in eval
