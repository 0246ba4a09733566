"""cvarch-report: swept factors, group means and counts, paired differences, failed jobs, real sweeps."""

from __future__ import annotations

import csv
import json
import os
import statistics
from pathlib import Path

import pytest
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.ticker import MaxNLocator

import cvarch
from cvarch.report import (
    curves_figure,
    paired_differences,
    parse_baseline,
    report,
    report_figure,
    run,
    sweep_name,
    swept_factors,
)
from cvarch.runs import list_jobs
from tests.conftest import run_cli, run_main, tmp_overrides

# ResNet-20 on 30 digits, one step, one val and test batch: sweeps whose jobs finish, not how well they train
SMALL = ("trainer.max_epochs=1", "data.train_per_class=3", "+trainer.limit_val_batches=1",
         "+trainer.limit_test_batches=1")  # fmt: skip


def _job(sweep: Path, num: int, overrides: list[str], acc: float | None) -> None:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if acc is not None:
        (job / "metrics.json").write_text(json.dumps({"test/acc": acc, "val/acc": acc - 0.01}))


@pytest.fixture
def sweep(tmp_path) -> Path:
    """norm × seed, lr constant; the (none, seed 2) job failed."""
    root = tmp_path / "sweep"
    accs = {
        ("batchnorm", 0): 0.90,
        ("batchnorm", 1): 0.80,
        ("batchnorm", 2): 0.85,
        ("none", 0): 0.70,
        ("none", 1): 0.66,
    }
    num = 0
    for norm in ("batchnorm", "none"):
        for seed in (0, 1, 2):
            _job(root, num, [f"norm={norm}", f"seed={seed}", "optimizer.lr=0.1"], accs.get((norm, seed)))
            num += 1
    return root


