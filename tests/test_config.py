"""Every option of every config group composes and instantiates; bad config values fail before any work."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

import cvarch
from cvarch.build import build_all, build_datamodule, build_model, build_module, instantiate_model
from cvarch.config import CONFIG_DIR, ConfigError, compose, packaged_targets, validate
from tests.conftest import make_image_tree, run_main, tmp_overrides

# model configs are built and trained at their native sizes by tests/models/test_configs.py; compress is
# cvarch-compress's group, not cvarch-train's: tests/test_compress.py runs each of its options
OPTIONS = sorted(
    (p.parent.name, p.stem)
    for p in Path(CONFIG_DIR).glob("*/*.yaml")
    if p.parent.name not in ("hydra", "model", "compress")
)


def test_every_group_of_the_defaults_list_has_options():
    groups = {g for g, _ in OPTIONS} | {"model"}
    expected = {
        "data",
        "model",
        "init",
        "norm",
        "augment",
        "tta",
        "preprocess",
        "regularizer",
        "optimizer",
        "scheduler",
        "transfer",
        "trainer",
        "logger",
        "callbacks",
        "paths",
        "experiment",
        "ablation",
        "debug",
    }
    assert expected <= groups


def _exercise(group: str, option: str, cfg, tmp_path: Path) -> None:
    """Instantiates what ``group=option`` builds and uses it once."""
    if group == "data":
        datamodule = build_datamodule(cfg)
        assert datamodule.num_classes == cfg.data.num_classes
        if option in ("digits", "fake", "imagefolder"):
            x, y = next(iter(datamodule.train_dataloader()))
            assert x.dtype == torch.uint8 and x.shape[1] == cfg.data.channels
    elif group == "transfer":  # a state-dict file of the same model stands in for a pretrained source
        shape = (cfg.data.channels, 16, 16)
        if option != "scratch":
            torch.save(instantiate_model(cfg.model).state_dict(), tmp_path / "source.pt")
            cfg.transfer.source = str(tmp_path / "source.pt")
        out = build_model(cfg, image_shape=shape)(torch.zeros(2, *shape))
        logits = out[0] if isinstance(out, tuple) else out  # stage_probes: (top, stage1, …)
        assert logits.shape == (2, cfg.data.num_classes)
    elif group == "init":
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        init = instantiate(cfg[group])
        extra = {"batch": torch.randn(2, 3, 8, 8)} if init.needs_batch else {}  # data-driven (LSUV)
        assert init(model, **extra) is model
    elif group == "norm":
        layer = instantiate(cfg.norm)(64)
        assert layer(torch.randn(2, 64, 4, 4)).shape == (2, 64, 4, 4)
    elif group == "augment":
        images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
        augment = instantiate(cfg.augment)
        augment.fit(images)
        x, y = augment(images, torch.arange(4))
        side = augment.output_size(32)
        assert x.shape == (4, 3, side, side) and len(y) == 4
    elif group == "tta":
        images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
        probs = instantiate(cfg.tta).predict(lambda v: v.float().mean(dim=(2, 3)), images)
        assert probs.shape == (2, 3) and torch.allclose(probs.sum(dim=1), torch.ones(2))
    elif group == "preprocess":
        images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
        pre = instantiate(cfg.preprocess)
        pre.fit(images)
        assert pre(images).dtype == torch.float32
    elif group == "regularizer":
        penalty = instantiate(cfg.regularizer)(torch.nn.Linear(3, 2))
        assert penalty is None or torch.isfinite(penalty)
    elif group in ("optimizer", "scheduler"):
        module = build_module(cfg, build_model(cfg))
        module._trainer = SimpleNamespace(estimated_stepping_batches=100, max_epochs=10)  # the run's length
        opts = module.configure_optimizers()
        optimizer = opts["optimizer"] if isinstance(opts, dict) else opts
        assert isinstance(optimizer, torch.optim.Optimizer)
    elif group == "trainer":
        if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
            pytest.skip("trainer=gpu needs a CUDA device")
        instantiate(cfg.trainer, logger=False)
    elif group in ("logger", "callbacks"):
        build_all(cfg[group])
    else:  # paths, experiment, debug: their job is to compose; the resolved config must validate
        OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_instantiates(group, option, compose_tmp, tmp_path):
    # an ablation takes one trick out of the experiment it is swept with
    cfg = compose_tmp(*(["experiment=speedrun94"] if group == "ablation" else []), f"{group}={option}")
    if cfg.data._target_.endswith("ImageFolderDataModule"):  # a tiny generated tree stands in for the root
        classes = cfg.data.get("classes") or [str(i) for i in range(cfg.data.num_classes)]
        cfg.data.root = str(make_image_tree(tmp_path / "tree", classes=list(classes), per_class=12))
    validate(cfg)
    _exercise(group, option, cfg, tmp_path)


def test_key_interpolations_the_later_issues_rely_on(compose_tmp):
    cfg = compose_tmp("data.num_classes=7")
    assert cfg.model.num_classes == 7  # model.num_classes follows data.num_classes …
    cfg = compose_tmp("model.num_classes=1000")
    assert cfg.model.num_classes == 1000 and cfg.data.num_classes == 10  # … unless overridden
    for key in ("data.image_size", "data.batch_size", "trainer.max_epochs", "seed", "ckpt_path"):
        assert OmegaConf.select(cfg, key, default="MISSING") != "MISSING", key


def test_wrong_type_is_named_before_training(compose_tmp):
    with pytest.raises(ConfigError, match=r"optimizer\.lr: expected float"):
        validate(compose_tmp("optimizer.lr=abc"))
    with pytest.raises(ConfigError, match=r"scheduler\.mode"):
        validate(compose_tmp("scheduler.mode=maximum"))
    with pytest.raises(ConfigError, match=r"data\.batch_size: expected int"):
        validate(compose_tmp("data.batch_size=big"))
    with pytest.raises(ConfigError, match=r"seed"):
        validate(compose_tmp("seed=one"))


def test_unknown_key_of_a_target_is_named(compose_tmp):
    cfg = compose_tmp("+optimizer.momentun=0.9")
    with pytest.raises(ConfigError, match=r"optimizer\.momentun: torch\.optim\.SGD has no parameter"):
        validate(cfg)


def test_cli_wrong_type_fails_before_any_run_dir_is_filled(tmp_path):
    proc = run_main("cvarch-train", "optimizer.lr=abc", "logger=none", f"paths.log_dir={tmp_path}")
    assert proc.returncode == 1
    assert "cvarch-train: invalid config:\n  optimizer.lr: expected float" in proc.stderr
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr  # the message, no trace
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("metrics.json"))


def test_an_unknown_option_lists_the_valid_choices(tmp_path):
    # Hydra's own message, the same on the command line (cvarch-train model=resnet21) as through compose
    with pytest.raises(MissingConfigException) as err:
        cvarch.compose("model=resnet21", f"paths.log_dir={tmp_path}")
    assert "Could not find 'model/resnet21'" in str(err.value)
    assert "Available options in 'model'" in str(err.value) and "resnet20" in str(err.value)


def test_compose_is_what_the_cli_builds(default_run):
    written = OmegaConf.load(default_run["output_dir"] / "config.yaml")
    composed = compose(
        f"paths.log_dir={default_run['tmp']}/logs", f"paths.cache_dir={default_run['tmp']}/cache"
    )
    OmegaConf.resolve(composed)
    # the run directory's timestamp is the only difference
    texts = [OmegaConf.to_yaml(c).replace(c.paths.output_dir, "<run dir>") for c in (written, composed)]
    assert texts[0] == texts[1]


RECIPES = (
    "alexnet_recipe",
    "vgg_recipe",
    "resnet_cifar",
    "wrn_cifar",
    "densenet_cifar",
    "stochastic_depth_cifar",
)


def short_schedule(recipe: str) -> list[str]:
    """The overrides of the ``CPU short schedule:`` line a recipe documents in its header."""
    text = (Path(CONFIG_DIR) / "experiment" / f"{recipe}.yaml").read_text()
    line = next(line for line in text.splitlines() if line.startswith("# CPU short schedule: cvarch-train "))
    return line.split("cvarch-train ", 1)[1].split()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_each_recipe_runs_its_documented_cpu_short_schedule(recipe, cifar_root, cifar_cache, compose_tmp):
    overrides = short_schedule(recipe)
    assert overrides[0] == f"experiment={recipe}"
    # one batch of each loop (fast_dev_run) of exactly the documented command, on the real CIFAR-10 folder
    metrics = cvarch.train(
        compose_tmp(*overrides, "debug=fdr", "logger=none", "data.batch_size=8", cifar_cache)
    )
    assert 0.0 <= metrics["test/acc_tta"] <= 1.0 and metrics["params"] > 0


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_carry_their_papers_hyperparameters(recipe, compose_tmp):
    cfg = compose_tmp(f"experiment={recipe}")
    expected = {
        "alexnet_recipe": (0.01, 5e-4, 128, ["crop", "flip", "pca_colour"]),
        "vgg_recipe": (0.01, 5e-4, 256, ["scale", "flip", "pca_colour"]),
        "resnet_cifar": (0.1, 1e-4, 128, ["crop", "flip"]),
        "wrn_cifar": (0.1, 5e-4, 128, ["crop", "flip"]),
        "densenet_cifar": (0.1, 1e-4, 64, ["crop", "flip"]),
        "stochastic_depth_cifar": (0.1, 1e-4, 128, ["crop", "flip"]),
    }[recipe]
    got = (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.data.batch_size, list(cfg.augment.ops))
    assert got == expected
    assert cfg.optimizer.momentum == 0.9
    if recipe == "resnet_cifar":  # He et al. 2015 §4.2
        assert list(cfg.scheduler.milestones) == [32000, 48000] and cfg.trainer.max_steps == 64000
    if recipe == "stochastic_depth_cifar":  # Huang et al. 2016 §3: p_L = 0.5 on ResNet-110
        assert cfg.model.drop_path == 0.5 and list(cfg.model.layers) == [18, 18, 18]


def test_the_slurm_launcher_composes_with_one_task_per_gpu():
    """No cluster here: the submitit config must compose and tie tasks and GPUs to ``trainer.devices``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    overrides = [
        "hydra/launcher=slurm",
        "trainer=ddp",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        "hydra.launcher.partition=gpu",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 4, 4)
    assert launcher.nodes == 2 and (cfg.trainer.strategy, cfg.trainer.sync_batchnorm) == ("ddp", True)
    assert launcher.timeout_min == 240 and launcher.submitit_folder.endswith(".submitit/%j")


