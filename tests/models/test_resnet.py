"""ResNet family: the paper's CIFAR parameter counts and torchvision equality for the ImageNet settings."""

from __future__ import annotations

import pytest
import torch
from torchvision import models as tvm

import cvarch
from cvarch.models.resnet import (
    BLOCKS,
    BasicBlock,
    PlainBlock,
    PreActBasicBlock,
    PreActBottleneck,
    ResNet,
    ZeroPadShortcut,
)


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet20_matches_he_2015_table_6():
    model = cvarch.build_model("model=resnet20", "data.channels=3")  # CIFAR: RGB input
    assert params(model) == pytest.approx(0.27e6, rel=0.02)  # He et al. 2015 Table 6: 0.27M
    assert params(model) == 269_722  # the widely reproduced exact count (option-A shortcuts have no weights)
    n = len([m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))])
    assert n == 20  # 6n+2 weighted layers
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    digits = cvarch.build_model("model=resnet20")  # the default run: 1-channel 8×8 digits
    assert params(model) - params(digits) == 3 * 3 * 2 * 16  # only conv1's input channels differ
    assert digits(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize(("layers", "paper"), [([5, 5, 5], 0.46e6), ([7, 7, 7], 0.66e6), ([9, 9, 9], 0.85e6)])
def test_cifar_resnets_are_settings_of_the_same_class(layers, paper):
    model = ResNet("basic", layers, [16, 32, 64], stem="cifar", shortcut="A", num_classes=10)
    assert params(model) == pytest.approx(paper, rel=0.02)  # He et al. 2015 Table 6


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("resnet18", dict(block="basic", layers=[2, 2, 2, 2])),
        ("resnet50", dict(block="bottleneck", layers=[3, 4, 6, 3])),
        ("resnext50_32x4d", dict(block="bottleneck", layers=[3, 4, 6, 3], groups=32, width_per_group=4)),
    ],
)
def test_imagenet_settings_equal_torchvision(name, kwargs):
    torch.manual_seed(0)
    reference = getattr(tvm, name)(weights=None).eval()
    ours = ResNet(**kwargs).eval()
    assert params(ours) == params(reference)
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - reference(x)).abs().max() <= 1e-5


def test_norm_group_fills_every_norm_slot():
    with_bn = cvarch.build_model("norm=batchnorm")
    without = cvarch.build_model("norm=none")
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in with_bn.modules())
    assert n_bn == 19  # stem + 2 per block × 9 blocks
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in without.modules())
    assert params(with_bn) - params(without) == 2 * (16 + 6 * 16 + 6 * 32 + 6 * 64)


def test_zero_init_residual_makes_every_block_start_as_identity():
    model = ResNet("basic", [1, 1, 1], [16, 32, 64], stem="cifar", shortcut="A", zero_init_residual=True)
    assert all(
        float(b.bn2.weight.detach().abs().sum()) == 0
        for b in [model.layer1[0], model.layer2[0], model.layer3[0]]
    )


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="model.block='triple'"):
        ResNet("triple")
    with pytest.raises(ValueError, match="differ in length"):
        ResNet("basic", [1, 1], [16, 32, 64])


# --- Every variant as a config: the paper's and torchvision's numbers through the public API ----------------

IMAGENET = {  # torchvision 0.29 parameter counts (He 2015 Table 1; Zagoruyko 2016; Xie 2016 Table 1)
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "wide_resnet50_2": 68_883_240,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336,
}
FAST_IMAGENET = ("resnet18", "resnet34", "resnext50_32x4d")


def imagenet_param(name: str):
    return name if name in FAST_IMAGENET else pytest.param(name, marks=pytest.mark.slow)


@pytest.mark.parametrize("name", [imagenet_param(n) for n in IMAGENET])
def test_imagenet_config_equals_torchvision(name):
    torch.manual_seed(0)
    reference = getattr(tvm, name)(weights=None).eval()
    ours = cvarch.build_model(f"model={name}", "data.num_classes=1000", "data.channels=3").eval()
    assert params(ours) == params(reference) == IMAGENET[name]
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)  # adaptive pooling: any input ≥ 32 works; the natural size is 224
    with torch.no_grad():
        assert (ours(x) - reference(x)).abs().max() <= 1e-5


