"""The ``callbacks`` group's own callbacks (the others are Lightning's, configured in ``conf/callbacks/``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

CURVES = (("loss", ("train/loss", "val/loss")), ("accuracy", ("train/acc", "val/acc")))


class LearningCurves(pl.Callback):
    """Records per-epoch train/val loss and accuracy and draws them to a PNG in the run directory.

    The history is also written as JSON next to the figure, and kept in the checkpoint so a resumed run
    continues its curves.

    Args:
        dirpath: folder of ``learning_curves.png`` and ``history.json``.
        filename: name of the figure.
    """

    def __init__(self, dirpath: str, filename: str = "learning_curves.png") -> None:
        self.dirpath = Path(dirpath)
        self.filename = filename
        self.history: list[dict[str, float]] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        row = {"epoch": trainer.current_epoch}
        row.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})
        self._upsert(row)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        row = {"epoch": trainer.current_epoch}
        row.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})
        self._upsert(row)

    def _upsert(self, row: dict[str, float]) -> None:
        if self.history and self.history[-1]["epoch"] == row["epoch"]:
            self.history[-1].update(row)
        else:
            self.history.append(row)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.history:
            self.save()

    def save(self) -> Path:
        """Writes ``history.json`` and the figure; returns the figure's path."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / "history.json").write_text(json.dumps(self.history, indent=1))
        fig, axes = plt.subplots(1, len(CURVES), figsize=(10, 4))
        for ax, (title, keys) in zip(axes, CURVES, strict=True):
            for key in keys:
                points = [(r["epoch"] + 1, r[key]) for r in self.history if key in r]
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=key)
            ax.set_xlabel("epoch")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        path = self.dirpath / self.filename
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
