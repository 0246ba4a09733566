"""Optimizer: parameter groups (no-decay rule, per-module lr multipliers) and every conf/optimizer/ option."""

from __future__ import annotations

import io
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

import cvarch
from cvarch.build import build_model
from cvarch.config import CONFIG_DIR, optimizer_parts
from cvarch.optimizer import param_groups

OPTIONS = sorted(p.stem for p in Path(CONFIG_DIR, "optimizer").glob("*.yaml"))

# the papers' hyperparameters, as each option must build them
PAPER = {
    "sgd": (torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False}),
    "sgd_nesterov": (torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True}),
    "adam": (torch.optim.Adam, {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 0.045, "alpha": 0.9, "eps": 1.0}),
}


@pytest.fixture
def resnet20(compose_tmp) -> nn.Module:
    return build_model(compose_tmp("model=resnet20"))


def _by_id(groups: list[dict]) -> dict[int, dict]:
    """Parameter id → its group; fails on a parameter listed twice."""
    found: dict[int, dict] = {}
    for group in groups:
        assert len(group["params"]) == len(group["names"])
        for param in group["params"]:
            assert id(param) not in found, "a parameter sits in two groups"
            found[id(param)] = group
    return found


def _build(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """What configure_optimizers does: the partial completed with ``param_groups(model, lr, weight_decay,
    **groups)``."""
    node, groups = optimizer_parts(OmegaConf.to_container(cfg.optimizer, resolve=True))
    groups = param_groups(model, lr=node["lr"], weight_decay=node.get("weight_decay", 0.0), **groups)
    return instantiate(node)(params=groups)


def test_no_decay_groups_hold_exactly_the_1d_parameters(resnet20):
    resnet20.conv1.weight.requires_grad_(False)
    resnet20.bn1.bias.requires_grad_(False)
    groups = param_groups(resnet20, lr=0.1, weight_decay=5e-4, decay_norm_bias=False)
    # groups come in order of their first trainable parameter: bn1.weight, as conv1 is frozen
    assert [(g["name"], g["weight_decay"], g["lr"]) for g in groups] == [
        ("no_decay_x1", 0.0, 0.1),
        ("decay_x1", 5e-4, 0.1),
    ]
    found = _by_id(groups)
    trainable = {id(p) for p in resnet20.parameters() if p.requires_grad}
    assert set(found) == trainable  # none missing, frozen ones absent
    assert id(resnet20.conv1.weight) not in found and id(resnet20.bn1.bias) not in found
    for module in resnet20.modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad:
                continue
            expected = 5e-4 if param.ndim > 1 else 0.0
            assert found[id(param)]["weight_decay"] == expected
            if isinstance(module, (nn.Conv2d, nn.Linear)) and param is module.weight:
                assert found[id(param)]["weight_decay"] == 5e-4
            if isinstance(module, nn.BatchNorm2d):
                assert found[id(param)]["weight_decay"] == 0.0
    # ResNet-20 (He et al. 2015 §4.2): 19 conv layers + fc; 19 BN (γ, β) + the fc bias are 1-D
    no_decay, decay = groups
    assert len(decay["params"]) == 19 - 1 + 1  # conv1 is frozen
    assert len(no_decay["params"]) == 2 * 19 + 1 - 1  # bn1.bias is frozen
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(
        p.numel() for p in resnet20.parameters() if p.requires_grad
    )


def test_decay_norm_bias_true_decays_everything_in_one_group(resnet20):
    groups = param_groups(resnet20, lr=0.1, weight_decay=5e-4)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 5e-4
    assert groups[0]["names"] == [name for name, _ in resnet20.named_parameters()]


def test_lr_mult_gives_the_head_ten_times_the_lr(resnet20):
    groups = param_groups(resnet20, lr=0.01, weight_decay=1e-4, lr_mult={"fc": 10})
    found = _by_id(groups)
    for name, param in resnet20.named_parameters():
        head = name.startswith("fc.")
        assert found[id(param)]["lr"] == pytest.approx(0.1 if head else 0.01)
        assert found[id(param)]["lr_mult"] == (10.0 if head else 1.0)
    head = next(g for g in groups if g["lr_mult"] == 10)
    assert head["names"] == ["fc.weight", "fc.bias"]


def test_lr_mult_longest_prefix_wins_at_a_dot_boundary():
    model = nn.ModuleDict(
        {
            "layer4": nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)),
            "layer40": nn.Linear(2, 2),
        }
    )
    groups = param_groups(model, lr=1.0, lr_mult={"layer4": 2, "layer4.1": 5, "layer4.1.bias": 7})
    lr = {name: g["lr"] for g in groups for name in g["names"]}
    assert lr == {
        "layer4.0.weight": 2.0,
        "layer4.0.bias": 2.0,
        "layer4.1.weight": 5.0,
        "layer4.1.bias": 7.0,
        "layer40.weight": 1.0,  # "layer4" is not a prefix of "layer40" at a dot
        "layer40.bias": 1.0,
    }
    assert len(groups) == 4  # one group per (decay, multiplier)


def test_groups_pair_decay_with_multiplier():
    model = nn.ModuleDict({"body": nn.Linear(3, 3), "fc": nn.Linear(3, 2)})
    groups = param_groups(model, lr=0.1, weight_decay=0.01, decay_norm_bias=False, lr_mult={"fc": 10})
    assert {(g["name"], g["weight_decay"], round(g["lr"], 9), tuple(g["names"])) for g in groups} == {
        ("decay_x1", 0.01, 0.1, ("body.weight",)),
        ("no_decay_x1", 0.0, 0.1, ("body.bias",)),
        ("decay_x10", 0.01, 1.0, ("fc.weight",)),
        ("no_decay_x10", 0.0, 1.0, ("fc.bias",)),
    }


