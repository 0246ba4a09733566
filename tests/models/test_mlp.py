"""MLP of the weight-initialization study: layers and shapes, parameter formula, flattening, input check."""

from __future__ import annotations

import pytest
import torch

import cvarch
from cvarch.models.mlp import MLP


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_config_is_the_lectures_10_layer_500_unit_tanh_net():
    model = cvarch.build_model("model=mlp")  # the default data: 1×8×8 digits, 10 classes
    assert len(model.hidden) == 10
    assert all(isinstance(layer.act, torch.nn.Tanh) for layer in model.hidden)
    assert model.hidden[0].fc.weight.shape == (500, 64)
    assert all(layer.fc.weight.shape == (500, 500) for layer in model.hidden[1:])
    assert model.fc.weight.shape == (10, 500)
    w, d = 500, 10
    assert params(model) == 64 * w + (d - 1) * w * w + w * 10 + (d * w + 10)  # 2,292,010 with biases
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)  # (N, C, H, W) is flattened


@pytest.mark.parametrize(("depth", "width", "bias"), [(1, 7, True), (3, 16, False), (4, 5, True)])
def test_parameter_formula(depth, width, bias):
    model = MLP(in_features=12, depth=depth, width=width, num_classes=3, bias=bias)
    weights = 12 * width + (depth - 1) * width * width + width * 3
    assert params(model) == weights + (depth * width + 3 if bias else 0)
    assert model(torch.randn(4, 12)).shape == (4, 3)
    assert model(torch.randn(4, 3, 2, 2)).shape == (4, 3)


def test_hidden_activations_can_be_read_layer_by_layer():
    model = MLP(in_features=64, depth=10, width=500, num_classes=10)
    seen = []
    for layer in model.hidden:
        layer.act.register_forward_hook(lambda m, i, out: seen.append(out))
    x = torch.randn(8, 1, 8, 8)
    out = model(x)
    assert len(seen) == 10 and all(a.shape == (8, 500) for a in seen)
    assert torch.equal(seen[0], torch.tanh(model.hidden[0].fc(x.flatten(1))))
    assert torch.equal(out, model.fc(seen[-1]))


def test_act_layer_is_a_setting():
    model = MLP(in_features=4, depth=3, width=6, num_classes=2, act_layer="relu")
    assert [type(layer.act) for layer in model.hidden] == [torch.nn.ReLU] * 3


def test_wrong_in_features_is_named():
    model = MLP(in_features=64, depth=2, width=8, num_classes=10)
    with pytest.raises(ValueError, match=r"model.in_features=64 .* 3072 values"):
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="model.depth=0"):
        MLP(depth=0)
