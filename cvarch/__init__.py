"""cvarch: build, train, measure and ablate the classic CNN architectures with Lightning and Hydra.

The public Python API mirrors the CLI exactly:

- :func:`compose` returns the config ``cvarch-train`` would build from the same overrides;
- :func:`build_model` returns the model that config builds, init applied;
- :func:`train` runs one training job and returns its metrics.
"""

from __future__ import annotations

from torch import nn

from cvarch import build as _build
from cvarch.config import compose
from cvarch.train import train

__version__ = "0.1.0"


def build_model(*overrides: str) -> nn.Module:
    """Returns the exact model ``cvarch-train <overrides>`` would train, with the ``init`` group applied.

    Args:
        *overrides: Hydra overrides, e.g. ``"model=resnet20"``, ``"norm=none"``.
    """
    return _build.build_model(compose(*overrides))


__all__ = ["__version__", "build_model", "compose", "train"]