def test_an_lr_mult_key_matching_no_parameter_is_named(resnet20):
    with pytest.raises(ValueError, match=r"optimizer\.groups\.lr_mult\.fcc matches no parameter"):
        param_groups(resnet20, lr=0.1, lr_mult={"fcc": 10})
    with pytest.raises(ValueError, match=r"optimizer\.groups\.lr_mult\.layer3\.9 matches no parameter"):
        param_groups(resnet20, lr=0.1, lr_mult={"layer3.9": 10})


def test_an_lr_mult_must_be_a_non_negative_number(resnet20):
    with pytest.raises(ValueError, match=r"optimizer\.groups\.lr_mult\.fc must be a finite number >= 0"):
        param_groups(resnet20, lr=0.1, lr_mult={"fc": -1})
    with pytest.raises(ValueError, match=r"optimizer\.groups\.lr_mult\.fc"):
        param_groups(resnet20, lr=0.1, lr_mult={"fc": "ten"})


def test_an_lr_mult_key_naming_a_frozen_module_is_not_a_typo(resnet20):
    resnet20.fc.requires_grad_(False)
    groups = param_groups(resnet20, lr=0.1, lr_mult={"fc": 10})
    assert [g["lr_mult"] for g in groups] == [1.0]
    assert not any(name.startswith("fc.") for name in groups[0]["names"])


def test_every_option_has_its_papers_hyperparameters():
    assert OPTIONS == sorted(PAPER)  # a new option needs its paper's values here


@pytest.mark.parametrize("option", OPTIONS)
def test_every_option_builds_a_working_optimizer_with_its_papers_values(option, compose_tmp):
    cfg = compose_tmp(f"optimizer={option}")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = _build(cfg, model)
    cls, values = PAPER[option]
    assert type(optimizer) is cls
    for group in (optimizer.defaults, *optimizer.param_groups):
        for key, value in values.items():
            assert group[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    before = nn.functional.cross_entropy(model(x), y)
    for _ in range(20):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    assert loss.item() < before.item()  # it trains
    # the state goes into a checkpoint that torch.load(weights_only=True) can read back
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    restored = _build(cfg, model)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]


@pytest.mark.parametrize("option", OPTIONS)
def test_groups_overrides_reach_the_optimizer(option, compose_tmp):
    cfg = compose_tmp(
        f"optimizer={option}",
        "optimizer.weight_decay=0.001",
        "optimizer.groups.decay_norm_bias=false",
        "optimizer.groups.lr_mult={norm: 10}",
    )
    model = nn.Sequential(OrderedDict(body=nn.Linear(4, 8), norm=nn.BatchNorm1d(8)))
    optimizer = _build(cfg, model)
    lr = cfg.optimizer.lr
    assert {
        (g["name"], g["weight_decay"], round(g["lr"] / lr, 9), tuple(g["names"]))
        for g in optimizer.param_groups
    } == {
        ("decay_x1", 0.001, 1.0, ("body.weight",)),
        ("no_decay_x1", 0.0, 1.0, ("body.bias",)),
        ("no_decay_x10", 0.0, 10.0, ("norm.weight", "norm.bias")),  # BN γ and β: 1-D
    }


def test_sgd_nesterov_is_sgd_with_nesterov_on(compose_tmp):
    sgd = OmegaConf.to_container(compose_tmp("optimizer=sgd").optimizer)
    nesterov = OmegaConf.to_container(compose_tmp("optimizer=sgd_nesterov").optimizer)
    assert nesterov == {**sgd, "nesterov": True}


def test_norm_bias_lr_mult_scales_the_lr_of_every_norm_shift_but_not_its_decay_step():
    """airbench's bias_scaler (Jordan 2024 §3.4): BN biases learn 64× faster, weight decay ÷ 64, so lr·λ is
    the
    decay step of every other parameter; the norm's γ, the conv and the linear weights keep lr and λ."""
    model = cvarch.build_model(
        "model=speedrun", "data.channels=3", "data.image_size=32", "model.learn_norm_scale=true"
    )
    groups = param_groups(model, lr=1.5, weight_decay=0.002, norm_bias_lr_mult=64.0)
    norm_biases = {
        n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) for n in [f"{n}.bias"]
    }
    fast = [g for g in groups if g["lr_mult"] == 64.0]
    assert len(fast) == 1 and set(fast[0]["names"]) == norm_biases and len(norm_biases) == 6
    assert fast[0]["lr"] == 1.5 * 64 and fast[0]["lr"] * fast[0]["weight_decay"] == pytest.approx(1.5 * 0.002)
    rest = [n for g in groups if g["lr_mult"] == 1.0 for n in g["names"]]
    assert "layer1.norm1.weight" in rest and "whiten.weight" in rest and "fc.weight" in rest
    assert all(g["lr"] == 1.5 and g["weight_decay"] == 0.002 for g in groups if g["lr_mult"] == 1.0)
    with pytest.raises(ValueError, match="optimizer.groups.norm_bias_lr_mult"):
        param_groups(model, lr=0.1, norm_bias_lr_mult=0)


def test_speedrun_model_freezes_the_norm_scales_as_airbench_and_whitening_freezes_the_stem():
    model = cvarch.build_model("model=speedrun", "data.channels=3", "data.image_size=32")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"layer{i}.norm{j}.weight" for i in (1, 2, 3) for j in (1, 2)}
    names = {n for g in param_groups(model, lr=0.1) for n in g["names"]}
    assert not names & frozen and "whiten.weight" in names
