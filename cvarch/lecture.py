"""``cvarch-lecture [section=vgg16] [output=table|json|md]``: every number the lecture's slides print, beside
what the real models give.

Stanford CS231n 2017 lecture 9 ("CNN Architectures") and the training slides of lectures 6–7, as this course
teaches them (``../shared/lecture``). In slide order, each row holds the slide's words, the slide's value, the
value cvarch computes, and a verdict:

- ``reproduced``: cvarch's value is the slide's (for random draws, the init study: within four standard
  deviations of the mean over ``seeds`` seeds, plus half the slide's last printed digit; the slide is one
  numpy draw, and a low draw in one layer carries into the next, so 3 of its 122 numbers lie 3–4 standard
  deviations out);
- ``rounded``: the slide's value is cvarch's rounded to the slide's significant digits ("3.2M" for
  3,211,264; trailing zeros of an integer are not significant, so "800K" stands for 802,816);
- ``wrong``: neither; the note gives the corrected value and why;
- ``published``: a result that needs ImageNet or a competition (the error rates, the ensembles), given with
  its paper and table: not measurable here.

The values come from the code the other tools run, nothing typed twice: shapes, parameters, activation
memory, MACs, receptive fields and depth from :func:`cvarch.profile.profile` (``cvarch-profile``), recipes
from the composed configs, test-time views from :class:`cvarch.tta.TestTimeAugment`, the init study's
statistics from :meth:`cvarch.callbacks.ActivationStats.layer_stats` on the ``experiment=init_study`` model
and data, and SqueezeNet's compressed size from :func:`cvarch.compress.deep_compression`
(``cvarch-compress``).
"""

from __future__ import annotations

import functools
import json
import math
import re
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from torch import nn

import cvarch.profile
from cvarch.build import build_datamodule, build_model, instantiate
from cvarch.callbacks import ACTIVATIONS, ActivationStats
from cvarch.compress import Compression, deep_compression, reference_size
from cvarch.config import compose_nested, plain_config_errors
from cvarch.cost import FP32_BYTES, MB, Profile, measure_step_memory, profile_model

REPRODUCED, ROUNDED, WRONG, PUBLISHED = "reproduced", "rounded", "wrong", "published"
VERDICTS = (REPRODUCED, ROUNDED, WRONG, PUBLISHED)
OUTPUTS = ("table", "json", "md")


@dataclass
class Row:
    """One number of the slides.

    Args:
        section: the slide group (``alexnet``, ``vgg16``, ``inception``, …; :data:`SECTIONS`).
        slide: the slide's words.
        said: the slide's value, as printed.
        found: cvarch's value, or the published figure.
        verdict: one of :data:`VERDICTS`.
        note: the corrected value and the reason (``wrong``), the source (``published``), or how it was
            computed.
    """

    section: str
    slide: str
    said: str
    found: str
    verdict: str
    note: str = ""


_SCALES = {"K": 1e3, "M": 1e6, "million": 1e6}
_NUMBER = re.compile(r"(\d[\d,]*(?:\.\d+)?)\s*(K\b|M\b|million\b)?")


def parse_said(said: str) -> tuple[float, float]:
    """The value a slide prints and half its last significant digit: ``"3.2M"`` → (3.2e6, 5e4),
    ``"800K"`` → (8e5, 5e4) (trailing zeros of an integer are not significant), ``"1,728"`` → (1728, 0.5),
    ``"0.000000"`` → (0, 5e-7).

    Args:
        said: a slide's number with an optional ``K``/``M``/``million`` suffix; the first number counts.
    """
    match = _NUMBER.search(said)
    if match is None:
        raise ValueError(f"no number in the slide's value {said!r}")
    digits, scale = match.group(1).replace(",", ""), _SCALES.get(match.group(2) or "", 1.0)
    if "." in digits:
        step = 10.0 ** -len(digits.split(".")[1])
    else:
        significant = digits.rstrip("0") or "0"
        step = 10.0 ** (len(digits) - len(significant)) if significant != "0" else 1.0
    return float(digits) * scale, step * scale / 2


def judge(value: float, said: str) -> str:
    """``reproduced`` if ``value`` is the slide's number, ``rounded`` if the slide's number is ``value``
    rounded to the slide's digits, else ``wrong``."""
    number, half = parse_said(said)
    if math.isclose(value, number, rel_tol=1e-9, abs_tol=1e-12):
        return REPRODUCED
    return ROUNDED if abs(value - number) <= half * (1 + 1e-9) else WRONG


def _n(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.4g}"


def _shape(shape: Sequence[int]) -> str:
    """(C, H, W) as the slides print it, H×W×C."""
    return "×".join(map(str, (*shape[1:], shape[0]))) if len(shape) == 3 else "×".join(map(str, shape))


