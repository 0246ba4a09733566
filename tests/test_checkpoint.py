"""cvarch/checkpoint.py: exact resume after a real SIGKILL, atomic checkpoint writes, weights_only loads, the
global RNG state, and what ``resume`` / ``ckpt_path=last`` resolve to."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

import cvarch
from cvarch.checkpoint import AtomicCheckpointIO, load_checkpoint_file, resume_path, rng_state, set_rng_state
from cvarch.config import ConfigError
from tests.conftest import DEVICES, ROOT, malicious_checkpoint, report, tmp_overrides


class LossTrace(pl.Callback):
    """Appends ``<global step> <loss>`` per training step to ``path``, flushed at once for SIGKILL."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step} {float(outputs['loss']).hex()}\n")


class KillAt(pl.Callback):
    """SIGKILLs its own process after optimizer step ``step``: no handler, no cleanup, as the OOM killer."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def train_process(*overrides: str) -> subprocess.CompletedProcess:
    """``cvarch-train`` in a child process started in the repository, so this file's callbacks import."""
    return subprocess.run(
        [sys.executable, "-m", "cvarch.train", *overrides],
        cwd=ROOT,
        env={**os.environ, "HYDRA_FULL_ERROR": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )


def trace(path: Path) -> list[tuple[int, str]]:
    return [(int(s), loss) for s, loss in (line.split() for line in path.read_text().splitlines())]


@pytest.mark.slow
def test_a_run_killed_mid_epoch_and_resumed_ends_bit_identical_to_a_run_never_stopped(tmp_path):
    # dropout and stochastic depth (global RNG), crop + flip (augment generator), SGD momentum and the plateau
    # scheduler (patience 0: it steps), shuffled data: every state a resume must carry
    common = (*tmp_overrides(tmp_path), "logger=none", "data.train_per_class=40", "trainer.max_epochs=4",
              "model.dropout=0.2", "model.drop_path=0.2", "augment=cifar", "scheduler.patience=0",
              "trainer.deterministic=true", "seed=3")  # fmt: skip
    steps_per_epoch = 7  # 400 training images, batch 64
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    trace_of = {run: f"+callbacks.trace={{_target_: tests.test_checkpoint.LossTrace, path: {run}/trace.txt}}"
                for run in (straight, killed)}.get  # fmt: skip
    proc = train_process(*common, f"hydra.run.dir={straight}", trace_of(straight))
    assert proc.returncode == 0, proc.stderr[-3000:]
    kill_step = 2 * steps_per_epoch + 3  # in the third epoch, after 2 epochs were checkpointed
    proc = train_process(
        *common,
        f"hydra.run.dir={killed}",
        trace_of(killed),
        f"+callbacks.kill={{_target_: tests.test_checkpoint.KillAt, step: {kill_step}}}",
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not (killed / "metrics.json").exists()
    before_kill = trace(killed / "trace.txt")
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    proc = train_process(*common, f"hydra.run.dir={killed}", trace_of(killed), "resume=true")
    assert proc.returncode == 0, proc.stderr[-3000:]

    full = trace(straight / "trace.txt")
    assert [s for s, _ in full] == list(range(1, 4 * steps_per_epoch + 1))
    assert before_kill == full[:kill_step]  # the killed run: the same losses up to the kill
    resumed = trace(killed / "trace.txt")[kill_step:]
    assert (
        resumed == full[2 * steps_per_epoch :]
    )  # the lost third epoch redone and the fourth: the same losses
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3 and a["global_step"] == b["global_step"] == 4 * steps_per_epoch
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert {"preprocess.mean", "preprocess.std"} <= a["state_dict"].keys()  # the fitted statistics travel too
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    momentum_a, momentum_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert momentum_a.keys() == momentum_b.keys()
    for key, state in momentum_a.items():
        assert torch.equal(state["momentum_buffer"], momentum_b[key]["momentum_buffer"])
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert torch.equal(a["augment_rng_state"], b["augment_rng_state"])
    assert torch.equal(a["rng_state"]["torch"], b["rng_state"]["torch"])
    report(
        f"exact resume: SIGKILL at step {kill_step} of {4 * steps_per_epoch}, "
        "resumed from epoch 2's last.ckpt:"
        f" {len(full)} per-step losses and {len(a['state_dict'])} state tensors bit-identical"
    )


def test_without_the_global_rng_state_dropout_would_not_continue(compose_tmp):
    """What the checkpoint's ``rng_state`` is for: the dropout masks of the next step come from it."""
    torch.manual_seed(0)
    saved = rng_state()
    first = torch.nn.functional.dropout(torch.ones(64), 0.5)
    torch.rand(10)  # the process goes on drawing; a fresh process would start elsewhere
    set_rng_state(saved)
    assert torch.equal(torch.nn.functional.dropout(torch.ones(64), 0.5), first)


def test_rng_state_loads_with_weights_only_and_restores_every_generator(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    np.random.standard_normal()  # leaves a cached Gaussian in NumPy's state
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    assert expected[:3] == again[:3] and torch.equal(expected[3], again[3])


KILL_MID_WRITE = textwrap.dedent(
    """
    import io, os, signal, sys, torch
    from cvarch.checkpoint import AtomicCheckpointIO
    path = sys.argv[1]
    AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(1000)}, path)  # the previous checkpoint
    real_save = torch.save
    def dying_save(obj, f, *args, **kwargs):  # half the bytes reach the file, then the process is killed
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = dying_save
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(1000)}, path)
    """
)


@pytest.mark.slow  # a child process killed mid-write: ~12 s
def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "run" / "last.ckpt"
    proc = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, str(path)], cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(1000))  # the old one, whole
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(1000)}, path)  # the next save works and tidies up
    assert torch.equal(load_checkpoint_file(path)["w"], torch.ones(1000))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_the_default_trainer_writes_checkpoints_through_the_atomic_io(compose_tmp):
    trainer = cvarch.build.build_trainer(compose_tmp("logger=none"), start=False)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_checkpoint_io_loads_refuse_pickled_code(tmp_path):
    path, marker = malicious_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="weights_only=True"):
        AtomicCheckpointIO().load_checkpoint(path)
    assert not marker.exists()


