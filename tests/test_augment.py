"""Augment: batched, seeded, on-device training augmentations; labels stay with their images."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import cvarch
from cvarch.augment import (
    AlternatingFlip,
    Augment,
    AutoAugment,
    ColorJitter,
    Crop,
    CutMix,
    Cutout,
    Flip,
    MixUp,
    PCAColour,
    RandAugment,
    RandomErasing,
    RandomResizedCrop,
    ScaleAugment,
    TrivialAugment,
    sample_beta,
)
from cvarch.callbacks import AugmentationGrid
from cvarch.config import CONFIG_DIR
from tests.conftest import DEVICES

OPTIONS = sorted(p.stem for p in Path(CONFIG_DIR, "augment").glob("*.yaml"))
MIXING = ("mixup", "cutmix")
# the timm-style policies: each option and its op's key
POLICIES = {
    "randaugment": "randaugment",
    "trivialaugment": "trivialaugment",
    "autoaugment_cifar": "autoaugment",
    "autoaugment_imagenet": "autoaugment",
    "random_erasing": "random_erasing",
    "color_jitter": "color_jitter",
}
# ops that change pixel values beyond padding and fill: a pixel no longer encodes its image's label
RECOLOURING = ("randaugment", "trivialaugment", "autoaugment", "random_erasing", "color_jitter")


def _labelled_images(n: int = 32, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (n, 3, size, size) constant images, value 5 + 25·label: never 0 (padding) or 127.5 (fill)."""
    labels = torch.arange(n) % 10
    images = (5 + 25 * labels).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, size, size).contiguous()
    return images, labels


def _decode(x: torch.Tensor) -> torch.Tensor:
    """The label a [0, 1] pixel value encodes (fractional between two labels' values)."""
    return (x * 255 - 5) / 25


def _smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """float (n, 3, size, size) in [0, 1]: random 8×8 images upsampled, so resampling errors stay small."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=gen)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _augment(compose_tmp, *overrides: str) -> Augment:
    return instantiate(compose_tmp(*overrides).augment)


@pytest.mark.parametrize("option", [*OPTIONS, "[cifar,cutout]", "[cutmix,mixup]"])
def test_every_option_composes_and_keeps_each_label_with_its_image(option, compose_tmp):
    aug = _augment(compose_tmp, f"augment={option}")
    images, labels = _labelled_images()
    aug.fit(images)
    x, y = aug(images, labels)
    if option == "none":
        assert x is images and y is labels  # untouched, still uint8
        return
    index_only = all(op.on_uint8 for op in aug.ops.values())  # crops and flips stay uint8 (exact pixels)
    assert x.dtype == (torch.uint8 if index_only else torch.float32)
    assert x.shape == (32, 3, aug.output_size(32), aug.output_size(32))
    x = torch.div(x, 255.0) if index_only else x
    if any(name in MIXING for name in aug.ops):
        assert y.shape == (32, 10) and y.dtype == torch.float32
        assert torch.allclose(y.sum(dim=1), torch.ones(32))
        if len(aug.ops) == 1:  # one partner per image
            assert ((y > 0).sum(dim=1) <= 2).all()
            assert (y[torch.arange(32), labels] > 0).all()
        # the image is the target-weighted mix of the constant images: pixel mean = Σ_k y_k·value(k)
        classes = torch.arange(10, dtype=torch.float32)
        assert torch.allclose(_decode(x.mean(dim=(1, 2, 3))), y @ classes, atol=1e-3)
        return
    assert torch.equal(y, labels)
    if any(name in RECOLOURING for name in aug.ops):  # their values: test_policies_* below
        assert 0 <= x.min() and x.max() <= 1
        return
    # padding (0) and cutout (0.5) pixels carry no label; every other pixel is its own image's value
    kept = (x != 0) & (x != 0.5)
    assert kept.flatten(1).sum(dim=1).min() >= 32 * 32 * 3 // 2
    tolerance = 0.5 if "pca_colour" in aug.ops else 1e-4  # PCA colour shifts each image a little
    error = (_decode(x) - labels.view(-1, 1, 1, 1)).abs()
    assert error[kept].max() < tolerance


@pytest.mark.parametrize("option", OPTIONS)
def test_every_option_has_an_empty_state_dict_so_checkpoints_load_strictly(option, compose_tmp):
    aug = _augment(compose_tmp, f"augment={option}")
    aug.fit(_labelled_images()[0])
    assert aug.state_dict() == {}
    model = nn.Sequential(nn.Linear(2, 2))
    model.augment = aug
    state = nn.Sequential(nn.Linear(2, 2)).state_dict()
    model.load_state_dict(state, strict=True)  # a checkpoint without augmentation loads into one with it


@pytest.mark.parametrize(
    ("option", "size"),
    [
        ("none", 32),
        ("crop", 32),
        ("cifar", 32),
        ("scale", 32),
        ("random_resized_crop", 32),
        ("alexnet", 28),
        ("cutout", 32),
    ],
)
def test_output_size(option, size, compose_tmp):
    aug = _augment(compose_tmp, f"augment={option}")
    assert aug.output_size(32) == size
    images, labels = _labelled_images(n=4)
    aug.fit(images)
    assert aug(images, labels)[0].shape[-2:] == (size, size)


def test_alexnet_crops_224_of_256_and_only_crop_sets_padding(compose_tmp):
    assert Crop(padding=0, scale=224 / 256).output_size(256) == 224
    assert _augment(compose_tmp, "augment=alexnet").padding == 0
    cifar = _augment(compose_tmp, "augment=[cifar,cutout]")
    with pytest.raises(RuntimeError, match=r"augment\.ops\.crop\.padding=0\.125 is a fraction"):
        cifar.padding  # noqa: B018 (the property raises): a fraction needs the image size
    assert cifar.output_size(32) == 32 and cifar.padding == 4  # He et al.'s 4 of 32
    assert cifar.output_shape((1, 8, 8)) == (1, 8, 8) and cifar.padding == 1  # 1/8 of 8×8 digits
    assert _augment(compose_tmp, "augment=cifar", "augment.ops.crop.padding=2").padding == 2  # int: pixels
    assert _augment(compose_tmp, "augment=none").padding == 0


def test_crop_is_a_window_of_the_zero_padded_image_at_a_random_offset_per_image():
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out, _ = Crop(padding=4)(x, torch.zeros(16), torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    padded = F.pad(x, [4, 4, 4, 4])
    offsets = []
    for i in range(16):  # the slow reference: search all 9×9 windows of the padded image
        found = [
            (t, s)
            for t in range(9)
            for s in range(9)
            if torch.equal(out[i], padded[i, :, t : t + 8, s : s + 8])
        ]
        assert len(found) == 1
        offsets += found
    assert len(set(offsets)) > 8  # drawn per image, not once per batch


def test_flip_mirrors_exactly_the_images_it_picks():
    x = torch.rand(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out, _ = Flip(p=0.5)(x, torch.zeros(64), torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x, strict=True)])
    same = torch.tensor([torch.equal(o, i) for o, i in zip(out, x, strict=True)])
    assert (flipped ^ same).all() and 16 < int(flipped.sum()) < 48
    assert torch.equal(Flip(p=1.0)(x, None, torch.Generator())[0], x.flip(-1))


def test_same_seed_same_batch_different_seed_different_batch(compose_tmp):
    labels = _labelled_images()[1]
    images = (torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)

    def run(seed: int) -> torch.Tensor:
        aug = _augment(compose_tmp, "augment=[cifar,cutout,mixup]", f"seed={seed}")
        return aug(images, labels)

    (a, ya), (b, yb), (c, yc) = run(1), run(1), run(2)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    assert not torch.equal(a, c) and not torch.equal(ya, yc)


def test_rng_state_round_trip_reproduces_the_next_batch(compose_tmp):
    images, labels = _labelled_images()
    aug = _augment(compose_tmp, "augment=[random_resized_crop,cutmix]")
    assert aug.rng_state() is None  # the generator is made at the first call
    aug(images, labels)
    state = aug.rng_state()
    expected = aug(images, labels)
    resumed = _augment(compose_tmp, "augment=[random_resized_crop,cutmix]", "seed=123")
    resumed.set_rng_state(state)
    assert torch.equal(resumed.rng_state(), state)
    got = resumed(images, labels)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert not torch.equal(aug(images, labels)[0], expected[0])  # the stream moved on


def _images_with_covariance(eigvals: list[float], n: int = 200, seed: int = 0):
    """uint8 (n, 3, 16, 16) whose pixels have RGB covariance Q diag(eigvals) Qᵀ (in [0, 1] units)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    z = torch.randn(n, 16, 16, 3, generator=gen, dtype=torch.float64) * torch.tensor(eigvals).sqrt()
    pixels = 0.5 + z @ q.T
    return (pixels * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 3, 1, 2).contiguous(), q