CIFAR = {  # paper parameter counts: He 2015 Table 6; He 2016 Table 2/3; Zagoruyko 2016; Xie 2016 Table 7
    "resnet20": 0.27e6,
    "resnet32": 0.46e6,
    "resnet44": 0.66e6,
    "resnet56": 0.85e6,
    "resnet110": 1.7e6,
    "resnet1202": 19.4e6,
    "plain20": 0.27e6,  # plain nets have the weights of their option-A ResNets (Fig. 6)
    "plain32": 0.46e6,
    "plain44": 0.66e6,
    "plain56": 0.85e6,
    "preact_resnet110": 1.7e6,
    "preact_resnet164": 1.7e6,
    "wrn16_4": 2.7e6,
    "wrn16_8": 11.0e6,
    "wrn28_10": 36.5e6,
    "wrn40_4": 8.9e6,
    "resnext29_8x64d": 34.4e6,
    "resnext29_16x64d": 68.1e6,
}
SLOW_CIFAR = ("resnet1202", "wrn16_8", "wrn28_10", "resnext29_8x64d", "resnext29_16x64d")


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_CIFAR else n for n in CIFAR]
)
def test_cifar_config_matches_paper_count_and_takes_32x32(name):
    model = cvarch.build_model(f"model={name}", "data.channels=3", "data.image_size=32").eval()
    assert params(model) == pytest.approx(CIFAR[name], rel=0.02)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_cifar_depths_are_6n_plus_2_and_164_is_9n_plus_2():
    def weighted(model):
        return sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())

    assert weighted(cvarch.build_model("model=resnet110")) == 110  # option A: no projection convs
    assert weighted(cvarch.build_model("model=plain56")) == 56
    assert weighted(cvarch.build_model("model=preact_resnet164")) == 164 + 3  # + 3 projection shortcuts
    assert weighted(cvarch.build_model("model=wrn16_4")) == 16 + 1  # 6N+4 counts 2 of its 3 projections


def test_shortcut_b_adds_exactly_the_projections():
    a = cvarch.build_model("model=resnet20", "data.channels=3")
    b = cvarch.build_model("model=resnet20", "data.channels=3", "model.shortcut=B")
    assert params(b) - params(a) == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)  # two 1×1 convs + their BN
    assert isinstance(a.layer2[0].downsample, ZeroPadShortcut)


# --- Plain nets (He 2015 Fig. 6) ----------------------------------------------------------------------------


def test_plain_nets_have_no_shortcut():
    plain = cvarch.build_model("model=plain20")
    residual = cvarch.build_model("model=resnet20")
    assert all(isinstance(b, PlainBlock) for b in blocks(plain))
    assert not any(hasattr(b, "downsample") for b in blocks(plain))
    for model in (plain, residual):  # a zero second conv kills a plain net's signal but not a residual one's
        for b in blocks(model):
            torch.nn.init.zeros_(b.conv2.weight)
        model.eval()
    x1, x2 = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(plain(x1), plain(x2))
        assert not torch.allclose(residual(x1), residual(x2))


def test_plain_imagenet_net_keeps_torchvision_names_without_downsample():
    plain18 = cvarch.build_model(
        "model=resnet18", "model.shortcut=none", "data.num_classes=1000", "data.channels=3"
    )
    reference = tvm.resnet18(weights=None).state_dict()
    expected = {k for k in reference if ".downsample." not in k}
    assert set(plain18.state_dict()) == expected


def test_plain_rejects_settings_that_need_a_residual_branch():
    for override in ("model.drop_path=0.1", "model.zero_init_residual=true"):
        with pytest.raises(ValueError, match="shortcut='none'"):
            cvarch.build_model("model=plain20", "+" + override)
    with pytest.raises(ValueError, match="shortcut='none'"):
        ResNet("bottleneck", [1, 1, 1], [16, 32, 64], stem="cifar", shortcut="none")


# --- Pre-activation (He 2016) -------------------------------------------------------------------------------


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [b for name in model.stage_names for b in getattr(model, name)]


