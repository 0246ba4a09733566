"""The ``callbacks`` group's own callbacks (the others are Lightning's, configured in ``conf/callbacks/``)."""

from __future__ import annotations

import json
import math
import textwrap
import time
from collections.abc import Sequence
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from matplotlib.figure import Figure
from pytorch_lightning.callbacks import EMAWeightAveraging, RichModelSummary, RichProgressBar, WeightAveraging
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.model_summary import get_human_readable_count
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchmetrics.classification import MulticlassConfusionMatrix

from cvarch.models import meta_forward
from cvarch.plots import figure, integer_epochs, legend_beside, run_title, save

# panel title, y-axis label (with its unit), the history keys drawn
CURVES = (
    ("loss", "cross-entropy", ("train/loss", "val/loss")),
    ("accuracy", "accuracy (fraction)", ("train/acc", "val/acc")),
)


def _title(pl_module: Any = None) -> str:
    """The title naming the run (:func:`cvarch.plots.run_title`); outside a Hydra job, the model's class."""
    title = run_title()
    if title or pl_module is None:
        return title
    return type(getattr(pl_module, "model", pl_module)).__name__


def _choices() -> dict[str, str]:
    """The running Hydra job's config-group choices (``runtime.choices``); ``{}`` outside a Hydra job."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return dict(HydraConfig.get().runtime.choices)
    except ValueError:  # no Hydra job (plain Python, a spawned DDP process)
        return {}


class LearningCurves(pl.Callback):
    """Records per-epoch train/val loss and accuracy and draws them to a PNG in the run directory.

    The history is also written as JSON next to the figure, and kept in the checkpoint so a resumed run
    continues its curves. The figure's title names the run (:func:`cvarch.plots.run_title`).

    Args:
        dirpath: folder of ``learning_curves.png`` and ``history.json``.
        filename: name of the figure.
    """

    def __init__(self, dirpath: str, filename: str = "learning_curves.png") -> None:
        self.dirpath = Path(dirpath)
        self.filename = filename
        self.history: list[dict[str, float]] = []
        self.title = ""  # set when the fit starts, where the module is known

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.title = _title(pl_module)

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

    def draw(self) -> Figure:
        """The loss and accuracy panels, epochs 1-based on whole-epoch ticks, legends beside the data."""
        fig = figure(11, 4)
        for ax, (name, unit, keys) in zip(fig.subplots(1, len(CURVES)), CURVES, strict=True):
            for key in keys:
                points = [(r["epoch"] + 1, r[key]) for r in self.history if key in r]
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=key)
            integer_epochs(ax)
            ax.set_ylabel(unit)
            ax.set_title(name)
            ax.grid(alpha=0.3)
            legend_beside(ax)
        return fig

    def save(self) -> Path:
        """Writes ``history.json`` and the figure; returns the figure's path."""
        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / "history.json").write_text(json.dumps(self.history, indent=1))
        return save(self.draw(), self.dirpath / self.filename, title=self.title or run_title(), dpi=100)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))


class DivergenceError(RuntimeError):
    """Training diverged: a non-finite loss, or non-finite weights before a checkpoint."""