def test_pca_colour_recovers_the_eigen_decomposition_of_the_pixel_covariance():
    eigvals = [0.01, 0.003, 0.0005]
    images, q = _images_with_covariance(eigvals)
    op = PCAColour()
    op.fit(images)
    assert torch.allclose(op.eigvals.flip(0).double(), torch.tensor(eigvals, dtype=torch.float64), rtol=0.05)
    cosines = (op.eigvecs.flip(1).double().T @ q).abs()  # ascending from eigh, q's columns descending
    assert torch.allclose(cosines, torch.eye(3, dtype=torch.float64), atol=0.05)


def test_pca_colour_noise_has_covariance_p_diag_of_std_lambda_squared_pt():
    images, _ = _images_with_covariance([0.01, 0.003, 0.0005])
    op = PCAColour(std=0.1)
    op.fit(images)
    x = torch.zeros(20000, 3, 2, 2)
    out, _ = op(x, torch.zeros(20000), torch.Generator().manual_seed(0))
    shift = out[:, :, 0, 0].double()
    assert torch.equal(
        out, shift.float().view(-1, 3, 1, 1).expand_as(out)
    )  # one shift per image, every pixel
    along = shift @ op.eigvecs.double()  # coordinates α_i λ_i in the eigenbasis
    expected = 0.1 * op.eigvals.double()
    assert torch.allclose(along.std(dim=0), expected, rtol=0.05)
    assert torch.allclose(
        along.mean(dim=0), torch.zeros(3, dtype=torch.float64), atol=3 * expected.max() / 100
    )


def test_pca_colour_of_a_gray_training_set_only_changes_brightness_and_works_on_one_channel():
    gen = torch.Generator().manual_seed(0)
    gray = torch.randint(0, 256, (64, 1, 8, 8), generator=gen, dtype=torch.uint8)
    rgb = PCAColour(std=0.1)
    rgb.fit(gray.expand(64, 3, 8, 8))  # rank-1 covariance: the only direction is (1, 1, 1)/√3
    out, _ = rgb(torch.zeros(1000, 3, 1, 1), None, gen)
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-6) and torch.allclose(out[:, 1], out[:, 2], atol=1e-6)
    one = PCAColour(std=0.1)
    one.fit(gray)
    variance = gray.double().div(255).var(unbiased=False)
    assert one.eigvals.item() == pytest.approx(variance.item(), rel=1e-5)
    out, _ = one(torch.zeros(20000, 1, 1, 1), None, gen)
    assert out.std().item() == pytest.approx(0.1 * variance.item(), rel=0.05)