def _damaged_copy(one_epoch_run, tmp_path: Path, damage) -> tuple[Path, tuple[str, ...], Any]:
    """A copy of the finished one-epoch run whose ``last.ckpt`` ``damage(path)`` alters, its metrics.json
    removed (a killed run); the overrides that compose it; and what ``damage`` returned."""
    tmp, finished, _ = one_epoch_run
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    (run / "metrics.json").unlink()
    damaged = damage(run / "checkpoints" / "last.ckpt")
    return run, (*tmp_overrides(tmp), f"hydra.run.dir={run}", "logger=none", "trainer.max_epochs=2",
                 "data.train_per_class=10"), damaged  # fmt: skip


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda p: p.write_bytes(b""), r"is empty \(0 bytes\): not a checkpoint"),
        (_truncate, "is truncated or corrupt"),
    ],
    ids=["empty", "truncated"],
)
def test_resume_on_a_broken_last_checkpoint_names_it_and_the_intact_best_beside_it(
    one_epoch_run, tmp_path, damage, problem
):
    run, overrides, _ = _damaged_copy(one_epoch_run, tmp_path, damage)
    (best,) = [p for p in (run / "checkpoints").glob("epoch*.ckpt")]
    with pytest.raises(ValueError) as err:
        cvarch.train(cvarch.compose(*overrides, "resume=true"))
    message = str(err.value)
    assert re.search(rf"resume=True: {run}/checkpoints/last.ckpt {problem}", message), message
    assert f"intact checkpoints beside it: {best.name} (continue from one with ckpt_path={best})" in message
    assert "\n" not in message and "weights_only" not in message  # one line, not a pickling accusation


def test_a_fresh_run_in_a_killed_runs_folder_is_refused_and_overwrites_nothing(one_epoch_run, tmp_path):
    run, overrides, _ = _damaged_copy(one_epoch_run, tmp_path, lambda path: None)
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").glob("*.ckpt")}
    with pytest.raises(FileExistsError) as err:
        cvarch.train(cvarch.compose(*overrides))
    assert str(err.value).startswith(
        f"hydra.run.dir: {run} holds the checkpoints of a run that did not finish"
    )
    assert "Pass resume=true to continue it" in str(err.value) and "or another hydra.run.dir" in str(
        err.value
    )
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").glob("*.ckpt")} == before


def test_a_resumed_run_removes_the_best_checkpoint_its_killed_invocation_left_behind(one_epoch_run, tmp_path):
    def orphan(last: Path) -> Path:  # killed after epoch 1's new best was written, before its last.ckpt
        (best,) = last.parent.glob("epoch000-*.ckpt")
        return Path(shutil.copy(best, last.parent / "epoch001-acc0.9999.ckpt"))

    run, overrides, left = _damaged_copy(one_epoch_run, tmp_path, orphan)
    metrics = cvarch.train(cvarch.compose(*overrides, "resume=true"))
    kept = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert not left.exists() and kept == sorted({"last.ckpt", Path(metrics["best_ckpt"]).name})


