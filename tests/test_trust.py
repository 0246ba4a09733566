"""The trust boundary (cvarch/config.py's ``check_received`` and its callers in checkpoint, eval, ensemble and
transfer): what the user runs is trusted; what they received (a checkpoint's config, a run folder's
config.yaml, a transfer source, an ensemble member) builds only cvarch's own targets and the ``trust``
packages'. Also a researcher's own models, from the command line, their own config dir, or a plain
``torch.nn`` module."""

from __future__ import annotations

import copy
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import instantiate

import cvarch
from cvarch.config import ConfigError, check_received, packaged_targets
from cvarch.ensemble import ensemble
from cvarch.eval import evaluate
from tests.conftest import _Payload, tmp_overrides

MLP = ("model=mlp", "model.depth=1", "model.width=16")
QUICK = ("logger=none", "trainer.max_epochs=1", "data.train_per_class=20")


LEARN = (
    "logger=none",
    "trainer.max_epochs=8",
    "data.train_per_class=60",
    "optimizer.lr=0.05",
)  # beats chance


def eval_cfg(tmp: Path, ckpt: Path, *overrides: str):
    return cvarch.compose(*tmp_overrides(tmp), f"ckpt_path={ckpt}", *overrides, config_name="eval")


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """One tiny trained run (MLP on digits): its directory and metrics."""
    tmp = tmp_path_factory.mktemp("clean")
    metrics = cvarch.train(cvarch.compose(*tmp_overrides(tmp), f"hydra.run.dir={tmp / 'run'}", *MLP, *QUICK))
    return tmp / "run", metrics


# --- the payloads: each runs code (or would) if cvarch built it ---------------------------------------------
def _pycodecache(tmp: Path, marker: Path) -> dict:
    return {
        "_target_": "torch._inductor.codecache.PyCodeCache.load",
        "source_code": f"open({str(marker)!r}, 'w').write('pwned')\n",
    }


def _hub_local(tmp: Path, marker: Path) -> dict:
    repo = tmp / "hubrepo"
    repo.mkdir(exist_ok=True)
    (repo / "hubconf.py").write_text(
        f"open({str(marker)!r}, 'w').write('pwned')\ndef evil():\n    return 1\n"
    )
    return {"_target_": "torch.hub.load", "repo_or_dir": str(repo), "model": "evil", "source": "local"}


def _torch_load(tmp: Path, marker: Path) -> dict:
    pickle = tmp / "payload.pt"
    torch.save(_Payload(marker), pickle)
    return {"_target_": "torch.load", "f": str(pickle), "weights_only": False}


def _jit_load(tmp: Path, marker: Path) -> dict:
    return {"_target_": "torch.jit.load", "f": str(tmp / "model.pt")}


def _load_inline(tmp: Path, marker: Path) -> dict:
    return {"_target_": "torch.utils.cpp_extension.load_inline", "name": "evil", "cpp_sources": "int x;"}


def _package(tmp: Path, marker: Path) -> dict:
    return {"_target_": "torch.package.PackageImporter", "file_or_buffer": str(tmp / "evil.pt")}


def _squatted_lightning(tmp: Path, marker: Path) -> dict:
    squat = tmp / "squat" / "lightning"
    squat.mkdir(parents=True, exist_ok=True)
    (squat / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').write('pwned')\nclass Trainer:\n    pass\n"
    )
    return {"_target_": "lightning.Trainer"}


PAYLOADS = {  # name: (node maker, where it goes in the saved config)
    "PyCodeCache.load": (_pycodecache, "preprocess"),
    "torch.hub.load local": (_hub_local, "model.norm_layer"),
    "torch.load weights_only=False": (_torch_load, "regularizer"),
    "torch.jit.load": (_jit_load, "tta"),
    "load_inline": (_load_inline, "augment"),
    "torch.package": (_package, "scheduler"),
    "squatted lightning": (_squatted_lightning, "trainer"),
    "hydra.callbacks": (_pycodecache, "hydra.callbacks.evil"),
}
SPIED = {  # payloads whose code path needs a compiler or a file format: a spy records any call instead
    "torch.jit.load": ("torch.jit", "load"),
    "load_inline": ("torch.utils.cpp_extension", "load_inline"),
    "torch.package": ("torch.package", "PackageImporter"),
}


