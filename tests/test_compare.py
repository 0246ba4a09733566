"""cvarch-compare (Canziani et al. 2017 style): its counts, timings and written files.

What it counts is checked against independent counts, what it times only for being positive medians, and what
it writes for being complete, readable files."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from itertools import count
from pathlib import Path

import matplotlib.image
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import cvarch
from cvarch import compare as cmp
from cvarch.config import CONFIG_DIR
from cvarch.models import native_size
from tests import wandb_log
from tests.conftest import ROOT
from tests.models.test_configs import native_size as expected_native_size

SMALL = ["resnet20", "densenet_bc100_12"]  # CIFAR nets: 32×32, a few ms per forward on a CPU
FAST = {
    "batch_sizes": [1, 2],
    "repeats": 2,
    "warmup": 1,
    "train_steps": 1,
    "num_classes": 10,
    "device": "cpu",
}
FAST_CLI = ["batch_sizes=[1,2]", "repeats=2", "warmup=1", "train_steps=1", "num_classes=10", "device=cpu"]
COLUMNS = [
    "model",
    "image_size",
    "params",
    "gmacs",
    "activations_mb",
    "forward_ms_bs1",
    "forward_ms_bs2",
    "train_batch_size",
    "train_images_per_s",
    "top1",
    "device",
]
# RGB classifiers only: the MLP takes 1×8×8 digits, the Inception module 28×28×256 feature maps.
RGB_MODELS = sorted(
    p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml") if p.stem not in ("mlp", "inception_module")
)


def check_png(path: Path) -> None:
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100 and image.shape[2] in (3, 4)
    assert image.std() > 0  # not a blank canvas


@pytest.fixture(scope="module")
def small_rows():
    """One measurement of the two small models, shared by the tests that only read it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two tiny nets: threads only add contention
    yield cmp.compare(SMALL, **FAST)
    torch.set_num_threads(threads)


