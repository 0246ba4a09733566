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
import torchvision.models as tvm
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text
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
    "device": "cpu",
}  # num_classes left to each model's native dataset: CIFAR-10 for both
FAST_CLI = ["batch_sizes=[1,2]", "repeats=2", "warmup=1", "train_steps=1", "device=cpu"]
COLUMNS = [
    "model",
    "image_size",
    "num_classes",
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
    assert [r["num_classes"] for r in small_rows] == [10, 10]  # CIFAR nets get CIFAR-10's classes
    assert small_rows[0]["params"] == 269_722  # ResNet-20, He 2015 §4.2: 0.27M (0.33M with 1000 classes)
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


def test_num_classes_overrides_the_native_count_for_every_model():
    (row,) = cmp.compare(["resnet20"], **{**FAST, "batch_sizes": [1]}, num_classes=100)
    assert row["num_classes"] == 100 and row["params"] == 269_722 + 64 * 90 + 90  # fc: 64 → 100, not 10


def test_the_default_config_builds_each_model_with_its_native_classes(tmp_path):
    cfg = cvarch.compose("models=[resnet20]", *FAST_CLI, f"paths.log_dir={tmp_path}", config_name="compare")
    assert cfg.num_classes is None
    assert cmp.native_num_classes(cvarch.compose("model=resnet50").model) == 1000
    assert cmp.native_num_classes(cvarch.compose("model=speedrun").model) == 10  # CIFAR-only, no stem key
    (row,) = cmp.run(cfg)
    assert row["num_classes"] == 10 and row["params"] == 269_722


@pytest.fixture(scope="module")
def googlenet_row():
    """googlenet_tv measured once at 224×224: one pass and one SGD step at batch 1."""
    fast = {**FAST, "batch_sizes": [1], "repeats": 1, "warmup": 0}
    (row,) = cmp.compare(["googlenet_tv"], **fast, results=ROOT / "scripts" / "torchvision_imagenet_top1.csv")
    return row


def test_googlenet_counts_the_parameters_of_torchvisions_weights_without_the_auxiliary_heads(googlenet_row):
    reference = tvm.googlenet(weights=None, aux_logits=False, init_weights=False)  # how its weights load
    assert googlenet_row["params"] == sum(p.numel() for p in reference.parameters()) == 6_624_904
    assert googlenet_row["num_classes"] == 1000 and googlenet_row["top1"] == pytest.approx(69.778)
    model = cvarch.build_model("model=googlenet_tv", "data.channels=3", "data.num_classes=1000")
    assert sum(p.numel() for p in model.parameters()) == 13_004_888  # aux1, aux2 still built for training


def test_the_accuracy_figure_draws_googlenet_at_torchvisions_parameter_count(googlenet_row):
    rows = [googlenet_row, {**googlenet_row, "model": "other", "params": 1_000_000, "gmacs": 0.5}]
    fig = cmp.accuracy_figure(rows)
    ax = fig.axes[0]
    legend = ax.get_legend()
    keys = {t.get_text(): h.get_sizes()[0] for t, h in zip(legend.texts, legend.legend_handles, strict=True)}
    assert list(keys) == ["5M", "1M", "0.25M"]
    (bubble,) = [
        c.get_sizes()[0]
        for c in ax.collections
        if len(c.get_offsets())
        and tuple(c.get_offsets()[0]) == pytest.approx((googlenet_row["gmacs"], 69.778))
    ]
    assert bubble / keys["5M"] == pytest.approx(6_624_904 / 5e6)  # bubble area ∝ parameters: 6.6M, not 13.0M


README_ROWS = [  # the README's measured table, googlenet_tv at its inference count
    ("alexnet_tv", 61.10, 0.714, 56.52),
    ("vgg16", 138.36, 15.470, 71.59),
    ("googlenet_tv", 6.62, 1.498, 69.78),
    ("resnet18", 11.69, 1.814, 69.76),  # 0.3 GMACs right of googlenet_tv at the same top-1: labels collide
    ("resnet50", 25.56, 4.089, 76.13),
    ("resnet152", 60.19, 11.514, 78.31),
    ("densenet121", 7.98, 2.834, 74.43),
    ("squeezenet1_1", 1.24, 0.349, 58.18),
]


def readme_rows(without_top1: tuple[str, ...] = ()) -> list[dict]:
    return [
        {
            "model": name,
            "params": params * 1e6,
            "gmacs": gmacs,
            "forward_ms_bs1": 10 * gmacs + 1,
            "forward_ms_bs8": 60 * gmacs + 5,
            "top1": None if name in without_top1 else top1,
            "device": "cpu",
        }
        for name, params, gmacs, top1 in README_ROWS
    ]


def drawn_labels(fig):
    """The model labels (annotations) of every axes, and their boxes as drawn (text only, in pixels)."""
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    labels = [t for ax in fig.axes for t in ax.texts]
    return {t.get_text(): Text.get_window_extent(t, renderer) for t in labels}, renderer


def test_the_readme_figure_has_no_overlapping_labels_and_starts_at_zero_operations():
    source = cmp.describe_results(ROOT / "scripts" / "torchvision_imagenet_top1.csv")
    fig = cmp.accuracy_figure(readme_rows(), source)
    boxes, renderer = drawn_labels(fig)
    assert sorted(boxes) == sorted(name for name, *_ in README_ROWS)
    names = list(boxes)
    overlapping = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :] if boxes[a].overlaps(boxes[b])]
    assert not overlapping
    (ax,) = fig.axes
    frame = ax.get_window_extent(renderer)
    for b in boxes.values():  # inside the axes
        assert frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1
    assert ax.get_xlim()[0] == 0 and ax.get_xlim()[1] > 15.47
    assert ax.get_xlabel() == "operations per image [GMACs, multiply-accumulates at batch 1]"
    assert ax.get_ylabel() == "top-1 accuracy [%]"
    assert fig.get_suptitle().startswith("Top-1 accuracy vs. operations")
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.texts] == ["100M", "25M", "5M"]
    assert legend.get_window_extent(renderer).x0 >= frame.x1  # the key beside the data, not on it
    caption = fig.get_supxlabel()
    assert "torchvision's published ImageNet top-1" in caption and "torchvision_imagenet_top1.csv" in caption


