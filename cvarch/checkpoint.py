"""Checkpoints that survive a kill and are data, not code.

Atomic writes, ``weights_only`` loads, received run configs checked before anything is built from them, the
global RNG state exact continuation needs, and what ``resume`` / ``ckpt_path=last`` point at.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from cvarch.config import ConfigError, check_received
from cvarch.runs import find_jobs

log = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # Windows: run folders are not locked
    fcntl = None


def load_checkpoint_file(path: str | Path, key: str = "ckpt_path") -> Any:
    """``torch.load(path, weights_only=True)``: a checkpoint passed around between people is data, and a file
    whose unpickling would run code (a ``__reduce__`` payload) is refused before any of it runs. A file that
    is empty or cut short is named as such, with the intact checkpoints beside it; a state dict holding NaN or
    infinite weights is refused naming its first such tensor.

    Raises:
        FileNotFoundError: naming ``key`` when there is no file.
        ValueError: naming ``key`` and the file when it is empty, truncated or corrupt, holds anything but
            tensors and plain containers, or holds non-finite weights.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{key}: no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{key}: {path} is empty (0 bytes): not a checkpoint{_intact_hint(path)}")
    try:
        blob = _torch_load(path, "cpu")
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):  # a legacy-format pickle cut short
            raise ValueError(
                f"{key}: {path} is truncated or corrupt ({_first_line(err)}){_intact_hint(path)}"
            ) from None
        raise ValueError(  # weights_only's refusal: a pickled global outside the allowed set
            f"{key}: {path} cannot be loaded with weights_only=True, so it is refused (it holds more than "
            f"tensors and plain containers: {_first_line(err)})"
        ) from None
    except Exception as err:  # the zip container or a tensor record is cut short or damaged
        raise ValueError(
            f"{key}: {path} is truncated or corrupt ({type(err).__name__}: {_first_line(err)})"
            f"{_intact_hint(path)}"
        ) from None
    check_finite(blob, f"{key}: {path}")
    return blob


def check_finite(blob: Any, where: str) -> None:
    """Refuses a checkpoint (its ``state_dict``) or a plain state dict whose floating-point tensors hold NaN
    or infinity, naming the first: a diverged run's weights would otherwise evaluate at chance as if real, or
    blame the learning rate of the run that resumes or fine-tunes from them.

    Raises:
        ValueError: naming ``where`` and the tensor.
    """
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        return
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not tensor.isfinite().all():
            bad = int((~tensor.isfinite()).sum())
            raise ValueError(
                f"{where} holds non-finite weights: {name} has {bad} NaN or infinite values of "
                f"{tensor.numel()}; a diverged run's weights are refused (cvarch-train never saves them: the "
                "file was written elsewhere or altered)"
            )


def _torch_load(path: Path, map_location: str) -> Any:
    """The one ``torch.load`` of cvarch: always ``weights_only=True``."""
    return torch.load(path, map_location=map_location, weights_only=True)


def unwritable(folder: Path, err: OSError) -> PermissionError:
    """The error of a run directory that cannot be written, raised before any work."""
    return PermissionError(
        f"paths.output_dir: cannot write the run directory {folder} ({err.strerror}); set paths.log_dir (or "
        "hydra.run.dir) to a writable folder"
    )


def _first_line(err: BaseException) -> str:
    """The first sentence of an exception's message (torch's run to a paragraph), or ``(no message)``."""
    line = (str(err).strip().splitlines() or ["(no message)"])[0]
    return line.split(". ")[0][:300]


def _intact_hint(path: Path) -> str:
    """``"; intact checkpoints beside it: …"``: the other ``.ckpt`` files of its folder that load, newest
    first, or ``""``."""
    intact = []
    for other in sorted(path.parent.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True):
        if other != path and other.stat().st_size > 0:
            try:
                _torch_load(other, "meta")  # shapes only: is it whole?
            except Exception:
                continue
            intact.append(other.name)
    if not intact:
        return ""
    return (
        f"; intact checkpoints beside it: {', '.join(intact)} (continue from one with "
        f"ckpt_path={path.parent / intact[0]})"
    )


def load_trained(
    path: str | Path, trust: Sequence[str] | None = (), key: str = "ckpt_path"
) -> tuple[dict[str, Any], DictConfig]:
    """Loads a checkpoint written by ``cvarch-train`` and the run config saved in it, which is checked as a
    received file (:func:`cvarch.config.check_received`) before anything is built from it. ``cvarch-eval``,
    ``cvarch-ensemble`` and the transfer source all load through here.

    Args:
        path: the ``.ckpt`` file.
        trust: the live invocation's ``trust`` packages (a ``trust`` key saved in the checkpoint is ignored).
        key: the config key that named the file, for messages.

    Raises:
        FileNotFoundError, ValueError: see :func:`load_checkpoint_file`; a checkpoint without a run config.
        ConfigError: a ``_target_`` of the saved config is outside the trusted set.
    """
    path = Path(path).expanduser()
    ckpt = load_checkpoint_file(path, key)
    if not isinstance(ckpt, dict) or "model" not in (ckpt.get("hyper_parameters") or {}):
        raise ValueError(
            f"{key}: {path} was not written by cvarch-train (no run config in its hyperparameters)"
        )
    check_received(ckpt["hyper_parameters"], f"{key}: {path}", trust)
    return ckpt, OmegaConf.create(ckpt["hyper_parameters"])


