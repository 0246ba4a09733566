"""cvarch/init.py: each scheme's class against its YAML, its weight statistics against its formula, and the
lecture's activation study."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

import cvarch
from cvarch.config import CONFIG_DIR
from cvarch.init import LSUV, SCHEMES, apply_init, patch_eigens

OPTIONS = sorted(p.stem for p in (Path(CONFIG_DIR) / "init").glob("*.yaml"))
DATA_DRIVEN = ("lsuv", "patch_whitening")  # called as init(model, batch=x)
# the schemes that re-draw every layer; patch_whitening sets the first conv only (the others keep their init)
REINIT = [s for s in OPTIONS if s not in ("default", "patch_whitening")]


def _zoo() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.Flatten(2),
        nn.Conv1d(8, 8, 1),
        nn.Flatten(),
        nn.LayerNorm(8 * 4 * 4),
        nn.Linear(8 * 4 * 4, 10),
    )


def _init(module: nn.Module, scheme: str, **options) -> nn.Module:
    torch.manual_seed(0)
    return apply_init(module, scheme, **options)


@pytest.mark.parametrize("scheme", REINIT)
def test_biases_zero_and_norms_identity_after_every_scheme(scheme):
    model = _zoo()
    for p in model.parameters():
        nn.init.normal_(p)
    init = instantiate(OmegaConf.load(Path(CONFIG_DIR) / "init" / f"{scheme}.yaml"))
    model = init(model, **({"batch": torch.randn(16, 3, 4, 4)} if init.needs_batch else {}))
    for m in model.modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            assert torch.all(m.bias == 0)
        if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


@pytest.mark.parametrize("option", OPTIONS)
def test_each_option_builds_its_scheme_class_with_every_argument_a_key(option):
    """``init=<option>`` is one ``_target_``: the class ``apply_init`` knows by that name, each of whose
    arguments is a key of the YAML (so ``init.<key>=…`` reaches it), and the same draws as
    ``apply_init(model, option)``."""
    node = OmegaConf.load(Path(CONFIG_DIR) / "init" / f"{option}.yaml")
    cls = SCHEMES[option]
    assert node._target_ == f"cvarch.init.{cls.__name__}" and cls.name == option
    assert set(node) - {"_target_"} == set(inspect.signature(cls).parameters)
    init = instantiate(node)
    assert type(init) is cls and init.needs_batch == (option in DATA_DRIVEN)
    batch = {"batch": torch.randn(16, 3, 4, 4)} if init.needs_batch else {}
    torch.manual_seed(0)
    from_yaml = init(_zoo(), **batch)
    torch.manual_seed(0)
    from_name = apply_init(_zoo(), option, **batch)
    for a, b in zip(from_yaml.parameters(), from_name.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("option", OPTIONS)
def test_the_init_node_of_older_run_configs_still_builds_the_same_scheme(option):
    """Run configs saved before one class per scheme hold ``{_target_: cvarch.init.apply_init, _partial_:
    true, scheme: <option>, <options>}``; built, that node still applies the scheme its YAML now builds."""
    node = OmegaConf.load(Path(CONFIG_DIR) / "init" / f"{option}.yaml")
    old = {"_target_": "cvarch.init.apply_init", "_partial_": True, "scheme": option}
    old.update({key: value for key, value in node.items() if key != "_target_"})
    batch = {"batch": torch.randn(16, 3, 4, 4)} if option in DATA_DRIVEN else {}
    torch.manual_seed(0)
    before = instantiate(old)(_zoo(), **batch)
    torch.manual_seed(0)
    now = instantiate(node)(_zoo(), **batch)
    for a, b in zip(before.parameters(), now.parameters(), strict=True):
        assert torch.equal(a, b)


def test_training_gives_a_data_driven_init_the_first_preprocessed_training_batch(compose_tmp, monkeypatch):
    seen = []
    fit = LSUV.fit
    monkeypatch.setattr(LSUV, "fit", lambda self, model, batch: seen.append(batch) or fit(self, model, batch))
    cvarch.train(compose_tmp("debug=fdr", "logger=none", "init=lsuv", "data.batch_size=32"))
    (batch,) = seen
    assert batch.shape == (32, 1, 8, 8) and batch.dtype == torch.float32  # digits, as the model sees them
    assert abs(batch.mean().item()) < 0.5 and 0.5 < batch.std().item() < 2  # standardized by preprocess


def test_default_changes_nothing():
    model = _zoo()
    before = [p.clone() for p in model.parameters()]
    assert apply_init(model) is model
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize(
    ("layer", "options", "std"),
    [
        (nn.Linear(1000, 500), {"scheme": "normal"}, 0.01),
        (nn.Linear(1000, 500), {"scheme": "xavier", "mode": "fan_in", "distribution": "normal"}, 1000**-0.5),
        (
            nn.Linear(1000, 500),
            {"scheme": "xavier", "mode": "fan_avg", "distribution": "normal"},
            (2 / 1500) ** 0.5,
        ),
        (nn.Linear(1000, 500), {"scheme": "xavier"}, (2 / 1500) ** 0.5),
        (nn.Conv2d(64, 128, 3), {"scheme": "xavier", "mode": "fan_out", "gain": 2.0}, 2 * (128 * 9) ** -0.5),
        (nn.Linear(1000, 500), {"scheme": "kaiming"}, (2 / 1000) ** 0.5),
        (nn.Conv2d(64, 128, 3), {"scheme": "kaiming"}, (2 / (64 * 9)) ** 0.5),
        (nn.Conv2d(64, 128, 3), {"scheme": "kaiming", "mode": "fan_out"}, (2 / (128 * 9)) ** 0.5),
        (nn.Conv2d(64, 128, 3), {"scheme": "kaiming", "distribution": "uniform"}, (2 / (64 * 9)) ** 0.5),
        (nn.Linear(1000, 500), {"scheme": "kaiming", "nonlinearity": "tanh"}, 5 / 3 * 1000**-0.5),
    ],
)
def test_weight_std_matches_formula(layer, options, std):
    w = _init(layer, **options).weight
    assert w.std().item() == pytest.approx(std, rel=0.03)
    assert abs(w.mean().item()) < 0.05 * std


def test_uniform_modes_stay_inside_their_bound():
    w = _init(nn.Linear(1000, 500), "xavier").weight  # Glorot eq. (16): U(±√(6/(fan_in+fan_out)))
    bound = math.sqrt(6 / 1500)
    assert w.abs().max().item() <= bound
    assert w.abs().max().item() > 0.99 * bound


def test_orthogonal_square_layer():
    w = _init(nn.Linear(256, 256), "orthogonal").weight
    assert torch.allclose(w.T @ w, torch.eye(256), atol=1e-4)
    w = _init(nn.Linear(256, 256), "orthogonal", gain=2.0).weight
    assert torch.allclose(w.T @ w, 4 * torch.eye(256), atol=1e-3)


def test_constant_init_makes_every_hidden_unit_identical():
    """The symmetry problem on a real forward/backward: equal weights → equal activations and gradients."""
    model = cvarch.build_model(
        "model=mlp", "model.depth=3", "model.width=32", "init=constant", "init.value=0.01"
    )
    acts = []
    for block in model.hidden:
        block.act.register_forward_hook(lambda m, i, o: acts.append(o))
    torch.manual_seed(0)
    x = torch.randn(8, 64)
    out = model(x)
    ((out - torch.randn_like(out)) ** 2).mean().backward()
    for a in acts:
        assert torch.allclose(a, a[:, :1].expand_as(a))
        assert a.abs().max() > 0
    for block in model.hidden:
        g = block.fc.weight.grad
        assert g.abs().max() > 0
        assert torch.allclose(g, g[:1].expand_as(g), rtol=1e-5, atol=1e-12)


def test_zero_init_last_zeroes_the_last_norm_of_each_resnet_block():
    model = cvarch.build_model("model=resnet20", "init=kaiming", "init.zero_init_last=true")
    blocks = [m for m in model.modules() if hasattr(m, "zero_init_last")]
    assert len(blocks) == 9  # ResNet-20: 3 stages × 3 basic blocks
    for block in blocks:
        assert torch.all(block.bn2.weight == 0)
        assert torch.all(block.bn1.weight == 1)
    plain = cvarch.build_model("model=resnet20", "init=kaiming")
    assert all(torch.all(m.bn2.weight == 1) for m in plain.modules() if hasattr(m, "zero_init_last"))


def test_lsuv_gives_unit_output_variance_on_its_batch():
    torch.manual_seed(0)
    overrides = ("model=resnet20", "norm=none", "data.channels=3", "data.image_size=32", "init=orthogonal")
    model = cvarch.build_model(*overrides)
    batch = torch.randn(32, 3, 32, 32)
    apply_init(model, "lsuv", batch=batch, tol=0.1)
    outputs = {}
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for m in layers:
        m.register_forward_hook(lambda m, i, o: outputs.__setitem__(m, o.var().item()))
    with torch.no_grad():
        logits = model(batch)
    assert logits.shape == (32, cvarch.compose(*overrides).model.num_classes) and torch.isfinite(logits).all()
    assert len(outputs) == len(layers)
    assert all(abs(v - 1) < 0.1 for v in outputs.values()), outputs


def test_lsuv_without_batch_and_bad_options_raise():
    with pytest.raises(ValueError, match=r"init=lsuv is data-driven: a batch is required"):
        apply_init(nn.Linear(2, 2), "lsuv")
    with pytest.raises(ValueError, match=r"init='nope' is not one of .*kaiming"):
        apply_init(nn.Linear(2, 2), "nope")
    with pytest.raises(ValueError, match=r"init\.std .*valid: \['distribution', 'gain', 'mode'"):
        apply_init(nn.Linear(2, 2), "xavier", std=1.0)
    with pytest.raises(ValueError, match=r"init\.mode='fan_avg'.*\['fan_in', 'fan_out'\]"):
        apply_init(nn.Linear(2, 2), "kaiming", mode="fan_avg")
    with pytest.raises(ValueError, match=r"init\.distribution='gauss'.*\['normal', 'uniform'\]"):
        apply_init(nn.Linear(2, 2), "xavier", distribution="gauss")
    with pytest.raises(ValueError, match=r"init\.nonlinearity='swish'"):
        apply_init(nn.Linear(2, 2), "kaiming", nonlinearity="swish")


def _layer10(*overrides: str) -> torch.Tensor:
    """Activations of hidden layer 10 of the lecture's 10 × 500 MLP on unit-Gaussian input 1000 × 500."""
    torch.manual_seed(0)
    model = cvarch.build_model("model=mlp", "model.in_features=500", *overrides)
    acts = []
    for block in model.hidden:
        block.act.register_forward_hook(lambda m, i, o: acts.append(o))
    with torch.no_grad():
        model(torch.randn(1000, 500))
    assert len(acts) == 10
    return acts[-1]


