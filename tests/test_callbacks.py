"""LearningCurves, ActivationStats, AugmentationGrid, ModelSummary, ProgressBar, TestPredictions,
DivergenceGuard, EMA, Lookahead: histories, figures and their titles, W&B, init-study numbers, FLOPs, the
run's ETA, the confusion matrix, divergence, weight averages against hand-computed ones."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

import cvarch.callbacks
from cvarch.callbacks import (
    EMA,
    ActivationStats,
    AugmentationGrid,
    DivergenceError,
    DivergenceGuard,
    LearningCurves,
    Lookahead,
    ModelSummary,
    ProgressBar,
    run_eta,
    summarize_model,
)
from tests import wandb_log


@pytest.fixture
def saved(monkeypatch):
    """The figures the callbacks save, as ``[(figure, title, path)]``; they are still written."""
    figures = []
    real = cvarch.callbacks.save

    def record(fig, path, title="", dpi=120):
        figures.append((fig, title, path))
        return real(fig, path, title=title, dpi=dpi)

    monkeypatch.setattr(cvarch.callbacks, "save", record)
    return figures


def test_history_is_saved_as_json_and_png_titled_labelled_on_whole_epochs(tmp_path, saved):
    cb = LearningCurves(str(tmp_path))
    cb.title = "resnet20 on digits · optimizer.lr=0.05"
    for epoch in range(3):
        cb._upsert({"epoch": epoch, "val/loss": 1.0 / (epoch + 1), "val/acc": 0.5 + 0.1 * epoch})
        cb._upsert({"epoch": epoch, "train/loss": 2.0 / (epoch + 1), "train/acc": 0.4 + 0.1 * epoch})
    path = cb.save()
    assert matplotlib.image.imread(path).shape[:2] == (400, 1100)  # 11 × 4 inches at 100 dpi
    ((fig, title, _),) = saved
    assert title == "resnet20 on digits · optimizer.lr=0.05"
    loss, acc = fig.axes
    assert [ax.get_ylabel() for ax in (loss, acc)] == ["cross-entropy", "accuracy (fraction)"]
    assert [ax.get_xlabel() for ax in (loss, acc)] == ["epoch", "epoch"]
    assert loss.xaxis.get_major_locator()._integer  # MaxNLocator(integer=True): no 1.5 epochs
    assert list(loss.lines[0].get_xdata()) == [1, 2, 3]  # epochs counted from 1
    legend = loss.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["train/loss", "val/loss"]
    assert legend.get_bbox_to_anchor().x0 > loss.get_window_extent().x1 - 1  # beside the data, not over it
    rows = json.loads((tmp_path / "history.json").read_text())
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows[2]["train/loss"] == 2.0 / 3 and rows[2]["val/acc"] == 0.7

    resumed = LearningCurves(str(tmp_path))
    resumed.load_state_dict(cb.state_dict())
    assert resumed.history == cb.history


def test_init_study_reproduces_the_lecture_activation_statistics(compose_tmp):
    """experiment=init_study with N(0, 0.01) and tanh: the lecture's printed stds, layer by layer."""
    import cvarch

    metrics = cvarch.train(compose_tmp("experiment=init_study", "logger=none"))
    out = Path(metrics["output_dir"])
    record = json.loads((out / "activation_stats.json").read_text())[0]
    assert record["step"] == 0 and len(record["layers"]) == 10
    stds = [layer["std"] for layer in record["layers"]]
    # the lecture: 0.213081, 0.047551, 0.010630, 0.002378, 0.000532, 0.000119, …; the ratio per layer is
    # 0.01·sqrt(500) ≈ 0.22, so layer 10 is ~1e-7: "all activations become zero"
    lecture = [0.213081, 0.047551, 0.010630, 0.002378, 0.000532, 0.000119]
    for ours, theirs in zip(stds, lecture, strict=False):
        assert ours == pytest.approx(theirs, rel=0.05)
    assert stds[-1] < 1e-4
    assert all(n < 1e-5 for n in record["grad_norms"][:-1])  # "what do the gradients look like?": vanishing
    assert matplotlib.image.imread(out / "activation_stats.png").shape[0] > 0