def write_metrics(metrics: dict[str, Any], output_dir: str | Path) -> Path:
    """Writes ``metrics.json`` to the run directory (atomically: a kill mid-write leaves no half file, so a
    present ``metrics.json`` means a finished run) and returns its path."""
    path = Path(output_dir) / "metrics.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with a write that a kill cannot tear, and loads that run no pickled code.

    Lightning 2.6 writes through an fsspec transaction whose temporary file is in the system temp folder;
    where that is another filesystem than the run directory (a local ``/tmp``, a network home) the final
    ``shutil.move`` is a copy that truncates the old checkpoint first, and a kill mid-copy leaves neither.
    Here the bytes go to a hidden file next to the target, are fsynced, and ``os.replace`` swaps it in: the
    path holds the old checkpoint or the new one, never part of one.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's own transaction
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_save(checkpoint, Path(path))

    def load_checkpoint(
        self, path: str | Path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return load_checkpoint_file(path)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)`` through a same-directory temporary file, fsync and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp*"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:  # the rename itself reaches the disk
        os.fsync(directory)
    finally:
        os.close(directory)


class RunDirBusyError(RuntimeError):
    """Another live process holds the run folder's lock."""


class RunDirLock:
    """An exclusive lock on a run folder for the life of a run (``with RunDirLock(folder):``), so two runs
    started in one ``hydra.run.dir`` cannot mix their ``config.yaml``, checkpoints and ``metrics.json``.

    The lock is an ``flock`` on ``<folder>/.lock``, which records the holder's PID and host. The kernel drops
    it when the holder dies, however it dies, so a stale ``.lock`` of a killed run is simply taken over. Only
    DDP's global rank 0 locks (the other ranks share its folder); where ``fcntl`` is missing (Windows) nothing
    is locked.

    Raises:
        RunDirBusyError: naming the folder and the holder, when a live run holds it.
        PermissionError: naming ``paths.output_dir`` when the folder cannot be created.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.fd: int | None = None

    def __enter__(self) -> RunDirLock:
        if fcntl is None or rank_zero_only.rank != 0:
            return self
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:  # before any work: a run that cannot save its checkpoints must not start
            raise unwritable(self.folder, err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "a process that wrote no PID yet"
            os.close(fd)
            raise RunDirBusyError(
                f"hydra.run.dir: {self.folder} is in use by another cvarch-train run ({holder}); wait for it "
                "to finish, or pass another hydra.run.dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"PID {os.getpid()} on {socket.gethostname()}".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:  # the file stays: unlinking it could let two later runs lock two inodes
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def remove_orphans(callbacks: Sequence[Any]) -> list[Path]:
    """Deletes the checkpoints in the ``ModelCheckpoint`` callbacks' folders that none of them keeps (its
    best k, best and last): after a kill between a new best checkpoint's write and ``last.ckpt``'s, the
    resumed run redoes that epoch and its callbacks no longer know the file, so ``save_top_k`` would never
    remove it. Call it after a resumed fit; returns the deleted paths."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    savers = [c for c in callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
    kept = {
        Path(p).resolve()
        for c in savers
        for p in (*c.best_k_models, c.best_model_path, c.last_model_path)
        if p
    }
    orphans = [
        path
        for folder in {Path(c.dirpath) for c in savers}
        for path in folder.glob("*.ckpt")
        if path.resolve() not in kept
    ]
    for path in orphans:
        log.info("removing %s: a checkpoint of the killed invocation that no callback keeps", path)
        path.unlink(missing_ok=True)
    return orphans


def rng_state() -> dict[str, Any]:
    """The global RNGs' state (torch CPU and CUDA, NumPy, Python) in tensors and plain containers, so that
    ``weights_only`` loads it: dropout, stochastic depth and anything else drawing from the global generators
    continue a resumed run where it stopped."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores :func:`rng_state`'s output."""
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["gauss"],
        )
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def last_checkpoint(cfg: DictConfig) -> Path:
    """Where the run writes ``last.ckpt``: the ``last_checkpoint`` callback's folder and file name."""
    node = (cfg.get("callbacks") or {}).get("last_checkpoint") or {}
    folder = node.get("dirpath") or Path(cfg.paths.output_dir) / "checkpoints"
    return Path(folder) / f"{node.get('filename') or 'last'}.ckpt"


