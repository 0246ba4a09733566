"""The console scripts (``pyproject.toml``'s ``[project.scripts]``): one thin ``@hydra.main`` per tool.

Each imports its tool (torch, Lightning) only once a job runs. Hydra answers ``--help``, ``--cfg`` and tab
completion (``--shell-completion``) before that, so they take Hydra's start-up alone, not the ~5 s of
importing torch and Lightning on each TAB.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import hydra
from omegaconf import DictConfig

CONFIG_PATH = "pkg://cvarch.conf"  # = cvarch.config.CONFIG_PATH, which imports torch (tests check they agree)


def _tool(module: str, config_name: str) -> Callable[[], Any]:
    """The console script of ``module`` (its ``cli(cfg)`` works) on the root config ``config_name``."""

    def task(cfg: DictConfig) -> Any:
        return importlib.import_module(module).cli(cfg)

    # Hydra names the job (and its log file, e.g. train.log) after the task function's module
    task.__module__, task.__qualname__ = module, "cli"
    return hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=config_name)(task)


train = _tool("cvarch.train", "train")
evaluate = _tool("cvarch.eval", "eval")
profile = _tool("cvarch.profile", "profile")
compare = _tool("cvarch.compare", "compare")
ensemble = _tool("cvarch.ensemble", "ensemble")
report = _tool("cvarch.report", "report")
bench = _tool("cvarch.bench", "bench")
quadrants = _tool("cvarch.quadrants", "quadrants")
compress = _tool("cvarch.compress", "compress")
lecture = _tool("cvarch.lecture", "lecture")