def test_pca_colour_refuses_to_run_unfitted():
    with pytest.raises(RuntimeError, match=r"augment\.ops\.pca_colour.*before fit"):
        PCAColour()(torch.zeros(1, 3, 2, 2), None, torch.Generator())


def test_scale_augment_equals_resize_short_side_then_random_crop():
    x = _smooth_images(8)
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    out, _ = ScaleAugment(short_side=(256, 480), crop=224)(x, None, gen)
    # the same draws, made here: L ∈ [round(32·256/224), round(32·480/224)] = [37, 69], then integer offsets
    gen.set_state(state)
    sides = torch.randint(37, 70, (8,), generator=gen)
    tops = (torch.rand(8, generator=gen) * (sides - 32 + 1)).floor().long()
    lefts = (torch.rand(8, generator=gen) * (sides - 32 + 1)).floor().long()
    assert len(set(sides.tolist())) > 4
    for i in range(8):
        side, top, left = int(sides[i]), int(tops[i]), int(lefts[i])
        resized = TF.resize(x[i], [side, side], antialias=True)  # upsampling: antialiasing changes nothing
        reference = TF.crop(resized, top, left, 32, 32)
        assert (out[i] - reference).abs().max() < 1e-4
        # a window one pixel off, or one size off, is far from it
        assert (
            out[i] - TF.crop(resized, top + 1 if top < side - 32 else top - 1, left, 32, 32)
        ).abs().max() > 0.01
        other = TF.crop(TF.resize(x[i], [side + 2, side + 2], antialias=True), top, left, 32, 32)
        assert (out[i] - other).abs().max() > 0.01


def test_random_resized_crop_windows_follow_the_inception_ranges():
    op = RandomResizedCrop()
    x = torch.zeros(4000, 1, 32, 32)
    top, left, height, width = op.windows(x, torch.Generator().manual_seed(0))
    assert (
        (top >= 0).all() and (left >= 0).all() and (top + height <= 32).all() and (left + width <= 32).all()
    )
    area = height * width / 1024
    assert area.min() >= 0.07 and area.max() <= 1.0  # 8% to 100%, up to rounding to whole pixels
    aspect = width / height
    assert aspect.min() >= 0.75 * 0.85 and aspect.max() <= 4 / 3 / 0.85
    assert area.mean().item() == pytest.approx(0.50, abs=0.05)  # E[U(0.08, 1)] = 0.54, less the misfits
    assert len(set(zip(top.tolist(), left.tolist(), strict=True))) > 200  # drawn per image


def test_random_resized_crop_falls_back_to_the_central_crop_as_torchvision():
    op = RandomResizedCrop(scale=(0.9, 1.0), ratio=(3.0, 4.0))  # no window of aspect ≥ 3 and area ≥ 90% fits
    top, left, height, width = op.windows(torch.zeros(5, 1, 32, 32), torch.Generator().manual_seed(0))
    # torchvision: in_ratio 1 < 3, so width = 32, height = round(32 / 3) = 11, centred
    assert top.tolist() == [10.0] * 5 and left.tolist() == [0.0] * 5
    assert height.tolist() == [11.0] * 5 and width.tolist() == [32.0] * 5


def test_random_resized_crop_matches_torchvision_resized_crop_of_its_windows():
    x = _smooth_images(16, seed=1)
    op = RandomResizedCrop()
    gen = torch.Generator().manual_seed(2)
    state = gen.get_state()
    out, _ = op(x, None, gen)
    gen.set_state(state)
    windows = torch.stack(op.windows(x, gen), dim=1).long()
    for i, (top, left, height, width) in enumerate(windows.tolist()):
        reference = TF.resized_crop(x[i], top, left, height, width, [32, 32], antialias=False)
        # torchvision clamps at the window's edge, this op samples the image beyond it: compare the interior
        assert (out[i, :, 3:-3, 3:-3] - reference[:, 3:-3, 3:-3]).abs().max() < 1e-4
        assert (out[i] - reference).abs().mean() < 0.02


@pytest.mark.parametrize("size", [4, 5])
def test_cutout_fills_exactly_a_size_by_size_square_clipped_at_the_border(size):
    x = torch.zeros(200, 3, 16, 16)
    out, _ = Cutout(size=size, fill=0.5)(x, None, torch.Generator().manual_seed(0))
    mask = out == 0.5
    assert torch.equal(mask[:, 0], mask[:, 2])  # every channel
    assert torch.equal(out[~mask], x[~mask])
    counts, inside = [], 0
    for m in mask[:, 0]:
        rows, cols = m.any(dim=1).nonzero().flatten(), m.any(dim=0).nonzero().flatten()
        height, width = len(rows), len(cols)
        assert int(m.sum()) == height * width <= size * size  # a rectangle, clipped
        assert rows.diff().eq(1).all() and cols.diff().eq(1).all()
        touches = rows[0] == 0 or cols[0] == 0 or rows[-1] == 15 or cols[-1] == 15
        assert (height, width) == (size, size) or touches
        inside += (height, width) == (size, size)
        counts.append(int(m.sum()))
    assert inside > 50 and min(counts) < size * size
    assert torch.equal(Cutout(size=size, p=0.0)(x, None, torch.Generator())[0], x)


