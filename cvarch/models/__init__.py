"""The ``model`` group: one file per architecture family; variants are YAML data in ``conf/model/``.

:func:`check_input_size` is the build-time guard every model gets: an input too small for an architecture
is a ``ValueError`` naming the layer where the spatial size collapses, never a shape error mid-training.
:func:`meta_forward` is the shapes-only forward that it, the head check, the cost counters and the stage
probes share.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.func import functional_call

if TYPE_CHECKING:  # only a type hint: a model file imports torch and nothing of Hydra (see STYLE.md)
    from omegaconf import DictConfig


def meta_forward(model: nn.Module, x: torch.Tensor | Sequence[int]) -> Any:
    """``model``'s output on a meta-device input, in eval mode: shapes only, no memory, no FLOP.

    Parameters and buffers are swapped for meta tensors (``torch.func.functional_call``), so the model's
    own tensors and its norm statistics are left alone, and its train/eval mode is restored afterwards.
    Forward hooks run as in a real forward.

    Args:
        model: any ``nn.Module``, on any device (the meta device included).
        x: the input, batch dimension included: a shape, or a tensor whose meta copy is passed (a meta
            tensor is passed as itself).
    """
    x = x.to("meta") if isinstance(x, torch.Tensor) else torch.empty(tuple(x), device="meta")
    tensors = {k: torch.empty_like(v, device="meta") for k, v in model.state_dict(keep_vars=True).items()}
    was_training = model.training
    model.eval()
    try:
        return functional_call(model, tensors, (x,), strict=False)
    finally:
        model.train(was_training)


def _probe(model: nn.Module, shape: tuple[int, ...]) -> tuple[str, str] | None:
    """Runs ``model`` on a meta-device input of ``shape`` (:func:`meta_forward`); returns ``(failing layer,
    error)``, or ``None``."""
    names = {m: n or type(model).__name__ for n, m in model.named_modules()}
    stack: list[str] = []
    failed: list[str] = []

    def enter(module, args):
        stack.append(names[module])

    def leave(module, args, output):
        if isinstance(output, torch.Tensor) and output.ndim == 4 and 0 in output.shape[-2:]:
            failed.append(names[module])
            raise _Collapsed
        stack.pop()

    hooks = [m.register_forward_pre_hook(enter) for m in model.modules()]
    hooks += [m.register_forward_hook(leave) for m in model.modules()]
    try:
        meta_forward(model, shape)
        return None
    except _Collapsed:
        return failed[-1], "spatial size 0"
    except RuntimeError as err:
        return (stack[-1] if stack else type(model).__name__), str(err).splitlines()[0]
    finally:
        for h in hooks:
            h.remove()


class _Collapsed(Exception):
    pass


def _works(model: nn.Module, channels: int, size: int) -> bool:
    return _probe(model, (1, channels, size, size)) is None


def smallest_input_size(model: nn.Module, channels: int, start: int = 1, limit: int = 4096) -> int | None:
    """The smallest square input side ≥ ``start`` that ``model`` accepts, or ``None`` up to ``limit``.

    Nets with adaptive pooling accept every size above a threshold, found by bisection; nets with a fixed-size
    classifier (the lecture's AlexNet: 227 only) are scanned size by size.
    """
    if _works(model, channels, limit):
        low, high = start, limit
        while low < high:  # output size only grows with input size, so bisect
            mid = (low + high) // 2
            if _works(model, channels, mid):
                high = mid
            else:
                low = mid + 1
        return low
    return next((s for s in range(start, 1025) if _works(model, channels, s)), None)


def check_input_size(model: nn.Module, image_shape: tuple[int, int, int]) -> None:
    """Checks that ``model`` accepts (C, H, W) images, before any training.

    Args:
        model: a built model.
        image_shape: (channels, height, width) of the images the model will get.

    Raises:
        ValueError: naming the layer where the input stops fitting and the smallest square size that works.
    """
    channels, height, width = image_shape
    failure = _probe(model, (1, channels, height, width))
    if failure is None:
        return
    layer, error = failure
    name = type(model).__name__
    smallest = smallest_input_size(model, channels)
    if smallest is None:
        raise ValueError(f"{name} fails on {channels}×{height}×{width} input at layer '{layer}': {error}")
    if smallest > max(height, width):
        raise ValueError(
            f"input {height}×{width}×{channels} is too small for {name}: the spatial size collapses at layer "
            f"'{layer}'; the smallest square input that works is {smallest}×{smallest} (set data.image_size)"
        )
    raise ValueError(
        f"input {height}×{width}×{channels} does not fit {name} at layer '{layer}' ({error}); "
        f"the smallest square input that works is {smallest}×{smallest} (set data.image_size)"
    )


IMAGENET_SIZE = 224  # He 2015, Simonyan 2014, Szegedy 2014, Huang 2017, Iandola 2016: 224×224 crops
CIFAR_SIZE = 32
# Native size when a model config does not fix one itself (``image_size``, the lecture AlexNet's 227): CIFAR
# nets say ``stem: cifar``; FractalNet (Larsson 2017 §4) and the speed-run net (Jordan 2024) are CIFAR-only
# and have no stem key; every other family
# is an ImageNet net. Kept in step with conf/model/*.yaml's header comments and tests/models/test_configs.py.
CIFAR_TARGETS = ("cvarch.models.fractalnet.FractalNet", "cvarch.models.speedrun.SpeedrunNet")


def native_size(model_cfg: DictConfig) -> int:
    """The square input side a model config was designed for (Canziani 2017 §2 measures each net at its own).

    Args:
        model_cfg: the ``model`` node of a composed config.
    """
    if model_cfg.get("image_size"):
        return int(model_cfg.image_size)
    if model_cfg.get("stem") == "cifar" or model_cfg.get("_target_") in CIFAR_TARGETS:
        return CIFAR_SIZE
    return IMAGENET_SIZE
