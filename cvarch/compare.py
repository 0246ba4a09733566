"""``cvarch-compare models=[…]``: accuracy, parameters, operations, memory and speed of models side by side.

Canziani, Paszke & Culurciello 2017, "An Analysis of Deep Neural Network Models for Practical Applications"
(arXiv:1605.07678): Fig. 2 (top-1 against operations, bubble size ∝ parameters) and Fig. 3 (forward time
against batch size). :func:`compare` measures, :func:`run` also writes ``compare.csv`` and both plots.
"""

from __future__ import annotations

import csv
import gc
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.global_hydra import GlobalHydra
from matplotlib.figure import Figure  # no pyplot: Agg canvas, no display, no global backend switch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch import nn

from cvarch.build import build_all, build_model
from cvarch.config import CONFIG_PATH, compose
from cvarch.cost import profile_model
from cvarch.models import native_size
from cvarch.runs import find_jobs

CSV_NAME = "compare.csv"
ACCURACY_PLOT = "accuracy_vs_gmacs.png"
TIME_PLOT = "forward_time_vs_batch_size.png"


def resolve_device(device: str) -> torch.device:
    """``auto`` → ``cuda`` when available, else ``cpu``; anything else is passed to :class:`torch.device`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def time_ms(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> list[float]:
    """Wall-clock milliseconds of ``repeats`` calls of ``fn``, after ``warmup`` untimed ones.

    CUDA runs asynchronously, so the device is synchronized before each clock read.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def train_images_per_s(
    model: nn.Module, image_size: int, batch_size: int, steps: int, warmup: int, device: torch.device
) -> float:
    """Training throughput: SGD steps (forward, cross-entropy, backward, update) on random images and labels.

    Auxiliary classifiers (GoogLeNet, Szegedy 2014 §5) add their losses, as in training.
    """
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    num_classes = None

    def step() -> None:
        nonlocal num_classes
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        outputs = out if isinstance(out, tuple) else (out,)
        if num_classes is None:
            num_classes = outputs[0].shape[1]
        y = torch.randint(0, num_classes, (batch_size,), device=device)
        sum(nn.functional.cross_entropy(o, y) for o in outputs).backward()
        optimizer.step()

    times = time_ms(step, steps, warmup, device)
    model.eval()
    return batch_size * steps / (sum(times) / 1e3)