def test_cutmix_pastes_one_box_and_mixes_targets_by_its_area():
    x = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 1, 16, 16) / 10
    labels = torch.arange(8)
    out, y = CutMix(alpha=1.0, num_classes=8)(x, labels, torch.Generator().manual_seed(3))
    pasted = (out != x)[:, 0]
    box = pasted.any(dim=0)
    assert 0 < int(box.sum()) < 256
    for mask in pasted:  # one box for the batch; empty only where an image was paired with itself
        assert torch.equal(mask, box) or not mask.any()
    kept = 1 - pasted.flatten(1).float().mean(dim=1)
    assert torch.allclose(y[torch.arange(8), labels], kept, atol=1e-6)


def test_mixing_ops_accept_soft_targets():
    soft = torch.softmax(torch.randn(8, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    x = torch.rand(8, 3, 4, 4)
    for op in (MixUp(alpha=1.0, num_classes=5), CutMix(alpha=1.0, num_classes=5)):
        out, y = op(x, soft, torch.Generator().manual_seed(1))
        assert y.shape == (8, 5) and torch.allclose(y.sum(dim=1), torch.ones(8))
        assert not torch.allclose(y, soft)
    with pytest.raises(ValueError, match=r"augment\.ops\.mixup\.num_classes"):
        MixUp(num_classes=4)(x, soft, torch.Generator())


@pytest.mark.parametrize("alpha", [0.2, 1.0, 2.0])
def test_beta_samples_have_the_moments_of_beta_alpha_alpha(alpha):
    lam = sample_beta(alpha, 40000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert lam.min() >= 0 and lam.max() <= 1
    assert lam.mean().item() == pytest.approx(0.5, abs=0.01)
    assert lam.var().item() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.03)  # Var Beta(α, α)


def test_beta_samples_are_torch_distributions_draws_from_the_generator_alone():
    """λ is ``torch.distributions.Beta``'s draw, from the run's generator: the global stream (dropout, init)
    is left where it was, and the draw does not depend on it."""
    torch.manual_seed(1)
    reference = torch.distributions.Beta(torch.tensor(0.2), torch.tensor(0.2)).sample((8,))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    generator = torch.Generator().manual_seed(1)
    first = sample_beta(0.2, 8, generator, torch.device("cpu"))
    assert torch.equal(first, reference) and torch.equal(torch.get_rng_state(), before)
    second = sample_beta(0.2, 8, generator, torch.device("cpu"))
    assert not torch.equal(second, first)  # the generator moved on


def test_ops_run_in_stage_order_whatever_the_command_line_order(compose_tmp):
    aug = _augment(compose_tmp, "augment=[cutout,cifar]")
    assert list(aug.ops) == ["crop", "flip", "cutout"]
    assert [op.stage for op in aug.ops.values()] == [0, 0, 2]
    assert list(_augment(compose_tmp, "augment=[mixup,alexnet]").ops) == [
        "crop",
        "flip",
        "pca_colour",
        "mixup",
    ]
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)  # the run's seed
    expected = x
    for op in (aug.ops["crop"], aug.ops["flip"], aug.ops["cutout"]):
        expected, _ = op(expected, None, gen)
    assert torch.equal(aug(x, torch.zeros(8))[0], expected)


def test_command_line_overrides_reach_the_ops(compose_tmp):
    aug = _augment(
        compose_tmp, "augment=[cifar,cutout]", "augment.ops.crop.padding=2", "augment.ops.cutout.size=8"
    )
    assert aug.ops["crop"].padding == 2 and aug.ops["cutout"].size == 8
    assert aug.ops["cutout"].fill == 0.5 and aug.ops["flip"].p == 0.5


@pytest.mark.parametrize(
    ("build", "key"),
    [
        (lambda: Crop(padding=-1), "augment.ops.crop.padding"),
        (lambda: Crop(scale=1.5), "augment.ops.crop.scale"),
        (lambda: Flip(p=2.0), "augment.ops.flip.p"),
        (lambda: Cutout(size=0), "augment.ops.cutout.size"),
        (lambda: MixUp(alpha=0.0), "augment.ops.mixup.alpha"),
        (lambda: CutMix(num_classes=0), "augment.ops.cutmix.num_classes"),
        (lambda: ScaleAugment(short_side=(200, 480)), "augment.ops.scale.short_side"),
        (lambda: RandomResizedCrop(scale=(0.5, 0.1)), "augment.ops.random_resized_crop.scale"),
        (lambda: PCAColour(std=-1.0), "augment.ops.pca_colour.std"),
        (lambda: Crop(padding=1.5), "augment.ops.crop.padding"),  # floats are fractions in (0, 1]
        (lambda: Cutout(size=16.0), "augment.ops.cutout.size"),
        (lambda: Cutout(size=True), "augment.ops.cutout.size"),
        (lambda: RandAugment(magnitude=31), "augment.ops.randaugment.magnitude"),
        (lambda: RandAugment(num_ops=-1), "augment.ops.randaugment.num_ops"),
        (lambda: TrivialAugment(translate=0), "augment.ops.trivialaugment.translate"),
        (lambda: AutoAugment(policy="cifar100"), "augment.ops.autoaugment.policy"),
        (lambda: ColorJitter(hue=0.6), "augment.ops.color_jitter.hue"),
        (lambda: ColorJitter(brightness=-0.1), "augment.ops.color_jitter.brightness"),
        (lambda: RandomErasing(p=1.5), "augment.ops.random_erasing.p"),
        (lambda: RandomErasing(scale=(0.4, 0.2)), "augment.ops.random_erasing.scale"),
        (lambda: RandomErasing(ratio=(0.0, 3.3)), "augment.ops.random_erasing.ratio"),
        (lambda: RandomErasing(value="noise"), "augment.ops.random_erasing.value"),
        (lambda: RandomErasing(value=2.0), "augment.ops.random_erasing.value"),
    ],
)
def test_bad_values_name_their_config_key(build, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build()


def test_ops_must_be_augment_ops():
    with pytest.raises(TypeError, match=r"augment\.ops\.blur"):
        Augment(ops={"blur": nn.Identity()})


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_augmentation_grid_saves_the_first_batch_once(tmp_path, dtype):
    grid = AugmentationGrid(str(tmp_path), num_images=10, nrow=4)
    trainer = SimpleNamespace(is_global_zero=True)
    images = torch.rand(16, 3, 6, 6)
    images = (images * 255).to(torch.uint8) if dtype == torch.uint8 else images
    grid.on_train_batch_start(trainer, None, (images, torch.zeros(16)), 0)
    path = tmp_path / "augment_grid.png"
    # 10 images in rows of 4, each 6×6 tile upscaled 16× to 96 px (readable), a 2-pixel gap around each
    assert matplotlib.image.imread(path).shape[1] == 4 * 98 + 2
    path.unlink()
    grid.on_train_batch_start(trainer, None, (images, torch.zeros(16)), 1)
    assert not path.exists()  # once


def test_augmentation_grid_saves_nothing_off_rank_zero(tmp_path):
    grid = AugmentationGrid(str(tmp_path))
    grid.on_train_batch_start(SimpleNamespace(is_global_zero=False), None, (torch.rand(2, 3, 4, 4), None), 0)
    assert not list(tmp_path.iterdir())


def test_debug_augment_grid_adds_the_callback_and_a_short_run(compose_tmp):
    cfg = compose_tmp("debug=augment_grid", "augment=cifar")
    grid = instantiate(cfg.callbacks.augmentation_grid)
    assert isinstance(grid, AugmentationGrid) and grid.dirpath == Path(cfg.paths.output_dir)
    assert cfg.trainer.limit_train_batches == 1 and cfg.task_name == "debug"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("option", [*OPTIONS, "[cifar,cutout,mixup]"])
def test_every_option_runs_on_cuda_seeded_and_on_device(option, compose_tmp):
    images, labels = _labelled_images(n=64)
    images, labels = images.cuda(), labels.cuda()
    runs = []
    for _ in range(2):
        aug = _augment(compose_tmp, f"augment={option}").cuda()
        aug.fit(images.cpu())
        runs.append(aug(images, labels))
    (a, ya), (b, yb) = runs
    assert a.device.type == "cuda" and ya.device.type == "cuda"
    assert torch.equal(a, b) and torch.equal(ya, yb)
    if option != "none":
        state = aug.rng_state()
        expected = aug(images, labels)
        fresh = _augment(compose_tmp, f"augment={option}", "seed=7").cuda()
        fresh.fit(images.cpu())
        fresh.set_rng_state(state)
        got = fresh(images, labels)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def _per_image_reference(op, x: torch.Tensor, draws: list[list]) -> torch.Tensor:
    """What ``op`` does to each CPU image with these draws, one image at a time through torchvision's
    functional transforms (the per-image PIL-era pipeline, on tensors)."""
    out = []
    for i, image in enumerate(x):
        d = [v[i] for v in draws]
        if isinstance(op, Crop):
            size = op.output_size(image.shape[-1])
            padded = TF.pad(image, [op.padding], padding_mode=op.padding_mode)
            out.append(TF.crop(padded, d[0], d[1], size, size))
        elif isinstance(op, Flip):
            out.append(TF.horizontal_flip(image) if d[0] else image)
        elif isinstance(op, Cutout):
            top, left = d[0] - op.size // 2, d[1] - op.size // 2  # the square clipped at the border
            bottom, right = min(top + op.size, image.shape[-2]), min(left + op.size, image.shape[-1])
            top, left = max(top, 0), max(left, 0)
            out.append(TF.erase(image, top, left, bottom - top, right - left, op.fill) if d[2] else image)
        else:
            top, left, height, width = (int(v) for v in d)
            out.append(
                TF.resized_crop(image, top, left, height, width, list(image.shape[-2:]), antialias=False)
            )
    return torch.stack(out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "op",
    [
        Crop(padding=4),
        Crop(padding=0, scale=0.75),
        Crop(padding=2, padding_mode="reflect"),  # augment=flip_translate's translation
        Flip(),
        AlternatingFlip(),
        Cutout(size=8),
    ],
    ids=lambda o: f"{o!r}{'-reflect' if o.padding_mode == 'reflect' else ''}",
)
def test_ops_on_the_device_equal_the_per_image_cpu_reference_for_the_same_draws(op, device):
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = x if op.on_uint8 else x.float() / 255  # uint8 where the op runs on uint8 (crops, flips): exact pixels
    draws = op.draw(x.to(device), torch.Generator(device).manual_seed(0))
    out, _ = op.apply(x.to(device), None, *draws)
    assert out.device.type == device
    reference = _per_image_reference(op, x, [d.cpu().tolist() for d in draws])
    assert out.dtype == reference.dtype and torch.equal(out.cpu(), reference)


@pytest.mark.parametrize("device", DEVICES)
def test_random_resized_crop_on_the_device_equals_torchvision_resized_crop_of_the_same_windows(device):
    x = _smooth_images(32, seed=3)
    op = RandomResizedCrop()
    draws = op.draw(x.to(device), torch.Generator(device).manual_seed(0))
    out, _ = op.apply(x.to(device), None, *draws)
    reference = _per_image_reference(op, x, [d.cpu().tolist() for d in draws])
    # torchvision clamps at the window's edge, the op samples the image beyond it: compare the interior
    assert (out.cpu()[..., 3:-3, 3:-3] - reference[..., 3:-3, 3:-3]).abs().max() < 1e-4


def test_the_cifar_pipeline_stays_uint8_and_equals_the_float_pipeline_exactly(compose_tmp):
    """Crops and flips on uint8 give exactly the pixels they give on [0, 1] floats, so the fused preprocess
    pass sees the same images as before the uint8 path."""
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(64) % 10
    on_uint8, _ = _augment(compose_tmp, "augment=cifar")(images, labels)
    on_float, _ = _augment(compose_tmp, "augment=cifar")(images.float() / 255, labels)
    assert on_uint8.dtype == torch.uint8 and torch.equal(on_uint8.float() / 255, on_float)


def test_alternating_flips_show_every_image_both_ways_over_any_two_epochs():
    """Jordan 2024 §3.6: epoch e mirrors an image iff its random first-epoch bit XOR (e odd); the bit is the
    image's own (a reshuffled batch gets the same bits, permuted), about half the images start flipped, and
    another seed gives other bits."""
    x = torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    op = AlternatingFlip(seed=0)
    flips = []
    for epoch in range(4):
        op.epoch = epoch
        (flip,) = op.draw(x, torch.Generator())
        flips.append(flip)
    assert torch.all(flips[0] ^ flips[1]) and torch.all(flips[1] ^ flips[2])  # seen both ways in 2 epochs
    assert torch.equal(flips[0], flips[2]) and torch.equal(flips[1], flips[3])
    assert 0.4 < flips[0].float().mean() < 0.6
    perm = torch.randperm(512, generator=torch.Generator().manual_seed(1))
    op.epoch = 0
    assert torch.equal(op.draw(x[perm], torch.Generator())[0], flips[0][perm])
    assert torch.equal(op.draw(x.float() / 255, torch.Generator())[0], flips[0])  # the same bits on floats
    other = AlternatingFlip(seed=1).draw(x, torch.Generator())[0]
    assert 0.3 < (other != flips[0]).float().mean() < 0.7


def test_training_tells_the_augment_ops_the_epoch(compose_tmp, monkeypatch):
    seen = []
    draw = AlternatingFlip.draw
    monkeypatch.setattr(
        AlternatingFlip, "draw", lambda self, x, g: seen.append(self.epoch) or draw(self, x, g)
    )
    cvarch.train(
        compose_tmp(
            "logger=none",
            "augment=flip_translate",
            "trainer.max_epochs=2",
            "data.train_per_class=20",
            "data.batch_size=100",
        )
    )
    assert seen == [0, 0, 1, 1]  # 200 training images: 2 batches an epoch


def test_flip_translate_is_airbenchs_alternating_flip_then_a_reflect_padded_2_pixel_translation(compose_tmp):
    augment = _augment(compose_tmp, "augment=flip_translate")
    assert [type(op) for op in augment.ops.values()] == [AlternatingFlip, Crop]
    crop = augment.ops["translate"]
    assert (crop.padding, crop.padding_mode, crop.output_size(32)) == (2, "reflect", 32)
    assert (augment.padding, augment.padding_mode) == (2, "reflect")


# --- size-like options on small images: fractions of the side, or a clear error (the 8×8 digits) ---

# (option, side) pairs whose defaults cannot apply, and must say so; none today: every size-like default is a
# fraction of the side (crop padding, cutout, TrivialAugment's translation) or a pixel count that fits 8×8
TOO_SMALL: set[tuple[str, int]] = set()


def _digits_like(n: int = 64, size: int = 8, channels: int = 1, seed: int = 0) -> torch.Tensor:
    """uint8 (n, channels, size, size) random images, never 0 (padding) or 127/128 (the 0.5 fill)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(140, 256, (n, channels, size, size), dtype=torch.uint8, generator=gen)


def test_cutout_from_its_config_leaves_part_of_every_8x8_image_unchanged(compose_tmp):
    """The bug: a fixed 16-pixel square blanked every 8×8 digit. The paper's 16 of 32 is half the side."""
    aug = _augment(compose_tmp, "augment=cutout")
    assert aug.output_shape((1, 8, 8)) == (1, 8, 8)
    x = _digits_like()
    out, _ = aug(x, torch.zeros(64))
    unchanged = (out == x / 255).flatten(1)
    assert unchanged.any(dim=1).all()  # part of every image survives …
    assert (~unchanged).any(dim=1).all()  # … and every image is cut (p = 1)
    assert int((~unchanged).sum(dim=1).max()) <= 4 * 4  # at most the 4×4 square: half the side
    out, _ = _augment(compose_tmp, "augment=[cifar,cutout]")(x, torch.zeros(64))
    assert ((out != 0.5) & (out != 0)).flatten(1).any(dim=1).all()  # not an all-grey grid


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["augment=cutout", "augment.ops.cutout.size=16"], r"augment\.ops\.cutout\.size=16 \(pixels\)"),
        (["augment=cifar", "augment.ops.crop.padding=8"], r"augment\.ops\.crop\.padding=8 \(pixels\)"),
        (
            ["augment=flip_translate", "augment.ops.translate.padding=8"],
            r"augment\.ops\.translate\.padding=8",
        ),
        (["augment=alexnet", "augment.ops.crop.scale=0.05"], r"augment\.ops\.crop\.scale=0\.05"),
        (
            ["augment=trivialaugment", "augment.ops.trivialaugment.translate=32"],
            r"augment\.ops\.trivialaugment\.translate=32 \(pixels\)",
        ),
    ],
)
def test_pixel_sizes_larger_than_the_image_raise_naming_the_key_and_the_image_size(
    overrides, message, compose_tmp
):
    aug = _augment(compose_tmp, *overrides)
    with pytest.raises(ValueError, match=message + r".*8×8"):
        aug.output_shape((1, 8, 8))  # as cvarch-train calls it with the data's shape, before any step
    with pytest.raises(ValueError, match=message):
        aug.output_size(8)  # as the LightningModule's set_image_size calls it
    aug.output_shape((3, 32, 32))  # the same pixels fit CIFAR