def test_a_corrupt_or_nan_job_is_listed_as_bad_and_the_others_are_reported(sweep, tmp_path):
    _job(sweep, 6, ["norm=none", "seed=3", "optimizer.lr=0.1"], None)
    (sweep / "6" / "metrics.json").write_text('{"test/acc": 0.7')  # cut short by a full disk
    _job(sweep, 7, ["norm=none", "seed=4", "optimizer.lr=0.1"], None)
    (sweep / "7" / "metrics.json").write_text('{"test/acc": NaN}')  # json.dumps of a diverged run's NaN
    summary = report(sweep, out_dir=tmp_path / "out")
    rows = {g["norm"]: g for g in summary["groups"]}
    assert rows["none"]["n"] == 2 and rows["none"]["mean"] == pytest.approx(0.68)  # jobs 3 and 4 only
    assert summary["failed"] == ["5"]
    assert [b["job"] for b in summary["bad"]] == ["6", "7"]
    assert summary["bad"][0]["reason"].startswith("metrics.json is not valid JSON (")
    assert summary["bad"][1]["reason"] == "test/acc is nan, not a finite number"
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Bad jobs, left out: 6 (metrics.json is not valid JSON" in md and "; 7 (test/acc is nan" in md


def test_factors_are_the_overrides_that_vary_except_seed_and_paths(sweep):
    jobs = list_jobs(sweep)
    assert len(jobs) == 6 and sum(j.metrics is None for j in jobs) == 1
    assert swept_factors(jobs) == ["norm"]  # seed is averaged over; optimizer.lr did not vary


def test_groups_means_stds_counts_and_the_failed_job(sweep, tmp_path):
    summary = report(sweep, out_dir=tmp_path / "out")
    rows = {g["norm"]: g for g in summary["groups"]}
    assert rows["batchnorm"]["n"] == 3 and rows["none"]["n"] == 2
    assert rows["batchnorm"]["mean"] == pytest.approx(0.85) and rows["batchnorm"]["std"] == pytest.approx(
        0.05
    )
    assert rows["none"]["mean"] == pytest.approx(0.68) and rows["none"]["std"] == pytest.approx(0.02 * 2**0.5)
    assert summary["failed"] == ["5"]
    out = tmp_path / "out"
    md = (out / "report.md").read_text()
    assert "| batchnorm | 0.8500 ± 0.0500 | 3 |" in md and "failed jobs (no metrics.json): 5" in md
    with (out / "report.csv").open() as f:
        table = list(csv.reader(f))
    assert table[0] == ["norm", "n", "test/acc mean", "test/acc std"] and len(table) == 3
    assert (out / "report.png").stat().st_size > 1000
    assert json.loads((out / "report.json").read_text())["groups"][0]["values"] == [0.9, 0.8, 0.85]


def test_paired_differences_pair_jobs_by_seed(sweep):
    jobs = list_jobs(sweep)
    (diff,) = paired_differences(jobs, "test/acc", ["norm"], ("norm", "batchnorm"))
    # seeds 0 and 1 are paired (seed 2 of norm=none failed): −0.20 and −0.14
    assert diff["pairs"] == 2 and diff["mean_diff"] == pytest.approx(-0.17)
    assert diff["std_diff"] == pytest.approx(statistics.stdev([-0.20, -0.14]))
    with pytest.raises(ValueError, match=r"baseline init=kaiming: init is not a swept factor"):
        paired_differences(jobs, "test/acc", ["norm"], ("init", "kaiming"))
    with pytest.raises(ValueError, match=r"no finished job has norm=lrn"):
        paired_differences(jobs, "test/acc", ["norm"], ("norm", "lrn"))


def test_a_folder_without_jobs_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        report(tmp_path)


def compose_report(*overrides: str):
    return cvarch.compose(*overrides, config_name="report")


def test_run_prints_the_table_and_refuses_a_baseline_without_a_value(sweep, capsys):
    summary = run(compose_report(f"sweep_dir={sweep}", "metric=val/acc", "baseline=norm:batchnorm"))
    out = capsys.readouterr().out
    assert summary["metric"] == "val/acc" and summary["baseline"] == ["norm", "batchnorm"]
    assert "| none | -0.1700 ± 0.0424 | 2 |" in out and (sweep / "report.md").read_text() == out
    with pytest.raises(ValueError, match=r"baseline='batchnorm': expected factor:value"):
        run(compose_report(f"sweep_dir={sweep}", "baseline=batchnorm"))
    with pytest.raises(ValueError, match=r"wandb='yes': expected one of auto, on, off"):
        run(compose_report(f"sweep_dir={sweep}", "wandb=yes"))


def test_the_baseline_is_factor_colon_value_or_a_quoted_factor_equals_value():
    assert parse_baseline("norm:batchnorm") == parse_baseline("norm=batchnorm") == ("norm", "batchnorm")
    assert parse_baseline("optimizer.lr:0.1") == ("optimizer.lr", "0.1") and parse_baseline(None) is None
    assert compose_report("sweep_dir=s", 'baseline="norm=batchnorm"').baseline == "norm=batchnorm"


def test_out_dir_defaults_to_the_sweep_folder_and_can_be_another(sweep, tmp_path, capsys):
    assert compose_report(f"sweep_dir={sweep}").out_dir == str(sweep)
    run(compose_report(f"sweep_dir={sweep}", f"out_dir={tmp_path}/out", "curve=train/error"))
    assert (tmp_path / "out" / "report.md").is_file() and not (sweep / "report.md").exists()


@pytest.mark.slow  # a fresh interpreter importing torch: ~7 s on 2 cores
def test_the_cli_writes_into_the_sweep_folder_only_and_prints_it_last(sweep, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = {p.name for p in sweep.iterdir()}
    result = run_cli(
        "cvarch-report", f"sweep_dir={sweep}", "metric=val/acc", "baseline=norm:batchnorm", cwd=cwd
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == str(sweep) and "| none | -0.1700 ± 0.0424 | 2 |" in result.stdout
    # Hydra leaves nothing of its own: no outputs/ or logs/ in the working directory, no .hydra/ or report.log
    assert not list(cwd.iterdir())
    assert {p.name for p in sweep.iterdir()} - before == {
        "report.md",
        "report.csv",
        "report.json",
        "report.png",
    }


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_a_real_2x2x2_sweep_and_its_report(tmp_path, launcher):
    sweep = tmp_path / "sweep"
    result = run_main(
        "cvarch-train",
        "-m",
        f"hydra/launcher={launcher}",
        *(["hydra.launcher.n_jobs=2"] if launcher == "joblib" else []),
        "norm=batchnorm,none",
        "init=default,kaiming",
        "seed=0,1",
        *SMALL,
        "logger=none",
        *tmp_overrides(tmp_path),
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    returned = run(compose_report(f"sweep_dir={sweep}", "baseline=norm:batchnorm"))
    summary = json.loads((sweep / "report.json").read_text())
    assert summary == json.loads(json.dumps(returned))
    assert summary["factors"] == ["norm", "init"] and not summary["failed"]
    for group in summary["groups"]:
        jobs = [
            json.loads((job / "metrics.json").read_text())["test/acc"]
            for job in sweep.iterdir()
            if (job / "metrics.json").is_file()
            and {f"norm={group['norm']}", f"init={group['init']}"}
            <= set(yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))
        ]
        assert group["n"] == 2 and group["mean"] == pytest.approx(statistics.fmean(jobs))
    threads = {json.loads(p.read_text())["threads"] for p in sweep.glob("*/metrics.json")}
    if launcher == "joblib":  # 2 parallel jobs share the cores instead of each taking all of them
        assert threads == {max(1, (os.cpu_count() or 1) // 2)}
    assert {(d["norm"], d["init"], d["pairs"]) for d in summary["paired"]} == {
        ("none", "default", 2),
        ("none", "kaiming", 2),
    }


@pytest.mark.slow
def test_a_failing_job_leaves_the_others_and_is_listed(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_main(
        "cvarch-train",
        "-m",
        "optimizer.lr=-1.0,0.01",  # SGD refuses a negative lr: that job raises
        *SMALL,
        "logger=none",
        *tmp_overrides(tmp_path),
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode != 0 and "optimizer.lr: the learning rate must be > 0, got -1.0" in result.stderr
    summary = report(sweep)
    assert [g["optimizer.lr"] for g in summary["groups"]] == ["0.01"] and summary["groups"][0]["n"] == 1
    assert summary["failed"] == ["0"]


def test_curves_average_the_seeds_per_epoch_and_error_is_one_minus_accuracy(sweep, tmp_path):
    for job, accs in (
        ("0", [0.5, 0.7]),
        ("1", [0.3, 0.5]),
        ("3", [0.2, 0.4]),
    ):  # batchnorm seeds 0, 1; none 0
        history = [{"epoch": e, "train/acc": a, "train/loss": 1 - a} for e, a in enumerate(accs)]
        (sweep / job / "history.json").write_text(json.dumps(history))
    summary = report(sweep, curve="train/error", out_dir=tmp_path / "out")
    spread = statistics.stdev([0.5, 0.7])  # seeds 0 and 1 of norm=batchnorm, both epochs
    assert summary["curves"]["norm=batchnorm"] == [
        [0, pytest.approx(0.6), pytest.approx(spread), 2],
        [1, pytest.approx(0.4), pytest.approx(spread), 2],
    ]
    none = [[0, pytest.approx(0.8), None, 1], [1, pytest.approx(0.6), None, 1]]  # one seed: no std
    assert summary["curves"]["norm=none"] == none
    assert (tmp_path / "out" / "report_curves.png").stat().st_size > 1000
    assert report(sweep, curve="train/loss", out_dir=tmp_path / "o2")["curves"]["norm=none"][1][
        1
    ] == pytest.approx(0.6)


def test_the_table_goes_to_wandb_in_the_sweeps_group_when_the_jobs_used_wandb(sweep, tmp_path):
    from tests import wandb_log

    sweep = sweep.rename(tmp_path / "2026-01-02_03-04-05")
    for job in sweep.iterdir():  # what cvarch-train saves: the W&B logger node and the task name
        config = {"task_name": "norm_ablation", "logger": {"wandb": {"project": "cvarch", "mode": "offline"}}}
        (job / "config.yaml").write_text(yaml.safe_dump(config))
    summary = report(sweep, baseline=("norm", "batchnorm"))
    (log,) = Path(summary["wandb_run"]).glob("run-*.wandb")
    run = wandb_log.run(log)
    assert run["group"] == "norm_ablation/2026-01-02_03-04-05" and run["job_type"] == "report"
    (row,) = wandb_log.history(log)  # one wandb.log call; W&B stores a media value's fields as nested keys
    assert row["report/groups/_type"] == "table-file" and row["report/groups/nrows"] == 2
    assert row["report/paired/nrows"] == 1 and row["report/report/_type"] == "image-file"
    table = json.loads(next(Path(summary["wandb_run"]).rglob("report/groups_*.table.json")).read_text())
    assert table["columns"] == ["norm", "n", "test/acc mean", "test/acc std"]
    assert table["data"][0][:2] == ["batchnorm", 3] and table["data"][0][2] == pytest.approx(0.85)
    assert wandb_log.summary(log)["failed_jobs"] == 1


def test_no_wandb_run_without_wandb_jobs_unless_asked(sweep):
    assert "wandb_run" not in report(sweep)  # the fixture's jobs have no config.yaml: no W&B logger
    assert not list(sweep.glob("wandb"))
    assert Path(report(sweep, wandb="on")["wandb_run"]).is_dir()


def test_a_group_of_one_run_has_no_std_in_the_table_the_csv_or_the_json(sweep, tmp_path):
    _job(sweep, 6, ["norm=lrn", "seed=0", "optimizer.lr=0.1"], 0.5)
    summary = report(sweep, baseline=("norm", "batchnorm"), out_dir=tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| lrn | 0.5000 ± — | 1 |" in md  # one seed: no spread, not "± 0.0000"
    assert "| lrn | -0.4000 ± — | 1 |" in md  # one pair: seed 0 against batchnorm's 0.90
    assert "| none | -0.1700 ± 0.0424 | 2 |" in md and "0.0000" not in md
    with (tmp_path / "out" / "report.csv").open() as f:
        rows = {r[0]: r for r in csv.reader(f)}
    assert rows["lrn"] == ["lrn", "1", "0.5", ""]
    groups = {g["norm"]: g for g in json.loads((tmp_path / "out" / "report.json").read_text())["groups"]}
    assert groups["lrn"]["std"] is None and groups["none"]["std"] == pytest.approx(0.02 * 2**0.5)
    assert {d["norm"]: d["std_diff"] for d in summary["paired"]}["lrn"] is None


def draw(fig):
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    return renderer


def test_the_bar_plot_names_the_sweep_gives_n_per_bar_and_marks_the_baseline(sweep, tmp_path):
    _job(sweep, 6, ["norm=lrn", "seed=0", "optimizer.lr=0.1"], 0.5)
    fig = report_figure(report(sweep, baseline=("norm", "batchnorm"), out_dir=tmp_path / "out"))
    (ax,) = fig.axes
    assert fig.get_suptitle() == "Sweep sweep: test/acc by norm"
    assert [t.get_text() for t in ax.texts] == ["n=3", "n=1", "n=2"]  # batchnorm, lrn, none
    assert [p.get_hatch() for p in ax.patches] == ["//", None, None]  # the baseline's bar
    assert [t.get_text() for t in ax.get_legend().texts] == ["baseline norm=batchnorm"]
    assert len(ax.containers) == 3  # the bars and an error bar for each group of ≥ 2 runs, none for lrn
    assert ax.containers[1].lines[2][0].get_segments()[0][:, 1] == pytest.approx([0.80, 0.90])  # mean ± std
    assert ax.get_ylabel() == "test/acc [fraction correct, 0–1]\nmean ± std over seeds"
    assert ax.get_xlabel() == "norm"
    renderer = draw(fig)
    assert ax.get_legend().get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1
    assert (tmp_path / "out" / "report.png").stat().st_size > 1000


def test_the_curves_have_integer_epochs_a_seed_band_and_the_legend_beside(sweep, tmp_path):
    for job, accs in (("0", [0.5, 0.7, 0.8]), ("1", [0.3, 0.5, 0.6]), ("3", [0.2, 0.4, 0.5])):
        history = [{"epoch": e, "train/acc": a} for e, a in enumerate(accs)]
        (sweep / job / "history.json").write_text(json.dumps(history))
    summary = report(sweep, curve="train/error", out_dir=tmp_path / "out")
    fig = curves_figure(summary["curves"], "train/error", "a title")
    (ax,) = fig.axes
    renderer = draw(fig)
    assert isinstance(ax.xaxis.get_major_locator(), MaxNLocator)
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert ax.get_xlabel() == "epoch [completed passes over the training set]"
    assert ax.get_ylabel() == "train/error [fraction wrong, 0–1]"
    assert [t.get_text() for t in ax.get_legend().texts] == ["norm=batchnorm (n=2)", "norm=none (n=1)"]
    (band,) = [c for c in ax.collections if isinstance(c, PolyCollection)]  # norm=none has one seed: no band
    low, high = band.get_paths()[0].vertices[:, 1].min(), band.get_paths()[0].vertices[:, 1].max()
    spread = statistics.stdev([0.5, 0.7])
    assert low == pytest.approx(0.3 - spread) and high == pytest.approx(0.6 + spread)  # epoch 3 and 1
    assert [list(line.get_xdata()) for line in ax.lines] == [[1, 2, 3], [1, 2, 3]]
    assert ax.get_legend().get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1
    assert fig.get_suptitle() == "a title"


def test_the_sweep_is_named_by_its_task_and_time(tmp_path):
    assert sweep_name(tmp_path / "logs" / "norm_ablation" / "multiruns" / "2026-01-02_03-04-05") == (
        "norm_ablation/2026-01-02_03-04-05"
    )
    assert sweep_name(tmp_path / "my_sweep") == "my_sweep"
