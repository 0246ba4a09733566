"""The norm factory: names and callables resolve to ``norm(num_channels)`` factories."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

import cvarch
from cvarch.config import CONFIG_DIR
from cvarch.norm import FrozenStatsBatchNorm2d, LayerNorm2d, batchnorm, get_norm_layer, none

NORM_OPTIONS = sorted(p.stem for p in (Path(CONFIG_DIR) / "norm").glob("*.yaml"))


def test_names_and_callables_resolve():
    assert isinstance(get_norm_layer("batchnorm")(8), nn.BatchNorm2d)
    assert isinstance(get_norm_layer(None)(8), nn.Identity)
    assert isinstance(get_norm_layer("layernorm")(8), LayerNorm2d)
    assert get_norm_layer(none) is none
    with pytest.raises(ValueError, match="unknown norm 'batchnrom'"):
        get_norm_layer("batchnrom")


def test_batchnorm_uses_batch_statistics_in_training_and_running_ones_in_eval():
    bn = batchnorm(4, momentum=1.0)  # momentum 1: the running stats become the last batch's
    x = torch.randn(16, 4, 5, 5) * 3 + 2
    y = bn(x)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5)
    bn.eval()
    # same statistics, from the running buffers, which keep the unbiased variance: n/(n-1), n = 16·5·5
    shrink = (399 / 400) ** 0.5
    assert torch.allclose(bn(x), y * shrink, atol=1e-4)
    assert torch.allclose(bn(x[:1]), y[:1] * shrink, atol=1e-4)  # and independent of the batch in eval


def test_batchnorm_output_depends_on_the_batch_in_training_only():
    # Ioffe & Szegedy 2015 Alg. 2: at test time BN uses the running averages, a fixed affine map per channel
    bn = batchnorm(4)
    x = torch.randn(8, 4, 5, 5) * 3 + 2
    assert not torch.allclose(bn(x[:2])[:1], bn(x)[:1], atol=1e-3)
    bn.eval()
    assert torch.allclose(bn(x[:1]), bn(x)[:1], atol=1e-6)


def test_freeze_stats_keeps_running_statistics_and_trains_gamma_beta():
    bn = batchnorm(4, freeze_stats=True)
    assert isinstance(bn, FrozenStatsBatchNorm2d) and isinstance(bn, nn.BatchNorm2d)
    bn.running_mean.fill_(2.0)
    bn.running_var.fill_(9.0)
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    bn.train()
    x = torch.randn(8, 4, 5, 5) * 3 + 2
    y = bn(x)
    bn(torch.randn(8, 4, 5, 5))
    for name, value in bn.state_dict().items():  # running_mean, running_var, num_batches_tracked
        assert torch.equal(value, state[name]), name
    y.square().mean().backward()
    assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0
    assert bn.bias.grad is not None and bn.bias.grad.abs().sum() > 0
    bn.eval()
    assert torch.allclose(bn(x), y)
    assert torch.allclose(y, (x - 2.0) / torch.sqrt(torch.tensor(9.0 + bn.eps)))
    nn.BatchNorm2d(4).load_state_dict(bn.state_dict(), strict=True)  # same layout as torchvision's BN


def test_layernorm_normalizes_each_position_over_channels():
    ln = LayerNorm2d(16)
    assert sum(p.numel() for p in ln.parameters()) == 2 * 16  # γ, β per channel (Ba et al. 2016)
    assert ln.weight.shape == ln.bias.shape == (16,)
    x = torch.randn(4, 16, 5, 5) * 3 + 2
    y = ln(x)  # γ=1, β=0 at init: the output is the normalized input
    assert torch.allclose(y.mean(dim=1), torch.zeros(4, 5, 5), atol=1e-5)
    assert torch.allclose(y.var(dim=1, unbiased=False), torch.ones(4, 5, 5), atol=1e-3)
    assert torch.allclose(ln(x[:1]), y[:1], atol=1e-6)  # no batch statistics, in training too
    with torch.no_grad():
        ln.weight.fill_(2.0)
        ln.bias.fill_(0.5)
    assert torch.allclose(ln(x), 2.0 * y + 0.5, atol=1e-5)


@pytest.mark.parametrize("option", NORM_OPTIONS)
def test_every_norm_option_composes_and_instantiates(option):
    layer = instantiate(cvarch.compose(f"norm={option}").norm)(64)
    assert layer(torch.randn(2, 64, 4, 4)).shape == (2, 64, 4, 4)


@pytest.mark.parametrize("overrides", [("norm=layernorm",), ("norm=batchnorm", "norm.freeze_stats=true")])
def test_default_model_builds_and_runs_with(overrides):
    model = cvarch.build_model(*overrides)
    expected = LayerNorm2d if "layernorm" in overrides[0] else FrozenStatsBatchNorm2d
    assert any(isinstance(m, expected) for m in model.modules())
    assert model(torch.randn(2, 1, 8, 8)).shape[0] == 2
