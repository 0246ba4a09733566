"""The LightningModule that wraps any cvarch model for image classification."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from cvarch.preprocess import Rescale
from cvarch.regularizer import Regularizer


class ClassificationModule(pl.LightningModule):
    """Cross-entropy classification with top-1/top-5 accuracy, a fitted preprocess and explicit penalties.

    Args:
        model: the network; maps float (N, C, H, W) to logits (N, num_classes).
        num_classes: classes of the task (for the accuracy metrics).
        optimizer: ``torch.optim`` partial (the ``optimizer`` group), completed with the parameters here.
        scheduler: ``torch.optim.lr_scheduler`` partial (the ``scheduler`` group), or ``None``.
        scheduler_options: Lightning's lr-scheduler dict entries (``monitor``, ``interval``, ``frequency``).
        preprocess: uint8 → float input transform (the ``preprocess`` group), fitted on the training split.
        regularizer: explicit penalty added to the loss (the ``regularizer`` group).
        label_smoothing: cross-entropy label smoothing ε (Szegedy et al. 2016 §7: 0.1).
        aux_weight: weight of each auxiliary classifier's loss when the model returns ``(logits, *aux)`` in
            training, as GoogLeNet does (Szegedy et al. 2014 §5: 0.3).
        config: the run's resolved config as plain containers, saved as hyperparameters; it is what lets
            ``cvarch-eval`` rebuild the module from a checkpoint loaded with ``weights_only=True``.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scheduler_options: dict[str, Any] | None = None,
        preprocess: nn.Module | None = None,
        regularizer: Callable[[nn.Module], torch.Tensor | None] | None = None,
        label_smoothing: float = 0.0,
        aux_weight: float = 0.3,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if config is not None:
            self.save_hyperparameters(config)
        self.model = model
        self.preprocess = preprocess if preprocess is not None else Rescale()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_options = dict(scheduler_options or {})
        self.regularizer = regularizer if regularizer is not None else Regularizer()
        self.label_smoothing = label_smoothing
        self.aux_weight = aux_weight
        self.eval_split = "test"  # prefix of the metrics the test loop logs; cvarch-eval sets it per split
        top5 = min(5, num_classes)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.preprocess(x))

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if stage == "fit" and not bool(self.preprocess.fitted) and datamodule is not None:
            self.preprocess.fit(datamodule.train_images)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        aux: tuple[torch.Tensor, ...] = ()
        if isinstance(logits, (tuple, list)):  # (main, *auxiliary heads), e.g. GoogLeNet in training
            logits, *aux = logits
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        for head in aux:
            aux_loss = F.cross_entropy(head, y, label_smoothing=self.label_smoothing)
            loss = loss + self.aux_weight * aux_loss
        penalty = self.regularizer(self.model)
        if penalty is not None:  # logged apart from the data term
            self.log("train/data_loss", loss, on_step=False, on_epoch=True)
            self.log("train/penalty", penalty, on_step=False, on_epoch=True)
            loss = loss + penalty
        self.train_acc(logits, y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _evaluate(self, batch, prefix: str, acc: MulticlassAccuracy, top5: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        if isinstance(logits, (tuple, list)):  # auxiliary heads do not count at evaluation
            logits = logits[0]
        acc(logits, y)
        top5(logits, y)
        self.log(f"{prefix}/loss", F.cross_entropy(logits, y), on_epoch=True, prog_bar=prefix == "val")
        self.log(f"{prefix}/acc", acc, on_epoch=True, prog_bar=prefix == "val")
        self.log(f"{prefix}/acc_top5", top5, on_epoch=True)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc, self.val_top5)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.eval_split, self.test_acc, self.test_top5)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=[p for p in self.model.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        scheduler = {"scheduler": self.scheduler_factory(optimizer=optimizer), **self.scheduler_options}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