@pytest.mark.slow
def test_activation_stats_reach_wandb(compose_tmp):
    import cvarch
    from tests import wandb_log

    metrics = cvarch.train(compose_tmp("experiment=init_study", "init=xavier"))
    log = next(Path(metrics["output_dir"]).glob("wandb/offline-run-*/run-*.wandb"))
    rows = [r for r in wandb_log.history(log) if "activation_std/hidden.9.act" in r]
    assert len(rows) == 1 and 0.1 < rows[0]["activation_std/hidden.9.act"] < 0.5  # Xavier + tanh holds up
    assert rows[0]["activations/hidden.0.act/_type"] == "histogram"  # nested keys, flattened by the reader
    assert sum(rows[0]["activations/hidden.0.act/values"]) > 0


def test_test_predictions_write_the_confusion_matrix_and_log_it_with_test_images(default_run):
    out = default_run["output_dir"]
    metrics = json.loads((out / "metrics.json").read_text())
    confusion = json.loads((out / "confusion_matrix.json").read_text())
    matrix = confusion["matrix"]
    total = sum(map(sum, matrix))
    assert confusion["classes"] == [str(i) for i in range(10)] and total == 270  # digits: 15% of 1,797 test
    # the best checkpoint's test accuracy is the matrix's trace over its total
    assert sum(matrix[i][i] for i in range(10)) / total == pytest.approx(metrics["test/acc"], abs=1e-6)
    log = next(out.glob("wandb/offline-run-*/run-*.wandb"))
    logged = {k: v for row in wandb_log.history(log) for k, v in row.items()}
    assert logged["test/confusion_matrix_table/nrows"] == 100  # 10 × 10 (actual, predicted, count) rows
    assert logged["test/predictions/nrows"] == 32 and logged["test/predictions/ncols"] == 4


def test_the_confusion_matrix_is_scikit_learns_over_all_test_batches(tmp_path):
    """Rows true class, columns predicted class, counted over every batch; the model's 4 classes, though the
    split holds only 3 of them; written as {"classes", "matrix"}."""
    from sklearn.metrics import confusion_matrix

    from cvarch.callbacks import TestPredictions  # imported here: at the top, pytest would collect the class

    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.rand(n, 1, 2, 2, generator=gen), torch.randint(0, 3, (n,), generator=gen)) for n in (16, 7)
    ]
    logits = [torch.randn(len(y), 4, generator=gen) for _, y in batches]
    cb = TestPredictions(str(tmp_path), num_images=5)
    trainer = SimpleNamespace(is_global_zero=True, loggers=[])
    cb.on_test_epoch_start(trainer, None)
    for i, (batch, out) in enumerate(zip(batches, logits, strict=True)):
        cb.on_test_batch_end(trainer, None, {"logits": out}, batch, i)
    cb.on_test_epoch_end(trainer, None)
    written = json.loads((tmp_path / "confusion_matrix.json").read_text())
    targets, preds = torch.cat([y for _, y in batches]), torch.cat(logits).argmax(dim=1)
    expected = confusion_matrix(targets.numpy(), preds.numpy(), labels=range(4)).tolist()
    assert written == {"classes": ["0", "1", "2", "3"], "matrix": expected}
    assert sum(map(sum, expected)) == 23 and [row[3] for row in expected] != [0, 0, 0, 0]
    first = list(zip(targets[:5].tolist(), preds[:5].tolist(), strict=True))
    assert [(label, pred) for _, label, pred, _ in cb.images] == first  # the W&B table's images


def _trainer_at(step: int, epoch: int = 0):
    state = SimpleNamespace(fn="fit")
    return SimpleNamespace(global_step=step, current_epoch=epoch, state=state, sanity_checking=False)