def test_preact_is_one_override_of_the_same_config():
    post = cvarch.build_model("model=resnet110", "data.channels=3")
    pre = cvarch.build_model("model=resnet110", "model.preact=true", "data.channels=3")
    config = cvarch.build_model("model=preact_resnet110", "data.channels=3")
    assert all(isinstance(b, BasicBlock) for b in blocks(post))
    assert all(isinstance(b, PreActBasicBlock) for b in blocks(pre))
    assert [type(m) for m in pre.modules()] == [type(m) for m in config.modules()]
    assert params(pre) == params(config) == 1_727_962  # He 2016 Table 3: 1.7M
    # the stem's BN moves to the end: BN-ReLU after the last addition, before pooling
    assert isinstance(pre.bn1, torch.nn.Identity) and isinstance(pre.final_bn, torch.nn.BatchNorm2d)
    assert isinstance(post.bn1, torch.nn.BatchNorm2d) and isinstance(post.final_bn, torch.nn.Identity)
    assert isinstance(pre.final_relu, torch.nn.ReLU) and pre.final_bn.num_features == 64


@pytest.mark.parametrize(("block", "cls"), [("basic", PreActBasicBlock), ("bottleneck", PreActBottleneck)])
def test_preact_blocks_add_after_the_activation_post_act_blocks_before(block, cls):
    torch.manual_seed(0)
    planes = 16 if block == "basic" else 4
    pre = cls(16, planes).eval()
    post = BLOCKS[block](16, planes).eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        assert (post(x) >= 0).all()  # ReLU after the sum (He 2015 Fig. 2)
        assert (pre(x) < 0).any()  # nothing after the sum (He 2016 Fig. 4(e))
        pre.zero_init_last()
        assert torch.equal(pre(x), x)  # a clean identity path: x_{l+1} = x_l + F(x_l)


@pytest.mark.parametrize("norm", ["batchnorm", "none"])
def test_preact_shortcut_carries_the_untouched_input(norm):
    model = cvarch.build_model(
        "model=resnet20", "model.preact=true", f"norm={norm}", "model.zero_init_residual=true"
    )
    model.eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():  # norm=none makes bn1(x) be x: an in-place ReLU would clip the shortcut too
        assert torch.equal(model.layer1[1](x.clone()), x)


def test_preact_bottleneck_164():
    model = cvarch.build_model("model=preact_resnet164", "data.channels=3")
    assert all(isinstance(b, PreActBottleneck) for b in blocks(model))
    assert [getattr(model, s)[-1].conv3.out_channels for s in model.stage_names] == [64, 128, 256]
    assert params(model) == 1_703_258  # He 2016 Table 3: 1.7M


# --- Wide ResNet (Zagoruyko 2016) and ResNeXt (Xie 2016) ----------------------------------------------------


@pytest.mark.parametrize(("name", "k", "n"), [("wrn16_4", 4, 2), ("wrn40_4", 4, 6)])
def test_wrn_widens_stages_not_the_stem_and_drops_out_between_convs(name, k, n):
    model = cvarch.build_model(f"model={name}", "data.channels=3")
    assert model.conv1.out_channels == 16
    assert [len(getattr(model, s)) for s in model.stage_names] == [n, n, n]
    assert [getattr(model, s)[0].conv2.out_channels for s in model.stage_names] == [16 * k, 32 * k, 64 * k]
    assert all(isinstance(b, PreActBasicBlock) and b.dropout.p == 0.3 for b in blocks(model))
    assert (
        list(blocks(model)[0].children()).index(blocks(model)[0].dropout) == 4
    )  # bn1 relu conv1 bn2 dropout
    wider = cvarch.build_model(f"model={name}", "data.channels=3", "model.widen_factor=8")
    assert wider.layer3[0].conv2.out_channels == 64 * 8


def test_resnext29_uses_grouped_bottlenecks():
    model = cvarch.build_model("model=resnext29_8x64d", "data.channels=3")
    assert model.conv1.out_channels == 64
    first = model.layer1[0]
    assert first.conv2.groups == 8 and first.conv2.in_channels == 8 * 64 and first.conv3.out_channels == 256
    assert model.layer3[0].conv2.in_channels == 8 * 256 and model.fc.in_features == 1024
    assert params(model) == 34_426_698  # Xie 2016 Table 7: 34.4M


