"""Schedulers: every conf/scheduler/ option cuts, warms up, anneals and peaks as its paper says; resume."""

from __future__ import annotations

import io
import math
from collections import OrderedDict
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from cvarch.build import build_datamodule, build_model, build_module
from cvarch.config import CONFIG_DIR, optimizer_parts, scheduler_parts
from cvarch.optimizer import param_groups
from cvarch.scheduler import one_cycle, warmup_cosine

OPTIONS = sorted(p.stem for p in Path(CONFIG_DIR, "scheduler").glob("*.yaml"))


def _net() -> nn.Module:
    return nn.Sequential(OrderedDict(body=nn.Linear(4, 4), fc=nn.Linear(4, 2)))


def _build(cfg, model: nn.Module | None = None):
    """What build_module + configure_optimizers do: (optimizer, scheduler, Lightning keys) from ``cfg``."""
    node, groups = optimizer_parts(OmegaConf.to_container(cfg.optimizer, resolve=True))
    params = param_groups(
        model or _net(), lr=node["lr"], weight_decay=node.get("weight_decay", 0.0), **groups
    )
    optimizer = instantiate(node)(params=params)
    scheduler, lightning = scheduler_parts(OmegaConf.to_container(cfg.scheduler, resolve=True))
    return optimizer, instantiate(scheduler)(optimizer=optimizer), lightning


def _lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    return [group["lr"] for group in optimizer.param_groups]


def _run(optimizer, scheduler, steps: int, metric: float = 0.5) -> list[list[float]]:
    """Steps ``steps`` times and returns the lrs before each step and after the last: ``steps + 1`` rows."""
    history = [_lrs(optimizer)]
    for _ in range(steps):
        optimizer.step()
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(metric)
        else:
            scheduler.step()
        history.append(_lrs(optimizer))
    return history


@pytest.mark.parametrize("patience", [1, 5])
def test_plateau_cuts_lr_tenfold_after_patience_flat_epochs(patience, compose_tmp):
    cfg = compose_tmp("scheduler=plateau", f"scheduler.patience={patience}")
    optimizer, scheduler, lightning = _build(cfg)
    assert lightning == {"monitor": "val/acc", "interval": "epoch", "frequency": 1}
    history = [row[0] for row in _run(optimizer, scheduler, 2 * patience + 4, metric=0.7)]
    # epoch 0 sets the best; epochs 1..patience are tolerated; epoch patience+1 exceeds patience: cut after it
    first_cut = patience + 2
    assert history[:first_cut] == [0.01] * first_cut
    assert history[first_cut] == pytest.approx(0.001)  # AlexNet: ÷10
    # the count restarts after a cut: the next one comes patience+1 flat epochs later
    assert history[first_cut + patience] == pytest.approx(0.001)
    assert history[first_cut + patience + 1] == pytest.approx(0.0001)


def test_plateau_yaml_keeps_the_alexnet_recipe(compose_tmp):
    scheduler = compose_tmp("scheduler=plateau").scheduler
    assert (scheduler.mode, scheduler.factor, scheduler.patience) == ("max", 0.1, 5)


