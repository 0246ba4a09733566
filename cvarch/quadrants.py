"""The lecture's transfer-learning table, measured: ``experiment=transfer_quadrants`` and its report.

The lecture's advice, one ``transfer`` option per cell (Yosinski et al. 2014; Razavian et al. 2014):

|                      | very similar dataset | very different dataset |
|----------------------|----------------------|------------------------|
| very little data     | ``linear_probe``     | ``stage_probes``       |
| quite a lot of data  | ``finetune_top``     | ``finetune_all``       |

:class:`QuadrantsCallback` trains the source once into the sweep folder before the first job, and writes the
report when the multirun ends; ``python -m cvarch.quadrants sweep_dir=<sweep dir> readme=README.md`` rewrites
it from a finished (or partial) sweep, and puts its table into the README.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cvarch.runs import list_jobs, read_job
from cvarch.transfer import STRATEGIES

# the lecture's table: (data amount, dataset) → the strategy it recommends
LECTURE = {
    ("little", "similar"): "linear_probe",
    ("little", "different"): "stage_probes",
    ("more", "similar"): "finetune_top",
    ("more", "different"): "finetune_all",
}
DATASETS = {"cifar10_last5": "similar", "digits_rgb32": "different"}
ROWS = (("little", "very little data"), ("more", "quite a lot of data"))
COLUMNS = (("similar", "very similar dataset"), ("different", "very different dataset"))


def job_accuracy(metrics: dict[str, Any]) -> tuple[float, str | None]:
    """A job's test accuracy; for stage probes, that of the stage with the best validation accuracy (the
    stage is chosen on val, reported on test). Returns ``(accuracy, chosen stage or None)``."""
    stages = sorted(k.removeprefix("val/acc_") for k in metrics if re.fullmatch(r"val/acc_stage\d+", k))
    if stages:
        best = max(stages, key=lambda s: (metrics[f"val/acc_{s}"], s))
        return float(metrics[f"test/acc_{best}"]), best
    return float(metrics["test/acc"]), None


def collect(sweep_dir: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Every job of a quadrant sweep: ``(finished jobs, unfinished job folders)``.

    A job is identified by its sweep overrides (``.hydra/overrides.yaml``): ``data``,
    ``data.train_per_class``, ``transfer`` and ``seed``; folders without ``data`` and ``transfer`` overrides
    (the source run) are skipped.

    Raises:
        FileNotFoundError: naming the folder when it holds no job (:func:`cvarch.runs.list_jobs`).
    """
    finished, failed = [], []
    for job in list_jobs(sweep_dir):
        overrides, metrics = job.overrides, job.metrics
        if not {"data", "transfer"} <= overrides.keys():  # not a job of the table (the source run)
            continue
        if metrics is None:
            failed.append(job.name)
            continue
        accuracy, stage = job_accuracy(metrics)
        finished.append(
            {
                "job": job.name,
                "dataset": DATASETS.get(overrides["data"], overrides["data"]),
                "amount": "little" if overrides.get("data.train_per_class", "null") != "null" else "more",
                "train_per_class": overrides.get("data.train_per_class"),
                "strategy": overrides["transfer"],
                "seed": int(overrides.get("seed", 0)),
                "test_acc": accuracy,
                "stage": stage,
                "wall_s": metrics.get("wall_s"),
            }
        )
    return finished, failed