class Lecture:
    """The models and configs the rows are computed from, each built once.

    Args:
        seeds: seeds of the init study's draws (weights and data).
    """

    def __init__(self, seeds: int = 5) -> None:
        self.seeds = seeds
        # cached per instance: a check builds each model and config once
        self.profile = functools.cache(self._profile)
        self.config = functools.cache(self._config)
        self.init_study = functools.cache(self._init_study)

    def _profile(self, model: str, size: int, *overrides: str) -> Profile:
        """``cvarch-profile model=<model> data.image_size=<size> <overrides>`` on the meta device; ImageNet
        (3 channels, 1000 classes) unless the overrides say otherwise."""
        return cvarch.profile.profile(
            compose_nested(
                f"model={model}",
                "data.channels=3",
                "data.num_classes=1000",
                f"data.image_size={size}",
                "measure_memory=false",
                *overrides,
                config_name="profile",
            )
        )

    def _config(self, *overrides: str) -> DictConfig:
        """The run config ``cvarch-train <overrides>`` composes (its ``paths.output_dir`` unresolved)."""
        return compose_nested(*overrides)

    def params(self, model: str, size: int, *overrides: str) -> int:
        return self.profile(model, size, *overrides).totals.params

    def _init_study(self, *overrides: str) -> list[list[dict[str, Any]]]:
        """Per seed, the input and the 10 hidden layers of ``experiment=init_study <overrides>``: the
        ActivationStats callback's statistics of one forward of the 1000×500 unit-Gaussian batch."""
        runs = []
        for seed in range(self.seeds):
            cfg = compose_nested(
                "experiment=init_study", f"seed={seed}", f"data.split_seed={seed}", *overrides
            )
            datamodule = build_datamodule(cfg)
            x = datamodule.load_splits()["train"].images.float()
            torch.manual_seed(seed)
            model = build_model(cfg).eval()
            stats = ActivationStats(dirpath=".")
            outputs = [("input", "Input", x.flatten(1))]
            hooks = [
                m.register_forward_hook(
                    lambda m, i, o, n=n, out=outputs: out.append((n, type(m).__name__, o.detach()))
                )
                for n, m in model.named_modules()
                if isinstance(m, ACTIVATIONS)
            ]
            with torch.no_grad():
                model(x)
            for hook in hooks:
                hook.remove()
            runs.append(stats.layer_stats(outputs))
        return runs

    def compressed(self, model: str, size: int, preset: str) -> Compression:
        """``cvarch-compress model=<model> compress=<preset>``: Deep Compression of the initialized
        ImageNet-shaped model (seed 0)."""
        cfg = compose_nested(
            f"model={model}",
            "data.channels=3",
            "data.num_classes=1000",
            f"data.image_size={size}",
            f"compress={preset}",
            config_name="compress",
        )
        torch.manual_seed(cfg.seed)
        return deep_compression(build_model(cfg, initialize=False), instantiate(cfg.compress))


def row(section: str, slide: str, said: str, value: float, found: str | None = None, why: str = "") -> Row:
    """A computed row: the verdict of ``value`` against ``said`` (:func:`judge`); ``why`` is the note of a
    ``wrong`` verdict, or how it was computed otherwise."""
    verdict = judge(value, said)
    return Row(section, slide, said, found if found is not None else _n(value), verdict, why)


def same(section: str, slide: str, said: str, found: str, equal: bool, why: str = "") -> Row:
    """A row whose check is an equality that is not a single number (a shape, a set, a config value)."""
    return Row(section, slide, said, found, REPRODUCED if equal else WRONG, why)


def published(section: str, slide: str, said: str, found: str, source: str) -> Row:
    """A result cvarch cannot measure here (ImageNet, the competitions): the published figure and its
    source."""
    return Row(section, slide, said, found, PUBLISHED, source)


# ---------------------------------------------------------------------------------------------------------
# The sections, in slide order


def alexnet(lec: Lecture) -> Iterator[Row]:
    """Krizhevsky et al. 2012 as the lecture walks it (the lecture's 227×227 input)."""
    s, prof = "alexnet", lec.profile("alexnet", 227)
    rows = prof.rows[1:]
    conv1, pool1 = rows[0], rows[1]
    yield row(s, "CONV1 output side: (227-11)/4+1", "55", conv1.shape[-1], why="cvarch-profile model=alexnet")
    yield same(
        s,
        "CONV1: 96 11x11 filters at stride 4: output volume",
        "55x55x96",
        _shape(conv1.shape),
        conv1.shape == (96, 55, 55),
    )
    yield row(
        s,
        "CONV1 parameters: (11x11x3)x96",
        "35K",
        conv1.params_no_bias,
        why=f"{conv1.params_no_bias:,} weights; {conv1.params:,} with the 96 biases",
    )
    yield row(s, "POOL1 output side: (55-3)/2+1", "27", pool1.shape[-1])
    yield same(
        s,
        "POOL1: 3x3 filters at stride 2: output volume",
        "27x27x96",
        _shape(pool1.shape),
        pool1.shape == (96, 27, 27),
    )
    yield row(s, "POOL1 parameters", "0", pool1.params)
    names = [
        "NORM1",
        "CONV2",
        "MAX POOL2",
        "NORM2",
        "CONV3",
        "CONV4",
        "CONV5",
        "MAX POOL3",
        "FC6",
        "FC7",
        "FC8",
    ]
    slides = [
        "27x27x96",
        "27x27x256",
        "13x13x256",
        "13x13x256",
        "13x13x384",
        "13x13x384",
        "13x13x256",
        "6x6x256",
        "4096",
        "4096",
        "1000",
    ]
    for name, said, r in zip(names, slides, rows[2:], strict=True):
        yield same(
            s,
            f"full (simplified) AlexNet: {name}",
            said,
            _shape(r.shape),
            _shape(r.shape) == said.replace("x", "×"),
            r.name,
        )
    weight_layers = sum(r.type in ("Conv2d", "Linear") for r in rows)
    yield row(
        s,
        "8 layers (AlexNet)",
        "8",
        prof.totals.depth,
        why=f"conv and FC layers on the longest path ({weight_layers} in all)",
    )
    recipe = lec.config("experiment=alexnet_recipe")
    yield row(s, "dropout 0.5", "0.5", recipe.model.dropout, why="experiment=alexnet_recipe: model.dropout")
    yield row(
        s, "batch size 128", "128", recipe.data.batch_size, why="experiment=alexnet_recipe: data.batch_size"
    )
    yield row(s, "SGD Momentum 0.9", "0.9", recipe.optimizer.momentum, why="optimizer.momentum")
    yield row(s, "Learning rate 1e-2", "0.01", recipe.optimizer.lr, why="optimizer.lr")
    yield row(
        s,
        "reduced by 10 manually when val accuracy plateaus",
        "10",
        1 / recipe.scheduler.factor,
        why="scheduler=plateau, scheduler.factor = 1/10",
    )
    yield row(
        s, "L2 weight decay 5e-4", "0.0005", recipe.optimizer.weight_decay, why="optimizer.weight_decay"
    )
    source = (
        "Krizhevsky et al. 2012 Table 2: top-5 val error, 1 CNN 18.2%, "
        "7 CNNs (2 pre-trained on ImageNet Fall 2011) 15.4%"
    )
    yield published(
        s, "7 CNN ensemble: 18.2% -> 15.4%", "18.2% -> 15.4%", "18.2% -> 15.4% (ILSVRC-2012 val)", source
    )


