"""GoogLeNet family: torchvision equality, the paper's Table 1 net, the lecture's Inception arithmetic."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision import models as tvm

import cvarch
from cvarch.models.googlenet import GoogLeNet, InceptionModule

IMAGENET = ("data.num_classes=1000", "data.channels=3")


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv_macs(model: nn.Module, x: torch.Tensor) -> list[int]:
    """Multiply-accumulates of every Conv2d for one image, measured on the real forward with hooks."""
    macs: list[int] = []

    def count(conv, args, out):
        kh, kw = conv.kernel_size
        macs.append(out[0].numel() * (conv.in_channels // conv.groups) * kh * kw)

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return macs


def weighted_depth(model: nn.Module) -> int:
    """Layers with parameters on the longest path through the traced graph (Szegedy 2014 §5 counts 22)."""
    traced = torch.fx.symbolic_trace(model.eval())
    modules = dict(traced.named_modules())
    depth: dict[torch.fx.Node, int] = {}
    for node in traced.graph.nodes:
        d = max((depth[a] for a in node.all_input_nodes), default=0)
        if node.op == "call_module" and any(True for _ in modules[node.target].parameters(recurse=False)):
            d += 1
        depth[node] = d
    return max(depth.values())


def randomize(model: nn.Module) -> nn.Module:
    """Weights and BN statistics that keep activations O(1) through 22 layers. torchvision's own init (σ=0.01)
    shrinks them to ~1e-15, which would leave the logits equal to the fc bias and the comparison vacuous."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.normal_(0, (2 / m.weight[0].numel()) ** 0.5, generator=gen)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.1, generator=gen)
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.01, 2.0, generator=gen)  # small variances make BN's ε matter
    return model


@pytest.mark.parametrize(("aux", "expected"), [(False, 6_624_904), (True, 13_004_888)])
def test_googlenet_tv_parameter_counts(aux, expected):
    model = cvarch.build_model("model=googlenet_tv", *IMAGENET, f"model.aux_logits={str(aux).lower()}")
    reference = tvm.googlenet(weights=None, aux_logits=aux, transform_input=False, init_weights=True)
    assert params(model) == params(reference) == expected  # torchvision 0.29: 6,624,904 without aux heads
    assert model.inception3a.branch3[1].conv.kernel_size == (3, 3)  # torchvision's "5×5" branch (vision#906)


@pytest.mark.slow
@pytest.mark.parametrize("aux", [False, True])
def test_googlenet_tv_loads_torchvision_weights_and_matches_its_logits(aux):
    torch.manual_seed(0)
    reference = tvm.googlenet(weights=None, aux_logits=aux, transform_input=False, init_weights=True)
    randomize(reference).eval()
    # torchvision's BasicConv2d uses BatchNorm ε=1e-3 (TF's Inception convention); the norm group sets it
    ours = cvarch.build_model("model=googlenet_tv", *IMAGENET, f"model.aux_logits={str(aux).lower()}")
    ours.load_state_dict(reference.state_dict(), strict=True)
    ours.eval()
    x = torch.randn(2, 3, 64, 64)  # adaptive pools: the smallest comfortable input
    with torch.no_grad():
        expected = reference(x)
        assert expected.std() > 0.1  # the logits carry the input, not just the fc bias
        assert (ours(x) - expected).abs().max() <= 1e-5
    for m in ours.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-5  # PyTorch's default ε
    with torch.no_grad():
        assert (ours(x) - expected).abs().max() > 1e-4  # so the comparison does see a wrong ε


@pytest.mark.slow
def test_googlenet_tv_training_outputs_match_torchvision_heads():
    torch.manual_seed(0)
    reference = randomize(
        tvm.googlenet(weights=None, aux_logits=True, transform_input=False, init_weights=True)
    )
    ours = cvarch.build_model("model=googlenet_tv", *IMAGENET)
    ours.load_state_dict(reference.state_dict(), strict=True)
    for model in (reference, ours):  # batch statistics in BN, but no random dropout masks
        model.train()
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, aux2, aux1 = reference(x)  # torchvision's namedtuple order
        out = ours(x)
    assert isinstance(out, tuple) and len(out) == 3  # ours: (logits, aux1, aux2), a plain tuple
    for a, b in zip(out, (logits, aux1, aux2), strict=True):
        assert a.shape == (2, 1000)
        assert (a - b).abs().max() <= 1e-5


