"""cvarch: build, train, measure and ablate the classic CNN architectures with Lightning and Hydra.

The public Python API mirrors the CLI exactly:

- :func:`compose` returns the config ``cvarch-train`` would build from the same overrides;
- :func:`build_model` returns the model that config builds, init applied;
- :func:`train` runs one training job and returns its metrics.

They are imported on first use (PEP 562), so ``import cvarch.models`` costs torch and nothing of Lightning or
Hydra.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from cvarch.config import compose
    from cvarch.train import train

__version__ = "0.1.0"

_LAZY = {"compose": "cvarch.config", "train": "cvarch.train"}  # public name → the module that defines it


def build_model(*overrides: str) -> nn.Module:
    """Returns the exact model ``cvarch-train <overrides>`` would train, with the ``init`` group applied.

    Args:
        *overrides: Hydra overrides, e.g. ``"model=resnet20"``, ``"norm=none"``.
    """
    from cvarch.build import build_model as build
    from cvarch.config import compose

    return build(compose(*overrides))


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'cvarch' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """Keeps ``cvarch.train`` the function: the first import of the submodule ``cvarch.train`` (``from
    cvarch.train import …``, ``python -m``) would otherwise bind the module to that name, as importlib sets
    every submodule on its parent. Setting a module's ``__class__`` is the documented way to customize its
    attributes (Python reference, "Customizing module attribute access")."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "train" and isinstance(value, types.ModuleType):
            value = value.train
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = ["__version__", "build_model", "compose", "train"]