@pytest.fixture
def payload(request, tmp_path, monkeypatch):
    """``(name, node, dotted key, marker)``: the marker file appears if the payload ever runs."""
    name = request.param
    marker = tmp_path / "pwned"
    make, where = PAYLOADS[name]
    node = make(tmp_path, marker)
    if name in SPIED:
        import importlib

        module, attr = SPIED[name]
        monkeypatch.setattr(importlib.import_module(module), attr, lambda *a, **k: marker.write_text("pwned"))
    if name == "squatted lightning":
        monkeypatch.syspath_prepend(str(tmp_path / "squat"))
        assert "lightning" not in __import__("sys").modules
    return name, node, where, marker


def _poison(config: dict, where: str, node: dict) -> dict:
    config = copy.deepcopy(config)
    *parents, last = where.split(".")
    parent = config
    for key in parents:
        parent = parent.setdefault(key, {})
    parent[last] = node
    return config


def _poisoned_checkpoint(clean: Path, out: Path, where: str, node: dict) -> Path:
    ckpt = torch.load(clean, weights_only=True)
    ckpt["hyper_parameters"] = _poison(ckpt["hyper_parameters"], where, node)
    torch.save(ckpt, out)
    torch.load(
        out, weights_only=True
    )  # still a file that loads with weights_only: the payload is in the config
    return out


def _run_copy(run: Path, dest: Path) -> Path:
    """A copy of a run folder whose metrics.json's ``best_ckpt`` points into the copy."""
    shutil.copytree(run, dest)
    metrics = (dest / "metrics.json").read_text().replace(str(run), str(dest))
    (dest / "metrics.json").write_text(metrics)
    return dest


ROUTES = ("checkpoint config", "run folder config.yaml", "transfer source", "ensemble member")


@pytest.mark.parametrize("payload", sorted(PAYLOADS), indirect=True)
@pytest.mark.parametrize("route", ROUTES)
def test_a_received_payload_is_refused_naming_the_key_and_nothing_runs(route, payload, clean_run, tmp_path):
    name, node, where, marker = payload
    run, metrics = clean_run
    key = where.replace(".", r"\.")
    if route == "checkpoint config":
        evil = _poisoned_checkpoint(Path(metrics["best_ckpt"]), tmp_path / "evil.ckpt", where, node)
        with pytest.raises(ConfigError, match=rf"ckpt_path: .*evil.ckpt: {key}\._target_: .*trust=\["):
            evaluate(eval_cfg(tmp_path, evil))
    elif route == "run folder config.yaml":
        folder = _run_copy(run, tmp_path / "received")
        config = yaml.safe_load((folder / "config.yaml").read_text())
        (folder / "config.yaml").write_text(yaml.safe_dump(_poison(config, where, node)))
        with pytest.raises(ConfigError, match=rf"runs: .*received/config.yaml: {key}\._target_: .*trust=\["):
            ensemble([folder], device="cpu")
    elif route == "transfer source":
        evil = _poisoned_checkpoint(Path(metrics["best_ckpt"]), tmp_path / "evil.ckpt", where, node)
        cfg = cvarch.compose(
            *tmp_overrides(tmp_path), *MLP, *QUICK, "transfer=finetune_all", f"transfer.source={evil}"
        )
        with pytest.raises(ConfigError, match=rf"transfer.source: .*evil.ckpt: {key}\._target_: .*trust=\["):
            cvarch.train(cfg)
    else:  # a second member whose checkpoint carries the payload; its folder's config.yaml is clean
        folder = _run_copy(run, tmp_path / "member")
        best = Path(metrics["best_ckpt"].replace(str(run), str(folder)))
        _poisoned_checkpoint(best, best, where, node)
        with pytest.raises(ConfigError, match=rf"runs: .*member/.*\.ckpt: {key}\._target_: .*trust=\["):
            ensemble([run, folder], device="cpu")
    assert not marker.exists(), f"{name} ran through the {route}"