def ilsvrc(lec: Lecture) -> Iterator[Row]:
    """The "Revolution of Depth" chart: ILSVRC winners' top-5 error and depth (Russakovsky et al. 2015)."""
    s = "ilsvrc"
    winners = [
        (
            "2010 winner (Lin et al., shallow)",
            "28.2",
            "Lin et al. 2011, NEC-UIUC; Russakovsky et al. 2015 (IJCV)",
        ),
        (
            "2011 winner (Sánchez & Perronnin, shallow)",
            "25.8",
            "Sánchez & Perronnin 2011, XRCE; Russakovsky et al. 2015",
        ),
        ("2012 AlexNet", "16.4", "Krizhevsky et al. 2012 Table 2: 5 CNNs, test 16.4%"),
        (
            "2013 ZFNet (Clarifai)",
            "11.7",
            "Zeiler & Fergus 2013; ILSVRC 2013 results, Clarifai's entry 11.7%",
        ),
        ("2014 VGG", "7.3", "Simonyan & Zisserman 2015 Table 7: ILSVRC submission, test 7.3%"),
        ("2014 GoogLeNet", "6.7", "Szegedy et al. 2014 Table 2: 6.67%"),
        ("2015 ResNet", "3.57", "He et al. 2015 Table 5: ensemble, test 3.57%"),
    ]
    for who, said, source in winners:
        yield published(s, f"ILSVRC top-5 error: {who}", f"{said}%", f"{said}%", source)
    yield published(
        s, "human top-5 error", "5.1%", "5.1%", "Russakovsky et al. 2015 §6.4: one trained annotator"
    )
    for name, model, size, said, extra in [
        ("AlexNet", "alexnet", 227, "8", ()),
        ("ZFNet", "zfnet", 224, "8", ()),
        ("VGG", "vgg19", 224, "19", ()),
        ("GoogLeNet", "googlenet", 224, "22", ("model.aux_logits=false",)),
        ("ResNet", "resnet152", 224, "152", ()),
    ]:
        yield row(
            s,
            f"{name}: layers",
            said,
            lec.profile(model, size, *extra).totals.depth,
            why=f"model={model}: conv and FC layers on the longest path",
        )


