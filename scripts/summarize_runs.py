#!/usr/bin/env python
"""Summarizes the runs under a folder (a multirun, or several) as a markdown table of mean ± std over seeds.

Runs are grouped by their Hydra overrides, minus ``seed`` and path overrides, so ``cvarch-train -m seed=0,1,2
model=a,b`` gives one row per model.

    python scripts/summarize_runs.py logs/train/multiruns/2026-11-27_15-00-00
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import yaml

COLUMNS = {
    "test/acc": "test acc %",
    "test/acc_top5": "test top-5 %",
    "test/acc_tta": "test acc (TTA) %",
    "val/acc": "val acc %",
    "train/loss": "train loss",
    "epochs": "epochs",
    "wall_s": "wall s",
}
IGNORED = ("seed=", "paths.", "hydra.")


def group_of(run_dir: Path) -> str:
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
    kept = [o for o in overrides if not o.startswith(IGNORED)]
    return " ".join(kept) or "(defaults)"


def fmt(values: list[float], column: str) -> str:
    if not values:  # e.g. runs from before the metric existed
        return "—"
    scale, digits = (100, 2) if "acc" in column else (1, 3 if column == "train/loss" else 1)
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, nargs="+", help="folders searched for metrics.json files")
    args = parser.parse_args()
    groups: dict[str, list[dict]] = defaultdict(list)
    for root in args.root:
        for path in sorted(root.rglob("metrics.json")):
            groups[group_of(path.parent)].append(json.loads(path.read_text()))
    if not groups:
        raise SystemExit(f"no metrics.json under {', '.join(map(str, args.root))}")
    print("| runs | seeds | " + " | ".join(COLUMNS.values()) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for name, runs in groups.items():
        cells = [fmt([r[c] for r in runs if r.get(c) is not None], c) for c in COLUMNS]
        print(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
