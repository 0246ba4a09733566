"""The ``transfer`` group: the lecture's "transfer learning with CNNs" table, one option per cell.

|                      | very similar dataset          | very different dataset                       |
|----------------------|-------------------------------|----------------------------------------------|
| very little data     | ``linear_probe``              | ``stage_probes`` (linear classifiers per stage) |
| quite a lot of data  | ``finetune_top`` (few layers) | ``finetune_all`` (a larger number of layers) |

plus ``scratch``, the default, which loads nothing. Yosinski et al. 2014 ("How transferable are features in deep
neural networks?") and Razavian et al. 2014 ("CNN features off-the-shelf") are the lecture's sources.

Freezing is ``requires_grad=False`` (so the optimizer holds no state for frozen parameters, see
:func:`cvarch.optimizer.param_groups`), and every fully frozen module is kept in eval mode, so frozen norm layers
neither use batch statistics nor update their running ones (:func:`frozen_eval`, called by the LightningModule's
``train()``).

A ``source`` is a cvarch checkpoint (its architecture, fitted preprocessing and class count come with it and it
is loaded with ``weights_only=True``), a state-dict file in the model's own key format (torchvision's ``.pth``
files fit cvarch's ResNet and VGG, which keep torchvision's names), or a torchvision weights name such as
``IMAGENET1K_V1``, read from the torch hub cache.

The stages and the head are what the model declares (``feature_info`` and ``get_classifier()``, timm's names; see
:mod:`cvarch.models.layers`): nothing here guesses them from module names.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torch.func import functional_call

from cvarch.checkpoint import load_checkpoint_file
from cvarch.config import check_received, model_parts

log = logging.getLogger(__name__)

STRATEGIES = ("scratch", "linear_probe", "stage_probes", "finetune_top", "finetune_all")


@dataclass
class Source:
    """Weights to start from, as loaded from ``transfer.source``.

    Args:
        state: the model's state dict (keys as in the model, no ``model.`` prefix).
        name: where it came from, for messages.
        num_classes: the source's class count, from its head (or its run config).
        run_config: a cvarch source's run config (its ``model`` and ``preprocess`` nodes are adopted, once
            :meth:`Transfer.adopt` has checked it as a received file).
        preprocess: the fitted preprocess module's state (cvarch source) or ImageNet statistics (torchvision).
        preprocess_node: the ``preprocess`` config node that ``preprocess`` is the state of.
    """

    state: dict[str, torch.Tensor]
    name: str
    num_classes: int | None = None
    run_config: DictConfig | None = None
    preprocess: dict[str, torch.Tensor] | None = None
    preprocess_node: dict[str, Any] | None = None


class Transfer:
    """How a run reuses pretrained weights: what is loaded, what is frozen, and each part's lr multiplier.

    Yosinski et al. 2014 §4 (frozen vs fine-tuned layers); discriminative lr: Howard & Ruder 2018 (ULMFiT) §3.2.

    Args:
        strategy: one of :data:`STRATEGIES`.
        source: a cvarch checkpoint, a state-dict file, or a torchvision weights name (``IMAGENET1K_V1``, or
            ``ResNet18_Weights.IMAGENET1K_V1``); required by every strategy but ``scratch``, which ignores it.
        arch: torchvision model name under which a bare weights name is looked up (``resnet18``, ``vgg16``);
            the config fills it with the ``model`` group's choice.
        use_source_model: a cvarch source brings its architecture: the run builds the source's ``model`` node
            (with the target's class count) instead of its own ``model`` group.
        new_head: re-initialize the head (the target's classes are new classes); a head whose class count
            differs from the source's is always new.
        k: ``finetune_top``: how many of the last stages train (with everything above them).
        backbone_lr_mult: lr multiplier of the pretrained part that trains (the new head has 1).
        stage_lr_decay: further factor per stage below the top one (ULMFiT §3.2: 1/2.6); 1 = uniform.
        stages: module names whose outputs end the stages; ``None`` = the stages the model declares in its
            ``feature_info`` (:func:`stage_nodes`).
        download: fetch torchvision weights missing from the hub cache (with a 10 s reachability check).
    """

    def __init__(
        self,
        strategy: str = "scratch",
        source: str | None = None,
        arch: str | None = None,
        use_source_model: bool = True,
        new_head: bool = True,
        k: int = 1,
        backbone_lr_mult: float = 1.0,
        stage_lr_decay: float = 1.0,
        stages: Sequence[str] | None = None,
        download: bool = True,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"transfer.strategy={strategy!r} is not one of {STRATEGIES}")
        if strategy != "scratch" and not source:
            raise ValueError(
                f"transfer={strategy} needs transfer.source: a cvarch checkpoint, a state-dict file, or a "
                "torchvision weights name such as IMAGENET1K_V1"
            )
        for key, value in (("backbone_lr_mult", backbone_lr_mult), ("stage_lr_decay", stage_lr_decay)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"transfer.{key} must be a finite number > 0, got {value!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"transfer.k must be an integer >= 1, got {k!r}")
        self.strategy = strategy
        self.source = str(source) if source and strategy != "scratch" else None
        self.arch = arch
        self.use_source_model = use_source_model
        self.new_head = new_head
        self.k = k
        self.backbone_lr_mult = float(backbone_lr_mult)
        self.stage_lr_decay = float(stage_lr_decay)
        self.stages = list(stages) if stages else None
        self.download = download
        self._loaded: Source | None = None
        if source and strategy == "scratch":
            log.info("transfer=scratch: transfer.source=%s is not loaded", source)

    # --- the source -----------------------------------------------------------------------------------
    def loaded_source(self) -> Source | None:
        """The source, loaded once (``None`` for ``scratch``)."""
        if self.source is None:
            return None
        if self._loaded is None:
            self._loaded = load_source(self.source, self.arch, self.download)
        return self._loaded

    def adopt(self, cfg: DictConfig) -> dict[str, torch.Tensor] | None:
        """Makes a run config describe what the run really builds from the source, before it is saved.

        A cvarch source gives its ``model`` node (with ``num_classes`` set to ``data.num_classes``) unless
        ``use_source_model`` is off, and its ``preprocess`` node; torchvision weights give ``standardize``
        with ImageNet's statistics. Returns the preprocess state to load instead of fitting, or ``None``.
        """
        source = self.loaded_source()
        if source is None:
            return None
        if source.run_config is not None:  # someone else's file: only trusted targets come into the run
            check_received(source.run_config, f"transfer.source: {source.name}", cfg.get("trust"))
        with open_dict(cfg):
            if source.run_config is not None and self.use_source_model:
                model = OmegaConf.to_container(source.run_config.model, resolve=True)
                if "num_classes" in model:  # a plain torch.nn source sizes its own head
                    model["num_classes"] = int(cfg.data.num_classes)
                model.update(model_parts(cfg.model)[1])  # channels_last, compile: the run's own choice
                channels = model.get("in_channels", cfg.data.channels)
                if channels != cfg.data.channels:
                    raise ValueError(
                        f"transfer.source {source.name} takes {channels}-channel images but data.channels="
                        f"{cfg.data.channels} (data=digits_rgb32 shows how a grey dataset is replicated to RGB)"
                    )
                cfg.model = model
                log.info("transfer: model %s from %s", model["_target_"], source.name)
            if source.preprocess_node is not None:
                cfg.preprocess = source.preprocess_node
        return source.preprocess

    # --- the model ------------------------------------------------------------------------------------
    def __call__(
        self,
        model: nn.Module,
        model_cfg: DictConfig | Mapping[str, Any],
        image_shape: tuple[int, int, int] | None = None,
        load: bool = True,
    ) -> nn.Module:
        """Loads the source into ``model`` (keeping its new head), freezes, and wraps stage probes.

        Args:
            model: the built and initialized model; its head holds the ``init`` group's fresh weights.
            model_cfg: the ``model`` node it was built from (its ``num_classes`` sizes the stage probes).
            image_shape: (C, H, W) the model sees; sizes the stage probes.
            load: load the source weights; off when a checkpoint's weights replace them (``cvarch-eval``).
        """
        if self.strategy == "scratch":
            return model
        head = head_keys(model)
        if load:
            load_weights(model, self.loaded_source(), head, self.new_head)
        if self.strategy == "stage_probes":
            for param in model.parameters():
                param.requires_grad_(False)
            return StageProbes(model, self.stage_nodes(model), int(model_cfg["num_classes"]), image_shape)
        trainable = self.trainable(model, head)
        for name, param in model.named_parameters():
            param.requires_grad_(name in trainable)
        return model

    def stage_nodes(self, model: nn.Module) -> list[str]:
        """``transfer.stages`` checked against the model, else the stages the model declares."""
        if self.stages is None:
            return stage_nodes(model)
        modules = dict(model.named_modules())
        unknown = [s for s in self.stages if s not in modules]
        if unknown:
            raise ValueError(
                f"transfer.stages: {unknown} are not modules of {type(model).__name__}; its top-level modules "
                f"are {[n for n, _ in model.named_children()]}"
            )
        return list(self.stages)

    def trainable(self, model: nn.Module, head: set[str]) -> set[str]:
        """Names of the parameters that train: the head (``linear_probe``), everything from the ``k``-th last
        stage up (``finetune_top``), or all of them."""
        names = [n for n, _ in model.named_parameters()]
        if self.strategy == "linear_probe":
            return {n for n in names if n in head}
        if self.strategy == "finetune_top":
            stages = self.stage_nodes(model)
            if self.k > len(stages):
                raise ValueError(
                    f"transfer.k={self.k} but {type(model).__name__} has {len(stages)} stages: {stages}"
                )
            region = parameter_stages(model, stages)
            return {n for n in names if region[n] > len(stages) - self.k}
        return set(names)

    def lr_mult(self, model: nn.Module) -> dict[str, float]:
        """Parameter name → lr multiplier of the pretrained parameters that train (the head is absent: 1).

        A parameter in stage ``s`` of ``S`` (those above the last stage count as ``S``) gets
        ``backbone_lr_mult * stage_lr_decay ** (S - s)``.
        """
        if self.strategy not in ("finetune_top", "finetune_all"):
            return {}
        head = head_keys(model)
        stages = self.stage_nodes(model)
        region = parameter_stages(model, stages)
        top = len(stages)
        return {
            name: self.backbone_lr_mult * self.stage_lr_decay ** (top - min(region[name], top))
            for name, param in model.named_parameters()
            if param.requires_grad and name not in head
        }


def classifiers(model: nn.Module) -> tuple[nn.Module, ...]:
    """The modules whose outputs are classes, as the model declares them (``get_classifier()``): the main one first,
    then auxiliary heads' (GoogLeNet's ``aux1.fc2``, ``aux2.fc2``).

    Raises:
        ValueError: when the model declares none (a plain ``torch.nn`` model): it has no head to replace.
    """
    get_classifier = getattr(model, "get_classifier", None)
    if get_classifier is None:
        raise ValueError(
            f"{type(model).__name__} does not declare its classifier (get_classifier(), see cvarch.models.layers): "
            "it has no head that transfer can replace"
        )
    heads = get_classifier()
    return tuple(heads) if isinstance(heads, tuple) else (heads,)


def head_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of the classifier head: those of the modules ``get_classifier()`` returns, which are
    exactly the tensors whose shape depends on the class count (GoogLeNet's auxiliary heads and SqueezeNet's final
    conv included)."""
    heads = classifiers(model)
    return {
        f"{name}.{key}"
        for name, module in model.named_modules()
        if any(module is head for head in heads)
        for key in module.state_dict()
    }


def stage_nodes(model: nn.Module) -> list[str]:
    """The model's stages, as the module names whose outputs end them (its ``feature_info``; torchvision
    ``create_feature_extractor`` return nodes).

    Raises:
        ValueError: when the model declares none (set ``transfer.stages``).
    """
    info = getattr(model, "feature_info", None)
    if not info:
        raise ValueError(
            f"{type(model).__name__} declares no stages (feature_info, see cvarch.models.layers): list the modules "
            "that end them in transfer.stages"
        )
    return [stage["module"] for stage in info]


def parameter_stages(model: nn.Module, stages: Sequence[str]) -> dict[str, int]:
    """Parameter name → its stage, 1..S in forward order (the stem counts as stage 1), S+1 above the last stage.

    A stage is everything registered after the previous stage's end module, up to and including its own
    (registration order is forward order in the zoo).
    """
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}

    def last_index(node: str) -> int:
        return max(i for n, i in order.items() if n == node or n.startswith(node + "."))

    ends = [last_index(s) for s in stages]
    regions = {}
    for name, _ in model.named_parameters():
        index = order[name.rpartition(".")[0]]
        regions[name] = next((s + 1 for s, end in enumerate(ends) if index <= end), len(stages) + 1)
    return regions