def vgg16(lec: Lecture) -> Iterator[Row]:
    """Simonyan & Zisserman 2014: the small-filter argument and the lecture's VGG16 table."""
    s, prof = "vgg16", lec.profile("vgg16", 224)
    yield row(s, "8 layers (AlexNet) -> 16 - 19 layers (VGG16Net): VGG16", "16", prof.totals.depth)
    yield row(s, "16 - 19 layers: VGG19", "19", lec.profile("vgg19", 224).totals.depth)
    model = build_model(compose_nested("model=vgg16", "data.num_classes=1000"), initialize=False)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    kinds = {(c.kernel_size, c.stride, c.padding) for c in convs} | {(p.kernel_size, p.stride) for p in pools}
    yield same(
        s,
        "Only 3x3 CONV stride 1, pad 1 and 2x2 MAX POOL stride 2",
        "3x3/1/1, 2x2/2",
        f"{len(convs)} convs, {len(pools)} pools: {sorted(map(str, kinds))}",
        kinds == {((3, 3), (1, 1), (1, 1)), (2, 2)},
    )
    yield published(
        s, "11.7% top 5 error in ILSVRC'13 (ZFNet)", "11.7%", "11.7%", "ILSVRC 2013 results (Clarifai)"
    )
    yield published(s, "7.3% top 5 error in ILSVRC'14", "7.3%", "7.3%", "Simonyan & Zisserman 2015 Table 7")
    c = 64
    stack = nn.Sequential(*(nn.Conv2d(c, c, 3, padding=1, bias=False) for _ in range(3)))
    stacked = profile_model(stack.to("meta"), (c, 32, 32))
    seven = profile_model(nn.Conv2d(c, c, 7, padding=3, bias=False).to("meta"), (c, 32, 32))
    yield row(
        s,
        "effective receptive field of three 3x3 conv (stride 1) layers",
        "7",
        stacked.rows[-1].rf,
        why="cost.profile_model on three real 3×3 convs",
    )
    yield row(
        s, f"fewer parameters: 3*(3^2 C^2) for C channels (C = {c})", _n(27 * c * c), stacked.totals.params
    )
    yield row(s, f"vs. 7^2 C^2 (C = {c})", _n(49 * c * c), seven.totals.params)
    # the table: INPUT, 13 CONV3 and 5 POOL2 rows, 3 FC rows; memory = activations, params without biases
    layers = iter(
        ["INPUT"]
        + [f"CONV3-{r.shape[0]}" if r.type == "Conv2d" else "POOL2" for r in prof.rows[1:-3]]
        + ["FC", "FC", "FC"]
    )
    slide_memory = [
        "150K",
        "3.2M",
        "3.2M",
        "800K",
        "1.6M",
        "1.6M",
        "400K",
        "800K",
        "800K",
        "800K",
        "200K",
        "400K",
        "400K",
        "400K",
        "100K",
        "100K",
        "100K",
        "100K",
        "25K",
        "4096",
        "4096",
        "1000",
    ]
    slide_params = [
        "0",
        "1,728",
        "36,864",
        "0",
        "73,728",
        "147,456",
        "0",
        "294,912",
        "589,824",
        "589,824",
        "0",
        "1,179,648",
        "2,359,296",
        "2,359,296",
        "0",
        "2,359,296",
        "2,359,296",
        "2,359,296",
        "0",
        "102,760,448",
        "16,777,216",
        "4,096,000",
    ]
    for r, name, memory, params in zip(prof.rows, layers, slide_memory, slide_params, strict=True):
        where = f"[{_shape(r.shape)}]"
        yield row(s, f"{name}: {where} memory", memory, r.activations, why=r.name)
        yield row(s, f"{name}: {where} params (not counting biases)", params, r.params_no_bias, why=r.name)
    t = prof.totals
    yield row(
        s,
        "TOTAL memory: 24M",
        "24M",
        t.activations_with_input,
        why=f"the slide's own rows add up to {t.activations_with_input:,} activations with the input "
        f"({t.activations:,} without); 24M is no sum of them",
    )
    yield row(
        s,
        "TOTAL memory: 24M * 4 bytes ~= 96MB / image",
        "96MB",
        t.activations_with_input_mb,
        found=f"{t.activations_with_input_mb:.1f} MB",
        why=f"{t.activations_with_input:,} × 4 bytes = {t.activations_with_input_mb:.1f} MB (MB = 10⁶ bytes)",
    )
    torch.manual_seed(0)
    cfg = compose_nested("model=vgg16", "data.channels=3", "data.num_classes=1000")
    model = build_model(cfg, initialize=False)
    peak, how = measure_step_memory(model, (3, 224, 224), batch_size=1)
    del model
    gradients = t.params * FP32_BYTES
    backward = (peak - gradients) / (t.activations_with_input * FP32_BYTES)
    yield row(
        s,
        "TOTAL memory: ... (only forward! ~*2 for bwd)",
        "2",
        backward,
        found=f"{backward:.2f}×",
        why=f"measured: one forward + backward peaks {peak / MB:,.1f} MB above the weights ({how}); less "
        f"the weight gradients ({gradients / MB:,.1f} MB), {(peak - gradients) / MB:,.1f} MB, "
        f"{backward:.2f}× the forward's activations: PyTorch frees each activation once its gradient is "
        "computed. ×2 is the estimate's rule (cvarch-profile), a bound",
    )
    yield row(
        s, "TOTAL params: 138M parameters", "138M", t.params, why=f"with biases; {t.params_no_bias:,} without"
    )
    largest = sorted(prof.rows, key=lambda r: r.activations)[-2:]
    early = sum(r.activations for r in largest)
    yield same(
        s,
        "Note: Most memory is in early CONV",
        "early CONV",
        f"{' and '.join(r.name for r in largest)}: {early / t.activations_with_input:.0%} of it",
        {r.name for r in largest} == {r.name for r in prof.rows[1:3]},
        "the two largest rows",
    )
    fc = sum(r.params for r in prof.rows[-3:])
    yield same(
        s,
        "Note: Most params are in late FC",
        "late FC",
        f"{fc / t.params:.0%} in the three FC layers; FC6 alone {prof.rows[-3].params:,}",
        fc > t.params / 2,
    )
    vgg19 = lec.profile("vgg19", 224).totals
    ratio = vgg19.activations_with_input / t.activations_with_input
    yield same(
        s,
        "Use VGG16 or VGG19 (VGG19 ... more memory)",
        "more memory",
        f"{ratio:.2f}× ({vgg19.activations_with_input:,} activations)",
        ratio > 1,
        "model=vgg19",
    )
    yield published(
        s,
        "VGG19 only slightly better",
        "slightly better",
        "25.5% vs 25.6% top-1 val error",
        "Simonyan & Zisserman 2015 Table 3 (E vs D, train scale [256;512], test 384): 25.5/8.0 vs 25.6/8.1",
    )
    yield published(
        s,
        "ILSVRC'14 2nd in classification, 1st in localization",
        "2nd / 1st",
        "2nd / 1st",
        "Simonyan & Zisserman 2015 §1, Table 7 and Table 10 (localisation error 25.3%)",
    )


def googlenet(lec: Lecture) -> Iterator[Row]:
    """Szegedy et al. 2014, the paper's GoogLeNet without the auxiliary classifiers (§5)."""
    s = "googlenet"
    prof = lec.profile("googlenet", 224, "model.aux_logits=false")
    tv_googlenet = lec.params("googlenet_tv", 224, "model.aux_logits=false")
    yield row(
        s,
        "22 layers",
        "22",
        prof.totals.depth,
        why="conv and FC layers on the longest path (Szegedy et al. 2014 §5 count layers with parameters)",
    )
    linear = [r for r in prof.rows if r.type == "Linear"]
    yield row(
        s,
        "No FC layers (besides the classifier)",
        "1",
        len(linear),
        found=f"{len(linear)} ({linear[0].params:,} params: the 1000-way classifier)",
    )
    yield row(
        s,
        "Only 5 million parameters!",
        "5 million",
        prof.totals.params,
        why=f"the paper's net has {prof.totals.params:,} (torchvision's {tv_googlenet:,}); "
        "the 5M is Szegedy et al. 2016 §1's round figure",
    )
    alexnet, tv = lec.params("alexnet", 227), lec.params("alexnet_tv", 224)
    ratio = alexnet / prof.totals.params
    yield row(
        s,
        "12x less params than AlexNet",
        "12",
        ratio,
        found=f"{ratio:.1f}×",
        why=f"{alexnet:,} / {prof.totals.params:,}; torchvision's pair {tv / tv_googlenet:.1f}×; "
        "12× is Szegedy et al. 2016 §1's 60M / 5M",
    )
    yield published(
        s,
        "ILSVRC'14 classification winner (6.7% top 5 error)",
        "6.7%",
        "6.67%",
        "Szegedy et al. 2014 Table 2",
    )


