"""Transfer group: what each strategy loads, freezes and trains, the sources it accepts (cvarch.sources), its
stage probes (cvarch.probes), and its clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from torch import nn

import cvarch
from cvarch.build import build_model, build_module, build_transfer
from cvarch.config import CONFIG_DIR
from cvarch.eval import evaluate
from cvarch.sources import load_source
from cvarch.train import train
from cvarch.transfer import Transfer, frozen_eval, head_keys, stage_nodes
from tests.conftest import malicious_checkpoint, tmp_overrides

FAKE = ["data=fake", "data.image_size=16", "data.train_size=64", "data.val_size=32", "data.test_size=32"]
RUN = ["trainer=cpu", "logger=none", "model=resnet20", "data.batch_size=16", "augment=none"]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict:
    """A ResNet-20 trained 1 epoch on 5 classes: the source of every run below."""
    tmp = tmp_path_factory.mktemp("source")
    cfg = cvarch.compose(
        *tmp_overrides(tmp),
        *FAKE,
        *RUN,
        "data.num_classes=5",
        "trainer.max_epochs=1",
        f"hydra.run.dir={tmp}/run",
    )
    metrics = train(cfg)
    ckpt = torch.load(metrics["best_ckpt"], weights_only=True)
    return {"path": metrics["best_ckpt"], "state": ckpt["state_dict"]}


def _target(tmp_path: Path, source: dict, strategy: str, *overrides: str) -> tuple[dict, dict, dict]:
    """Trains a 3-class target from the source; returns (metrics, checkpoint, saved config)."""
    cfg = cvarch.compose(
        *tmp_overrides(tmp_path),
        *FAKE,
        *RUN,
        "data.num_classes=3",
        "trainer.max_epochs=2",
        "data.split_seed=1",  # other images than the source's
        f"transfer={strategy}",
        f"transfer.source={source['path']}",
        f"hydra.run.dir={tmp_path}/target",
        *overrides,
    )
    metrics = train(cfg)
    last = Path(metrics["output_dir"]) / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    return metrics, ckpt, OmegaConf.to_container(OmegaConf.load(Path(metrics["output_dir"]) / "config.yaml"))


def _model_state(state: dict, prefix: str = "model.") -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def _optimizer_param_count(ckpt: dict) -> tuple[int, int]:
    """(parameters in the optimizer's groups, parameters with optimizer state)."""
    opt = ckpt["optimizer_states"][0]
    return sum(len(g["params"]) for g in opt["param_groups"]), len(opt["state"])


def test_linear_probe_leaves_every_backbone_tensor_bit_identical(tmp_path, source):
    metrics, ckpt, config = _target(
        tmp_path, source, "linear_probe", "model=resnet32", "preprocess=channel_mean"
    )
    before, after = _model_state(source["state"]), _model_state(ckpt["state_dict"])
    backbone = [k for k in after if not k.startswith("fc.")]
    assert len(backbone) == len(before) - 2
    for key in backbone:  # weights, BN running statistics and num_batches_tracked
        assert torch.equal(after[key], before[key]), key
    assert after["fc.weight"].shape == (3, 64)  # a new head for the target's 3 classes
    # only the head is in the optimizer, and only it has state (momentum buffers after 8 steps)
    assert _optimizer_param_count(ckpt) == (2, 2)
    # the source brought its architecture (resnet20, not the model=resnet32 asked for) and its preprocessing
    assert config["model"]["layers"] == [3, 3, 3] and config["model"]["num_classes"] == 3
    assert config["preprocess"]["_target_"] == "cvarch.preprocess.Standardize"
    for name in ("mean", "std"):
        assert torch.equal(ckpt["state_dict"][f"preprocess.{name}"], source["state"][f"preprocess.{name}"])
    assert metrics["test/acc"] >= 0


def test_finetune_top_k1_changes_only_the_last_stage_and_the_head(tmp_path, source):
    _, ckpt, _ = _target(tmp_path, source, "finetune_top", "transfer.k=1")
    before, after = _model_state(source["state"]), _model_state(ckpt["state_dict"])
    changed = {k.split(".")[0] for k in after if k in before and not torch.equal(after[k], before[k])}
    # fc is new; conv1, bn1, layer1, layer2 untouched, their BN statistics too
    assert changed == {"layer3", "fc"}
    layer3 = [
        k
        for k, _ in cvarch.build.instantiate_model(cvarch.compose("model=resnet20").model).named_parameters()
    ]
    trainable = sum(1 for k in layer3 if k.startswith(("layer3.", "fc.")))
    assert _optimizer_param_count(ckpt) == (trainable, trainable)
    by_mult = {g["lr_mult"]: g["lr"] for g in ckpt["optimizer_states"][0]["param_groups"]}
    assert sorted(by_mult) == [0.1, 1.0]  # the pretrained stage learns 10× slower than the new head
    assert by_mult[0.1] == pytest.approx(0.1 * by_mult[1.0])


def test_stage_probes_log_one_accuracy_per_stage_and_keep_the_backbone(tmp_path, source):
    metrics, ckpt, _ = _target(tmp_path, source, "stage_probes")
    for split in ("val", "test"):
        stages = sorted(k for k in metrics if k.startswith(f"{split}/acc_stage"))
        assert stages == [f"{split}/acc_stage{i}" for i in (1, 2, 3)]  # ResNet-20: layer1, layer2, layer3
    assert metrics["test/acc"] == metrics["test/acc_stage3"]  # the model's prediction is the top stage's
    before, backbone = _model_state(source["state"]), _model_state(ckpt["state_dict"], "model.backbone.")
    assert backbone and all(torch.equal(backbone[k], before[k]) for k in backbone)
    assert "fc.weight" not in backbone  # the feature extractor stops at layer3
    probes = _model_state(ckpt["state_dict"], "model.probes.")
    assert {k.split(".")[0] for k in probes} == {"stage1", "stage2", "stage3"}
    assert probes["stage1.3.weight"].shape == (3, 16) and probes["stage3.3.weight"].shape == (3, 64)
    assert _optimizer_param_count(ckpt) == (6, 6)  # three probes' weight and bias

    # cvarch-eval rebuilds the probes from the run config alone and gets the same test accuracy
    out = evaluate(
        cvarch.compose(
            f"ckpt_path={metrics['best_ckpt']}", f"hydra.run.dir={tmp_path}/eval", config_name="eval"
        )
    )
    assert out["test/acc"] == pytest.approx(metrics["test/acc"])
    assert out["test/acc_stage1"] == pytest.approx(metrics["test/acc_stage1"])


def _state_dict_source(tmp_path: Path, model_name: str, *overrides: str) -> tuple[Path, dict]:
    """A state-dict file of a freshly built cvarch model."""
    model = cvarch.build.instantiate_model(cvarch.compose(f"model={model_name}", *overrides).model)
    path = tmp_path / f"{model_name}.pt"
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


def test_finetune_all_gives_lower_stages_a_smaller_lr(tmp_path, compose_tmp):
    path, _ = _state_dict_source(tmp_path, "resnet20")
    cfg = compose_tmp(
        "model=resnet20", "transfer=finetune_all", f"transfer.source={path}", "optimizer.lr=0.1"
    )
    module = build_module(cfg, build_model(cfg, image_shape=(1, 8, 8)))
    module._trainer = None
    groups = module.configure_optimizers()
    groups = (groups["optimizer"] if isinstance(groups, dict) else groups).param_groups
    lr_of = {name: g["lr"] for g in groups for name in g["names"]}
    decay = 0.385
    assert lr_of["fc.weight"] == pytest.approx(0.1)  # the new head: the base lr
    assert lr_of["layer3.0.conv1.weight"] == pytest.approx(0.1 * 0.1)  # top stage: backbone_lr_mult
    assert lr_of["layer2.0.conv1.weight"] == pytest.approx(0.1 * 0.1 * decay)
    assert lr_of["layer1.0.conv1.weight"] == pytest.approx(0.1 * 0.1 * decay**2)
    assert lr_of["conv1.weight"] == pytest.approx(0.1 * 0.1 * decay**2)  # the stem goes with stage 1
    assert len(lr_of) == len(list(module.model.parameters()))  # everything trains

    # the user's optimizer.groups.lr_mult wins over the strategy's
    cfg = compose_tmp(
        "model=resnet20",
        "transfer=finetune_all",
        f"transfer.source={path}",
        "optimizer.lr=0.1",
        "+optimizer.groups.lr_mult={layer1: 0.5}",
    )
    module = build_module(cfg, build_model(cfg, image_shape=(1, 8, 8)))
    groups = module.configure_optimizers()
    groups = (groups["optimizer"] if isinstance(groups, dict) else groups).param_groups
    lr_of = {name: g["lr"] for g in groups for name in g["names"]}
    assert lr_of["layer1.0.conv1.weight"] == pytest.approx(0.05) and lr_of["layer2.0.conv1.weight"] < 0.005


def test_frozen_parts_stay_in_eval_mode_when_lightning_calls_train(tmp_path, compose_tmp):
    path, _ = _state_dict_source(tmp_path, "resnet20")
    cfg = compose_tmp("model=resnet20", "transfer=finetune_top", f"transfer.source={path}")
    module = build_module(cfg, build_model(cfg, image_shape=(1, 8, 8)))
    module.train()
    model = module.model
    assert not model.bn1.training and not model.layer1.training and not model.layer2[0].bn1.training
    assert model.layer3.training and model.layer3[0].bn1.training and model.fc.training
    x = torch.randn(4, 1, 8, 8)
    running = model.layer1[0].bn1.running_mean.clone()
    model(x)
    assert torch.equal(model.layer1[0].bn1.running_mean, running)  # frozen BN: no statistics update
    frozen_eval(model)  # idempotent


@pytest.mark.parametrize(
    ("arch", "head"),
    [
        ("resnet18", {"fc.weight", "fc.bias"}),
        pytest.param("vgg16", {"classifier.6.weight", "classifier.6.bias"}, marks=pytest.mark.slow),
    ],
)
def test_a_torchvision_format_state_dict_loads_as_a_source(tmp_path, compose_tmp, arch, head):
    state = torchvision.models.get_model(arch, weights=None).state_dict()  # random init, no download
    path = tmp_path / f"{arch}.pth"
    torch.save(state, path)
    cfg = compose_tmp(f"model={arch}", "norm=none" if arch == "vgg16" else "norm=batchnorm", "data=fake")
    cfg.transfer = OmegaConf.merge(cfg.transfer, {"strategy": "finetune_all", "source": str(path)})
    model = build_model(cfg, image_shape=(3, 32, 32))
    assert head_keys(model) == head
    loaded = model.state_dict()
    for key, value in state.items():
        if key not in head:
            assert torch.equal(loaded[key], value), key
    assert loaded[sorted(head)[-1]].shape[0] == 10  # the target's 10 classes, not ImageNet's 1000


def test_a_torchvision_weights_name_loads_from_the_hub_cache(tmp_path, compose_tmp, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cached = tmp_path / "torch" / "hub" / "checkpoints" / Path(weights.url).name
    cached.parent.mkdir(parents=True)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, cached)  # stands in for the downloaded file
    cfg = compose_tmp("model=resnet18", "transfer=linear_probe", "transfer.source=IMAGENET1K_V1", "data=fake")
    assert cfg.transfer.arch == "resnet18"  # the model group's choice names the torchvision builder
    transfer = build_transfer(cfg)
    preprocess = transfer.adopt(cfg)
    assert cfg.preprocess._target_ == "cvarch.preprocess.Standardize"  # ImageNet's normalization comes along
    assert preprocess["mean"].flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert preprocess["std"].flatten().tolist() == pytest.approx([0.229, 0.224, 0.225])
    assert transfer.loaded_source().num_classes == 1000
    model = build_model(cfg, image_shape=(3, 32, 32), transfer=transfer)
    assert torch.equal(model.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]


def test_a_source_of_another_architecture_lists_the_mismatched_keys(tmp_path, compose_tmp):
    path, _ = _state_dict_source(tmp_path, "resnet18", "data=fake")
    cfg = compose_tmp("model=resnet34", "transfer=finetune_all", f"transfer.source={path}", "data=fake")
    with pytest.raises(ValueError, match=r"does not fit ResNet.*missing keys \['layer1\.2\.conv1\.weight'"):
        build_model(cfg, image_shape=(3, 32, 32))
    path, _ = _state_dict_source(tmp_path, "wrn16_4")  # same keys, other widths
    cfg = compose_tmp("model=resnet20", "transfer=linear_probe", f"transfer.source={path}")
    with pytest.raises(
        ValueError, match=r"mismatched \['layer1\.0\.conv1\.weight: source \(64, 16, 3, 3\) vs model \(16, 16"
    ):
        build_model(cfg, image_shape=(1, 8, 8))


def test_a_cvarch_source_of_another_model_is_refused_when_the_model_group_is_kept(
    tmp_path, source, compose_tmp
):
    cfg = compose_tmp(
        *FAKE,
        "model=resnet32",
        "transfer=linear_probe",
        f"transfer.source={source['path']}",
        "transfer.use_source_model=false",
    )
    transfer = build_transfer(cfg)
    transfer.adopt(cfg)
    assert cfg.model.layers == [5, 5, 5]
    grey = compose_tmp(*FAKE, "data.channels=1", "transfer=linear_probe", f"transfer.source={source['path']}")
    with pytest.raises(ValueError, match=r"takes 3-channel images but data\.channels=1"):
        build_transfer(grey).adopt(grey)
    with pytest.raises(ValueError, match=r"missing keys \['layer1\.3\.conv1\.weight'"):
        build_model(cfg, image_shape=(3, 16, 16), transfer=transfer)


def test_an_adopted_source_model_keeps_this_runs_fast_path_options(source, compose_tmp):
    cfg = compose_tmp(
        *FAKE,
        "model=resnet32",
        "model.channels_last=true",
        "transfer=linear_probe",
        f"transfer.source={source['path']}",
    )
    build_transfer(cfg).adopt(cfg)
    assert list(cfg.model.layers) == [3, 3, 3]  # the source's ResNet-20 …
    assert cfg.model.channels_last is True and cfg.model.compile is False  # … run as this run asks


def test_strategy_errors_name_their_key(tmp_path, compose_tmp):
    with pytest.raises(
        ValueError, match=r"transfer=linear_probe needs transfer\.source: a cvarch checkpoint"
    ):
        build_transfer(compose_tmp("transfer=linear_probe"))
    with pytest.raises(ValueError, match=r"transfer\.strategy='freeze' is not one of"):
        Transfer("freeze", source="x")
    with pytest.raises(ValueError, match=r"transfer\.k must be an integer >= 1"):
        Transfer("finetune_top", source="x", k=0)
    with pytest.raises(ValueError, match=r"transfer\.backbone_lr_mult must be a finite number > 0"):
        Transfer("finetune_all", source="x", backbone_lr_mult=0.0)
    assert Transfer("scratch", source="x").source is None  # scratch loads nothing
    path, _ = _state_dict_source(tmp_path, "resnet20")
    cfg = compose_tmp("transfer=finetune_top", f"transfer.source={path}", "transfer.k=4")
    with pytest.raises(
        ValueError, match=r"transfer\.k=4 but ResNet has 3 stages: \['layer1', 'layer2', 'layer3'\]"
    ):
        build_model(cfg, image_shape=(1, 8, 8))
    cfg = compose_tmp("transfer=stage_probes", f"transfer.source={path}", "transfer.stages=[layer1,layer9]")
    with pytest.raises(ValueError, match=r"transfer\.stages: \['layer9'\] are not modules of ResNet"):
        build_model(cfg, image_shape=(1, 8, 8))
    with pytest.raises(FileNotFoundError, match=r"transfer\.source: runs/nowhere\.ckpt is neither a file"):
        load_source("runs/nowhere.ckpt")


MODELS = sorted(p.stem for p in Path(CONFIG_DIR, "model").glob("*.yaml") if p.stem != "inception_module")


def _meta_model(name: str, **node: Any) -> nn.Module:
    """The model of ``model=<name>`` (its node updated with ``node``) built on the meta device: its shapes, no
    memory and no init."""
    cfg = cvarch.compose(f"model={name}")
    with torch.device("meta"):
        return cvarch.build.instantiate_model(OmegaConf.merge(cfg.model, node))


@pytest.mark.parametrize("name", MODELS)
def test_the_head_is_what_depends_on_the_class_count(name):
    cfg = cvarch.compose(f"model={name}", "data.num_classes=7")
    with torch.device("meta"):  # shapes only: no memory, no init
        model = cvarch.build.instantiate_model(cfg.model)
        other = cvarch.build.instantiate_model(OmegaConf.merge(cfg.model, {"num_classes": 8}))
    head = head_keys(model)  # what the model declares (get_classifier)
    state, shapes = model.state_dict(), {k: v.shape for k, v in other.state_dict().items()}
    assert head == {k for k, v in state.items() if v.shape != shapes[k]}  # exactly the class-count dependent
    assert head and all(state[k].shape[0] == 7 for k in head)
    assert {k.rpartition(".")[0] for k in head} <= {n for n, _ in model.named_modules()}


def test_googlenet_and_squeezenet_heads():
    assert head_keys(_meta_model("googlenet")) == {
        f"{m}.{p}" for m in ("fc", "aux1.fc2", "aux2.fc2") for p in ("weight", "bias")
    }
    assert head_keys(_meta_model("googlenet", aux_logits=False)) == {"fc.weight", "fc.bias"}
    assert head_keys(_meta_model("squeezenet1_1")) == {
        "classifier.1.weight",
        "classifier.1.bias",
    }


def test_a_model_that_declares_no_structure_is_a_clear_error():
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))  # a plain torch.nn model: no feature_info, no head
    with pytest.raises(ValueError, match=r"Sequential declares no stages \(feature_info.*transfer\.stages"):
        stage_nodes(plain)
    with pytest.raises(ValueError, match=r"Sequential does not declare its classifier \(get_classifier\(\)"):
        head_keys(plain)
    assert Transfer("finetune_top", source="x", stages=["1"]).stage_nodes(plain) == ["1"]  # transfer.stages