def test_divergence_guard_names_the_step_and_the_last_finite_loss():
    guard = DivergenceGuard()
    for step, loss in enumerate((2.5, 1.25)):
        guard.on_before_backward(_trainer_at(step), None, torch.tensor(loss))
    with pytest.raises(
        DivergenceError,
        match=r"loss is nan at global step 2 \(epoch 0\); last finite loss 1.25 at global step 1",
    ):
        guard.on_before_backward(_trainer_at(2), None, torch.tensor(float("nan")))
    with pytest.raises(DivergenceError, match="loss is inf at global step 0 .*no finite loss before it"):
        DivergenceGuard().on_before_backward(_trainer_at(0), None, torch.tensor(float("inf")))


def test_divergence_guard_refuses_to_checkpoint_non_finite_weights():
    guard, net = DivergenceGuard(), nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    guard.on_validation_end(_trainer_at(7, 1), net)
    guard.on_train_epoch_end(_trainer_at(7, 1), net)
    with torch.no_grad():
        net[1].running_var[0] = float("nan")  # a buffer counts too: it is saved in the checkpoint
    with pytest.raises(
        DivergenceError, match=r"non-finite weights at global step 7 \(epoch 1\): 1.running_var"
    ):
        guard.on_validation_end(_trainer_at(7, 1), net)
    with pytest.raises(DivergenceError, match="1.running_var"):
        guard.on_train_epoch_end(_trainer_at(7, 1), net)


class _Regression(pl.LightningModule):
    """A linear regression with BatchNorm on a fixed batch: a real parameter and buffer per update."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        self.x, self.y = torch.randn(8, 4), torch.randn(8, 3)

    def training_step(self, batch, batch_idx):
        return ((self.net(batch[0]) - batch[1]) ** 2).mean()

    def test_step(self, batch, batch_idx):
        self.log("test/loss", ((self.net(batch[0]) - batch[1]) ** 2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self):  # the one batch three times: three steps an epoch
        return torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(self.x.repeat(3, 1), self.y.repeat(3, 1)), batch_size=8
        )

    test_dataloader = train_dataloader


class _Record(pl.Callback):
    """The weights and BN running mean after each optimizer step, before the averaging callback sees them."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states.append(
            {k: v.detach().clone() for k, v in pl_module.state_dict().items() if v.is_floating_point()}
        )


def _fit(tmp_path, averaging: pl.Callback) -> tuple[_Regression, list[dict[str, torch.Tensor]]]:
    record = _Record()
    module = _Regression()
    trainer = pl.Trainer(
        max_steps=3,
        callbacks=[record, averaging],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module)
    return module, record.states


def test_ema_weights_are_the_hand_computed_average_after_3_steps(tmp_path):
    """a₁ = w₁, aₖ = d·aₖ₋₁ + (1 − d)·wₖ (Polyak averaging as timm's ModelEmaV2), BN statistics included;
    the model ends with a₃."""
    decay = 0.6
    module, (w1, w2, w3) = _fit(tmp_path, EMA(decay=decay))
    for key in w1:
        expected = decay * (decay * w1[key] + (1 - decay) * w2[key]) + (1 - decay) * w3[key]
        assert torch.allclose(module.state_dict()[key], expected, atol=1e-6), key
        if not torch.equal(w1[key], w3[key]):  # (the bias before BN gets no gradient)
            assert not torch.allclose(w3[key], expected, atol=1e-4), (
                key
            )  # the average is not the last weights


def test_lookahead_resets_the_trained_weights_to_the_slow_ones_at_each_update(tmp_path):
    """Zhang et al. 2019 / airbench: every k steps slow ← slow + (1 − d)(fast − slow), fast ← slow. With k = 1
    and a constant d (power 0): s₁ = w₁, then sₖ = d·sₖ₋₁ + (1 − d)·wₖ where wₖ is one step from sₖ₋₁."""
    decay = 0.5
    module, (w1, w2, w3) = _fit(tmp_path, Lookahead(every_n_steps=1, decay=decay, power=0.0))
    for key in w1:
        s2 = decay * w1[key] + (1 - decay) * w2[key]
        expected = decay * s2 + (1 - decay) * w3[key]
        assert torch.allclose(module.state_dict()[key], expected, atol=1e-6), key


