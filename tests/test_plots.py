"""cvarch/plots.py: the run title from Hydra's choices and overrides, seed bands, integer epoch ticks, the
legend beside the axes, and the saved, titled PNG."""

from __future__ import annotations

import matplotlib.image
import pytest
from matplotlib.ticker import MaxNLocator

from cvarch.plots import band, figure, integer_epochs, legend_beside, run_title, save


def test_run_title_names_model_and_data_then_what_was_overridden():
    choices = {"model": "resnet20", "data": "digits", "init": "kaiming"}
    overrides = [
        "model=resnet20",  # already in the head
        "init=kaiming",
        "optimizer.lr=0.05",
        "hydra.run.dir=/tmp/x",  # how, not what: left out
        "paths.log_dir=/tmp/logs",
        "logger=none",
        "seed=1",
    ]
    assert run_title(choices, overrides) == "resnet20 on digits · init=kaiming optimizer.lr=0.05 seed=1"
    assert run_title({"model": "mlp"}, []) == "mlp"
    assert run_title({}, ["+trainer.max_steps=1"]) == "+trainer.max_steps=1"


def test_run_title_reads_the_running_hydra_job(tmp_path):
    import cvarch

    cvarch.compose(f"paths.log_dir={tmp_path}", "model=mlp", "optimizer.lr=0.1")
    assert run_title() == "mlp on digits · optimizer.lr=0.1"


@pytest.mark.parametrize(("std", "fills"), [([0.0, 0.0, 0.0], 0), ([0.0, 0.1, 0.2], 1)])
def test_band_shades_the_spread_only_where_seeds_differ(std, fills):
    ax = figure(4, 3).subplots()
    band(ax, [1, 2, 3], [0.5, 0.6, 0.7], std, label="val/acc", color="C1")
    assert len(ax.collections) == fills and ax.lines[0].get_label() == "val/acc"
    if fills:
        low, high = ax.collections[0].get_paths()[0].get_extents().intervaly
        assert (low, high) == pytest.approx((0.5, 0.9))  # mean − std at epoch 1 … mean + std at epoch 3


def test_integer_epochs_labels_the_axis_and_ticks_whole_epochs():
    ax = figure(4, 3).subplots()
    ax.plot([1, 2, 3], [0.1, 0.2, 0.3])
    integer_epochs(ax)
    locator = ax.xaxis.get_major_locator()
    assert isinstance(locator, MaxNLocator) and locator._integer
    assert all(float(t).is_integer() for t in ax.get_xticks())
    assert ax.get_xlabel() == "epoch"


def test_legend_beside_puts_it_right_of_the_axes_and_only_when_there_are_lines():
    fig = figure(4, 3)
    empty, ax = fig.subplots(1, 2)
    legend_beside(empty)
    assert empty.get_legend() is None
    ax.plot([0, 1], [0, 1], label="train/loss")
    legend_beside(ax)
    fig.canvas.draw()
    assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1


def test_save_writes_the_png_with_its_title(tmp_path):
    fig = figure(4, 3)
    fig.subplots().plot([1, 2], [3, 4])
    path = save(fig, tmp_path / "sub" / "curve.png", title="resnet20 on digits", dpi=50)
    assert path == tmp_path / "sub" / "curve.png"
    assert matplotlib.image.imread(path).shape[:2] == (150, 200)  # 4 × 3 inches at 50 dpi
    assert fig.get_suptitle() == "resnet20 on digits"
    untitled = figure(4, 3)
    save(untitled, tmp_path / "untitled.png")
    assert untitled.get_suptitle() == ""