def resume_path(cfg: DictConfig) -> str | None:
    """The checkpoint ``trainer.fit`` continues from: ``ckpt_path`` as given, or with ``resume=true``,
    ``resume=auto`` or ``ckpt_path=last`` the run directory's ``last.ckpt``.

    Lightning on its own warns and trains from scratch when ``ckpt_path="last"`` finds nothing; a resume that
    was asked for must not silently start over, so that is an error here (``resume=auto`` starts fresh: for
    re-running a killed sweep, whose unstarted jobs have no checkpoint yet).

    Raises:
        ConfigError: an unknown ``resume`` value, or ``resume`` together with a ``ckpt_path``.
        FileNotFoundError: ``resume=true`` or ``ckpt_path=last`` and no checkpoint in the run directory.
    """
    resume, ckpt_path = cfg.get("resume", False), cfg.get("ckpt_path")
    if not (isinstance(resume, bool) or resume == "auto"):
        raise ConfigError(f"resume: expected one of false, true, auto; got {resume!r}")
    if resume and ckpt_path:
        raise ConfigError(
            f"resume={resume} and ckpt_path={ckpt_path} both given: resume continues the run directory's "
            "last.ckpt, ckpt_path a checkpoint file of your choice; pass one"
        )
    if not resume and ckpt_path != "last":
        return ckpt_path
    path = last_checkpoint(cfg)
    if path.is_file():
        return str(path)
    if resume == "auto":
        log.info("resume=auto: no checkpoint at %s yet, so the run starts from scratch", path)
        return None
    asked = "ckpt_path=last" if ckpt_path == "last" else "resume=true"
    raise FileNotFoundError(
        f"{asked}: no checkpoint at {path}, so there is nothing to resume. Point the run at the killed run's "
        f"directory with hydra.run.dir=<run dir>{newest_hint(cfg, path)}, or drop {asked} to start a new run"
    )


def newest_hint(cfg: DictConfig, missing: Path) -> str:
    """``" (the newest run of task … with one: <run dir>)"``: among the run folders of this task
    (:func:`cvarch.runs.find_jobs`), the newest that holds the checkpoint ``missing`` names (``checkpoints/
    last.ckpt``), or ``""``."""
    task = str(cfg.get("task_name", "train"))
    relative = Path(missing.parent.name) / missing.name
    candidates = [
        job.dir / relative
        for job in find_jobs(Path(cfg.paths.log_dir) / task)
        if (job.dir / relative).is_file() and job.dir / relative != missing
    ]
    if not candidates:
        return ""
    newest = max(candidates, key=lambda p: p.stat().st_mtime)
    return f" (the newest run of task {task} with one: {newest.parents[1]})"


def check_classes(ckpt: dict[str, Any], path: str | Path, num_classes: int, key: str = "ckpt_path") -> None:
    """Refuses a checkpoint whose model was trained for another number of classes than the data has.

    Raises:
        ValueError: naming ``key`` (the option that pointed at it), the file and both counts.
    """
    saved = ckpt.get("hyper_parameters") or {}  # a model without num_classes was sized to its data
    trained = (saved.get("model") or {}).get("num_classes") or (saved.get("data") or {}).get("num_classes")
    if trained is not None and trained != num_classes:
        raise ValueError(
            f"{key}: {path} was trained for {trained} classes but this run's data has {num_classes} "
            f"(data.num_classes); use the dataset it was trained on, or start a new run from its weights "
            "with transfer.source=<checkpoint>, which replaces the classifier"
        )


def check_fits(module: torch.nn.Module, ckpt: dict[str, Any], path: str, num_classes: int) -> None:
    """Refuses, before any training step, a ``ckpt_path`` whose weights do not fit the run's model: a
    ``num_classes`` that disagrees with the dataset (:func:`check_classes`), or another architecture; names
    the first layers that differ.

    Raises:
        ValueError: naming ``ckpt_path``, the file and the layers (or ``num_classes``).
    """
    theirs = ckpt.get("state_dict")
    if not isinstance(theirs, dict):
        raise ValueError(f"ckpt_path: {path} is not a Lightning checkpoint (it has no state_dict)")
    check_classes(ckpt, path, num_classes)
    problems = state_differences(module.state_dict(), theirs)
    if problems:
        raise ValueError(
            f"ckpt_path: {path} does not fit this run's model ({len(problems)} layers differ: "
            f"{'; '.join(problems[:4])}{' …' if len(problems) > 4 else ''}); resume with the config it was "
            "trained with (its run directory's config.yaml)"
        )


def state_differences(own: Mapping[str, torch.Tensor], theirs: Mapping[str, Any]) -> list[str]:
    """What keeps ``theirs`` (a checkpoint's state dict) from loading strictly into a model whose state dict
    is ``own``: the tensors of another shape, then the layers missing on either side, one line each."""
    wrong = [
        f"{k} is {list(theirs[k].shape)} in the checkpoint, {list(v.shape)} here"
        for k, v in own.items()
        if k in theirs and theirs[k].shape != v.shape
    ]
    missing = _layers(k for k in own if k not in theirs)
    unexpected = _layers(k for k in theirs if k not in own)
    return [*wrong, *(f"{m} missing from the checkpoint" for m in missing)] + [
        f"{m} not in this model" for m in unexpected
    ]


def _layers(keys: Any) -> list[str]:
    """The modules that state-dict keys belong to, in order, once each."""
    return list(dict.fromkeys(k.rpartition(".")[0] for k in keys))