def test_lookahead_decay_grows_with_the_cube_of_progress_and_updates_every_k_steps(tmp_path):
    lookahead = Lookahead(every_n_steps=2, decay=0.8, power=3.0)
    assert [lookahead.should_update(step_idx=i) for i in range(4)] == [False, True, False, True]
    _fit(tmp_path, lookahead)
    assert lookahead._decay_now == pytest.approx(0.8)  # the last step: progress 3/3
    with pytest.raises(ValueError, match="callbacks.lookahead.every_n_steps"):
        Lookahead(every_n_steps=0)
    with pytest.raises(ValueError, match="callbacks.lookahead.decay"):
        Lookahead(decay=1.5)


def test_testing_a_checkpoint_after_the_fit_evaluates_the_averaged_weights(tmp_path):
    """Lightning's WeightAveraging would load the trained weights back when ``trainer.test(ckpt_path=…)``
    follows a fit; cvarch's callbacks keep the checkpoint's averaged ones, which cvarch-train tests."""
    record = _Record()
    module = _Regression()
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, monitor=None)
    trainer = pl.Trainer(
        max_steps=3,
        callbacks=[record, EMA(decay=0.6), checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module)
    averaged = {k: v.clone() for k, v in module.state_dict().items()}
    trainer.test(module, ckpt_path=checkpoint.best_model_path, verbose=False)
    for key, value in averaged.items():
        assert torch.equal(module.state_dict()[key], value), key


def test_init_study_figure_counts_every_value_and_names_the_init_and_activation(compose_tmp, saved):
    """He init + ReLU: with the old fixed range (-1, 1) about 23% of the values fell outside the histograms
    and went uncounted; the shared data range counts all of them. The title names the run, the init and the
    activation; std starts at 0 and the mean spans ±max std, so a flat curve looks flat; the weight gradient
    norms are drawn."""
    import cvarch

    overrides = ("experiment=init_study", "init=kaiming", "model.act_layer=relu", "logger=none")
    metrics = cvarch.train(compose_tmp(*overrides))
    record = json.loads((Path(metrics["output_dir"]) / "activation_stats.json").read_text())[0]
    assert len(record["layers"]) == 10
    for layer in record["layers"]:
        assert sum(layer["hist"]) / (1000 * 500) == 1.0  # 1000 samples × 500 units, every value counted
        assert layer["outside"] == 0.0 and layer["type"] == "ReLU"
        assert layer["range"] == record["layers"][0]["range"]  # one range for all layers
    low, high = record["layers"][0]["range"]
    assert low == 0.0 and high > 5.0  # ReLU's output: [0, max]; the old range stopped at 1
    fig, title, path = next(s for s in saved if s[2].name == "activation_stats.png")
    assert title.splitlines() == [
        "mlp on gaussian · experiment=init_study init=kaiming model.act_layer=relu",
        "init: kaiming · activation: ReLU · step 0",
    ]
    panels = {ax.get_title(): ax for ax in fig.axes}
    assert panels["layer std"].get_ylim()[0] == 0.0
    stds = [layer["std"] for layer in record["layers"]]
    assert panels["layer mean"].get_ylim() == pytest.approx((-1.1 * max(stds), 1.1 * max(stds)))
    norms = panels["weight gradient norm"].lines[0].get_ydata()
    assert list(norms) == record["grad_norms"] and len(norms) == 11  # 10 hidden layers + the classifier
    assert norms[0] == pytest.approx(0.714, abs=0.005)  # the README's He/ReLU layer-1 gradient norm
    assert matplotlib.image.imread(path).shape[0] > 0


def test_a_stated_histogram_range_records_and_shows_what_it_clips(tmp_path, saved):
    stats = ActivationStats(str(tmp_path), hist_range=[-1.0, 1.0], bins=4)
    values = torch.tensor([-2.0, -0.5, 0.0, 0.5, 3.0])
    layers = stats.layer_stats([("hidden.0.act", "Tanh", values), ("hidden.1.act", "Tanh", values / 4)])
    assert [layer["outside"] for layer in layers] == pytest.approx([0.4, 0.0])
    assert [sum(layer["hist"]) for layer in layers] == [3, 5]
    stats.records = [{"step": 0, "layers": layers, "grad_norms": [1e-7, 1e-2, 1.0]}]
    stats.init, stats.title = "normal (std 0.01)", "mlp on gaussian"
    stats.save()
    ((fig, title, _),) = saved
    assert title == "mlp on gaussian\ninit: normal (std 0.01) · activation: Tanh · step 0"
    assert "40% outside" in " ".join(ax.get_title() for ax in fig.axes)
    grads = next(ax for ax in fig.axes if ax.get_title() == "weight gradient norm")
    assert grads.get_yscale() == "log"  # seven orders of magnitude: vanishing gradients show
    with pytest.raises(ValueError, match="hist_range"):
        ActivationStats(str(tmp_path), hist_range=[1.0, -1.0])


def test_the_init_is_named_from_hydra_and_its_std(compose_tmp):
    from cvarch.callbacks import _init_name

    compose_tmp("experiment=init_study")  # Hydra's choices: init=normal
    module = SimpleNamespace(hparams={"init": {"_target_": "cvarch.init.Normal", "std": 0.01}})
    assert _init_name(module) == "normal (std 0.01)"


def test_augmentation_grid_is_enlarged_labelled_and_titled(tmp_path, saved):
    grid = AugmentationGrid(str(tmp_path), num_images=10, nrow=4)
    classes = ["cat", "dog", "fox"]
    trainer = SimpleNamespace(is_global_zero=True, datamodule=SimpleNamespace(classes=classes))
    module = SimpleNamespace(augment=SimpleNamespace(ops={"crop": None, "flip": None}), model=nn.Identity())
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)  # 8×8 digits: ×12 → 96-pixel tiles
    labels = torch.arange(16) % 3
    grid.on_train_batch_start(trainer, module, (images, labels), 0)
    ((fig, title, path),) = saved
    # 3 rows of 4 tiles of 96 + 2 pixels and the 2-pixel border, under the title's band: 18 pixels a line
    band = 18 * len(title.splitlines()) + 14
    assert matplotlib.image.imread(path).shape[:2] == (3 * 98 + 2 + band, 4 * 98 + 2)
    assert max(len(line) for line in title.splitlines()) <= 49  # wrapped to the grid's 394 pixels
    assert title.endswith("first training batch, augment: crop, flip")
    assert [t.get_text() for t in fig.axes[0].texts] == [classes[k] for k in labels[:10].tolist()]
    soft = torch.tensor([[0.3, 0.7, 0.0], [1.0, 0.0, 0.0]])  # mixup: the dominant class and its weight
    AugmentationGrid(str(tmp_path)).save(images[:2], soft, classes)
    assert [t.get_text() for t in saved[-1][0].axes[0].texts] == ["dog 70%", "cat 100%"]


