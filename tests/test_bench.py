"""cvarch-bench (a developer tool): the harness runs end to end in its reduced mode and writes the documented
JSON (not the speed)."""

from __future__ import annotations

import json
import statistics

import pytest

import cvarch
from cvarch.bench import TARGETS, compare, rate, run
from tests.conftest import make_image_tree, run_cli


def compose_bench(*overrides: str):
    return cvarch.compose(*overrides, config_name="bench")


def test_rate_excludes_the_warm_up_steps():
    times = [0.0, 5.0, 6.0, 7.0, 8.0]  # a slow first step (warm-up), then one step per second
    assert rate(times, warmup=1, batch_size=128) == 128.0
    with pytest.raises(ValueError, match="more than 5 timed batches"):
        rate(times, warmup=4, batch_size=128)


def test_compare_takes_the_median_of_per_repeat_ratios_favouring_cvarch_above_one():
    rates = compare("step", [90.0, 100.0, 99.0], [100.0, 100.0, 100.0], unit="images/s")
    assert rates["ratios"] == [0.9, 1.0, 0.99] and rates["median_ratio"] == 0.99 and rates["met"]
    times = compare("epoch", [10.0, 12.0, 11.0], [10.0, 10.0, 10.0], unit="s", higher_is_better=False)
    assert times["median_ratio"] == pytest.approx(10 / 11) and not times["met"]  # 0.909 < 0.95


@pytest.mark.slow
def test_reduced_mode_writes_every_figure_in_the_documented_schema(tmp_path):
    root = make_image_tree(tmp_path / "tree", per_class=12, size=32)
    out = tmp_path / "bench.json"
    returned = run(compose_bench("quick=true", f"root={root}", f"out={out}", f"workdir={tmp_path / 'work'}",
                                 f"cache_dir={tmp_path / 'cache'}", "device=cpu"))  # fmt: skip
    results = json.loads(out.read_text())
    assert results == json.loads(json.dumps(returned))
    assert {"machine", "device", "root", "quick", "repeats", "overrides"} <= set(results)
    assert {"cpu", "cores", "threads", "torch", "pytorch_lightning"} <= set(results["machine"])
    for name, unit in (("loader", "images/s"), ("step", "images/s"), ("epoch", "s")):
        figure = results[name]
        assert figure["unit"] == unit and figure["target"] == TARGETS[name]
        assert len(figure["cvarch"]) == len(figure["reference"]) == len(figure["ratios"]) == 1  # quick=true
        assert all(v > 0 for v in figure["cvarch"] + figure["reference"])
        assert figure["median_ratio"] == statistics.median(figure["ratios"])
        assert figure["met"] == (figure["median_ratio"] >= figure["target"])
    assert results["step"]["batch_size"] == 8 and results["step"]["model"] == "resnet20"
    assert results["epoch"]["train_images"] + results["epoch"]["val_images"] < 36  # the carve leaves test out
    startup = results["startup"]
    assert 0 < startup["imports_s"] < startup["median"] and startup["met"] == (startup["median"] < 8.0)
    assert startup["slowest_imports"] and all(seconds > 0 for _, seconds in startup["slowest_imports"])


def test_a_root_without_train_and_an_unknown_figure_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="root: .* has no train/ folder"):
        run(compose_bench(f"root={tmp_path}", f"out={tmp_path / 'b.json'}"))
    with pytest.raises(ValueError, match=r"only: unknown figures \['speed'\]"):
        run(compose_bench(f"root={tmp_path}", "only=[loader,speed]"))
    assert not (tmp_path / "b.json").exists()


@pytest.mark.slow  # a fresh interpreter, then the loader figure on a tiny tree: ~15 s on 2 cores
def test_the_cli_takes_key_value_overrides_and_composes_its_runs_inside_hydra(tmp_path):
    root = make_image_tree(tmp_path / "tree", per_class=12, size=32)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    overrides = [
        "quick=true",
        "only=[loader]",
        f"root={root}",
        "out=bench.json",
        f"workdir={tmp_path / 'work'}",
        f"cache_dir={tmp_path / 'cache'}",
        "device=cpu",
    ]
    result = run_cli("cvarch-bench", *overrides, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in cwd.iterdir()] == ["bench.json"]  # Hydra wrote nothing of its own
    results = json.loads((cwd / "bench.json").read_text())
    assert set(results) & set(TARGETS) == {"loader"} and "| loader (images/s) |" in result.stdout
    help_text = run_cli("cvarch-bench", "--help", cwd=cwd).stdout
    assert help_text.startswith("cvarch-bench is a developer tool.") and "loader_batches: 20" in help_text


def test_recipe_names_an_experiment_whose_runs_and_raw_loop_the_bench_composes(tmp_path):
    """``cvarch-bench recipe=speedrun94`` parses (an ``experiment=`` key would clash with cvarch-train's
    config group of that name) and its cvarch runs compose the recipe, not ResNet-20."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from cvarch.bench import run_overrides
    from cvarch.config import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        assert hydra_compose("bench", overrides=["recipe=speedrun94"]).recipe == "speedrun94"
    overrides = run_overrides(tmp_path / "cifar10", 10, tmp_path, experiment="speedrun94")
    cfg = cvarch.compose(*overrides, "++trainer.max_steps=8")
    assert cfg.model._target_.endswith("SpeedrunNet") and cfg.data.batch_size == 1024
    assert cfg.trainer.max_steps == 8 and cfg.callbacks.bench_timer._target_ == "cvarch.bench.StepTimer"