def test_models_without_a_top1_are_drawn_on_a_strip_and_named_in_the_caption(tmp_path):
    fig = cmp.accuracy_figure(readme_rows(without_top1=("alexnet_tv", "googlenet_tv")), "top-1: from x.csv")
    ax, strip = fig.axes[:2]
    assert sorted(t.get_text() for t in strip.texts) == ["alexnet_tv", "googlenet_tv"]
    assert len(ax.texts) == 6 and strip.get_yticklabels()[0].get_text() == "no top-1"
    assert strip.get_xlim()[0] == 0
    caption = fig.get_supxlabel()
    assert "no top-1 for alexnet_tv, googlenet_tv" in caption and "from x.csv" in caption
    boxes, _ = drawn_labels(fig)
    names = list(boxes)
    assert not [(a, b) for i, a in enumerate(names) for b in names[i + 1 :] if boxes[a].overlaps(boxes[b])]
    check_png(cmp.plot_accuracy(readme_rows(without_top1=("vgg16",)), tmp_path / "a.png"))


def test_the_default_models_all_have_a_published_top1():
    published = cmp.read_top1(ROOT / "scripts" / "torchvision_imagenet_top1.csv")
    models = cvarch.compose(config_name="compare").models
    assert set(models) <= set(published) and "alexnet_tv" in models and "googlenet_tv" in models


def test_the_caption_names_a_folder_of_runs(tmp_path):
    assert cmp.describe_results(tmp_path) == f"top-1: mean test/acc of the cvarch-train runs in {tmp_path}"
    (tmp_path / "r.csv").write_text("model,top1\nresnet20,91.25\n")
    assert cmp.describe_results(tmp_path / "r.csv") == f"top-1: published figures from {tmp_path / 'r.csv'}"


def test_the_forward_time_figure_has_its_legend_beside_the_data():
    fig = cmp.forward_time_figure(readme_rows())
    _, renderer = drawn_labels(fig)
    (ax,) = fig.axes
    assert ax.get_legend().get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1
    assert [t.get_text() for t in ax.get_legend().texts] == [name for name, *_ in README_ROWS]
    assert ax.get_xlabel() == "batch size [images]"
    assert ax.get_ylabel() == "forward time per batch [ms], median"
    assert fig.get_suptitle().startswith("Forward time vs. batch size on cpu")