class _EpochLRs(pl.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.slow
def test_plateau_cuts_lr_in_a_real_lightning_run(compose_tmp):
    # an lr of 1e-20 leaves the float32 MLP unchanged to the bit, so val/acc is flat from epoch 0;
    # ReduceLROnPlateau ignores cuts smaller than its eps (1e-8), hence eps 0
    cfg = compose_tmp(
        "model=mlp",
        "model.depth=1",
        "model.width=16",
        "optimizer.lr=1e-20",
        "optimizer.weight_decay=0",
        "scheduler.patience=1",
        "+scheduler.eps=0",
        "trainer=cpu",
        "trainer.max_epochs=4",
        "logger=none",
    )
    module = build_module(cfg, build_model(cfg))
    recorder = _EpochLRs()
    trainer = instantiate(
        cfg.trainer,
        logger=False,
        callbacks=[recorder],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=build_datamodule(cfg))
    # epoch 0 sets the best val/acc, epoch 1 is tolerated, epoch 2 exceeds patience 1: epoch 3 trains at lr/10
    assert recorder.lrs == pytest.approx([1e-20, 1e-20, 1e-20, 1e-21], rel=1e-6)


def test_multistep_cuts_at_32k_and_48k_iterations(compose_tmp):
    cfg = compose_tmp("scheduler=multistep", "optimizer.lr=0.1")
    assert list(cfg.scheduler.milestones) == [32000, 48000] and cfg.scheduler.gamma == 0.1
    optimizer, scheduler, lightning = _build(cfg, nn.Linear(1, 1))
    assert lightning["interval"] == "step"
    optimizer.step()
    lrs = {}
    for step in range(1, 48002):  # lrs[k]: the lr of iteration k (0-based), after k scheduler steps
        lrs[step - 1] = optimizer.param_groups[0]["lr"]
        scheduler.step()
    assert lrs[0] == lrs[31999] == 0.1  # He et al. 2015 §4.2: 0.1 until 32k
    assert lrs[32000] == lrs[47999] == pytest.approx(0.01)
    assert lrs[48000] == pytest.approx(0.001)


def test_multistep_in_epochs_by_overrides(compose_tmp):
    cfg = compose_tmp(
        "scheduler=multistep", "scheduler.lightning.interval=epoch", "scheduler.milestones=[2,4]"
    )
    optimizer, scheduler, lightning = _build(cfg)
    assert lightning["interval"] == "epoch"
    assert [row[0] for row in _run(optimizer, scheduler, 5)] == pytest.approx(
        [0.01] * 2 + [1e-3] * 2 + [1e-4] * 2
    )


def test_step_cuts_every_30_epochs(compose_tmp):
    cfg = compose_tmp("scheduler=step", "optimizer.lr=0.1")
    optimizer, scheduler, lightning = _build(cfg)
    assert lightning["interval"] == "epoch"
    history = [row[0] for row in _run(optimizer, scheduler, 90)]
    assert history[0] == history[29] == 0.1  # torchvision reference: 0.1, ÷10 at 30 and 60
    assert history[30] == history[59] == pytest.approx(0.01)
    assert history[60] == history[89] == pytest.approx(0.001)


def test_cosine_warms_up_linearly_then_anneals_to_eta_min(compose_tmp):
    cfg = compose_tmp(
        "scheduler=cosine",
        "scheduler.total_steps=20",
        "scheduler.warmup_steps=5",
        "scheduler.warmup_start_factor=0.1",
        "scheduler.eta_min=0.001",
        "optimizer.lr=0.1",
        "optimizer.groups.lr_mult={fc:10}",
    )
    optimizer, scheduler, lightning = _build(cfg)
    assert lightning["interval"] == "step"
    history = _run(optimizer, scheduler, 20)
    for group, base in enumerate([0.1, 1.0]):  # body, fc at 10×: each warms up to its own lr
        lrs = [row[group] for row in history]
        warmup = [base * (0.1 + 0.9 * t / 5) for t in range(6)]
        assert lrs[:6] == pytest.approx(warmup)
        # SGDR Eq. 5 over the 15 remaining steps
        cosine = [0.001 + (base - 0.001) * (1 + math.cos(math.pi * t / 15)) / 2 for t in range(16)]
        assert lrs[5:] == pytest.approx(cosine)
        assert lrs[20] == pytest.approx(0.001)
        assert all(lrs[t] > lrs[t + 1] for t in range(5, 20))  # monotone after the warm-up


def test_cosine_without_warmup_is_torchs_cosine_annealing(compose_tmp):
    cfg = compose_tmp("scheduler=cosine", "scheduler.total_steps=10")
    optimizer, scheduler, _ = _build(cfg)
    assert type(scheduler) is torch.optim.lr_scheduler.CosineAnnealingLR
    lrs = [row[0] for row in _run(optimizer, scheduler, 10)]
    assert lrs == pytest.approx([0.01 * (1 + math.cos(math.pi * t / 10)) / 2 for t in range(11)], abs=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"total_steps": None}, "scheduler.total_steps is null"),
        ({"total_steps": 0}, "scheduler.total_steps must be >= 1"),
        ({"total_steps": 10, "warmup_steps": 10}, "scheduler.warmup_steps must be < scheduler.total_steps"),
        ({"total_steps": 10, "warmup_steps": -1}, "scheduler.warmup_steps must be >= 0"),
        ({"total_steps": 10, "warmup_steps": 2, "warmup_start_factor": 0.0}, "scheduler.warmup_start_factor"),
        ({"total_steps": 10, "eta_min": -1.0}, "scheduler.eta_min"),
    ],
)
def test_cosine_rejects_bad_steps_naming_the_key(kwargs, key):
    optimizer = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)
    with pytest.raises(ValueError, match=key):
        warmup_cosine(optimizer, **kwargs)