def inception(lec: Lecture) -> Iterator[Row]:
    """The lecture's Inception module on 28×28×256 (Szegedy et al. 2014 Fig. 2), naive and with 1×1
    bottlenecks."""
    s = "inception"
    naive = lec.profile("inception_module", 28, "model.inception=naive", "data.channels=256")
    convs = [r for r in naive.rows if r.type == "Conv2d"]
    pool = next(r for r in naive.rows if r.type == "MaxPool2d")
    out = naive.totals.output_shape
    yield same(
        s,
        "Q1: output size of the 1x1 conv, with 128 filters",
        "28x28x128",
        _shape(convs[0].shape),
        convs[0].shape == (128, 28, 28),
        convs[0].name,
    )
    for r, said in zip(convs[1:], ("28x28x192", "28x28x96"), strict=True):
        yield same(
            s,
            "Q2: output sizes of all filter operations",
            said,
            _shape(r.shape),
            _shape(r.shape) == said.replace("x", "×"),
            r.name,
        )
    yield same(
        s, "Q2: output size of the 3x3 pool", "28x28x256", _shape(pool.shape), pool.shape == (256, 28, 28)
    )
    yield same(
        s,
        "Q3: output size after filter concatenation: 28x28x(128+192+96+256)",
        "28x28x672",
        _shape(out),
        tuple(out) == (672, 28, 28),
    )
    for r, said in zip(convs, ("28x28x128x1x1x256", "28x28x192x3x3x256", "28x28x96x5x5x256"), strict=True):
        yield row(
            s,
            f"Conv Ops: [{r.shape[0]}-filter conv] {said}",
            _n(math.prod(map(int, said.split("x")))),
            r.macs,
            why=f"{r.name} MACs",
        )
    yield row(s, "Conv Ops: Total", "854M", naive.totals.macs)
    one = profile_model(nn.Conv2d(64, 32, 1).to("meta"), (64, 56, 56))
    yield same(
        s,
        "Reminder: 1x1 CONV with 32 filters on 56x56x64",
        "56x56x32",
        _shape(one.totals.output_shape),
        tuple(one.totals.output_shape) == (32, 56, 56),
    )
    reduced = lec.profile("inception_module", 28, "model.inception=reduced", "data.channels=256")
    terms = [
        "28x28x64x1x1x256",
        "28x28x64x1x1x256",
        "28x28x128x1x1x256",
        "28x28x192x3x3x64",
        "28x28x96x5x5x64",
        "28x28x64x1x1x256",
    ]
    unmatched = [r for r in reduced.rows if r.type == "Conv2d"]
    matched = {}
    for said in terms:  # each term is the MACs of one conv of the module, each conv counted once
        value = math.prod(map(int, said.split("x")))
        match = matched[said] = next((r for r in unmatched if r.macs == value), None)
        if match is not None:
            unmatched.remove(match)
        yield row(
            s,
            f"with 1x1 conv bottlenecks: {said}",
            _n(value),
            match.macs if match else math.nan,
            found=_n(match.macs) if match else "no conv left of this cost",
            why=match.name if match else f"convs not matched: {[r.name for r in unmatched]}",
        )
    total, double = reduced.totals.macs, matched["28x28x192x3x3x64"].macs
    yield row(
        s,
        "Total: 358M ops",
        "358M",
        total,
        why=f"the six terms sum to {total:,}; 358M is that plus the 3×3 conv's {double:,} counted twice "
        f"({total + double:,}): the bottlenecks cut the cost {naive.totals.macs / total:.1f}×, not 2.4×",
    )
    yield row(s, "Compared to 854M ops for naive version", "854M", naive.totals.macs)


def resnet(lec: Lecture) -> Iterator[Row]:
    """He et al. 2015."""
    s = "resnet"
    r152 = lec.profile("resnet152", 224)
    yield row(s, "152-layer model for ImageNet", "152", r152.totals.depth, why="model=resnet152")
    yield published(
        s,
        "ILSVRC'15 classification winner (3.57% top 5 error)",
        "3.57%",
        "3.57%",
        "He et al. 2015 Table 5 (ensemble, test)",
    )
    r34 = lec.profile("resnet34", 224)
    model = build_model(compose_nested("model=resnet34", "data.num_classes=1000"), initialize=False)
    blocks = [m for n, m in model.named_modules() if n.count(".") == 1 and n.startswith("layer")]
    convs = [
        [c for n, c in b.named_modules() if isinstance(c, nn.Conv2d) and not n.startswith("downsample")]
        for b in blocks
    ]
    kernels = {tuple(c.kernel_size) for block in convs for c in block}
    per_block = {len(block) for block in convs}
    yield same(
        s,
        "Every residual block has two 3x3 conv layers",
        "2 × 3x3",
        f"{per_block} × {sorted(kernels)} in {len(blocks)} blocks",
        per_block == {2} and kernels == {(3, 3)},
        "model=resnet34, shortcut projections aside",
    )
    stages = [next(r for r in reversed(r34.rows) if r.name.startswith(f"layer{i}.")) for i in range(1, 5)]
    doubles = all(
        b.shape[0] == 2 * a.shape[0] and b.shape[-1] * 2 == a.shape[-1]
        for a, b in zip(stages, stages[1:], strict=False)
    )
    yield same(
        s,
        "Periodically, double # of filters and downsample spatially using stride 2",
        "×2 filters, /2 side",
        " → ".join(_shape(r.shape) for r in stages),
        doubles,
        "model=resnet34: each stage's output",
    )
    linear = [r for r in r34.rows if r.type == "Linear"]
    yield same(
        s,
        "No FC layers at the end (only FC 1000 to output classes)",
        "1 FC, 1000",
        f"{len(linear)} FC, {linear[0].shape[0]}",
        len(linear) == 1 and linear[0].shape == (1000,),
    )
    r1202 = lec.profile("resnet1202", 32, "data.num_classes=10")
    yield row(s, "Able to train very deep networks: 152 layers on ImageNet", "152", r152.totals.depth)
    yield row(s, "... 1202 on Cifar", "1202", r1202.totals.depth, why="model=resnet1202")
    for track, said in [
        ("ImageNet Detection", "16%"),
        ("ImageNet Localization", "27%"),
        ("COCO Detection", "11%"),
        ("COCO Segmentation", "12%"),
    ]:
        yield published(
            s,
            f"MSRA @ ILSVRC & COCO 2015: {track} better than 2nd",
            said,
            said,
            "He et al., ILSVRC & COCO 2015 competitions talk (relative improvement over the 2nd entry)",
        )
    yield published(
        s,
        "ILSVRC 2015 classification winner (3.6% top 5 error) -- better than human",
        "3.6% < 5.1%",
        "3.57% < 5.1%",
        "He et al. 2015 Table 5; Russakovsky et al. 2015 §6.4",
    )


