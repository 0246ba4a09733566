"""``cvarch-ensemble runs=[dir,…]|runs=<multirun dir> [split=test] [tta=…]``: average runs' softmax.

Each run's best checkpoint is loaded (model, fitted preprocessing, norm statistics), its class probabilities
on one split are computed (with test-time views if ``tta`` is set), and the ensemble predicts their mean. This
is the lecture's "model ensembles" trick: AlexNet's 7 CNNs took top-5 error from 18.2% to 15.4% (Krizhevsky et
al. 2012 §6). ``experiment=ensemble`` trains N seeds as a multirun and ensembles them when the sweep ends.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cvarch.build import build_trained
from cvarch.config import check_received, plain_config_errors
from cvarch.data import SPLITS
from cvarch.runs import list_jobs, read_job


def run_dirs(runs: str | Path | Sequence[str | Path]) -> list[Path]:
    """Expands ``runs`` into run directories (:func:`cvarch.runs.list_jobs`): a run directory is itself; a
    multirun directory (Hydra's sweep folder) gives its finished jobs (those with a ``metrics.json``), in job
    order.

    Raises:
        FileNotFoundError: naming the entry of ``runs`` that is neither, or whose jobs all lack metrics.
    """
    entries = [runs] if isinstance(runs, (str, Path)) else list(runs)
    found: list[Path] = []
    for entry in entries:
        path = Path(entry).expanduser()
        try:
            jobs = list_jobs(path)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"runs: {err}") from None
        for job in jobs:
            if job.problem and job.dir != path:
                warnings.warn(f"runs: {job.dir} left out: {job.problem}", RuntimeWarning, stacklevel=2)
        # a run directory named directly is used as it is: its checkpoints serve even if it did not finish
        dirs = [job.dir for job in jobs if job.finished or job.dir == path]
        if not dirs:
            raise FileNotFoundError(
                f"runs: none of the {len(jobs)} jobs of the multirun directory {path} finished "
                "(no */metrics.json)"
            )
        found.extend(dirs)
    return found


@torch.inference_mode()
def predict(
    ckpt_path: Path,
    split: str,
    data: DictConfig | None = None,
    tta: DictConfig | None = None,
    device: str | torch.device = "cpu",
    trust: Sequence[str] | None = (),
) -> tuple[torch.Tensor, torch.Tensor, DictConfig]:
    """Class probabilities of one checkpoint on one split.

    Args:
        ckpt_path: a checkpoint written by ``cvarch-train``.
        split: ``test``, ``val`` or ``train`` of the checkpoint's dataset (or of ``data``).
        data: a ``data`` group node to evaluate on instead of the run's own.
        tta: a ``tta`` group node; ``None`` keeps the run's own test-time views.
        device: where the model runs.
        trust: the live invocation's ``trust`` packages (see :func:`cvarch.checkpoint.load_trained`).

    Returns:
        ``(probabilities (N, K), targets (N,), the data config used)``.
    """
    module, datamodule, _, data_cfg = build_trained(ckpt_path, data=data, tta=tta, trust=trust, key="runs")
    module = module.to(device).eval()
    probs, targets = [], []
    for x, y in datamodule.dataloader(split):
        x = x.to(device)
        probs.append(module.tta.predict(module.logits, x).float().cpu())
        targets.append(y)
    return torch.cat(probs), torch.cat(targets), data_cfg


def topk_accuracy(probs: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Share of rows whose target is among the ``k`` largest probabilities (torchmetrics' top-k accuracy)."""
    from torchmetrics.functional.classification import multiclass_accuracy

    classes = probs.shape[1]
    return multiclass_accuracy(probs, targets, classes, top_k=min(k, classes), average="micro").item()


def ensemble(
    runs: str | Path | Sequence[str | Path],
    split: str = "test",
    tta: DictConfig | None = None,
    data: DictConfig | None = None,
    device: str | None = None,
    trust: Sequence[str] | None = (),
) -> dict[str, Any]:
    """Evaluates each run's best checkpoint and the mean of their softmax outputs on one split.

    Args:
        runs: run directories and/or multirun directories (see :func:`run_dirs`).
        split: ``test`` | ``val`` | ``train``; every member must have been trained on the same data config.
        tta: a ``tta`` group node applied to every member; ``None`` keeps each run's own.
        data: a ``data`` group node to evaluate on instead of the runs' own.
        device: ``cuda`` or ``cpu``; by default CUDA when available.
        trust: packages whose targets the runs' configs may build beyond cvarch's own (a run folder someone
            sent you is data: its ``config.yaml`` and checkpoint configs are checked before any build).

    Returns:
        ``{"members": [{run, ckpt, acc, acc_top5}], "ensemble": {acc, acc_top5}, "mean_member": {…},
        "best_member": {…}, "gain": {acc, acc_top5} (ensemble − mean member), "gain_over_best": {…}, …}``.

    Raises:
        ValueError: when the members' splits differ (their labels in order), as with different data configs.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dirs = run_dirs(runs)
    members, total, targets = [], None, None
    for run in dirs:
        config = run / "config.yaml"  # what the folder says it ran: refused like the checkpoint's config
        if config.is_file():
            check_received(OmegaConf.load(config), f"runs: {config}", trust)
        ckpt = read_job(run).best_checkpoint()
        probs, y, _ = predict(ckpt, split, data=data, tta=tta, device=device, trust=trust)
        if targets is None:
            targets = y
        elif not torch.equal(y, targets):
            raise ValueError(
                f"runs: {run} was trained on other data than {dirs[0]} (their {split} splits differ); "
                f"an ensemble must be evaluated on one split"
            )
        members.append(
            {
                "run": str(run),
                "ckpt": str(ckpt),
                "acc": topk_accuracy(probs, y, 1),
                "acc_top5": topk_accuracy(probs, y, 5),
            }
        )
        total = probs if total is None else total + probs
    mean = total / len(members)
    result = {"acc": topk_accuracy(mean, targets, 1), "acc_top5": topk_accuracy(mean, targets, 5)}
    mean_member = {k: statistics.fmean(m[k] for m in members) for k in ("acc", "acc_top5")}
    best_member = {k: max(m[k] for m in members) for k in ("acc", "acc_top5")}
    return {
        "split": split,
        "images": len(targets),
        "members": members,
        "ensemble": result,
        "mean_member": mean_member,
        "best_member": best_member,
        "gain": {k: result[k] - mean_member[k] for k in result},
        "gain_over_best": {k: result[k] - best_member[k] for k in result},
    }


def table(report: dict[str, Any]) -> str:
    """The report as a markdown table: one row per member, then the mean member, the ensemble and the gain."""
    rows = ["| model | top-1 % | top-5 % |", "|---|---|---|"]
    for i, m in enumerate(report["members"]):
        rows.append(f"| member {i}: {m['run']} | {100 * m['acc']:.2f} | {100 * m['acc_top5']:.2f} |")
    for name, key in (("mean of members", "mean_member"), ("ensemble", "ensemble")):
        rows.append(f"| {name} | {100 * report[key]['acc']:.2f} | {100 * report[key]['acc_top5']:.2f} |")
    gain = report["gain"]
    rows.append(f"| gain (ensemble − mean) | {100 * gain['acc']:+.2f} | {100 * gain['acc_top5']:+.2f} |")
    return "\n".join(rows)


def run(cfg: DictConfig) -> dict[str, Any]:
    """``cvarch-ensemble`` as a function: ensembles ``cfg.runs``, writes ``ensemble.json``, prints a table."""
    start = time.perf_counter()
    report = ensemble(
        cfg.runs,
        split=cfg.split,
        tta=cfg.get("tta"),
        data=cfg.get("data"),
        device=cfg.device,
        trust=cfg.get("trust"),
    )
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report["wall_s"] = round(time.perf_counter() - start, 2)
    report["output_dir"] = str(output_dir)
    (output_dir / "ensemble.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    return report


class EnsembleCallback(Callback):
    """Hydra callback of ``experiment=ensemble``: when the multirun ends, ensembles its finished jobs and
    writes ``ensemble.json`` into the sweep directory.

    Args:
        split: the split evaluated.
    """

    def __init__(self, split: str = "test") -> None:
        self.split = split

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        report = ensemble(sweep_dir, split=self.split, trust=config.get("trust"))
        (sweep_dir / "ensemble.json").write_text(json.dumps(report, indent=2) + "\n")
        print(table(report))
        print(sweep_dir)


def cli(cfg: DictConfig) -> None:
    """``cvarch-ensemble runs=…``; the last line printed is the output directory (with ensemble.json)."""
    with plain_config_errors("cvarch-ensemble"):
        report = run(cfg)
    print(report["output_dir"])


if __name__ == "__main__":  # python -m cvarch.ensemble, as torchrun, srun and DDP re-launches start it
    from cvarch.cli import ensemble

    ensemble()
