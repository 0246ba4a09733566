"""Data modules: real digits splits, image folders (with corrupt files and caching), FakeData, real CIFAR-10."""

from __future__ import annotations

import os
import time

import pytest
import torch

from cvarch.data import DigitsDataModule, FakeDataModule, ImageFolderDataModule, Split, carve
from tests.conftest import make_image_tree


def digits(**kwargs) -> DigitsDataModule:
    return DigitsDataModule(num_classes=10, channels=1, **kwargs)


def test_digits_are_the_real_1797_images_split_stratified_and_disjoint():
    dm = digits()
    dm.setup()
    sizes = {k: len(v) for k, v in dm.splits.items()}
    assert sum(sizes.values()) == 1797
    assert sizes["test"] == 270 and sizes["val"] == 270
    from sklearn.datasets import load_digits

    raw = torch.from_numpy(load_digits().images)
    assert dm.image_shape == (1, 8, 8)
    # the splits partition the real images exactly: pixels 0–16 mapped to 0–255, each image in one split
    real = torch.round(raw.flatten(1) * 255 / 16).to(torch.uint8)
    ours = torch.cat([s.images.flatten(1) for s in dm.splits.values()])
    assert sorted(map(tuple, ours.tolist())) == sorted(map(tuple, real.tolist()))
    for split in dm.splits.values():  # stratified: each class's share within 2 points of the whole set's
        counts = torch.bincount(split.targets, minlength=10).float() / len(split)
        assert torch.all((counts - 0.1).abs() < 0.02)


def test_digit_split_is_fixed_by_split_seed_not_by_the_run_seed():
    a, b, c = digits(), digits(), digits(split_seed=1)
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.splits["test"].images, b.splits["test"].images)
    assert not torch.equal(a.splits["test"].images, c.splits["test"].images)


