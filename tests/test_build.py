"""Builders: W&B identity of sweep jobs (group, name, tags) and the CSV fallback when W&B cannot start."""

from __future__ import annotations

from pathlib import Path

import pytest
import wandb
from omegaconf import OmegaConf
from pytorch_lightning.loggers import CSVLogger

import cvarch
from cvarch.build import build_trainer, sweep_identity, swept_keys


def test_swept_keys_come_from_the_command_line_and_the_sweeper_params(tmp_path):
    multirun = {
        "hydra": {
            "overrides": {"task": ["norm=batchnorm,none", "seed=0", "trainer.max_epochs=1", "+x=range(1,3)"]},
            "sweeper": {"params": {"init": "xavier,kaiming", "model": "resnet20"}},
        }
    }
    OmegaConf.save(OmegaConf.create(multirun), tmp_path / "multirun.yaml")
    assert swept_keys(tmp_path) == ["norm", "x", "init"]
    assert swept_keys(tmp_path / "elsewhere") == []


def test_a_single_run_keeps_the_configured_identity(compose_tmp):
    assert sweep_identity(compose_tmp()) == {}


def test_wandb_that_cannot_start_falls_back_to_csv_and_loses_no_metric(compose_tmp, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("wandb.init timed out after 90 s")

    monkeypatch.setattr(wandb, "init", broken)
    cfg = compose_tmp("logger=wandb", "trainer.max_epochs=1")
    with pytest.warns(RuntimeWarning, match=r"W&B could not start \(RuntimeError: wandb\.init timed out"):
        trainer = build_trainer(cfg)
    assert [type(logger) for logger in trainer.loggers] == [CSVLogger]
    with pytest.warns(RuntimeWarning, match="logging to CSV"):
        metrics = cvarch.train(compose_tmp("logger=wandb", "trainer.max_epochs=1"))
    csv_file = Path(metrics["output_dir"]) / "csv" / "version_0" / "metrics.csv"
    assert "val/acc" in csv_file.read_text().splitlines()[0]


def test_sweep_group_is_task_and_sweep_time_unless_the_user_chose_one():
    from cvarch.build import sweep_group

    assert (
        sweep_group("norm_ablation", "logs/x/multiruns/2026-01-02_03-04-05")
        == "norm_ablation/2026-01-02_03-04-05"
    )
    assert (
        sweep_group("norm_ablation", "logs/x/multiruns/t", "norm_ablation") == "norm_ablation/t"
    )  # the default
    assert sweep_group("norm_ablation", "logs/x/multiruns/t", "my-study") == "my-study"