def test_checks_run_on_the_side_each_op_receives(compose_tmp):
    """AlexNet's crop outputs 7×7 of 8×8 digits: a 0.5 cutout after it is 4 pixels, 8 pixels are too many."""
    aug = _augment(compose_tmp, "augment=[alexnet,cutout]")
    assert aug.output_shape((1, 8, 8)) == (1, 7, 7)
    aug = _augment(compose_tmp, "augment=[alexnet,cutout]", "augment.ops.cutout.size=8")
    with pytest.raises(ValueError, match=r"augment\.ops\.cutout\.size=8 \(pixels\).*7×7"):
        aug.output_shape((1, 8, 8))


@pytest.mark.parametrize("size", [8, 32])
@pytest.mark.parametrize("option", [o for o in OPTIONS if o != "none"])
def test_audit_every_option_fits_8x8_and_32x32_images_or_says_why(option, size, compose_tmp):
    aug = _augment(compose_tmp, f"augment={option}")
    images = _digits_like(n=48, size=size, channels=3)
    labels = torch.arange(48) % 10
    if (option, size) in TOO_SMALL:
        with pytest.raises(ValueError, match=rf"augment\.ops\.\w+\.\w+=.*{size}×{size}"):
            aug.output_shape(images.shape[1:])
        return
    channels, height, width = aug.output_shape(images.shape[1:])
    aug.fit(images)
    x, _ = aug(images, labels)
    assert x.shape == (48, channels, height, width)
    x = x.float() / 255 if x.dtype == torch.uint8 else x
    # no option blanks the images: at most a few (TrivialAugment's widest shift, 32 of 32) are one colour
    blank = (x.flatten(1).amax(dim=1) - x.flatten(1).amin(dim=1)) < 1e-6
    assert int(blank.sum()) <= 2
    if aug.padding:  # the crop's padding, in pixels now, leaves every crop part of the image
        assert aug.padding < height


