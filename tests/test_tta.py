"""Test-time augmentation: views equal torchvision's, padding shifts the corners, chunking changes nothing."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torchvision.transforms.v2 import functional as TF

from cvarch.config import CONFIG_DIR, validate
from cvarch.tta import TestTimeAugment

OPTIONS = sorted(p.stem for p in Path(CONFIG_DIR, "tta").glob("*.yaml"))
NUM_VIEWS = {"none": 1, "flip": 2, "ten_crop": 10, "multiscale_ten_crop": 50, "flip_translate": 6}


def _option(name: str) -> TestTimeAugment:
    """Instantiates conf/tta/<name>.yaml, independent of train.yaml's defaults list."""
    return instantiate(OmegaConf.load(Path(CONFIG_DIR, "tta", f"{name}.yaml")))


def _images(n: int = 2, size: int | tuple[int, int] = 32, seed: int = 0) -> torch.Tensor:
    height, width = (size, size) if isinstance(size, int) else size
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, height, width), generator=gen, dtype=torch.uint8)


def _net(seed: int = 0, classes: int = 5) -> nn.Module:
    """A tiny per-sample classifier of float images: conv, ReLU, global average pool, linear."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes)
    ).eval()


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(255.0) if x.dtype == torch.uint8 else x


def test_the_group_has_the_options_of_issues_6_and_20():
    assert OPTIONS == sorted(NUM_VIEWS)


@pytest.mark.parametrize("option", OPTIONS)
def test_every_option_instantiates_with_its_number_of_views(option):
    node = OmegaConf.load(Path(CONFIG_DIR, "tta", f"{option}.yaml"))
    validate(OmegaConf.create({"tta": node}))  # every key is a constructor argument of the right type
    tta = _option(option)
    assert isinstance(tta, TestTimeAugment)
    assert tta.num_views == NUM_VIEWS[option]
    x = _images(n=2, size=12)
    views = list(tta.configure(crop=10, padding=1).views(x))
    assert len(views) == NUM_VIEWS[option]
    assert all(v.shape == (2, 3, 10, 10) for v in views)


@pytest.mark.parametrize(
    ("size", "crop", "padding"),
    [(32, 28, 0), (32, 32, 4), (32, 25, 0), (32, 28, 3), ((30, 36), 24, 2)],  # 25: centre 3.5 rounds to 4
)
def test_ten_crop_equals_torchvision_ten_crop_of_the_padded_image(size, crop, padding):
    x = _images(size=size)
    views = list(_option("ten_crop").configure(crop, padding).views(x))
    expected = TF.ten_crop(F.pad(x, [padding] * 4), [crop, crop])
    assert len(views) == len(expected) == 10
    for i, (view, ref) in enumerate(zip(views, expected, strict=True)):
        assert view.dtype == torch.uint8, i
        assert torch.equal(view, ref), f"view {i} differs from torchvision's ten_crop"
    float_views = list(_option("ten_crop").configure(crop, padding).views(_as_float(x)))
    assert all(torch.equal(v, _as_float(ref)) for v, ref in zip(float_views, expected, strict=True))


def test_ten_crop_on_images_the_size_of_the_crop_warns_that_its_views_are_duplicates():
    tta = TestTimeAugment(views="ten_crop").configure(8)
    x = torch.rand(2, 3, 8, 8)
    duplicates = r"padding of 0\) are no larger than the training crop \(8×8\), so the ten crops are five"
    with pytest.warns(RuntimeWarning, match=duplicates):
        views = list(tta.views(x))
    assert all(torch.equal(v, views[0]) for v in views[:5])
    assert all(torch.equal(v, views[5]) for v in views[5:])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(TestTimeAugment(views="ten_crop").configure(8, padding=2).views(x))  # padded: distinct corners
        list(tta.views(x))  # warned once


def test_padding_shifts_the_corner_views_by_the_training_crops_extremes():
    x = _images()
    views = list(_option("ten_crop").configure(crop=32, padding=4).views(x))
    top_left = torch.zeros_like(x)
    top_left[..., 4:, 4:] = x[..., :28, :28]  # the image shifted right and down by 4, zeros entering
    bottom_right = torch.zeros_like(x)
    bottom_right[..., :28, :28] = x[..., 4:, 4:]
    assert torch.equal(views[0], top_left)
    assert torch.equal(views[3], bottom_right)
    assert torch.equal(views[4], x)  # the centre window is the unpadded image
    assert torch.equal(views[5], views[1].flip(-1))  # top-left of the flipped canvas = flipped top-right
    assert torch.equal(views[9], x.flip(-1))


def test_multiscale_ten_crop_gives_50_views_from_canvases_of_the_scaled_sides():
    x = _images(n=2, size=32)
    tta = _option("multiscale_ten_crop").configure(crop=32)
    views = list(tta.views(x))
    assert len(views) == tta.num_views == 50
    assert all(v.shape == (2, 3, 32, 32) and v.dtype == torch.float32 for v in views)
    assert all(v.min() >= 0 and v.max() <= 1 for v in views)
    # round(32 · size / 224) for size in 224, 256, 384, 480, 640
    for scale, side in enumerate([32, 37, 55, 69, 91]):
        canvas = TF.resize(_as_float(x), [side, side], antialias=True)
        reference = TF.ten_crop(canvas, [32, 32])
        for i in range(10):
            assert torch.allclose(views[10 * scale + i], reference[i], atol=1e-6), (side, i)
    assert torch.equal(views[4], _as_float(x))  # size 224 is the image itself
    assert not torch.allclose(views[14], views[24], atol=1e-3)  # different scales, different centres


def test_multiscale_sides_are_relative_to_the_training_crop():
    x = _images(n=1, size=32)
    tta = TestTimeAugment(views="none", sizes=[224, 256], train_size=224).configure(crop=28)
    small, own = tta.views(x)
    # size 224: the 32-pixel image shrinks to the 28-pixel crop, antialiased
    assert torch.allclose(small, TF.resize(_as_float(x), [28, 28], antialias=True), atol=1e-6)
    assert not torch.allclose(small, TF.resize(_as_float(x), [28, 28], antialias=False), atol=1e-3)
    assert torch.equal(own, TF.center_crop(_as_float(x), [28, 28]))  # round(28 · 256 / 224) = 32: no resize


def test_center_is_the_identity_when_the_crop_is_the_image():
    x = _images()
    assert TestTimeAugment().center(x) is x  # before configure: crop = the image's side
    for padding in (0, 1, 4):
        assert TestTimeAugment().configure(32, padding).center(x) is x


def test_center_is_the_central_crop_when_the_crop_is_smaller():
    x = _images()
    view = TestTimeAugment().configure(crop=28).center(x)  # AlexNet-style: 28 of 32
    assert view.dtype == torch.uint8
    assert torch.equal(view, x[..., 2:30, 2:30])
    assert torch.equal(view, TF.center_crop(x, [28, 28]))
    assert torch.equal(TestTimeAugment().configure(crop=28, padding=4).center(x), view)


def test_center_pads_with_zeros_when_the_crop_exceeds_the_image():
    x = _images()
    view = TestTimeAugment().configure(crop=36, padding=4).center(x)
    assert view.shape == (2, 3, 36, 36)
    assert torch.equal(view[..., 2:34, 2:34], x)
    assert view.sum() == x.long().sum()  # the border is zeros


@pytest.mark.parametrize("option", OPTIONS)
def test_center_is_the_center_view(option):
    x = _images(size=32)
    multiscale = "multiscale" in option
    # multiscale: size 224 with crop 32 is the image at its own size, in [0, 1]; crop 28 would resize it to 28
    tta = _option(option).configure(crop=32 if multiscale else 28, padding=4)
    center = _as_float(tta.center(x)) if multiscale else tta.center(x)
    views = list(tta.views(x))
    assert torch.equal(views[4 if "ten_crop" in option else 0], center)


def test_flip_views_are_the_center_and_its_mirror_image():
    x = _images()
    views = list(_option("flip").configure(crop=28).views(x))
    assert len(views) == 2
    assert torch.equal(views[0], x[..., 2:30, 2:30])
    assert torch.equal(views[1], x[..., 2:30, 2:30].flip(-1))


def test_flip_tta_leaves_a_flip_invariant_model_unchanged_and_changes_another():
    x = _images(n=4, size=16)
    net = _net()
    invariant = lambda v: net(_as_float(v)) + net(_as_float(v).flip(-1))  # noqa: E731
    plain = lambda v: net(_as_float(v))  # noqa: E731
    none, flip = _option("none"), _option("flip")
    assert torch.allclose(flip.predict(invariant, x), none.predict(invariant, x), atol=1e-6)
    assert not torch.allclose(flip.predict(plain, x), none.predict(plain, x), atol=1e-4)
    expected = (plain(x).softmax(-1) + plain(x.flip(-1)).softmax(-1)) / 2
    assert torch.allclose(flip.predict(plain, x), expected, atol=1e-6)


def test_predict_is_the_mean_softmax_over_views_whatever_the_chunk_size():
    x = _images(n=3, size=8)
    net = _net()
    reference = None
    for chunk_size in (1, 3, 50):
        tta = TestTimeAugment(
            views="ten_crop", sizes=[224, 256, 384, 480, 640], train_size=224, chunk_size=chunk_size
        ).configure(crop=8, padding=1)
        calls: list[int] = []

        def forward(v, calls=calls):
            calls.append(v.shape[0])
            return net(_as_float(v))

        probs = tta.predict(forward, x)
        assert probs.shape == (3, 5) and probs.dtype == torch.float32
        assert torch.allclose(probs.sum(dim=1), torch.ones(3), atol=1e-6)
        assert len(calls) == math.ceil(50 / chunk_size)
        assert max(calls) <= chunk_size * 3 and sum(calls) == 50 * 3
        if reference is None:
            views = list(tta.views(x))
            reference = torch.stack([net(v).softmax(-1) for v in views]).mean(dim=0)
        assert torch.allclose(probs, reference, atol=1e-6), chunk_size


def test_predict_differs_from_the_single_view():
    x = _images(n=4, size=12)
    net = _net(seed=1)
    forward = lambda v: net(_as_float(v))  # noqa: E731
    single = _option("none").configure(crop=10).predict(forward, x)
    assert torch.allclose(single, forward(x[..., 1:11, 1:11]).softmax(-1), atol=1e-6)
    ten = _option("ten_crop").configure(crop=10).predict(forward, x)
    assert not torch.allclose(ten, single, atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"views": "five_crop"}, "tta.views"),
        ({"sizes": []}, "tta.sizes"),
        ({"sizes": [224, 0]}, "tta.sizes"),
        ({"sizes": [224, -256]}, "tta.sizes"),
        ({"train_size": 0}, "tta.train_size"),
        ({"chunk_size": 0}, "tta.chunk_size"),
        ({"translate": 0}, "tta.translate"),
        ({"average": "median"}, "tta.average"),
    ],
)
def test_bad_values_name_their_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        TestTimeAugment(**kwargs)


def test_bad_geometry_is_refused():
    with pytest.raises(ValueError, match="crop"):
        TestTimeAugment().configure(crop=0)
    with pytest.raises(ValueError, match="padding"):
        TestTimeAugment().configure(crop=28, padding=-1)
    with pytest.raises(ValueError, match=r"tta\.sizes"):  # round(32 · 112 / 224) = 16 < 32
        TestTimeAugment(sizes=[224, 112]).configure(crop=32)
    tta = TestTimeAugment(views="ten_crop").configure(crop=40, padding=2)
    x = _images(size=32)
    with pytest.raises(ValueError, match="larger than the 32×32 test image padded by 2"):
        tta.center(x)
    with pytest.raises(ValueError, match="larger than"):
        next(tta.views(x))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        TestTimeAugment().center(x[0])


def test_flip_translate_views_are_airbenchs_six_per_image_reference_views():
    """Jordan 2024 §3.7 (tta_level 2): the image, the image reflect-padded by 1 and cropped at (0, 0) and at
    (2, 2), then the flips of those three; checked image by image through torchvision's functional ops."""
    x = _images(n=3, size=32)
    views = list(_option("flip_translate").configure(crop=32, padding=2, padding_mode="reflect").views(x))
    for i, image in enumerate(x):
        padded = TF.pad(image, [1], padding_mode="reflect")
        reference = [image, TF.crop(padded, 0, 0, 32, 32), TF.crop(padded, 2, 2, 32, 32)]
        reference += [TF.horizontal_flip(v) for v in reference]
        for view, expected in zip(views, reference, strict=True):
            assert view.dtype == torch.uint8 and torch.equal(view[i], expected)


