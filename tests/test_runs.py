"""cvarch.runs: the one reader of run and sweep folders, on folders laid out as cvarch-train writes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cvarch.runs import find_jobs, is_run_dir, list_jobs, read_job


def write_job(folder: Path, overrides: list[str] | None = None, metrics: dict | None = None) -> Path:
    """A run folder with ``.hydra/overrides.yaml`` given ``overrides``, ``metrics.json`` given ``metrics``."""
    folder.mkdir(parents=True)
    if overrides is not None:
        (folder / ".hydra").mkdir()
        (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_a_job_reads_its_overrides_metrics_config_and_choices(tmp_path):
    job_dir = write_job(
        tmp_path / "3", ["norm=none", "+trainer.max_steps=2", "~callbacks.lr_monitor"], {"test/acc": 0.5}
    )
    (job_dir / "config.yaml").write_text(yaml.safe_dump({"task_name": "train", "seed": 1}))
    (job_dir / ".hydra" / "hydra.yaml").write_text(
        "hydra:\n  runtime:\n    choices:\n      model: resnet20\n"
    )
    job = read_job(job_dir)
    assert job.name == "3" and job.dir == job_dir and job.finished
    assert job.overrides == {"norm": "none", "+trainer.max_steps": "2", "~callbacks.lr_monitor": ""}
    assert job.metrics == {"test/acc": 0.5}
    assert job.config() == {"task_name": "train", "seed": 1} and job.choices() == {"model": "resnet20"}
    bare = read_job(write_job(tmp_path / "bare"))
    assert (bare.overrides, bare.metrics, bare.config(), bare.choices()) == ({}, None, None, {})
    assert not bare.finished


def test_list_jobs_gives_a_sweeps_job_folders_finished_or_not_in_job_order(tmp_path):
    for num in (10, 2, 0):
        write_job(tmp_path / str(num), [f"seed={num}"], {"test/acc": 0.1} if num else None)
    write_job(tmp_path / "source", metrics={"test/acc": 0.9})  # a run folder without .hydra/ (metrics.json)
    (tmp_path / "only_ckpts" / "checkpoints").mkdir(parents=True)  # a run killed before it finished
    (tmp_path / ".submitit" / "123").mkdir(parents=True)  # the launcher's, not a job
    (tmp_path / "wandb").mkdir()
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    jobs = list_jobs(tmp_path)
    assert [j.name for j in jobs] == ["0", "2", "10", "only_ckpts", "source"]
    assert [j.finished for j in jobs] == [False, True, True, False, True]
    assert jobs[1].overrides == {"seed": "2"}


def test_list_jobs_of_a_run_folder_is_that_run(tmp_path):
    run = write_job(tmp_path / "run", ["seed=0"])
    assert not is_run_dir(tmp_path) and is_run_dir(run)
    assert [j.dir for j in list_jobs(run)] == [run]


@pytest.mark.parametrize("where", ["empty", "missing"])
def test_list_jobs_names_a_folder_without_jobs(tmp_path, where):
    folder = tmp_path if where == "empty" else tmp_path / "nowhere"
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match=f"{folder}: neither a run folder nor a sweep folder"):
        list_jobs(folder)


def test_find_jobs_searches_every_depth_but_not_inside_runs_or_hidden_folders(tmp_path):
    single = write_job(tmp_path / "train" / "runs" / "2026-01-01_00-00-00", ["seed=0"], {"test/acc": 0.5})
    swept = [write_job(tmp_path / "train" / "multiruns" / "t" / str(n), [f"seed={n}"]) for n in (0, 1)]
    write_job(single / "wandb" / "nested", metrics={})  # inside a run folder: not searched
    write_job(tmp_path / ".cache" / "x", metrics={})  # hidden: not searched
    assert [j.dir for j in find_jobs(tmp_path)] == [*swept, single]
    assert find_jobs(tmp_path / "nowhere") == []


def test_best_checkpoint_prefers_metrics_then_non_last(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.write_text("")
    assert read_job(tmp_path).best_checkpoint() == last
    best = tmp_path / "checkpoints" / "epoch003-acc0.9000.ckpt"
    best.write_text("")
    assert read_job(tmp_path).checkpoints == [best, last]
    assert read_job(tmp_path).best_checkpoint() == best
    (tmp_path / "metrics.json").write_text(json.dumps({"best_ckpt": str(last)}))
    assert read_job(tmp_path).best_checkpoint() == last
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        read_job(tmp_path / "checkpoints").best_checkpoint()