def test_size_options_are_pixels_as_ints_and_fractions_of_the_side_as_floats():
    from cvarch.augment import pixels

    assert [pixels(0.125, s) for s in (8, 32, 224)] == [1, 4, 28]
    assert [pixels(0.5, s) for s in (8, 32, 224)] == [4, 16, 112]
    assert pixels(0.01, 8) == 1 and pixels(1.0, 8) == 8  # at least a pixel; 1.0 is the side
    assert pixels(0.0625, 8) == 1  # 0.5 pixel rounds half up
    assert pixels(16, 8) == 16  # ints are pixels, checked by the op against the side


def test_fractional_padding_crops_as_the_same_padding_in_pixels():
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    fraction, _ = Crop(padding=0.125)(x, None, torch.Generator().manual_seed(1))
    in_pixels, _ = Crop(padding=4)(x, None, torch.Generator().manual_seed(1))
    assert torch.equal(fraction, in_pixels)
    fraction, _ = Cutout(size=0.25)(x, None, torch.Generator().manual_seed(1))
    in_pixels, _ = Cutout(size=8)(x, None, torch.Generator().manual_seed(1))
    assert torch.equal(fraction, in_pixels)


# --- the timm-style policies: torchvision v2 transforms per image, seeded from the run's generator ---


def _policy_op(compose_tmp, option: str, *overrides: str):
    aug = _augment(compose_tmp, f"augment={option}", *overrides)
    return aug, aug.ops[POLICIES[option]]