def test_debug_augment_grid_saves_the_grid_after_one_step_and_nothing_else(compose_tmp):
    import cvarch

    metrics = cvarch.train(compose_tmp("debug=augment_grid", "augment=cifar"))
    out = Path(metrics["output_dir"])
    assert (out / "augment_grid.png").is_file()
    assert not (out / "checkpoints").exists() and not (out / "learning_curves.png").exists()
    assert not list(out.glob("wandb")) and metrics["best_ckpt"] is None
    assert matplotlib.image.imread(out / "augment_grid.png").shape[1] >= 8 * 64  # 8 images a row, ≥ 64 px


def test_model_summary_lists_the_models_layers_with_2x_count_macs_flops(monkeypatch):
    """ResNet-20 on 8×8 digits: the model's children, no metric modules, and FlopCounterMode's total, twice
    count_macs, with or without the module's example_input_array."""
    import cvarch
    from cvarch.cost import count_macs
    from cvarch.module import ClassificationModule

    model = cvarch.build_model("model=resnet20")
    macs = count_macs(model, torch.zeros(1, 1, 8, 8))
    assert macs > 0
    rows, flops = summarize_model(model, (1, 8, 8))
    assert flops == 2 * macs
    assert [row["name"] for row in rows] == [name for name, _ in model.named_children()]
    assert sum(row["flops"] for row in rows) == flops  # every FLOP is inside a listed layer
    assert sum(row["params"] for row in rows) == sum(p.numel() for p in model.parameters())

    printed = []
    monkeypatch.setattr(ModelSummary, "summarize", staticmethod(lambda *a, **kw: printed.append((a, kw))))
    module = ClassificationModule(model, num_classes=10, optimizer=torch.optim.SGD)
    digits = SimpleNamespace(is_global_zero=True, datamodule=SimpleNamespace(image_shape=(1, 8, 8)))
    ModelSummary(max_depth=1).on_fit_start(digits, module)  # the shape from the datamodule
    module.example_input_array = torch.zeros(1, 1, 8, 8)
    ModelSummary(max_depth=1).on_fit_start(SimpleNamespace(is_global_zero=True), module)  # from the module
    for (data, total, trainable, _size, modes), kwargs in printed:
        columns = dict(data)
        assert kwargs["total_flops"] == 2 * macs
        assert columns["Name"] == [row["name"] for row in rows] and "train_acc" not in columns["Name"]
        assert total == trainable == sum(p.numel() for p in model.parameters())
        assert columns["Out sizes"][-1] == "10" and columns["Out sizes"][0] == "16×8×8"  # conv1
        assert sum(modes.values()) == len(list(model.modules())) - 1
    assert len(printed) == 2