@pytest.mark.parametrize(
    ("name", "stages"),
    [
        ("resnet20", ["layer1", "layer2", "layer3"]),
        ("resnet50", ["layer1", "layer2", "layer3", "layer4"]),
        ("vgg16", [f"features.{i}" for i in (4, 9, 16, 23, 30)]),
        ("alexnet", ["features.2", "features.6", "features.14"]),
        (  # the stem, then each dense block before its transition pools (timm's DenseNet)
            "densenet121",
            [
                "features.relu0",
                "features.denseblock1",
                "features.denseblock2",
                "features.denseblock3",
                "features.norm5",
            ],
        ),
        ("densenet_bc100_12", ["features.denseblock1", "features.denseblock2", "features.norm5"]),
        ("squeezenet1_1", ["features.1", "features.4", "features.7", "features.12"]),  # before each max-pool
        (
            "googlenet",
            ["conv1", "norm2", "inception3b", "inception4e", "inception5b"],
        ),  # before each max-pool
        ("fractalnet", [f"blocks.{i}" for i in range(5)]),
        ("mlp", ["hidden"]),
    ],
)
def test_the_zoo_stages(name, stages):
    assert stage_nodes(_meta_model(name)) == stages  # the model's feature_info


def test_stage_probes_extract_vgg_pool_outputs(tmp_path, compose_tmp):
    path, _ = _state_dict_source(tmp_path, "vgg11", "data=fake")
    cfg = compose_tmp("model=vgg11", "data=fake", "transfer=stage_probes", f"transfer.source={path}")
    model = build_model(cfg, image_shape=(3, 32, 32))
    out = model(torch.zeros(2, 3, 32, 32))  # (top, *lower stages), as GoogLeNet's (logits, *aux)
    assert list(model.head_loss_weights) == ["stage5", "stage1", "stage2", "stage3", "stage4"]
    assert isinstance(out, tuple) and len(out) == 5 and all(v.shape == (2, 10) for v in out)
    assert set(model.head_loss_weights.values()) == {1.0}  # each probe trains on its own loss
    widths = [model.probes[f"stage{i}"][3].in_features for i in range(1, 6)]
    assert widths == [64, 128, 256, 512, 512]  # VGG-11's pool outputs (Simonyan & Zisserman 2014 Table 1, A)
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert json.dumps(sorted(model.stages)) == json.dumps(sorted(f"features.{i}" for i in (2, 5, 10, 15, 20)))


def test_run_configs_from_before_the_transfer_options_train_from_scratch():
    legacy = OmegaConf.create(
        {"transfer": {"_target_": "cvarch.transfer.apply_transfer", "_partial_": True, "strategy": "scratch"}}
    )
    assert build_transfer(legacy).strategy == "scratch"
    assert build_transfer(OmegaConf.create({})).strategy == "scratch"


def test_a_source_whose_unpickling_would_run_code_is_refused_and_nothing_runs(tmp_path, compose_tmp):
    path, marker = malicious_checkpoint(tmp_path)
    with pytest.raises(
        ValueError, match=r"transfer.source: .*evil.ckpt cannot be loaded with weights_only=True"
    ):
        load_source(str(path))
    with pytest.raises(ValueError, match="transfer.source"):
        cvarch.train(compose_tmp("transfer=linear_probe", f"transfer.source={path}"))
    assert not marker.exists()
