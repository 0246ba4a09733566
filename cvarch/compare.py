"""``cvarch-compare models=[…]``: accuracy, parameters, operations, memory and speed of models side by side.

Canziani, Paszke & Culurciello 2017, "An Analysis of Deep Neural Network Models for Practical Applications"
(arXiv:1605.07678): Fig. 2 (top-1 against operations, bubble size ∝ parameters) and Fig. 3 (forward time
against batch size). :func:`compare` measures, :func:`run` also writes ``compare.csv`` and both plots.
Each model is built with its native dataset's classes (CIFAR-10's 10 for CIFAR nets, ImageNet's 1000 for the
others) unless ``num_classes`` is given, and counts the parameters its inference uses.
"""

from __future__ import annotations

import csv
import gc
import math
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure  # no pyplot: Agg canvas, no display, no global backend switch
from matplotlib.text import Annotation, Text
from matplotlib.transforms import Bbox
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch import nn

from cvarch.build import build_all, build_model
from cvarch.config import compose_nested
from cvarch.cost import profile_model
from cvarch.models import CIFAR_SIZE, meta_forward, native_size
from cvarch.plots import figure, legend_beside, save
from cvarch.runs import find_jobs

CSV_NAME = "compare.csv"
ACCURACY_PLOT = "accuracy_vs_gmacs.png"
TIME_PLOT = "forward_time_vs_batch_size.png"
IMAGENET_CLASSES = 1000
CIFAR_CLASSES = 10  # CIFAR-10, the dataset every CIFAR net of the zoo reports first (He 2015 Table 6, …)
MAX_BUBBLE = 2000  # points² of the largest model's bubble; areas are proportional to parameters


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


def native_num_classes(model_cfg: DictConfig) -> int:
    """The classes of the dataset a model config was designed for: 10 for a CIFAR net (one whose
    :func:`native_size` is 32×32, He 2015 §4.2), 1000 (ImageNet) for every other.

    Args:
        model_cfg: the ``model`` node of a composed config.
    """
    return CIFAR_CLASSES if native_size(model_cfg) == CIFAR_SIZE else IMAGENET_CLASSES