def test_the_joblib_launcher_composes():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra_compose(
            "train", overrides=["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], return_hydra_config=True
        )
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 2


# the lecture's questions as multirun presets: experiment → (swept keys → values, jobs)
PRESETS = {
    "resnet_degradation": ({"model": "plain20,plain56,resnet20,resnet56"}, 4),
    "preact_vs_postact": ({"model": "resnet110", "model.preact": "false,true"}, 2),
    "depth_vs_width": ({"model": "wrn16_4,preact_resnet164"}, 2),
    "stochastic_depth": ({"model": "resnet110", "model.drop_path": "0.0,0.5"}, 2),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_sweep_presets_are_multiruns_of_their_factors(preset):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra_compose("train", overrides=[f"experiment={preset}"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and cfg.task_name == preset
    assert dict(cfg.hydra.sweeper.params) == PRESETS[preset][0]
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.data.batch_size) == (0.1, 1e-4, 128)  # He 2015


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_sweep_presets_run_their_documented_short_schedule(preset, cifar_root, cifar_cache, tmp_path):
    sweep = tmp_path / "sweep"
    overrides = short_schedule(preset)
    # one batch of 8 images in each loop (fast_dev_run) of every job of the documented command
    result = run_main(
        "cvarch-train",
        *overrides,
        "debug=fdr",
        "logger=none",
        "data.batch_size=8",
        *tmp_overrides(tmp_path),
        cifar_cache,
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(sweep.glob("*/metrics.json"))) == PRESETS[preset][1]


def test_the_users_own_config_is_code_and_builds_any_importable_target(compose_tmp):
    """What the user runs is trusted, as in any Hydra app (received files: tests/test_trust.py)."""
    from cvarch.build import instantiate

    assert instantiate({"_target_": "collections.Counter", "_args_": ["aab"]}) == {"a": 2, "b": 1}
    cfg = compose_tmp("+callbacks.mine={_target_: collections.OrderedDict}")
    validate(cfg)


def test_a_target_that_cannot_be_imported_is_named_by_validate(compose_tmp):
    cfg = compose_tmp("+callbacks.mine={_target_: mylab.nowhere.Callback}")
    with pytest.raises(
        ConfigError, match=r"callbacks\.mine\._target_: cannot import 'mylab.nowhere.Callback'"
    ):
        validate(cfg)


def test_every_shipped_config_target_is_in_the_packaged_set():
    targets = {
        line.split("_target_:")[1].split()[0]
        for path in Path(CONFIG_DIR).rglob("*.yaml")
        for line in path.read_text().splitlines()
        if "_target_:" in line and not line.lstrip().startswith("#")
    }
    assert len(targets) > 50
    assert targets <= packaged_targets()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.lr=0", r"optimizer.lr: the learning rate must be > 0, got 0"),
        ("optimizer.lr=-0.1", r"optimizer.lr: the learning rate must be > 0, got -0.1"),
        ("model.dropout=1.0", r"model.dropout: a drop probability must be in \[0, 1\), got 1.0"),
        ("model.drop_path=-0.2", r"model.drop_path: a drop probability must be in \[0, 1\), got -0.2"),
        ("seed=-1", r"seed: must be in \[0, 2\*\*32 - 1\] \(what NumPy's generator takes\), got -1"),
        ("trainer.max_epochs=0", r"trainer.max_epochs: 0 trains nothing"),
        ("trainer.max_epochs=-1", r"trainer.max_epochs: -1 without trainer.max_steps trains forever"),
        ("threads=0", r"threads: a positive number of torch threads, or null for the default, got 0"),
        ("data.num_classes=1", r"data.num_classes: a classifier needs at least 2 classes, got 1"),
        ("data.image_size=abc", r"data.image_size: a side in pixels \(>= 1\), or null .*got 'abc'"),
        ("optimizer=adam optimizer.betas=[0.9]", r"optimizer.betas: two numbers in \[0, 1\) .*got \[0.9\]"),
    ],
)
def test_rates_out_of_range_are_named_before_any_work(override, message, compose_tmp):
    with pytest.raises(ConfigError, match=message):
        validate(compose_tmp(*override.split()))


def test_a_read_only_output_dir_is_an_error_naming_it_before_any_work(compose_tmp, tmp_path):
    if os.geteuid() == 0:  # root writes anywhere: make the run directory's parent a file instead
        blocked = tmp_path / "blocked"
        blocked.write_text("")
    else:
        blocked = tmp_path / "ro"
        blocked.mkdir()
        blocked.chmod(0o500)
    with pytest.raises(PermissionError, match=r"paths.output_dir: cannot write the run directory .*blocked"):
        cvarch.train(compose_tmp(f"paths.log_dir={blocked}/logs"))