def test_googlenet_as_published_table_1():
    model = cvarch.build_model("model=googlenet", *IMAGENET, "model.aux_logits=false")
    # Table 1's "params" column sums to 6,797.7K (weights only, rounded per row: it lists 1,388K for 5b, whose
    # weights are 1,443K); the convs' 5×5 weights, biases included, give 6,998,552 (+3.0%).
    assert params(model) == 6_998_552
    assert params(model) == pytest.approx(6.7977e6, rel=0.03)
    assert weighted_depth(model) == 22  # §5: 22 layers deep counting only layers with parameters
    assert (
        sum(isinstance(m, nn.LocalResponseNorm) for m in model.modules()) == 2
    )  # Fig. 3: the stem's two LRNs
    assert sum(getattr(m, "kernel_size", None) == (5, 5) for m in model.modules()) == 9  # real 5×5 convs
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model.dropout.p == 0.4 and model.fc.in_features == 1024  # Table 1: dropout 40%, linear 1024 → 1000
    with_aux = cvarch.build_model("model=googlenet", *IMAGENET)
    # §5: each head is 1×1 conv 128 (+bias), FC 2048 → 1024, linear 1024 → 1000, from 512 (4a) and 528 (4d)
    heads = sum((c * 128 + 128) + (2048 * 1024 + 1024) + (1024 * 1000 + 1000) for c in (512, 528))
    assert params(with_aux) - params(model) == heads


@pytest.mark.slow
def test_googlenet_outputs_in_training_and_eval():
    model = cvarch.build_model("model=googlenet", *IMAGENET)
    x = torch.randn(2, 3, 224, 224)
    model.train()
    out = model(x)
    assert isinstance(out, tuple) and [o.shape for o in out] == [(2, 1000)] * 3  # logits, aux1, aux2
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 1000)
    no_aux = cvarch.build_model("model=googlenet", *IMAGENET, "model.aux_logits=false").train()
    assert isinstance(no_aux(x), torch.Tensor)


def test_naive_inception_grows_depth_and_parameters():
    reduced = cvarch.build_model("model=googlenet", *IMAGENET, "model.aux_logits=false")
    naive = cvarch.build_model(
        "model=googlenet", *IMAGENET, "model.aux_logits=false", "model.inception=naive"
    )
    # the pool branch passes its input on, so channels accumulate: 192 + Σ(#1×1 + #3×3 + #5×5) over 3a…5b
    assert naive.fc.in_features == 192 + 1712 + 1792 + 1248 == 4944
    assert params(naive) == 97_526_008 > 13 * params(reduced)
    assert weighted_depth(naive) == 13  # 3 stem convs + 1 per module + the classifier


def test_inception_module_costs_of_the_lecture():
    x = torch.randn(1, 256, 28, 28)
    naive = cvarch.build_model("model=inception_module")  # in_channels 256 is fixed by the config
    reduced = cvarch.build_model("model=inception_module", "model.inception=reduced")
    assert naive(x).shape == (1, 128 + 192 + 96 + 256, 28, 28) == (1, 672, 28, 28)
    assert reduced(x).shape == (1, 128 + 192 + 96 + 64, 28, 28) == (1, 480, 28, 28)

    assert conv_macs(naive, x) == [28 * 28 * 128 * 256, 28 * 28 * 192 * 9 * 256, 28 * 28 * 96 * 25 * 256]
    assert sum(conv_macs(naive, x)) == 854_196_224  # the lecture's ≈854M ops

    macs = conv_macs(reduced, x)  # branch order: 1×1 128; 1×1 64 → 3×3 192; 1×1 64 → 5×5 96; pool → 1×1 64
    on_256, on_64 = 28 * 28 * 256, 28 * 28 * 64
    assert macs == [on_256 * 128, on_256 * 64, on_64 * 192 * 9, on_256 * 64, on_64 * 96 * 25, on_256 * 64]
    assert sum(macs) == 271_351_808
    # The lecture's "358M" lists the same six convs but its total counts the 3×3 conv (86.7M) twice.
    assert sum(macs) + macs[2] == pytest.approx(358e6, rel=0.001)

    assert params(naive) == 1_089_952 > params(reduced) == 346_720  # bottlenecks cut weights 3.1×


def test_inception_module_is_the_one_googlenet_uses():
    model = cvarch.build_model("model=googlenet", *IMAGENET, "model.aux_logits=false")
    assert isinstance(model.inception3a, InceptionModule) and model.inception3a.out_channels == 256


def test_bad_settings_are_named():
    widths = {name: [1, 1, 1, 1, 1, 1] for name in ("3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b")}
    with pytest.raises(ValueError, match="model.inception='fancy'"):
        GoogLeNet(widths, inception="fancy")
    with pytest.raises(ValueError, match="model.conv_block='bnrelu'"):
        GoogLeNet(widths, conv_block="bnrelu")
    with pytest.raises(ValueError, match="model.inception_widths has modules"):
        GoogLeNet({k: v for k, v in widths.items() if k != "5b"})
