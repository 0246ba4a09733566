"""cvarch.profile against the lecture's numbers (CS231n 2017 lecture 9): the VGG16 table row by row,
AlexNet's CONV1/POOL1, the Inception module's cost, receptive fields, GoogLeNet vs AlexNet, and what the CLI
writes. The counting rules on hand-built nets are tested in test_cost.py."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cvarch
from cvarch.cost import Profile, Row, Totals, profile_model, write_profile
from tests.conftest import report, run_main
from tests.lecture import googlenet_alexnet_param_ratio, inception_module_macs, profile
from tests.test_cost import stack

ROOT = Path(__file__).resolve().parents[1]
META = "measure_memory=false"

# The lecture's VGG16 table: (output C, H, W), activations, weights without biases; the input row first.
VGG16_TABLE = [
    ((3, 224, 224), 150_528, 0),
    ((64, 224, 224), 3_211_264, 1_728),
    ((64, 224, 224), 3_211_264, 36_864),
    ((64, 112, 112), 802_816, 0),
    ((128, 112, 112), 1_605_632, 73_728),
    ((128, 112, 112), 1_605_632, 147_456),
    ((128, 56, 56), 401_408, 0),
    ((256, 56, 56), 802_816, 294_912),
    ((256, 56, 56), 802_816, 589_824),
    ((256, 56, 56), 802_816, 589_824),
    ((256, 28, 28), 200_704, 0),
    ((512, 28, 28), 401_408, 1_179_648),
    ((512, 28, 28), 401_408, 2_359_296),
    ((512, 28, 28), 401_408, 2_359_296),
    ((512, 14, 14), 100_352, 0),
    ((512, 14, 14), 100_352, 2_359_296),
    ((512, 14, 14), 100_352, 2_359_296),
    ((512, 14, 14), 100_352, 2_359_296),
    ((512, 7, 7), 25_088, 0),
    ((4096,), 4_096, 102_760_448),
    ((4096,), 4_096, 16_777_216),
    ((1000,), 1_000, 4_096_000),
]


@pytest.fixture(scope="module")
def vgg16() -> Profile:
    return profile("model=vgg16", "data.channels=3", "data.num_classes=1000", "data.image_size=224", META)


def test_vgg16_rows_are_the_lecture_table(vgg16):
    got = [(r.shape, r.activations, r.params_no_bias) for r in vgg16.rows]
    assert got == VGG16_TABLE
    assert [r.type for r in vgg16.rows[1:]] == [
        "Conv2d" if w and len(s) == 3 else "Linear" if w else "MaxPool2d" for s, _, w in VGG16_TABLE[1:]
    ]
    assert vgg16.totals.params == 138_357_544
    assert vgg16.totals.params_no_bias == sum(w for *_, w in VGG16_TABLE)


def test_vgg16_activation_totals_are_summed_not_quoted(vgg16):
    table_sum = sum(n for _, n, _ in VGG16_TABLE)
    t = vgg16.totals
    assert t.activations_with_input == table_sum == 15_237_608
    assert t.activations == table_sum - 150_528
    assert t.activations_with_input_mb == pytest.approx(table_sum * 4 / 1e6)
    assert t.train_memory_estimate_mb == pytest.approx((2 * table_sum * 4 + 3 * 138_357_544 * 4) / 1e6)
    report(
        f"VGG16 224×224 forward activations: {t.activations_with_input:,} with input "
        f"({t.activations_with_input_mb:.1f} MB fp32), {t.activations:,} without "
        f"({t.activations_mb:.1f} MB); lecture: 24M ≈ 96 MB"
    )


def test_vgg16_receptive_fields(vgg16):
    convs = [r for r in vgg16.rows if r.type == "Conv2d"]
    assert [r.rf for r in convs] == [3, 5, 10, 14, 24, 32, 40, 60, 76, 92, 132, 164, 196]
    pool5 = vgg16.row("features.30")
    assert (pool5.rf, pool5.jump) == (212, 32)  # the conv stack's output (conv5_3 + pool5): 212
    assert vgg16.totals.flops == vgg16.totals.flops_counter == 2 * vgg16.totals.macs


def test_lecture_alexnet_conv1_and_pool1():
    p = profile("model=alexnet", "data.channels=3", "data.num_classes=1000", "data.image_size=227", META)
    conv1, pool1 = p.row("features.0"), p.row("features.2")
    assert (conv1.shape, conv1.params_no_bias, conv1.params) == ((96, 55, 55), 34_848, 34_944)
    assert (pool1.shape, pool1.params) == ((96, 27, 27), 0)
    rfs = [(r.rf, r.jump) for r in p.rows if r.type in ("Conv2d", "MaxPool2d")]
    # CONV1 POOL1 CONV2 POOL2 CONV3 CONV4 CONV5 POOL3
    assert rfs == [(11, 4), (19, 8), (51, 8), (67, 16), (99, 16), (131, 16), (163, 16), (195, 32)]
    assert [r.type for r in p.rows].count("LocalResponseNorm") == 2  # NORM1, NORM2: rows, 0 parameters
    assert p.totals.params == 62_378_344


def test_inception_module_naive_and_reduced_costs():
    naive = profile("model=inception_module", "data.channels=256", "data.image_size=28", META)
    assert naive.totals.output_shape == (672, 28, 28)
    lecture_terms = 28 * 28 * 128 * 256 + 28 * 28 * 192 * 9 * 256 + 28 * 28 * 96 * 25 * 256
    assert naive.totals.macs == inception_module_macs("naive") == lecture_terms == 854_196_224
    reduced = inception_module_macs("reduced")
    three_by_three = 28 * 28 * 192 * 9 * 64
    assert reduced == 271_351_808
    assert reduced + three_by_three == 358_055_936  # the lecture's "358M" counts the 3×3 conv twice
    report(
        f"Inception module 28×28×256: naive {naive.totals.macs:,} MACs, reduced {reduced:,} (lecture 358M)"
    )


def test_googlenet_vs_alexnet_parameters():
    got = googlenet_alexnet_param_ratio()
    assert got["alexnet"] == 62_378_344
    assert got["googlenet"] == 6_998_552
    assert got["ratio"] == pytest.approx(
        8.913, abs=1e-3
    )  # not the lecture's 12×: that is 60M vs Inception-v3 §1's 5M
    report(f"AlexNet / GoogLeNet parameters: {got['alexnet']:,} / {got['googlenet']:,} = {got['ratio']:.2f}")


def test_csv_has_one_line_per_row(tmp_path):
    p = profile_model(stack(2, 4), (4, 8, 8))
    assert write_profile(p, tmp_path, "table") is None
    with write_profile(p, tmp_path, "csv").open() as f:
        lines = list(csv.DictReader(f))
    assert [(line["name"], line["shape"], int(line["rf"])) for line in lines] == [
        ("input", "4x8x8", 1),
        ("0", "4x8x8", 3),
        ("2", "4x8x8", 5),
    ]


@pytest.mark.slow
def test_cli_writes_json_with_the_schema(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cvarch.profile",
            "model=resnet20",
            "output=json",
            f"paths.log_dir={tmp_path}",
        ],
        cwd=ROOT,
        env={**os.environ, "HYDRA_FULL_ERROR": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    output_dir = Path(proc.stdout.strip().splitlines()[-1])
    assert output_dir.is_relative_to(tmp_path)
    data = json.loads((output_dir / "profile.json").read_text())
    assert set(data) == {"model", "batch_size", "dtype", "rows", "totals"}
    assert set(data["totals"]) == set(Totals.__dataclass_fields__)
    assert all(set(row) == set(Row.__dataclass_fields__) for row in data["rows"])
    assert data["totals"]["input_shape"] == [
        1,
        32,
        32,
    ]  # digits: 1 channel; no image_size: 32 for a CIFAR net
    assert data["totals"]["params"] == 269_434  # He et al. 2015 §4.2: 0.27M
    assert data["totals"]["measured_peak_mb"] > 0


def test_the_measured_memory_is_set_beside_the_estimate_of_the_same_things(capsys):
    """The estimate counts weights, gradients and momentum; the measurement (forward + backward, no step,
    above the weights) only activations and gradients: the printout compares like with like."""
    from cvarch.profile import print_table

    prof = profile("model=resnet20", "data.channels=3")
    print_table(prof)
    t = prof.totals
    same = t.train_memory_estimate_mb - 2 * t.params * 4 / 1e6  # less the weights and the momentum
    out = " ".join(capsys.readouterr().out.split())
    assert f"measured {t.measured_peak_mb:,.1f} MB above the weights" in out
    assert f"against {same:,.1f} MB estimated for the same (2 × activations + gradients)" in out
    assert 0.5 < t.measured_peak_mb / same < 1.5  # they count the same things


def test_default_input_is_the_models_native_size():
    """Without data.image_size, each net is profiled at its native size (VGG16 accepts 32×32 too, but is
    224)."""
    sizes = {
        name: profile(f"model={name}", "data.channels=3", "measure_memory=false").totals.input_shape
        for name in ("vgg16", "alexnet", "resnet20")
    }
    assert sizes == {"vgg16": (3, 224, 224), "alexnet": (3, 227, 227), "resnet20": (3, 32, 32)}


def test_a_bad_image_size_is_named_before_any_model_is_built():
    from cvarch.config import ConfigError
    from cvarch.profile import run

    with pytest.raises(ConfigError, match=r"data.image_size: a side in pixels .*got 'abc'"):
        run(cvarch.compose("model=resnet20", "data.image_size=abc", config_name="profile"))
    cli = run_main("cvarch-profile", "model=resnet20", "data.image_size=abc")  # the message, no traceback
    assert cli.returncode == 1 and "Traceback" not in cli.stderr
    assert "cvarch-profile: invalid config:\n  data.image_size: a side in pixels" in cli.stderr
