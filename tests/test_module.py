"""The LightningModule: loss, soft targets, augmentation and test-time views, metrics, optimizer assembly."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cvarch.augment import Augment, Flip
from cvarch.build import build_model, build_module
from cvarch.module import ClassificationModule
from cvarch.preprocess import Rescale
from cvarch.tta import TestTimeAugment


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


class NamedHeads(nn.Module):
    """Returns (top, lower) in every mode and names them, as transfer's StageProbes does."""

    head_loss_weights = {"stage2": 1.0, "stage1": 1.0}

    def __init__(self) -> None:
        super().__init__()
        self.top = nn.Sequential(nn.Flatten(), nn.Linear(12, 10))
        self.lower = nn.Sequential(nn.Flatten(), nn.Linear(12, 10))

    def forward(self, x):
        return self.top(x), self.lower(x)


def test_named_heads_each_train_on_their_own_loss_and_get_their_own_accuracy():
    torch.manual_seed(0)
    m = module(model=NamedHeads(), aux_weight=0.3)
    logged = {}
    m.log = lambda name, value, **kw: logged.__setitem__(name, value)
    x, y = batch()
    inputs = x.float() / 255
    top, lower = m.model.top(inputs), m.model.lower(inputs)
    # the declared weights (1 each: the probes share no parameter), not aux_weight
    assert torch.allclose(m.training_step((x, y), 0), F.cross_entropy(top, y) + F.cross_entropy(lower, y))
    assert torch.allclose(logged["train/loss_stage1"], F.cross_entropy(lower, y))
    assert "train/loss_stage2" not in logged  # the prediction's loss is train/loss
    m.eval()
    m.validation_step((x, y), 0)
    assert {"val/acc", "val/acc_stage1", "val/acc_stage2"} <= set(logged)
    assert m.head_acc["val_stage2"].compute() == m.val_acc.compute() == (top.argmax(1) == y).float().mean()
    assert m.head_acc["val_stage1"].compute() == (lower.argmax(1) == y).float().mean()
    assert torch.equal(m.logits(x), top)  # the prediction is the first head's


class LightningState(ClassificationModule):
    """Records what this module reads from public Trainer state next to what Lightning 2.6 keeps private
    (``LoggerConnector.should_update_logs``, ``TrainingEpochLoop._num_ready_batches_reached``): the private
    names appear in this test only, which pins the public reconstruction to them."""

    def training_step(self, batch, batch_idx):
        trainer = self.trainer
        self.logs.append((self._logs_this_step(), trainer._logger_connector.should_update_logs))
        self.done.append((self._epoch_done(), trainer.fit_loop.epoch_loop._num_ready_batches_reached()))
        return super().training_step(batch, batch_idx)

    def on_train_epoch_end(self) -> None:  # where ModelCheckpoint saves by default
        trainer = self.trainer
        self.done.append((self._epoch_done(), trainer.fit_loop.epoch_loop._num_ready_batches_reached()))


def test_logging_steps_and_epoch_ends_read_from_public_trainer_state_agree_with_lightning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 10))
    m = LightningState(model=model, num_classes=10, optimizer=partial(torch.optim.SGD, lr=0.1))
    m.logs, m.done = [], []
    images = torch.randint(0, 256, (32, 3, 2, 2), dtype=torch.uint8)
    loader = DataLoader(TensorDataset(images, torch.arange(32) % 10), batch_size=4)  # 8 batches
    # limit_train_batches: the epoch ends before the loader does, so is_last_batch alone would miss it
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=5,
        limit_val_batches=0,
        log_every_n_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(m, train_dataloaders=loader)
    assert len(m.logs) == 2 * 5 and len(m.done) == 2 * (5 + 1)
    assert all(ours == lightnings for ours, lightnings in m.logs + m.done)
    assert [ours for ours, _ in m.logs] == [False, False, True, False, False, True, False, False, True, False]
    assert [ours for ours, _ in m.done[:6]] == [
        False,
        False,
        False,
        False,
        True,
        True,
    ]  # last batch, epoch end


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


