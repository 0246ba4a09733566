"""The ``transfer`` group's strategies: what a run loads, freezes and trains, and each part's lr.

The lecture's "transfer learning with CNNs" table, one option per cell:

|                     | very similar dataset          | very different dataset                          |
|---------------------|-------------------------------|-------------------------------------------------|
| very little data    | ``linear_probe``              | ``stage_probes`` (linear classifiers per stage) |
| quite a lot of data | ``finetune_top`` (few layers) | ``finetune_all`` (a larger number of layers)    |

plus ``scratch``, the default, which loads nothing. Yosinski et al. 2014 ("How transferable are features in
deep neural networks?") and Razavian et al. 2014 ("CNN features off-the-shelf") are the lecture's sources.

Freezing is ``requires_grad=False`` (the optimizer then holds no state for frozen parameters, see
:func:`cvarch.optimizer.param_groups`), and every fully frozen module stays in eval mode (:func:`frozen_eval`,
called by the LightningModule's ``train()``). The stages and the head are what the model declares
(``feature_info``, ``get_classifier()``; see :mod:`cvarch.models.layers`). Sources are loaded by
:mod:`cvarch.sources`, stage probes built by :mod:`cvarch.probes`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from cvarch.config import check_received, model_parts
from cvarch.probes import StageProbes
from cvarch.sources import Source, load_source

log = logging.getLogger(__name__)

STRATEGIES = ("scratch", "linear_probe", "stage_probes", "finetune_top", "finetune_all")


class Transfer:
    """How a run reuses pretrained weights: what is loaded, what is frozen, and each part's lr multiplier.

    Yosinski et al. 2014 §4 (frozen vs fine-tuned layers); discriminative lr: Howard & Ruder 2018 §3.2.

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
        download: fetch torchvision weights missing from the torch hub cache (hash-checked by torch.hub).
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
                        f"transfer.source {source.name} takes {channels}-channel images but "
                        f"data.channels={cfg.data.channels} (data=digits_rgb32 shows how a grey dataset is "
                        "replicated to RGB)"
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
                f"transfer.stages: {unknown} are not modules of {type(model).__name__}; its top-level "
                f"modules are {[n for n, _ in model.named_children()]}"
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
    """The modules whose outputs are classes, as the model declares them (``get_classifier()``): the main
    one first, then auxiliary heads' (GoogLeNet's ``aux1.fc2``, ``aux2.fc2``).

    Raises:
        ValueError: when the model declares none (a plain ``torch.nn`` model): it has no head to replace.
    """
    get_classifier = getattr(model, "get_classifier", None)
    if get_classifier is None:
        raise ValueError(
            f"{type(model).__name__} does not declare its classifier (get_classifier(), see "
            "cvarch.models.layers): it has no head that transfer can replace"
        )
    heads = get_classifier()
    return tuple(heads) if isinstance(heads, tuple) else (heads,)


def head_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of the classifier head: those of the modules ``get_classifier()`` returns, exactly
    the tensors whose shape depends on the class count (GoogLeNet's aux heads, SqueezeNet's final conv)."""
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
            f"{type(model).__name__} declares no stages (feature_info, see cvarch.models.layers): list the "
            "modules that end them in transfer.stages"
        )
    return [stage["module"] for stage in info]


def parameter_stages(model: nn.Module, stages: Sequence[str]) -> dict[str, int]:
    """Parameter name → its stage, 1..S in forward order (the stem is stage 1), S+1 above the last stage.

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
    uses and keeps its running statistics, frozen dropout is off. Parameterless modules are left alone."""
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params) and module.training:
            module.eval()


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
