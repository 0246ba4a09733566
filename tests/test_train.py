"""cvarch-train end to end: the default run's accuracy, run directory, W&B offline logs, sweeps, resume."""

from __future__ import annotations

import copy
import gc
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

import cvarch
from tests import wandb_log
from tests.conftest import BIN, ROOT, malicious_checkpoint, report, run_cli, run_main, tmp_overrides

METRICS = {
    "train/loss",
    "val/acc",
    "val/acc_top5",
    "test/acc",
    "test/acc_top5",
    "test/acc_tta",
    "test/acc_tta_top5",
    "epochs",
    "wall_s",
    "wall_s_total",
    "params",
    "gmacs",
}
# a one-layer MLP on 30 digits, one epoch, one val and test batch: for tests of what a run does, not how well
TINY = ("model=mlp", "model.depth=1", "model.width=16", "trainer.max_epochs=1", "data.train_per_class=3",
        "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1")  # fmt: skip


def test_fast_dev_run_of_the_default_config(compose_tmp):
    metrics = cvarch.train(compose_tmp("debug=fdr", "logger=none"))
    assert METRICS <= set(metrics)
    assert 0.0 <= metrics["test/acc"] <= 1.0 and metrics["params"] == 269_434
    # ResNet-20 at 8×8: 1/16 of its 40.6M MACs at 32×32, less the 2 input channels the digits lack
    assert metrics["gmacs"] == pytest.approx(0.0406 / 16, rel=0.02)
    assert json.loads((Path(metrics["output_dir"]) / "metrics.json").read_text())["params"] == 269_434


@pytest.mark.slow
def test_default_make_train_run_reaches_95_percent_on_digits(default_run):
    out = default_run["output_dir"]
    assert default_run["proc"].stdout.strip().splitlines()[-1] == str(out)  # last line: the run directory
    metrics = json.loads((out / "metrics.json").read_text())
    report(
        f"make train (default config, digits, resnet20, {metrics['epochs']} epochs) "
        f"on {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}): test/acc={metrics['test/acc']:.4f}, "
        f"val/acc={metrics['val/acc']:.4f}, wall {metrics['wall_s']:.1f} s"
    )
    assert METRICS <= set(metrics)
    assert metrics["test/acc"] >= 0.95
    assert metrics["epochs"] == 20
    for name in ("config.yaml", "learning_curves.png", "history.json"):
        assert (out / name).is_file(), name
    assert (out / "checkpoints" / "last.ckpt").is_file()
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 20 and {"train/loss", "val/acc"} <= set(history[-1])
    # last.ckpt is the last epoch, the best checkpoint is the epoch of the highest val/acc
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 19
    best_epoch = max(range(20), key=lambda e: (history[e]["val/acc"], -e))
    assert torch.load(metrics["best_ckpt"], weights_only=True)["epoch"] == best_epoch
    assert metrics["val/acc"] == pytest.approx(history[best_epoch]["val/acc"], abs=1e-6)


@pytest.mark.slow
def test_checkpoints_load_with_weights_only(default_run):
    for path in (default_run["output_dir"] / "checkpoints").glob("*.ckpt"):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert ckpt["hyper_parameters"]["model"]["_target_"] == "cvarch.models.resnet.ResNet"
        assert "preprocess.mean" in ckpt["state_dict"]  # the fitted preprocessing travels with the weights


