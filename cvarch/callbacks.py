"""The ``callbacks`` group's own callbacks (the others are Lightning's, configured in ``conf/callbacks/``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EMAWeightAveraging, WeightAveraging
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix

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


class ActivationStats(pl.Callback):
    """Per-layer activation statistics and gradient norms, as the lecture's initialization study plots them.

    At the first training step and every ``every_n_steps`` after it, the output of every activation module
    (the lecture's hidden layers ``H = f(W·X)``) is recorded: mean, std, the fraction saturated
    (``|a| > saturation``) and a histogram; after that step's backward, the gradient norm of each layer's
    weights ("think about the backward pass: what do the gradients look like?"). Written to
    ``activation_stats.json`` and drawn to ``activation_stats.png`` (per-layer mean and std, then a row of
    per-layer histograms of the first record); each record also goes to W&B as histograms when it is on.

    Args:
        dirpath: folder of the JSON and PNG files.
        every_n_steps: record period in optimizer steps (the first step is always recorded).
        bins: histogram bins.
        saturation: |activation| above which a unit counts as saturated (tanh: 0.95).
        hist_range: histogram range shared by all layers, so a collapse shows (the lecture's
            ``plt.hist(H, 30, range=(-1, 1))``); ``None`` uses each layer's own range.
    """

    def __init__(
        self,
        dirpath: str,
        every_n_steps: int = 100,
        bins: int = 30,
        saturation: float = 0.95,
        hist_range: Sequence[float] | None = (-1.0, 1.0),
    ) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.bins = bins
        self.saturation = saturation
        self.hist_range = tuple(hist_range) if hist_range is not None else None
        self.records: list[dict[str, Any]] = []
        self._hooks: list[Any] = []
        self._current: dict[str, Any] | None = None

    def _layers(self, pl_module: pl.LightningModule) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in pl_module.model.named_modules() if isinstance(m, ACTIVATIONS)]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every_n_steps:
            return
        self._current = {"step": step, "layers": []}
        for name, module in self._layers(pl_module):
            self._hooks.append(module.register_forward_hook(self._recorder(name)))

    def _recorder(self, name: str):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            a = output.detach().float()
            low, high = self.hist_range or (float(a.min()), float(a.max()))
            if high <= low:
                high = low + 1e-12
            counts = torch.histc(a, bins=self.bins, min=low, max=high)
            self._current["layers"].append(
                {
                    "name": name,
                    "mean": float(a.mean()),
                    "std": float(a.std()),
                    "saturated": float((a.abs() > self.saturation).float().mean()),
                    "hist": counts.tolist(),
                    "range": [low, high],
                }
            )

        return hook

    def on_after_backward(self, trainer, pl_module) -> None:
        if self._current is None:
            return
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
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
        from matplotlib.figure import Figure

        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / "activation_stats.json").write_text(json.dumps(self.records))
        first = self.records[0]["layers"]
        n = len(first)
        fig = Figure(figsize=(max(8, 1.6 * n), 6))
        top = fig.subplots(2, 2, gridspec_kw={"height_ratios": [1, 1]})[0]
        layers = range(1, n + 1)
        top[0].plot(layers, [layer["mean"] for layer in first], "ob-")
        top[0].set_title("layer mean")
        top[1].plot(layers, [layer["std"] for layer in first], "or-")
        top[1].set_title("layer std")
        for ax in top:
            ax.set_xlabel("layer")
        fig.axes[2].remove()
        fig.axes[2].remove()
        for i, layer in enumerate(first):
            ax = fig.add_subplot(2, n, n + i + 1)
            edges = torch.linspace(*layer["range"], self.bins + 1)
            ax.bar(edges[:-1].tolist(), layer["hist"], width=float(edges[1] - edges[0]), align="edge")
            ax.set_title(f"{i + 1}", fontsize=8)
            ax.set_yticks([])
            ax.tick_params(labelsize=6)
        fig.suptitle(f"activations at step {self.records[0]['step']}")
        fig.tight_layout()
        path = self.dirpath / "activation_stats.png"
        fig.savefig(path, dpi=90)
        return path

    def state_dict(self) -> dict[str, Any]:
        return {"records": self.records}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records = list(state_dict.get("records", []))


class AugmentationGrid(pl.Callback):
    """Saves the first training batch the model sees, augmented, as a PNG grid: a look at what training sees.

    The ``augment`` group runs on the device in the module's ``on_after_batch_transfer``, so the batch given
    to ``on_train_batch_start`` is already augmented. Saved once, on rank zero; uint8 and float [0, 1] images
    both work (float values outside [0, 1], e.g. after PCA colour, are clipped for display only).

    Args:
        dirpath: folder of the PNG (the run directory).
        filename: name of the PNG.
        num_images: first images of the batch shown.
        nrow: images per row of the grid.
    """

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
            from pytorch_lightning.utilities import rank_zero_info

            rank_zero_info(f"augmented training images: {self.save(batch[0])}")

    def save(self, images: torch.Tensor) -> Path:
        """Writes the first ``num_images`` of a uint8 or float [0, 1] (N, C, H, W) batch; returns its path."""
        from torchvision.utils import save_image

        images = images[: self.num_images].detach().cpu()
        images = images.float().div(255.0) if images.dtype == torch.uint8 else images.float().clamp(0.0, 1.0)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / self.filename
        save_image(images, path, nrow=self.nrow)
        return path


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
