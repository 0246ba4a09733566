"""LearningCurves: per-epoch history, the PNG, and resumable state."""

from __future__ import annotations

import json

import matplotlib.image

from cvarch.callbacks import LearningCurves


def test_history_is_saved_as_json_and_png(tmp_path):
    cb = LearningCurves(str(tmp_path))
    for epoch in range(3):
        cb._upsert({"epoch": epoch, "val/loss": 1.0 / (epoch + 1), "val/acc": 0.5 + 0.1 * epoch})
        cb._upsert({"epoch": epoch, "train/loss": 2.0 / (epoch + 1), "train/acc": 0.4 + 0.1 * epoch})
    path = cb.save()
    assert matplotlib.image.imread(path).shape[:2] == (400, 1000)
    rows = json.loads((tmp_path / "history.json").read_text())
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows[2]["train/loss"] == 2.0 / 3 and rows[2]["val/acc"] == 0.7

    resumed = LearningCurves(str(tmp_path))
    resumed.load_state_dict(cb.state_dict())
    assert resumed.history == cb.history
