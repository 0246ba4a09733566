"""cvarch-eval reproduces what training reported, from the checkpoint alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import cvarch
from cvarch.eval import evaluate
from tests.conftest import malicious_checkpoint, run_cli


def eval_cfg(*overrides: str):
    return cvarch.compose(*overrides, config_name="eval")


@pytest.mark.slow
def test_eval_reproduces_the_test_and_val_accuracy_training_reported(default_run, tmp_path):
    trained = json.loads((default_run["output_dir"] / "metrics.json").read_text())
    # the console script once (its last line is the run directory), then in-process
    proc = run_cli(
        "cvarch-eval", f"ckpt_path={trained['best_ckpt']}", "split=test", f"paths.log_dir={tmp_path}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    by_cli = json.loads((Path(proc.stdout.strip().splitlines()[-1]) / "metrics.json").read_text())
    by_call = evaluate(
        eval_cfg(f"ckpt_path={trained['best_ckpt']}", "split=val", f"paths.log_dir={tmp_path}")
    )
    for split, metrics in (("test", by_cli), ("val", by_call)):
        assert metrics[f"{split}/acc"] == pytest.approx(trained[f"{split}/acc"], abs=1e-6)
        assert metrics[f"{split}/acc_top5"] == pytest.approx(trained[f"{split}/acc_top5"], abs=1e-6)


def test_eval_of_a_missing_checkpoint_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no checkpoint at {tmp_path}/none.ckpt"):
        evaluate(eval_cfg(f"ckpt_path={tmp_path}/none.ckpt", f"paths.log_dir={tmp_path}"))


@pytest.mark.slow
def test_eval_with_other_test_time_views_keeps_the_plain_accuracy(default_run, tmp_path):
    trained = json.loads((default_run["output_dir"] / "metrics.json").read_text())
    metrics = evaluate(eval_cfg(f"ckpt_path={trained['best_ckpt']}", "tta=flip", f"paths.log_dir={tmp_path}"))
    assert metrics["test/acc"] == pytest.approx(trained["test/acc"], abs=1e-6)  # the center view, as trained
    assert trained["test/acc_tta"] == trained["test/acc"]  # the run itself had tta=none: one view
    assert 0.5 < metrics["test/acc_tta"] <= 1.0  # flipped digits: mirror images the net never saw


def test_a_checkpoint_whose_unpickling_would_run_code_is_refused_and_nothing_runs(tmp_path):
    from cvarch.checkpoint import load_trained

    path, marker = malicious_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"ckpt_path: .*evil.ckpt cannot be loaded with weights_only=True"):
        load_trained(path)
    with pytest.raises(ValueError, match="cannot be loaded with weights_only=True"):
        evaluate(eval_cfg(f"ckpt_path={path}", f"paths.log_dir={tmp_path}"))
    assert not marker.exists()


def test_eval_on_data_with_another_number_of_classes_is_refused_naming_both(tiny_run, tmp_path):
    cfg = eval_cfg(f"ckpt_path={tiny_run}/checkpoints/last.ckpt", "data=fake", "data.num_classes=4",
                   f"paths.log_dir={tmp_path}")  # fmt: skip
    with pytest.raises(
        ValueError, match=r"ckpt_path: .*last.ckpt was trained for 10 classes but this run's data has 4"
    ):
        evaluate(cfg)