def inference_params(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Parameters of the modules an eval-mode forward calls: what inference uses and what published counts
    give. GoogLeNet's auxiliary classifiers (Szegedy 2014 §5, training only) are left out, as in torchvision's
    6,624,904 for its weights (they load with ``aux_logits=False``).

    Args:
        model: any ``nn.Module`` taking (N, C, H, W).
        input_shape: (C, H, W) of one image.
    """
    called: set[nn.Module] = set()
    handles = [m.register_forward_pre_hook(lambda m, args: called.add(m)) for m in model.modules()]
    try:
        meta_forward(model, (1, *input_shape))  # shapes only, no FLOP
    finally:
        for h in handles:
            h.remove()
    used = {id(p): p.numel() for m in called for p in m.parameters(recurse=False)}  # shared ones once
    return sum(used.values())


def describe_results(results: str | Path | None) -> str:
    """Where the top-1 figures come from, for the accuracy plot's caption.

    A CSV whose ``source`` column names torchvision's ``IMAGENET1K`` weights on every row (as
    ``scripts/torchvision_imagenet_top1.csv``) is "torchvision's published ImageNet top-1"; another CSV is
    "published top-1"; a folder is its cvarch-train runs.

    Args:
        results: what :func:`read_top1` reads, or ``None``.
    """
    if not results:
        return "no top-1 given (results=null)"
    path = Path(results).expanduser()
    if path.is_dir():
        return f"top-1: mean test/acc of the cvarch-train runs in {results}"
    with path.open(newline="") as f:
        sources = [(r.get("source") or "").strip() for r in csv.DictReader(f) if (r["top1"] or "").strip()]
    if sources and all(s.startswith("torchvision") and "IMAGENET1K" in s for s in sources):
        return f"top-1: torchvision's published ImageNet top-1 of its weights ({results})"
    return f"top-1: published figures from {results}"


def compare(
    models: Sequence[str],
    batch_sizes: Sequence[int] = (1, 8, 32),
    repeats: int = 10,
    warmup: int = 2,
    train_steps: int = 3,
    num_classes: int | None = None,
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
        num_classes: classifier outputs for every model; ``None`` = each model's
            :func:`native_num_classes` (10 for CIFAR nets, 1000 for ImageNet nets).
        image_size: square input side for every model; ``None`` = each model's :func:`native_size`.
        results: CSV or run folder for the top-1 column (:func:`read_top1`); ``None`` leaves it empty.
        device: ``auto``, ``cpu``, ``cuda``, ….

    Returns:
        One row per model: ``model``, ``image_size``, ``num_classes``, ``params`` (those inference uses:
        :func:`inference_params`), ``gmacs`` (batch 1), ``activations_mb``
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
        cfg = compose_nested(f"model={name}", "data.channels=3")
        classes = num_classes or native_num_classes(cfg.model)
        cfg.data.num_classes = classes  # the model's num_classes interpolates it
        size = image_size or native_size(cfg.model)
        cfg.data.image_size = size
        torch.manual_seed(0)
        model = build_model(cfg).to(dev).eval()
        totals = profile_model(model, (3, size, size)).totals  # the lecture's per-layer count
        row: dict[str, Any] = {
            "model": name,
            "image_size": size,
            "num_classes": classes,
            "params": inference_params(model, (3, size, size)),
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


def bubble_key(biggest: float) -> list[float]:
    """Up to three values of the 1–2.5–5 series for the bubble-size key: the largest ≤ ``biggest``, then each
    the largest ≤ ¼ of the one before (138M parameters → 100, 25, 5).

    Args:
        biggest: the largest model's parameters, in millions.
    """
    series = sorted(k * 10.0**e for e in range(-3, 5) for k in (1, 2.5, 5))
    keys: list[float] = []
    limit = biggest
    while len(keys) < 3 and any(v <= limit for v in series):
        keys.append(max(v for v in series if v <= limit))
        limit = keys[-1] / 4
    return keys


def _place_labels(fig: Figure, labels: Sequence[tuple[Annotation, float]]) -> None:
    """Moves each label, in order, to the first spot beside its bubble where it stays inside its axes and
    overlaps no label placed before it and no bubble: to the right, then the left, of the bubble, at 0, ±1,
    ±2, … label heights above or below it; where every spot touches a bubble, the first that overlaps no
    label; a label moved up or down gets a leader line to its bubble. Deterministic: the same rows give the
    same figure.

    The layout is computed once and then frozen, so the labels stay where they were checked.

    Args:
        fig: the figure.
        labels: each model's label, annotating its bubble's centre, and the bubble's radius in points.
    """
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    fig.set_layout_engine("none")  # keep the constrained layout just computed
    renderer = canvas.get_renderer()
    bubbles = []
    for label, radius in labels:
        x, y = label.axes.transData.transform(label.xy)
        r = radius * fig.dpi / 72
        bubbles.append(Bbox.from_extents(x - r, y - r, x + r, y + r))
    placed: list[Bbox] = []
    for label, _ in labels:
        frame = label.axes.get_window_extent(renderer)
        right = label.xyann[0]
        step = Text.get_window_extent(label, renderer).height * 72 / fig.dpi + 1  # points
        fits = []  # (overlaps a bubble, spot) of the spots inside the axes and clear of the labels
        for k in (0, 1, -1, 2, -2, 3, -3, 4, -4, 5, -5, 6, -6):
            for side in (1, -1):
                label.set_horizontalalignment("left" if side > 0 else "right")
                label.xyann = (side * right, k * step)
                box = Text.get_window_extent(label, renderer)
                inside = (
                    frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
                )
                if inside and not any(box.overlaps(other) for other in placed):
                    fits.append((any(box.overlaps(b) for b in bubbles), side, k * step))
        side, dy = min(fits, key=lambda f: f[0])[1:] if fits else (1, 0.0)  # min keeps the first of equals
        label.set_horizontalalignment("left" if side > 0 else "right")
        label.xyann = (side * right, dy)
        label.arrow_patch.set_visible(dy != 0)  # a leader line to a label moved above or below its bubble
        placed.append(Text.get_window_extent(label, renderer))


def accuracy_figure(rows: Sequence[Mapping[str, Any]], source: str = "") -> Figure:
    """Canziani 2017 Fig. 2: top-1 (%) against GMACs, bubble area ∝ parameters, one labelled bubble per model.

    Models without a top-1 are drawn as hollow bubbles on a strip below, at their GMACs, and named in the
    caption. Without any top-1, parameters (M) are plotted against GMACs instead, and the title says so. The
    x axis starts at 0, the labels are placed so that none overlaps another (:func:`_place_labels`), the
    bubble-size key and the caption sit outside the data.

    Args:
        rows: rows of :func:`compare`.
        source: where the top-1 figures come from (:func:`describe_results`), for the caption.
    """
    with_acc = [r for r in rows if r.get("top1") is not None]
    without = [r for r in rows if r.get("top1") is None] if with_acc else []
    fig = figure(9, 5.6)
    if without:
        ax, strip = fig.subplots(2, 1, sharex=True, height_ratios=[6, 1])
    else:
        ax, strip = fig.subplots(), None
    color = {r["model"]: f"C{i % 10}" for i, r in enumerate(rows)}
    scale = MAX_BUBBLE / (max(r["params"] for r in rows) or 1)  # points² per parameter
    labels = []

    def bubble(axes: Axes, r: Mapping[str, Any], y: float, hollow: bool) -> None:
        area = scale * r["params"]
        if hollow:
            axes.scatter(
                r["gmacs"], y, s=area, facecolors="none", edgecolors=color[r["model"]], linestyles="--"
            )
        else:
            axes.scatter(
                r["gmacs"], y, s=area, color=color[r["model"]], alpha=0.5, edgecolors="k", linewidths=0.5
            )
        offset = math.sqrt(area) / 2 + 2  # points: the bubble's radius and a gap
        leader = {"arrowstyle": "-", "color": "0.4", "lw": 0.5, "shrinkA": 1, "shrinkB": offset - 2}
        label = axes.annotate(  # the leader line shows only when the label is moved off its bubble's side
            r["model"], (r["gmacs"], y), xytext=(offset, 0), textcoords="offset points",
            ha="left", va="center", fontsize=8, arrowprops=leader,
        )  # fmt: skip
        labels.append((label, math.sqrt(area) / 2))

    for r in with_acc or rows:
        bubble(ax, r, r["top1"] if with_acc else r["params"] / 1e6, hollow=False)
    ax.set_xlim(0, 1.1 * max(r["gmacs"] for r in rows))  # operations are never negative
    ax.margins(y=0.12)
    ax.grid(True, alpha=0.3)
    ax.set_ylabel("top-1 accuracy [%]" if with_acc else "parameters [M]")
    for size in bubble_key(max(r["params"] for r in rows) / 1e6):
        ax.scatter([], [], s=scale * size * 1e6, facecolors="0.8", edgecolors="k", linewidths=0.5,
                   label=f"{size:g}M")  # fmt: skip
    legend_beside(ax, title="parameters\n(bubble area)", title_fontsize=8, labelspacing=2.5, borderpad=1.2,
                  handletextpad=1.5)  # fmt: skip
    if strip is not None:
        for r in without:
            bubble(strip, r, 0.5, hollow=True)
        strip.set_ylim(0, 1)
        strip.set_yticks([0.5], ["no top-1"], fontsize=8)
        strip.grid(True, axis="x", alpha=0.3)
    (strip or ax).set_xlabel("operations per image [GMACs, multiply-accumulates at batch 1]")
    title = "Top-1 accuracy vs. operations" if with_acc else "No top-1 given: parameters vs. operations"
    fig.suptitle(f"{title}, bubble area ∝ parameters (Canziani et al. 2017, Fig. 2)", fontsize=10)
    caption = [source or describe_results(None)]
    if without:
        names = ", ".join(r["model"] for r in without)
        caption.append(f"no top-1 for {names}: hollow bubbles on the strip below")
    caption.append("parameters: those inference uses (GoogLeNet's auxiliary heads not counted)")
    fig.supxlabel("\n".join(caption), fontsize=8, x=0.01, ha="left")
    _place_labels(fig, labels)
    return fig


def plot_accuracy(rows: Sequence[Mapping[str, Any]], path: str | Path, source: str = "") -> Path:
    """Writes :func:`accuracy_figure` to ``path``."""
    return save(accuracy_figure(rows, source), path)


def forward_time_figure(rows: Sequence[Mapping[str, Any]]) -> Figure:
    """Canziani 2017 Fig. 3: forward time per batch (ms, log scale) against batch size, one line per model,
    the legend beside the axes."""
    batch_sizes = sorted(
        int(k.removeprefix("forward_ms_bs")) for k in rows[0] if k.startswith("forward_ms_bs")
    )
    fig = figure(8, 5)
    ax = fig.subplots()
    for r in rows:
        ax.plot(batch_sizes, [r[f"forward_ms_bs{b}"] for b in batch_sizes], marker="o", label=r["model"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
    ax.set_yscale("log")
    ax.set_xlabel("batch size [images]")
    ax.set_ylabel("forward time per batch [ms], median")
    ax.grid(True, which="both", alpha=0.3)
    legend_beside(ax)
    fig.suptitle(
        f"Forward time vs. batch size on {rows[0]['device']} (Canziani et al. 2017, Fig. 3)", fontsize=10
    )
    return fig


def plot_forward_time(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Writes :func:`forward_time_figure` to ``path``."""
    return save(forward_time_figure(rows), path)


