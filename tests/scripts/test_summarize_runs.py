"""scripts/summarize_runs.py: groups runs by their overrides and reports mean ± std over seeds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "summarize_runs.py"


def fake_run(folder: Path, overrides: list[str], acc: float) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    metrics = {
        "test/acc": acc,
        "test/acc_top5": 1.0,
        "val/acc": acc,
        "train/loss": 0.1,
        "epochs": 3,
        "wall_s": 2.0,
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_rows_group_seeds_of_the_same_overrides(tmp_path):
    fake_run(tmp_path / "0", ["seed=0", "norm=none", f"paths.log_dir={tmp_path}"], 0.90)
    fake_run(tmp_path / "1", ["seed=1", "norm=none"], 0.92)
    fake_run(tmp_path / "2", ["seed=0", "norm=batchnorm"], 0.97)
    out = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, check=True
    )
    rows = {line.split("|")[1].strip(): line for line in out.stdout.splitlines()[2:]}
    assert set(rows) == {"norm=none", "norm=batchnorm"}
    assert "| 2 | 91.00 ± 1.41 |" in rows["norm=none"]  # mean ± sample std of 90 and 92
    assert "| 1 | 97.00 |" in rows["norm=batchnorm"]


def test_a_metric_missing_from_older_runs_prints_a_dash(tmp_path):
    fake_run(tmp_path / "0", ["seed=0"], 0.90)  # no test/acc_tta: written before the tta group existed
    out = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, check=True
    )
    header, _, row = out.stdout.splitlines()[:3]
    cells = dict(zip(header.split("|")[1:-1], row.split("|")[1:-1], strict=True))
    assert cells[" test acc (TTA) % "].strip() == "—" and cells[" test acc % "].strip() == "90.00"
