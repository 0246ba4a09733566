"""``cvarch-report sweep_dir=<multirun dir>``: the ablation table of a sweep, grouped by what was swept.

Each job of a Hydra multirun leaves ``<sweep>/<n>/.hydra/overrides.yaml`` and, when it finishes,
``<sweep>/<n>/metrics.json`` (read through :func:`cvarch.runs.list_jobs`). The report groups finished jobs by
every swept factor except ``seed`` and gives each group's mean ± sample std and run count, the paired
differences against a baseline (jobs that differ only in the baseline factor, seed included, are paired), a
bar plot of the group means, and the jobs that did not finish. It works on a partial sweep. airbench and
Composer report seeds the same way (mean ± std, n).
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from cvarch.config import CONFIG_PATH
from cvarch.runs import Job, list_jobs

WANDB_CHOICES = ("auto", "on", "off")
NOT_FACTORS = (
    "seed",
    "paths.",
    "hydra.",
)  # never grouping factors: seeds are averaged, paths are not settings


def swept_factors(jobs: Sequence[Job]) -> list[str]:
    """Override keys whose value differs between jobs, in first-seen order (``seed`` and paths excluded)."""
    values: dict[str, set[str]] = defaultdict(set)
    for job in jobs:
        for key in {k for j in jobs for k in j.overrides}:
            values[key].add(job.overrides.get(key, "(default)"))
    keys = list(dict.fromkeys(k for j in jobs for k in j.overrides))
    return [k for k in keys if len(values[k]) > 1 and not k.startswith(NOT_FACTORS)]


def _level(job: Job, factors: Sequence[str]) -> tuple[str, ...]:
    return tuple(job.overrides.get(f, "(default)") for f in factors)


def _value(job: Job, metric: str) -> float | None:
    """The job's ``metric``, or ``None`` while it is unfinished, when it did not record that key, or when the
    value is not a finite number (:func:`bad_jobs` lists those)."""
    value = (job.metrics or {}).get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def bad_jobs(jobs: Sequence[Job], metric: str) -> list[dict[str, str]]:
    """The jobs left out of the statistics for a reason other than not having finished: an unreadable
    ``metrics.json``, or a ``metric`` that is not a finite number (a diverged run's NaN); ``{"job",
    "reason"}`` each."""
    bad = []
    for job in jobs:
        value = (job.metrics or {}).get(metric)
        if job.problem:
            bad.append({"job": job.name, "reason": job.problem})
        elif value is not None and _value(job, metric) is None:
            bad.append({"job": job.name, "reason": f"{metric} is {value!r}, not a finite number"})
    return bad


def groups(jobs: Sequence[Job], metric: str, factors: Sequence[str]) -> list[dict[str, Any]]:
    """Finished jobs grouped by ``factors``: ``{factor: value, …, "n", "mean", "std", "values"}`` each."""
    by_level: dict[tuple[str, ...], list[float]] = defaultdict(list)
    for job in jobs:
        if _value(job, metric) is not None:
            by_level[_level(job, factors)].append(_value(job, metric))
    return [
        {
            **dict(zip(factors, level, strict=True)),
            "n": len(values),
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values,
        }
        for level, values in sorted(by_level.items())
    ]


def paired_differences(
    jobs: Sequence[Job], metric: str, factors: Sequence[str], baseline: tuple[str, str]
) -> list[dict[str, Any]]:
    """Mean ± std of ``metric − metric(baseline job)`` per group, over jobs paired with the job whose
    overrides are the same except ``baseline[0]=baseline[1]`` (same seed: a paired comparison).

    Raises:
        ValueError: naming the baseline when its factor was not swept or no job has its value.
    """
    key, value = baseline
    if key not in factors:
        raise ValueError(f"baseline {key}={value}: {key} is not a swept factor (swept: {list(factors)})")
    finished = [j for j in jobs if _value(j, metric) is not None]
    reference = {
        tuple(sorted((k, v) for k, v in j.overrides.items() if k != key)): _value(j, metric)
        for j in finished
        if j.overrides.get(key) == value
    }
    if not reference:
        raise ValueError(f"baseline {key}={value}: no finished job has {key}={value}")
    diffs: dict[tuple[str, ...], list[float]] = defaultdict(list)
    for job in finished:
        if job.overrides.get(key) == value:
            continue
        partner = reference.get(tuple(sorted((k, v) for k, v in job.overrides.items() if k != key)))
        if partner is not None:
            diffs[_level(job, factors)].append(_value(job, metric) - partner)
    return [
        {
            **dict(zip(factors, level, strict=True)),
            "pairs": len(values),
            "mean_diff": statistics.fmean(values),
            "std_diff": statistics.stdev(values) if len(values) > 1 else 0.0,
        }
        for level, values in sorted(diffs.items())
    ]


def _history_value(row: dict[str, float], key: str) -> float | None:
    """A ``history.json`` row's ``key``; ``<split>/error`` is ``1 − <split>/acc`` (the papers plot error)."""
    if key in row:
        return float(row[key])
    if key.endswith("/error") and key.removesuffix("/error") + "/acc" in row:
        return 1.0 - float(row[key.removesuffix("/error") + "/acc"])
    return None


