"""``cvarch-report sweep_dir=<multirun dir>``: the ablation table of a sweep, grouped by what was swept.

Each job of a Hydra multirun leaves ``<sweep>/<n>/.hydra/overrides.yaml`` and, when it finishes,
``<sweep>/<n>/metrics.json`` (read through :func:`cvarch.runs.list_jobs`). The report groups finished jobs by
every swept factor except ``seed`` and gives each group's mean ± sample std and run count, the paired
differences against a baseline (jobs that differ only in the baseline factor, seed included, are paired), a
bar plot of the group means, and the jobs that did not finish. It works on a partial sweep. airbench and
Composer report seeds the same way (mean ± std, n); a group of one run has no std (``None``, "—" in the
table).
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

from matplotlib.figure import Figure  # no pyplot: Agg canvas, no display, no global backend switch
from omegaconf import DictConfig

from cvarch.plots import band, figure, integer_epochs, legend_beside, save
from cvarch.runs import Job, list_jobs

WANDB_CHOICES = ("auto", "on", "off")
NOT_FACTORS = (
    "seed",
    "paths.",
    "hydra.",
)  # never grouping factors: seeds are averaged, paths are not settings
# Units of the metrics.json and history.json keys, by the key's last part: (suffix, unit)
UNITS = (
    ("acc", "fraction correct, 0–1"),
    ("error", "fraction wrong, 0–1"),
    ("loss", "cross-entropy, nats"),
    ("gmacs", "GMACs per image"),
    ("params", "parameters"),
    ("_s", "s"),
)


def axis_label(key: str) -> str:
    """``key`` with its unit: ``test/acc`` → ``test/acc [fraction correct, 0–1]``; an unknown key as it is."""
    unit = next((u for suffix, u in UNITS if key.rsplit("/", 1)[-1].endswith(suffix)), None)
    return f"{key} [{unit}]" if unit else key


def sweep_name(sweep_dir: str | Path) -> str:
    """``logs/<task_name>/multiruns/<time>`` → ``<task_name>/<time>`` (its W&B group); another folder: its
    name."""
    path = Path(sweep_dir).resolve()
    return f"{path.parent.parent.name}/{path.name}" if path.parent.name == "multiruns" else path.name


def mean_std(mean: float, std: float | None, sign: str = "") -> str:
    """``0.8500 ± 0.0500``; one run has no spread: ``0.9000 ± —``, never a zero std."""
    return f"{mean:{sign}.4f} ± " + ("—" if std is None else f"{std:.4f}")


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
    """Finished jobs grouped by ``factors``: ``{factor: value, …, "n", "mean", "std", "values"}`` each;
    ``std`` is the sample std, ``None`` for a group of one run."""
    by_level: dict[tuple[str, ...], list[float]] = defaultdict(list)
    for job in jobs:
        if _value(job, metric) is not None:
            by_level[_level(job, factors)].append(_value(job, metric))
    return [
        {
            **dict(zip(factors, level, strict=True)),
            "n": len(values),
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "values": values,
        }
        for level, values in sorted(by_level.items())
    ]


def paired_differences(
    jobs: Sequence[Job], metric: str, factors: Sequence[str], baseline: tuple[str, str]
) -> list[dict[str, Any]]:
    """Mean ± std of ``metric − metric(baseline job)`` per group, over jobs paired with the job whose
    overrides are the same except ``baseline[0]=baseline[1]`` (same seed: a paired comparison);
    ``std_diff`` is ``None`` for a single pair.

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
            "std_diff": statistics.stdev(values) if len(values) > 1 else None,
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


def curves(jobs: Sequence[Job], factors: Sequence[str], key: str) -> dict[str, list[list[Any]]]:
    """Per group, the per-epoch ``key`` of the jobs' ``history.json`` (``LearningCurves``) over seeds:
    ``{"norm=none": [[epoch, mean, std, n], …]}``, ``std`` ``None`` where one run has the epoch."""
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
        label: [
            [epoch, statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else None, len(v)]
            for epoch, v in sorted(epochs.items())
        ]
        for label, epochs in sorted(per_epoch.items())
    }