@pytest.mark.parametrize("option", POLICIES)
def test_policies_compose_after_the_cifar_crop_and_flip(option, compose_tmp):
    aug = _augment(compose_tmp, f"augment=[{option},cifar]")
    assert list(aug.ops) == ["crop", "flip", POLICIES[option]]  # geometric first, whatever the order given
    images, labels = _labelled_images(n=16)
    x, y = aug(images, labels)
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and torch.equal(y, labels)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("option", POLICIES)
def test_policies_change_images_keep_shape_and_range_and_are_seeded(option, channels, compose_tmp):
    x = _digits_like(n=32, size=16, channels=channels, seed=1)
    labels = torch.arange(32) % 10

    def run(seed: int) -> torch.Tensor:
        aug, _ = _policy_op(compose_tmp, option, f"seed={seed}")
        aug.output_shape(x.shape[1:])
        return aug(x, labels)[0]

    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = run(1)
    assert torch.equal(torch.get_rng_state(), before)  # the global stream (dropout, init) is untouched
    torch.manual_seed(123)
    b = run(1)  # the global state does not matter either
    assert torch.equal(a, b)
    assert not torch.equal(a, run(2))
    assert a.shape == x.shape and a.dtype == torch.float32
    assert 0 <= a.min() and a.max() <= 1
    changed = (a != x / 255).flatten(1).any(dim=1)
    assert changed.float().mean() > 0.25  # most images change (random erasing: half, p = 0.5)


@pytest.mark.parametrize("option", POLICIES)
def test_policies_draw_their_parameters_per_image(option, compose_tmp):
    """torchvision's v2 transforms draw one parameter set per call: copies of one image must still differ."""
    aug, _ = _policy_op(compose_tmp, option)
    one = _smooth_images(1, size=16, seed=2).mul(0.8).add(0.1)
    x = one.expand(32, -1, -1, -1).contiguous()
    out, _ = aug(x, torch.zeros(32))
    distinct = {tuple(image.flatten().tolist()) for image in out}
    assert len(distinct) >= 8