@pytest.mark.parametrize(
    "name", ["PyCodeCache.load", "torch.hub.load local", "torch.load weights_only=False"]
)
def test_the_payloads_are_live_when_built_directly(name, tmp_path):
    """The refusals above are not vacuous: built without the check, these payloads do run their code."""
    marker = tmp_path / "pwned"
    make, _ = PAYLOADS[name]
    try:
        instantiate(make(tmp_path, marker))
    except Exception:
        pass  # the code ran before whatever failed afterwards
    assert marker.exists()


def test_the_squatted_package_would_run_if_imported(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    node = _squatted_lightning(tmp_path, marker)
    monkeypatch.syspath_prepend(str(tmp_path / "squat"))
    check = pytest.raises(ConfigError, match=r"'lightning.Trainer' is not allowed")
    with check:
        check_received({"trainer": node}, "ckpt_path: x")
    assert not marker.exists()
    try:
        instantiate(node)
        assert marker.exists()
    finally:
        __import__("sys").modules.pop("lightning", None)


def test_the_packaged_targets_are_exact_names_with_no_code_loader():
    targets = packaged_targets()
    assert {"cvarch.models.resnet.ResNet", "torch.optim.SGD", "pytorch_lightning.Trainer"} <= targets
    assert len(targets) > 50
    for loader in (
        "torch.load",
        "torch.hub.load",
        "torch.jit.load",
        "torch.utils.cpp_extension.load_inline",
        "torch._inductor.codecache.PyCodeCache.load",
        "torch.package.PackageImporter",
    ):
        assert loader not in targets
    assert not any(t.startswith("lightning.") for t in targets)


@pytest.mark.parametrize(
    ("trust", "target", "message"),
    [
        ([], "os.system", r"trust=\[os\]"),
        ([], "torch.os.system", r"trust=\[torch\]"),  # no prefix of torch. is trusted any more
        (["logging"], "logging.os.system", r"alias of posix.system"),  # an alias out of a trusted package
        (["mylab pkg"], "mylab.Net", r"trust: \['mylab pkg'\] are not package names"),
    ],
)
def test_received_targets_outside_the_trusted_set_are_named(trust, target, message):
    with pytest.raises(ConfigError, match=message):
        check_received({"model": {"_target_": target}}, "ckpt_path: x", trust)


def test_a_trust_key_inside_the_received_config_is_ignored():
    with pytest.raises(ConfigError, match=r"model\._target_: 'json.dumps' is not allowed"):
        check_received({"trust": ["json"], "model": {"_target_": "json.dumps"}}, "ckpt_path: x")
    check_received({"model": {"_target_": "json.dumps"}}, "ckpt_path: x", ["json"])


# --- a researcher's own models ------------------------------------------------------------------------------
MYLAB = '''
    import torch
    from torch import nn


    class TinyMLP(nn.Module):
        """A reimplementation of cvarch's MLP, with the same keys."""

        def __init__(self, in_features, depth, width, num_classes, act_layer="tanh", bias=True):
            super().__init__()
            layers = [nn.Flatten()]
            for i in range(depth):
                layers += [nn.Linear(in_features if i == 0 else width, width, bias=bias), nn.Tanh()]
            self.body = nn.Sequential(*layers)
            self.fc = nn.Linear(width, num_classes, bias=bias)

        def forward(self, x):
            return self.fc(self.body(x))


    class TinyNet(nn.Module):
        """A small conv net; num_classes is filled in by cvarch, since the constructor takes it."""

        def __init__(self, num_classes, in_channels=1, width=8):
            super().__init__()
            self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
            self.fc = nn.Linear(width, num_classes)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))
'''
PLAIN = """\
_target_: torch.nn.Sequential
_args_:
  - _target_: torch.nn.Flatten
  - _target_: torch.nn.Linear
    in_features: 64
    out_features: {out}
"""
MYCONF = {
    "tinynet.yaml": "_target_: mylab.tinynet.TinyNet\nin_channels: ${data.channels}\nwidth: 8\n",
    "plain_linear.yaml": PLAIN.format(out="${data.num_classes}"),
    "plain_linear7.yaml": PLAIN.format(out=7),  # a head that misses the dataset's 10 classes
}


@pytest.fixture
def mylab(tmp_path, monkeypatch):
    """A researcher's package ``mylab`` outside cvarch and a config dir ``myconf/model/`` beside it."""
    package = tmp_path / "lab" / "mylab"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "tinynet.py").write_text(textwrap.dedent(MYLAB))
    models = tmp_path / "myconf" / "model"
    models.mkdir(parents=True)
    for name, text in MYCONF.items():
        (models / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path / "lab"))
    yield tmp_path
    for name in [m for m in __import__("sys").modules if m.split(".")[0] == "mylab"]:
        del __import__("sys").modules[name]