def wide(lec: Lecture) -> Iterator[Row]:
    """Zagoruyko & Komodakis 2016 (wide ResNets) against He et al.'s ResNet-152."""
    s = "wrn"
    wrn, r152 = lec.profile("wide_resnet50_2", 224), lec.profile("resnet152", 224)
    base = lec.profile("resnet50", 224)
    k = (
        next(r for r in wrn.rows if r.name == "layer1.0.conv1").shape[0]
        / next(r for r in base.rows if r.name == "layer1.0.conv1").shape[0]
    )
    yield row(
        s,
        "wider residual blocks: F x k filters instead of F (WRN-50-2: k)",
        "2",
        k,
        why="layer1.0.conv1 of wide_resnet50_2 over resnet50's",
    )
    yield row(s, "50-layer wide ResNet", "50", wrn.totals.depth, why="model=wide_resnet50_2")
    yield row(s, "152-layer original ResNet", "152", r152.totals.depth)
    yield published(
        s,
        "50-layer wide ResNet outperforms 152-layer original ResNet",
        "outperforms",
        f"21.9% vs 22.2% top-1 error; {wrn.totals.params / 1e6:.1f}M vs {r152.totals.params / 1e6:.1f}M "
        f"params, {wrn.totals.macs / 1e9:.1f} vs {r152.totals.macs / 1e9:.1f} GMACs (counted here)",
        "Zagoruyko & Komodakis 2016 §4 ImageNet table (WRN-50-2-bottleneck vs ResNet-152, single crop)",
    )


def squeezenet(lec: Lecture) -> Iterator[Row]:
    """Iandola et al. 2016, with Deep Compression (Han et al. 2016)."""
    s = "squeezenet"
    squeeze, alexnet, tv = (
        lec.params("squeezenet1_0", 227),
        lec.params("alexnet", 227),
        lec.params("alexnet_tv", 224),
    )
    yield row(
        s,
        "AlexNet level accuracy on ImageNet with 50x fewer parameters",
        "50x",
        alexnet / squeeze,
        found=f"{alexnet / squeeze:.2f}×",
        why=f"{alexnet:,} / {squeeze:,} (torchvision's AlexNet: {tv / squeeze:.1f}×)",
    )
    yield published(
        s,
        "AlexNet level accuracy",
        "AlexNet level",
        "57.5% vs 57.2% top-1",
        "Iandola et al. 2016 Table 2: SqueezeNet 57.5/80.3, AlexNet 57.2/80.3 (top-1/top-5)",
    )
    result = lec.compressed("squeezenet1_0", 227, "squeezenet")
    size = result.bits("huffman") / 8
    yield same(
        s,
        "SqueezeNet: <0.5Mb model size (Deep Compression, 6-bit, 33% sparsity)",
        "<0.5 MB",
        f"{size / MB:.3f} MB ({result.bits('dense') / 8 / MB:.2f} MB dense)",
        size / MB < 0.5,
        "cvarch-compress model=squeezenet1_0 compress=squeezenet, initialized weights: the bit count of the "
        "Huffman-coded streams, codebooks and code tables, plus the dense biases",
    )
    reference = reference_size("alexnet", 3, 1000)
    ratio = reference["bits"] / 8 / size
    yield same(
        s,
        "Can compress to 510x smaller than AlexNet (0.5Mb)",
        "510x",
        f"{ratio:.0f}×",
        ratio >= 510,
        f"AlexNet fp32 {reference['mb']:.1f} MB / {size / MB:.3f} MB, at least the slide's; Iandola et al. "
        "2016 Table 2's 510× is 240 MB / 0.47 MB of a trained net (k-means and Huffman gain more on trained "
        "weights)",
    )


def preprocess(lec: Lecture) -> Iterator[Row]:
    """Step 1: preprocess the data, on CIFAR-10-shaped images."""
    s = "preprocess"
    images = torch.zeros(8, 3, 32, 32, dtype=torch.uint8)
    for option, said in (("mean_image", "32x32x3"), ("channel_mean", "3")):
        pre = instantiate(lec.config(f"preprocess={option}").preprocess)
        pre.fit(images)
        shape = tuple(pre.mean.squeeze().shape)
        found = _shape(shape) if len(shape) == 3 else str(math.prod(shape))
        words = (
            "mean image = [32,32,3] array"
            if option == "mean_image"
            else "mean along each channel = 3 numbers"
        )
        yield same(
            s,
            f"{words} (CIFAR-10 [32,32,3])",
            said,
            found,
            found == said.replace("x", "×"),
            f"preprocess={option}: its fitted mean",
        )