class DivergenceGuard(pl.Callback):
    """Stops a run at the first non-finite training loss, before its backward pass, so the weights the last
    checkpoint holds stay the last finite ones; and refuses to checkpoint non-finite weights.

    The loss check costs one device-to-host bool per micro-batch (a sync on GPU): stopping at the step itself,
    before the optimizer applies NaN gradients, needs the answer before ``backward``. The weights are checked
    once per validation and once per training epoch, before ``ModelCheckpoint`` (which Lightning always runs
    after the other callbacks) can save them: a finite loss with an infinite gradient leaves NaN weights that
    only the next step's loss would show.
    """

    def __init__(self) -> None:
        self.last_finite: tuple[int, torch.Tensor] | None = None  # (global step, loss), kept on the device

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        if bool(torch.isfinite(loss)):
            self.last_finite = (trainer.global_step, loss.detach())
            return
        if self.last_finite is None:
            last = "no finite loss before it"
        else:
            last = f"last finite loss {float(self.last_finite[1]):.6g} at global step {self.last_finite[0]}"
        raise DivergenceError(
            f"training diverged: loss is {float(loss.detach())} at global step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}); {last}. The last checkpoint written before this step is kept; "
            "lower optimizer.lr or set trainer.gradient_clip_val"
        )

    def state_dict(self) -> dict[str, Any]:
        """The last finite loss, so a resumed run that diverges still names it."""
        if self.last_finite is None:
            return {}
        return {"last_finite_step": self.last_finite[0], "last_finite_loss": float(self.last_finite[1])}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "last_finite_step" in state_dict:
            loss = torch.tensor(state_dict["last_finite_loss"])
            self.last_finite = (state_dict["last_finite_step"], loss)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:  # fit's validation, not validate()
            self._check_weights(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_weights(trainer, pl_module)

    def _check_weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tensors = [t for t in pl_module.state_dict().values() if t.is_floating_point()]
        if not tensors or bool(torch.stack([t.isfinite().all() for t in tensors]).all()):
            return
        bad = [
            k for k, t in pl_module.state_dict().items() if t.is_floating_point() and not t.isfinite().all()
        ]
        raise DivergenceError(
            f"training diverged: non-finite weights at global step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}): {', '.join(bad[:5])}{' …' if len(bad) > 5 else ''}; not "
            "checkpointed. The last checkpoint written before this is kept; lower optimizer.lr or set "
            "trainer.gradient_clip_val"
        )


ACTIVATIONS = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.GELU, nn.ELU, nn.SiLU)


def _init_name(pl_module: Any) -> str:
    """The ``init`` group's option (Hydra's choice, else its class), with its std where it has one: the
    lecture's N(0, 0.01) and N(0, 1) are both ``init=normal``."""
    init = dict(getattr(pl_module, "hparams", None) or {}).get("init") or {}
    name = _choices().get("init") or str(init.get("_target_", "the model's own")).rsplit(".", 1)[-1]
    return f"{name} (std {init['std']:g})" if "std" in init else name