def test_onecycle_peaks_at_each_groups_lr(compose_tmp):
    cfg = compose_tmp(
        "scheduler=onecycle",
        "scheduler.total_steps=20",
        "optimizer.lr=0.05",
        "optimizer.groups.lr_mult={fc:10}",
    )
    optimizer, scheduler, lightning = _build(cfg)
    assert lightning["interval"] == "step"
    history = _run(optimizer, scheduler, 19)  # OneCycleLR's last lr is at step total_steps - 1
    momenta = []
    for group, peak in enumerate([0.05, 0.5]):  # lr_mult carries over to the peak
        lrs = [row[group] for row in history]
        assert max(lrs) == pytest.approx(peak)
        assert lrs.index(max(lrs)) == 5  # pct_start 0.3 of 20 steps: the peak at step 0.3·20 − 1
        assert lrs[0] == pytest.approx(peak / 25)  # div_factor
        assert lrs[-1] == pytest.approx(peak / 25 / 1e4)  # final_div_factor
        momenta.append(optimizer.param_groups[group]["momentum"])
    assert momenta == pytest.approx([0.95, 0.95])  # back at max_momentum at the end


def test_onecycle_explicit_max_lr_scales_with_lr_mult():
    model = _net()
    groups = param_groups(model, lr=0.01, lr_mult={"fc": 10})
    optimizer = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
    scheduler = one_cycle(optimizer, total_steps=20, max_lr=0.2)
    peaks = [group["max_lr"] for group in optimizer.param_groups]
    assert peaks == pytest.approx([0.2, 2.0])
    history = _run(optimizer, scheduler, 19)
    assert [max(row[g] for row in history) for g in range(2)] == pytest.approx([0.2, 2.0])


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"total_steps": None}, "scheduler.total_steps"),
        ({"total_steps": -3}, "scheduler.total_steps"),
        ({"total_steps": 10, "max_lr": 0.0}, "scheduler.max_lr"),
        ({"total_steps": 10, "pct_start": 1.0}, "scheduler.pct_start"),
        ({"total_steps": 10, "anneal_strategy": "cosine"}, "scheduler.anneal_strategy"),
    ],
)
def test_onecycle_rejects_bad_values_naming_the_key(kwargs, key):
    optimizer = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=key):
        one_cycle(optimizer, **kwargs)


def test_none_builds_a_bare_optimizer(compose_tmp):
    cfg = compose_tmp("scheduler=none")
    assert scheduler_parts(OmegaConf.to_container(cfg.scheduler)) == (None, {})
    configured = build_module(cfg, build_model(cfg)).configure_optimizers()
    assert isinstance(configured, torch.optim.SGD)
    assert configured.param_groups[0]["lr"] == 0.01


# overrides that make every option change the lr within a few steps: a resumed run has something to get wrong
RESUME = {
    "plateau": ["scheduler.patience=1"],
    "multistep": ["scheduler.milestones=[5,8]"],
    "step": ["scheduler.step_size=2"],
    "cosine": ["scheduler.total_steps=12", "scheduler.warmup_steps=5"],
    "onecycle": ["scheduler.total_steps=12"],
}


def test_every_scheduler_option_is_covered_by_the_resume_test():
    assert sorted(RESUME) == sorted(set(OPTIONS) - {"none"})


@pytest.mark.parametrize("option", sorted(RESUME))
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_scheduler_and_optimizer_state_resume_identically(option, optimizer, compose_tmp):
    cfg = compose_tmp(
        f"scheduler={option}", f"optimizer={optimizer}", "optimizer.groups.lr_mult={fc:10}", *RESUME[option]
    )
    torch.manual_seed(0)
    model = _net()
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    opt, sched, _ = _build(cfg, model)

    def train(opt, sched, steps: int) -> list[list[float]]:
        rows = []
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                sched.step(0.5)
            else:
                sched.step()
            rows.append(_lrs(opt) + [g.get("momentum", g.get("betas", (0,))[0]) for g in opt.param_groups])
        return rows

    train(opt, sched, 3)  # inside the cosine's warm-up: the resume crosses SequentialLR's milestone
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, buffer
    )
    expected = train(opt, sched, 8)

    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # what Lightning's checkpoint loading allows
    model.load_state_dict(state["model"])
    fresh_opt, fresh_sched, _ = _build(cfg, model)  # Lightning: configure_optimizers, then load the states
    fresh_opt.load_state_dict(state["optimizer"])
    fresh_sched.load_state_dict(state["scheduler"])
    resumed = train(fresh_opt, fresh_sched, 8)
    assert resumed == expected  # the same float operations: equal to the bit
    assert len({tuple(row) for row in expected}) > 2  # the lr really moved over the resumed steps