def init(lec: Lecture) -> Iterator[Row]:
    """The activation statistics of a 10-layer, 500-unit net (lecture 6, "Weight Initialization")."""
    s = "init"
    normal = lec.config("init=normal")
    yield row(
        s,
        "Small random numbers: gaussian with zero mean and 1e-2 standard deviation",
        "0.01",
        normal.init.std,
        why="init=normal: init.std",
    )
    study = lec.config("experiment=init_study")
    yield row(s, "10-layer net", "10", study.model.depth, why="experiment=init_study: model.depth")
    yield row(s, "with 500 neurons on each layer", "500", study.model.width, why="model.width")
    yield row(
        s, "unit gaussian input data: D = np.random.randn(1000, 500): rows", "1000", study.data.train_size
    )
    yield row(s, "D = np.random.randn(1000, 500): columns", "500", study.data.channels)
    cases = [
        ("W = 0.01 * randn, tanh", ("init=normal", "model.act_layer=tanh"), SLIDE_INIT_STATS["normal_tanh"]),
        (
            "W = 1.0 * randn, tanh",
            ("init=normal", "init.std=1.0", "model.act_layer=tanh"),
            SLIDE_INIT_STATS["normal1_tanh"],
        ),
        ("Xavier, tanh", ("init=xavier", "model.act_layer=tanh"), SLIDE_INIT_STATS["xavier_tanh"]),
        ("Xavier, ReLU", ("init=xavier", "model.act_layer=relu"), SLIDE_INIT_STATS["xavier_relu"]),
        ("He, ReLU", ("init=kaiming", "model.act_layer=relu"), SLIDE_INIT_STATS["kaiming_relu"]),
    ]
    for case, overrides, slide in cases:
        runs = lec.init_study(*overrides)
        for i, (mean, std) in enumerate(slide):
            name = "input layer" if i == 0 else f"hidden layer {i}"
            means = [run[i]["mean"] for run in runs]
            stds = [run[i]["std"] for run in runs]
            verdict = _within(means, mean) and _within(stds, std)
            found = (
                f"mean {statistics.fmean(means):.6f}, std {statistics.fmean(stds):.6f} "
                f"(± {statistics.stdev(stds):.1g}, {len(runs)} seeds)"
            )
            yield Row(
                s,
                f"{case}: {name}",
                f"mean {mean}, std {std}",
                found,
                REPRODUCED if verdict else WRONG,
                " ".join(overrides),
            )
    # the He slide's code divides by √(2/fan_in): std √(fan_in/2) = 15.8 for 500 inputs; the paper multiplies
    fan_in = study.model.width
    literal = lec.init_study("init=normal", f"init.std={math.sqrt(fan_in / 2)}", "model.act_layer=relu")
    last = statistics.fmean(run[-1]["std"] for run in literal)
    yield row(
        s,
        "He et al.: W = np.random.randn(fan_in, fan_out) / np.sqrt(2/fan_in): layer-10 std",
        "0.844523",
        last,
        found=f"{last:.3g}",
        why=f"as written, the code draws std √(fan_in/2) = {math.sqrt(fan_in / 2):.1f} and layer 10's std "
        f"explodes; He et al. 2015 eq. 10 is std √(2/fan_in), i.e. randn(...) * np.sqrt(2/fan_in) "
        "(init=kaiming), which gives the slide's printed numbers (rows above)",
    )


def _within(draws: Sequence[float], said: str) -> bool:
    """The slide's printed value lies within four standard deviations of the draws' mean, plus half its
    last digit (the seed spread: the slide is one numpy draw)."""
    number, half = parse_said(said)
    value = -number if said.lstrip().startswith("-") else number
    return abs(value - statistics.fmean(draws)) <= 4 * statistics.stdev(draws) + half


def dropout(lec: Lecture) -> Iterator[Row]:
    """Dropout (Srivastava et al. 2014) as an ensemble."""
    s = "dropout"
    yield row(
        s,
        "Probability of dropping is a hyperparameter; 0.5 is common",
        "0.5",
        lec.config("model=alexnet").model.dropout,
        why="model=alexnet: model.dropout",
    )
    units = lec.config("model=alexnet").model.classifier[0]
    exponent = units * math.log10(2)
    yield row(
        s,
        f"An FC layer with {units} units has 2^{units} ~ 10^1233 possible masks: the exponent",
        "1233",
        exponent,
        found=f"10^{exponent:.2f}",
        why="FC6 of model=alexnet; 4096 · log10 2",
    )
    yield published(
        s,
        "Only ~10^82 atoms in the universe",
        "10^82",
        "10^78 to 10^82",
        "the usual estimate of atoms in the observable universe; not a model's number",
    )


def augment(lec: Lecture) -> Iterator[Row]:
    """ResNet's scale augmentation and multi-scale ten-crop (He et al. 2015 §3.4)."""
    s = "augment"
    scale = lec.config("augment=scale").augment.ops.scale
    yield same(
        s,
        "ResNet: Pick random L in range [256, 480]",
        "[256, 480]",
        str(list(scale.short_side)),
        list(scale.short_side) == [256, 480],
        "augment=scale: short_side",
    )
    yield row(s, "Sample random 224 x 224 patch", "224", scale.crop, why="augment=scale: crop")
    tta_cfg = lec.config("tta=multiscale_ten_crop").tta
    yield same(
        s,
        "Resize image at 5 scales: {224, 256, 384, 480, 640}",
        "{224, 256, 384, 480, 640}",
        "{" + ", ".join(map(str, tta_cfg.sizes)) + "}",
        list(tta_cfg.sizes) == [224, 256, 384, 480, 640],
        "tta=multiscale_ten_crop",
    )
    ten = instantiate(lec.config("tta=ten_crop").tta).configure(crop=224)
    yield row(
        s,
        "For each size, use 10 224 x 224 crops: 4 corners + center, + flips",
        "10",
        ten.num_views,
        why="tta=ten_crop: TestTimeAugment.num_views",
    )
    multi = instantiate(tta_cfg).configure(crop=224)
    yield row(s, "5 scales × 10 crops", "50", multi.num_views, why="tta=multiscale_ten_crop: num_views")


