"""``cvarch-train``: one training job as a plain function, :func:`train`; :func:`cli` runs it for Hydra."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from cvarch import extras
from cvarch.build import (
    build_inputs,
    build_model,
    build_module,
    build_trainer,
    build_transfer,
    init_batch,
    start_loggers,
)
from cvarch.checkpoint import (
    RunDirLock,
    check_fits,
    last_checkpoint,
    load_checkpoint_file,
    remove_orphans,
    resume_path,
    unwritable,
    write_metrics,
)
from cvarch.config import ConfigError, plain_config_errors, validate
from cvarch.cost import count_macs

log = logging.getLogger(__name__)

METRIC_KEYS = (
    "train/loss",
    "val/acc",
    "val/acc_top5",
    "test/acc",
    "test/acc_top5",
    "test/acc_tta",
    "test/acc_tta_top5",
)
STAGE_METRIC = re.compile(r"(val|test)/acc_stage\d+")  # transfer=stage_probes: one accuracy per stage


def finished_run(output_dir: Path, cfg: DictConfig) -> dict[str, Any] | None:
    """The metrics of a run that already finished in ``output_dir`` with this config (``resume`` and
    ``ckpt_path`` aside), else ``None``: re-running a sweep with the same ``hydra.sweep.dir`` and overrides
    skips its finished jobs."""
    metrics_file, config_file = output_dir / "metrics.json", output_dir / "config.yaml"
    if not (metrics_file.is_file() and config_file.is_file()):
        return None
    try:
        metrics = json.loads(metrics_file.read_text())
        same = _job_config(OmegaConf.load(config_file)) == _job_config(cfg)
    except (ValueError, OSError):
        return None
    return metrics if same and "test/acc" in metrics else None


def check_fresh_start(cfg: DictConfig, ckpt_path: str | None) -> None:
    """Refuses to start a run from scratch in a folder that holds a killed run's checkpoints (no
    ``metrics.json``): training would overwrite its ``last.ckpt``, the one thing a resume needs.

    Raises:
        FileExistsError: naming the folder, its checkpoints, and the two ways on.
    """
    folder = last_checkpoint(cfg).parent
    if ckpt_path or (Path(cfg.paths.output_dir) / "metrics.json").is_file():
        return
    kept = sorted(p.name for p in folder.glob("*.ckpt"))
    if kept:
        raise FileExistsError(
            f"hydra.run.dir: {cfg.paths.output_dir} holds the checkpoints of a run that did not finish "
            f"({', '.join(kept)}); a fresh start would overwrite them. Pass resume=true to continue it "
            "(resume=auto when re-running a sweep), or another hydra.run.dir"
        )


def _job_config(cfg: DictConfig) -> str:
    """The config as a sweep job is identified: how it was (re)started (``resume``, ``ckpt_path``) and what
    the invocation trusted (``trust``) left out."""
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("resume", "ckpt_path", "trust")])
    return OmegaConf.to_yaml(job)


def model_cost(model: torch.nn.Module, image_shape: tuple[int, int, int]) -> dict[str, float]:
    """Parameters and GMACs of one forward pass of one image (PyTorch's FlopCounterMode / 2)."""
    was_training = model.training
    model.eval()  # no running-statistics update from the probe image
    macs = count_macs(model, torch.zeros(1, *image_shape, device=next(model.parameters()).device))
    model.train(was_training)
    return {"params": sum(p.numel() for p in model.parameters()), "gmacs": macs / 1e9}


def log_summary(trainer: pl.Trainer, values: dict[str, float]) -> None:
    """Puts run-level figures (params, GMACs) into the W&B run summary (global-zero process only)."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            logger.experiment.summary.update(values)


def finish_loggers(trainer: pl.Trainer) -> None:
    """Closes each logger's run, so every job of a multirun is its own W&B run."""
    for logger in trainer.loggers:
        if type(logger).__name__ != "WandbLogger":
            logger.finalize("success")
            continue
        import wandb  # the logger's run is wandb.run; `logger.experiment` would start one if none had started

        if wandb.run is not None:
            offline, sync_dir = wandb.run.settings.mode in ("offline", "dryrun"), wandb.run.settings.sync_dir
            wandb.run.finish()
            if offline:  # quiet W&B prints nothing: say how the run reaches the W&B server
                log.info("W&B run saved offline; upload it with: wandb sync %s", sync_dir)


def job_threads(cfg: DictConfig) -> int | None:
    """Torch threads for this job: ``threads`` if set, else the cores shared among the launcher's parallel
    jobs (``hydra/launcher=joblib``'s ``n_jobs``; -1 means one job per core), so parallel jobs do not
    oversubscribe the CPU. ``None`` keeps torch's default (one job at a time)."""
    if cfg.get("threads"):
        return int(cfg.threads)
    try:
        n_jobs = HydraConfig.get().launcher.get("n_jobs")
    except ValueError:  # no Hydra run (the Python API without compose)
        return None
    if n_jobs is None:
        return None
    cores = os.cpu_count() or 1
    return 1 if n_jobs < 0 else max(1, cores // int(n_jobs))


def check_launch(cfg: DictConfig) -> None:
    """Makes DDP safe inside a local multirun, before any work: Lightning's ``ddp`` launcher re-runs the
    command line in each new process, which in a multirun (``-m``) would start the whole sweep again in each.
    There ``trainer.strategy=ddp`` becomes ``ddp_spawn`` (the same algorithm; the processes are spawned inside
    the job), with a warning, and the run's config.yaml records it.

    Processes started from outside (torchrun, ``srun``, the submitit SLURM launcher) are left alone: Lightning
    then starts none itself. In a single run they get a warning unless ``hydra.run.dir`` is given, since the
    time-stamped default can differ between processes that start in different seconds."""
    from hydra.types import RunMode

    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:  # the Python API without Hydra
        return
    if external_launch():
        if hydra_cfg.mode == RunMode.RUN and not any(
            o.startswith("hydra.run.dir=") for o in hydra_cfg.overrides.hydra
        ):
            warnings.warn(
                "started by torchrun/srun with the time-stamped default "
                "hydra.run.dir: processes that start in different seconds get different run directories; "
                "pass one directory to all, e.g. hydra.run.dir=logs/train/runs/$SLURM_JOB_ID",
                RuntimeWarning,
                stacklevel=2,
            )
        return
    processes = int(cfg.trainer.get("devices") or 1) * int(cfg.trainer.get("num_nodes") or 1)
    if cfg.trainer.get("strategy") == "ddp" and processes > 1 and hydra_cfg.mode == RunMode.MULTIRUN:
        warnings.warn(
            f"trainer.strategy=ddp with {processes} processes in a local multirun: using ddp_spawn, because "
            "Lightning's ddp launcher re-runs the command line (the whole sweep) in each process",
            RuntimeWarning,
            stacklevel=2,
        )
        cfg.trainer.strategy = "ddp_spawn"
        # the spawned processes re-attach to rank 0's W&B run; media they log (test tables) are written under
        # WANDB_DIR, which would otherwise be the working directory
        os.environ["WANDB_DIR"] = str(cfg.paths.output_dir)


def external_launch() -> bool:
    """Whether torchrun or SLURM ``srun`` started this process: Lightning's own detection, under which its
    launcher starts no process itself."""
    from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    return TorchElasticEnvironment.detect() or SLURMEnvironment.detect()


def train(cfg: DictConfig) -> dict[str, Any]:
    """Trains, validates and tests the best checkpoint of one run; writes config.yaml and metrics.json.

    Everything that can fail on bad input (config types, data paths, undecodable files, input size) is checked
    before the first training step.

    Args:
        cfg: a composed config (from ``cvarch.compose`` or ``@hydra.main``).

    Returns:
        The metrics written to ``metrics.json``.
    """
    start = time.perf_counter()
    extras.apply(cfg)
    configure(cfg)
    transfer = build_transfer(cfg)
    source_preprocess = transfer.adopt(cfg)  # a cvarch source brings its model and preprocess into the config
    ckpt_path = resume_path(cfg)  # ckpt_path, or the run directory's last.ckpt for resume / ckpt_path=last
    key = "ckpt_path" if cfg.get("ckpt_path") else f"resume={cfg.get('resume')}"
    ckpt = load_checkpoint_file(ckpt_path, key) if ckpt_path else None  # refused now: missing, corrupt, code
    check_launch(cfg)
    with RunDirLock(cfg.paths.output_dir):  # a second run in this folder is refused, naming the first
        done = finished_run(Path(cfg.paths.output_dir), cfg)
        if done is not None:
            log.info(
                "%s already holds a finished run of this config (metrics.json): skipped", cfg.paths.output_dir
            )
            return done
        check_fresh_start(cfg, ckpt_path)
        return run(cfg, transfer, source_preprocess, ckpt_path, ckpt, start)


def run(
    cfg: DictConfig,
    transfer: Any,
    source_preprocess: Any,
    ckpt_path: str | None,
    ckpt: dict[str, Any] | None,
    start: float,
) -> dict[str, Any]:
    """The run itself, in its locked folder: builds the inputs, model and module, fits and tests, and writes
    ``metrics.json`` (``train``'s arguments: the checked transfer, resume checkpoint and start time)."""
    trainer = build_trainer(cfg, start=False)  # knows this process's DDP rank; W&B starts after the checks
    output_dir = make_run_dir(cfg, trainer)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, preprocess, augment = build_inputs(cfg, source_preprocess)
    input_shape = augment.output_shape(datamodule.image_shape)  # what the model sees
    batch = init_batch(cfg, datamodule, preprocess, input_shape)
    model = build_model(cfg, image_shape=input_shape, batch=batch, transfer=transfer)
    cost = model_cost(model, input_shape)
    module = build_module(cfg, model, preprocess=preprocess, augment=augment, transfer=transfer)
    module.wall_start = start  # the checkpoints' wall_s_total counts from the start of train()
    before = 0.0  # wall-clock seconds of the invocations a resume continues
    if ckpt is not None:
        check_fits(module, ckpt, ckpt_path, num_classes=cfg.data.num_classes)
        before = float(ckpt.get("wall_s_total", 0.0))
        del ckpt  # Lightning loads it again in fit
    start_loggers(trainer, cfg)
    try:
        log_summary(trainer, cost)
        results = fit_and_test(trainer, module, datamodule, ckpt_path, fit=cfg.train, test=cfg.test)
    except SIGTERMException:  # Lightning stopped at the step after the signal: exit as preempted, not 0
        raise SystemExit(preempted(cfg, trainer)) from None
    finally:
        finish_loggers(trainer)
    metrics = {
        **results,
        "epochs": trainer.current_epoch,
        "wall_s": round(time.perf_counter() - start, 2),  # this invocation
        "wall_s_total": round(before + time.perf_counter() - start, 2),  # and those it continues
        "threads": torch.get_num_threads(),
        **cost,
        "resumed_from": ckpt_path,
        "output_dir": str(output_dir),
    }
    if trainer.is_global_zero:
        write_metrics(metrics, output_dir)
    return metrics


SIGTERM_EXIT = 143  # 128 + SIGTERM: the shell's, SLURM's and submitit's reading of "terminated"


def preempted(cfg: DictConfig, trainer: pl.Trainer) -> int:
    """Says on stderr where a SIGTERM (SLURM preemption, ``scancel``, ``kill``) stopped the run and how it
    continues; returns the exit status, 143. No ``metrics.json`` is written, so ``resume=auto`` (a re-run
    sweep) continues the run from ``last.ckpt``, the end of its last full epoch: a mid-epoch checkpoint would
    not resume bit-identically, as cvarch's resumes do, since the batch order is drawn per epoch."""
    last = last_checkpoint(cfg)
    epoch = getattr(trainer.lightning_module, "checkpoint_epoch", None)  # not re-read: SLURM's grace is short
    where = (
        f"{last} (end of epoch {epoch}) continues it"
        if last.is_file() and epoch is not None
        else f"no epoch had finished, so it starts over ({last} does not exist yet)"
    )
    message = (
        f"cvarch-train: SIGTERM: stopped at global step {trainer.global_step} "
        f"(epoch {trainer.current_epoch}) of {cfg.paths.output_dir}; {where} with resume=true, or "
        "resume=auto when re-running a sweep"
    )
    log.error(message)
    print(message, file=sys.stderr)
    return SIGTERM_EXIT


def configure(cfg: DictConfig) -> None:
    """Sets this job's torch threads, resolves and validates ``cfg``, and checks ``optimized_metric``."""
    threads = job_threads(cfg)
    if threads:
        torch.set_num_threads(threads)
    OmegaConf.resolve(cfg)
    validate(cfg)
    metric = cfg.get("optimized_metric")
    if metric is not None and metric not in METRIC_KEYS and not STAGE_METRIC.fullmatch(metric):
        raise ConfigError(
            f"optimized_metric={metric!r} is not a metric cvarch-train writes; expected one of "
            f"{', '.join(METRIC_KEYS)} or (transfer=stage_probes) val/acc_stage<k>"
        )


def make_run_dir(cfg: DictConfig, trainer: pl.Trainer) -> Path:
    """Creates the run directory and writes config.yaml there (rank 0 only: DDP's other ranks share it)."""
    output_dir = Path(cfg.paths.output_dir)
    if trainer.is_global_zero:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(cfg, output_dir / "config.yaml")
        except OSError as err:  # before any work: a run that cannot save its checkpoints must not start
            raise unwritable(output_dir, err) from None
    return output_dir


def fit_and_test(
    trainer: pl.Trainer,
    module: pl.LightningModule,
    datamodule: Any,
    ckpt_path: str | None,
    fit: bool = True,
    test: bool = True,
) -> dict[str, Any]:
    """Fits (from ``ckpt_path`` if given), then validates and tests the best checkpoint (the last weights when
    no checkpoint was kept); returns ``train/loss``, the val and test metrics and ``best_ckpt``.

    Args:
        fit: ``train=false`` skips fitting: the weights of ``ckpt_path`` (else the model as built, e.g. from
            ``init_from``) are validated and tested.
        test: ``test=false`` stops after fitting: no validation or test metrics.
    """
    best = ckpt_path if not fit else None
    if fit:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        if ckpt_path and trainer.is_global_zero:  # a killed invocation may have left a best file nobody keeps
            remove_orphans(trainer.checkpoint_callbacks)
        callback = trainer.checkpoint_callback
        best = (callback.best_model_path if isinstance(callback, ModelCheckpoint) else "") or None
    train_loss = trainer.callback_metrics.get("train/loss")
    if not test:
        return {"train/loss": float(train_loss) if train_loss is not None else None, "best_ckpt": best}
    # no validation split (data.val_fraction=0): validate returns no results, and the last weights are tested
    val = next(iter(trainer.validate(module, datamodule=datamodule, ckpt_path=best, verbose=False)), {})
    test = trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=True)[0]
    return {
        "train/loss": float(train_loss) if train_loss is not None else None,
        **{k: float(v) for k, v in {**val, **test}.items() if k in METRIC_KEYS or STAGE_METRIC.fullmatch(k)},
        "best_ckpt": best,
    }


def cli(cfg: DictConfig) -> float:
    """``cvarch-train [overrides]``; the last line printed is the run directory. A job that fails leaves its
    traceback in its train.log (the console gets Hydra's report, or the one-line config error)."""
    with plain_config_errors("cvarch-train"), extras.logged_failure(log):
        metrics = train(cfg)
    print(metrics["output_dir"])
    return metrics.get(cfg.optimized_metric)  # what a Hydra sweeper (hparams_search) optimizes


if __name__ == "__main__":  # python -m cvarch.train, as torchrun, srun and DDP re-launches start it
    from cvarch.cli import train

    train()