def test_lecture_small_random_tanh_activations_collapse_to_zero():
    assert _layer10("model.act_layer=tanh", "init=normal", "init.std=0.01").std() < 1e-4


def test_lecture_unit_random_tanh_saturates():
    a = _layer10("model.act_layer=tanh", "init=normal", "init.std=1.0")
    assert (a.abs() > 0.95).float().mean() > 0.5


def test_lecture_xavier_tanh_keeps_a_reasonable_scale():
    a = _layer10("model.act_layer=tanh", "init=xavier", "init.mode=fan_in", "init.distribution=normal")
    assert 0.1 < a.std() < 0.5


def test_lecture_xavier_relu_activations_decay():
    a = _layer10("model.act_layer=relu", "init=xavier", "init.mode=fan_in", "init.distribution=normal")
    assert a.std() < 0.1  # post-ReLU: each layer halves the variance


def test_lecture_kaiming_relu_keeps_the_scale():
    assert 0.4 < _layer10("model.act_layer=relu", "init=kaiming").std() < 1.5


def _correlated_images(n: int, seed: int) -> torch.Tensor:
    """Standardized-looking images whose neighbouring pixels and channels are correlated, as photos are."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 34, 34, generator=g)
    x = F.avg_pool2d(x, 3, stride=1)  # (n, 3, 32, 32): spatially smooth
    return x + 0.8 * x[:, :1]  # channels share a component (grey)


def _stem_moment(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Second moment of the stem's outputs (bias removed) over every 2×2 patch of ``x``: the covariance the
    whitening is fitted to (airbench: uncentred)."""
    z = model.whiten(x) - model.whiten.bias.view(1, -1, 1, 1)
    z = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double()
    return z.T @ z / len(z)