# The slide's printed activation statistics (lecture 6): (mean, std) of the input, then hidden layers 1-10.
SLIDE_INIT_STATS: dict[str, list[tuple[str, str]]] = {
    "normal_tanh": [
        ("0.000927", "0.998388"),
        ("-0.000117", "0.213081"),
        ("-0.000001", "0.047551"),
        ("-0.000002", "0.010630"),
        ("0.000001", "0.002378"),
        ("0.000002", "0.000532"),
        ("-0.000000", "0.000119"),
        ("0.000000", "0.000026"),
        ("-0.000000", "0.000006"),
        ("0.000000", "0.000001"),
        ("-0.000000", "0.000000"),
    ],
    "normal1_tanh": [
        ("0.001800", "1.001311"),
        ("-0.000430", "0.981879"),
        ("-0.000849", "0.981649"),
        ("0.000566", "0.981601"),
        ("0.000483", "0.981755"),
        ("-0.000682", "0.981614"),
        ("-0.000401", "0.981560"),
        ("-0.000237", "0.981520"),
        ("-0.000448", "0.981913"),
        ("-0.000899", "0.981728"),
        ("0.000584", "0.981736"),
    ],
    "xavier_tanh": [
        ("0.001800", "1.001311"),
        ("0.001198", "0.627953"),
        ("-0.000175", "0.486051"),
        ("0.000055", "0.407723"),
        ("-0.000306", "0.357108"),
        ("0.000142", "0.320917"),
        ("-0.000389", "0.292116"),
        ("-0.000228", "0.273387"),
        ("-0.000291", "0.254935"),
        ("0.000361", "0.239266"),
        ("0.000139", "0.228008"),
    ],
    "xavier_relu": [
        ("0.000501", "0.999444"),
        ("0.398623", "0.582273"),
        ("0.272352", "0.403795"),
        ("0.186076", "0.276912"),
        ("0.136442", "0.198685"),
        ("0.099568", "0.140299"),
        ("0.072234", "0.103280"),
        ("0.049775", "0.072748"),
        ("0.035138", "0.051572"),
        ("0.025404", "0.038583"),
        ("0.018408", "0.026076"),
    ],
    "kaiming_relu": [
        ("0.000501", "0.999444"),
        ("0.562488", "0.825232"),
        ("0.553614", "0.827835"),
        ("0.545867", "0.813855"),
        ("0.565396", "0.826902"),
        ("0.547678", "0.834092"),
        ("0.587103", "0.860035"),
        ("0.596867", "0.870610"),
        ("0.623214", "0.889348"),
        ("0.567498", "0.845357"),
        ("0.552531", "0.844523"),
    ],
}

# slide order; `section=<name>` picks one
SECTIONS: dict[str, Callable[[Lecture], Iterator[Row]]] = {
    "alexnet": alexnet,
    "ilsvrc": ilsvrc,
    "vgg16": vgg16,
    "googlenet": googlenet,
    "inception": inception,
    "resnet": resnet,
    "wrn": wide,
    "squeezenet": squeezenet,
    "preprocess": preprocess,
    "init": init,
    "dropout": dropout,
    "augment": augment,
}


def check(section: str | None = None, seeds: int = 5) -> list[Row]:
    """The rows of one section, or of all in slide order.

    Args:
        section: a key of :data:`SECTIONS`, or ``None`` for all.
        seeds: draws of the init study per case.
    """
    if section is not None and section not in SECTIONS:
        raise ValueError(f"section={section!r} is not one of {list(SECTIONS)}")
    if seeds < 2:
        raise ValueError(f"seeds={seeds}: the init study's verdicts need the spread of at least 2 seeds")
    lec = Lecture(seeds=seeds)
    return [r for name, rows in SECTIONS.items() if section in (None, name) for r in rows(lec)]


def markdown(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table (``output=md``)."""
    cell = lambda text: str(text).replace("|", "\\|")  # noqa: E731
    lines = ["| section | the slide | says | cvarch | verdict | note |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {r.section} | {cell(r.slide)} | {cell(r.said)} | {cell(r.found)} | "
        f"{'**' + r.verdict + '**' if r.verdict == WRONG else r.verdict} | {cell(r.note)} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def print_table(rows: Sequence[Row], console: Console | None = None) -> None:
    """The rows as a rich table, with a count per verdict."""
    console = console or Console(width=200)
    table = Table(title="The lecture's numbers, checked against the real models")
    for column in ("section", "the slide", "says", "cvarch", "verdict", "note"):
        table.add_column(column, overflow="fold")
    style = {REPRODUCED: "green", ROUNDED: "green", WRONG: "bold red", PUBLISHED: "dim"}
    for r in rows:
        table.add_row(r.section, r.slide, r.said, r.found, f"[{style[r.verdict]}]{r.verdict}[/]", r.note)
    console.print(table)
    counts = {v: sum(r.verdict == v for r in rows) for v in VERDICTS}
    console.print(", ".join(f"{n} {v}" for v, n in counts.items()) + f" ({len(rows)} numbers)")


def run(cfg: DictConfig) -> list[Row]:
    """Checks ``cfg.section`` (all when null), prints the table and writes ``lecture.json`` or
    ``lecture.md`` to the run directory for ``output=json|md``.

    Args:
        cfg: the ``lecture`` root config.
    """
    if cfg.output not in OUTPUTS:
        raise ValueError(f"output={cfg.output!r} is not one of {list(OUTPUTS)}")
    rows = check(cfg.section, seeds=cfg.seeds)
    if cfg.output != "table":
        output_dir = Path(cfg.paths.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / f"lecture.{cfg.output}"
        text = (
            json.dumps([asdict(r) for r in rows], indent=2) + "\n" if cfg.output == "json" else markdown(rows)
        )
        path.write_text(text)
    print_table(rows)
    return rows


def cli(cfg: DictConfig) -> None:
    """``cvarch-lecture [section=…] [output=…]``; the last line printed is the run directory."""
    with plain_config_errors("cvarch-lecture"):
        run(cfg)
    print(cfg.paths.output_dir)


if __name__ == "__main__":  # python -m cvarch.lecture
    from cvarch.cli import lecture

    lecture()