@pytest.mark.slow
def test_wandb_offline_run_holds_the_logged_metrics(default_run):
    runs = list((default_run["output_dir"] / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    log = next(runs[0].glob("run-*.wandb"))
    rows = wandb_log.history(log)
    metrics = json.loads((default_run["output_dir"] / "metrics.json").read_text())
    val_rows = [r for r in rows if "val/acc" in r]
    assert len(val_rows) >= 20  # one per epoch (+ the best checkpoint's re-validation)
    test_rows = [r for r in rows if "test/acc" in r]
    assert test_rows[-1]["test/acc"] == pytest.approx(metrics["test/acc"])
    # the LR monitor names each parameter group (cvarch.optimizer.param_groups): one group, decayed, lr ×1
    assert any("lr-SGD/decay_x1" in r for r in rows)
    summary = wandb_log.summary(log)
    assert summary["params"] == 269_434 and summary["gmacs"] == pytest.approx(metrics["gmacs"])
    config = wandb_log.config(log)
    assert config["optimizer"]["lr"] == 0.01 and config["model"]["layers"] == [3, 3, 3]
    assert config["choices"]["model"] == "resnet20" and config["choices"]["norm"] == "batchnorm"
    staged = default_run["output_dir"] / "wandb" / "artifacts" / "staging"  # the test table's files
    assert staged.is_dir() and any(staged.iterdir())


@pytest.mark.slow
def test_multirun_jobs_are_separate_wandb_runs(tmp_path):
    proc = run_main(
        "cvarch-train",
        "-m",
        "seed=0,1",
        *TINY,
        f"paths.log_dir={tmp_path}",
        f"paths.cache_dir={tmp_path}/cache",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.parent for p in tmp_path.rglob("multiruns/*/*/metrics.json"))
    assert [j.name for j in jobs] == ["0", "1"]
    ids, groups = set(), set()
    for seed, job in enumerate(jobs):
        assert f"seed: {seed}" in (job / "config.yaml").read_text()
        runs = list((job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1
        ids.add(runs[0].name.rsplit("-", 1)[-1])
        log = next(runs[0].glob("run-*.wandb"))
        assert wandb_log.history(log)  # each run has its own logged metrics
        run = wandb_log.run(log)  # named by the swept overrides, grouped by the sweep, seed not a tag
        assert run["name"] == f"seed={seed}" and run["tags"] == ["dev"]
        groups.add(run["group"])
    assert len(ids) == 2
    assert groups == {f"train/{jobs[0].parent.name}"}  # one group: the multirun's task and start time


@pytest.mark.slow
def test_resume_from_last_checkpoint_continues_the_run(default_run, compose_tmp):
    last = default_run["output_dir"] / "checkpoints" / "last.ckpt"
    metrics = cvarch.train(compose_tmp(f"ckpt_path={last}", "trainer.max_epochs=22", "logger=none"))
    assert metrics["epochs"] == 22
    history = json.loads((Path(metrics["output_dir"]) / "history.json").read_text())
    before = json.loads((default_run["output_dir"] / "history.json").read_text())
    assert (
        len(history) == 22 and history[:20] == before
    )  # the curves continue from the checkpoint's 20 epochs


@pytest.mark.slow
def test_debug_overfit_drives_training_accuracy_to_one(compose_tmp):
    metrics = cvarch.train(compose_tmp("debug=overfit", "trainer.max_epochs=30", "logger=none"))
    history = json.loads((Path(metrics["output_dir"]) / "history.json").read_text())
    assert history[-1]["train/acc"] == 1.0


def test_bad_data_root_fails_before_any_training(compose_tmp, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        cvarch.train(compose_tmp("data=imagefolder", f"data.root={tmp_path / 'missing'}", "logger=none"))
    assert not list(tmp_path.rglob("*.ckpt"))


class StateProbe(pl.Callback):
    """Records the optimizer, scheduler and augment RNG state a run ends with, and starts training with."""

    seen: dict = {}

    def on_train_epoch_start(self, trainer, pl_module):
        if "start" not in StateProbe.seen:  # after Lightning's restore and cvarch's on_train_start
            StateProbe.seen["start"] = self._state(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        StateProbe.seen["end"] = self._state(trainer, pl_module)

    @staticmethod
    def _state(trainer, pl_module):
        return copy.deepcopy(  # state_dict() holds the live tensors, which training then changes in place
            {
                "optimizer": trainer.optimizers[0].state_dict(),
                "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
                "augment": pl_module.augment.rng_state(),
            }
        )


@pytest.mark.slow
def test_resume_restores_optimizer_scheduler_and_augmentation_state(compose_tmp):
    common = (
        "augment=cifar",
        "scheduler.patience=0",
        "logger=none",
        "data.batch_size=256",
        "data.train_per_class=50",
    )
    probe = "+callbacks.probe={_target_: tests.test_train.StateProbe}"
    StateProbe.seen = {}
    first = cvarch.train(compose_tmp(*common, "trainer.max_epochs=3", probe))
    ended = StateProbe.seen["end"]
    last = Path(first["output_dir"]) / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    StateProbe.seen = {}
    resumed = cvarch.train(compose_tmp(*common, "trainer.max_epochs=4", f"ckpt_path={last}", probe))
    assert resumed["epochs"] == 4
    started = StateProbe.seen["start"]
    # plateau: the resumed run starts where the first ended, the step of the checkpoint's last epoch included
    # (Lightning writes the checkpoint before that step: cvarch replays it)
    assert started["scheduler"] == ended["scheduler"] and started["scheduler"]["last_epoch"] == 3
    momentum = ckpt["optimizer_states"][0]["state"]
    assert momentum and started["optimizer"]["state"].keys() == momentum.keys()
    for key, state in momentum.items():  # the SGD momentum buffers continue
        assert torch.equal(started["optimizer"]["state"][key]["momentum_buffer"], state["momentum_buffer"])
    # the learning rates where the first run ended: the checkpoint's, or one plateau step below them when the
    # last epoch did not improve val/acc (the step Lightning takes after saving, replayed)
    assert started["optimizer"]["param_groups"] == ended["optimizer"]["param_groups"]
    assert torch.equal(started["augment"], ended["augment"])  # the augmentation stream continues
    assert torch.equal(ckpt["augment_rng_state"], ended["augment"])


def test_job_threads_share_the_cores_among_parallel_jobs(monkeypatch):
    from hydra.core.hydra_config import HydraConfig

    from cvarch.train import job_threads

    assert job_threads(cvarch.compose("threads=3")) == 3  # explicit
    cfg = cvarch.compose()
    assert job_threads(cfg) is None  # the basic launcher runs one job at a time: torch's default
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    for n_jobs, threads in ((4, 4), (-1, 1), (32, 1)):  # hydra/launcher=joblib hydra.launcher.n_jobs=…
        monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda n=n_jobs: _Launcher(n)))
        assert job_threads(cfg) == threads, n_jobs


class _Launcher:
    def __init__(self, n_jobs: int) -> None:
        self.launcher = {"n_jobs": n_jobs}


def _losses_per_step(run_dir: Path) -> list[float]:
    """``train/loss_step`` of every step, from the run's one W&B offline log."""
    (run,) = (run_dir / "wandb").glob("offline-run-*")
    rows = wandb_log.history(next(run.glob("run-*.wandb")))
    return [r["train/loss_step"] for r in rows if "train/loss_step" in r]


@pytest.fixture(scope="module")
def ddp_pair(tmp_path_factory):
    """The same digits run on one process and on 2 DDP processes (gloo): global batch 64 both times; GroupNorm
    (batch-independent, as torch's SyncBatchNorm is GPU-only) and 1,000 training images (even shards, no
    padding), so both runs see the same global batches."""
    tmp = tmp_path_factory.mktemp("ddp")
    common = (
        "norm=groupnorm",
        "data.train_per_class=100",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=1",
        f"paths.cache_dir={tmp}/cache",
    )
    runs = {}
    for trainer, run in (("cpu", run_main), ("ddp_cpu", run_cli)):  # Lightning's ddp re-runs the command line
        log_dir = tmp / trainer
        proc = run("cvarch-train", f"trainer={trainer}", f"paths.log_dir={log_dir}", *common)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[trainer] = {"log_dir": log_dir, "output_dir": Path(proc.stdout.strip().splitlines()[-1])}
    return runs


@pytest.mark.slow
def test_a_ddp_cpu_run_is_one_run_directory_one_metrics_file_one_wandb_run(ddp_pair):
    run = ddp_pair["ddp_cpu"]
    assert [p.parent for p in run["log_dir"].rglob("metrics.json")] == [run["output_dir"]]
    assert list(run["log_dir"].glob("*/runs/*")) == [run["output_dir"]]  # rank 1 made no directory
    assert len(list(run["log_dir"].rglob("offline-run-*"))) == 1  # nor a W&B run
    assert wandb_log.config(next(run["log_dir"].rglob("run-*.wandb")))["trainer"]["strategy"] == "ddp"
    config = (run["output_dir"] / "config.yaml").read_text()
    assert "strategy: ddp\n" in config and "devices: 2\n" in config
    checkpoints = list(run["output_dir"].glob("checkpoints/*.ckpt"))
    assert checkpoints and all(c.parent == run["output_dir"] / "checkpoints" for c in checkpoints)
    matrix = json.loads((run["output_dir"] / "confusion_matrix.json").read_text())["matrix"]
    single = json.loads((ddp_pair["cpu"]["output_dir"] / "confusion_matrix.json").read_text())["matrix"]
    assert sum(map(sum, matrix)) == sum(map(sum, single))  # both processes' test shards, summed


@pytest.mark.slow
def test_ddp_on_two_processes_matches_one_process_with_the_same_global_batch(ddp_pair):
    one, two = (_losses_per_step(ddp_pair[k]["output_dir"]) for k in ("cpu", "ddp_cpu"))
    assert len(one) == len(two) == 2 * 16  # sharded, not repeated: ⌈1000 / 64⌉ = 16 global steps an epoch
    assert two[0] == pytest.approx(one[0], abs=1e-5)  # the same 64 images, the same initial weights
    # averaged gradients = the global batch's gradient: the next steps agree too, until float rounding
    # (different conv blocking for 32 vs 64 images) grows chaotically, as it does in any two SGD runs
    assert two[1:3] == pytest.approx(one[1:3], abs=1e-4)
    m1, m2 = (
        json.loads((ddp_pair[k]["output_dir"] / "metrics.json").read_text()) for k in ("cpu", "ddp_cpu")
    )
    assert m2["train/loss"] == pytest.approx(m1["train/loss"], rel=0.05)
    assert abs(m2["val/acc"] - m1["val/acc"]) <= 0.03 and abs(m2["test/acc"] - m1["test/acc"]) <= 0.03
    report(
        f"DDP (2 CPU processes, gloo) vs 1 process, digits, 2 epochs: first-step loss {two[0]:.7f} vs "
        f"{one[0]:.7f}; val/acc {m2['val/acc']:.4f} vs {m1['val/acc']:.4f}"
    )


@pytest.mark.slow
def test_ddp_in_a_local_multirun_uses_ddp_spawn_and_keeps_jobs_apart(tmp_path):
    proc = run_cli(
        "cvarch-train",
        "-m",
        "seed=0,1",
        "trainer=ddp_cpu",
        "norm=groupnorm",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=2",
        "+trainer.limit_test_batches=2",
        f"paths.log_dir={tmp_path}",
        f"paths.cache_dir={tmp_path}/cache",
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "using ddp_spawn" in proc.stderr
    (sweep,) = tmp_path.glob("train/multiruns/*")
    jobs = sorted(p.parent for p in sweep.rglob("metrics.json"))
    assert [j.name for j in jobs] == ["0", "1"]  # no sweep started again inside a job
    assert sorted(p.name for p in tmp_path.glob("train/*")) == ["multiruns"]  # and no extra run directory
    for job in jobs:
        assert "strategy: ddp_spawn" in (job / "config.yaml").read_text()
        (run,) = job.glob("wandb/offline-run-*")
        # the spawned rank 0 logs the test tables into the job's own W&B run folder, not the working directory
        assert len(list(run.glob("files/media/table/test/*.table.json"))) == 2


@pytest.mark.slow
def test_sigterm_exits_143_keeping_last_ckpt_and_resume_continues_the_run(tmp_path):
    run = tmp_path / "run"
    args = ("logger=none", "trainer.max_epochs=3", f"hydra.run.dir={run}", *tmp_overrides(tmp_path))
    last = run / "checkpoints" / "last.ckpt"
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        proc = subprocess.Popen([str(BIN / "cvarch-train"), *args], cwd=ROOT, stdout=out, stderr=err)
        try:
            deadline = time.monotonic() + 300
            while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)  # epoch 0 ended and was checkpointed: training is under way
            proc.send_signal(signal.SIGTERM)  # what SLURM preemption and scancel send
            code = proc.wait(timeout=120)
        finally:
            proc.kill()
    stderr = (tmp_path / "err.txt").read_text()
    assert code == 143, stderr[-3000:]
    assert not (run / "metrics.json").exists()  # not a finished run: resume=auto continues it
    epoch = torch.load(last, weights_only=True)["epoch"]
    assert re.search(rf"SIGTERM: stopped at global step \d+ \(epoch \d\) of {run}; {last} \(end of epoch "
                     rf"{epoch}\) continues it with resume=true", stderr), stderr[-3000:]  # fmt: skip
    resumed = run_main("cvarch-train", *args, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and metrics["resumed_from"] == str(last)


@pytest.mark.slow
def test_a_second_run_in_a_locked_folder_is_refused_naming_the_first_and_a_dead_ones_lock_is_taken_over(
    tmp_path,
):
    run = tmp_path / "run"
    args = ("logger=none", "trainer.max_epochs=3", f"hydra.run.dir={run}", *tmp_overrides(tmp_path))
    with open(tmp_path / "first.txt", "w") as out:
        first = subprocess.Popen(
            [str(BIN / "cvarch-train"), *args, "seed=1"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and first.poll() is None:
                if f"PID {first.pid} on" in (
                    (run / ".lock").read_text() if (run / ".lock").is_file() else ""
                ):
                    break
                time.sleep(0.05)
            second = run_main("cvarch-train", *args, "seed=2")  # this process: the second in the folder
            assert second.returncode != 0
            busy = rf"hydra.run.dir: {run} is in use by another cvarch-train run \(PID {first.pid} on [^)]+\)"
            assert re.search(busy, second.stderr), second.stderr[-3000:]
        finally:
            first.kill()  # SIGKILL: the lock is left behind in the file, but no process holds it
            first.wait()
    assert "seed: 1" in (run / "config.yaml").read_text()  # the second run wrote nothing
    taken_over = run_main("cvarch-train", *args, "seed=1", "resume=auto")
    assert taken_over.returncode == 0, taken_over.stderr[-3000:]
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 3


def test_an_optimized_metric_that_is_never_written_is_refused_before_training(compose_tmp):
    from cvarch.config import ConfigError
    from cvarch.train import train

    with pytest.raises(ConfigError, match="optimized_metric='val/accuracy'"):
        train(compose_tmp("optimized_metric=val/accuracy"))


@pytest.mark.slow
def test_hparams_search_runs_optuna_trials_and_records_the_best(tmp_path):
    import yaml

    proc = run_main(
        "cvarch-train",
        "hparams_search=sgd",
        "hydra.sweeper.n_trials=3",
        *TINY,
        f"paths.log_dir={tmp_path}",
        f"paths.cache_dir={tmp_path}/cache",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (sweep,) = tmp_path.glob("train/multiruns/*")
    trials = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/metrics.json"))]
    overrides = [yaml.safe_load(p.read_text()) for p in sorted(sweep.glob("*/.hydra/overrides.yaml"))]
    assert len(trials) == len(overrides) == 3
    assert len({tuple(o[:3]) for o in overrides}) == 3  # three different draws of lr, weight decay, momentum
    assert all(o[0].startswith("optimizer.lr=") for o in overrides)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["name"] == "optuna"
    assert best["best_value"] == pytest.approx(max(t["val/acc"] for t in trials))
    assert set(best["best_params"]) == {"optimizer.lr", "optimizer.weight_decay", "optimizer.momentum"}


class _Hydra:  # the parts of HydraConfig.get() that check_launch reads
    def __init__(self, mode: str, hydra_overrides: tuple[str, ...] = ()) -> None:
        from hydra.types import RunMode

        self.mode = RunMode[mode]
        self.overrides = type("O", (), {"hydra": list(hydra_overrides)})()


@pytest.mark.parametrize(
    ("mode", "env", "hydra_overrides", "strategy", "warns"),
    [
        ("MULTIRUN", {}, (), "ddp_spawn", "using ddp_spawn"),  # Lightning would re-run the sweep per process
        ("RUN", {}, (), "ddp", None),  # a single run: Lightning's ddp launcher is right
        ("MULTIRUN", {"SLURM_NTASKS": "4"}, (), "ddp", None),  # submitit: SLURM started the processes
        ("RUN", {"TORCHELASTIC_RUN_ID": "x"}, (), "ddp", "hydra.run.dir"),  # torchrun, time-stamped dir
        ("RUN", {"TORCHELASTIC_RUN_ID": "x"}, ("hydra.run.dir=/runs/1",), "ddp", None),
    ],
)
def test_check_launch(monkeypatch, mode, env, hydra_overrides, strategy, warns):
    import warnings

    from hydra.core.hydra_config import HydraConfig

    from cvarch.train import check_launch

    for key in ("SLURM_NTASKS", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: _Hydra(mode, hydra_overrides)))
    cfg = cvarch.compose("trainer=ddp_cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_launch(cfg)
    assert cfg.trainer.strategy == strategy
    messages = [str(w.message) for w in caught if w.category is RuntimeWarning]
    assert (warns is None and not messages) or (warns and any(warns in m for m in messages)), messages


def test_resuming_from_a_checkpoint_whose_unpickling_would_run_code_is_refused(tmp_path, compose_tmp):
    path, marker = malicious_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"ckpt_path: .*evil.ckpt cannot be loaded with weights_only=True"):
        cvarch.train(compose_tmp(f"ckpt_path={path}"))
    assert not marker.exists()


@pytest.mark.slow
def test_rerunning_a_sweep_skips_the_jobs_that_finished(tmp_path):
    sweep = tmp_path / "sweep"
    args = ("cvarch-train", "-m", "seed=0,1", f"hydra.sweep.dir={sweep}", *TINY, "logger=none",
            f"paths.log_dir={tmp_path}/logs", f"paths.cache_dir={tmp_path}/cache")  # fmt: skip
    assert run_main(*args).returncode == 0
    finished = sweep / "0" / "metrics.json"
    stamp = finished.stat().st_mtime_ns
    (sweep / "1" / "metrics.json").unlink()  # job 1 "was killed" before it finished
    refused = run_main(*args)  # a fresh start would overwrite job 1's checkpoints
    assert refused.returncode != 0 and "Pass resume=true to continue it (resume=auto" in refused.stderr
    proc = run_main(*args, "resume=auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already holds a finished run of this config (metrics.json): skipped" in proc.stdout + proc.stderr
    assert finished.stat().st_mtime_ns == stamp  # job 0 not re-run
    assert json.loads((sweep / "1" / "metrics.json").read_text())["resumed_from"]  # job 1 continued


def test_debug_anomaly_turns_on_autograd_anomaly_detection(compose_tmp):
    from cvarch.build import build_trainer

    assert build_trainer(compose_tmp("logger=none"), start=False)._detect_anomaly is False
    cfg = compose_tmp("debug=anomaly", "logger=none")
    assert cfg.trainer.detect_anomaly is True and cfg.task_name == "debug"
    assert build_trainer(cfg, start=False)._detect_anomaly is True


def _finite_checkpoints(checkpoints: Path) -> dict[str, int]:
    """``{name: epoch}`` of a folder's checkpoints, each loaded with weights_only=True and checked finite."""
    epochs = {}
    for path in checkpoints.glob("*.ckpt"):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        for key, tensor in ckpt["state_dict"].items():
            if tensor.is_floating_point():
                assert torch.isfinite(tensor).all(), f"{path.name}: {key} is not finite"
        epochs[path.name] = ckpt["epoch"]
    return epochs


@pytest.mark.slow  # an epoch of the default run, then the divergence
def test_a_diverging_run_stops_at_the_step_and_keeps_the_previous_epoch_checkpoint(compose_tmp, tmp_path):
    from cvarch.callbacks import DivergenceError

    # lr 0.1 for epoch 0, then × 1e5 = 1e4: epoch 0 completes and is checkpointed, epoch 1 diverges
    cfg = compose_tmp(
        "logger=none", "optimizer.lr=0.1", "scheduler=step", "scheduler.step_size=1", "scheduler.gamma=1e5"
    )
    with pytest.raises(DivergenceError) as err:
        cvarch.train(cfg)
    message = str(err.value)
    step = int(re.search(r"loss is nan at global step (\d+) \(epoch 1\)", message).group(1))
    last = re.search(r"last finite loss (\S+) at global step (\d+)", message)
    assert 20 <= step < 40 and int(last.group(2)) == step - 1  # digits: 20 steps an epoch
    assert math.isfinite(float(last.group(1)))
    runs = list((tmp_path / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 1
    epochs = _finite_checkpoints(runs[0] / "checkpoints")
    assert epochs["last.ckpt"] == 0 and set(epochs.values()) == {0}  # best and last: the finite epoch 0


def test_lr_1e4_diverges_in_the_first_epoch_and_no_checkpoint_holds_nan(compose_tmp, tmp_path):
    from cvarch.callbacks import DivergenceError

    with pytest.raises(
        DivergenceError, match=r"loss is nan at global step \d+ \(epoch 0\); last finite loss"
    ):
        cvarch.train(compose_tmp("logger=none", "optimizer.lr=1e4"))
    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    assert (
        _finite_checkpoints(run / "checkpoints") == {}
    )  # no epoch ended: nothing was written, NaN least of all


@pytest.mark.slow
def test_cvarch_train_exits_non_zero_naming_the_divergence(tmp_path):
    proc = run_main("cvarch-train", *tmp_overrides(tmp_path), "logger=none", "optimizer.lr=1e4")
    assert proc.returncode != 0
    assert re.search(
        r"DivergenceError: training diverged: loss is nan at global step \d+ \(epoch 0\); "
        r"last finite loss \S+ at global step \d+",
        proc.stderr,
    ), proc.stderr[-3000:]


def _poison_at_epoch_end(self, trainer, pl_module, outputs, batch, batch_idx):
    """Sets one weight to NaN after the last optimizer step of epoch 1: a finite loss, then NaN weights."""
    if trainer.current_epoch == 1 and trainer.fit_loop.epoch_loop._num_ready_batches_reached():
        with torch.no_grad():
            next(pl_module.parameters()).view(-1)[0] = float("nan")


# ModelCheckpoint saves at train epoch end when validation runs once an epoch, else at validation end
# (0.5: last.ckpt is then the finite one from the middle of epoch 1)
@pytest.mark.slow  # two epochs of the default run each
@pytest.mark.parametrize(("val_check_interval", "last_epoch"), [("1.0", 0), ("0.5", 1)])
def test_non_finite_weights_after_a_finite_loss_are_never_checkpointed(
    val_check_interval, last_epoch, compose_tmp, tmp_path, monkeypatch
):
    from cvarch.callbacks import DivergenceError, LearningCurves

    # a default callback does the poisoning: the config refuses _target_s outside cvarch, torch and Lightning
    monkeypatch.setattr(LearningCurves, "on_train_batch_end", _poison_at_epoch_end, raising=False)
    with pytest.raises(
        DivergenceError, match=r"non-finite weights at global step 40 \(epoch 1\): model.conv1.weight"
    ):
        cvarch.train(
            compose_tmp(
                "logger=none", "trainer.max_epochs=3", f"trainer.val_check_interval={val_check_interval}"
            )
        )
    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    epochs = _finite_checkpoints(run / "checkpoints")
    # every checkpoint is finite (_finite_checkpoints): epoch 1's NaN weights were never saved
    assert epochs["last.ckpt"] == last_epoch


def _process_resources() -> tuple[float, int, int]:
    """(resident MiB, open file descriptors, threads) of this process, from /proc."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    rss = int(status["VmRSS"].split()[0]) / 1024
    return rss, len(os.listdir("/proc/self/fd")), int(status["Threads"])


# runs; runs before the baseline; allowed RSS growth: 1/3 MiB a run after the warm-up, as the 200-run soak of
# the first wave allowed (64 MiB over 190 runs); it measured no growth at all (1964 -> 1964 MiB)
SOAK_RUNS, SOAK_WARMUP = 60, 10
SOAK_RSS_MIB = (SOAK_RUNS - SOAK_WARMUP) / 3


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_soak_60_runs_in_one_process_leak_no_memory_files_or_threads(tmp_path):
    # the default callbacks (checkpoints, learning-curve PNG, confusion matrix, rich progress bar) and a CSV
    # logger: what holds files, figures and threads; a one-layer MLP keeps each run at a fraction of a second.
    # One compose, then each run gets its own seed and folder.
    base = cvarch.compose(*tmp_overrides(tmp_path), "logger=csv", "model=mlp", "model.depth=1",
                          "model.width=16", "trainer.max_epochs=1", "data.train_per_class=3",
                          "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1")  # fmt: skip
    seen = []
    for i in range(SOAK_RUNS):
        cfg = copy.deepcopy(base)
        cfg.seed, cfg.paths.output_dir = i, str(tmp_path / "runs" / str(i))
        metrics = cvarch.train(cfg)
        assert metrics["epochs"] == 1 and metrics["test/acc"] is not None
        shutil.rmtree(cfg.paths.output_dir)  # disk, not what is measured
        if (i + 1) % SOAK_WARMUP == 0:  # measured: what is still referenced, not garbage awaiting collection
            gc.collect()
        seen.append(_process_resources())
    (rss0, fds0, threads0), (rss1, fds1, threads1) = seen[SOAK_WARMUP - 1], seen[-1]
    peak = max(r for r, _, _ in seen[SOAK_WARMUP - 1 :])
    every_10 = ", ".join(f"{seen[i - 1][0]:.0f}" for i in range(SOAK_WARMUP, SOAK_RUNS + 1, 10))
    report(
        f"soak: {SOAK_RUNS} runs in one process: RSS {rss0:.0f} -> {rss1:.0f} MiB after run {SOAK_WARMUP} -> "
        f"{SOAK_RUNS} (every 10 runs: {every_10}; peak {peak:.0f}), open files {fds0} -> {fds1}, "
        f"threads {threads0} -> {threads1}"
    )
    assert fds1 <= fds0 and threads1 <= threads0
    assert rss1 - rss0 < SOAK_RSS_MIB, [round(r) for r, _, _ in seen[SOAK_WARMUP - 1 :: SOAK_WARMUP]]


@pytest.mark.slow
def test_a_joblib_multirun_of_20_jobs_at_2_parallel_gives_20_results_and_resumes_when_killed(tmp_path):
    sweep = tmp_path / "sweep"
    args = ("cvarch-train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=range(20)",
            f"hydra.sweep.dir={sweep}", "logger=none", *TINY, *tmp_overrides(tmp_path))  # fmt: skip
    proc = run_main(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {int(p.parent.name): json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}
    assert sorted(results) == list(range(20))
    assert all(
        m["epochs"] == 1 and 0 <= m["test/acc"] <= 1 and m["threads"] == max(1, (os.cpu_count() or 1) // 2)
        for m in results.values()
    )
    assert (
        len({(m["train/loss"], m["val/acc"]) for m in results.values()}) > 1
    )  # 20 seeds, not one run 20 times
    # three jobs "were killed" after their checkpoint: re-running with resume=auto skips the 17 finished jobs
    # and continues the 3 from their last.ckpt
    for job in (3, 11, 19):
        (sweep / str(job) / "metrics.json").unlink()
    proc = run_main(*args, "resume=auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = {int(p.parent.name): json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}
    assert sorted(again) == list(range(20))
    resumed = {job for job, m in again.items() if m.get("resumed_from")}
    assert resumed == {3, 11, 19}
    assert all(again[job] == results[job] for job in again.keys() - resumed)  # the finished ones untouched


def test_a_run_without_validation_tests_its_last_weights(compose_tmp):
    """data.val_fraction=0 (airbench's train-on-all): no val metrics, no best checkpoint to pick, the last
    weights are tested; the default callbacks' val/acc monitor only warns."""
    metrics = cvarch.train(
        compose_tmp("logger=none", "data.val_fraction=0", "trainer.max_epochs=2", "scheduler=none")
    )
    assert "val/acc" not in metrics and 0.0 <= metrics["test/acc"] <= 1.0
    assert metrics["best_ckpt"] is None or metrics["best_ckpt"].endswith("last.ckpt")


def _options(group: str) -> list[str]:
    from cvarch.config import CONFIG_DIR

    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


# one optimizer step and one validation batch: no test, checkpoints, plots or console output
ONE_STEP = (*(o.replace("+trainer", "++trainer") for o in TINY), "logger=none", "++trainer.max_steps=1",
            "test=false", "callbacks=default", "callbacks.model_checkpoint=null",
            "callbacks.last_checkpoint=null", "callbacks.learning_curves=null",
            "callbacks.test_predictions=null", "callbacks.progress_bar=null", "callbacks.model_summary=null",
            "++trainer.enable_progress_bar=false", "++trainer.enable_model_summary=false")  # fmt: skip


@pytest.mark.parametrize("debug", _options("debug"))
@pytest.mark.parametrize("scheduler", _options("scheduler"))
def test_every_debug_option_composes_with_every_scheduler_and_optimizer(debug, scheduler, compose_tmp):
    """debug=overfit set scheduler.patience, which only the plateau scheduler has: `debug=overfit
    scheduler=cosine` failed to build. Each debug option × scheduler × optimizer takes one optimizer step."""
    for optimizer in _options("optimizer"):
        cfg = compose_tmp(*ONE_STEP, f"debug={debug}", f"scheduler={scheduler}", f"optimizer={optimizer}")
        assert cfg.scheduler.get("_target_") == compose_tmp(f"scheduler={scheduler}").scheduler.get(
            "_target_"
        )
        metrics = cvarch.train(cfg)
        assert math.isfinite(metrics["train/loss"]), (debug, scheduler, optimizer)


def test_debug_overfit_keeps_the_learning_rate_fixed(compose_tmp):
    assert not compose_tmp("debug=overfit").scheduler  # scheduler=none: the plateau default is dropped


def test_train_false_tests_the_init_from_weights_and_test_false_only_fits(tiny_run, compose_tmp):
    best = next((tiny_run / "checkpoints").glob("epoch*.ckpt"))
    tiny = [o for o in TINY if "limit" not in o]
    fitted = json.loads((tiny_run / "metrics.json").read_text())
    tested = cvarch.train(compose_tmp(*tiny, "logger=none", "train=false", f"init_from={best}"))
    assert tested["epochs"] == 0 and tested["best_ckpt"] is None
    assert tested["test/acc"] == pytest.approx(fitted["test/acc"])  # the same weights, the same test split
    fit_only = cvarch.train(compose_tmp(*tiny, "logger=none", "test=false"))
    assert fit_only["epochs"] == 1 and "test/acc" not in fit_only and "val/acc" not in fit_only


def test_init_from_loads_the_weights_only_and_refuses_another_model(tiny_run, compose_tmp, tmp_path):
    from cvarch.build import build_model

    best = next((tiny_run / "checkpoints").glob("epoch*.ckpt"))
    state = torch.load(best, weights_only=True)["state_dict"]
    model = build_model(compose_tmp(*TINY, f"init_from={best}"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[f"model.{key}"]), key
    raw = tmp_path / "raw.pt"  # a plain state dict (torchvision's and timm's files) loads too
    torch.save({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}, raw)
    assert torch.equal(build_model(compose_tmp(*TINY, f"init_from={raw}")).state_dict()["fc.weight"],
                       state["model.fc.weight"])  # fmt: skip
    with pytest.raises(ValueError, match=r"init_from: .* does not fit this run's model .*layers differ"):
        build_model(compose_tmp(*TINY, "model.width=32", f"init_from={best}"))
    with pytest.raises(FileNotFoundError, match="init_from: no checkpoint at"):
        build_model(compose_tmp(*TINY, f"init_from={tmp_path / 'missing.ckpt'}"))


def test_a_failed_jobs_train_log_holds_its_traceback(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_main(
        "cvarch-train", *TINY, "data=imagefolder", f"data.root={tmp_path / 'missing'}",
        f"hydra.run.dir={run_dir}", *tmp_overrides(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 1
    log = (run_dir / "train.log").read_text()
    assert "the job failed: FileNotFoundError" in log and "Traceback (most recent call last)" in log
    assert str(tmp_path / "missing") in log
    assert "Traceback" not in proc.stdout  # the console shows Hydra's report once, not the logged copy


@pytest.mark.slow
def test_the_default_run_prints_little_and_logs_everything(default_run):
    """A default run's console: the model summary, the progress bar, the test table, the W&B sync line, the
    run folder. Library INFO lines and known-benign warnings go to train.log (or nowhere), not the console."""
    proc, out = default_run["proc"], default_run["output_dir"]
    console = (proc.stdout + proc.stderr).splitlines()
    bar = re.compile(r"^(Epoch \d+/\d+|Validation|Testing|Sanity)|^\s+(val|train)/\w+: |^\s+run ETA|^\s*$")
    lines = [line for line in console if not bar.search(line)]
    assert len(lines) <= 40, "\n".join(lines)
    text = "\n".join(console)
    for noise in ("LeafSpec", "litlogger", "GPU available", "Restoring states", "wandb: ", "anonymous"):
        assert noise not in text, noise
    log = (out / "train.log").read_text()
    assert "GPU available" in log and "Restoring states" in log and "wandb sync" in log
    assert f"wandb sync {out}/wandb/offline-run-" in text