def curves(jobs: Sequence[Job], factors: Sequence[str], key: str) -> dict[str, list[list[float]]]:
    """Per group, the seed-averaged per-epoch ``key`` of the jobs' ``history.json`` (``LearningCurves``):
    ``{"norm=none": [[epoch, mean], …]}``."""
    per_epoch: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for job in jobs:
        path = job.dir / "history.json"
        if not job.finished or not path.is_file():
            continue
        label = " ".join(f"{f}={v}" for f, v in zip(factors, _level(job, factors), strict=True)) or "all"
        for row in json.loads(path.read_text()):
            value = _history_value(row, key)
            if value is not None:
                per_epoch[label][int(row["epoch"])].append(value)
    return {
        label: [[epoch, statistics.fmean(values)] for epoch, values in sorted(epochs.items())]
        for label, epochs in sorted(per_epoch.items())
    }


def plot_curves(series: dict[str, list[list[float]]], key: str, path: Path) -> Path:
    """One line per group: the seed-averaged ``key`` against the epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in series.items():
        ax.plot([p[0] + 1 for p in points], [p[1] for p in points], marker="o", markersize=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(key)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown(summary: dict[str, Any]) -> str:
    """The group table (mean ± std, n), the paired differences, and the unfinished jobs, as Markdown."""
    factors, metric = summary["factors"], summary["metric"]
    lines = [f"Sweep `{summary['sweep_dir']}`: {metric}, mean ± std over seeds (n runs).", ""]
    lines += ["| " + " | ".join([*factors, metric, "n"]) + " |", "|" + "---|" * (len(factors) + 2)]
    for g in summary["groups"]:
        lines.append(
            "| "
            + " | ".join([*(g[f] for f in factors), f"{g['mean']:.4f} ± {g['std']:.4f}", str(g["n"])])
            + " |"
        )
    if summary.get("paired"):
        key, value = summary["baseline"]
        lines += ["", f"Paired differences against {key}={value} (same other overrides, same seed):", ""]
        lines += [
            "| " + " | ".join([*factors, f"Δ {metric}", "pairs"]) + " |",
            "|" + "---|" * (len(factors) + 2),
        ]
        for d in summary["paired"]:
            cells = [
                *(d[f] for f in factors),
                f"{d['mean_diff']:+.4f} ± {d['std_diff']:.4f}",
                str(d["pairs"]),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    if summary["failed"]:
        lines += ["", f"Unfinished or failed jobs (no metrics.json): {', '.join(summary['failed'])}"]
    if summary.get("bad"):
        bad = "; ".join(f"{b['job']} ({b['reason']})" for b in summary["bad"])
        lines += ["", f"Bad jobs, left out: {bad}"]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> Path:
    """A bar per group: mean with a ± std error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["groups"]
    labels = [" ".join(f"{f}={g[f]}" for f in summary["factors"]) or "all" for g in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) + 2), 4))
    ax.bar(range(len(rows)), [g["mean"] for g in rows], yerr=[g["std"] for g in rows], capsize=4)
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(summary["metric"])
    ax.set_title(f"{Path(summary['sweep_dir']).name}: mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def wandb_node(jobs: Sequence[Job]) -> tuple[dict[str, Any], str] | None:
    """The ``logger.wandb`` node and ``task_name`` of the sweep's jobs (from a job's ``config.yaml``);
    ``None`` when the jobs logged without W&B."""
    for job in jobs:
        cfg = job.config()
        if cfg is not None:
            node = (cfg.get("logger") or {}).get("wandb")
            return (node, cfg.get("task_name", "train")) if node else None
    return None


def log_wandb(summary: dict[str, Any], out: Path, node: dict[str, Any], task_name: str) -> Path | None:
    """Logs the report (group table, paired differences, plots) as one W&B run of ``job_type=report`` in the
    sweep's W&B group (the jobs' group: ``<task_name>/<sweep folder>``, or the group they were given), with
    the jobs' project and mode (offline by default). If W&B cannot start, warns and returns ``None``: the
    report files are written already."""
    import wandb

    from cvarch.build import sweep_group

    group = sweep_group(task_name, Path(summary["sweep_dir"]).resolve(), node.get("group"))
    factors, metric = summary["factors"], summary["metric"]
    try:
        run = wandb.init(
            project=node.get("project") or "cvarch",
            entity=node.get("entity"),
            mode=node.get("mode") or "offline",
            dir=str(out),
            group=group,
            job_type="report",
            name=f"report {metric}",
            config={k: summary[k] for k in ("sweep_dir", "metric", "factors", "baseline", "failed", "bad")},
            settings=wandb.Settings(**(node.get("settings") or {})),
        )
    except Exception as err:
        warnings.warn(
            f"W&B could not start ({type(err).__name__}: {str(err)[:200]})", RuntimeWarning, stacklevel=2
        )
        return None
    columns = [*factors, "n", f"{metric} mean", f"{metric} std"]
    rows = [[*(g[f] for f in factors), g["n"], g["mean"], g["std"]] for g in summary["groups"]]
    log: dict[str, Any] = {"report/groups": wandb.Table(columns=columns, data=rows)}
    if summary["paired"]:
        columns = [*factors, f"delta {metric} mean", f"delta {metric} std", "pairs"]
        rows = [
            [*(d[f] for f in factors), d["mean_diff"], d["std_diff"], d["pairs"]] for d in summary["paired"]
        ]
        log["report/paired"] = wandb.Table(columns=columns, data=rows)
    for name in ("report.png", "report_curves.png"):
        if (out / name).is_file():
            log[f"report/{name[:-4]}"] = wandb.Image(str(out / name))
    run.log(log)
    run.summary["failed_jobs"] = len(summary["failed"])
    path = Path(run.dir).parent
    run.finish()
    return path


def report(
    sweep_dir: str | Path,
    metric: str = "test/acc",
    baseline: tuple[str, str] | None = None,
    out_dir: str | Path | None = None,
    curve: str | None = None,
    wandb: str = "auto",
) -> dict[str, Any]:
    """Writes ``report.md``, ``.csv``, ``.json`` and ``.png`` for a sweep and returns the summary.

    Args:
        sweep_dir: the multirun folder.
        metric: the ``metrics.json`` key compared (``test/acc``, ``val/acc``, ``train/loss``, …).
        baseline: ``(factor, value)`` to pair every other group's jobs against.
        out_dir: where the files go; the sweep folder by default.
        curve: a ``history.json`` key (``train/acc``, ``val/loss``; ``train/error`` = 1 − ``train/acc``) to
            plot per epoch and group into ``report_curves.png``.
        wandb: ``auto`` logs the report to W&B when the jobs logged to W&B (:func:`log_wandb`), ``on`` always
            (W&B's defaults: project cvarch, offline), ``off`` never.

    Raises:
        FileNotFoundError: naming the folder when it holds no job (:func:`cvarch.runs.list_jobs`).
        ValueError: a ``wandb`` value other than ``auto``, ``on``, ``off``; a baseline that was not swept.
    """
    if wandb not in WANDB_CHOICES:
        raise ValueError(f"wandb={wandb!r}: expected one of {', '.join(WANDB_CHOICES)}")
    jobs = list_jobs(sweep_dir)
    factors = swept_factors(jobs)
    summary: dict[str, Any] = {
        "sweep_dir": str(sweep_dir),
        "metric": metric,
        "factors": factors,
        "groups": groups(jobs, metric, factors),
        "failed": [j.name for j in jobs if not j.finished and not j.problem],
        "bad": bad_jobs(jobs, metric),
        "baseline": list(baseline) if baseline else None,
        "paired": paired_differences(jobs, metric, factors, baseline) if baseline else [],
        "curve": curve,
        "curves": curves(jobs, factors, curve) if curve else {},
    }
    out = Path(out_dir or sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown(summary))
    with (out / "report.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*factors, "n", f"{metric} mean", f"{metric} std"])
        for g in summary["groups"]:
            writer.writerow([*(g[k] for k in factors), g["n"], g["mean"], g["std"]])
    if summary["groups"]:
        plot(summary, out / "report.png")
    if summary["curves"]:
        plot_curves(summary["curves"], curve, out / "report_curves.png")
    found = wandb_node(jobs) if wandb != "off" else None
    if wandb == "on" and found is None:
        found = ({}, Path(sweep_dir).resolve().parent.parent.name)  # logs/<task_name>/multiruns/<time>
    if found is not None:
        summary["wandb_run"] = str(log_wandb(summary, out, *found))
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def parse_baseline(text: str | None) -> tuple[str, str] | None:
    """``baseline=norm:batchnorm`` → ``("norm", "batchnorm")``; ``null`` → ``None``. A quoted
    ``'baseline="norm=batchnorm"'`` reads the same (Hydra reads an unquoted ``=`` as a second key).

    Raises:
        ValueError: naming ``baseline`` when the text is not ``factor:value``.
    """
    if text is None:
        return None
    match = re.fullmatch(r"([^:=]+)[:=](.+)", str(text))
    if match is None:
        raise ValueError(f"baseline={text!r}: expected factor:value, e.g. baseline=norm:batchnorm")
    return match[1], match[2]


def run(cfg: DictConfig) -> dict[str, Any]:
    """``cvarch-report`` as a function: writes the report of ``cfg.sweep_dir`` (:func:`report`) into
    ``cfg.out_dir`` and prints its Markdown table.

    Args:
        cfg: the ``report`` root config (from ``@hydra.main`` or
            ``cvarch.compose(..., config_name="report")``).
    """
    summary = report(
        cfg.sweep_dir,
        metric=cfg.metric,
        baseline=parse_baseline(cfg.baseline),
        out_dir=cfg.out_dir,
        curve=cfg.curve,
        wandb=cfg.wandb,
    )
    print(markdown(summary), end="")
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="report")
def main(cfg: DictConfig) -> None:
    """``cvarch-report sweep_dir=…``; the last line printed is the folder the report went to."""
    run(cfg)
    print(cfg.out_dir)


if __name__ == "__main__":
    main()