def summarize(jobs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std (sample std, n−1) of the test accuracy per cell and strategy, and each cell's best."""
    groups: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    stages: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for job in jobs:
        key = (job["amount"], job["dataset"], job["strategy"])
        groups[key].append(job["test_acc"])
        if job["stage"]:
            stages[key].append(job["stage"])
    cells: dict[str, Any] = {}
    for (amount, dataset, strategy), accs in sorted(groups.items()):
        cell = cells.setdefault(f"{amount}/{dataset}", {"strategies": {}})
        cell["strategies"][strategy] = {
            "mean": statistics.fmean(accs),
            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "n": len(accs),
            "accs": accs,
            **({"stages": stages[amount, dataset, strategy]} if stages[amount, dataset, strategy] else {}),
        }
    for name, cell in cells.items():
        amount, dataset = name.split("/")
        cell["best"] = max(cell["strategies"], key=lambda s: cell["strategies"][s]["mean"])
        cell["lecture"] = LECTURE[amount, dataset]
    return {"cells": cells, "jobs": len(jobs)}


def markdown(summary: dict[str, Any], failed: Sequence[str] = ()) -> str:
    """The 2×2 table (test accuracy %, mean ± std over seeds; best per cell in bold and marked ★, the
    lecture's recommendation marked ◆), then the cells' winners against the lecture."""
    cells = summary["cells"]

    def cell_text(name: str) -> str:
        cell = cells.get(name)
        if cell is None:
            return "—"
        lines = []
        for strategy in STRATEGIES:
            s = cell["strategies"].get(strategy)
            if s is None:
                continue
            text = f"{strategy} {100 * s['mean']:.1f} ± {100 * s['std']:.1f}"
            if strategy == cell["lecture"]:
                text += " ◆"
            lines.append(f"**{text} ★**" if strategy == cell["best"] else text)
        return "<br>".join(lines)

    out = ["| | " + " | ".join(title for _, title in COLUMNS) + " |", "|---|---|---|"]
    for amount, title in ROWS:
        out.append(f"| {title} | " + " | ".join(cell_text(f"{amount}/{d}") for d, _ in COLUMNS) + " |")
    n = sorted({s["n"] for c in cells.values() for s in c["strategies"].values()})
    out += [
        "",
        f"Test accuracy %, mean ± std over {'/'.join(map(str, n))} seeds; ★ best, ◆ the lecture's advice.",
        "",
    ]
    for amount, row in ROWS:
        for dataset, column in COLUMNS:
            cell = cells.get(f"{amount}/{dataset}")
            if cell is None:
                continue
            verdict = "agrees" if cell["best"] == cell["lecture"] else "disagrees"
            out.append(
                f"- {row}, {column}: best `{cell['best']}`; the lecture says `{cell['lecture']}` ({verdict})."
            )
    if failed:
        out.append(f"- unfinished jobs (no metrics.json): {', '.join(failed)}")
    return "\n".join(out) + "\n"


def report(sweep_dir: str | Path) -> dict[str, Any]:
    """Writes ``quadrants.json`` and ``quadrants.md`` into the sweep folder and returns the summary."""
    sweep_dir = Path(sweep_dir)
    jobs, failed = collect(sweep_dir)
    if not jobs:
        raise FileNotFoundError(
            f"{sweep_dir}: no finished job (no */metrics.json next to */.hydra/overrides.yaml)"
        )
    summary = {**summarize(jobs), "failed": failed, "runs": jobs}
    (sweep_dir / "quadrants.json").write_text(json.dumps(summary, indent=2) + "\n")
    (sweep_dir / "quadrants.md").write_text(markdown(summary, failed))
    return summary


def log_to_wandb(summary: dict[str, Any], config: DictConfig, sweep_dir: Path) -> None:
    """The per-cell, per-strategy table as a W&B Table in its own run, grouped with the sweep's jobs."""
    import wandb

    node = OmegaConf.to_container(config.logger.wandb, resolve=False)
    rows = [
        [name, strategy, s["mean"], s["std"], s["n"], strategy == cell["best"], strategy == cell["lecture"]]
        for name, cell in summary["cells"].items()
        for strategy, s in cell["strategies"].items()
    ]
    run = wandb.init(
        project=node.get("project", "cvarch"),
        dir=str(sweep_dir),
        mode=node.get("mode", "offline"),
        group=str(config.task_name),
        job_type="report",
        name="transfer_quadrants",
    )
    columns = ["cell", "strategy", "test_acc_mean", "test_acc_std", "seeds", "best", "lecture"]
    run.log({"transfer_quadrants": wandb.Table(columns=columns, data=rows)})
    run.finish()


class QuadrantsCallback(Callback):
    """Hydra callback of ``experiment=transfer_quadrants``: trains the source before the first job (unless
    ``source.ckpt`` is already in the sweep folder, or ``transfer.source`` names another file), and writes the
    report when the multirun ends.

    Args:
        source: overrides of the source run (``cvarch-train <source…>``).
    """

    def __init__(self, source: Sequence[str] = ("experiment=transfer_source",)) -> None:
        self.source = list(source)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        wanted = OmegaConf.to_container(config.transfer, resolve=False).get("source")
        if wanted != "${hydra:sweep.dir}/source.ckpt":  # the user named a source: a file path must exist
            if "/" in str(wanted) and not Path(str(wanted)).expanduser().is_file():
                raise FileNotFoundError(f"transfer.source: no file at {wanted}")
            return
        target = sweep_dir / "source.ckpt"
        if target.is_file():
            return
        run_dir = sweep_dir / "source"
        command = [sys.executable, "-m", "cvarch.train", *self.source, f"hydra.run.dir={run_dir}"]
        print("training the transfer source:", " ".join(command[2:]), flush=True)
        subprocess.run(command, check=True)
        best = read_job(run_dir).best_checkpoint()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(best, target)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        summary = report(sweep_dir)
        if "wandb" in (config.get("logger") or {}):
            log_to_wandb(summary, config, sweep_dir)
        print((sweep_dir / "quadrants.md").read_text())
        print(sweep_dir)


README_BEGIN = "<!-- quadrants:begin -->"
README_END = "<!-- quadrants:end -->"


def write_readme(table: str, readme: str | Path) -> None:
    """Replaces what lies between the ``<!-- quadrants:begin -->`` and ``<!-- quadrants:end -->`` lines of
    ``readme`` with ``table``.

    Raises:
        ValueError: naming the file when it lacks the two markers.
    """
    path = Path(readme)
    text = path.read_text()
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(f"{path} has no '{README_BEGIN}' … '{README_END}' block to write the table into")
    path.write_text(text[: begin + len(README_BEGIN)] + "\n" + table + text[end:])


def run(cfg: DictConfig) -> dict[str, Any]:
    """``python -m cvarch.quadrants`` as a function: (re)writes the report of the quadrant sweep
    ``cfg.sweep_dir`` (:func:`report`), puts its table into ``cfg.readme``'s quadrants block when one is
    named, and prints the table.

    Args:
        cfg: the ``quadrants`` root config (``@hydra.main`` or
            ``cvarch.compose(..., config_name="quadrants")``).
    """
    summary = report(cfg.sweep_dir)
    table = (Path(cfg.sweep_dir) / "quadrants.md").read_text()
    if cfg.readme:
        write_readme(table, cfg.readme)
    print(table)
    return summary


def cli(cfg: DictConfig) -> None:
    """``python -m cvarch.quadrants sweep_dir=… [readme=README.md]``; prints the sweep folder last."""
    run(cfg)
    print(cfg.sweep_dir)


if __name__ == "__main__":  # python -m cvarch.quadrants, as torchrun, srun and DDP re-launches start it
    from cvarch.cli import quadrants

    quadrants()