def curves_figure(series: dict[str, list[list[Any]]], key: str, title: str = "") -> Figure:
    """One line per group: ``key`` against the epoch (1 = after the first), mean over seeds with a mean ± std
    band where several seeds have the epoch; the legend, beside the axes, gives each group's seeds (n)."""
    fig = figure(7.5, 4.5)
    ax = fig.subplots()
    for label, points in series.items():
        n = max(p[3] for p in points)
        band(
            ax,
            [p[0] + 1 for p in points],
            [p[1] for p in points],
            [p[2] or 0.0 for p in points],
            label=f"{label} (n={n})",
            marker="o",
            markersize=3,
        )
    integer_epochs(ax, "epoch [completed passes over the training set]")
    ax.set_ylabel(axis_label(key))
    ax.grid(alpha=0.3)
    legend_beside(ax, title="mean ± std over seeds", title_fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_curves(series: dict[str, list[list[Any]]], key: str, path: Path, title: str = "") -> Path:
    """Writes :func:`curves_figure` to ``path``."""
    return save(curves_figure(series, key, title), path)


def markdown(summary: dict[str, Any]) -> str:
    """The group table (mean ± std, n), the paired differences, and the unfinished jobs, as Markdown."""
    factors, metric = summary["factors"], summary["metric"]
    lines = [f"Sweep `{summary['sweep_dir']}`: {metric}, mean ± std over seeds (n runs).", ""]
    lines += ["| " + " | ".join([*factors, metric, "n"]) + " |", "|" + "---|" * (len(factors) + 2)]
    for g in summary["groups"]:
        lines.append(
            "| " + " | ".join([*(g[f] for f in factors), mean_std(g["mean"], g["std"]), str(g["n"])]) + " |"
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
                mean_std(d["mean_diff"], d["std_diff"], sign="+"),
                str(d["pairs"]),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    if summary["failed"]:
        lines += ["", f"Unfinished or failed jobs (no metrics.json): {', '.join(summary['failed'])}"]
    if summary.get("bad"):
        bad = "; ".join(f"{b['job']} ({b['reason']})" for b in summary["bad"])
        lines += ["", f"Bad jobs, left out: {bad}"]
    return "\n".join(lines) + "\n"


def report_figure(summary: dict[str, Any]) -> Figure:
    """A bar per group: the mean, a ± std error bar where the group has several runs, ``n=`` above each bar,
    the baseline's bars hatched (named in the legend beside the axes), the sweep and its factors in the title.
    """
    rows, factors, metric = summary["groups"], summary["factors"], summary["metric"]
    labels = [" ".join(f"{f}={g[f]}" for f in factors) or "all" for g in rows]
    key, value = summary.get("baseline") or (None, None)
    fig = figure(max(5.0, 0.9 * len(rows) + 3.5), 4.5)
    ax = fig.subplots()
    bars = ax.bar(range(len(rows)), [g["mean"] for g in rows], color="C0", edgecolor="k", linewidth=0.5)
    for i, (g, bar) in enumerate(zip(rows, bars, strict=True)):
        if g["std"] is not None:
            ax.errorbar(i, g["mean"], yerr=g["std"], fmt="none", color="k", capsize=4)
        if key is not None and g.get(key) == value:  # the group the others are paired against
            bar.set_hatch("//")
            bar.set_facecolor("0.75")
        ax.annotate(f"n={g['n']}", (i, g["mean"] + (g["std"] or 0.0)), xytext=(0, 2),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8)  # fmt: skip
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_xlabel(" × ".join(factors) or "all jobs")
    ax.set_ylabel(f"{axis_label(metric)}\nmean ± std over seeds")
    ax.margins(y=0.12)
    ax.grid(axis="y", alpha=0.3)
    baseline_bars = [b for g, b in zip(rows, bars, strict=True) if key is not None and g.get(key) == value]
    if baseline_bars:
        baseline_bars[0].set_label(f"baseline {key}={value}")
    legend_beside(ax)
    swept = " × ".join(factors) or "nothing swept"
    fig.suptitle(f"Sweep {sweep_name(summary['sweep_dir'])}: {metric} by {swept}", fontsize=10)
    return fig


def plot(summary: dict[str, Any], path: Path) -> Path:
    """Writes :func:`report_figure` to ``path``."""
    return save(report_figure(summary), path)


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
        title = (
            f"Sweep {sweep_name(sweep_dir)}: {curve} per epoch, by {' × '.join(factors) or 'nothing swept'}"
        )
        plot_curves(summary["curves"], curve, out / "report_curves.png", title)
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


def cli(cfg: DictConfig) -> None:
    """``cvarch-report sweep_dir=…`` (:mod:`cvarch.cli`); the last line printed is the folder the report went
    to."""
    run(cfg)
    print(cfg.out_dir)


if __name__ == "__main__":  # python -m cvarch.report, as torchrun, srun and DDP re-launches start it
    from cvarch.cli import report

    report()
