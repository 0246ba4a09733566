"""cvarch.lecture (``cvarch-lecture``): every number of the slides gets a verdict computed from the real
models; the known errata come out wrong with the corrected value, and the rest reproduce."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cvarch.lecture import (
    PUBLISHED,
    REPRODUCED,
    ROUNDED,
    SECTIONS,
    VERDICTS,
    WRONG,
    Row,
    check,
    judge,
    markdown,
    parse_said,
)
from tests.conftest import run_main

# one check of every section serves the tests below (it builds ~20 models on the meta device)
pytestmark = pytest.mark.xdist_group("lecture")


@pytest.fixture(scope="module")
def rows() -> list[Row]:
    return check()


def find(rows: list[Row], section: str, slide: str) -> Row:
    found = [r for r in rows if r.section == section and r.slide == slide] or [
        r for r in rows if r.section == section and r.slide.startswith(slide)
    ]
    assert len(found) == 1, (section, slide, found)
    return found[0]


@pytest.mark.parametrize(
    "said, value, verdict",
    [
        ("1,728", 1_728, REPRODUCED),
        ("55", 55, REPRODUCED),
        ("35K", 34_848, ROUNDED),  # (11·11·3)·96
        ("3.2M", 3_211_264, ROUNDED),
        ("800K", 802_816, ROUNDED),  # trailing zeros are not significant: 8×10⁵ to one digit
        ("150K", 150_528, ROUNDED),
        ("3.2M", 3_300_000, WRONG),
        ("24M", 15_237_608, WRONG),
        ("0.000000", 3e-7, ROUNDED),
        ("12", 8.9, WRONG),
        ("50x", 49.97, ROUNDED),
        ("5 million", 6_998_552, WRONG),
    ],
)
def test_judge_reads_the_slides_digits(said, value, verdict):
    assert judge(value, said) == verdict


def test_parse_said_gives_half_the_last_significant_digit():
    assert parse_said("3.2M") == (3.2e6, pytest.approx(5e4))
    assert parse_said("800K") == (8e5, 5e4)
    assert parse_said("1,728") == (1728, 0.5)
    assert parse_said("96MB") == (96, 0.5)  # megabytes, not a million
    with pytest.raises(ValueError, match="no number"):
        parse_said("early CONV")


def test_every_row_has_a_verdict_and_the_ones_that_need_it_a_note(rows):
    assert {r.verdict for r in rows} <= set(VERDICTS)
    assert [r.section for r in rows] == sorted((r.section for r in rows), key=list(SECTIONS).index)
    assert set(r.section for r in rows) == set(SECTIONS)  # every slide group has its numbers
    assert all(r.note for r in rows if r.verdict in (WRONG, PUBLISHED)), [
        r for r in rows if r.verdict in (WRONG, PUBLISHED) and not r.note
    ]


def test_the_known_errata_are_wrong_with_the_corrected_value(rows):
    memory = find(rows, "vgg16", "TOTAL memory: 24M")
    assert (memory.verdict, memory.found) == (WRONG, "15,237,608")
    mb = find(rows, "vgg16", "TOTAL memory: 24M * 4 bytes")
    assert (mb.verdict, mb.found) == (WRONG, "61.0 MB")
    bottleneck = find(rows, "inception", "Total: 358M ops")
    assert (bottleneck.verdict, bottleneck.found) == (WRONG, "271,351,808")
    assert "86,704,128 counted twice (358,055,936)" in bottleneck.note
    ratio = find(rows, "googlenet", "12x less params than AlexNet")
    assert (ratio.verdict, ratio.found) == (WRONG, "8.9×")
    five = find(rows, "googlenet", "Only 5 million parameters")
    assert (five.verdict, five.found) == (WRONG, "6,998,552")
    he = find(rows, "init", "He et al.: W = np.random.randn(fan_in, fan_out) / np.sqrt(2/fan_in)")
    assert he.verdict == WRONG and float(he.found) > 1e6  # the code as written explodes
    assert find(rows, "init", "He, ReLU: hidden layer 10").verdict == REPRODUCED  # the paper's formula
    assert [r.slide for r in rows if r.verdict == WRONG] == [
        "TOTAL memory: 24M",
        "TOTAL memory: 24M * 4 bytes ~= 96MB / image",
        "TOTAL memory: ... (only forward! ~*2 for bwd)",  # measured: 1.1× on PyTorch
        "Only 5 million parameters!",
        "12x less params than AlexNet",
        "Total: 358M ops",
        "He et al.: W = np.random.randn(fan_in, fan_out) / np.sqrt(2/fan_in): layer-10 std",
    ]


def test_the_rest_reproduce(rows):
    counts = {v: sum(r.verdict == v for r in rows) for v in VERDICTS}
    assert counts[REPRODUCED] >= 30 and counts[ROUNDED] >= 20, counts
    for section, slide, found in [
        ("alexnet", "CONV1: 96 11x11 filters at stride 4", "55×55×96"),
        ("alexnet", "8 layers (AlexNet)", "8"),
        ("vgg16", "effective receptive field of three 3x3", "7"),
        ("ilsvrc", "GoogLeNet: layers", "22"),
        ("googlenet", "22 layers", "22"),
        ("inception", "Q3: output size after filter concatenation", "28×28×672"),
        ("inception", "with 1x1 conv bottlenecks: 28x28x192x3x3x64", "86,704,128"),
        ("resnet", "... 1202 on Cifar", "1,202"),
        ("wrn", "50-layer wide ResNet", "50"),
        ("augment", "5 scales × 10 crops", "50"),
    ]:
        r = find(rows, section, slide)
        assert (r.verdict, r.found) == (REPRODUCED, found), r
    vgg_params = [r for r in rows if r.section == "vgg16" and "params (not counting biases)" in r.slide]
    assert len(vgg_params) == 22 and all(r.verdict == REPRODUCED for r in vgg_params)
    memory = [r for r in rows if r.section == "vgg16" and r.slide.endswith("] memory")]
    assert len(memory) == 22 and {r.verdict for r in memory} == {REPRODUCED, ROUNDED}
    assert find(rows, "alexnet", "CONV1 parameters").verdict == ROUNDED  # 35K for 34,848
    assert find(rows, "squeezenet", "AlexNet level accuracy on ImageNet with 50x").found == "49.97×"
    init = [r for r in rows if r.section == "init" and r.slide.endswith(("input layer", "0", *"123456789"))]
    assert len(init) == 55 and all(r.verdict == REPRODUCED for r in init)


def test_markdown_escapes_pipes_and_marks_wrong():
    text = markdown([Row("vgg16", "a | b", "24M", "15,237,608", WRONG, "sum")])
    assert "a \\| b" in text and "**wrong**" in text and text.count("\n") == 3


def test_cli_writes_one_section_as_markdown_and_json(tmp_path):
    md = run_main("cvarch-lecture", "section=inception", "output=md", f"paths.log_dir={tmp_path}")
    assert md.returncode == 0, md.stderr[-2000:]
    text = (Path(md.stdout.strip().splitlines()[-1]) / "lecture.md").read_text()
    assert "| inception | Total: 358M ops | 358M | 271,351,808 | **wrong** |" in text
    assert "vgg16" not in text and "15 reproduced, 2 rounded, 1 wrong, 0 published (18 numbers)" in md.stdout
    js = run_main("cvarch-lecture", "section=dropout", "output=json", f"paths.log_dir={tmp_path}")
    rows = json.loads((Path(js.stdout.strip().splitlines()[-1]) / "lecture.json").read_text())
    assert [r["verdict"] for r in rows] == [REPRODUCED, ROUNDED, PUBLISHED]


@pytest.mark.parametrize(
    "override, message",
    [
        ("section=lenet", "section='lenet' is not one of"),
        ("seeds=1", "seeds=1"),
        ("output=pdf", "output='pdf'"),
    ],
)
def test_bad_input_names_the_key(override, message, tmp_path):
    result = run_main("cvarch-lecture", override, f"paths.log_dir={tmp_path}")
    assert result.returncode != 0 and message in result.stderr + result.stdout