def _poison(path: Path) -> str:
    """Sets one weight of the model in ``path`` to NaN; returns the tensor's name."""
    ckpt = torch.load(path, weights_only=True)
    name = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point() and k.startswith("model."))
    ckpt["state_dict"][name].view(-1)[0] = float("nan")
    torch.save(ckpt, path)
    return name


def test_non_finite_weights_are_refused_on_every_load_naming_the_tensor(one_epoch_run, tmp_path):
    from cvarch.eval import evaluate

    run, overrides, name = _damaged_copy(one_epoch_run, tmp_path, _poison)
    last = run / "checkpoints" / "last.ckpt"
    for load, key in (
        (lambda: evaluate(cvarch.compose(*tmp_overrides(tmp_path), f"ckpt_path={last}", config_name="eval")),
         "ckpt_path"),  # cvarch-eval
        (lambda: cvarch.train(cvarch.compose(*overrides, "resume=true")), "resume=True"),
        (lambda: cvarch.train(cvarch.compose(*tmp_overrides(tmp_path), "logger=none", "transfer=finetune_all",
                                             f"transfer.source={last}")), "transfer.source"),
    ):  # fmt: skip
        with pytest.raises(ValueError) as err:
            load()
        expected = f"{key}: {last} holds non-finite weights: {name} has 1 NaN or infinite values of "
        assert str(err.value).startswith(expected), str(err.value)


class ScalerProbe(pl.Callback):
    """Records the AMP GradScaler's state at the start of each training epoch (after Lightning's restore)."""

    seen: list = []

    def on_train_epoch_start(self, trainer, pl_module):
        ScalerProbe.seen.append(dict(trainer.precision_plugin.scaler.state_dict()))


AMP = {  # 16-bit mixed precision with a loss scaler: on CUDA Lightning's own; on the CPU (where Lightning has
    # none) torch's CPU GradScaler given to Lightning's MixedPrecision plugin, which checkpoints it alike
    "cpu": [
        "~trainer.precision",
        "trainer.plugins=[{_target_: cvarch.checkpoint.AtomicCheckpointIO}, "
        "{_target_: pytorch_lightning.plugins.precision.MixedPrecision, precision: 16-mixed, device: cpu, "
        "scaler: {_target_: torch.amp.GradScaler, device: cpu}}]",
    ],
    "cuda": ["trainer=gpu", "trainer.precision=16-mixed"],
}


@pytest.mark.slow  # two runs of 2 and 3 epochs
@pytest.mark.parametrize("device", DEVICES)
def test_the_amp_grad_scaler_state_is_checkpointed_and_restored(compose_tmp, device):
    common = (*AMP[device], "logger=none", "data.train_per_class=10",
              "+callbacks.probe={_target_: tests.test_checkpoint.ScalerProbe}")  # fmt: skip
    first = cvarch.train(compose_tmp(*common, "trainer.max_epochs=2"))
    last = Path(first["output_dir"]) / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)["MixedPrecision"]
    assert saved["scale"] != 2.0**16 or saved["_growth_tracker"] > 0  # it moved from its initial state
    ScalerProbe.seen = []
    cvarch.train(compose_tmp(*common, "trainer.max_epochs=3", f"ckpt_path={last}"))
    assert ScalerProbe.seen[0] == saved


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    """A finished one-epoch run on digits, in a known run directory."""
    tmp = tmp_path_factory.mktemp("one_epoch")
    run = tmp / "run"
    cfg = cvarch.compose(*tmp_overrides(tmp), f"hydra.run.dir={run}", "logger=none",
                         "trainer.max_epochs=1", "data.train_per_class=10")  # fmt: skip
    metrics = cvarch.train(cfg)
    return tmp, run, metrics


@pytest.mark.slow  # a second epoch of training
def test_resume_true_continues_the_run_directory_from_its_last_checkpoint(one_epoch_run, tmp_path):
    tmp, finished, _ = one_epoch_run
    run = Path(
        shutil.copytree(finished, tmp_path / "run")
    )  # the shared run stays finished for the other tests
    cfg = cvarch.compose(*tmp_overrides(tmp), f"hydra.run.dir={run}", "logger=none",
                         "trainer.max_epochs=2", "data.train_per_class=10", "resume=true")  # fmt: skip
    assert resume_path(cfg) == str(run / "checkpoints" / "last.ckpt")
    last = cvarch.compose(*tmp_overrides(tmp), f"hydra.run.dir={run}", "ckpt_path=last")
    assert resume_path(last) == str(run / "checkpoints" / "last.ckpt")  # the same file, Lightning's spelling
    before = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["wall_s_total"]
    metrics = cvarch.train(cfg)
    assert metrics["epochs"] == 2 and metrics["resumed_from"] == str(run / "checkpoints" / "last.ckpt")
    # this invocation's time, and the whole run's: the first invocation's (to its last checkpoint) added
    assert 0 < before and metrics["wall_s_total"] == pytest.approx(before + metrics["wall_s"], abs=0.02)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("asked", ["resume=true", "ckpt_path=last"])
