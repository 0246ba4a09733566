"""Builders: W&B identity of sweep jobs (group, name, tags), the CSV fallback when W&B cannot start, and the
fast-path options (mixed precision, channels-last, torch.compile, cuDNN benchmark) against fp32 eager."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import wandb
from omegaconf import OmegaConf, open_dict
from pytorch_lightning.loggers import CSVLogger

import cvarch
from cvarch.build import (
    build_from_checkpoint,
    build_model,
    build_module,
    build_trainer,
    sweep_identity,
    swept_keys,
)
from cvarch.checkpoint import load_trained
from cvarch.config import CONFIG_DIR, MODEL_OPTIONS, validate
from cvarch.eval import evaluate
from cvarch.models.resnet import ResNet
from tests.conftest import DEVICES, report, tmp_overrides


def test_swept_keys_come_from_the_command_line_and_the_sweeper_params(tmp_path):
    multirun = {
        "hydra": {
            "overrides": {"task": ["norm=batchnorm,none", "seed=0", "trainer.max_epochs=1", "+x=range(1,3)"]},
            "sweeper": {"params": {"init": "xavier,kaiming", "model": "resnet20"}},
        }
    }
    OmegaConf.save(OmegaConf.create(multirun), tmp_path / "multirun.yaml")
    assert swept_keys(tmp_path) == ["norm", "x", "init"]
    assert swept_keys(tmp_path / "elsewhere") == []


def test_a_single_run_keeps_the_configured_identity(compose_tmp):
    assert sweep_identity(compose_tmp()) == {}


def test_wandb_that_cannot_start_falls_back_to_csv_and_loses_no_metric(compose_tmp, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("wandb.init timed out after 90 s")

    monkeypatch.setattr(wandb, "init", broken)
    cfg = compose_tmp("logger=wandb", "trainer.max_epochs=1")
    with pytest.warns(RuntimeWarning, match=r"W&B could not start \(RuntimeError: wandb\.init timed out"):
        trainer = build_trainer(cfg)
    assert [type(logger) for logger in trainer.loggers] == [CSVLogger]
    with pytest.warns(RuntimeWarning, match="logging to CSV"):
        metrics = cvarch.train(compose_tmp("logger=wandb", "trainer.max_epochs=1", "data.train_per_class=3"))
    csv_file = Path(metrics["output_dir"]) / "csv" / "version_0" / "metrics.csv"
    assert "val/acc" in csv_file.read_text().splitlines()[0]


def test_wandb_mode_is_offline_unless_the_environment_says_otherwise(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert cvarch.compose("logger=wandb").logger.wandb.mode == "offline"  # no account, no network
    monkeypatch.setenv("WANDB_MODE", "online")  # what W&B's own docs tell users to export
    assert cvarch.compose("logger=wandb").logger.wandb.mode == "online"


def test_sweep_group_is_task_and_sweep_time_unless_the_user_chose_one():
    from cvarch.build import sweep_group

    assert (
        sweep_group("norm_ablation", "logs/x/multiruns/2026-01-02_03-04-05")
        == "norm_ablation/2026-01-02_03-04-05"
    )
    assert (
        sweep_group("norm_ablation", "logs/x/multiruns/t", "norm_ablation") == "norm_ablation/t"
    )  # the default
    assert sweep_group("norm_ablation", "logs/x/multiruns/t", "my-study") == "my-study"


# --- fast-path options --------------------------------------------------------------------------------------
# 20 SGD steps of ResNet-20 on the real 8×8 digits: 640 training images (64 a class) = 10 full batches of 64,
# two epochs. Full batches only (one validation and one test batch too): a smaller last batch would make
# torch.compile compile a second, dynamic-shape graph, and the compile test is the slow one.
FAST_RUN = (
    "data=digits",
    "data.train_per_class=64",
    "model=resnet20",
    "logger=csv",
    "trainer.max_epochs=2",
    "trainer.log_every_n_steps=1",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
)
STEPS = 20
# SGD amplifies any rounding difference chaotically: a 2e-7 difference at step 0 grows to ~1e-2 within 20
# steps whatever its cause (measured on 2 CPU cores, seeds 0–2: max |Δloss| 0.016–0.034 for channels_last,
# 0.013–0.017 for compile, 0.034–0.046 for bf16-mixed). A run from another seed differs by 0.37–0.65, and a
# run that does not train by more than 1 (the reference falls by at least 1.4; the fixture checks 10×
# this tolerance).
EVERY_STEP = 0.1
# Step 0 is the same weights on the same batch, so it isolates the option's arithmetic. fp32 in another order
# (another conv kernel, layout or fusion): unit roundoff 2^-24 ≈ 6e-8 × the loss (≈ 2.6); measured ≤ 4.8e-7.
FP32_FIRST_STEP = 1e-5
# bf16 keeps 8 significant bits: unit roundoff 2^-9 ≈ 2e-3, times the loss ≈ 5e-3 for one rounding; measured
# 2.3e-3–2.8e-3. fp16 (16-mixed) keeps 11 bits and gets the same bound.
MIXED_FIRST_STEP = 1e-2


def _loss_curve(cfg) -> tuple[list[float], dict]:
    """Trains ``cfg`` with :func:`cvarch.train`; returns ``train/loss_step`` of every step and the metrics."""
    metrics = cvarch.train(cfg)
    with open(Path(metrics["output_dir"]) / "csv" / "version_0" / "metrics.csv") as f:
        curve = [float(row["train/loss_step"]) for row in csv.DictReader(f) if row["train/loss_step"]]
    assert len(curve) == STEPS
    return curve, metrics


def _reference(tmp: Path, *overrides: str) -> list[float]:
    """The fp32 eager curve; it falls by far more than the tolerance, so a run that does not train fails."""
    curve, _ = _loss_curve(cvarch.compose(*tmp_overrides(tmp), *FAST_RUN, *overrides))
    assert curve[0] - max(curve[-5:]) > 10 * EVERY_STEP
    return curve


def _assert_follows(curve: list[float], reference: list[float], first_step: float, option: str) -> None:
    diff = [abs(a - b) for a, b in zip(curve, reference, strict=True)]
    report(
        f"{option} vs fp32 eager, ResNet-20 on digits, {STEPS} steps: |Δloss| step 0 {diff[0]:.1e} "
        f"(tolerance {first_step:.0e}), max {max(diff):.1e} at step {diff.index(max(diff))} "
        f"(tolerance {EVERY_STEP})"
    )
    assert diff[0] <= first_step, diff
    assert max(diff) <= EVERY_STEP, diff


@pytest.fixture(scope="module")
def eager_fp32(tmp_path_factory) -> list[float]:
    return _reference(tmp_path_factory.mktemp("eager_fp32"))


@pytest.mark.parametrize(
    ("overrides", "first_step"),
    [
        pytest.param(("trainer.precision=bf16-mixed",), MIXED_FIRST_STEP, marks=pytest.mark.slow),  # ~25 s
        (("model.channels_last=true",), FP32_FIRST_STEP),
    ],
    ids=["bf16-mixed", "channels_last"],
)
def test_a_fast_path_on_the_cpu_follows_the_fp32_loss_curve(overrides, first_step, eager_fp32, compose_tmp):
    curve, _ = _loss_curve(compose_tmp(*FAST_RUN, *overrides))
    _assert_follows(curve, eager_fp32, first_step, f"{overrides[0]} (CPU)")


@pytest.mark.slow
def test_compile_on_the_cpu_follows_the_fp32_loss_curve_and_its_checkpoint_loads_uncompiled(
    eager_fp32, compose_tmp, tmp_path
):
    curve, metrics = _loss_curve(compose_tmp(*FAST_RUN, "model.compile=true"))
    _assert_follows(curve, eager_fp32, FP32_FIRST_STEP, "model.compile=true (CPU, Inductor)")
    ckpt, run_cfg = load_trained(metrics["best_ckpt"])
    assert run_cfg.model.compile is True
    assert not [k for k in ckpt["state_dict"] if "_orig_mod" in k]  # no torch.compile wrapper in the keys
    build_from_checkpoint(
        ckpt, run_cfg, (1, 8, 8)
    )  # what cvarch-eval rebuilds: the compiled model, strict keys
    with open_dict(run_cfg):
        run_cfg.model.compile = False
    build_module(run_cfg, build_model(run_cfg, initialize=False)).load_state_dict(
        ckpt["state_dict"], strict=True
    )
    out = evaluate(
        cvarch.compose(
            *tmp_overrides(tmp_path),
            f"ckpt_path={metrics['best_ckpt']}",
            "+trainer.limit_test_batches=1",
            config_name="eval",
        )
    )
    assert out["test/acc"] == pytest.approx(metrics["test/acc"])  # the same test batch, the same weights


def test_fast_path_keys_are_run_options_the_model_constructor_never_sees(compose_tmp, monkeypatch):
    seen: dict = {}
    init = ResNet.__init__

    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        init(self, *args, **kwargs)

    monkeypatch.setattr(ResNet, "__init__", spy)
    cfg = compose_tmp("model=resnet20", "model.channels_last=true", "model.compile=true")
    validate(cfg)
    model = build_model(cfg)
    assert "layers" in seen and not set(MODEL_OPTIONS) & set(seen)
    weights = [p for p in model.parameters() if p.ndim == 4]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert not all(p.is_contiguous() for p in weights)  # NHWC strides, not NCHW ones that happen to match
    assert model._compiled_call_impl is not None  # nn.Module.compile: compiled in place, on the first call
    plain = build_model(compose_tmp("model=resnet20"))
    assert plain._compiled_call_impl is None
    assert list(model.state_dict()) == list(plain.state_dict())
    old = compose_tmp("model=resnet20")  # a run config saved before the options existed
    with open_dict(old.model):
        del old.model.channels_last, old.model.compile
    assert list(build_model(old).state_dict()) == list(plain.state_dict())
    with pytest.raises(ValueError, match=r"model\.compile: expected a boolean, got 'yes'"):
        validate(compose_tmp("model.compile=yes"))


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_weights_make_every_activation_nhwc_from_an_nchw_input(device, compose_tmp):
    """Why build_model converts no input: the first NHWC conv returns NHWC, and the layers after keep it."""
    cfg = compose_tmp("data=digits_rgb32", "model=resnet20")
    torch.manual_seed(0)
    plain = build_model(cfg).to(device).eval()
    fast = build_model(compose_tmp("data=digits_rgb32", "model=resnet20", "model.channels_last=true"))
    fast.load_state_dict(plain.state_dict())
    fast.to(device).eval()
    layouts = {}
    for name in ("bn1", "layer1", "layer2", "layer3"):
        module = fast.get_submodule(name)
        module.register_forward_hook(
            lambda m, args, out, name=name: layouts.update(
                {name: out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()}
            )
        )
    x = torch.randn(8, 3, 32, 32, device=device)  # NCHW, as the preprocess returns it
    with torch.no_grad():
        assert torch.allclose(fast(x), plain(x), atol=1e-4)
    assert layouts == {"bn1": True, "layer1": True, "layer2": True, "layer3": True}


MODEL_FILES = sorted(Path(CONFIG_DIR, "model").glob("*.yaml"))


@pytest.mark.parametrize("path", MODEL_FILES, ids=[p.stem for p in MODEL_FILES])
def test_every_model_config_offers_the_fast_path_options_off(path):
    node = OmegaConf.load(path)
    assert {key: node.get(key) for key in MODEL_OPTIONS} == {"channels_last": False, "compile": False}


# On a GPU: the same comparison against an fp32 eager CUDA run (cuDNN benchmark off), one option at a time.
# Not measured here (no GPU on the machine that wrote these tests): the tolerances are the CPU ones, except
# that fp32 convolutions run in TF32 by default on GPUs (torch.backends.cudnn.allow_tf32: 11 significant bits,
# like fp16), so step 0 of the fp32 options gets the mixed-precision bound.
GPU_FP32 = ("trainer=gpu", "trainer.precision=32-true", "trainer.benchmark=false")
GPU_OPTIONS = {
    "16-mixed": "trainer.precision=16-mixed",
    "bf16-mixed": "trainer.precision=bf16-mixed",
    "channels_last": "model.channels_last=true",
    "compile": "model.compile=true",
    "benchmark": "trainer.benchmark=true",
}


@pytest.fixture(scope="module")
def eager_fp32_cuda(tmp_path_factory) -> list[float]:
    benchmark = torch.backends.cudnn.benchmark  # Lightning sets it process-wide
    try:
        return _reference(tmp_path_factory.mktemp("eager_fp32_cuda"), *GPU_FP32)
    finally:
        torch.backends.cudnn.benchmark = benchmark


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "option", [pytest.param(k, marks=pytest.mark.slow) if k == "compile" else k for k in GPU_OPTIONS]
)
def test_a_fast_path_on_a_gpu_follows_the_fp32_loss_curve(option, eager_fp32_cuda, compose_tmp, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # restored after
    curve, _ = _loss_curve(compose_tmp(*FAST_RUN, *GPU_FP32, GPU_OPTIONS[option]))
    _assert_follows(curve, eager_fp32_cuda, MIXED_FIRST_STEP, f"{GPU_OPTIONS[option]} (CUDA)")
    if option == "benchmark":
        assert torch.backends.cudnn.benchmark  # the trainer key reached cuDNN
