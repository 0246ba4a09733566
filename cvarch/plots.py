"""What every PNG cvarch writes has in common: a title naming the run, labelled axes with units, integer epoch
ticks, a legend beside the data rather than over it, a band for the spread of seeds, and a saved file.

Figures are built on matplotlib's object API (``Figure``, no pyplot): no global backend switch, no display,
nothing kept alive between figures.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# Hydra's runtime overrides that say how a job was run, not what was run: left out of titles
_NOT_WHAT = ("hydra.", "paths.", "logger", "trust", "resume", "ckpt_path", "tags", "threads", "task_name")


def run_title(choices: Mapping[str, str] | None = None, overrides: Iterable[str] | None = None) -> str:
    """A figure title naming the run: model and dataset, then the overrides of the command line.

    Args:
        choices: config-group choices (Hydra's ``runtime.choices``); ``None`` reads the running Hydra job's.
        overrides: command-line overrides (Hydra's ``overrides.task``); ``None`` reads the running job's.

    Returns:
        e.g. ``"resnet20 on digits · init=kaiming optimizer.lr=0.05"``; ``""`` outside a Hydra job when
        nothing is given.
    """
    if choices is None or overrides is None:
        from hydra.core.hydra_config import HydraConfig

        try:
            hydra_cfg = HydraConfig.get()
        except ValueError:  # no Hydra job (plain Python, a spawned DDP process)
            hydra_cfg = None
        if choices is None:
            choices = dict(hydra_cfg.runtime.choices) if hydra_cfg is not None else {}
        if overrides is None:
            overrides = list(hydra_cfg.overrides.task) if hydra_cfg is not None else []
    head = " on ".join(str(choices[k]) for k in ("model", "data") if choices.get(k))
    shown = [o for o in overrides if not o.lstrip("+~").startswith(_NOT_WHAT) and not _is_choice(o, choices)]
    return " · ".join(part for part in (head, " ".join(shown)) if part)


def _is_choice(override: str, choices: Mapping[str, str]) -> bool:
    """Whether ``override`` is ``model=…`` or ``data=…``, which the title's head already names."""
    key = override.split("=", 1)[0].lstrip("+~")
    return key in ("model", "data") and key in choices


def integer_epochs(ax: Axes, label: str = "epoch") -> None:
    """Labels the x axis with ``label`` and puts ticks on whole epochs only."""
    ax.set_xlabel(label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def band(
    ax: Axes, x: Sequence[float], mean: Sequence[float], std: Sequence[float], label: str, **line: Any
) -> None:
    """A line for the mean of several seeds and a shaded band for mean ± std (drawn only where std > 0)."""
    (drawn,) = ax.plot(x, mean, label=label, **line)
    if any(s > 0 for s in std):
        low = [m - s for m, s in zip(mean, std, strict=True)]
        high = [m + s for m, s in zip(mean, std, strict=True)]
        ax.fill_between(x, low, high, color=drawn.get_color(), alpha=0.2, linewidth=0)


def legend_beside(ax: Axes, **kwargs: Any) -> None:
    """A legend to the right of the axes, where it cannot cover data."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8, **kwargs)


def figure(width: float, height: float) -> Figure:
    """A new figure (object API, Agg canvas)."""
    return Figure(figsize=(width, height), layout="constrained")


def save(fig: Figure, path: str | Path, title: str = "", dpi: int = 120) -> Path:
    """Gives the figure its title (when one is given), writes it to ``path`` and returns the path."""
    path = Path(path)
    if title:
        fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