class ActivationStats(pl.Callback):
    """Per-layer activation statistics and gradient norms, as the lecture's initialization study plots them.

    Stanford CS231n 2017, lecture 6, "Weight Initialization" slides (after Glorot & Bengio 2010, Fig. 6).
    At the first training step and every ``every_n_steps`` after it, the output of every activation module
    (the lecture's hidden layers ``H = f(W·X)``) is recorded: mean, std, the fraction saturated
    (``|a| > saturation``), a histogram and the fraction of values outside its range; after that step's
    backward, the gradient norm of each conv/linear layer's weights ("think about the backward pass: what do
    the gradients look like?"). Written to ``activation_stats.json`` and drawn to ``activation_stats.png``:
    per-layer mean, std and weight-gradient norm of the first record, then its per-layer histograms, under a
    title naming the run, the init and the activation; each record also goes to W&B as histograms when it
    is on.

    The histograms of one record share one range, so a collapse shows as a narrowing spike. By default it is
    the range of all layers' values, so every value is counted; a fixed ``hist_range`` (the lecture's
    ``plt.hist(H, 30, range=(-1, 1))``) clips, and the share of each layer's values it leaves out is recorded
    (``outside``) and printed on its histogram.

    Args:
        dirpath: folder of the JSON and PNG files.
        every_n_steps: record period in optimizer steps (the first step is always recorded).
        bins: histogram bins.
        saturation: |activation| above which a unit counts as saturated (tanh: 0.95).
        hist_range: ``(low, high)`` of every histogram; ``None``: the range of all layers' values at the step.
    """

    def __init__(
        self,
        dirpath: str,
        every_n_steps: int = 100,
        bins: int = 30,
        saturation: float = 0.95,
        hist_range: Sequence[float] | None = None,
    ) -> None:
        if hist_range is not None and not float(hist_range[0]) < float(hist_range[1]):
            raise ValueError(f"callbacks.activation_stats.hist_range must be [low, high], got {hist_range}")
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.bins = bins
        self.saturation = saturation
        self.hist_range = (float(hist_range[0]), float(hist_range[1])) if hist_range is not None else None
        self.records: list[dict[str, Any]] = []
        self.title = ""  # the run, the init: set when the fit starts
        self.init = ""
        self._hooks: list[Any] = []
        self._outputs: list[tuple[str, str, torch.Tensor]] = []  # (name, type, output) of the recorded step
        self._current: dict[str, Any] | None = None

    def _layers(self, pl_module: pl.LightningModule) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in pl_module.model.named_modules() if isinstance(m, ACTIVATIONS)]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.title = _title(pl_module)
        self.init = _init_name(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or (self.records and self.records[-1]["step"] == step):
            return  # not a record step, or its first micro-batch (gradient accumulation) was recorded
        self._current = {"step": step, "layers": []}
        for name, module in self._layers(pl_module):
            self._hooks.append(module.register_forward_hook(self._recorder(name)))

    def _recorder(self, name: str):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            # a copy: an in-place op later in the forward must not change what is counted
            self._outputs.append((name, type(module).__name__, output.detach().float().clone()))

        return hook

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        if self._current is None or not self._hooks:
            return
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._current["layers"] = self.layer_stats(self._outputs)
        self._outputs = []  # freed before the backward pass needs the memory

    def layer_stats(self, outputs: Sequence[tuple[str, str, torch.Tensor]]) -> list[dict[str, Any]]:
        """A record's layers from ``(name, module type, output)`` triples; histograms on one shared range."""
        if not outputs:
            return []
        if self.hist_range is not None:
            low, high = self.hist_range
        else:
            low = min(float(a.min()) for _, _, a in outputs)
            high = max(float(a.max()) for _, _, a in outputs)
            if high <= low:  # every value the same: a unit-wide range around it
                low, high = low - 0.5, high + 0.5
        layers = []
        for name, kind, a in outputs:
            layers.append(
                {
                    "name": name,
                    "type": kind,
                    "mean": float(a.mean()),
                    "std": float(a.std()),
                    "saturated": float((a.abs() > self.saturation).float().mean()),
                    "hist": torch.histc(a, bins=self.bins, min=low, max=high).tolist(),
                    "range": [low, high],
                    "outside": float(((a < low) | (a > high)).float().mean()),  # not in the histogram
                }
            )
        return layers

    def on_after_backward(self, trainer, pl_module) -> None:
        if self._current is None:
            return
        weights = [m.weight for m in pl_module.model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        norms = [float(w.grad.norm()) if w.grad is not None else 0.0 for w in weights]
        self._current["grad_norms"] = norms
        self.records.append(self._current)
        self._log_wandb(trainer, self._current)
        self._current = None

    def _log_wandb(self, trainer: pl.Trainer, record: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                import wandb

                data = {}
                for layer in record["layers"]:
                    edges = torch.linspace(*layer["range"], self.bins + 1).tolist()
                    data[f"activations/{layer['name']}"] = wandb.Histogram(
                        np_histogram=(layer["hist"], edges)
                    )
                    data[f"activation_std/{layer['name']}"] = layer["std"]
                logger.log_metrics(
                    data, step=record["step"]
                )  # keyed by trainer/global_step, as Lightning logs

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.records:
            self.save()

    def save(self) -> Path:
        """Writes ``activation_stats.json`` and the lecture-style figure; returns the figure's path."""
        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / "activation_stats.json").write_text(json.dumps(self.records))
        record = self.records[0]
        kinds = sorted({layer.get("type", "?") for layer in record["layers"]})
        about = f"init: {self.init or '?'} · activation: {', '.join(kinds) or 'none'} · step {record['step']}"
        title = "\n".join(part for part in (self.title or run_title(), about) if part)
        return save(self.draw(), self.dirpath / "activation_stats.png", title=title, dpi=90)

    def draw(self, index: int = 0) -> Figure:
        """Record ``index``: per-layer mean, std and weight-gradient norm, then the per-layer histograms."""
        record = self.records[index]
        layers, norms = record["layers"], record.get("grad_norms", [])
        n = len(layers)
        fig = figure(max(12.0, 1.2 * n), 7.0)
        top, bottom = fig.subfigures(2, 1, height_ratios=[1.1, 1.0])
        mean_ax, std_ax, grad_ax = top.subplots(1, 3)
        x = range(1, n + 1)
        means, stds = [layer["mean"] for layer in layers], [layer["std"] for layer in layers]
        # fixed spans, so a flat curve looks flat: std from 0, the mean on the scale of the spread (±max std)
        span = 1.1 * max([abs(m) for m in means] + stds, default=0.0) or 1.0
        mean_ax.plot(x, means, "o-", color="C0")
        mean_ax.axhline(0.0, color="grey", linewidth=0.5)
        mean_ax.set_ylim(-span, span)
        mean_ax.set(title="layer mean", ylabel="mean activation")
        std_ax.plot(x, stds, "o-", color="C3")
        std_ax.set_ylim(0.0, 1.1 * max(stds, default=0.0) or 1.0)
        std_ax.set(title="layer std", ylabel="activation std")
        grad_ax.plot(range(1, len(norms) + 1), norms, "o-", color="C2")
        if norms and min(norms) > 0 and max(norms) / min(norms) > 100:  # vanishing or exploding: log scale
            grad_ax.set(yscale="log", ylabel="‖∂L/∂W‖₂ (log scale)")
        else:
            grad_ax.set(ylim=(0.0, 1.1 * max(norms, default=0.0) or 1.0), ylabel="‖∂L/∂W‖₂")
        grad_ax.set_title("weight gradient norm")
        for ax, label in ((mean_ax, "layer"), (std_ax, "layer"), (grad_ax, "conv/linear layer")):
            integer_epochs(ax, label)
            ax.grid(alpha=0.3)
        hist_axes = bottom.subplots(1, max(n, 1), sharex=True, squeeze=False)[0]
        for i, (ax, layer) in enumerate(zip(hist_axes, layers, strict=False)):
            low, high = layer["range"]
            width = (high - low) / len(layer["hist"])
            ax.bar(
                [low + k * width for k in range(len(layer["hist"]))], layer["hist"], width=width, align="edge"
            )
            label = f"{i + 1}: std {layer['std']:.2g}"
            if layer.get("outside", 0.0) > 0:
                label += f"\n{layer['outside']:.0%} outside"
            ax.set_title(label, fontsize=7)
            ax.set_yticks([])
            ax.tick_params(labelsize=6)
        low, high = layers[0]["range"] if layers else (0.0, 0.0)
        bottom.supxlabel(f"activation value (one range for all layers: [{low:.3g}, {high:.3g}])", fontsize=8)
        bottom.supylabel("units", fontsize=8)
        return fig

    def state_dict(self) -> dict[str, Any]:
        return {"records": self.records}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records = list(state_dict.get("records", []))


class AugmentationGrid(pl.Callback):
    """Saves the first training batch the model sees, augmented, as a PNG grid: a look at what training sees.

    The ``augment`` group runs on the device in the module's ``on_after_batch_transfer``, so the batch given
    to ``on_train_batch_start`` is already augmented. Saved once, on rank zero; uint8 and float [0, 1] images
    both work (float values outside [0, 1], e.g. after PCA colour, are clipped for display only). Images are
    enlarged by an integer factor, nearest-neighbour, to at least ``TILE_PX`` pixels a side, and drawn one
    image pixel to one PNG pixel, each with its class (soft targets, mixup/cutmix: the dominant class and its
    weight) under a title naming the run and the augmentation ops, wrapped to the grid's width.

    Args:
        dirpath: folder of the PNG (the run directory).
        filename: name of the PNG.
        num_images: first images of the batch shown.
        nrow: images per row of the grid.
    """

    TILE_PX = 96  # smallest drawn side of an image: 8×8 digits ×12, 32×32 CIFAR ×3
    PADDING = 2  # pixels between images (torchvision's make_grid default)
    DPI = 100
    LINE_PX = 18  # height of a title line; the title is wrapped to the grid's width

    def __init__(
        self, dirpath: str, filename: str = "augment_grid.png", num_images: int = 64, nrow: int = 8
    ) -> None:
        if num_images < 1:
            raise ValueError(f"callbacks.augmentation_grid.num_images must be >= 1, got {num_images}")
        if nrow < 1:
            raise ValueError(f"callbacks.augmentation_grid.nrow must be >= 1, got {nrow}")
        self.dirpath = Path(dirpath)
        self.filename = filename
        self.num_images = num_images
        self.nrow = nrow
        self.saved = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.saved:
            return
        self.saved = True
        if trainer.is_global_zero:
            augment = getattr(pl_module, "augment", None)
            ops = ", ".join(augment.ops) if augment is not None else ""
            title = "\n".join(
                part
                for part in (_title(pl_module), f"first training batch, augment: {ops or 'none'}")
                if part
            )
            classes = getattr(getattr(trainer, "datamodule", None), "classes", None)
            rank_zero_info(f"augmented training images: {self.save(batch[0], batch[1], classes, title)}")

    def save(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        classes: Sequence[str] | None = None,
        title: str = "",
    ) -> Path:
        """Draws the first ``num_images`` of a uint8 or float [0, 1] (N, C, H, W) batch with their labels
        (class indices, or (N, K) soft targets) to the PNG; returns its path.

        Args:
            images: the batch.
            labels: its targets; ``None`` draws no labels.
            classes: class names by index; ``None`` writes the indices.
            title: the figure's title.
        """
        from torchvision.utils import make_grid

        images = images[: self.num_images].detach().cpu()
        images = images.float().div(255.0) if images.dtype == torch.uint8 else images.float().clamp(0.0, 1.0)
        scale = max(1, math.ceil(self.TILE_PX / min(images.shape[-2:])))
        images = nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
        grid = make_grid(images, nrow=self.nrow, padding=self.PADDING, pad_value=1.0)  # (3, H, W)
        height, width = grid.shape[1:]
        chars = max(40, width // 8)  # characters of a 10-point line across the grid (~7.6 px each)
        title = "\n".join(wrapped for line in title.splitlines() for wrapped in textwrap.wrap(line, chars))
        band = self.LINE_PX * len(title.splitlines()) + 14 if title else 0
        fig = Figure(figsize=(width / self.DPI, (height + band) / self.DPI))
        ax = fig.add_axes((0.0, 0.0, 1.0, height / (height + band)))  # one image pixel per PNG pixel
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_axis_off()
        tile_h, tile_w = images.shape[-2] + self.PADDING, images.shape[-1] + self.PADDING
        for i, label in enumerate(labels[: len(images)] if labels is not None else []):
            row, col = divmod(i, min(self.nrow, len(images)))
            x, y = col * tile_w + self.PADDING + 2, row * tile_h + self.PADDING + 2
            ax.text(x, y, _label_text(label, classes), fontsize=7, color="white", ha="left", va="top",
                    bbox={"facecolor": "black", "alpha": 0.6, "pad": 1.0, "linewidth": 0})  # fmt: skip
        return save(fig, self.dirpath / self.filename, title=title, dpi=self.DPI)


def _label_text(label: torch.Tensor, classes: Sequence[str] | None) -> str:
    """A class index's name; for a soft target (mixup, cutmix), its dominant class and that class's weight."""
    if label.ndim == 0:
        k = int(label)
        return str(classes[k]) if classes is not None and k < len(classes) else str(k)
    weight, k = label.float().max(dim=0)
    return f"{_label_text(k, classes)} {100 * float(weight):.3g}%"


class TestPredictions(pl.Callback):
    """At test time: the confusion matrix (``confusion_matrix.json`` in the run directory) and, with a W&B
    logger, W&B's confusion-matrix plot and a table of the first test images, labels and predictions.

    Args:
        dirpath: folder of ``confusion_matrix.json``.
        num_images: test images in the W&B table.
    """

    def __init__(self, dirpath: str, num_images: int = 32) -> None:
        self.dirpath = Path(dirpath)
        self.num_images = num_images

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # made at the first batch, sized by its logits (the model's classes, whichever appear in the split)
        self.confusion: MulticlassConfusionMatrix | None = None
        self.images: list[tuple[torch.Tensor, int, int, float]] = []

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(outputs, dict) or "logits" not in outputs:
            return
        x, y = batch
        logits = outputs["logits"].detach()
        if self.confusion is None:
            self.confusion = MulticlassConfusionMatrix(logits.shape[1]).to(logits.device)
        confidence, pred = logits.float().softmax(dim=1).max(dim=1)
        self.confusion.update(pred, y)
        for i in range(min(len(y), self.num_images - len(self.images))):
            self.images.append((x[i].cpu(), int(y[i]), int(pred[i]), float(confidence[i])))

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.confusion is None:
            return
        # rows: true class, columns: predicted class; under DDP, compute sums the processes' matrices (each
        # tested a shard), so every process calls it
        matrix = self.confusion.compute().cpu()
        k = matrix.shape[0]
        if not trainer.is_global_zero:
            return
        datamodule = getattr(trainer, "datamodule", None)
        classes = list(getattr(datamodule, "classes", None) or [str(i) for i in range(k)])[:k]
        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / "confusion_matrix.json").write_text(
            json.dumps({"classes": classes, "matrix": matrix.tolist()}) + "\n"
        )
        cells = torch.arange(k * k).repeat_interleave(matrix.flatten())  # each test image's label * k + pred
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                self._log_wandb(
                    logger, classes, cells // k, cells % k, getattr(pl_module, "eval_split", "test")
                )

    def _log_wandb(
        self, logger: Any, classes: list[str], targets: torch.Tensor, preds: torch.Tensor, prefix: str
    ) -> None:
        import wandb

        table = wandb.Table(columns=["image", "label", "prediction", "confidence"])
        for image, label, pred, confidence in self.images:
            array = image.permute(1, 2, 0).squeeze(-1).numpy() if image.dtype == torch.uint8 else None
            table.add_data(
                wandb.Image(array) if array is not None else None, classes[label], classes[pred], confidence
            )
        logger.experiment.log(
            {
                f"{prefix}/confusion_matrix": wandb.plot.confusion_matrix(
                    y_true=targets.tolist(), preds=preds.tolist(), class_names=classes
                ),
                f"{prefix}/predictions": table,
            }
        )


class _EvaluateAveraged:
    """Mixin of the weight-averaging callbacks: ``validate``/``test`` on a checkpoint evaluate its averaged
    weights. Lightning 2.6's ``WeightAveraging.on_load_checkpoint`` loads the trained weights (kept under
    ``current_model_state``) back into the module whenever its average exists, which after a fit is also when
    cvarch-train tests its checkpoint; only a fit (a resume) needs them."""

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        if trainer.state.fn == "fit":
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


class EMA(_EvaluateAveraged, EMAWeightAveraging):
    """An exponential moving average of the weights (and BN statistics), which validation, test and the final
    weights use: Polyak & Juditsky 1992; timm's ``--model-ema``. Lightning's ``EMAWeightAveraging``, whose
    arguments it takes (``decay``, ``update_every_n_steps``, ``update_starting_at_step``, ``use_buffers``)."""


class Lookahead(_EvaluateAveraged, WeightAveraging):
    """airbench's lookahead: every ``every_n_steps`` steps the slow weights move toward the trained ones by
    ``1 − decay``, and the trained weights are reset to the slow ones.

    Jordan 2024, airbench (arXiv:2404.00498) §3.5, after Zhang et al. 2019, "Lookahead Optimizer: k steps
    forward, 1 step back". The decay grows as ``decay · (step / total)^power`` (airbench94: 0.95⁵ and a cube),
    so early steps keep the trained weights and late ones average more. Parameters and floating-point buffers
    (BN statistics) are averaged. It is Lightning's :class:`~pytorch_lightning.callbacks.WeightAveraging`
    with a write-back: validation, test and the final weights use the slow weights, and checkpoints keep both
    (see Lightning's ``on_save_checkpoint``), as with ``callbacks=ema``.

    Args:
        every_n_steps: optimizer steps between updates (airbench94: 5).
        decay: the decay at the last step (airbench94: 0.95⁵ ≈ 0.774).
        power: the decay's growth with the run's progress (airbench94: 3).
    """

    def __init__(self, every_n_steps: int = 5, decay: float = 0.95**5, power: float = 3.0) -> None:
        if every_n_steps < 1:
            raise ValueError(f"callbacks.lookahead.every_n_steps must be >= 1, got {every_n_steps}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"callbacks.lookahead.decay must be in [0, 1], got {decay}")
        if power < 0:
            raise ValueError(f"callbacks.lookahead.power must be >= 0, got {power}")
        super().__init__(use_buffers=True, avg_fn=self._lerp)
        self.every_n_steps = every_n_steps
        self.decay = decay
        self.power = power
        self._decay_now = 0.0
        self._total: int | None = None

    def _lerp(self, slow: torch.Tensor, fast: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        if not slow.is_floating_point():  # num_batches_tracked: the trained count
            return fast
        return slow.lerp(fast.to(slow.dtype), 1.0 - self._decay_now)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and (step_idx + 1) % self.every_n_steps == 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._total is None:  # the run's optimizer steps; Lightning works it out from the loaders
            self._total = max(int(trainer.estimated_stepping_batches), 1)
        total = self._total
        self._decay_now = self.decay * min(trainer.global_step / total, 1.0) ** self.power
        before = self._latest_update_step  # Lightning 2.6's WeightAveraging: the step of the last update
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._latest_update_step != before:  # updated: the trained weights restart from the slow ones
            self._copy_average_to_current(pl_module)


def summarize_model(
    model: nn.Module, input_shape: Sequence[int] | None, max_depth: int = 1
) -> tuple[list[dict[str, Any]], int]:
    """The model's layers down to ``max_depth`` (-1: all) with their parameters, mode, FLOPs and sizes for one
    image, and the FLOPs of the whole forward: ``torch.utils.flop_counter.FlopCounterMode``'s count (two per
    multiply-add of convolutions, linear layers and matmuls) on the meta device, as
    :func:`cvarch.cost.count_flops` counts them.

    Args:
        model: any ``nn.Module``.
        input_shape: (C, H, W) of one image; ``None`` counts no FLOPs and leaves the sizes unknown.
        max_depth: levels of nesting listed (1: the model's children).

    Returns:
        ``(rows, total_flops)``; each row has ``name``, ``type``, ``params``, ``training``, ``flops``,
        ``in_size`` and ``out_size`` (``"?"`` when unknown).
    """
    modules = [(n, m) for n, m in model.named_modules() if n and (max_depth < 0 or n.count(".") < max_depth)]
    rows = {
        name: {"name": name, "type": type(m).__name__, "params": sum(p.numel() for p in m.parameters()),
               "training": m.training, "flops": 0, "in_size": "?", "out_size": "?"}
        for name, m in modules
    }  # fmt: skip
    if input_shape is None:
        return list(rows.values()), 0
    counter = FlopCounterMode(display=False)
    started: dict[str, int] = {}

    def size(value: Any) -> Any:
        return list(value.shape) if isinstance(value, torch.Tensor) else "?"

    def enter(name: str, module: nn.Module, args: tuple) -> None:
        started[name] = counter.get_total_flops()
        if rows[name]["in_size"] == "?" and args:
            rows[name]["in_size"] = size(args[0])

    def leave(name: str, module: nn.Module, args: tuple, output: Any) -> None:
        rows[name]["flops"] += counter.get_total_flops() - started[name]  # a module called twice counts twice
        if rows[name]["out_size"] == "?":
            rows[name]["out_size"] = size(output)

    hooks = [m.register_forward_pre_hook(partial(enter, n)) for n, m in modules]
    hooks += [m.register_forward_hook(partial(leave, n)) for n, m in modules]
    try:
        with counter:
            meta_forward(model, (1, *input_shape))
    finally:
        for hook in hooks:
            hook.remove()
    return list(rows.values()), counter.get_total_flops()


class ModelSummary(RichModelSummary):
    """Lightning's rich model summary of the module's ``model`` only: its layers to ``max_depth``, without the
    metric modules (``train_acc``, ``val_acc``, …) that Lightning's lists beside them, and the FLOPs of one
    image (:func:`summarize_model`; Lightning counts them only with ``example_input_array`` and else prints
    0). The image's shape is the module's ``example_input_array``'s, else the datamodule's ``image_shape``
    after the ``augment`` group's crop (what the model sees).

    Args:
        max_depth: levels of the model's nesting listed (1: its children; -1: all; 0: no summary).
        **summarize_kwargs: passed to Lightning's table (``header_style``).
    """

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._max_depth:
            return
        model = pl_module.model
        rows, total_flops = summarize_model(model, _input_shape(trainer, pl_module), self._max_depth)
        if not trainer.is_global_zero:
            return
        sized = [row for row in rows if row["out_size"] != "?"]
        data = [
            (" ", [str(i) for i in range(len(rows))]),
            ("Name", [row["name"] for row in rows]),
            ("Type", [row["type"] for row in rows]),
            ("Params", [get_human_readable_count(row["params"]) for row in rows]),
            ("Mode", ["train" if row["training"] else "eval" for row in rows]),
            ("FLOPs", [get_human_readable_count(row["flops"]) for row in rows]),
        ]
        if sized:  # one image's output, C×H×W: one short column, so a row fits an 80-column console
            data.append(("Out sizes", [_shape_text(r["out_size"]) for r in rows]))  # Lightning's column name
        params = list(model.parameters())
        modes = [m.training for m in model.modules()][1:]
        self.summarize(
            data,
            sum(p.numel() for p in params),
            sum(p.numel() for p in params if p.requires_grad),
            sum(p.numel() * p.element_size() for p in params) / 1e6,  # MB of the weights as stored
            {"train": modes.count(True), "eval": modes.count(False)},
            total_flops=total_flops,
            **self._summarize_kwargs,
        )


def _shape_text(size: Any) -> str:
    """``[1, 16, 8, 8]`` → ``16×8×8`` (the batch of one left out); ``?`` stays."""
    return "×".join(map(str, size[1:])) if isinstance(size, list) else str(size)


def _input_shape(trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[int, ...] | None:
    """(C, H, W) of what the model sees: ``example_input_array``'s, else the datamodule's image shape after
    the ``augment`` group's crop; ``None`` when neither is known."""
    example = getattr(pl_module, "example_input_array", None)
    if isinstance(example, torch.Tensor):
        return tuple(example.shape[1:])
    shape = getattr(getattr(trainer, "datamodule", None), "image_shape", None)
    augment = getattr(pl_module, "augment", None)
    if shape is None:
        return None
    return tuple(augment.output_shape(shape)) if augment is not None else tuple(shape)


def run_eta(elapsed_s: float, steps_done: int, steps_left: float) -> float | None:
    """Seconds the run has left at the pace measured so far: ``steps_left · elapsed_s / steps_done``.

    Args:
        elapsed_s: wall-clock seconds since the measurement started (validation included, so its share of
            the run is in the pace).
        steps_done: optimizer steps since then.
        steps_left: optimizer steps to the end of the run (``inf`` without a limit).

    Returns:
        The estimate, or ``None`` before the first step or without a limit.
    """
    if steps_done <= 0 or not math.isfinite(steps_left):
        return None
    return max(steps_left, 0.0) * elapsed_s / steps_done


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar, whose time column gives the epoch's remaining time, plus the whole
    run's: ``run ETA`` among the metrics (:func:`run_eta`: ``trainer.estimated_stepping_batches`` less
    ``global_step``, at this invocation's measured seconds per step, validation included). An upper bound
    when the run may end early (a plateau scheduler's or early stopping's end). Takes
    :class:`~pytorch_lightning.callbacks.RichProgressBar`'s arguments.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._start: tuple[float, int] | None = None  # (monotonic time, global step) when training started

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._start = (time.monotonic(), trainer.global_step)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        if self._start is not None and trainer.state.fn == "fit":
            started, first = self._start
            eta = run_eta(
                time.monotonic() - started,
                trainer.global_step - first,
                float(trainer.estimated_stepping_batches) - trainer.global_step,
            )
            items["run ETA"] = "-:--:--" if eta is None else str(timedelta(seconds=round(eta)))
        return items
