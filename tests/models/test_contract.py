"""Every classifier config declares its structure the same way, timm's contract (see cvarch/models/layers.py):
``feature_info``, ``forward_features`` / ``forward_head``, ``get_classifier()`` and ``reset_classifier(n)``.

Kept fast (a second per config at most, resnet152, densenet201 and vgg19 included; resnet1202 is marked slow)
by building each config once on the meta device: no memory, no FLOP. There the shapes are checked, the order
of the stages, the modules each forward path runs, and which tensors ``reset_classifier`` replaces (by
identity and in-place version counter). The norm slots are emptied (``norm=none``): on the meta device every
BatchNorm costs milliseconds (PyTorch runs its Python decomposition), and no norm is part of the contract.

Values need real weights, seconds per ImageNet net, so the bit-for-bit checks
(``forward_head(forward_features(x)) == forward(x)``; ``reset_classifier`` leaves every other parameter and
buffer, norm statistics included, as it was) run on one small net per family, with its norms: CIFAR nets as
configured, the ImageNet families narrowed by overrides, since the split is each family's code, not its
widths. The split is checked in eval mode: in training GoogLeNet's forward also returns its auxiliary logits,
which ``forward_features`` never computes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig
from torch import nn

import cvarch
from cvarch.build import instantiate_model
from cvarch.config import CONFIG_DIR
from cvarch.models import native_size

MODELS = sorted(p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml"))
SKIP = {"inception_module": "a single Inception module (the lecture's cost example), not a classifier"}
# seconds to construct even on the meta device (1202 layers); resnet20 runs the same code
SLOW = {"resnet1202"}
# nets whose head has hidden layers (FC6, FC7) between the last stage and the classifier
HIDDEN_FC = ("alexnet", "zfnet", "vgg")


def _params() -> list[Any]:
    marks = {name: pytest.mark.skip(reason=reason) for name, reason in SKIP.items()}
    marks.update(dict.fromkeys(SLOW, pytest.mark.slow))
    return [pytest.param(n, marks=marks[n]) if n in marks else n for n in MODELS]


def compose(name: str, *overrides: str) -> DictConfig:
    """The config of ``model=<name>``. The ``profile`` root composes only ``data``, ``norm`` and ``model``: it
    gives the same model node as ``train``, in half the time."""
    return cvarch.compose(f"model={name}", *overrides, config_name="profile")


def input_shape(cfg: DictConfig) -> tuple[int, int, int]:
    """(C, H, W) at the config's native size; the MLP takes C·H·W = ``in_features`` values."""
    channels = cfg.data.channels
    if "in_features" in cfg.model:
        side = math.isqrt(cfg.model.in_features // channels)
        return channels, side, side
    return channels, native_size(cfg.model), native_size(cfg.model)


def classifiers(model: nn.Module) -> tuple[nn.Module, ...]:
    heads = model.get_classifier()
    return heads if isinstance(heads, tuple) else (heads,)


def module_names(model: nn.Module, modules: tuple[nn.Module, ...]) -> list[str]:
    return [name for name, m in model.named_modules() if any(m is h for h in modules)]


def in_width(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


def calls(model: nn.Module, run: Callable[[], Any]) -> tuple[list[str], Any]:
    """The names of the submodules ``run()`` calls, in call order, and its result."""
    names = {m: n for n, m in model.named_modules()}
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda m, args: order.append(names[m])) for m in model.modules()]
    try:
        out = run()
    finally:
        for h in hooks:
            h.remove()
    return [n for n in order if n], out


