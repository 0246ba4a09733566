"""The ``extras`` group: what a run prints and logs. The lightning-hydra-template's ``extras`` (print the
config tree, enforce tags, ignore warnings), and the console and log plumbing of ``conf/hydra/default.yaml``.

The console keeps what a user acts on (errors, warnings that are not known to be benign, the run folder, the
final metrics table); the run's ``train.log`` keeps everything, library INFO lines and tracebacks included.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# Warnings known to be benign in cvarch's own use of its libraries, each with the reason it is benign. Matched
# against the start of the message (warnings.filterwarnings' ``message`` is a regex matched at the start).
BENIGN_WARNINGS: dict[str, str] = {
    # pytorch_lightning 2.6's _pytree helper against torch ≥ 2.10's pytree: a deprecation inside Lightning
    r"`isinstance\(treespec, LeafSpec\)` is deprecated": "Lightning's own use of torch's pytree API",
    # cvarch augments on the device in LightningModule.on_after_batch_transfer on purpose (cvarch/module.py)
    r"You have overridden `on_after_batch_transfer` in `LightningModule`": "cvarch's on-device augmentation",
}

# libraries whose INFO lines (GPU available, seed set, checkpoint restored, tips) go to train.log only
CHATTY = ("pytorch_lightning", "lightning_fabric", "lightning", "wandb")


class QuietLibraries(logging.Filter):
    """A logging filter for the console handler: drops the INFO and DEBUG records of ``names`` (and their
    children); their warnings and errors pass, and the file handler (train.log) still gets everything.

    Args:
        names: logger names, e.g. ``pytorch_lightning``.
    """

    def __init__(self, names: Sequence[str] = CHATTY) -> None:
        super().__init__()
        self.names = tuple(names)

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "file_only", False):  # a traceback the console already shows its own way
            return False
        chatty = any(record.name == n or record.name.startswith(n + ".") for n in self.names)
        return record.levelno >= logging.WARNING or not chatty


@contextlib.contextmanager
def logged_failure(logger: logging.Logger) -> Iterator[None]:
    """Around a job: an exception (or Ctrl-C) is written with its traceback to the job's log file (train.log)
    and raised on; the console is left to Hydra's report and cvarch's one-line config errors."""
    try:
        yield
    except (Exception, KeyboardInterrupt) as err:
        message = f"the job failed: {type(err).__name__}: {err}"
        logger.error(message, exc_info=True, extra={"file_only": True})
        raise


def route_library_logs() -> None:
    """Sends Lightning's loggers, which add their own stderr handler at import when the root logger has none
    (as before Hydra configures logging), through the root logger instead: one console filter, and every line
    in train.log. Python warnings are logged too (``logging.captureWarnings``), so train.log holds them."""
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # the library's own console handler, not a user's
                logger.removeHandler(handler)
        logger.propagate = True
    logging.captureWarnings(True)


def ignore_benign_warnings() -> None:
    """Silences :data:`BENIGN_WARNINGS` (and only those) in this process."""
    for pattern in BENIGN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def apply(cfg: DictConfig) -> None:
    """Applies the ``extras`` group at the start of a job.

    Args:
        cfg: the run config; ``cfg.extras`` holds ``ignore_warnings``, ``enforce_tags`` and ``print_config``.

    Raises:
        ValueError: ``extras.enforce_tags`` is true and ``tags`` is empty.
    """
    extras = cfg.get("extras") or {}
    route_library_logs()
    if extras.get("ignore_warnings"):
        ignore_benign_warnings()
    if extras.get("enforce_tags") and not cfg.get("tags"):
        raise ValueError(
            "tags: empty, and extras.enforce_tags=true asks every run to say what it is for; "
            "pass e.g. tags=[baseline,resnet20]"
        )
    if extras.get("print_config"):
        print_config_tree(cfg, order=extras.get("print_config_order") or ())


def print_config_tree(cfg: DictConfig, order: Sequence[str] = ()) -> None:
    """Prints the config as a rich tree, the groups in ``order`` first (lightning-hydra-template's
    ``print_config_tree``); the same text goes to train.log."""
    import rich
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("config", style="dim", guide_style="dim")
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order]
    for key in keys:
        node = cfg[key]
        text = OmegaConf.to_yaml(node, resolve=False) if isinstance(node, DictConfig) else str(node)
        tree.add(str(key)).add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
    log.debug("config:\n%s", OmegaConf.to_yaml(cfg))


def choices() -> dict[str, Any]:
    """The run's config-group choices (Hydra's ``runtime.choices``: ``model=resnet56``, ``norm=none``, …),
    without Hydra's own groups; empty outside a Hydra job."""
    from hydra.core.hydra_config import HydraConfig

    try:
        runtime = HydraConfig.get().runtime
    except ValueError:
        return {}
    return {k: v for k, v in runtime.choices.items() if not k.startswith("hydra/") and v is not None}


class SweepFolder(Callback):
    """A Hydra callback (``hydra.callbacks``): a multirun ends by printing its sweep folder, the argument of
    ``cvarch-report``, as a single run ends by printing its run folder."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        print(Path(config.hydra.sweep.dir).absolute())


def benign(message: str) -> bool:
    """Whether ``message`` is one of :data:`BENIGN_WARNINGS` (for tests and tools that log warnings)."""
    return any(re.match(pattern, message) for pattern in BENIGN_WARNINGS)