def test_a_resume_that_finds_no_checkpoint_is_an_error_not_a_fresh_start(compose_tmp, tmp_path, asked):
    cfg = compose_tmp(f"hydra.run.dir={tmp_path / 'fresh'}", "logger=none", asked)
    with pytest.raises(FileNotFoundError, match=rf"{asked}: no checkpoint at .*fresh/checkpoints/last.ckpt.*"
                       r"hydra.run.dir=<run dir>"):  # fmt: skip
        cvarch.train(cfg)
    assert not (tmp_path / "fresh" / "checkpoints").exists()


def test_the_error_names_the_newest_run_that_has_a_checkpoint(one_epoch_run, tmp_path):
    tmp, run, _ = one_epoch_run
    newer = tmp / "logs" / "train" / "runs" / "2026-01-01_00-00-00"
    (newer / "checkpoints").mkdir(parents=True, exist_ok=True)
    (newer / "checkpoints" / "last.ckpt").write_bytes((run / "checkpoints" / "last.ckpt").read_bytes())
    cfg = cvarch.compose(*tmp_overrides(tmp), f"hydra.run.dir={tmp_path / 'fresh'}", "resume=true")
    with pytest.raises(FileNotFoundError, match=f"the newest run of task train with one: {newer}"):
        resume_path(cfg)


def test_resume_auto_starts_fresh_without_a_checkpoint_and_resumes_with_one(one_epoch_run, tmp_path):
    tmp, run, _ = one_epoch_run
    fresh = cvarch.compose(*tmp_overrides(tmp), f"hydra.run.dir={tmp_path / 'fresh'}", "resume=auto")
    assert resume_path(fresh) is None
    again = cvarch.compose(*tmp_overrides(tmp), f"hydra.run.dir={run}", "resume=auto")
    assert resume_path(again) == str(run / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["resume=maybe"], "resume: expected one of false, true, auto; got 'maybe'"),
        (["resume=1"], "resume: expected one of false, true, auto; got 1"),
        (["resume=true", "ckpt_path=x.ckpt"], "resume=True and ckpt_path=x.ckpt both given"),
    ],
)
def test_bad_resume_values_are_named(compose_tmp, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        resume_path(compose_tmp(*overrides))


def test_a_finished_run_resumed_again_is_skipped_not_retrained(one_epoch_run):
    tmp, run, first = one_epoch_run
    cfg = cvarch.compose(*tmp_overrides(tmp), f"hydra.run.dir={run}", "logger=none",
                         "trainer.max_epochs=1", "data.train_per_class=10", "resume=auto")  # fmt: skip
    assert cvarch.train(cfg)["wall_s"] == first["wall_s"]  # metrics.json of the finished run, read back


def test_a_checkpoint_trained_for_other_classes_is_refused_before_training(
    one_epoch_run, compose_tmp, tmp_path
):
    _, run, _ = one_epoch_run
    last = run / "checkpoints" / "last.ckpt"
    cfg = compose_tmp(f"ckpt_path={last}", "data=fake", "data.num_classes=4", "data.image_size=8",
                      "data.channels=1", "logger=none")  # fmt: skip
    with pytest.raises(ValueError, match=r"was trained for 10 classes but this run's data has 4 "
                       r"\(data.num_classes\).*transfer.source="):  # fmt: skip
        cvarch.train(cfg)
    assert not list((tmp_path / "logs").rglob("*.ckpt"))


def test_a_checkpoint_of_another_architecture_names_the_layers(one_epoch_run, compose_tmp):
    _, run, _ = one_epoch_run
    cfg = compose_tmp(f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "model=resnet32", "logger=none")
    with pytest.raises(
        ValueError,
        match=r"does not fit this run's model \(\d+ layers differ: "
        r"model.layer1.3.conv1 missing from the checkpoint; model.layer1.3.bn1 missing",
    ):
        cvarch.train(cfg)