@pytest.mark.parametrize("option", POLICIES)
def test_policies_resume_from_the_generator_state(option, compose_tmp):
    x, labels = _digits_like(n=8, size=16, channels=3), torch.zeros(8)
    aug, _ = _policy_op(compose_tmp, option)
    aug(x, labels)
    state = aug.rng_state()
    expected, _ = aug(x, labels)
    resumed, _ = _policy_op(compose_tmp, option, "seed=99")
    resumed.set_rng_state(state)
    assert torch.equal(resumed(x, labels)[0], expected)


@pytest.mark.parametrize(
    "op",
    [
        RandAugment(),
        TrivialAugment(),
        AutoAugment("cifar10"),
        AutoAugment("imagenet"),
        ColorJitter(hue=0.1),
    ],
    ids=lambda o: type(o).__name__ + getattr(o, "policy", ""),
)
def test_per_image_ops_are_torchvision_v2_transforms_seeded_from_the_generator(op):
    """Image i is torchvision's transform of image i with the global generator seeded by draw i (32×32:
    TrivialAugment's translation of 1.0 of the side is torchvision's 32 pixels)."""
    x = _smooth_images(12, size=32, seed=4)
    out, _ = op(x, None, torch.Generator().manual_seed(5))
    seeds = torch.randint(0, 2**62, (12,), generator=torch.Generator().manual_seed(5)).tolist()
    reference = {
        "RandAugment": v2.RandAugment(num_ops=2, magnitude=9),
        "TrivialAugment": v2.TrivialAugmentWide(),
        "AutoAugment": v2.AutoAugment(v2.AutoAugmentPolicy(getattr(op, "policy", "imagenet"))),
        "ColorJitter": v2.ColorJitter(0.4, 0.4, 0.4, 0.1),
    }[type(op).__name__]
    for i, seed in enumerate(seeds):
        torch.manual_seed(seed)
        assert torch.equal(out[i], reference(x[i])), i


def test_trivialaugment_translation_is_the_papers_32_pixels_on_cifar_and_scales_with_the_side():
    space = TrivialAugment().transform._AUGMENTATION_SPACE
    for side, most in ((32, 32.0), (8, 8.0), (224, 224.0)):
        assert space["TranslateX"][0](31, side, side).max().item() == most
    assert (
        TrivialAugment(translate=32).transform._AUGMENTATION_SPACE["TranslateY"][0](31, 224, 224).max() == 32
    )
    reference = v2.TrivialAugmentWide._AUGMENTATION_SPACE  # every other op as torchvision's
    assert list(space) == list(reference)
    assert all(space[k] is reference[k] for k in reference if not k.startswith("Translate"))


def test_random_erasing_erases_one_box_of_the_configured_area_with_probability_p():
    x = torch.full((400, 3, 32, 32), 0.25)
    out, _ = RandomErasing(p=0.5, value=0.75)(x, None, torch.Generator().manual_seed(0))
    erased = (out == 0.75)[:, 0]
    assert torch.equal((out == 0.75)[:, 0], (out == 0.75)[:, 2])  # every channel
    hit = erased.flatten(1).any(dim=1)
    assert 0.4 < hit.float().mean() < 0.6  # p = 0.5
    for m in erased[hit]:
        rows, cols = m.any(dim=1).nonzero().flatten(), m.any(dim=0).nonzero().flatten()
        assert int(m.sum()) == len(rows) * len(cols)  # one rectangle, inside the image
        area = len(rows) * len(cols) / (32 * 32)
        assert 0.01 < area < 0.36  # 0.02–0.33 of the area, up to rounding of the sides
        assert 0.2 < len(rows) / len(cols) < 5  # ratio 0.3–3.3, up to rounding
    noisy, _ = RandomErasing(p=1.0)(x, None, torch.Generator().manual_seed(0))
    assert 0 <= noisy.min() and noisy.max() <= 1
    assert (noisy != 0.25).flatten(1).any(dim=1).float().mean() > 0.95  # random values, per pixel
    assert torch.equal(RandomErasing(p=0.0)(x, None, torch.Generator())[0], x)


def test_color_jitter_leaves_one_channel_images_saturation_and_hue_alone():
    x = _smooth_images(16, size=8, seed=1)[:, :1]
    jitter = ColorJitter(brightness=0.0, contrast=0.0, saturation=0.9, hue=0.5)
    assert torch.equal(jitter(x, None, torch.Generator().manual_seed(0))[0], x)


def test_policy_configs_say_what_they_build(compose_tmp):
    for option, key in POLICIES.items():
        node = compose_tmp(f"augment={option}").augment.ops[key]
        assert re.fullmatch(r"cvarch\.augment\.\w+", node._target_)
    assert _augment(compose_tmp, "augment=autoaugment_cifar").ops["autoaugment"].policy == "cifar10"
    assert _augment(compose_tmp, "augment=autoaugment_imagenet").ops["autoaugment"].policy == "imagenet"
    randaugment = _augment(compose_tmp, "augment=randaugment").ops["randaugment"]
    assert (randaugment.num_ops, randaugment.magnitude) == (2, 9)  # torchvision's defaults
    jitter = _augment(compose_tmp, "augment=color_jitter").ops["color_jitter"]
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (0.4, 0.4, 0.4, 0.0)
    erasing = _augment(compose_tmp, "augment=random_erasing").ops["random_erasing"]
    assert (erasing.p, erasing.scale, erasing.ratio) == (0.5, (0.02, 0.33), (0.3, 3.3))