def frozen_eval(model: nn.Module) -> None:
    """Puts every module whose parameters are all frozen in eval mode (with its children): frozen BatchNorm
    uses and keeps its running statistics, frozen dropout is off. Modules without parameters are left alone."""
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params) and module.training:
            module.eval()


class StageProbes(nn.Module):
    """Linear classifiers on the globally pooled features of several stages of a frozen backbone, trained at
    once (each on its own loss): which stage transfers best, in one run.

    Razavian et al. 2014 and Yosinski et al. 2014 §4 compare layers this way; the probe is BN without affine
    parameters then a linear layer, as MAE's linear probing (He et al. 2022 §A.2): still a linear classifier,
    but one lr suits every stage's feature scale. Features come from torchvision's ``create_feature_extractor``.

    Args:
        backbone: the pretrained model; its parameters are frozen by the caller.
        stages: module names whose outputs are probed, bottom to top.
        num_classes: the target's classes.
        image_shape: (C, H, W) of the inputs, to size the probes; ``None`` = 3×224×224.

    Returns (forward):
        ``(top, stage1, …, stage<S-1>)``, in training and in eval: the top stage's logits first, as the model's
        prediction, then the lower stages' as auxiliary heads (GoogLeNet's training layout). ``head_loss_weights``
        names them for the LightningModule (``stage<S>``, ``stage1``, …) and gives each loss the weight 1: the
        probes share no parameter, so each one trains on its own loss.
    """

    def __init__(
        self,
        backbone: nn.Module,
        stages: Sequence[str],
        num_classes: int,
        image_shape: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        from torchvision.models.feature_extraction import create_feature_extractor

        self.names = [f"stage{i + 1}" for i in range(len(stages))]
        self.stages = list(stages)
        try:
            self.backbone = create_feature_extractor(
                backbone, dict(zip(self.stages, self.names, strict=True))
            )
        except Exception as err:  # torch.fx cannot trace data-dependent control flow
            raise ValueError(
                f"transfer=stage_probes: cannot extract the stages {self.stages} of {type(backbone).__name__} "
                f"with torchvision's create_feature_extractor ({type(err).__name__}: {str(err)[:200]})"
            ) from None
        shape = image_shape or (3, 224, 224)
        tensors = {k: torch.empty_like(v, device="meta") for k, v in self.backbone.state_dict().items()}
        self.backbone.eval()
        features = functional_call(self.backbone, tensors, (torch.empty(1, *shape, device="meta"),))
        self.probes = nn.ModuleDict(
            {
                name: nn.Sequential(
                    # (N, C, H, W) maps are averaged; (N, C) features (an MLP's) are probed as they are
                    nn.AdaptiveAvgPool2d(1) if features[name].ndim == 4 else nn.Identity(),
                    nn.Flatten(),
                    nn.BatchNorm1d(features[name].shape[1], affine=False),
                    nn.Linear(features[name].shape[1], num_classes),
                )
                for name in self.names
            }
        )
        # the output order, and each head's loss weight, for cvarch.module.ClassificationModule
        self.head_loss_weights = {name: 1.0 for name in [self.names[-1], *self.names[:-1]]}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.backbone(x)  # {"stage<k>": (N, C_k, H_k, W_k)}
        return tuple(self.probes[name](features[name]) for name in self.head_loss_weights)


# --- loading --------------------------------------------------------------------------------------------
def load_weights(model: nn.Module, source: Source, head: set[str], new_head: bool = True) -> None:
    """Copies ``source`` into ``model`` except the head when it is new, strictly.

    Raises:
        ValueError: listing the missing, unexpected and mismatched keys when the source does not fit.
    """
    target = model.state_dict()
    head_fits = all(k in source.state and source.state[k].shape == target[k].shape for k in head)
    skip = head if (new_head or not head_fits) else set()
    missing = [k for k in target if k not in source.state and k not in skip]
    unexpected = [k for k in source.state if k not in target]
    mismatched = [
        f"{k}: source {tuple(source.state[k].shape)} vs model {tuple(target[k].shape)}"
        for k in target
        if k in source.state and k not in skip and source.state[k].shape != target[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = [
            f"{len(keys)} {what} {keys[:8]}{' …' if len(keys) > 8 else ''}"
            for what, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("mismatched", mismatched),
            )
            if keys
        ]
        raise ValueError(
            f"transfer.source {source.name} does not fit {type(model).__name__} (a different architecture?): "
            + "; ".join(parts)
        )
    state = {**target, **{k: v for k, v in source.state.items() if k not in skip}}
    model.load_state_dict(state, strict=True)
    log.info(
        "transfer: loaded %d tensors from %s (%s classes); head %s",
        len(state) - len(skip),
        source.name,
        source.num_classes,
        f"new ({sorted(skip)})" if skip else "kept",
    )


def load_source(source: str, arch: str | None = None, download: bool = True) -> Source:
    """Loads ``transfer.source``: a cvarch checkpoint, a state-dict file, or a torchvision weights name.

    Every file is read with ``torch.load(weights_only=True)``: no pickled code runs.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return _load_file(path)
    if re.fullmatch(r"([A-Za-z0-9]+_Weights\.)?[A-Z0-9_]+", source):
        return _load_torchvision(source, arch, download)
    raise FileNotFoundError(
        f"transfer.source: {source} is neither a file nor a torchvision weights name (e.g. IMAGENET1K_V1)"
    )


def _load_file(path: Path) -> Source:
    blob = load_checkpoint_file(path, key="transfer.source")
    if not isinstance(blob, dict):
        raise ValueError(
            f"transfer.source: {path} holds a {type(blob).__name__}, not a checkpoint or state dict"
        )
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
        raise ValueError(f"transfer.source: {path} is not a state dict (name → tensor)")
    return Source(state=dict(state), name=str(path))


def _imagenet_preprocess(transforms: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``standardize`` with the statistics a torchvision weights' transforms normalize with."""
    mean = torch.tensor(transforms.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(transforms.std, dtype=torch.float32).view(-1, 1, 1)
    node = {"_target_": "cvarch.preprocess.Standardize", "eps": 1.0e-6}
    return node, {"fitted": torch.tensor(True), "mean": mean, "std": std}


def _reachable(url: str, timeout: float = 10.0) -> bool:
    """Whether ``url`` answers within ``timeout`` s, DNS included (run in a thread, so nothing can hang)."""
    answer: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            answer.append(True)
        except Exception:
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


def _load_torchvision(name: str, arch: str | None, download: bool) -> Source:
    from torchvision.models import get_model_weights, get_weight

    try:
        weights = get_weight(name) if "." in name else get_model_weights(arch)[name]
    except Exception:
        raise ValueError(
            f"transfer.source={name}: not a torchvision weights name for transfer.arch={arch!r} (use "
            "ResNet18_Weights.IMAGENET1K_V1, or IMAGENET1K_V1 with transfer.arch=resnet18)"
        ) from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not cached.is_file():
        if not (download and _reachable(weights.url)):
            raise FileNotFoundError(
                f"transfer.source={name}: {cached.name} is not in the torch hub cache and "
                f"{'downloads are off (transfer.download=false)' if not download else 'cannot be downloaded'}; "
                f"put {weights.url} at {cached} (or set TORCH_HOME)"
            )
        torch.hub.download_url_to_file(weights.url, str(cached), hash_prefix=_hash_prefix(cached.name))
    source = _load_file(cached)
    source.name = f"{name} ({cached})"
    source.num_classes = len(weights.meta.get("categories") or []) or None
    source.preprocess_node, source.preprocess = _imagenet_preprocess(weights.transforms())
    return source


def _hash_prefix(filename: str) -> str | None:
    """torch.hub's file naming convention ``name-<sha256 prefix>.pth``."""
    match = re.search(r"-([a-f0-9]+)\.", filename)
    return match.group(1) if match else None