def read_top1(results: str | Path) -> dict[str, float]:
    """Top-1 accuracy in % per model name, from a CSV of published figures or a folder of cvarch-train runs.

    A CSV needs the columns ``model`` and ``top1`` (in %, as papers and Canziani 2017 Table 1 give it). A
    folder is searched for run folders at any depth (:func:`cvarch.runs.find_jobs`); each finished run's model
    is the ``model`` choice recorded in its ``.hydra/hydra.yaml``, and ``test/acc`` is averaged over the runs
    (seeds) of each model.

    Args:
        results: path to the CSV file or to the folder.

    Raises:
        FileNotFoundError: if the path does not exist.
        ValueError: if the CSV lacks a column, or the folder holds no run that names its model.
    """
    path = Path(results).expanduser()
    if path.is_file():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = {"model", "top1"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(
                    f"results: {path} has no column {', '.join(sorted(missing))} (need model,top1)"
                )
            return {r["model"].strip(): float(r["top1"]) for r in reader if (r["top1"] or "").strip()}
    if not path.is_dir():
        raise FileNotFoundError(f"results: no CSV file or folder at {path}")
    accs: dict[str, list[float]] = defaultdict(list)
    for job in find_jobs(path):
        model = job.choices().get("model")
        acc = (job.metrics or {}).get("test/acc")
        if model and acc is not None:
            accs[model].append(100 * float(acc))
    if not accs:
        raise ValueError(f"results: no metrics.json with test/acc and .hydra/hydra.yaml under {path}")
    return {model: statistics.fmean(values) for model, values in accs.items()}


def _model_config(*overrides: str) -> DictConfig:
    """``cvarch.compose`` of the train config; inside ``cvarch-compare``'s own ``@hydra.main``, where Hydra is
    already initialized on the same conf/ folder and a second initialization is refused, that instance
    composes."""
    if GlobalHydra.instance().is_initialized():
        return hydra.compose(config_name="train", overrides=list(overrides))
    return compose(*overrides)


def compare(
    models: Sequence[str],
    batch_sizes: Sequence[int] = (1, 8, 32),
    repeats: int = 10,
    warmup: int = 2,
    train_steps: int = 3,
    num_classes: int = 1000,
    image_size: int | None = None,
    results: str | Path | None = None,
    device: str = "auto",
) -> list[dict[str, Any]]:
    """Measures each model as Canziani et al. 2017 §3 do: parameters, operations, memory, forward time, top-1.

    Args:
        models: names of conf/model/ options, e.g. ``["resnet18", "vgg16"]``.
        batch_sizes: images per timed forward pass.
        repeats: timed forward passes per batch size; the median is reported.
        warmup: untimed passes (and training steps) before timing.
        train_steps: timed SGD steps for training images/s, at the largest batch size ≤ 32 (else the
            smallest).
        num_classes: classifier outputs.
        image_size: square input side for every model; ``None`` = each model's :func:`native_size`.
        results: CSV or run folder for the top-1 column (:func:`read_top1`); ``None`` leaves it empty.
        device: ``auto``, ``cpu``, ``cuda``, ….

    Returns:
        One row per model: ``model``, ``image_size``, ``params``, ``gmacs`` (batch 1), ``activations_mb``
        (fp32, batch 1, 1 MB = 10⁶ bytes), ``forward_ms_bs<b>`` per batch size (median), ``train_batch_size``,
        ``train_images_per_s``, ``top1`` (%, or ``None``) and ``device``.
    """
    if not models:
        raise ValueError("models: give at least one conf/model/ name")
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes: expected positive integers, got {list(batch_sizes)}")
    if repeats < 1:
        raise ValueError(f"repeats: expected at least 1, got {repeats}")
    dev = resolve_device(device)
    top1 = read_top1(results) if results else {}
    batch_sizes = sorted(set(int(b) for b in batch_sizes))
    small = [b for b in batch_sizes if b <= 32]
    train_batch = max(small) if small else batch_sizes[0]
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    rows = []
    for name in models:
        cfg = _model_config(f"model={name}", "data.channels=3", f"data.num_classes={num_classes}")
        size = image_size or native_size(cfg.model)
        cfg.data.image_size = size
        torch.manual_seed(0)
        model = build_model(cfg).to(dev).eval()
        totals = profile_model(model, (3, size, size)).totals  # the lecture's per-layer count
        row: dict[str, Any] = {
            "model": name,
            "image_size": size,
            "params": totals.params,
            "gmacs": totals.flops_counter / 2 / 1e9,  # count_macs's figure (FlopCounterMode), same forward
            "activations_mb": totals.activations_mb,
        }
        for b in batch_sizes:
            x = torch.randn(b, 3, size, size, device=dev)
            with torch.no_grad():
                row[f"forward_ms_bs{b}"] = statistics.median(time_ms(partial(model, x), repeats, warmup, dev))
        row["train_batch_size"] = train_batch
        row["train_images_per_s"] = train_images_per_s(model, size, train_batch, train_steps, warmup, dev)
        row["top1"] = top1.get(name)
        row["device"] = device_name
        rows.append(row)
        del model
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Writes the rows of :func:`compare` as CSV; an empty cell for a missing top-1."""
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return path


def plot_accuracy(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Canziani 2017 Fig. 2: top-1 (%) against GMACs, bubble area ∝ parameters, one labelled bubble per model.

    Without any top-1, parameters (M) are plotted against GMACs instead, and the title says so.
    """
    with_acc = [r for r in rows if r.get("top1") is not None]
    plotted = with_acc or list(rows)
    ys = [r["top1"] if with_acc else r["params"] / 1e6 for r in plotted]
    fig = Figure(figsize=(7, 5), dpi=120)
    ax = fig.subplots()
    biggest = max(r["params"] for r in plotted) or 1
    for i, (r, y) in enumerate(zip(plotted, ys, strict=True)):
        area = 50 + 2000 * r["params"] / biggest
        ax.scatter(r["gmacs"], y, s=area, alpha=0.5, color=f"C{i % 10}", edgecolors="k", linewidths=0.5)
        ax.annotate(r["model"], (r["gmacs"], y), ha="center", va="center", fontsize=8)
    ax.set_xlabel("operations per image [GMACs]")
    if with_acc:
        ax.set_ylabel("top-1 accuracy [%]")
        left_out = len(rows) - len(with_acc)
        note = f" ({left_out} without top-1 left out)" if left_out else ""
        ax.set_title(f"Top-1 vs. operations, bubble size ∝ parameters{note}")
    else:
        ax.set_ylabel("parameters [M]")
        ax.set_title("No top-1 given: parameters vs. operations, bubble size ∝ parameters")
    ax.grid(True, alpha=0.3)
    ax.margins(0.15)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_forward_time(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Canziani 2017 Fig. 3: forward time per batch (ms, log scale) against batch size, one line per model."""
    batch_sizes = sorted(
        int(k.removeprefix("forward_ms_bs")) for k in rows[0] if k.startswith("forward_ms_bs")
    )
    fig = Figure(figsize=(7, 5), dpi=120)
    ax = fig.subplots()
    for r in rows:
        ax.plot(batch_sizes, [r[f"forward_ms_bs{b}"] for b in batch_sizes], marker="o", label=r["model"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
    ax.set_yscale("log")
    ax.set_xlabel("batch size [images]")
    ax.set_ylabel("forward time [ms]")
    ax.set_title(f"Forward time vs. batch size ({rows[0]['device']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def print_table(rows: Sequence[Mapping[str, Any]], console: Console | None = None) -> None:
    """Prints the rows as a rich table, in Canziani 2017 Table 1's units."""
    batch_keys = [k for k in rows[0] if k.startswith("forward_ms_bs")]
    table = Table(title=f"cvarch-compare on {rows[0]['device']}")
    for header in ("model", "size", "params [M]", "GMACs", "act. [MB]"):
        table.add_column(header, justify="left" if header == "model" else "right")
    for key in batch_keys:
        table.add_column(f"fwd ms @{key.removeprefix('forward_ms_bs')}", justify="right")
    table.add_column(f"train img/s @{rows[0]['train_batch_size']}", justify="right")
    table.add_column("top-1 [%]", justify="right")
    for r in rows:
        table.add_row(
            r["model"],
            str(r["image_size"]),
            f"{r['params'] / 1e6:.2f}",
            f"{r['gmacs']:.3f}",
            f"{r['activations_mb']:.1f}",
            *(f"{r[k]:.2f}" for k in batch_keys),
            f"{r['train_images_per_s']:.1f}",
            "" if r["top1"] is None else f"{r['top1']:.2f}",
        )
    # Piped output (logs, tests) gets a width no terminal limits, so no cell is cut to fit 80 columns.
    console = console or Console(width=None if sys.stdout.isatty() else 200)
    console.print(table)


def _log_to_loggers(cfg: DictConfig, rows: Sequence[Mapping[str, Any]], plots: Sequence[Path]) -> None:
    """W&B: the table as a wandb.Table and both plots as wandb.Image, then the run is finished."""
    for logger in build_all(cfg.get("logger")):
        if type(logger).__name__ == "WandbLogger":
            import wandb

            columns = list(rows[0])
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
            logger.experiment.log(
                {
                    "compare/table": wandb.Table(
                        columns=columns, data=[[r[c] for c in columns] for r in rows]
                    ),
                    **{f"compare/{p.stem}": wandb.Image(str(p)) for p in plots},
                }
            )
            logger.experiment.finish()
        else:
            logger.finalize("success")


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    """Measures ``cfg.models`` with :func:`compare`; writes ``compare.csv`` and the two plots of Canziani 2017
    (Figs 2 and 3) to the run directory, prints a table, and logs them to W&B when ``logger=wandb``.

    Args:
        cfg: the ``compare`` root config (from ``@hydra.main`` or
            ``cvarch.compose(..., config_name="compare")``).

    Returns:
        The rows of :func:`compare`.
    """
    OmegaConf.resolve(cfg)  # fixes paths.output_dir before the model configs are composed
    rows = compare(
        models=list(cfg.models),
        batch_sizes=list(cfg.batch_sizes),
        repeats=cfg.repeats,
        warmup=cfg.warmup,
        train_steps=cfg.train_steps,
        num_classes=cfg.num_classes,
        image_size=cfg.image_size,
        results=cfg.results,
        device=cfg.device,
    )
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, output_dir / CSV_NAME)
    plots = [plot_accuracy(rows, output_dir / ACCURACY_PLOT), plot_forward_time(rows, output_dir / TIME_PLOT)]
    print_table(rows)
    _log_to_loggers(cfg, rows, plots)
    return rows


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="compare")
def main(cfg: DictConfig) -> None:
    """``cvarch-compare models=[…]``; the last line printed is the run directory."""
    run(cfg)
    print(cfg.paths.output_dir)


if __name__ == "__main__":
    main()
