"""The ``init`` group: re-initializes a built model's weights through one :func:`apply_init`.

Init lives apart from architecture: each model applies its paper's init in its constructor, and
``init=default`` keeps exactly that.
"""

from __future__ import annotations

from torch import nn

SCHEMES = ("default",)


def apply_init(model: nn.Module, scheme: str = "default") -> nn.Module:
    """Applies an initialization scheme to every layer of ``model`` in place and returns it.

    Args:
        model: a freshly built model.
        scheme: ``default`` keeps the architecture's own init (its paper's, or torchvision's).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"init.scheme={scheme!r} is not one of {SCHEMES}")
    return model
