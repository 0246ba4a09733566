"""Loading ``transfer.source``: a cvarch checkpoint, a state-dict file, or a torchvision weights name.

A cvarch checkpoint brings its architecture, fitted preprocessing and class count. A state-dict file is in
the model's own key format (torchvision's ``.pth`` files fit cvarch's ResNet and VGG, which keep
torchvision's names). A torchvision weights name such as ``IMAGENET1K_V1`` is loaded by torchvision's
hash-checked ``WeightsEnum.get_state_dict``, from the torch hub cache when the file is there. Every file is
read with ``torch.load(weights_only=True)``: no pickled code runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from cvarch.checkpoint import load_checkpoint_file


@dataclass
class Source:
    """Weights to start from, as loaded from ``transfer.source``.

    Args:
        state: the model's state dict (keys as in the model, no ``model.`` prefix).
        name: where it came from, for messages.
        num_classes: the source's class count, from its head (or its run config).
        run_config: a cvarch source's run config (its ``model`` and ``preprocess`` nodes are adopted, once
            :meth:`cvarch.transfer.Transfer.adopt` has checked it as a received file).
        preprocess: the fitted preprocess module's state (cvarch source) or ImageNet statistics
            (torchvision).
        preprocess_node: the ``preprocess`` config node that ``preprocess`` is the state of.
    """

    state: dict[str, torch.Tensor]
    name: str
    num_classes: int | None = None
    run_config: DictConfig | None = None
    preprocess: dict[str, torch.Tensor] | None = None
    preprocess_node: dict[str, Any] | None = None


def load_source(source: str, arch: str | None = None, download: bool = True) -> Source:
    """Loads ``transfer.source``: a cvarch checkpoint, a state-dict file, or a torchvision weights name.

    Args:
        source: a file, or a torchvision weights name (``IMAGENET1K_V1``, ``ResNet18_Weights.IMAGENET1K_V1``).
        arch: the torchvision model name a bare weights name belongs to (``resnet18``).
        download: fetch torchvision weights missing from the torch hub cache.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return load_file(path)
    if re.fullmatch(r"([A-Za-z0-9]+_Weights\.)?[A-Z0-9_]+", source):
        return _load_torchvision(source, arch, download)
    raise FileNotFoundError(
        f"transfer.source: {source} is neither a file nor a torchvision weights name (e.g. IMAGENET1K_V1)"
    )


def load_file(path: Path, key: str = "transfer.source") -> Source:
    """A cvarch checkpoint or a state-dict file as a :class:`Source` (``key`` names the option in errors)."""
    blob = load_checkpoint_file(path, key=key)
    if not isinstance(blob, dict):
        raise ValueError(f"{key}: {path} holds a {type(blob).__name__}, not a checkpoint or state dict")
    if "state_dict" in blob and "model" in blob.get("hyper_parameters", {}):  # written by cvarch-train
        run_cfg = OmegaConf.create(blob["hyper_parameters"])
        state = blob["state_dict"]
        return Source(
            state={k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")},
            name=str(path),
            num_classes=int(run_cfg.model.get("num_classes") or run_cfg.data.num_classes),
            run_config=run_cfg,
            preprocess={
                k.removeprefix("preprocess."): v for k, v in state.items() if k.startswith("preprocess.")
            },
            preprocess_node=OmegaConf.to_container(run_cfg.preprocess, resolve=True),
        )
    state = blob.get("state_dict", blob)
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{key}: {path} is not a state dict (name → tensor)")
    return Source(state=dict(state), name=str(path))


def _imagenet_preprocess(transforms: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``standardize`` with the statistics a torchvision weights' transforms normalize with."""
    mean = torch.tensor(transforms.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(transforms.std, dtype=torch.float32).view(-1, 1, 1)
    node = {"_target_": "cvarch.preprocess.Standardize", "eps": 1.0e-6}
    return node, {"fitted": torch.tensor(True), "mean": mean, "std": std}


def _load_torchvision(name: str, arch: str | None, download: bool) -> Source:
    from torchvision.models import get_model_weights, get_weight

    try:
        weights = get_weight(name) if "." in name else get_model_weights(arch)[name]
    except Exception:
        raise ValueError(
            f"transfer.source={name}: not a torchvision weights name for transfer.arch={arch!r} (use "
            "ResNet18_Weights.IMAGENET1K_V1, or IMAGENET1K_V1 with transfer.arch=resnet18)"
        ) from None
    # where torch.hub.load_state_dict_from_url keeps it; a file already there is read without network
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    missing = f"transfer.source={name}: {cached.name} is not in the torch hub cache and"
    where = f"put {weights.url} at {cached} (or set TORCH_HOME)"
    is_cached = cached.is_file()
    if not (is_cached or download):
        raise FileNotFoundError(f"{missing} downloads are off (transfer.download=false); {where}")
    try:
        # torch.hub checks a download against the sha256 prefix in the file's name (check_hash)
        state = weights.get_state_dict(progress=True, check_hash=True, weights_only=True, map_location="cpu")
    except OSError as err:  # no network (URLError), a timeout, a refused connection
        if is_cached:
            raise
        raise FileNotFoundError(f"{missing} cannot be downloaded ({err}); {where}") from None
    node, preprocess = _imagenet_preprocess(weights.transforms())
    return Source(
        state=dict(state),
        name=f"{name} ({cached})",
        num_classes=len(weights.meta.get("categories") or []) or None,
        preprocess=preprocess,
        preprocess_node=node,
    )