def test_patch_whitening_makes_the_stems_patch_covariance_the_identity_on_other_training_images():
    """Jordan 2024 §3.2: the stem's 12 eigen-filters whiten 2×2 patches; on images it was not fitted on the
    covariance of their outputs is I, and the 12 negated filters give −I against them."""
    model = cvarch.build_model("model=speedrun", "data.channels=3", "data.image_size=32")
    apply_init(model, "patch_whitening", batch=_correlated_images(256, seed=0), eps=1e-9)
    moment = _stem_moment(model, _correlated_images(256, seed=1))
    eye = torch.eye(12, dtype=torch.float64)
    assert (moment[:12, :12] - eye).abs().max() < 0.05
    assert (moment[12:, :12] + eye).abs().max() < 0.05  # the negatives
    assert not model.whiten.weight.requires_grad and torch.all(model.whiten.bias == 0)


def test_patch_whitening_scales_each_eigen_direction_by_one_over_root_lambda_plus_eps():
    """With the default ε the variance along eigenvector i is λ_i / (λ_i + ε) on the fitting batch itself."""
    batch = _correlated_images(128, seed=2)
    model = cvarch.build_model("model=speedrun", "data.channels=3", "data.image_size=32")
    eps = 0.05
    apply_init(model, "patch_whitening", batch=batch, eps=eps)
    eigenvalues, _ = patch_eigens(batch, (2, 2))
    moment = _stem_moment(model, batch)[:12, :12]
    assert torch.allclose(moment, torch.diag(eigenvalues / (eigenvalues + eps)), atol=1e-6)


def test_patch_whitening_keeps_the_leading_components_of_a_narrower_conv_and_refuses_other_widths():
    x = _correlated_images(64, seed=3)
    narrow = nn.Sequential(nn.Conv2d(3, 5, 2), nn.ReLU())  # 5 of the 12 components: truncated PCA whitening
    apply_init(narrow, "patch_whitening", batch=x, eps=1e-9)
    z = narrow[0](x).detach().permute(0, 2, 3, 1).reshape(-1, 5).double()
    assert torch.allclose(z.T @ z / len(z), torch.eye(5, dtype=torch.float64), atol=1e-4)
    with pytest.raises(ValueError, match=r"first conv '0' has 16 outputs.*at most 12 outputs, or exactly 24"):
        apply_init(nn.Sequential(nn.Conv2d(3, 16, 2)), "patch_whitening", batch=x)
    with pytest.raises(ValueError, match=r"init=patch_whitening is data-driven: a batch is required"):
        apply_init(nn.Sequential(nn.Conv2d(3, 12, 2)), "patch_whitening")
    with pytest.raises(ValueError, match=r"has no Conv2d"):
        apply_init(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2)), "patch_whitening", batch=x)