class SpyAugment(Augment):
    """Flips every image and counts its calls."""

    def __init__(self) -> None:
        super().__init__({"flip": Flip(p=1.0)})
        self.calls = 0

    def forward(self, x, y):
        self.calls += 1
        return super().forward(x, y)


@pytest.mark.parametrize("training", [True, False])
def test_augmentation_runs_on_training_batches_only(training):
    m = module(augment=SpyAugment())
    m._trainer = SimpleNamespace(training=training)  # what Lightning's loops set
    x, y = batch()
    out, labels = m.on_after_batch_transfer((x, y), 0)
    assert m.augment.calls == int(training)
    expected = x.flip(-1) if training else x  # a flip is an index op: the batch stays uint8
    assert torch.equal(out, expected) and torch.equal(labels, y)


def test_soft_targets_enter_the_loss_and_train_accuracy_takes_their_argmax():
    m = module()
    x, y = batch()
    soft = 0.7 * F.one_hot(y, 10).float() + 0.3 * F.one_hot(y.roll(1), 10).float()  # a mixup batch
    logits = m.model(x.float() / 255)
    expected = 0.7 * F.cross_entropy(logits, y) + 0.3 * F.cross_entropy(logits, y.roll(1))
    assert torch.allclose(m.training_step((x, soft), 0), expected, atol=1e-6)
    assert m.train_acc.compute() == (logits.argmax(1) == y).float().mean()


def test_test_step_logs_plain_and_tta_accuracy():
    m = module(tta=TestTimeAugment(views="flip"))
    logged = {}
    m.log = lambda name, value, **kw: logged.__setitem__(name, value)
    x, y = batch()
    m.eval()
    m.test_step((x, y), 0)
    assert {"test/acc", "test/acc_top5", "test/acc_tta", "test/acc_tta_top5"} <= set(logged)
    probs = (m(x).softmax(1) + m(x.flip(-1)).softmax(1)) / 2
    assert m.test_acc_tta.compute() == (probs.argmax(1) == y).float().mean()
    assert m.test_acc.compute() == (m(x).argmax(1) == y).float().mean()


@pytest.mark.parametrize(("interval", "expected"), [("step", 340), ("epoch", 17)])
def test_schedulers_with_total_steps_get_the_runs_length(interval, expected):
    m = module(
        scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1),
        scheduler_options={"interval": interval},
    )
    m._trainer = SimpleNamespace(estimated_stepping_batches=340, max_epochs=17)
    scheduler = m.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert scheduler.total_steps == expected


def test_param_groups_of_the_optimizer_group_reach_the_optimizer(compose_tmp):
    cfg = compose_tmp("optimizer.groups.decay_norm_bias=false", "optimizer.groups.lr_mult={fc: 10.0}")
    m = build_module(cfg, build_model(cfg))
    sgd = m.configure_optimizers()["optimizer"]
    fc = {id(p) for p in m.model.fc.parameters()}
    for group in sgd.param_groups:
        one_d = all(p.ndim <= 1 for p in group["params"])
        assert group["weight_decay"] == (0.0 if one_d else 5e-4)
        in_fc = {id(p) for p in group["params"]} <= fc
        assert group["lr"] == pytest.approx(0.1 if in_fc else 0.01)


def test_a_fast_dev_run_skips_the_warm_up_it_has_no_room_for(compose_tmp):
    from cvarch.train import train

    cfg = compose_tmp("scheduler=cosine", "scheduler.warmup_steps=100", "debug=fdr", "logger=none")
    assert train(cfg)["epochs"] == 1  # one batch of everything; a real run would refuse 100 ≥ 1 steps
    cfg = compose_tmp("scheduler=cosine", "scheduler.warmup_steps=100", "trainer.max_epochs=1", "logger=none")
    with pytest.raises(ValueError, match="scheduler.warmup_steps must be < scheduler.total_steps"):
        train(cfg)