def test_flip_translate_predicts_the_softmax_of_airbenchs_weighted_mean_logits():
    """airbench's ``infer_mirror_translate``: ½·mirror(x) + ½·mean(mirror(x shifted −1), mirror(x shifted
    +1)),
    with mirror(v) = ½·net(v) + ½·net(flip v), on logits; whatever the chunk size."""
    x = _images(n=4, size=32)
    torch.manual_seed(2)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 5))  # sees where pixels are: views differ
    forward = lambda v: 20 * net(_as_float(v))  # noqa: E731

    def mirror(v: torch.Tensor) -> torch.Tensor:
        return 0.5 * forward(v) + 0.5 * forward(v.flip(-1))

    padded = F.pad(x, [1] * 4, mode="reflect")
    shifted = (mirror(padded[..., 0:32, 0:32]) + mirror(padded[..., 2:34, 2:34])) / 2
    expected = (0.5 * mirror(x) + 0.5 * shifted).softmax(-1)
    for chunk_size in (1, 4, 6):
        tta = TestTimeAugment(views="flip_translate", average="logits", chunk_size=chunk_size).configure(
            crop=32
        )
        assert torch.allclose(tta.predict(forward, x), expected, atol=1e-6), chunk_size
    assert torch.allclose(tta.weights().sum(), torch.tensor(1.0))
    # averaging probabilities instead: the weighted mean of the six softmaxes
    probs = TestTimeAugment(views="flip_translate", average="softmax").configure(crop=32).predict(forward, x)
    views = list(tta.views(x))
    weighted = sum(w * forward(v).softmax(-1) for w, v in zip(tta.weights(), views, strict=True))
    assert torch.allclose(probs, weighted, atol=1e-6) and not torch.allclose(probs, expected, atol=1e-4)


