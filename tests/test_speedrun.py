"""experiment=speedrun94 and its ablation: airbench94's hyperparameters as cvarch keys, one trick out per
ablation, and the recipe end to end on the real CIFAR-10 folder (a few steps)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

import cvarch
from cvarch.config import CONFIG_DIR

ABLATIONS = sorted(p.stem for p in Path(CONFIG_DIR, "ablation").glob("*.yaml"))
# what each ablation changes against experiment=speedrun94, as dotted keys of the resolved config
CHANGES = {
    "none": set(),
    "no_whitening": {"init"},
    "random_flip": {"augment.ops"},
    "no_translate": {"augment.ops.translate.padding"},
    "no_label_smoothing": {"loss.label_smoothing"},
    "no_lookahead": {"callbacks.weight_averaging"},
    "no_bias_lr": {"optimizer.groups.norm_bias_lr_mult"},
}


def test_speedrun94_is_airbench94s_recipe_in_mean_loss_units(compose_tmp):
    """Jordan 2024's hyperparameters: lr 11.5 per 1024 images ÷ (1 + 1/(1 − 0.85)) with a summed loss is 1.5
    with the mean; decay 0.0153 ÷ 7.67 per step; 64× BN-bias lr; warm-up 23% from 0.2×, down to 0.07×."""
    cfg = compose_tmp("experiment=speedrun94")
    kilostep = 1 + 1 / (1 - cfg.optimizer.momentum)
    assert cfg.optimizer.lr == pytest.approx(11.5 / kilostep, rel=1e-3)
    assert cfg.optimizer.lr * cfg.optimizer.weight_decay == pytest.approx(0.0153 / kilostep, rel=1e-3)
    assert cfg.optimizer.nesterov and cfg.optimizer.groups.norm_bias_lr_mult == 64
    assert cfg.data.batch_size == 1024 and cfg.data.val_fraction == 0 and cfg.data.test_fraction == 0.1
    assert cfg.loss.label_smoothing == 0.2 and (cfg.norm.momentum, cfg.norm.eps) == (0.4, 1e-12)
    s = cfg.scheduler
    assert (s.pct_start, s.anneal_strategy, s.cycle_momentum) == (0.23, "linear", False)
    assert 1 / s.div_factor == pytest.approx(0.2) and 1 / s.div_factor / s.final_div_factor == pytest.approx(
        0.07
    )
    assert cfg.model._target_.endswith("SpeedrunNet") and cfg.init._target_.endswith("PatchWhitening")
    assert cfg.callbacks.weight_averaging._target_.endswith("Lookahead") and cfg.tta.views == "flip_translate"
    assert cfg.callbacks.model_checkpoint is None and cfg.trainer.max_steps == 476 and cfg.model.channels_last


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, node


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_each_ablation_takes_out_exactly_its_trick(ablation, compose_tmp):
    base = dict(_leaves(OmegaConf.to_container(compose_tmp("experiment=speedrun94"))))  # unresolved: no times
    cfg = OmegaConf.to_container(compose_tmp("experiment=speedrun94", f"ablation={ablation}"))
    changed = {key for key, value in _leaves(cfg) if base.get(key, "<absent>") != value}
    changed |= {key for key in base if key not in dict(_leaves(cfg))}
    changed -= {"paths.output_dir"}  # each composition gets its own run folder
    # every changed leaf lies under one of the ablation's keys, and each key has a change
    assert all(any(c == k or c.startswith(k + ".") for k in CHANGES[ablation]) for c in changed), changed
    assert all(any(c == k or c.startswith(k + ".") for c in changed) for k in CHANGES[ablation]), changed


def test_the_ablation_sweeps_every_ablation_with_3_seeds():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    assert set(ABLATIONS) == set(CHANGES)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra_compose("train", overrides=["experiment=speedrun94_ablation"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert sorted(params.ablation.split(",")) == ABLATIONS and params.seed == "0,1,2"
    assert cfg.task_name == "speedrun94_ablation" and cfg.optimizer.lr == 1.5


@pytest.mark.slow
def test_the_recipe_trains_on_every_non_test_image_and_logs_both_test_accuracies(
    cifar_root, cifar_cache, compose_tmp
):
    """A few steps of exactly the recipe on the real CIFAR-10 folder: no validation carve (the test split is
    the 10% it always is), whitened stem, the lookahead's weights tested with and without TTA."""
    cfg = compose_tmp(
        "experiment=speedrun94",
        "logger=none",
        "data.max_per_class=60",
        "data.batch_size=120",
        "trainer.max_steps=6",
        cifar_cache,
    )
    metrics = cvarch.train(cfg)
    assert 0.0 <= metrics["test/acc"] <= 1.0 and 0.0 <= metrics["test/acc_tta"] <= 1.0
    assert metrics["test/acc"] > 0.15  # 6 steps of the recipe beat chance (0.10) on 60 test images
    assert "val/acc" not in metrics
