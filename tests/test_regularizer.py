"""Explicit regularizers: values and gradients by hand, what they cover, and what L1 does that L2 doesn't."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from cvarch.regularizer import L1, L2, ElasticNet, Regularizer


def tiny() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
        model[0].bias.copy_(torch.tensor([10.0, -10.0]))
    return model


def test_values_equal_a_hand_computation():
    model = tiny()  # weights 1, −2, 0.5, 3: Σw² = 14.25, Σ|w| = 6.5; bias and BN γ/β are not covered
    assert L2(weight=0.1)(model).item() == pytest.approx(0.1 * 14.25)
    assert L1(weight=0.1)(model).item() == pytest.approx(0.1 * 6.5)
    assert ElasticNet(weight=0.1, beta=2.0)(model).item() == pytest.approx(0.1 * (2 * 14.25 + 6.5))
    with_bias = L2(weight=1.0, include_biases=True)(model).item()
    assert with_bias == pytest.approx(14.25 + 200)
    with_norm = L2(weight=1.0, include_norm=True)(model).item()
    assert with_norm == pytest.approx(14.25 + 2)  # BN γ = 1, 1 (β = 0 is a bias)
    assert Regularizer()(model) is None and L2(weight=0.0)(model) is None


@pytest.mark.parametrize(
    ("reg", "grad"),
    [
        (L2(weight=0.1), lambda w: 0.2 * w),
        (L1(weight=0.1), lambda w: 0.1 * w.sign()),
        (ElasticNet(weight=0.1, beta=2.0), lambda w: 0.1 * (4.0 * w + w.sign())),
    ],
)
def test_gradients_equal_autograd(reg, grad):
    model = tiny()
    reg(model).backward()
    w = model[0].weight
    assert torch.allclose(w.grad, grad(w.detach()))
    assert model[0].bias.grad is None  # untouched


def test_l2_in_the_loss_is_sgd_weight_decay():
    torch.manual_seed(0)
    x, y = torch.randn(16, 2), torch.randint(0, 2, (16,))
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(
        [{"params": [b.weight], "weight_decay": 2 * 0.05}, {"params": [b.bias]}], lr=0.1, momentum=0.9
    )
    for _ in range(5):
        for model, opt, reg in ((a, opt_a, L2(weight=0.05)), (b, opt_b, Regularizer())):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            penalty = reg(model)
            (loss if penalty is None else loss + penalty).backward()
            opt.step()
    assert torch.allclose(a.weight, b.weight, atol=1e-6) and torch.allclose(a.bias, b.bias, atol=1e-6)


@pytest.mark.slow
def test_l1_drives_more_weights_to_zero_than_l2():
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    near_zero = {}
    for reg in (L1(weight=0.01), L2(weight=0.01)):
        torch.manual_seed(0)
        model = nn.Linear(64, 10)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(300):
            opt.zero_grad()
            (F.cross_entropy(model(x), y) + reg(model)).backward()
            opt.step()
        near_zero[type(reg).__name__] = (model.weight.abs() < 1e-2).float().mean().item()
    assert near_zero["L1"] > near_zero["L2"] + 0.2, near_zero
