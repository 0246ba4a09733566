"""``cvarch-eval ckpt_path=… [data=…] [split=test|val|train] [tta=…]``: evaluate a checkpoint on one split."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from cvarch.build import (
    build_augment,
    build_datamodule,
    build_model,
    build_module,
    instantiate,
)
from cvarch.checkpoint import check_classes, load_checkpoint_file
from cvarch.config import CONFIG_DIR
from cvarch.module import ClassificationModule
from cvarch.train import write_metrics

SPLITS = ("test", "val", "train")


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], DictConfig]:
    """Loads a cvarch checkpoint with ``weights_only=True``; returns it and the run config it was trained with."""
    path = Path(path).expanduser()
    ckpt = load_checkpoint_file(path)
    if "hyper_parameters" not in ckpt or "model" not in ckpt["hyper_parameters"]:
        raise ValueError(
            f"ckpt_path: {path} was not written by cvarch-train (no run config in its hyperparameters)"
        )
    return ckpt, OmegaConf.create(ckpt["hyper_parameters"])


def load_module(
    ckpt: dict[str, Any],
    run_cfg: DictConfig,
    image_shape: tuple[int, int, int],
    tta: DictConfig | None = None,
) -> ClassificationModule:
    """Rebuilds a checkpoint's module (model, fitted preprocess, norm statistics) for images of ``image_shape``.

    Args:
        ckpt: the loaded checkpoint.
        run_cfg: the run config saved in it.
        image_shape: (C, H, W) of the evaluation images; the model sees the training crop of them.
        tta: a ``tta`` group node; ``None`` keeps the run's own.
    """
    augment = build_augment(run_cfg)
    model = build_model(run_cfg, image_shape=augment.output_shape(image_shape), initialize=False)
    module = build_module(run_cfg, model, augment=augment, tta=tta)
    module.load_state_dict(ckpt["state_dict"], strict=True)
    module.set_image_size(image_shape[-1])
    return module


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluates ``cfg.ckpt_path`` on ``cfg.split`` of the checkpoint's dataset, or of ``cfg.data`` if given.

    The model, its fitted preprocessing and its norm statistics all come from the checkpoint.

    Returns:
        The metrics written to ``metrics.json`` (``<split>/acc``, ``<split>/acc_top5``, ``<split>/loss``, …).
    """
    start = time.perf_counter()
    if cfg.split not in SPLITS:
        raise ValueError(f"split={cfg.split!r} is not one of {SPLITS}")
    ckpt, run_cfg = load_checkpoint(cfg.ckpt_path)
    data_cfg = OmegaConf.create(
        OmegaConf.to_container(cfg.data if cfg.get("data") else run_cfg.data, resolve=True)
    )
    check_classes(ckpt, cfg.ckpt_path, data_cfg.num_classes)
    datamodule = build_datamodule(OmegaConf.create({"data": data_cfg}))
    datamodule.setup("test")
    module = load_module(ckpt, run_cfg, datamodule.image_shape, tta=cfg.get("tta"))
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


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    """``cvarch-eval ckpt_path=…``; the last line printed is the run directory."""
    metrics = evaluate(cfg)
    print(metrics["output_dir"])


if __name__ == "__main__":
    main()