@pytest.mark.slow  # a fresh interpreter
def test_cli_writes_the_csv_both_plots_and_fills_top1_from_a_results_csv(tmp_path):
    published = tmp_path / "published.csv"
    published.write_text("model,top1\nresnet20,91.25\n")  # He et al. 2015 Table 6: 8.75% CIFAR-10 error
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cvarch.compare",
            f"models=[{','.join(SMALL)}]",
            *FAST_CLI,
            f"results={published}",
            f"paths.log_dir={tmp_path}/logs",
        ],
        cwd=ROOT,
        env={**os.environ, "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    output_dir = Path(proc.stdout.strip().splitlines()[-1])
    assert output_dir.is_dir() and output_dir.is_relative_to(tmp_path)
    with (output_dir / cmp.CSV_NAME).open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == COLUMNS
    assert [r["model"] for r in rows] == SMALL
    assert float(rows[0]["top1"]) == 91.25
    assert rows[1]["top1"] == ""  # not in the results file
    for name in (cmp.ACCURACY_PLOT, cmp.TIME_PLOT):
        check_png(output_dir / name)
    assert "resnet20" in proc.stdout and "GMACs" in proc.stdout  # the rich table


def test_params_are_the_models_own_and_gmacs_are_flopcounter_flops_over_two(small_rows):
    for row in small_rows:
        model = cvarch.build_model(f"model={row['model']}", "data.channels=3", "data.num_classes=10").eval()
        assert row["params"] == sum(p.numel() for p in model.parameters())
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(torch.randn(1, 3, 32, 32))
        assert row["gmacs"] == pytest.approx(counter.get_total_flops() / 2 / 1e9)
    assert small_rows[0]["params"] == 269_722  # ResNet-20, He et al. 2015 §4.2: 0.27M
    assert small_rows[0]["gmacs"] == pytest.approx(0.0406, abs=5e-4)  # 3 stages of 3×3 convs at 32², 16², 8²


def test_times_are_positive_and_finite(small_rows):
    for row in small_rows:
        times = [row["forward_ms_bs1"], row["forward_ms_bs2"], row["train_images_per_s"]]
        assert all(math.isfinite(t) and t > 0 for t in times)
        assert row["train_batch_size"] == 2  # the largest batch size ≤ 32
        assert row["image_size"] == 32 and row["top1"] is None and row["device"] == "cpu"


def test_the_reported_forward_time_is_the_median_of_the_timed_runs(monkeypatch):
    durations = iter([0.004, 0.001, 0.009, 0.002, 0.003])  # seconds per timed run
    ticks = count()
    clock = {"now": 0.0}

    def fake_perf_counter() -> float:  # start, end, start, end, …: each end adds the next duration
        if next(ticks) % 2:
            clock["now"] += next(durations)
        return clock["now"]

    calls = []
    monkeypatch.setattr(cmp.time, "perf_counter", fake_perf_counter)
    times = cmp.time_ms(lambda: calls.append(1), repeats=5, warmup=2, device=torch.device("cpu"))
    assert len(calls) == 7  # warm-up runs are run but not timed
    assert times == pytest.approx([4.0, 1.0, 9.0, 2.0, 3.0])

    monkeypatch.setattr(cmp, "time_ms", lambda fn, repeats, warmup, device: [5.0, 1.0, 3.0])
    monkeypatch.setattr(cmp, "train_images_per_s", lambda *args: 1.0)
    row = cmp.compare(["resnet20"], **FAST)[0]
    assert row["forward_ms_bs1"] == row["forward_ms_bs2"] == 3.0


def test_activation_memory_is_the_profile_count():
    from tests.lecture import profile

    row = cmp.compare(["resnet20"], **FAST)[0]
    expected = profile("model=resnet20", "data.channels=3", "data.num_classes=10", "data.image_size=32")
    assert row["activations_mb"] == pytest.approx(expected.totals.activations_mb)


def test_without_accuracies_the_first_plot_shows_parameters(small_rows, tmp_path):
    cmp.write_csv(small_rows, tmp_path / "c.csv")
    assert all(r["top1"] == "" for r in csv.DictReader((tmp_path / "c.csv").open(newline="")))
    check_png(cmp.plot_accuracy(small_rows, tmp_path / "a.png"))
    check_png(cmp.plot_forward_time(small_rows, tmp_path / "t.png"))


def test_top1_from_a_folder_of_runs_is_the_mean_test_accuracy_per_model(tmp_path):
    for i, (model, acc) in enumerate([("resnet20", 0.90), ("resnet20", 0.92), ("vgg16", 0.7)]):
        run = tmp_path / "multirun" / str(i)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "hydra.yaml").write_text(
            f"hydra:\n  runtime:\n    choices:\n      model: {model}\n"
        )
        (run / "metrics.json").write_text(json.dumps({"test/acc": acc}))
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "metrics.json").write_text(json.dumps({"test/acc": 0.1}))  # no .hydra: unnamed
    unfinished = tmp_path / "multirun" / "3" / ".hydra"  # no metrics.json: no accuracy to count
    unfinished.mkdir(parents=True)
    (unfinished / "hydra.yaml").write_text("hydra:\n  runtime:\n    choices:\n      model: vgg16\n")
    assert cmp.read_top1(tmp_path) == pytest.approx({"resnet20": 91.0, "vgg16": 70.0})


def test_a_results_csv_without_a_top1_column_is_named(tmp_path):
    (tmp_path / "r.csv").write_text("model,acc\nresnet20,91\n")
    with pytest.raises(ValueError, match="no column top1"):
        cmp.read_top1(tmp_path / "r.csv")


@pytest.mark.parametrize("name", RGB_MODELS)
def test_native_size_is_the_one_the_model_configs_are_tested_at(name):
    cfg = cvarch.compose(f"model={name}", "data.channels=3")
    assert native_size(cfg.model) == expected_native_size(name)


def test_wandb_gets_the_table_and_both_plots(tmp_path):
    cfg = cvarch.compose(
        f"models=[{SMALL[0]}]", *FAST_CLI, "logger=wandb", f"paths.log_dir={tmp_path}", config_name="compare"
    )
    cmp.run(cfg)
    log = next((Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*/run-*.wandb"))
    types = {
        k.removesuffix("/_type"): v
        for row in wandb_log.history(log)
        for k, v in row.items()
        if k.endswith("/_type")
    }
    assert types == {
        "compare/table": "table-file",
        f"compare/{Path(cmp.ACCURACY_PLOT).stem}": "image-file",
        f"compare/{Path(cmp.TIME_PLOT).stem}": "image-file",
    }
