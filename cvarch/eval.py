"""``cvarch-eval ckpt_path=… [data=…] [split=test|val|train] [tta=…]``: evaluate a checkpoint on one split."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from cvarch.build import build_trained, instantiate
from cvarch.checkpoint import write_metrics
from cvarch.config import plain_config_errors
from cvarch.data import SPLITS


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluates ``cfg.ckpt_path`` on ``cfg.split`` of the checkpoint's dataset, or of ``cfg.data`` if given.

    The model, its fitted preprocessing and its norm statistics all come from the checkpoint. Its saved config
    is data: only cvarch's own targets, the installed plugins' and those of the ``trust`` packages are built.

    Returns:
        The metrics written to ``metrics.json`` (``<split>/acc``, ``<split>/acc_top5``, ``<split>/loss``, …).
    """
    start = time.perf_counter()
    if cfg.split not in SPLITS:
        raise ValueError(f"split={cfg.split!r} is not one of {SPLITS}")
    module, datamodule, _, _ = build_trained(
        cfg.ckpt_path, data=cfg.get("data"), tta=cfg.get("tta"), trust=cfg.get("trust")
    )
    module.eval_split = cfg.split
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    results = trainer.test(module, dataloaders=datamodule.dataloader(cfg.split), verbose=True)[0]
    metrics = {
        **{k: float(v) for k, v in results.items()},
        "split": cfg.split,
        "ckpt_path": str(Path(cfg.ckpt_path).resolve()),
        "params": sum(p.numel() for p in module.model.parameters()),
        "wall_s": round(time.perf_counter() - start, 2),
        "output_dir": str(output_dir),
    }
    write_metrics(metrics, output_dir)
    return metrics


def cli(cfg: DictConfig) -> None:
    """``cvarch-eval ckpt_path=…``; the last line printed is the run directory."""
    with plain_config_errors("cvarch-eval"):
        metrics = evaluate(cfg)
    print(metrics["output_dir"])


if __name__ == "__main__":  # python -m cvarch.eval, as torchrun, srun and DDP re-launches start it
    from cvarch.cli import evaluate

    evaluate()