@pytest.mark.parametrize("size", [8, 32])
@pytest.mark.parametrize("augment", ["none", "cifar", "alexnet", "flip_translate"])
@pytest.mark.parametrize("option", OPTIONS)
def test_audit_every_option_fits_8x8_and_32x32_images_or_says_why(option, augment, size, compose_tmp):
    """Every view of every option, configured as training configures it (the augment group's crop and its
    padding), is a crop-sized window holding image pixels, on the 8×8 digits as on CIFAR."""
    aug = instantiate(compose_tmp(f"augment={augment}").augment)
    crop = aug.output_size(size)
    tta = _option(option).configure(crop, aug.padding, aug.padding_mode)
    x = torch.randint(
        1, 256, (2, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # ten crops of an unpadded image: duplicates
        views = list(tta.views(x))
    assert len(views) == tta.num_views
    for view in views:
        assert view.shape == (2, 3, crop, crop)
        assert (view.flatten(1) != 0).any(dim=1).all()  # never all padding


def test_translate_is_pixels_or_a_fraction_of_the_crop_and_must_be_less_than_it():
    x = _images(n=2, size=8)
    in_pixels = list(TestTimeAugment(views="flip_translate", translate=2).configure(crop=8).views(x))
    fraction = list(TestTimeAugment(views="flip_translate", translate=0.25).configure(crop=8).views(x))
    assert all(torch.equal(a, b) for a, b in zip(in_pixels, fraction, strict=True))
    with pytest.raises(ValueError, match=r"tta\.translate=8 \(pixels\).*8×8"):
        TestTimeAugment(views="flip_translate", translate=8).configure(crop=8)
    with pytest.raises(ValueError, match=r"tta\.translate=1\.0 \(of the side = 8 pixels\).*8×8"):
        TestTimeAugment(views="flip_translate", translate=1.0).configure(crop=8)
    with pytest.raises(ValueError, match=r"tta\.translate"):
        TestTimeAugment(translate=1.5)  # floats are fractions in (0, 1]
    TestTimeAugment(views="flip", translate=8).configure(crop=8)  # unused by the other views


def test_padding_as_large_as_the_crop_is_refused():
    """A crop padded by its own side has corner views of padding alone."""
    with pytest.raises(ValueError, match=r"padding.*=8 \(pixels\).*8×8"):
        TestTimeAugment(views="ten_crop").configure(crop=8, padding=8)