def test_image_size_resizes_once_at_load():
    dm = digits(image_size=32)
    assert dm.image_shape == (1, 32, 32)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (1, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.long


def test_imagefolder_carves_val_and_test_when_absent(image_tree, tmp_path):
    dm = ImageFolderDataModule(
        root=str(image_tree),
        num_classes=3,
        channels=3,
        val_fraction=0.2,
        test_fraction=0.2,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.setup()
    assert dm.classes == ["cat", "dog", "fox"]
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 18, "val": 6, "test": 6}
    assert dm.image_shape == (3, 12, 12)
    # labels follow the folders: class k was drawn around 60·k
    means = dm.splits["train"].images.float().mean(dim=(1, 2, 3))
    for k in range(3):
        assert abs(means[dm.splits["train"].targets == k].mean() - (60 * k + 19.5)) < 3


def test_imagefolder_uses_its_own_val_folder(tmp_path):
    root = make_image_tree(tmp_path / "tree", per_class=10)
    make_image_tree(root, per_class=4, split="val")
    dm = ImageFolderDataModule(root=str(root), num_classes=3, channels=3, test_fraction=0.2)
    dm.setup()
    assert len(dm.splits["val"]) == 12 and len(dm.splits["train"]) == 24 and len(dm.splits["test"]) == 6


def test_imagefolder_missing_root_is_an_error_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        ImageFolderDataModule(root=str(tmp_path / "nowhere"), num_classes=3, channels=3)


def test_imagefolder_wrong_num_classes_is_an_error(image_tree):
    with pytest.raises(ValueError, match=r"data\.num_classes=10 but .* has 3 class folders"):
        ImageFolderDataModule(root=str(image_tree), num_classes=10, channels=3)


def test_imagefolder_corrupt_file_is_an_error_naming_the_file(image_tree):
    bad = image_tree / "train" / "dog" / "005.png"
    bad.write_bytes(b"this is not an image")
    dm = ImageFolderDataModule(
        root=str(image_tree), num_classes=3, channels=3, val_fraction=0.2, test_fraction=0.2
    )
    with pytest.raises(ValueError, match=f"not a decodable image: {bad}"):
        dm.setup()


def test_imagefolder_mixed_sizes_need_image_size(image_tree):
    make_image_tree(image_tree, classes=("cat",), per_class=1, size=20)  # overwrites cat/000.png at 20×20
    kwargs = dict(root=str(image_tree), num_classes=3, channels=3, val_fraction=0.2, test_fraction=0.2)
    with pytest.raises(ValueError, match="set data.image_size"):
        ImageFolderDataModule(**kwargs).setup()
    dm = ImageFolderDataModule(image_size=16, **kwargs)
    assert dm.image_shape == (3, 16, 16)


def test_imagefolder_cache_is_reused_and_invalidated_by_a_changed_file(image_tree, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    kwargs = dict(
        root=str(image_tree),
        num_classes=3,
        channels=3,
        val_fraction=0.2,
        test_fraction=0.2,
        cache_dir=str(cache),
    )
    first = ImageFolderDataModule(**kwargs)
    first.setup()
    assert len(list(cache.glob("*.pt"))) == 1

    decoded = []
    import cvarch.data as data

    real = data.decode_image_file
    monkeypatch.setattr(data, "decode_image_file", lambda *a: decoded.append(a) or real(*a))
    second = ImageFolderDataModule(**kwargs)
    second.setup()
    assert decoded == []  # no JPEG/PNG is decoded again
    for name in first.splits:
        assert torch.equal(first.splits[name].images, second.splits[name].images)

    changed = image_tree / "train" / "fox" / "003.png"
    make_image_tree(tmp_path / "other", classes=("x",), per_class=4)
    changed.write_bytes((tmp_path / "other" / "train" / "x" / "003.png").read_bytes())
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    third = ImageFolderDataModule(**kwargs)
    third.setup()
    assert len(decoded) == 30  # the change invalidated the cache: everything was decoded anew
    assert len(list(cache.glob("*.pt"))) == 2


def test_max_per_class_keeps_the_first_files(image_tree):
    dm = ImageFolderDataModule(
        root=str(image_tree), num_classes=3, channels=3, max_per_class=5, val_fraction=0.2, test_fraction=0.2
    )
    dm.setup()
    assert sum(len(s) for s in dm.splits.values()) == 15


def test_carve_refuses_a_split_too_small_for_its_classes():
    split = Split(torch.zeros(20, 1, 2, 2, dtype=torch.uint8), torch.arange(20) % 10)
    with pytest.raises(ValueError, match=r"data\.val_fraction: holding out 2 of 20"):
        carve(split, 0.1, 0, "data.val_fraction")


def test_fake_data_has_the_configured_shapes():
    dm = FakeDataModule(num_classes=5, channels=3, image_size=16, train_size=20, val_size=10, test_size=10)
    x, y = next(iter(dm.train_dataloader()))
    assert dm.image_shape == (3, 16, 16) and x.dtype == torch.uint8 and int(y.max()) < 5


def test_dataloaders_yield_the_stored_uint8_images_unchanged():
    # augmentation is the LightningModule's job, batched on the device (tests/test_module.py)
    dm = digits(batch_size=2000)
    x_val, y_val = next(iter(dm.val_dataloader()))
    assert torch.equal(x_val, dm.splits["val"].images) and torch.equal(y_val, dm.splits["val"].targets)


@pytest.mark.slow
def test_real_cifar10_folder(cifar_root, tmp_path):
    dm = ImageFolderDataModule(
        root=str(cifar_root), num_classes=10, channels=3, max_per_class=100, cache_dir=str(tmp_path / "cache")
    )
    dm.setup()
    assert dm.classes[:3] == ["airplane", "automobile", "bird"]
    assert dm.image_shape == (3, 32, 32)
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 800, "val": 100, "test": 100}
    for split in dm.splits.values():
        assert torch.equal(torch.bincount(split.targets, minlength=10), torch.full((10,), len(split) // 10))
    # real photos, not noise: neighbouring pixels are strongly correlated
    x = dm.splits["train"].images.float()
    a, b = x[..., :-1].flatten(), x[..., 1:].flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.8


class StubCIFAR:
    """Stands in for torchvision's CIFAR10 (no download): 100 images per class for train, 20 for test."""

    classes = [f"c{i}" for i in range(10)]

    def __init__(self, root, train, download):
        n = 100 if train else 20
        self.targets = [i % 10 for i in range(10 * n)]
        self.data = (
            torch.arange(10 * n * 32 * 32 * 3).remainder(251).to(torch.uint8).reshape(-1, 32, 32, 3).numpy()
        )


def test_cifar_module_carves_a_stratified_val_split_and_keeps_the_official_test(monkeypatch):
    from torchvision import datasets

    from cvarch.data import CIFARDataModule

    monkeypatch.setattr(datasets, "CIFAR10", StubCIFAR)
    dm = CIFARDataModule(root="unused", num_classes=10, channels=3, val_size=100)
    dm.setup()
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 900, "val": 100, "test": 200}
    assert torch.equal(torch.bincount(dm.splits["val"].targets), torch.full((10,), 10))
    assert dm.image_shape == (3, 32, 32) and dm.classes == StubCIFAR.classes
    # NHWC arrays become NCHW tensors without reordering pixels
    assert torch.equal(
        dm.splits["test"].images[0].permute(1, 2, 0), torch.from_numpy(StubCIFAR("", False, False).data[0])
    )


def test_cifar_without_archive_or_network_names_the_root(tmp_path):
    from cvarch.data import CIFARDataModule

    dm = CIFARDataModule(root=str(tmp_path), download=False, num_classes=10, channels=3)
    with pytest.raises(FileNotFoundError, match=f"data.root: cifar10 is not in {tmp_path}"):
        dm.prepare_data()