def test_run_eta_is_steps_left_at_the_measured_pace():
    assert run_eta(10.0, 5, 20) == 40.0  # 2 s a step, 20 steps to go
    assert run_eta(10.0, 5, 0) == 0.0
    assert run_eta(10.0, 0, 20) is None  # no step measured yet
    assert run_eta(10.0, 5, float("inf")) is None  # no limit on the run


def test_progress_bar_shows_the_runs_eta(tmp_path):
    bar = ProgressBar()
    shown = []

    class Peek(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            shown.append(bar.get_metrics(trainer, pl_module)["run ETA"])

    trainer = pl.Trainer(
        max_steps=3, callbacks=[bar, Peek()], logger=False, enable_checkpointing=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(_Regression())
    assert len(shown) == 3 and shown[-1] == "0:00:00"  # the last step: nothing left
    assert all(eta.count(":") == 2 for eta in shown)  # h:mm:ss


def test_callbacks_early_stopping_stops_a_run_whose_optimized_metric_stalls(compose_tmp):
    """callbacks=early_stopping watches optimized_metric: at lr 1e-12 val/acc never improves, so a 6-epoch run
    with patience 1 stops after its second validation."""
    from pytorch_lightning.callbacks import EarlyStopping

    from cvarch.build import build_trainer

    tiny = ("model=mlp", "model.depth=1", "model.width=16", "data.train_per_class=3", "logger=none")
    cfg = compose_tmp(*tiny, "callbacks=early_stopping", "callbacks.early_stopping.patience=1",
                      "trainer.max_epochs=6", "optimizer.lr=1e-12", "scheduler=none")  # fmt: skip
    (stopper,) = [c for c in build_trainer(cfg, start=False).callbacks if isinstance(c, EarlyStopping)]
    assert stopper.monitor == "val/acc" and stopper.mode == "max"
    assert compose_tmp(
        "callbacks=early_stopping", "optimized_metric=val/acc_top5"
    ).callbacks.early_stopping.monitor == ("val/acc_top5")
    assert cvarch.train(cfg)["epochs"] == 2
