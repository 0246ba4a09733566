"""Builders: turn a composed config into the objects of a run, the same way for the CLI and the Python API."""

from __future__ import annotations

import inspect
import os
import traceback
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import get_object
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.loggers import CSVLogger
from torch import nn

from cvarch.augment import Augment
from cvarch.config import model_parts, optimizer_parts, scheduler_parts
from cvarch.data import ImageDataModule
from cvarch.extras import choices
from cvarch.models import check_input_size, meta_forward
from cvarch.module import ClassificationModule
from cvarch.optimizer import matches
from cvarch.transfer import Transfer
from cvarch.tta import TestTimeAugment

PACKAGE_DIR = Path(__file__).resolve().parent


def instantiate(node: Any, *args: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, but an error raised by cvarch's own code (whose message already names its
    config key) comes out as itself, not wrapped in Hydra's InstantiationException.

    The node is trusted, as in any Hydra app: it comes from the user's command line, config files or Python,
    or from a received file that :func:`cvarch.config.check_received` has let through."""
    try:
        return hydra_instantiate(node, *args, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if cause is not None and any(
            Path(frame.filename).is_relative_to(PACKAGE_DIR)
            for frame in traceback.extract_tb(cause.__traceback__)
        ):
            raise cause from None
        raise


def build_transfer(cfg: DictConfig) -> Transfer:
    """The ``transfer`` group's strategy; configs of cvarch versions before the group had options (a partial
    of ``apply_transfer``) and configs without one train from scratch."""
    node = cfg.get("transfer")
    if not node or node.get("_target_") != "cvarch.transfer.Transfer":
        return Transfer()
    return instantiate(node)


def build_model(
    cfg: DictConfig,
    image_shape: tuple[int, int, int] | None = None,
    initialize: bool = True,
    batch: torch.Tensor | None = None,
    transfer: Transfer | None = None,
) -> nn.Module:
    """Builds ``cfg.model`` with the ``norm`` group in its norm slots, checks its input size, applies the
    ``init`` and ``transfer`` groups, then the model group's fast-path options (:func:`fast_path`).

    Args:
        cfg: a composed run config.
        image_shape: (C, H, W) to check the model against; by default taken from ``data.image_size`` if set.
        initialize: apply ``init`` and load the transfer source; off when a checkpoint's weights replace them
            anyway (the transfer group still freezes and wraps, so the checkpoint's keys fit).
        batch: a preprocessed training batch, for data-driven init schemes (LSUV, Mishkin & Matas 2016).
        transfer: the run's transfer strategy, if already built (its source is loaded once).
    """
    model = instantiate_model(cfg.model, num_classes=cfg.data.num_classes)
    if image_shape is None and cfg.data.get("image_size"):
        image_shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    if image_shape is not None:
        check_input_size(model, image_shape)
        check_head(model, image_shape, cfg.data.num_classes)
    if initialize:
        init = instantiate(cfg.init)
        model = init(model, batch=batch) if batch is not None else init(model)
    transfer = transfer if transfer is not None else build_transfer(cfg)
    model = transfer(model, cfg.model, image_shape=image_shape, load=initialize)
    if initialize and cfg.get("init_from"):
        load_initial_weights(model, cfg.init_from)
    return fast_path(model, **model_parts(cfg.model)[1])


def load_initial_weights(model: nn.Module, path: str) -> None:
    """``init_from``: the model starts from the weights of a checkpoint, nothing else (timm's
    ``--initial-checkpoint``): no optimizer state, epoch, preprocess or config is taken, so the run is a fresh
    run of its own config. A ``cvarch-train`` checkpoint or a plain state dict; loaded strictly.

    Raises:
        ValueError: naming ``init_from``, the file and the first layers that do not fit.
    """
    from cvarch.checkpoint import state_differences
    from cvarch.sources import load_file

    state = load_file(Path(path).expanduser(), key="init_from").state  # weights only, never its config
    problems = state_differences(model.state_dict(), state)
    if problems:
        raise ValueError(
            f"init_from: {path} does not fit this run's model ({len(problems)} layers differ: "
            f"{'; '.join(problems[:4])}{' …' if len(problems) > 4 else ''}); pass the model= it had"
        )
    model.load_state_dict(state, strict=True)


def instantiate_model(node: DictConfig | Mapping[str, Any], num_classes: int | None = None) -> nn.Module:
    """The network of a ``model`` node alone: its constructor gets every key but the fast-path options.

    Args:
        node: the ``model`` node.
        num_classes: the dataset's class count, passed as ``num_classes`` only where the node has none and the
            constructor takes one; a plain ``torch.nn`` module (``torch.nn.Sequential``) sizes its own head,
            which :func:`check_head` then checks against the dataset.
    """
    plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    plain = model_parts(plain)[0]
    if (
        num_classes is not None
        and "num_classes" not in plain
        and _takes(plain.get("_target_"), "num_classes")
    ):
        plain["num_classes"] = num_classes
    return instantiate(plain)


def _takes(target: Any, name: str) -> bool:
    """Whether the callable ``target`` names has a parameter ``name`` (or ``**kwargs``)."""
    try:
        params = inspect.signature(get_object(target)).parameters
    except Exception:
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def check_head(model: nn.Module, image_shape: tuple[int, int, int], num_classes: int) -> None:
    """Checks that the model's logits are as wide as the dataset has classes, on a meta-device forward
    (:func:`cvarch.models.meta_forward`). Only a 2-D output is checked: a building block such as
    ``inception_module`` returns feature maps.

    Raises:
        ValueError: naming ``model``, the output width and ``data.num_classes``.
    """
    out = meta_forward(model, (1, *image_shape))
    logits = out[0] if isinstance(out, (tuple, list)) else out
    if isinstance(logits, torch.Tensor) and logits.ndim == 2 and logits.shape[1] != num_classes:
        raise ValueError(
            f"model: {type(model).__name__} outputs {logits.shape[1]} logits but "
            f"data.num_classes={num_classes}; size the model's head to the dataset (model.num_classes, or "
            "its last layer's out_features)"
        )


def init_batch(
    cfg: DictConfig, datamodule: Any, preprocess: torch.nn.Module, input_shape: tuple[int, int, int]
) -> torch.Tensor | None:
    """The first training batch as the model sees it (center view, preprocessed) for a data-driven init
    (``needs_batch``: LSUV, patch whitening), else ``None``."""
    if not getattr(instantiate(cfg.init), "needs_batch", False):
        return None
    images = next(iter(datamodule.train_dataloader()))[0]
    return preprocess(TestTimeAugment().configure(input_shape[-1]).center(images))


def fast_path(model: nn.Module, channels_last: bool = False, compile: bool = False) -> nn.Module:
    """Applies the ``model.channels_last`` and ``model.compile`` options in place; neither changes the state
    dict's keys, so checkpoints load into the model built with or without them.

    Inputs are not converted: a convolution whose weight is NHWC returns NHWC whatever its input's layout
    (PyTorch's oneDNN and cuDNN convolutions both pick channels-last if the input or the weight is), so the
    first conv converts the batch once and every later layer stays NHWC.

    Args:
        model: the built model.
        channels_last: NHWC memory format for the 4-D weights (PyTorch's channels-last tutorial; tensor-core
            convolutions on GPUs).
        compile: ``nn.Module.compile`` (TorchDynamo + Inductor, Ansel et al. 2024): unlike ``torch.compile``
            it wraps no ``OptimizedModule`` around the model, so the state-dict keys stay the same.
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        model.compile()
    return model


def build_from_checkpoint(
    ckpt: dict[str, Any],
    run_cfg: DictConfig,
    image_shape: tuple[int, int, int],
    tta: DictConfig | None = None,
) -> ClassificationModule:
    """Rebuilds a checkpoint's module (model, fitted preprocess, norm statistics) for ``image_shape`` images.

    Args:
        ckpt: the loaded checkpoint (:func:`cvarch.checkpoint.load_trained`, which has checked ``run_cfg``).
        run_cfg: the run config saved in it.
        image_shape: (C, H, W) of the evaluation images; the model sees the training crop of them.
        tta: a ``tta`` group node; ``None`` keeps the run's own.
    """
    augment = build_augment(run_cfg)
    transfer = build_transfer(run_cfg)
    model = build_model(
        run_cfg, image_shape=augment.output_shape(image_shape), initialize=False, transfer=transfer
    )
    module = build_module(run_cfg, model, augment=augment, tta=tta, transfer=transfer)
    module.load_state_dict(ckpt["state_dict"], strict=True)
    module.set_image_size(image_shape[-1])
    return module


class Trained(NamedTuple):
    """A trained checkpoint rebuilt for evaluation (:func:`build_trained`)."""

    module: ClassificationModule  # model, fitted preprocess and norm statistics, on the CPU
    datamodule: ImageDataModule  # set up for testing: every split can be loaded
    ckpt: dict[str, Any]  # the loaded checkpoint
    data_cfg: DictConfig  # the data config used: the given one or the run's own


def build_trained(
    ckpt_path: str | Path,
    data: DictConfig | None = None,
    tta: DictConfig | None = None,
    trust: Sequence[str] | None = (),
    key: str = "ckpt_path",
) -> Trained:
    """Loads a ``cvarch-train`` checkpoint and rebuilds its module and data for evaluation: the one path of
    ``cvarch-eval``, ``cvarch-ensemble`` and ``cvarch-compress``. The saved config is data, checked by
    :func:`cvarch.checkpoint.load_trained` before anything is built from it; a checkpoint trained for another
    number of classes than the data has is refused (:func:`cvarch.checkpoint.check_classes`).

    Args:
        ckpt_path: the ``.ckpt`` file.
        data: a ``data`` group node to evaluate on instead of the run's own.
        tta: a ``tta`` group node; ``None`` keeps the run's own test-time views.
        trust: the live invocation's ``trust`` packages.
        key: the config key that named the file, for messages.
    """
    from cvarch.checkpoint import check_classes, load_trained

    ckpt, run_cfg = load_trained(ckpt_path, trust, key=key)
    data_cfg = OmegaConf.create(OmegaConf.to_container(data if data else run_cfg.data, resolve=True))
    check_classes(ckpt, ckpt_path, data_cfg.num_classes, key=key)
    datamodule = build_datamodule(OmegaConf.create({"data": data_cfg}))
    datamodule.setup("test")
    module = build_from_checkpoint(ckpt, run_cfg, datamodule.image_shape, tta=tta)
    return Trained(module, datamodule, ckpt, data_cfg)


def build_datamodule(cfg: DictConfig) -> ImageDataModule:
    """The ``data`` group's LightningDataModule."""
    return instantiate(cfg.data)


def build_augment(cfg: DictConfig) -> Augment:
    """The ``augment`` group's pipeline. Configs without one, and checkpoints of cvarch versions whose
    ``augment`` was a per-image ``transforms`` list, get the identity (their runs trained on uncropped
    images)."""
    node = cfg.get("augment")
    return instantiate(node) if node and "ops" in node else Augment()


def build_inputs(
    cfg: DictConfig, preprocess_state: Mapping[str, torch.Tensor] | None = None
) -> tuple[ImageDataModule, nn.Module, Augment]:
    """The datamodule (set up for fit), the preprocess fitted on the training split (or loaded from
    ``preprocess_state``: a transfer source's statistics) and the augment pipeline, as a training run gets
    them. The augment group's statistics are fitted by the LightningModule's ``setup`` (again on every
    resume)."""
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    preprocess = instantiate(cfg.preprocess)
    if preprocess_state is not None:  # the features were learnt on the source's statistics
        preprocess.load_state_dict(preprocess_state)
    else:  # on the training split only
        preprocess.fit(datamodule.train_images)
    return datamodule, preprocess, build_augment(cfg)


def build_module(
    cfg: DictConfig,
    model: nn.Module,
    preprocess: nn.Module | None = None,
    augment: Augment | None = None,
    tta: DictConfig | None = None,
    transfer: Transfer | None = None,
) -> ClassificationModule:
    """Wraps ``model`` with the loss, metrics, preprocess, augment, test-time views, regularizer, optimizer
    and scheduler of ``cfg``.

    Args:
        cfg: a composed run config.
        model: the built model.
        preprocess: an already fitted ``preprocess`` module; by default a new one is built (and fitted later).
        augment: an already built ``augment`` pipeline; by default built from ``cfg``.
        tta: a ``tta`` group node to use instead of ``cfg.tta`` (``cvarch-eval tta=…`` on an older run).
        transfer: the run's transfer strategy, if already built (the one :func:`build_model` applied).
    """
    scheduler, lightning = scheduler_parts(OmegaConf.to_container(cfg.scheduler, resolve=True))
    optimizer, groups = optimizer_parts(OmegaConf.to_container(cfg.optimizer, resolve=True))
    transfer_mult = (transfer if transfer is not None else build_transfer(cfg)).lr_mult(model)
    if transfer_mult:  # the user's optimizer.groups.lr_mult prefixes win over the transfer strategy's
        user = dict(groups.get("lr_mult") or {})
        kept = {k: v for k, v in transfer_mult.items() if not any(matches(k, p) for p in user)}
        groups["lr_mult"] = {**kept, **user}
    tta = tta if tta is not None else cfg.get("tta")
    return ClassificationModule(
        model=model,
        num_classes=cfg.model.get("num_classes") or cfg.data.num_classes,
        optimizer=instantiate(optimizer),
        scheduler=instantiate(scheduler) if scheduler else None,
        scheduler_options=lightning,
        optimizer_groups=groups,
        preprocess=preprocess if preprocess is not None else instantiate(cfg.preprocess),
        augment=augment if augment is not None else build_augment(cfg),
        tta=instantiate(tta) if tta else None,
        regularizer=instantiate(cfg.regularizer),
        label_smoothing=cfg.loss.label_smoothing,
        aux_weight=cfg.loss.aux_weight,
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def build_all(node: DictConfig | None, **kwargs: Any) -> list[Any]:
    """Instantiates every ``_target_`` entry of a dict-of-objects group (``logger``, ``callbacks``);
    ``kwargs`` maps an entry's name to extra arguments for it."""
    if not node:
        return []
    return [
        instantiate(v, **kwargs.get(k, {}))
        for k, v in node.items()
        if isinstance(v, DictConfig) and "_target_" in v
    ]


def swept_keys(sweep_dir: Path) -> list[str]:
    """The keys a multirun sweeps (command-line sweeps and ``hydra.sweeper.params``), from the
    ``multirun.yaml`` Hydra's sweeper writes before the first job."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return []
    hydra_cfg = OmegaConf.load(path).hydra
    overrides = list(hydra_cfg.overrides.task)
    overrides += [f"{k}={v}" for k, v in (hydra_cfg.sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [o.key_or_group for o in parsed if o.is_sweep_override()]


def sweep_group(task_name: str, sweep_dir: str | Path, configured: str | None = None) -> str:
    """The W&B group of a sweep's jobs: ``<task_name>/<sweep folder>`` (its start time), unless the user
    configured a group other than the default ``task_name``. ``cvarch-report`` puts its run in the same
    one."""
    return configured if configured not in (None, task_name) else f"{task_name}/{Path(sweep_dir).name}"


def sweep_identity(cfg: DictConfig) -> dict[str, Any]:
    """W&B ``group``, ``name`` and ``tags`` of a multirun job: grouped by the sweep (``<task_name>/<sweep
    folder>``, its start time), named by its swept overrides (``norm=none,seed=1``) and tagged with them, seed
    aside, so the W&B UI can group the jobs and average the seeds. Empty outside a multirun."""
    from hydra.types import RunMode

    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:  # the Python API without compose
        return {}
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return {}
    keys = set(swept_keys(Path(hydra_cfg.sweep.dir)))
    job = [o for o in hydra_cfg.overrides.task if o.split("=", 1)[0].lstrip("+~") in keys]
    configured = ((cfg.get("logger") or {}).get("wandb") or {}).get("group")
    return {
        "group": sweep_group(cfg.task_name, hydra_cfg.sweep.dir, configured),
        "name": ",".join(job) or f"job{hydra_cfg.job.num}",
        "tags": [*cfg.get("tags", []), *(o for o in job if not o.startswith("seed="))],
    }


def _started(logger: Any, cfg: DictConfig) -> Any:
    """Starts a W&B logger's run now; if W&B cannot start (init error or ``settings.init_timeout``), warns and
    returns a CSV logger in the run directory instead, so no metric is lost."""
    if type(logger).__name__ != "WandbLogger":
        return logger
    # W&B stages the files of logged tables and plots under its data dir (~/.local/share/wandb by default) and
    # syncs them from there: keep them inside the run folder, so a copied run folder syncs whole
    os.environ["WANDB_DATA_DIR"] = str(Path(cfg.paths.output_dir, "wandb").absolute())
    if (cfg.logger.wandb.get("settings") or {}).get(
        "silent"
    ):  # W&B reads it at setup, not from init's settings
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        wandb.setup()  # now: wandb.init warns about the logger's `anonymous` argument before its own setup
    try:
        logger.experiment  # noqa: B018 — the property runs wandb.init
        logger.experiment.config.update({"choices": choices()}, allow_val_change=True)
    except Exception as err:
        warnings.warn(
            f"W&B could not start ({type(err).__name__}: {str(err)[:200]}); logging to CSV in "
            f"{cfg.paths.output_dir}/csv instead",
            RuntimeWarning,
            stacklevel=2,
        )
        return CSVLogger(cfg.paths.output_dir, name="csv")
    return logger


def build_trainer(cfg: DictConfig, start: bool = True, **kwargs: Any) -> pl.Trainer:
    """The ``trainer`` group's Trainer with the ``logger`` and ``callbacks`` groups attached.

    Args:
        cfg: the run config.
        start: start the W&B run now (see :func:`start_loggers`); ``False`` leaves that to the caller, so
            a run that fails on its inputs creates none.
        kwargs: extra Trainer arguments.
    """
    identity = sweep_identity(cfg)
    wandb_node = (cfg.get("logger") or {}).get("wandb")
    if wandb_node is not None and identity and wandb_node.get("name"):  # a name set by the user is kept
        identity.pop("name")
    loggers = build_all(cfg.get("logger"), wandb=identity)
    callbacks = build_all(cfg.get("callbacks"))
    if not loggers:  # Lightning refuses a LearningRateMonitor without a logger; logger=none just drops it
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, **kwargs)
    if start:
        start_loggers(trainer, cfg)
    return trainer


def start_loggers(trainer: pl.Trainer, cfg: DictConfig) -> None:
    """Starts the W&B run on the global-zero process only (the Trainer knows its rank before DDP starts the
    others), so a DDP job is one W&B run; a W&B logger that cannot start is swapped for a CSV logger."""
    if not trainer.is_global_zero:
        return
    started = [_started(logger, cfg) for logger in trainer.loggers]
    if any(new is not old for new, old in zip(started, trainer.loggers, strict=True)):
        trainer.loggers = started