def print_table(rows: Sequence[Mapping[str, Any]], console: Console | None = None) -> None:
    """Prints the rows as a rich table, in Canziani 2017 Table 1's units."""
    batch_keys = [k for k in rows[0] if k.startswith("forward_ms_bs")]
    table = Table(title=f"cvarch-compare on {rows[0]['device']}")
    for header in ("model", "size", "classes", "params [M]", "GMACs", "act. [MB]"):
        table.add_column(header, justify="left" if header == "model" else "right")
    for key in batch_keys:
        table.add_column(f"fwd ms @{key.removeprefix('forward_ms_bs')}", justify="right")
    table.add_column(f"train img/s @{rows[0]['train_batch_size']}", justify="right")
    table.add_column("top-1 [%]", justify="right")
    for r in rows:
        table.add_row(
            r["model"],
            str(r["image_size"]),
            str(r["num_classes"]),
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
    plots = [
        plot_accuracy(rows, output_dir / ACCURACY_PLOT, describe_results(cfg.results)),
        plot_forward_time(rows, output_dir / TIME_PLOT),
    ]
    print_table(rows)
    _log_to_loggers(cfg, rows, plots)
    return rows


def cli(cfg: DictConfig) -> None:
    """``cvarch-compare models=[…]`` (:mod:`cvarch.cli`); the last line printed is the run directory."""
    run(cfg)
    print(cfg.paths.output_dir)


if __name__ == "__main__":  # python -m cvarch.compare, as torchrun, srun and DDP re-launches start it
    from cvarch.cli import compare

    compare()
