"""``cvarch-profile model=… [data.image_size=…] [output=table|json|csv]``: what a net costs, layer by layer.

Counted the way the lecture's VGG16 table counts (Stanford CS231n 2017, lecture 9, "VGGNet" slide; Simonyan &
Zisserman 2014 Table 1) by :func:`cvarch.cost.profile_model`, whose module docstring states the rules; this module
builds the model of a config, writes ``profile.json`` or ``profile.csv`` and prints the table.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from cvarch.build import build_model
from cvarch.config import CONFIG_PATH, compose
from cvarch.cost import MB, Profile, Row, profile_model
from cvarch.models import native_size

# Figures as the lecture slides quote them (CS231n 2017 lecture 9), for the README to set against the measured ones.
LECTURE = {
    "vgg16_activations": 24_000_000,  # "TOTAL memory: 24M * 4 bytes ~= 96MB / image"
    "vgg16_activation_mb": 96,
    "vgg16_params": 138_000_000,  # "TOTAL params: 138M parameters"
    "inception_naive_macs": 854_000_000,  # "Total: 854M ops"
    "inception_reduced_macs": 358_000_000,  # "Total: 358M ops" (counts the 3×3 conv, 86.7M, twice)
    "googlenet_fewer_params_than_alexnet": 12,  # "12x less params than AlexNet" (Szegedy 2016 §1: 5M vs 60M)
}


def input_shape_of(cfg: DictConfig) -> tuple[int, int, int]:
    """(C, H, W) to profile: ``data.image_size`` if set, else the model's native size
    (:func:`cvarch.models.native_size`: its config's own ``image_size``, 32 for CIFAR nets, 224 otherwise)."""
    side = cfg.data.get("image_size") or native_size(cfg.model)
    return cfg.data.channels, side, side


def profile_config(cfg: DictConfig) -> Profile:
    """Builds ``cfg.model`` (no init: weights do not change the counts) and profiles it.

    With ``measure_memory: false`` the model is built on the meta device: no memory, any size.
    """
    with torch.device("cpu" if cfg.measure_memory else "meta"):
        model = build_model(cfg, initialize=False)
    if cfg.measure_memory and torch.cuda.is_available():
        model = model.cuda()
    return profile_model(
        model,
        input_shape_of(cfg),
        batch_size=cfg.batch_size,
        dtype=getattr(torch, cfg.dtype),
        measure_memory=cfg.measure_memory,
    )


def profile(*overrides: str) -> Profile:
    """The profile ``cvarch-profile <overrides>`` computes, e.g. ``profile("model=vgg16", "data.image_size=224")``.

    Args:
        *overrides: Hydra overrides of ``conf/profile.yaml``.
    """
    return profile_config(compose(*overrides, config_name="profile"))


def write_profile(prof: Profile, output_dir: str | Path, output: str) -> Path | None:
    """Writes ``profile.json`` (rows and totals) or ``profile.csv`` (the rows) for ``output`` json or csv.

    Returns:
        The file written, or ``None`` for ``output=table``.
    """
    if output not in ("table", "json", "csv"):
        raise ValueError(f"output={output!r} is not one of ['table', 'json', 'csv']")
    if output == "table":
        return None
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"profile.{output}"
    if output == "json":
        path.write_text(json.dumps(prof.to_dict(), indent=2) + "\n")
    else:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[f.name for f in dataclasses.fields(Row)])
            writer.writeheader()
            for row in prof.rows:
                writer.writerow({**dataclasses.asdict(row), "shape": "x".join(map(str, row.shape))})
    return path


def print_table(prof: Profile, console: Console | None = None) -> None:
    """Prints the rows and totals as a rich table."""
    console = console or Console(width=160)
    t = prof.totals
    table = Table(title=f"{prof.model} on {'×'.join(map(str, t.input_shape))} (per image)")
    for column in (
        "layer",
        "type",
        "output",
        "activations",
        "MB fp32",
        "params",
        "no bias",
        "MACs",
        "RF",
        "jump",
    ):
        table.add_column(column, justify="left" if column in ("layer", "type") else "right")
    for r in prof.rows:
        table.add_row(
            r.name,
            r.type,
            "×".join(map(str, r.shape)),
            f"{r.activations:,}",
            f"{r.bytes_fp32 / MB:.2f}",
            f"{r.params:,}",
            f"{r.params_no_bias:,}",
            f"{r.macs:,}",
            str(r.rf),
            str(r.jump),
        )
    console.print(table)
    measured = (
        f"{t.measured_peak_mb:,.1f} MB measured ({t.measured_with})"
        if t.measured_peak_mb is not None
        else "—"
    )
    console.print(
        f"params {t.params:,} ({t.params_no_bias:,} without biases) | activations {t.activations:,} "
        f"({t.activations_mb:.1f} MB fp32), with input {t.activations_with_input:,} "
        f"({t.activations_with_input_mb:.1f} MB) | MACs {t.macs:,} | FLOPs {t.flops:,} "
        f"(FlopCounterMode {t.flops_counter:,}, diff {t.flops_diff:,})\n"
        f"training step, batch {prof.batch_size}: estimate {t.train_memory_estimate_mb:,.1f} MB "
        f"(2 × activations in {prof.dtype} + 3 × fp32 parameters) | {measured}"
    )


def vgg16_activations() -> dict[str, float]:
    """VGG16's forward activations at 224×224, computed, next to the lecture's "24M · 4 bytes ≈ 96MB / image".

    The lecture's own rows (CS231n 2017 lecture 9) sum to about 15.2M; its total does not.
    """
    t = profile(
        "model=vgg16",
        "data.channels=3",
        "data.num_classes=1000",
        "data.image_size=224",
        "measure_memory=false",
    ).totals
    return {
        "activations": t.activations,
        "activations_with_input": t.activations_with_input,
        "mb": t.activations_mb,
        "mb_with_input": t.activations_with_input_mb,
        "lecture_activations": LECTURE["vgg16_activations"],
        "lecture_mb": LECTURE["vgg16_activation_mb"],
    }


def inception_module_macs(inception: str) -> int:
    """Conv MACs of the lecture's Inception module on 28×28×256 (Szegedy 2014 Fig. 2), ``naive`` or ``reduced``."""
    return profile(
        "model=inception_module",
        f"model.inception={inception}",
        "data.channels=256",
        "data.image_size=28",
        "measure_memory=false",
    ).totals.macs


def googlenet_alexnet_param_ratio() -> dict[str, float]:
    """Parameters of the lecture's AlexNet over those of the paper's GoogLeNet without auxiliary classifiers.

    The lecture's "12x less params than AlexNet" is Szegedy et al. 2014 §1 ("12× fewer"), which Szegedy et al. 2016
    (Inception-v3, §1) spells out as 5M against AlexNet's 60M; the nets as built here give about 8.9.
    """
    common = ("data.channels=3", "data.num_classes=1000", "measure_memory=false")
    alexnet = profile("model=alexnet", "data.image_size=227", *common).totals.params
    googlenet = profile(
        "model=googlenet", "model.aux_logits=false", "data.image_size=224", *common
    ).totals.params
    return {"alexnet": alexnet, "googlenet": googlenet, "ratio": alexnet / googlenet}


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="profile")
def main(cfg: DictConfig) -> None:
    """``cvarch-profile model=…``; prints the table, then the run directory as the last line."""
    prof = profile_config(cfg)
    write_profile(prof, cfg.paths.output_dir, cfg.output)
    print_table(prof)
    print(cfg.paths.output_dir)


if __name__ == "__main__":
    main()
