"""The ``scheduler`` group's own schedules: warm-up + cosine, and one-cycle with per-group peaks.

Both are built from ``torch.optim.lr_scheduler`` classes, so ``state_dict``/``load_state_dict`` (and with
them Lightning's resume) work unchanged. ``total_steps`` is left null in the YAML: ``configure_optimizers``
fills it with the run's scheduler steps (``trainer.estimated_stepping_batches`` for ``interval: step``,
``max_epochs`` for ``interval: epoch``), so every step count here is in units of the scheduler's interval.
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, OneCycleLR, SequentialLR


def _check_total_steps(total_steps: int | None) -> int:
    if total_steps is None:
        raise ValueError(
            "scheduler.total_steps is null: configure_optimizers fills it with the run's steps; "
            "give it when building the scheduler by hand"
        )
    if total_steps < 1:
        raise ValueError(f"scheduler.total_steps must be >= 1, got {total_steps}")
    return int(total_steps)


def warmup_cosine(
    optimizer: Optimizer,
    total_steps: int | None = None,
    warmup_steps: int = 0,
    warmup_start_factor: float = 0.1,
    eta_min: float = 0.0,
) -> LRScheduler:
    """Linear warm-up for ``warmup_steps``, then cosine annealing to ``eta_min`` at ``total_steps``.

    Cosine: Loshchilov & Hutter 2017 (SGDR) §3, Eq. 5, one period, no restarts. Warm-up: Goyal et al. 2017
    §2.2 ("gradual warmup"). Each group's lr rises linearly from ``warmup_start_factor × lr`` to its ``lr``
    at step ``warmup_steps``, then follows ``eta_min + (lr − eta_min)(1 + cos(π t / T)) / 2`` with
    ``T = total_steps − warmup_steps``.

    Args:
        optimizer: the optimizer whose groups' ``lr`` are the peak rates.
        total_steps: scheduler steps of the whole run, warm-up included; ``None`` is an error here (the
            module fills it).
        warmup_steps: steps of linear warm-up; 0 gives torch's ``CosineAnnealingLR`` alone.
        warmup_start_factor: first step's lr as a fraction of each group's lr, in (0, 1].
        eta_min: lr at ``total_steps``, absolute (the same for every group).

    Raises:
        ValueError: naming ``scheduler.total_steps``, ``scheduler.warmup_steps``,
            ``scheduler.warmup_start_factor`` or ``scheduler.eta_min``.
    """
    total_steps = _check_total_steps(total_steps)
    if warmup_steps < 0:
        raise ValueError(f"scheduler.warmup_steps must be >= 0, got {warmup_steps}")
    if warmup_steps >= total_steps:
        raise ValueError(
            f"scheduler.warmup_steps must be < scheduler.total_steps, got {warmup_steps} >= {total_steps}: "
            "no step would be left for the cosine"
        )
    if not 0 < warmup_start_factor <= 1:
        raise ValueError(f"scheduler.warmup_start_factor must be in (0, 1], got {warmup_start_factor}")
    if eta_min < 0:
        raise ValueError(f"scheduler.eta_min must be >= 0, got {eta_min}")
    if warmup_steps == 0:
        return CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=eta_min)
    warmup = LinearLR(optimizer, start_factor=warmup_start_factor, end_factor=1.0, total_iters=warmup_steps)
    cosine = CosineAnnealingLR(optimizer, T_max=total_steps - warmup_steps, eta_min=eta_min)
    return SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


def one_cycle(
    optimizer: Optimizer,
    total_steps: int | None = None,
    max_lr: float | None = None,
    pct_start: float = 0.3,
    anneal_strategy: str = "cos",
    cycle_momentum: bool = True,
    base_momentum: float = 0.85,
    max_momentum: float = 0.95,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    three_phase: bool = False,
) -> OneCycleLR:
    """torch's ``OneCycleLR`` with a peak per parameter group, so ``optimizer.groups.lr_mult`` carries over.

    Smith & Topin 2019, "Super-Convergence", §3 (one cycle: lr up then down, momentum down then up, then an
    annihilation far below the start). Each group starts at ``peak / div_factor``, peaks at step
    ``pct_start × total_steps − 1`` and ends at ``peak / (div_factor × final_div_factor)``.

    Args:
        optimizer: the optimizer; each group's ``lr`` (and ``lr_mult``, from
            :func:`cvarch.optimizer.param_groups`) sets its peak.
        total_steps: scheduler steps of the whole run; ``None`` is an error here (the module fills it).
        max_lr: peak lr of an ``lr_mult`` 1 group; each group peaks at ``max_lr × lr_mult``. ``None``: every
            group peaks at its own ``lr``.
        pct_start: fraction of the steps spent rising, in (0, 1).
        anneal_strategy: ``"cos"`` or ``"linear"``.
        cycle_momentum: cycle momentum (SGD) or β1 (Adam) inversely to the lr, between the bounds below.
        base_momentum: momentum at the lr's peak.
        max_momentum: momentum at the start and the end.
        div_factor: peak lr ÷ starting lr.
        final_div_factor: starting lr ÷ final lr.
        three_phase: the paper's shape (up, symmetric down to the start, then annihilation) instead of
            fastai's two phases.

    Raises:
        ValueError: naming ``scheduler.total_steps``, ``scheduler.max_lr``, ``scheduler.pct_start`` or
            ``scheduler.anneal_strategy``.
    """
    total_steps = _check_total_steps(total_steps)
    if not 0 < pct_start < 1:
        raise ValueError(f"scheduler.pct_start must be in (0, 1), got {pct_start}")
    if anneal_strategy not in ("cos", "linear"):
        raise ValueError(f"scheduler.anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
    if max_lr is None:
        peaks = [group["lr"] for group in optimizer.param_groups]
    elif max_lr <= 0:
        raise ValueError(f"scheduler.max_lr must be > 0 or null (each group's lr), got {max_lr}")
    else:
        peaks = [max_lr * group.get("lr_mult", 1.0) for group in optimizer.param_groups]
    return OneCycleLR(
        optimizer,
        max_lr=peaks,
        total_steps=total_steps,
        pct_start=pct_start,
        anneal_strategy=anneal_strategy,
        cycle_momentum=cycle_momentum,
        base_momentum=base_momentum,
        max_momentum=max_momentum,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
        three_phase=three_phase,
    )