@pytest.mark.slow
def test_own_models_train_from_the_command_line_and_a_config_dir_and_evaluate_with_trust(mylab):
    tmp = mylab
    # 1. the command line: the model group's keys, another class
    cli = cvarch.train(
        cvarch.compose(*tmp_overrides(tmp), *MLP, *LEARN, "model._target_=mylab.tinynet.TinyMLP")
    )
    assert cli["params"] == (64 * 16 + 16) + (16 * 10 + 10) and cli["test/acc"] > 0.3  # chance: 0.1
    # 2. the user's own config dir: model=tinynet (no num_classes key: cvarch passes data.num_classes)
    searchpath = f"hydra.searchpath=[file://{tmp / 'myconf'}]"
    cfg = cvarch.compose(*tmp_overrides(tmp), *LEARN, searchpath, "model=tinynet")
    assert "num_classes" not in cfg.model
    own = cvarch.train(cfg)
    assert own["params"] == (1 * 8 * 9 + 8) + (8 * 10 + 10)
    # 3. its checkpoint is a received file for cvarch-eval: refused without trust, naming the key
    with pytest.raises(
        ConfigError, match=r"model\._target_: 'mylab.tinynet.TinyNet' is not allowed.*trust=\[mylab\]"
    ):
        evaluate(eval_cfg(tmp, own["best_ckpt"]))
    trusted = evaluate(eval_cfg(tmp, own["best_ckpt"], "trust=[mylab]"))
    assert trusted["test/acc"] == pytest.approx(own["test/acc"], abs=1e-6)


@pytest.mark.slow
def test_a_trust_saved_with_the_run_does_not_carry_over(mylab):
    tmp = mylab
    cfg = cvarch.compose(
        *tmp_overrides(tmp), *MLP, *QUICK, "model._target_=mylab.tinynet.TinyMLP", "trust=[mylab]"
    )
    run = cvarch.train(cfg)
    assert torch.load(run["best_ckpt"], weights_only=True)["hyper_parameters"]["trust"] == ["mylab"]
    with pytest.raises(ConfigError, match=r"trust=\[mylab\]"):
        evaluate(eval_cfg(tmp, run["best_ckpt"]))


@pytest.mark.slow
def test_a_plain_torch_nn_module_trains_without_num_classes(mylab):
    tmp = mylab
    searchpath = f"hydra.searchpath=[file://{tmp / 'myconf'}]"
    run = cvarch.train(cvarch.compose(*tmp_overrides(tmp), *LEARN, searchpath, "model=plain_linear"))
    assert run["params"] == 64 * 10 + 10 and run["test/acc"] > 0.3  # chance: 0.1
    evaluated = evaluate(eval_cfg(tmp, run["best_ckpt"]))  # torch.nn layers: no trust needed
    assert evaluated["test/acc"] == pytest.approx(run["test/acc"], abs=1e-6)


def test_a_plain_module_whose_head_misses_the_dataset_is_named(mylab, compose_tmp):
    cfg = compose_tmp(*QUICK, f"hydra.searchpath=[file://{mylab / 'myconf'}]", "model=plain_linear7")
    with pytest.raises(ValueError, match=r"model: Sequential outputs 7 logits but data.num_classes=10"):
        cvarch.train(cfg)


def test_a_checkpoint_config_of_the_previous_init_shape_is_still_received():
    # before one class per scheme, every init node built cvarch.init.apply_init; old run configs still hold it
    old = {"init": {"_target_": "cvarch.init.apply_init", "_partial_": True, "scheme": "kaiming"}}
    check_received(old, "ckpt_path: old.ckpt")
    with pytest.raises(ConfigError, match=r"init\._target_"):
        check_received({"init": {"_target_": "cvarch.init.apply_init_x"}}, "ckpt_path: old.ckpt")
