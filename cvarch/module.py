"""The LightningModule that wraps any cvarch model for image classification."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from cvarch.augment import Augment
from cvarch.checkpoint import rng_state, set_rng_state
from cvarch.optimizer import param_groups
from cvarch.preprocess import Rescale
from cvarch.regularizer import Regularizer
from cvarch.transfer import frozen_eval
from cvarch.tta import TestTimeAugment


class ClassificationModule(pl.LightningModule):
    """Cross-entropy classification with top-1/top-5 accuracy, a fitted preprocess and explicit penalties.

    The model maps float (N, C, H, W) images to logits (N, num_classes), or to a tuple ``(logits, *aux)`` of
    several heads' logits, the prediction first: GoogLeNet in training (its auxiliary classifiers, each loss
    weighted by ``aux_weight``) and transfer's ``StageProbes`` always. A model that names its heads declares
    ``head_loss_weights`` (name → loss weight, in output order): each named head then has its own loss weight,
    its own ``train/loss_<name>`` (auxiliary heads) and its own ``val/acc_<name>`` and ``test/acc_<name>``.

    Args:
        model: the network.
        num_classes: classes of the task (for the accuracy metrics).
        optimizer: ``torch.optim`` partial (the ``optimizer`` group), completed with the parameter groups
            here.
        scheduler: ``torch.optim.lr_scheduler`` partial (the ``scheduler`` group), or ``None``. A
            ``total_steps`` parameter left unset is filled with the run's scheduler steps (OneCycle, cosine).
        scheduler_options: Lightning's lr-scheduler dict entries (``monitor``, ``interval``, ``frequency``).
        optimizer_groups: the optimizer group's ``groups`` keys (``decay_norm_bias``, ``lr_mult``), see
            :func:`cvarch.optimizer.param_groups`.
        preprocess: uint8 → float input transform (the ``preprocess`` group), fitted on the training split.
        augment: batched training augmentation (the ``augment`` group), run on the device on training batches
            only; it may crop, and may turn labels into soft targets (mixup, cutmix).
        tta: test-time views (the ``tta`` group): validation and ``test/acc`` use its center view (the
            training crop size), ``test/acc_tta`` averages the softmax over all its views.
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
        optimizer_groups: dict[str, Any] | None = None,
        preprocess: nn.Module | None = None,
        augment: Augment | None = None,
        tta: TestTimeAugment | None = None,
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
        self.optimizer_groups = dict(optimizer_groups or {})
        self.augment = augment if augment is not None else Augment()
        self.tta = tta if tta is not None else TestTimeAugment()
        self.regularizer = regularizer if regularizer is not None else Regularizer()
        self.label_smoothing = label_smoothing
        self.aux_weight = aux_weight
        self._train_acc_logged = False  # train/acc is logged once an epoch (see training_step)
        self.eval_split = "test"  # prefix of the metrics the test loop logs; cvarch-eval sets it per split
        top5 = min(5, num_classes)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        self.test_acc_tta = MulticlassAccuracy(num_classes, average="micro")
        self.test_top5_tta = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        heads = dict(getattr(model, "head_loss_weights", None) or {})  # named heads (transfer=stage_probes)
        self.head_names, self.head_weights = list(heads), list(heads.values())
        self.head_acc = nn.ModuleDict(
            {
                f"{split}_{name}": MulticlassAccuracy(num_classes, average="micro")
                for split in ("val", "test")
                for name in self.head_names
            }
        )
        self._batch_idx = -1  # of the running training epoch, for _pending_plateau_steps
        # wall-clock seconds of the run before this invocation (a resume's checkpoint's) and this one's start:
        # checkpoints carry the total, so a resumed run reports the whole run's time, not only its own
        self.wall_before, self.wall_start = 0.0, time.perf_counter()
        self.checkpoint_epoch: int | None = None  # the epoch of the newest checkpoint saved or resumed from

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.preprocess(x))

    def train(self, mode: bool = True) -> ClassificationModule:
        """Frozen parts (``transfer`` group) stay in eval mode."""
        super().train(mode)
        if mode:
            frozen_eval(self.model)
        return self

    def on_train_epoch_start(self) -> None:
        # Lightning 2.6 never calls train() itself: it keeps (and restores after validation) each
        # module's mode
        frozen_eval(self.model)
        self._train_acc_logged = False
        self._batch_idx = -1
        self.augment.set_epoch(self.current_epoch)  # alternating flips (airbench) depend on the epoch

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_idx = batch_idx

    def set_image_size(self, size: int) -> None:
        """Sizes the test-time views for images of side ``size``: the center view is the training crop."""
        self.tta.configure(self.augment.output_size(size), self.augment.padding, self.augment.padding_mode)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return
        self.set_image_size(datamodule.image_shape[-1])
        if stage == "fit":
            if not bool(self.preprocess.fitted):
                self.preprocess.fit(datamodule.train_images)
            # the augment group's fitted statistics are not saved in checkpoints: refit on every (re)start
            self.augment.fit(datamodule.train_images)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self._trainer is not None and self.trainer.training and len(self.augment):
            return self.augment(*batch)  # on the device, batched
        return batch

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_state"] = rng_state()  # dropout, stochastic depth: the global generators
        checkpoint["wall_s_total"] = self.wall_before + time.perf_counter() - self.wall_start
        self.checkpoint_epoch = checkpoint.get("epoch")
        state = self.augment.rng_state()
        if state is not None:  # a resumed run continues the augmentation stream
            checkpoint["augment_rng_state"] = state.cpu()
        pending = self._pending_plateau_steps()
        if pending:
            checkpoint["plateau_steps_pending"] = pending

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "augment_rng_state" in checkpoint:
            self.augment.set_rng_state(checkpoint["augment_rng_state"])
        self._plateau_steps_to_replay = checkpoint.get("plateau_steps_pending", [])
        self._rng_state_to_restore = checkpoint.get("rng_state")
        self.wall_before = float(checkpoint.get("wall_s_total", 0.0))
        if self._trainer is None or self.trainer.state.fn == "fit":  # not the best one validate/test load
            self.checkpoint_epoch = checkpoint.get("epoch")

    def _pending_plateau_steps(self) -> list[float]:
        """The metrics of the epoch-end ``ReduceLROnPlateau`` steps Lightning has yet to take when a
        checkpoint is written: it saves at validation end and steps plateau schedulers after it, so a resumed
        run would otherwise skip one step (Lightning 2.6 ``fit_loop.on_advance_end``)."""
        trainer = self.trainer
        if not trainer.training or not self._epoch_done():
            return []
        pending = []
        for config in trainer.lr_scheduler_configs:
            due = (trainer.current_epoch + 1) % config.frequency == 0
            metric = trainer.callback_metrics.get(config.monitor) if config.monitor else None
            if config.reduce_on_plateau and config.interval == "epoch" and due and metric is not None:
                pending.append(float(metric))
        return pending

    def _epoch_done(self) -> bool:
        """Whether the training epoch's last batch has started: Lightning 2.6's private
        ``TrainingEpochLoop._num_ready_batches_reached``, from public state (the batch index this module was
        given, the Trainer's ``num_training_batches`` and ``is_last_batch``)."""
        trainer = self.trainer
        return self._batch_idx + 1 >= trainer.num_training_batches or trainer.is_last_batch

    def on_train_start(self) -> None:
        steps = getattr(self, "_plateau_steps_to_replay", [])
        plateaus = [c.scheduler for c in self.trainer.lr_scheduler_configs if c.reduce_on_plateau]
        for scheduler, metric in zip(plateaus, steps, strict=False):  # the step the checkpoint preceded
            scheduler.step(metric)
        self._plateau_steps_to_replay = []
        # restored here, not at load: the last thing before the first batch, as in a run that never stopped
        # (Lightning's sanity check runs between load and here, under its own isolate_rng)
        if getattr(self, "_rng_state_to_restore", None) is not None:
            set_rng_state(self._rng_state_to_restore)
            self._rng_state_to_restore = None

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        heads = self._heads(self(x))  # (main, *auxiliary heads)
        logits = heads[0]
        # y is int64 labels, or (N, K) soft targets after mixup/cutmix: cross_entropy takes both
        losses = [F.cross_entropy(head, y, label_smoothing=self.label_smoothing) for head in heads]
        # unnamed auxiliary heads weigh aux_weight each (GoogLeNet); named ones, what the model says
        weights = self.head_weights or [1.0] + [self.aux_weight] * (len(heads) - 1)
        loss = sum(w * head_loss for w, head_loss in zip(weights, losses, strict=True))
        for name, head_loss in zip(self.head_names[1:], losses[1:], strict=False):  # unnamed: not logged
            self.log(f"train/loss_{name}", head_loss, on_step=False, on_epoch=True, sync_dist=True)
        penalty = self.regularizer(self.model)
        if penalty is not None:  # logged apart from the data term
            self.log("train/data_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
            self.log("train/penalty", penalty, on_step=False, on_epoch=True, sync_dist=True)
            loss = loss + penalty
        # update only (calling the metric would also compute each batch's accuracy)
        self.train_acc.update(logits, y.argmax(dim=1) if y.is_floating_point() else y)  # soft: dominant class
        # losses are tensors: sync_dist averages them over DDP processes (metrics objects sync themselves)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        if self._logs_this_step():  # each self.log costs Lightning ~0.7 ms: only on the steps it writes
            self.log("train/loss_step", loss.detach(), on_step=True, on_epoch=False, sync_dist=True)
        if (
            not self._train_acc_logged
        ):  # a metric object is computed from its state at the epoch's end: logging
            # it once an epoch is enough, and saves Lightning's ~0.7 ms per self.log on every other step
            self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
            self._train_acc_logged = True
        return loss

    def _logs_this_step(self) -> bool:
        """Whether Lightning sends this step's on-step values to the loggers; True outside a Trainer.

        Lightning 2.6's ``LoggerConnector.should_update_logs``, from public Trainer state: every
        ``log_every_n_steps`` batches that stepped (``global_step`` with one optimizer), and when the run
        stops.
        """
        if self._trainer is None:
            return True
        trainer = self.trainer
        if trainer.log_every_n_steps == 0:
            return False
        return (trainer.global_step + 1) % trainer.log_every_n_steps == 0 or trainer.should_stop

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The main head's logits of uint8 or [0, 1] float images (auxiliary heads dropped; of stage probes,
        the top stage's)."""
        return self._heads(self(x))[0]

    @staticmethod
    def _heads(output: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """A model's output as ``(main, *auxiliary)`` logits."""
        return tuple(output) if isinstance(output, (tuple, list)) else (output,)

    def _evaluate(
        self, batch, prefix: str, acc: MulticlassAccuracy, top5: MulticlassAccuracy
    ) -> torch.Tensor:
        x, y = batch
        heads = self._heads(self(self.tta.center(x)))
        for name, head in zip(self.head_names, heads, strict=False):  # only heads the model returns in eval
            metric = self.head_acc[f"{'val' if prefix == 'val' else 'test'}_{name}"]
            metric(head, y)
            self.log(f"{prefix}/acc_{name}", metric, on_epoch=True)
        logits = heads[0]
        acc(logits, y)
        top5(logits, y)
        self.log(
            f"{prefix}/loss",
            F.cross_entropy(logits, y),
            on_epoch=True,
            prog_bar=prefix == "val",
            sync_dist=True,
        )
        self.log(f"{prefix}/acc", acc, on_epoch=True, prog_bar=prefix == "val")
        self.log(f"{prefix}/acc_top5", top5, on_epoch=True)
        return logits

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc, self.val_top5)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        logits = self._evaluate(batch, self.eval_split, self.test_acc, self.test_top5)
        x, y = batch
        # with one view TTA is the plain prediction; the metric is logged either way, so runs compare
        probs = self.tta.predict(self.logits, x) if self.tta.num_views > 1 else logits.softmax(dim=1)
        self.test_acc_tta(probs, y)
        self.test_top5_tta(probs, y)
        self.log(f"{self.eval_split}/acc_tta", self.test_acc_tta, on_epoch=True)
        self.log(f"{self.eval_split}/acc_tta_top5", self.test_top5_tta, on_epoch=True)
        return {"logits": logits}  # for callbacks' on_test_batch_end (TestPredictions)

    def configure_optimizers(self) -> Any:
        groups = param_groups(
            self.model,
            lr=_argument(self.optimizer_factory, "lr"),
            weight_decay=_argument(self.optimizer_factory, "weight_decay") or 0.0,
            **self.optimizer_groups,
        )
        optimizer = self.optimizer_factory(params=groups)
        if self.scheduler_factory is None:
            return optimizer
        kwargs: dict[str, Any] = {}
        func = getattr(self.scheduler_factory, "func", self.scheduler_factory)
        if (
            "total_steps" in inspect.signature(func).parameters
            and _argument(self.scheduler_factory, "total_steps") is None
        ):
            if self.scheduler_options.get("interval", "epoch") == "step":
                kwargs["total_steps"] = int(self.trainer.estimated_stepping_batches)
            else:
                kwargs["total_steps"] = int(self.trainer.max_epochs)
        fast_dev_run = getattr(self._trainer, "fast_dev_run", False)  # False without a Trainer
        if fast_dev_run and _argument(self.scheduler_factory, "warmup_steps"):
            kwargs["warmup_steps"] = 0  # debug=fdr checks the wiring in one batch: no room for a warm-up
        scheduler = {
            "scheduler": self.scheduler_factory(optimizer=optimizer, **kwargs),
            **self.scheduler_options,
        }
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def _argument(factory: Callable[..., Any], name: str) -> Any:
    """The value a ``functools.partial`` (a ``_partial_: true`` config) will pass for ``name``: its own
    keyword, else the target's default, else ``None``."""
    keywords = getattr(factory, "keywords", {})
    if name in keywords:
        return keywords[name]
    param = inspect.signature(getattr(factory, "func", factory)).parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default