# --- Stochastic depth (Huang et al. 2016) -------------------------------------------------------------------

RESIDUAL_VARIANTS = [
    ["model=resnet20"],
    ["model=resnet20", "model.preact=true"],
    ["model=resnet20", "model.block=bottleneck", "model.shortcut=B"],
    ["model=resnet20", "model.block=bottleneck", "model.shortcut=B", "model.preact=true"],
    ["model=wrn16_4", "model.dropout=0"],
    ["model=resnet18"],
]


@pytest.mark.parametrize("overrides", RESIDUAL_VARIANTS, ids=lambda o: " ".join(o))
def test_drop_path_varies_in_training_and_is_the_whole_net_in_eval(overrides):
    torch.manual_seed(0)
    model = cvarch.build_model(*overrides, "model.drop_path=0.5").train()
    whole = cvarch.build_model(*overrides).train()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(whole(x), whole(x))  # control: without drop_path, training mode is deterministic
        outs = [model(x) for _ in range(4)]
        assert any(not torch.equal(outs[0], o) for o in outs[1:])
        whole.load_state_dict(model.state_dict())  # same weights and running statistics
        model.eval()
        whole.eval()
        assert torch.equal(model(x), model(x))
        assert torch.equal(model(x), whole(x))  # test time: identity + the full, unscaled branch


def test_drop_path_rates_decay_linearly_from_the_first_to_the_last_block():
    model = cvarch.build_model("model=resnet110", "model.drop_path=0.5")
    rates = [b.drop_path.p for b in blocks(model)]
    total = 54  # L residual blocks of ResNet-110
    survival = [1 - r for r in rates]  # Huang 2016 eq. (4): p_l = 1 − l/L (1 − p_L), p_L = 0.5
    assert survival == pytest.approx([1 - i / total * (1 - 0.5) for i in range(1, total + 1)])
    assert rates[-1] == pytest.approx(0.5) and rates[0] == pytest.approx(0.5 / 54)


# --- Hooks: act_layer, dropout, norm ------------------------------------------------------------------------

RESNEXT_SMALL = [
    "model=resnet20",
    "model.block=bottleneck",
    "model.shortcut=B",
    "+model.groups=4",
    "+model.width_per_group=16",
]
HOOK_VARIANTS = [*RESIDUAL_VARIANTS, ["model=plain20"], RESNEXT_SMALL]


@pytest.mark.parametrize("overrides", HOOK_VARIANTS, ids=lambda o: " ".join(o))
def test_act_layer_replaces_every_relu(overrides):
    relu = cvarch.build_model(*overrides)
    gelu = cvarch.build_model(*overrides, "model.act_layer=gelu")
    n_relu = sum(isinstance(m, torch.nn.ReLU) for m in relu.modules())
    assert n_relu == len(blocks(relu)) + 1  # one per block + the stem's (post-act) or the final one (pre-act)
    assert not any(isinstance(m, torch.nn.ReLU) for m in gelu.modules())
    assert sum(isinstance(m, torch.nn.GELU) for m in gelu.modules()) == n_relu


@pytest.mark.parametrize("overrides", HOOK_VARIANTS, ids=lambda o: " ".join(o))
def test_dropout_sits_in_every_block(overrides):
    model = cvarch.build_model(*overrides, "model.dropout=0.25")
    assert all(b.dropout.p == 0.25 for b in blocks(model))
    x = torch.randn(2, 1, 8, 8)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize("overrides", HOOK_VARIANTS, ids=lambda o: " ".join(o))
def test_norm_group_fills_every_slot_of_every_variant(overrides):
    model = cvarch.build_model(*overrides, "norm=groupnorm", "norm.groups=8")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    bare = cvarch.build_model(*overrides, "norm=none")
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)) for m in bare.modules())
    assert bare(torch.randn(2, 1, 8, 8)).shape == (2, 10)