@pytest.mark.parametrize("name", _params())
def test_the_declared_structure_fits_the_forward(name):
    cfg = compose(name, "norm=none")
    with torch.device("meta"):
        model = instantiate_model(cfg.model).eval()
    channels, height, width = input_shape(cfg)
    x = torch.empty(2, channels, height, width, device="meta")
    info = model.feature_info
    stages = [stage["module"] for stage in info]
    names = {m: n for n, m in model.named_modules()}
    shapes: dict[str, torch.Size] = {}

    def record(module: nn.Module, args: Any, y: torch.Tensor) -> None:
        shapes.setdefault(names[module], y.shape)

    # forward_head ∘ forward_features runs the modules forward runs, in the same order, to the same logits
    forward_calls, out = calls(model, lambda: model(x))
    hooks = [m.register_forward_hook(record) for m, n in names.items() if n in stages]
    split_calls, features = calls(model, lambda: model.forward_features(x))
    for h in hooks:
        h.remove()
    head_calls, split = calls(model, lambda: model.forward_head(features))
    assert split_calls + head_calls == forward_calls
    assert out.shape == split.shape == (2, cfg.model.num_classes)

    # feature_info: stages in registration and forward order, with strictly growing reductions
    assert info and all(set(stage) == {"module", "num_chs", "reduction"} for stage in info)
    registered = [n for n, _ in model.named_modules()]
    assert set(stages) <= set(registered)
    assert sorted(stages, key=registered.index) == stages
    assert sorted(set(stages), key=forward_calls.index) == stages
    reductions = [stage["reduction"] for stage in info]
    assert all(a < b for a, b in zip(reductions, reductions[1:], strict=False)), reductions

    # each stage's output is num_chs × side/reduction, up to the rounding of unpadded convs and pools
    # (AlexNet: 227 → 27, 13, 6 at reductions 8, 16, 32; SqueezeNet 1.0: 224 → 109, 54 at 2, 4), and the last
    # one's channels are those of forward_features
    for stage in info:
        shape = shapes[stage["module"]]
        assert shape[1] == stage["num_chs"], stage
        if len(shape) == 4:
            assert shape[-1] == pytest.approx(width / stage["reduction"], rel=0.05, abs=1.5), stage
    assert features.shape[1] == info[-1]["num_chs"]

    # get_classifier: the main classifier takes what forward_head(pre_logits=True) gives; it follows the last
    # stage directly unless FC6 and FC7 sit between them
    heads = classifiers(model)
    assert in_width(heads[0]) == model.forward_head(features, pre_logits=True).shape[1]
    if not name.startswith(HIDDEN_FC):
        assert in_width(heads[0]) == info[-1]["num_chs"]

    # reset_classifier(7): new modules in the classifier's places, with every tensor that depends on the class
    # count; every other parameter and buffer is the same tensor, not written in place
    head_modules = module_names(model, heads)
    before = model.state_dict(keep_vars=True)
    versions = {k: v._version for k, v in before.items()}
    model.reset_classifier(7)
    after = model.state_dict(keep_vars=True)
    head = {k for k in before if k.rpartition(".")[0] in head_modules}
    assert after.keys() == before.keys()
    assert {k for k in after if after[k].shape != before[k].shape} == head
    assert all(after[k] is before[k] and after[k]._version == versions[k] for k in before.keys() - head)
    assert module_names(model, classifiers(model)) == head_modules
    assert all(after[k].shape[0] == 7 for k in head)
    assert model.forward_head(features).shape == (2, 7)


# one small net per family, with real weights: (config, overrides, input side)
SMALL = [
    ("alexnet_tv", ["model.classifier=[D,64,D,64]"], 64),
    ("vgg11", ["model.cfg=[8,M,16,M]"], 32),
    ("resnet20", [], 32),
    ("wrn16_4", ["model.layers=[1,1,1]"], 32),  # pre-activation: the last BN-ReLU is in forward_features
    ("googlenet_tv", [], 64),
    ("densenet_bc100_12", ["model.block_config=[2,2,2]"], 32),
    ("fractalnet", ["model.channels=[8,16]", "model.dropout=0", "model.columns=2"], 32),
    ("squeezenet1_1", [], 64),
    ("mlp", [], 8),
]


@pytest.mark.parametrize(("name", "overrides", "side"), SMALL, ids=[s[0] for s in SMALL])
def test_forward_head_of_forward_features_is_the_forward_and_reset_keeps_the_rest(name, overrides, side):
    cfg = compose(name, *overrides)
    torch.manual_seed(0)
    model = instantiate_model(cfg.model).eval()
    x = torch.randn(2, cfg.data.channels, side, side)
    with torch.no_grad():
        logits = model(x)
        assert torch.equal(model.forward_head(model.forward_features(x)), logits)
        assert logits.std() > 0  # the logits depend on the input

        old = classifiers(model)
        head = {
            f"{n}.{k}" for n, m in model.named_modules() if any(m is h for h in old) for k in m.state_dict()
        }
        before = {k: v.clone() for k, v in model.state_dict().items()}
        model.reset_classifier(7)
        after = model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items() if k not in head)
        for new, was in zip(classifiers(model), old, strict=True):  # the constructor's init, with 7 outputs
            assert new.weight.shape[0] == 7
            assert new.weight.std().item() == pytest.approx(was.weight.std().item(), rel=0.3)
        logits = model(x)
        assert logits.shape == (2, 7)
        assert torch.equal(model.forward_head(model.forward_features(x)), logits)
        outputs = model.train()(x)  # GoogLeNet's auxiliary heads give 7 logits too
        assert all(o.shape == (2, 7) for o in (outputs if isinstance(outputs, tuple) else (outputs,)))
