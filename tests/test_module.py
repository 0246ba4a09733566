"""The LightningModule: loss, label smoothing, the regularizer hook, metrics and optimizer assembly."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cvarch.build import build_model, build_module
from cvarch.module import ClassificationModule
from cvarch.preprocess import Rescale


class ConstantPenalty:
    def __call__(self, model):
        return torch.tensor(2.5)


def module(**kwargs) -> ClassificationModule:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 10))
    defaults = dict(model=model, num_classes=10, optimizer=partial(torch.optim.SGD, lr=0.1))
    return ClassificationModule(**{**defaults, **kwargs})


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (8, 3, 2, 2), dtype=torch.uint8, generator=g), torch.arange(8)


def test_loss_is_cross_entropy_of_the_preprocessed_input():
    m = module()
    x, y = batch()
    expected = F.cross_entropy(m.model(x.float() / 255), y)
    assert torch.allclose(m.training_step((x, y), 0), expected)


def test_label_smoothing_and_the_regularizer_hook_enter_the_loss():
    x, y = batch()
    plain = module().training_step((x, y), 0)
    smoothed = module(label_smoothing=0.1).training_step((x, y), 0)
    logits = module().model(x.float() / 255)
    assert torch.allclose(smoothed, F.cross_entropy(logits, y, label_smoothing=0.1))
    assert not torch.allclose(smoothed, plain)
    penalized = module(regularizer=ConstantPenalty()).training_step((x, y), 0)
    assert torch.allclose(penalized, plain + 2.5)


class TwoHeads(nn.Module):
    """Returns (main, aux) in training, main alone in eval, as GoogLeNet does."""

    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Sequential(nn.Flatten(), nn.Linear(12, 10))
        self.aux = nn.Sequential(nn.Flatten(), nn.Linear(12, 10))

    def forward(self, x):
        return (self.main(x), self.aux(x)) if self.training else self.main(x)


def test_auxiliary_heads_add_their_weighted_loss_in_training():
    torch.manual_seed(0)
    m = module(model=TwoHeads(), aux_weight=0.3)
    x, y = batch()
    inputs = x.float() / 255
    expected = F.cross_entropy(m.model.main(inputs), y) + 0.3 * F.cross_entropy(m.model.aux(inputs), y)
    assert torch.allclose(m.training_step((x, y), 0), expected)


def test_accuracy_is_micro_top1_and_top5():
    m = module()
    logits = torch.full((4, 10), -1.0)
    logits[0, 3] = 5  # right
    logits[1, 0] = 5  # wrong, label 1 is in its top 5
    logits[1, 1] = 4
    logits[2, 9] = 5  # right
    logits[3, 0] = 5  # wrong, and label 7 is its lowest score: not in the top 5
    logits[3, 7] = -5
    y = torch.tensor([3, 1, 9, 7])
    assert m.val_acc(logits, y).item() == pytest.approx(0.5)
    assert m.val_top5(logits, y).item() == pytest.approx(0.75)


def test_optimizer_and_scheduler_are_completed_from_partials(compose_tmp):
    cfg = compose_tmp()
    m = build_module(cfg, build_model(cfg))
    opts = m.configure_optimizers()
    sgd = opts["optimizer"]
    assert isinstance(sgd, torch.optim.SGD)
    assert (
        sgd.defaults["lr"] == 0.01
        and sgd.defaults["momentum"] == 0.9
        and sgd.defaults["weight_decay"] == 5e-4
    )
    assert isinstance(opts["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert opts["lr_scheduler"]["monitor"] == "val/acc" and opts["lr_scheduler"]["scheduler"].mode == "max"
    assert isinstance(m.preprocess, Rescale)
    assert m.hparams["optimizer"]["lr"] == 0.01  # the resolved config rides along as plain hyperparameters
    assert type(m.hparams["optimizer"]) is dict
