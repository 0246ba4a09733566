"""cvarch-bench: the harness runs end to end in its reduced mode and writes the documented JSON (not the speed)."""

from __future__ import annotations

import json
import statistics

import pytest

from cvarch.bench import TARGETS, bench, compare, rate
from tests.conftest import make_image_tree


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
    argv = ["--quick", "--root", str(root), "--out", str(out), "--workdir", str(tmp_path / "work"),
            "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]  # fmt: skip
    returned = bench(argv)
    results = json.loads(out.read_text())
    assert results == json.loads(json.dumps(returned))
    assert {"machine", "device", "root", "quick", "repeats", "overrides"} <= set(results)
    assert {"cpu", "cores", "threads", "torch", "pytorch_lightning"} <= set(results["machine"])
    for name, unit in (("loader", "images/s"), ("step", "images/s"), ("epoch", "s")):
        figure = results[name]
        assert figure["unit"] == unit and figure["target"] == TARGETS[name]
        assert len(figure["cvarch"]) == len(figure["reference"]) == len(figure["ratios"]) == 1  # --quick
        assert all(v > 0 for v in figure["cvarch"] + figure["reference"])
        assert figure["median_ratio"] == statistics.median(figure["ratios"])
        assert figure["met"] == (figure["median_ratio"] >= figure["target"])
    assert results["step"]["batch_size"] == 8 and results["step"]["model"] == "resnet20"
    assert results["epoch"]["train_images"] + results["epoch"]["val_images"] < 36  # the carve leaves test out
    startup = results["startup"]
    assert 0 < startup["imports_s"] < startup["median"] and startup["met"] == (startup["median"] < 8.0)
    assert startup["slowest_imports"] and all(seconds > 0 for _, seconds in startup["slowest_imports"])


def test_a_root_without_train_names_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="--root: .* has no train/ folder"):
        bench(["--root", str(tmp_path), "--out", str(tmp_path / "b.json")])
