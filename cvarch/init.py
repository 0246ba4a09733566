"""The ``init`` group: re-initializes a built model's weights through one :func:`apply_init`.

Init lives apart from architecture: each model applies its paper's init in its constructor, and
``init=default`` keeps exactly that. Every other scheme re-draws the weight of every Conv (1d/2d/3d,
transposed included) and Linear layer, zeroes their biases and resets every norm layer to γ=1, β=0.
Fans follow ``torch.nn.init._calculate_fan_in_and_fan_out`` (a conv's receptive field included).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

# Each scheme's options and their defaults (the papers'); ``zero_init_last`` is shared by every non-default one.
SCHEMES: dict[str, dict[str, Any]] = {
    "default": {},
    "constant": {"value": 0.01},
    "normal": {"mean": 0.0, "std": 0.01},
    "xavier": {"gain": 1.0, "mode": "fan_avg", "distribution": "uniform"},
    "kaiming": {"mode": "fan_in", "nonlinearity": "relu", "distribution": "normal"},
    "orthogonal": {"gain": 1.0},
    "lsuv": {"tol": 0.1, "max_iters": 10, "batch": None},
}
CHOICES: dict[str, tuple[str, ...]] = {
    "distribution": ("normal", "uniform"),
    "xavier.mode": ("fan_in", "fan_out", "fan_avg"),
    "kaiming.mode": ("fan_in", "fan_out"),
}
WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)
NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def apply_init(model: nn.Module, scheme: str = "default", **options: Any) -> nn.Module:
    """Applies an initialization scheme to every layer of ``model`` in place and returns it.

    Lecture "Weight initialization"; Glorot & Bengio 2010 eq. (16); He et al. 2015 §2.2 eq. (10);
    Saxe et al. 2014 §3; Mishkin & Matas 2016 Alg. 1.

    Args:
        model: a freshly built model.
        scheme: ``default`` keeps the architecture's own init (its paper's, or torchvision's). The others:

            - ``constant`` (``value``): every weight = ``value``. Every unit of a layer then computes the same
              output and receives the same gradient, so they never differ (the symmetry problem).
            - ``normal`` (``mean``, ``std``): N(mean, std²), the lecture's ``0.01 * np.random.randn``.
            - ``xavier`` (``gain``, ``mode``, ``distribution``): std = gain·√(1/fan). ``mode=fan_avg`` uses
              fan = (fan_in + fan_out)/2, Glorot's 2/(fan_in + fan_out); ``mode=fan_in`` with ``normal`` and
              gain 1 is the lecture's ``np.random.randn(fan_in, fan_out) / np.sqrt(fan_in)``. ``uniform``
              draws U(±√3·std), the paper's U(±√(6/(fan_in + fan_out))).
            - ``kaiming`` (``mode``, ``nonlinearity``, ``distribution``): std = gain/√fan with gain from
              ``torch.nn.init.calculate_gain`` (√2 for ReLU), i.e. std = √(2/fan_in). The lecture's code line
              ``np.random.randn(fan_in, fan_out) / np.sqrt(2/fan_in)`` divides where the paper multiplies;
              this implements the paper, ``randn * np.sqrt(2/fan_in)``.
            - ``orthogonal`` (``gain``): a (semi-)orthogonal weight, flattened to (out, in·k…), times ``gain``.
            - ``lsuv`` (``batch``, ``tol``, ``max_iters``): orthogonal init, then for each conv/linear layer in
              forward order rescale its weight until its output on ``batch`` has variance 1 within ``tol``,
              at most ``max_iters`` times. Data-driven: ``batch`` is required (training passes its first
              training batch; the YAML cannot hold one).

            Every non-default scheme takes ``zero_init_last``: then call ``zero_init_last()`` on every module
            that has one, so each residual block starts as an identity (Goyal et al. 2017, arXiv:1706.02677).
        **options: the scheme's options, as listed above.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"init.scheme={scheme!r} is not one of {sorted(SCHEMES)}")
    valid = dict(SCHEMES[scheme], **({"zero_init_last": False} if scheme != "default" else {}))
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"init.{unknown[0]} is not an option of init.scheme={scheme}; valid: {sorted(valid)}"
        )
    opts = {**valid, **options}
    if scheme == "default":
        return model
    for key in ("distribution", "mode"):
        choices = CHOICES.get(key, CHOICES.get(f"{scheme}.{key}"))
        if key in opts and opts[key] not in choices:
            raise ValueError(f"init.{key}={opts[key]!r} is not one of {list(choices)} (init.scheme={scheme})")
    for key in ("std", "tol", "max_iters"):
        if key in opts and not opts[key] > 0:
            raise ValueError(f"init.{key}={opts[key]!r} must be > 0 (init.scheme={scheme})")
    if scheme == "kaiming":
        try:
            gain = nn.init.calculate_gain(opts["nonlinearity"])
        except ValueError as err:
            raise ValueError(f"init.nonlinearity={opts['nonlinearity']!r}: {err}") from None
    if scheme == "lsuv" and opts["batch"] is None:
        raise ValueError(
            "init.scheme=lsuv is data-driven: a batch is required, apply_init(model, 'lsuv', batch=x)"
        )

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, WEIGHTED):
                w = m.weight
                if scheme == "constant":
                    nn.init.constant_(w, opts["value"])
                elif scheme == "normal":
                    nn.init.normal_(w, opts["mean"], opts["std"])
                elif scheme == "xavier":
                    _draw(w, opts["gain"] / math.sqrt(_fan(w, opts["mode"])), opts["distribution"])
                elif scheme == "kaiming":
                    _draw(w, gain / math.sqrt(_fan(w, opts["mode"])), opts["distribution"])
                else:  # orthogonal, and lsuv's starting point
                    nn.init.orthogonal_(w, gain=opts.get("gain", 1.0))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, NORMS):
                if getattr(m, "weight", None) is not None:
                    nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        if scheme == "lsuv":
            _lsuv(model, opts["batch"], opts["tol"], int(opts["max_iters"]))
        if opts["zero_init_last"]:
            for m in model.modules():
                if hasattr(m, "zero_init_last"):
                    m.zero_init_last()
    return model


def _fan(w: torch.Tensor, mode: str) -> float:
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(w)
    return {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]


def _draw(w: torch.Tensor, std: float, distribution: str) -> None:
    if distribution == "normal":
        nn.init.normal_(w, 0.0, std)
    else:  # U(±a) has std a/√3
        nn.init.uniform_(w, -math.sqrt(3.0) * std, math.sqrt(3.0) * std)


def _lsuv(model: nn.Module, batch: torch.Tensor, tol: float, max_iters: int) -> None:
    """Mishkin & Matas 2016 Alg. 1 after the orthogonal pre-init: scale each layer's weight by 1/√Var(output)."""
    order: list[nn.Module] = []
    variances: dict[nn.Module, float] = {}

    def record(module: nn.Module, _: Any, output: torch.Tensor) -> None:
        if module not in variances:
            order.append(module)
        variances[module] = output.var().item()  # now: an in-place activation may overwrite the output

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, WEIGHTED)]
    training = {m: m.training for m in model.modules()}
    model.eval()  # deterministic passes: no dropout, no running-stat updates
    try:
        model(batch)
        for layer in list(order):
            for _ in range(max_iters):
                var = variances[layer]
                if abs(var - 1.0) < tol or var == 0.0:
                    break
                layer.weight.div_(math.sqrt(var))
                model(batch)
    finally:
        for h in hooks:
            h.remove()
        for m, mode in training.items():
            m.training = mode
