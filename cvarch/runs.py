"""Reading run folders: the jobs of a run or sweep folder, with overrides, metrics, config and checkpoints.

A run folder is what ``cvarch-train`` leaves: ``.hydra/`` (Hydra's ``overrides.yaml`` and ``hydra.yaml``),
``config.yaml``, ``checkpoints/*.ckpt`` and, once the run finished, ``metrics.json`` (written atomically by
:func:`cvarch.checkpoint.write_metrics`, so its presence means the run finished). A sweep folder (Hydra's
multirun directory) holds one run folder per job: ``0/``, ``1/``, …. ``cvarch-report``, ``cvarch-ensemble``,
``cvarch-compare``, the transfer quadrants and the resume hint all read folders through here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

RUN_MARKERS = (".hydra", "metrics.json", "checkpoints")  # any of them makes a folder a run folder


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` is a run folder: it holds ``.hydra/``, ``metrics.json`` or ``checkpoints/``."""
    return any((Path(path) / marker).exists() for marker in RUN_MARKERS)


@dataclass(frozen=True)
class Job:
    """One run folder.

    Args:
        dir: the folder.
        overrides: the command-line overrides of ``.hydra/overrides.yaml`` as ``{key: value}``, values as
            typed (``{"norm": "none", "seed": "1"}``); ``{}`` without the file.
        metrics: ``metrics.json``, or ``None`` while the run is unfinished (or failed), or when the file
            cannot be read.
        problem: why ``metrics.json`` could not be read (not JSON, not a mapping), or ``None``.
    """

    dir: Path
    overrides: dict[str, str]
    metrics: dict[str, Any] | None
    problem: str | None = None

    @property
    def name(self) -> str:
        """The folder's name: the job number in a sweep."""
        return self.dir.name

    @property
    def finished(self) -> bool:
        """Whether the run wrote its ``metrics.json``."""
        return self.metrics is not None

    @property
    def checkpoints(self) -> list[Path]:
        """``checkpoints/*.ckpt``, sorted by name."""
        return sorted((self.dir / "checkpoints").glob("*.ckpt"))

    def config(self) -> dict[str, Any] | None:
        """The run's resolved config (``config.yaml``, saved by ``cvarch-train``), or ``None``. It is data:
        check it with :func:`cvarch.config.check_received` before building anything from it."""
        path = self.dir / "config.yaml"
        return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else None

    def choices(self) -> dict[str, str]:
        """The config group options Hydra recorded (``.hydra/hydra.yaml``): ``{"model": "resnet20", …}``."""
        path = self.dir / ".hydra" / "hydra.yaml"
        if not path.is_file():
            return {}
        runtime = (yaml.safe_load(path.read_text()) or {}).get("hydra", {}).get("runtime", {})
        return dict(runtime.get("choices") or {})

    def best_checkpoint(self) -> Path:
        """The best checkpoint (``metrics.json``'s ``best_ckpt``), else the last-named non-``last``
        checkpoint, else ``last.ckpt``.

        Raises:
            FileNotFoundError: naming the folder when it holds no checkpoint.
        """
        best = (self.metrics or {}).get("best_ckpt")
        if best and Path(best).is_file():
            return Path(best)
        candidates = self.checkpoints
        kept = [p for p in candidates if p.stem != "last"]
        if kept or candidates:
            return (kept or candidates)[-1]
        raise FileNotFoundError(f"no checkpoint in {self.dir}/checkpoints")


def read_job(path: str | Path) -> Job:
    """The :class:`Job` of one run folder (missing files read as ``{}`` overrides and ``None`` metrics)."""
    path = Path(path).expanduser()
    overrides_file = path / ".hydra" / "overrides.yaml"
    lines = (yaml.safe_load(overrides_file.read_text()) or []) if overrides_file.is_file() else []
    metrics, problem = _read_metrics(path / "metrics.json")
    return Job(dir=path, overrides=dict(_key_value(str(o)) for o in lines), metrics=metrics, problem=problem)


def _read_metrics(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(metrics, None)``, ``(None, None)`` without the file, or ``(None, why)`` when it cannot be read: a
    bad job is reported beside the others, never the reason a whole report fails."""
    if not path.is_file():
        return None, None
    try:
        metrics = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        return None, f"{path.name} is not valid JSON ({err})"
    if not isinstance(metrics, dict):
        return None, f"{path.name} holds a {type(metrics).__name__}, not a mapping of metrics"
    return metrics, None


def _key_value(override: str) -> tuple[str, str]:
    """``"norm=none"`` → ``("norm", "none")``; a deletion (``~key``) has no value: ``("~key", "")``."""
    key, _, value = override.partition("=")
    return key, value


def _job_order(path: Path) -> tuple[bool, int, str]:
    """Hydra's job numbers in numeric order (``0, 1, 2, 10``), then other folders (``source``) by name."""
    return (not path.name.isdigit(), int(path.name) if path.name.isdigit() else 0, path.name)


def list_jobs(folder: str | Path) -> list[Job]:
    """The jobs of a run or sweep folder, finished or not: the folder itself when it is a run folder, else
    each run folder directly inside it (a multirun's ``0/``, ``1/``, …, and any other, such as the transfer
    quadrants' ``source/``), in job order.

    Raises:
        FileNotFoundError: naming the folder when it is neither a run folder nor holds one.
    """
    folder = Path(folder).expanduser()
    if is_run_dir(folder):
        return [read_job(folder)]
    children = sorted((p for p in folder.glob("*") if p.is_dir() and is_run_dir(p)), key=_job_order)
    if not children:
        raise FileNotFoundError(
            f"{folder}: neither a run folder nor a sweep folder of them (no .hydra/, metrics.json or "
            "checkpoints/ in it or in its subfolders)"
        )
    return [read_job(p) for p in children]


def find_jobs(root: str | Path) -> list[Job]:
    """Every run folder under ``root``, at any depth (``logs/train/runs/<time>``,
    ``logs/train/multiruns/<time>/<n>``), sorted by path. A run folder is not searched further, nor are
    hidden folders; a missing ``root`` has none."""
    found = []
    for current, subfolders, _ in os.walk(Path(root).expanduser()):
        if is_run_dir(current):
            found.append(Path(current))
            subfolders.clear()
        else:
            subfolders[:] = [s for s in subfolders if not s.startswith(".")]
    return [read_job(p) for p in sorted(found)]
