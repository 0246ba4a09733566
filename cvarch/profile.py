"""``cvarch-profile model=… [data.image_size=…] [output=table|json|csv]``: what a net costs, layer by layer.

Counted as the lecture's VGG16 table counts (CS231n 2017 lecture 9) by :func:`cvarch.cost.profile_model`,
whose module docstring states the rules; this module builds the model of a config and prints the table.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from cvarch.build import build_model
from cvarch.config import plain_config_errors, validate
from cvarch.cost import MB, Profile, profile_model, write_profile
from cvarch.models import native_size


def profile(cfg: DictConfig) -> Profile:
    """Builds ``cfg.model`` (no init: weights do not change the counts) and profiles it on
    ``data.channels`` × ``data.image_size``², or the model's native size (:func:`cvarch.models.native_size`)
    when ``data.image_size`` is unset. With ``measure_memory: false`` the model is built on the meta device:
    no memory, any size.

    Args:
        cfg: the ``profile`` root config (``@hydra.main``, or ``cvarch.compose(..., config_name="profile")``).
    """
    side = cfg.data.get("image_size") or native_size(cfg.model)
    with torch.device("cpu" if cfg.measure_memory else "meta"):
        model = build_model(cfg, initialize=False)
    if cfg.measure_memory and torch.cuda.is_available():
        model = model.cuda()
    return profile_model(
        model,
        (cfg.data.channels, side, side),
        batch_size=cfg.batch_size,
        dtype=getattr(torch, cfg.dtype),
        measure_memory=cfg.measure_memory,
    )


def print_table(prof: Profile, console: Console | None = None) -> None:
    """Prints the rows and totals as a rich table."""
    console = console or Console(width=160)
    t = prof.totals
    table = Table(title=f"{prof.model} on {'×'.join(map(str, t.input_shape))} (per image)")
    columns = ("layer", "type", "output", "activations", "MB fp32", "params", "no bias", "MACs", "RF", "jump")
    for column in columns:
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
    # the measurement is the peak above the weights of a forward + backward without an optimizer step: set it
    # beside the part of the estimate that counts the same things (activations and gradients)
    same = t.train_memory_estimate_mb - 2 * t.params * 4 / 1e6
    measured = (
        f"measured {t.measured_peak_mb:,.1f} MB above the weights ({t.measured_with}), against "
        f"{same:,.1f} MB estimated for the same (2 × activations + gradients)"
        if t.measured_peak_mb is not None
        else "not measured (measure_memory=false)"
    )
    console.print(
        f"depth {t.depth} (conv and FC layers on the longest path) | "
        f"params {t.params:,} ({t.params_no_bias:,} without biases) | activations {t.activations:,} "
        f"({t.activations_mb:.1f} MB fp32), with input {t.activations_with_input:,} "
        f"({t.activations_with_input_mb:.1f} MB) | MACs {t.macs:,} | FLOPs {t.flops:,} "
        f"(FlopCounterMode {t.flops_counter:,}, diff {t.flops_diff:,})\n"
        f"training step, batch {prof.batch_size}: estimate {t.train_memory_estimate_mb:,.1f} MB "
        f"(2 × activations in {prof.dtype} + weights, gradients and momentum in fp32)\n{measured}"
    )


def run(cfg: DictConfig) -> Profile:
    """Profiles ``cfg.model`` (:func:`profile`), writes ``profile.json`` or ``profile.csv`` to the run
    directory for ``output=json|csv``, and prints the table.

    Args:
        cfg: the ``profile`` root config.
    """
    validate(cfg)  # data.image_size=abc is named here, not by a tensor constructor deep in the model
    prof = profile(cfg)
    write_profile(prof, cfg.paths.output_dir, cfg.output)
    print_table(prof)
    return prof


def cli(cfg: DictConfig) -> None:
    """``cvarch-profile model=…``; prints the table, then the run directory as the last line."""
    with plain_config_errors("cvarch-profile"):
        run(cfg)
    print(cfg.paths.output_dir)


if __name__ == "__main__":  # python -m cvarch.profile, as torchrun, srun and DDP re-launches start it
    from cvarch.cli import profile

    profile()
