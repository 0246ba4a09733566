"""Stage probes: linear classifiers on several stages of a frozen backbone (``transfer=stage_probes``).

Razavian et al. 2014 and Yosinski et al. 2014 §4 compare layers this way. The stages are the module names
the model declares (:func:`cvarch.transfer.stage_nodes`); the features come from torchvision's
``create_feature_extractor``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cvarch.models import meta_forward


class StageProbes(nn.Module):
    """Linear classifiers on the globally pooled features of several stages of a frozen backbone, trained at
    once (each on its own loss): which stage transfers best, in one run.

    The probe is BN without affine parameters then a linear layer, as MAE's linear probing (He et al. 2022
    §A.2): still a linear classifier, but one lr suits every stage's feature scale.

    Args:
        backbone: the pretrained model; its parameters are frozen by the caller.
        stages: module names whose outputs are probed, bottom to top.
        num_classes: the target's classes.
        image_shape: (C, H, W) of the inputs, to size the probes; ``None`` = 3×224×224.

    Returns (forward):
        ``(top, stage1, …, stage<S-1>)``, in training and in eval: the top stage's logits first, as the
        model's prediction, then the lower stages' as auxiliary heads (GoogLeNet's training layout).
        ``head_loss_weights`` names them for the LightningModule (``stage<S>``, ``stage1``, …) and gives each
        loss the weight 1: the probes share no parameter, so each one trains on its own loss.
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
                f"transfer=stage_probes: cannot extract the stages {self.stages} of "
                f"{type(backbone).__name__} with torchvision's create_feature_extractor "
                f"({type(err).__name__}: {str(err)[:200]})"
            ) from None
        self.backbone.eval()  # frozen: its norms use their running statistics (transfer.frozen_eval keeps it)
        features = meta_forward(self.backbone, (1, *(image_shape or (3, 224, 224))))
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
