"""FractalNet: the expansion rule's structure, the mean join, local and global drop-path, the CIFAR config."""

from __future__ import annotations

import pytest
import torch

import cvarch
from cvarch.models.fractalnet import FractalNet, join
from tests.conftest import report


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def convs(module: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.Conv2d) for m in module.modules())


def small(columns: int = 3, **kwargs) -> FractalNet:
    torch.manual_seed(0)
    return FractalNet(channels=[4, 8], columns=columns, num_classes=5, dropout=0.0, **kwargs)


@pytest.mark.parametrize("columns", [1, 2, 3, 4])
def test_structure_follows_the_expansion_rule(columns):
    model = small(columns)
    for block in model.blocks:
        assert convs(block) == 2**columns - 1  # f_C has 2^C − 1 convs (Larsson 2017 eq. 1)
        for c in range(columns):
            assert len(block.column_units(c)) == 2**c  # column c is a chain of 2^c convs
    deepest = model.extract_column(columns - 1)
    assert convs(deepest) == len(model.blocks) * 2 ** (columns - 1)  # B·2^(C−1)
    assert model.extract_column(0)(torch.randn(2, 3, 8, 8)).shape == (2, 5)


def test_eval_is_the_full_network_with_flat_mean_joins():
    model = small(3).eval()
    x = torch.randn(2, 3, 8, 8)
    z = x
    for block in model.blocks:  # f_3 written out by hand (Larsson 2017 Fig. 1): 2-input, then 3-input join
        a, b = block.first, block.second
        y = (a.second.conv(a.first.conv(z)) + a.conv(z)) / 2
        z = (b.second.conv(b.first.conv(y)) + b.conv(y) + block.conv(z)) / 3
        z = model.pool(z)
    expected = model.fc(torch.flatten(model.avgpool(z), 1))
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-6)
        assert torch.equal(model(x), model(x))  # no drop-path at test time


def test_train_mode_samples_a_new_subnetwork_per_call():
    model = small(3).train()
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(1)
    outputs = [model(x) for _ in range(6)]
    assert any(not torch.equal(outputs[0], y) for y in outputs[1:])
    no_drop = small(3, drop_path_local=0.0, global_fraction=0.0).train()
    assert torch.equal(no_drop(x), no_drop(x))  # BN in train mode alone is deterministic


def test_global_drop_path_runs_one_column_alone():
    model = small(3, global_fraction=1.0).train()
    x = torch.randn(2, 3, 8, 8)
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        column = model.sample_drop_path()
        torch.manual_seed(seed)
        y = model(x)
        assert torch.allclose(y, model.extract_column(column)(x), atol=1e-6)
        seen.add(column)
    assert seen == {0, 1, 2}


def test_local_drop_path_keeps_at_least_one_input():
    a, b, c = torch.zeros(3), torch.ones(3), torch.full((3,), 4.0)
    assert torch.equal(join([a, b, c]), torch.full((3,), 5 / 3))
    torch.manual_seed(0)
    for _ in range(20):
        out = join([a, b, c], drop=0.9999)  # nearly every input dropped: one survivor, never an empty mean
        assert any(torch.equal(out, t) for t in (a, b, c))
    torch.manual_seed(0)
    means = {round(float(join([a, b, c], drop=0.15)[0]), 4) for _ in range(200)}
    assert (
        means <= {0.0, 1.0, 4.0, 0.5, 2.0, 2.5, round(5 / 3, 4)}
        and round(5 / 3, 4) in means
        and len(means) > 1
    )


def test_per_block_dropout_is_a_list_setting():
    model = FractalNet(channels=[4, 8, 8], columns=2, dropout=[0.0, 0.1, 0.3])
    rates = [{m.p for m in block.modules() if isinstance(m, torch.nn.Dropout)} for block in model.blocks]
    assert rates == [{0.0}, {0.1}, {0.3}]
    with pytest.raises(ValueError, match="model.dropout"):
        FractalNet(channels=[4, 8], dropout=[0.1, 0.2, 0.3])


@pytest.mark.slow
def test_cifar_config_parameter_count():
    model = cvarch.build_model("model=fractalnet", "data.channels=3", "data.image_size=32")
    n = params(model)
    assert n == 76_106_634  # C=4, B=5, channels 64…512: 75 bias-free 3×3 convs + BN + fc
    assert convs(model) == 5 * (2**4 - 1)
    assert convs(model.extract_column(3)) == 40  # Table 1's "40 layers" is the deepest path
    twenty = cvarch.build_model("model=fractalnet20", "data.channels=3", "data.image_size=32")
    assert convs(twenty.extract_column(2)) == 20  # Table 1's "20 layers"
    assert (
        params(twenty) == 33_724_618
    )  # as osmr/imgclsmob's fractalnet_cifar10; 12.6% below the paper's figure
    report(
        f"fractalnet (B=5, C=4, 40 layers): {n:,} params; C=3 (20 layers): {params(twenty):,}; "
        "Larsson 2017 Table 1: 38.6M (20 layers), 22.9M (40 layers)"
    )
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
