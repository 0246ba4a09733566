"""cvarch-ensemble: the mean softmax of trained runs, from run directories or a multirun directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cvarch.ensemble import ensemble, predict, run_dirs, topk_accuracy
from cvarch.runs import read_job
from tests.conftest import report, run_main, tmp_overrides


def test_topk_accuracy_counts_targets_among_the_k_largest():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    targets = torch.tensor([0, 0, 1])
    assert topk_accuracy(probs, targets, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(probs, targets, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(probs, targets, 5) == 1.0  # k beyond the classes: every target counts


@pytest.mark.slow
def test_an_ensemble_of_identical_checkpoints_equals_the_single_model(default_run):
    run = default_run["output_dir"]
    metrics = json.loads((run / "metrics.json").read_text())
    probs, targets, _ = predict(read_job(run).best_checkpoint(), "test")
    single = ensemble([run], split="test")
    double = ensemble([run, run], split="test")
    member = {k: single["members"][0][k] for k in ("acc", "acc_top5")}
    assert double["ensemble"] == single["ensemble"] == member
    assert double["gain"] == {"acc": 0.0, "acc_top5": 0.0}
    assert single["ensemble"]["acc"] == pytest.approx(topk_accuracy(probs, targets, 1))
    assert single["ensemble"]["acc"] == pytest.approx(metrics["test/acc"])  # what training reported


@pytest.mark.slow
def test_experiment_ensemble_trains_seeds_and_beats_their_mean_on_a_real_split(tmp_path):
    # 3 seeds of a 4-epoch ResNet-20 on the real digits split, then the Hydra callback ensembles them
    proc = run_main(
        "cvarch-train", "experiment=ensemble", "trainer.max_epochs=4", "logger=none", *tmp_overrides(tmp_path)
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    sweep = Path(proc.stdout.strip().splitlines()[-1])
    result = json.loads((sweep / "ensemble.json").read_text())
    assert [Path(m["run"]).name for m in result["members"]] == ["0", "1", "2"]
    trained = [json.loads((Path(m["run"]) / "metrics.json").read_text()) for m in result["members"]]
    # the seeds really differ (their accuracies on 270 test digits may still coincide)
    assert len({t["train/loss"] for t in trained}) == 3
    assert result["ensemble"]["acc"] >= result["mean_member"]["acc"]
    for member, metrics in zip(result["members"], trained, strict=True):  # each is its own run's test acc
        assert member["acc"] == pytest.approx(metrics["test/acc"])
    members = ", ".join(f"{100 * m['acc']:.2f}" for m in result["members"])
    report(
        f"ensemble of 3 ResNet-20 seeds (digits, 4 epochs): {100 * result['ensemble']['acc']:.2f}% test acc "
        f"vs members {members}%"
    )
    # the CLI on the same sweep folder, with test-time flips for every member
    proc = run_main("cvarch-ensemble", f"runs={sweep}", "tta=flip", *tmp_overrides(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = Path(proc.stdout.strip().splitlines()[-1])
    flipped = json.loads((out / "ensemble.json").read_text())
    assert len(flipped["members"]) == 3 and "| ensemble |" in proc.stdout


def test_run_dirs_leaves_out_a_job_with_a_corrupt_metrics_file_and_says_so(tmp_path):
    for job, text in (("0", "{}"), ("1", "{not json")):
        (tmp_path / job).mkdir()
        (tmp_path / job / "metrics.json").write_text(text)
    with pytest.warns(RuntimeWarning, match=r"runs: .*/1 left out: metrics.json is not valid JSON"):
        assert [p.name for p in run_dirs(tmp_path)] == ["0"]


def test_run_dirs_names_a_folder_without_runs(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"runs: {tmp_path}: neither a run folder"):
        run_dirs([tmp_path])


def test_run_dirs_expands_a_multirun_folder_in_job_order(tmp_path):
    for job in ("10", "2", "0"):
        (tmp_path / job).mkdir()
        (tmp_path / job / "metrics.json").write_text("{}")
    (tmp_path / ".submitit").mkdir()  # not a job
    (tmp_path / "5" / ".hydra").mkdir(parents=True)  # a job that did not finish: left out
    assert [p.name for p in run_dirs(tmp_path)] == ["0", "2", "10"]
    assert run_dirs([tmp_path / "2"]) == [tmp_path / "2"]
    (tmp_path / "5" / "checkpoints").mkdir()  # named directly, an unfinished run serves its checkpoints
    assert run_dirs([tmp_path / "5", tmp_path / "0"]) == [tmp_path / "5", tmp_path / "0"]


def test_run_dirs_names_a_multirun_folder_whose_jobs_all_failed(tmp_path):
    for job in ("0", "1"):
        (tmp_path / job / ".hydra").mkdir(parents=True)
    with pytest.raises(
        FileNotFoundError, match=rf"runs: none of the 2 jobs of the multirun directory {tmp_path}"
    ):
        run_dirs(tmp_path)


def test_an_ensemble_on_data_with_another_number_of_classes_is_refused_naming_both(tiny_run):
    import cvarch

    fake = cvarch.compose("data=fake", "data.num_classes=4").data
    with pytest.raises(
        ValueError, match=r"runs: .*\.ckpt was trained for 10 classes but this run's data has 4"
    ):
        ensemble([tiny_run], data=fake)
