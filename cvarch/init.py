"""The ``init`` group: one class per scheme, each the ``_target_`` of its ``conf/init/<scheme>.yaml``.

Init lives apart from architecture: each model applies its paper's init in its constructor, and
``init=default`` keeps exactly that. Every other scheme re-draws the weight of every Conv (1d/2d/3d,
transposed included) and Linear layer, zeroes their biases and resets every norm layer to γ=1, β=0.
Fans follow ``torch.nn.init._calculate_fan_in_and_fan_out`` (a conv's receptive field included).

A scheme is called on the built model, ``scheme(model)``; one whose ``needs_batch`` is true (LSUV) is
data-driven and is called as ``scheme(model, batch=x)`` with the first training batch, as the model sees it.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)
NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
DISTRIBUTIONS = ("normal", "uniform")


class Default:
    """``init=default``: keeps the architecture's own init (its paper's, or torchvision's).

    Attributes:
        needs_batch: whether the scheme is data-driven, called as ``scheme(model, batch=x)``.
    """

    name = "default"
    needs_batch = False

    def __call__(self, model: nn.Module, batch: torch.Tensor | None = None) -> nn.Module:
        """Initializes ``model`` in place and returns it; ``batch`` is for the data-driven schemes."""
        return model


class Reinit(Default):
    """Base of the schemes that re-draw every conv/linear weight (:meth:`draw`), zero the biases and reset the
    norm layers to γ=1, β=0.

    Args:
        zero_init_last: then call ``zero_init_last()`` on every module that has one, so each residual block
            starts as an identity (Goyal et al. 2017, arXiv:1706.02677, §5.1).
    """

    def __init__(self, zero_init_last: bool = False) -> None:
        self.zero_init_last = zero_init_last

    def draw(self, w: torch.Tensor) -> None:
        """Re-draws one conv/linear weight in place."""
        raise NotImplementedError

    def fit(self, model: nn.Module, batch: torch.Tensor | None) -> None:
        """Adjusts the drawn weights to data; only data-driven schemes do."""

    def __call__(self, model: nn.Module, batch: torch.Tensor | None = None) -> nn.Module:
        if self.needs_batch and batch is None:
            raise ValueError(
                f"init={self.name} is data-driven: a batch is required, "
                f"{type(self).__name__}()(model, batch=x)"
            )
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, WEIGHTED):
                    self.draw(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, NORMS):
                    if getattr(m, "weight", None) is not None:
                        nn.init.ones_(m.weight)
                    if getattr(m, "bias", None) is not None:
                        nn.init.zeros_(m.bias)
            self.fit(model, batch)
            if self.zero_init_last:
                for m in model.modules():
                    if hasattr(m, "zero_init_last"):
                        m.zero_init_last()
        return model


class Constant(Reinit):
    """``init=constant``: every weight = ``value``. Every unit of a layer then computes the same output and
    receives the same gradient, so they never differ (the lecture's symmetry problem).

    Args:
        value: the constant.
        zero_init_last: see :class:`Reinit`.
    """

    name = "constant"

    def __init__(self, value: float = 0.01, zero_init_last: bool = False) -> None:
        super().__init__(zero_init_last)
        self.value = value

    def draw(self, w: torch.Tensor) -> None:
        nn.init.constant_(w, self.value)


class Normal(Reinit):
    """``init=normal``: N(mean, std²), the lecture's ``0.01 * np.random.randn``.

    Args:
        mean: mean of the weights.
        std: standard deviation of the weights (> 0).
        zero_init_last: see :class:`Reinit`.
    """

    name = "normal"

    def __init__(self, mean: float = 0.0, std: float = 0.01, zero_init_last: bool = False) -> None:
        super().__init__(zero_init_last)
        _positive(self.name, std=std)
        self.mean = mean
        self.std = std

    def draw(self, w: torch.Tensor) -> None:
        nn.init.normal_(w, self.mean, self.std)


class Xavier(Reinit):
    """``init=xavier``: std = gain·√(1/fan), Glorot & Bengio 2010 eq. (16).

    ``mode=fan_avg`` uses fan = (fan_in + fan_out)/2, Glorot's 2/(fan_in + fan_out); ``mode=fan_in`` with
    ``normal`` and gain 1 is the lecture's ``np.random.randn(fan_in, fan_out) / np.sqrt(fan_in)``. ``uniform``
    draws U(±√3·std), the paper's U(±√(6/(fan_in + fan_out))).

    Args:
        gain: multiplier of the std.
        mode: ``fan_in``, ``fan_out`` or ``fan_avg``.
        distribution: ``normal`` or ``uniform``.
        zero_init_last: see :class:`Reinit`.
    """

    name = "xavier"

    def __init__(
        self,
        gain: float = 1.0,
        mode: str = "fan_avg",
        distribution: str = "uniform",
        zero_init_last: bool = False,
    ) -> None:
        super().__init__(zero_init_last)
        _choice(self.name, "mode", mode, ("fan_in", "fan_out", "fan_avg"))
        _choice(self.name, "distribution", distribution, DISTRIBUTIONS)
        self.gain = gain
        self.mode = mode
        self.distribution = distribution

    def draw(self, w: torch.Tensor) -> None:
        _draw(w, self.gain / math.sqrt(_fan(w, self.mode)), self.distribution)


class Kaiming(Reinit):
    """``init=kaiming``: std = gain/√fan, He et al. 2015 §2.2 eq. (10), with gain from
    ``torch.nn.init.calculate_gain`` (√2 for ReLU), i.e. std = √(2/fan_in).

    The lecture's code line ``np.random.randn(fan_in, fan_out) / np.sqrt(2/fan_in)`` divides where the paper
    multiplies; this implements the paper, ``randn * np.sqrt(2/fan_in)``.

    Args:
        mode: ``fan_in`` keeps the forward variance (eq. 10), ``fan_out`` the backward one (eq. 14).
        nonlinearity: the activation the gain is for, as ``torch.nn.init.calculate_gain`` names it.
        distribution: ``normal`` or ``uniform``.
        zero_init_last: see :class:`Reinit`.
    """

    name = "kaiming"

    def __init__(
        self,
        mode: str = "fan_in",
        nonlinearity: str = "relu",
        distribution: str = "normal",
        zero_init_last: bool = False,
    ) -> None:
        super().__init__(zero_init_last)
        _choice(self.name, "mode", mode, ("fan_in", "fan_out"))
        _choice(self.name, "distribution", distribution, DISTRIBUTIONS)
        try:
            self.gain = nn.init.calculate_gain(nonlinearity)
        except ValueError as err:
            raise ValueError(f"init.nonlinearity={nonlinearity!r}: {err}") from None
        self.mode = mode
        self.nonlinearity = nonlinearity
        self.distribution = distribution

    def draw(self, w: torch.Tensor) -> None:
        _draw(w, self.gain / math.sqrt(_fan(w, self.mode)), self.distribution)


class Orthogonal(Reinit):
    """``init=orthogonal``: a (semi-)orthogonal weight, flattened to (out, in·k…), times ``gain``.

    Saxe et al. 2014 §3.

    Args:
        gain: multiplier of the orthogonal matrix.
        zero_init_last: see :class:`Reinit`.
    """

    name = "orthogonal"

    def __init__(self, gain: float = 1.0, zero_init_last: bool = False) -> None:
        super().__init__(zero_init_last)
        self.gain = gain

    def draw(self, w: torch.Tensor) -> None:
        nn.init.orthogonal_(w, gain=self.gain)


class LSUV(Reinit):
    """``init=lsuv``: orthogonal init, then for each conv/linear layer in forward order its weight rescaled
    until its output on the batch has variance 1 within ``tol``, at most ``max_iters`` times.

    Mishkin & Matas 2016, "All you need is a good init", Alg. 1. Data-driven (``needs_batch``): training
    passes its first training batch, as the model sees it.

    Args:
        tol: stop when |Var(output) − 1| < tol (paper: Tol_var = 0.1).
        max_iters: rescalings per layer at most (paper: T_max = 10).
        zero_init_last: see :class:`Reinit`.
    """

    name = "lsuv"
    needs_batch = True

    def __init__(self, tol: float = 0.1, max_iters: int = 10, zero_init_last: bool = False) -> None:
        super().__init__(zero_init_last)
        _positive(self.name, tol=tol, max_iters=max_iters)
        self.tol = tol
        self.max_iters = int(max_iters)

    def draw(self, w: torch.Tensor) -> None:
        nn.init.orthogonal_(w)

    def fit(self, model: nn.Module, batch: torch.Tensor) -> None:
        """Alg. 1 after the orthogonal pre-init: scales each layer's weight by 1/√Var(output)."""
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
                for _ in range(self.max_iters):
                    var = variances[layer]
                    if abs(var - 1.0) < self.tol or var == 0.0:
                        break
                    layer.weight.div_(math.sqrt(var))
                    model(batch)
        finally:
            for h in hooks:
                h.remove()
            for m, mode in training.items():
                m.training = mode


class PatchWhitening(Default):
    """``init=patch_whitening``: the model's first conv becomes the whitening transform of its input patches.

    Jordan 2024, airbench (arXiv:2404.00498) §3.2: the 2×2 stem is fixed to the eigenvectors of the training
    patches' covariance, each scaled by 1/√(λ + ε), and their negatives; the lecture's PCA/whitening slide as
    a layer. The patches are every k×k window (stride 1) of the first conv's input on the batch, i.e. after
    the preprocess group, as airbench whitens normalized images. Like airbench, the covariance is the second
    moment ``PᵀP / n`` (standardized inputs have mean ≈ 0). The other layers keep the model's own init.

    The first conv (in forward order) of ``k×k`` kernels on ``C`` channels has ``d = C·k²`` inputs per output;
    with ``out ≤ d`` outputs it gets the ``out`` leading eigenvectors (PCA whitening, truncated), with
    ``out = 2d`` every eigenvector and its negative (airbench: 24 = 2·3·2², so a following ReLU/GELU keeps
    both signs). Its bias is zeroed; its weight is frozen when ``freeze`` (airbench), so the optimizer never
    sees it.

    Args:
        eps: added to each eigenvalue before the square root (airbench: 5e-4).
        freeze: exclude the whitened weight from training (airbench: frozen).
    """

    name = "patch_whitening"
    needs_batch = True

    def __init__(self, eps: float = 5e-4, freeze: bool = True) -> None:
        _positive(self.name, eps=eps)
        self.eps = eps
        self.freeze = freeze

    def __call__(self, model: nn.Module, batch: torch.Tensor | None = None) -> nn.Module:
        if batch is None:
            raise ValueError(
                f"init={self.name} is data-driven: a batch is required, PatchWhitening()(model, batch=x)"
            )
        conv, name, inputs = first_conv_input(model, batch)
        c, k_h, k_w = conv.in_channels, *conv.kernel_size
        d, out = c * k_h * k_w, conv.out_channels
        if conv.groups != 1 or not (out <= d or out == 2 * d):
            raise ValueError(
                f"init={self.name}: the first conv '{name}' has {out} outputs (groups={conv.groups}); "
                "whitening "
                f"its {c}×{k_h}×{k_w} patches needs groups=1 and at most {d} outputs, or exactly {2 * d} "
                "(each eigenvector and its negative)"
            )
        eigenvalues, eigenvectors = patch_eigens(inputs, (k_h, k_w), conv.dilation)
        filters = (eigenvectors / torch.sqrt(eigenvalues + self.eps)[:, None]).view(d, c, k_h, k_w)
        if out == 2 * d:
            filters = torch.cat([filters, -filters])
        with torch.no_grad():
            conv.weight.copy_(filters[:out].to(conv.weight.dtype))
            if conv.bias is not None:
                conv.bias.zero_()
        if self.freeze:
            conv.weight.requires_grad_(False)
        return model


def first_conv_input(model: nn.Module, batch: torch.Tensor) -> tuple[nn.Conv2d, str, torch.Tensor]:
    """``(conv, name, input)``: the first ``Conv2d`` that ``model``'s forward calls on ``batch``, and its
    input.

    The forward stops at that conv, in eval mode (no running statistic changes), without gradients.
    """
    names = {m: n for n, m in model.named_modules()}
    found: list[tuple[nn.Conv2d, torch.Tensor]] = []

    def capture(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        found.append((module, args[0]))
        raise _Found

    hooks = [m.register_forward_pre_hook(capture) for m in model.modules() if isinstance(m, nn.Conv2d)]
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(batch)
    except _Found:
        pass
    finally:
        for h in hooks:
            h.remove()
        model.train(training)
    if not found:
        raise ValueError(f"{type(model).__name__} has no Conv2d for init=patch_whitening to whiten")
    conv, inputs = found[0]
    return conv, names[conv], inputs


class _Found(Exception):
    pass


def patch_eigens(
    x: torch.Tensor, kernel_size: tuple[int, int], dilation: tuple[int, int] = (1, 1)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (d,) and eigenvectors (d, d), one per row, of the second moment of every k×k patch of
    ``x`` (N, C, H, W), largest first, in float64; ``d = C·k²`` in ``Conv2d`` weight order (C, kh, kw)."""
    patches = F.unfold(x.double(), kernel_size, dilation=dilation)  # (N, C·kh·kw, L)
    patches = patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (N·L, d)
    second_moment = patches.T @ patches / patches.shape[0]
    eigenvalues, eigenvectors = torch.linalg.eigh(second_moment)  # ascending, eigenvectors as columns
    return eigenvalues.flip(0).clamp_min(0), eigenvectors.T.flip(0)


SCHEMES: dict[str, type[Default]] = {
    cls.name: cls for cls in (Default, Constant, Normal, Xavier, Kaiming, Orthogonal, LSUV, PatchWhitening)
}


def apply_init(
    model: nn.Module, scheme: str = "default", batch: torch.Tensor | None = None, **options: Any
) -> nn.Module:
    """Applies the init scheme named ``scheme`` to every layer of ``model`` in place and returns it: the
    Python route to what ``init=<scheme> init.<option>=…`` does.

    Lecture "Weight initialization"; Glorot & Bengio 2010 eq. (16); He et al. 2015 §2.2 eq. (10);
    Saxe et al. 2014 §3; Mishkin & Matas 2016 Alg. 1.

    Args:
        model: a freshly built model.
        scheme: a name of :data:`SCHEMES` (``default``, ``constant``, ``normal``, ``xavier``, ``kaiming``,
            ``orthogonal``, ``lsuv``, ``patch_whitening``); see each scheme's class for what it does.
        batch: a training batch, for the data-driven schemes (``lsuv``, ``patch_whitening``).
        **options: the scheme's options, its class's arguments.

    Raises:
        ValueError: naming an unknown scheme, an option it does not take, or a value out of its range.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"init={scheme!r} is not one of {sorted(SCHEMES)}")
    cls = SCHEMES[scheme]
    valid = sorted(inspect.signature(cls).parameters)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"init.{unknown[0]} is not an option of init={scheme}; valid: {valid}")
    return cls(**options)(model, batch=batch)


def _positive(scheme: str, **values: float) -> None:
    for key, value in values.items():
        if not value > 0:
            raise ValueError(f"init.{key}={value!r} must be > 0 (init={scheme})")


def _choice(scheme: str, key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"init.{key}={value!r} is not one of {list(choices)} (init={scheme})")


def _fan(w: torch.Tensor, mode: str) -> float:
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(w)
    return {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]


def _draw(w: torch.Tensor, std: float, distribution: str) -> None:
    if distribution == "normal":
        nn.init.normal_(w, 0.0, std)
    else:  # U(±a) has std a/√3
        nn.init.uniform_(w, -math.sqrt(3.0) * std, math.sqrt(3.0) * std)
