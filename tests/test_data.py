"""Data modules: real digits splits, image folders (with corrupt files and caching), FakeData, real CIFAR-10,
and the transfer-learning options: train_per_class, class selection, RGB digits."""

from __future__ import annotations

import os
import re
import time
from types import SimpleNamespace

import pytest
import torch
from torchvision.io import decode_image, write_jpeg

import cvarch
from cvarch.data import (
    BatchLoader,
    DigitsDataModule,
    FakeDataModule,
    ImageFolderDataModule,
    Split,
    carve,
    decode,
    imagefolder,
    per_class_subset,
    stream,
)
from tests.conftest import make_image_tree, tmp_overrides


def digits(**kwargs) -> DigitsDataModule:
    return DigitsDataModule(**{"num_classes": 10, "channels": 1, **kwargs})


def folder(root, **kwargs) -> ImageFolderDataModule:
    """The 3-class image tree with 20% val and 20% test carved (arguments override)."""
    return ImageFolderDataModule(
        **{
            "root": str(root),
            "num_classes": 3,
            "channels": 3,
            "val_fraction": 0.2,
            "test_fraction": 0.2,
            **kwargs,
        }
    )


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
    dm = folder(image_tree, cache_dir=str(tmp_path / "cache"))
    dm.setup()
    assert dm.classes == ["cat", "dog", "fox"]
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 18, "val": 6, "test": 6}
    assert dm.image_shape == (3, 12, 12)
    # labels follow the folders: class k was drawn around 60·k
    means = dm.splits["train"].images.float().mean(dim=(1, 2, 3))
    for k in range(3):
        assert abs(means[dm.splits["train"].targets == k].mean() - (60 * k + 19.5)) < 3


def test_val_fraction_0_trains_on_every_non_test_image_and_keeps_the_same_test_split(image_tree, tmp_path):
    """airbench trains on all of train: data.val_fraction=0 leaves validation empty and the carved test split
    exactly the one a validated run is scored on (the digits module does the same)."""
    carved = folder(image_tree, cache_dir=str(tmp_path / "cache"))
    carved.setup()
    whole = folder(image_tree, cache_dir=str(tmp_path / "cache"), val_fraction=0.0)
    whole.setup()
    assert {k: len(v) for k, v in whole.splits.items()} == {"train": 24, "val": 0, "test": 6}
    assert torch.equal(whole.splits["test"].images, carved.splits["test"].images)
    assert len(whole.val_dataloader()) == 0
    no_val = digits(val_fraction=0.0)
    no_val.setup()
    assert len(no_val.splits["val"]) == 0 and len(no_val.splits["train"]) + len(no_val.splits["test"]) == 1797


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
    real = decode.decode_image_file
    monkeypatch.setattr(decode, "decode_image_file", lambda *a: decoded.append(a) or real(*a))
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


def test_a_cache_file_that_would_run_code_is_refused_naming_the_cache_dir(image_tree, tmp_path):
    """The cache is read as checkpoints are (cvarch.checkpoint.load_checkpoint_file): a shared cache folder is
    data, and a file whose unpickling would run code is refused before any of it runs."""
    kwargs = dict(root=str(image_tree), num_classes=3, channels=3, cache_dir=str(tmp_path / "cache"))
    ImageFolderDataModule(**kwargs).setup()
    (path,) = (tmp_path / "cache").glob("*.pt")
    torch.save({"classes": SimpleNamespace(), "splits": {}}, path)  # a pickled object, not tensors
    refused = rf"data\.cache_dir: {re.escape(str(path))} cannot be loaded with weights_only=True"
    with pytest.raises(ValueError, match=refused):
        ImageFolderDataModule(**kwargs).setup()


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


# --- transfer learning: train_per_class, data.classes, RGB digits, the 2×2 data options ---------------------


def test_train_per_class_keeps_exactly_n_per_class_and_leaves_val_test_alone():
    full, few = digits(), digits(train_per_class=10)
    for dm in (full, few):
        dm.setup()
    assert torch.equal(torch.bincount(few.splits["train"].targets), torch.full((10,), 10))
    for name in ("val", "test"):  # little- and more-data runs are scored on the very same images
        assert torch.equal(few.splits[name].images, full.splits[name].images)
        assert torch.equal(few.splits[name].targets, full.splits[name].targets)
    # the kept images are drawn from the full training split, in its order
    index = per_class_subset(full.splits["train"].targets, 10, seed=0)
    assert torch.equal(few.splits["train"].images, full.splits["train"].images[index])
    assert list(index) == sorted(index)


def test_train_per_class_is_fixed_by_split_seed_and_little_is_inside_more():
    targets = torch.arange(300) % 3
    a, b = per_class_subset(targets, 20, seed=0), per_class_subset(targets, 20, seed=0)
    other = per_class_subset(targets, 20, seed=1)
    more = per_class_subset(targets, 60, seed=0)
    assert list(a) == list(b) and set(a) != set(other)
    assert set(a) < set(more)
    assert torch.equal(torch.bincount(targets[more]), torch.full((3,), 60))
    # through the module: split_seed changes which training images are kept
    x, y = digits(train_per_class=5), digits(train_per_class=5, split_seed=1)
    assert not torch.equal(x.train_images, y.train_images)


def test_a_split_sweep_reads_one_cached_decode_and_gets_its_own_splits(image_tree, tmp_path, monkeypatch):
    kwargs = dict(root=str(image_tree), num_classes=3, channels=3, cache_dir=str(tmp_path / "cache"))
    first = ImageFolderDataModule(**kwargs)
    first.setup()
    decoded = []
    real = decode.decode_image_file
    monkeypatch.setattr(decode, "decode_image_file", lambda *a: decoded.append(a) or real(*a))
    other_seed = ImageFolderDataModule(split_seed=3, **kwargs)
    other_seed.setup()
    bigger_val = ImageFolderDataModule(val_fraction=0.3, **kwargs)
    bigger_val.setup()
    assert decoded == [] and len(list((tmp_path / "cache").glob("*.pt"))) == 1  # one decode serves all
    assert not torch.equal(other_seed.splits["test"].images, first.splits["test"].images)  # another carve
    sizes = {name: len(split) for name, split in first.splits.items()}
    assert sizes == {"train": 24, "val": 3, "test": 3}
    bigger = {name: len(split) for name, split in bigger_val.splits.items()}
    assert bigger == {"train": 18, "val": 9, "test": 3}


def test_train_per_class_shares_the_cache_of_the_full_data(image_tree, tmp_path, monkeypatch):
    kwargs = dict(root=str(image_tree), num_classes=3, channels=3, val_fraction=0.2, test_fraction=0.2)
    full = ImageFolderDataModule(cache_dir=str(tmp_path / "cache"), **kwargs)
    full.setup()
    decoded = []
    real = decode.decode_image_file
    monkeypatch.setattr(decode, "decode_image_file", lambda *a: decoded.append(a) or real(*a))
    few = ImageFolderDataModule(cache_dir=str(tmp_path / "cache"), train_per_class=2, **kwargs)
    few.setup()
    assert decoded == [] and len(list((tmp_path / "cache").glob("*.pt"))) == 1
    assert len(full.splits["train"]) == 18 and len(few.splits["train"]) == 6
    assert torch.equal(few.splits["test"].images, full.splits["test"].images)


def test_train_per_class_beyond_a_class_is_an_error_naming_key_and_class(image_tree):
    dm = folder(image_tree, train_per_class=7)
    with pytest.raises(
        ValueError, match=r"data\.train_per_class=7 but class 'cat' has only 6 training images"
    ):
        dm.setup()
    with pytest.raises(ValueError, match=r"data\.train_per_class must be >= 1"):
        digits(train_per_class=0)


def test_imagefolder_classes_selects_folders_and_labels_them_in_order(image_tree):
    dm = ImageFolderDataModule(
        root=str(image_tree),
        num_classes=2,
        channels=3,
        classes=["fox", "cat"],
        val_fraction=0.2,
        test_fraction=0.2,
    )
    dm.setup()
    assert dm.classes == ["fox", "cat"]
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 12, "val": 4, "test": 4}
    # make_image_tree draws class k around 60·k + 19.5: fox (k=2) is now label 0, cat (k=0) label 1
    means = dm.splits["train"].images.float().mean(dim=(1, 2, 3))
    targets = dm.splits["train"].targets
    assert abs(means[targets == 0].mean() - 139.5) < 3 and abs(means[targets == 1].mean() - 19.5) < 3


def test_imagefolder_classes_ignores_other_folders_of_val_but_not_unknown_ones(tmp_path):
    root = make_image_tree(tmp_path / "tree", per_class=10)
    make_image_tree(root, per_class=4, split="val")
    dm = ImageFolderDataModule(root=str(root), num_classes=1, channels=3, classes=["dog"], test_fraction=0.2)
    dm.setup()
    assert len(dm.splits["val"]) == 4 and torch.equal(
        dm.splits["val"].targets, torch.zeros(4, dtype=torch.long)
    )
    make_image_tree(root, classes=("wolf",), per_class=1, split="val")
    with pytest.raises(ValueError, match=r"has class folders that train/ lacks: \['wolf'\]"):
        ImageFolderDataModule(root=str(root), num_classes=1, channels=3, classes=["dog"])


@pytest.mark.parametrize("split", ["val", "test"])
def test_imagefolder_val_or_test_lacking_a_training_class_is_an_error_naming_the_folder(tmp_path, split):
    root = make_image_tree(tmp_path / "tree", per_class=4)
    make_image_tree(root, classes=("cat", "fox"), per_class=2, split=split)
    with pytest.raises(ValueError, match=rf"{root / split} lacks class folders that train/ has: \['dog'\]"):
        ImageFolderDataModule(root=str(root), num_classes=3, channels=3)
    # with data.classes, only the chosen classes must be there
    dm = ImageFolderDataModule(root=str(root), num_classes=2, channels=3, classes=["fox", "cat"])
    assert dm.classes == ["fox", "cat"]


def test_imagefolder_unknown_class_or_wrong_count_is_an_error_naming_data_classes(image_tree):
    with pytest.raises(ValueError, match=r"data\.classes: \['wolf'\] .*available: \['cat', 'dog', 'fox'\]"):
        ImageFolderDataModule(root=str(image_tree), num_classes=2, channels=3, classes=["cat", "wolf"])
    with pytest.raises(ValueError, match=r"data\.num_classes=3 but data\.classes lists 2 classes"):
        ImageFolderDataModule(root=str(image_tree), num_classes=3, channels=3, classes=["cat", "dog"])
    with pytest.raises(ValueError, match=r"data\.classes lists \['cat'\] more than once"):
        ImageFolderDataModule(root=str(image_tree), num_classes=2, channels=3, classes=["cat", "cat"])


def test_digits_with_three_channels_replicate_the_grey_digit():
    grey, rgb = digits(image_size=32), digits(image_size=32, channels=3)
    for dm in (grey, rgb):
        dm.setup()
    images = rgb.splits["train"].images
    assert images.shape == (len(grey.splits["train"]), 3, 32, 32)
    assert torch.equal(images, grey.splits["train"].images.expand(-1, 3, -1, -1))
    with pytest.raises(ValueError, match=r"data\.channels must be 1 .* or 3 .*, got 2"):
        digits(channels=2)


TRANSFER_OPTIONS = ("cifar10_first5", "cifar10_last5", "digits_rgb32")


def test_transfer_data_options_compose_and_split_cifar10_in_two(compose_tmp):
    data = {name: compose_tmp(f"data={name}").data for name in TRANSFER_OPTIONS}
    first, last = list(data["cifar10_first5"].classes), list(data["cifar10_last5"].classes)
    assert first == ["airplane", "automobile", "bird", "cat", "deer"]
    assert not set(first) & set(last)
    # together, in order, the ten CIFAR-10 classes (torchvision's CIFAR10.classes)
    assert first + last == [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    for name in ("cifar10_first5", "cifar10_last5"):
        assert (
            data[name].num_classes == 5 and data[name].max_per_class == 1250 and data[name].image_size == 32
        )
    assert data["digits_rgb32"].channels == 3 and data["digits_rgb32"].image_size == 32
    assert all(d.train_per_class is None for d in data.values())
    from hydra.utils import instantiate

    dm = instantiate(data["digits_rgb32"])
    assert dm.image_shape == (3, 32, 32) and dm.num_classes == 10


@pytest.mark.slow
def test_real_cifar10_first5_gives_1000_125_125_per_class(cifar_root, compose_tmp):
    from hydra.utils import instantiate

    cfg = compose_tmp("data=cifar10_first5", f"data.root={cifar_root}")
    dm = instantiate(cfg.data)
    dm.setup()
    assert dm.classes == ["airplane", "automobile", "bird", "cat", "deer"] and dm.image_shape == (3, 32, 32)
    for name, per_class in {"train": 1000, "val": 125, "test": 125}.items():
        assert torch.equal(torch.bincount(dm.splits[name].targets), torch.full((5,), per_class))
    few = instantiate(cfg.data, train_per_class=100)  # the "little data" cell: same val/test, from the cache
    few.setup()
    assert len(few.splits["train"]) == 500 and torch.equal(
        few.splits["test"].images, dm.splits["test"].images
    )


class _Trainer:  # what ImageDataModule.world reads from the Trainer
    def __init__(self, world_size: int, global_rank: int) -> None:
        self.world_size, self.global_rank = world_size, global_rank


def _first_batch(world_size: int, rank: int, epoch: int = 0) -> torch.Tensor:
    dm = FakeDataModule(train_size=100, image_size=4, num_classes=10, channels=1, batch_size=20)
    dm.trainer = _Trainer(world_size, rank) if world_size > 1 else None
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)  # what Lightning's fit loop does each epoch
    images, _ = next(iter(loader))
    return images


def test_the_training_order_is_a_function_of_seed_and_epoch_and_ddp_shards_the_same_global_batch(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "3")  # seed_everything's seed, as Lightning's own samplers read it
    torch.manual_seed(0)
    one = _first_batch(1, 0)
    torch.manual_seed(1)  # the global RNG (what init or dropout consumed) does not move the order
    assert torch.equal(_first_batch(1, 0), one)
    assert not torch.equal(_first_batch(1, 0, epoch=1), one)  # a new order each epoch
    shards = [_first_batch(2, rank) for rank in (0, 1)]
    assert [len(s) for s in shards] == [10, 10]  # batch_size is the global batch
    key = lambda t: sorted(t.flatten(1).tolist())  # noqa: E731
    assert key(torch.cat(shards)) == key(one)  # the two processes' batches = one process's batch
    monkeypatch.setenv("PL_GLOBAL_SEED", "4")
    assert not torch.equal(_first_batch(1, 0), one)


def test_a_global_batch_that_does_not_split_evenly_names_the_key():
    dm = FakeDataModule(train_size=30, image_size=4, num_classes=10, channels=1, batch_size=15)
    dm.trainer = _Trainer(2, 0)
    with pytest.raises(ValueError, match=r"data.batch_size=15 is the global batch.*2 processes"):
        dm.train_dataloader()


def test_the_loader_yields_every_training_index_once_an_epoch_as_whole_batches(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    dm = FakeDataModule(train_size=100, image_size=2, num_classes=10, channels=1, batch_size=16)
    dm.setup()
    n = len(dm.splits["train"])
    dm.splits["train"].images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()
    orders = []
    for world in (1, 2):
        for epoch in (0, 1, 0):
            seen = []
            for rank in range(world):
                dm.trainer = _Trainer(world, rank) if world > 1 else None
                loader = dm.train_dataloader()
                loader.sampler.set_epoch(epoch)
                batches = list(loader)
                assert all(x.shape[0] <= 16 // world and x.dtype == torch.uint8 for x, _ in batches)
                seen += [int(i) for x, _ in batches for i in x[:, 0, 0, 0]]
            assert sorted(seen) == list(range(n)), (world, epoch)  # each index exactly once
            orders.append(seen)
    assert (
        orders[0] == orders[2] and orders[0] != orders[1]
    )  # same seed and epoch: same order; next epoch: new


def test_in_memory_splits_are_batched_by_index_without_a_dataloader():
    dm = FakeDataModule(train_size=50, val_size=20, image_size=4, num_classes=10, channels=3, batch_size=16)
    loader = dm.val_dataloader()
    assert isinstance(loader, BatchLoader) and len(loader) == 2  # ceil(20 / 16)
    images = torch.cat([x for x, _ in loader])
    assert torch.equal(images, dm.splits["val"].images)  # evaluation keeps the split's order


def test_on_device_and_stream_name_their_keys():
    with pytest.raises(ValueError, match="data.on_device must be true, false or auto"):
        FakeDataModule(image_size=4, num_classes=10, channels=3, on_device="gpu")
    with pytest.raises(ValueError, match="data.stream must be true, false or auto"):
        ImageFolderDataModule(root="unused", num_classes=3, channels=3, stream="yes")


def _stream_and_memory(root, **kwargs):
    common = dict(root=str(root), num_classes=3, channels=3, batch_size=8, num_workers=0, **kwargs)
    return ImageFolderDataModule(stream=True, **common), ImageFolderDataModule(stream=False, **common)


def test_a_streamed_folder_gives_the_splits_and_batches_of_the_in_memory_one(image_tree, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    streamed, in_memory = _stream_and_memory(image_tree)
    assert streamed.streamed and not in_memory.streamed
    assert streamed.image_shape == in_memory.image_shape == (3, 12, 12)
    for split in ("train", "val", "test"):  # the same carve, file by file
        assert torch.equal(streamed.splits[split].targets, in_memory.splits[split].targets)
    for shuffle in (True, False):
        a = list(streamed.dataloader("train", shuffle=shuffle))
        b = list(in_memory.dataloader("train", shuffle=shuffle))
        assert len(a) == len(b) and all(
            torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b, strict=True)
        )
    # too few images for a sample: the statistics are fitted on all of them
    assert torch.equal(streamed.train_images, in_memory.train_images)


def test_a_streamed_folder_fits_statistics_on_a_seeded_sample(image_tree, monkeypatch):
    monkeypatch.setattr(stream, "STREAM_FIT_IMAGES", 5)
    streamed, in_memory = _stream_and_memory(image_tree)
    sample = streamed.train_images
    assert sample.shape == (5, 3, 12, 12) and torch.equal(sample, streamed.train_images)  # drawn once
    rows = {tuple(image.flatten().tolist()) for image in in_memory.train_images}
    assert all(tuple(image.flatten().tolist()) in rows for image in sample)  # training images only


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_a_truncated_file_of_a_streamed_folder_is_named_before_any_training(image_tree, tmp_path, kind):
    from torchvision.io import encode_jpeg

    bad = image_tree / "train" / "dog" / "005.png"
    if kind == "jpeg":  # a JPEG whose last bytes (and end marker) were never copied
        jpeg = encode_jpeg(torch.full((3, 12, 12), 90, dtype=torch.uint8)).numpy().tobytes()
        bad.unlink()
        bad = bad.with_suffix(".jpg")
        bad.write_bytes(jpeg[: len(jpeg) - 40])
    else:
        bad.write_bytes(bad.read_bytes()[:-20])
    cfg = cvarch.compose(*tmp_overrides(tmp_path), "data=imagefolder", f"data.root={image_tree}",
                         "data.num_classes=3", "data.stream=true", "logger=none")  # fmt: skip
    with pytest.raises(ValueError, match=rf"not a decodable image: {re.escape(str(bad))} \(truncated"):
        cvarch.train(cfg)
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing trained


def test_checking_a_streamed_folder_reads_no_image_data(image_tree, monkeypatch):
    decoded = []
    monkeypatch.setattr(decode, "decode_image_file", lambda *a: decoded.append(a))
    streamed = ImageFolderDataModule(root=str(image_tree), num_classes=3, channels=3, stream=True)
    streamed.setup()
    assert decoded == [] and len(streamed.splits["train"]) == 24


def test_stream_auto_streams_a_tree_bigger_than_half_the_free_memory(image_tree, monkeypatch):
    decoded = 3 * 12 * 12 * 30  # 30 images of 3×12×12 bytes
    monkeypatch.setattr(imagefolder, "available_memory", lambda device: 2 * decoded - 2)
    assert ImageFolderDataModule(root=str(image_tree), num_classes=3, channels=3).streamed
    monkeypatch.setattr(imagefolder, "available_memory", lambda device: 2 * decoded)
    assert not ImageFolderDataModule(root=str(image_tree), num_classes=3, channels=3).streamed


def test_a_streamed_image_of_another_size_is_an_error_naming_the_file(image_tree):
    odd = image_tree / "train" / "dog" / "004.png"
    make_image_tree(image_tree / "odd", classes=("dog",), per_class=1, size=10)
    (image_tree / "odd" / "train" / "dog" / "000.png").replace(odd)
    streamed, _ = _stream_and_memory(image_tree, val_fraction=0.2, test_fraction=0.2)
    with pytest.raises(ValueError, match=r"004.png is \(10, 10\).*data.image_size"):
        for split in ("train", "val", "test"):  # wherever the carve put it
            list(streamed.dataloader(split))


@pytest.mark.slow
def test_training_on_a_streamed_folder_with_worker_processes(image_tree, compose_tmp):
    import cvarch

    cfg = compose_tmp(
        "data=imagefolder", f"data.root={image_tree}", "data.num_classes=3", "data.stream=true",
        "data.num_workers=2", "data.batch_size=8", "augment=cifar", "model=resnet20", "trainer.max_epochs=1",
        "logger=csv",
    )  # fmt: skip
    metrics = cvarch.train(cfg)
    assert metrics["epochs"] == 1 and metrics["test/acc"] is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("on_device", [True, False])
def test_batches_come_from_the_gpu_or_from_pinned_host_memory(on_device):
    dm = FakeDataModule(train_size=64, image_size=8, num_classes=10, channels=3, on_device=on_device)
    dm.trainer = SimpleNamespace(
        world_size=1, global_rank=0, strategy=SimpleNamespace(root_device=torch.device("cuda", 0))
    )
    x, y = next(iter(dm.train_dataloader()))
    if on_device:
        assert x.is_cuda and y.is_cuda
    else:
        assert not x.is_cuda and x.is_pinned() and y.is_pinned()
    assert x.dtype == torch.uint8  # uint8 all the way: the fused preprocess converts on the device


def test_an_empty_class_folder_is_an_error_naming_it(image_tree):
    (image_tree / "train" / "emu").mkdir()
    with pytest.raises(ValueError, match=r"train/emu is an empty class folder"):
        ImageFolderDataModule(root=str(image_tree), num_classes=4, channels=3)


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_a_truncated_image_is_named_by_default_and_skipped_with_a_count_on_request(image_tree, tmp_path, ext):
    bad = image_tree / "train" / "dog" / f"005.{ext}"
    if ext == "jpg":  # a real JPEG in place of the PNG, as in a CIFAR-10 folder
        png = image_tree / "train" / "dog" / "005.png"
        write_jpeg(decode_image(str(png)), str(bad))
        png.unlink()
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # a copy cut short: the header survives, the pixels do not
    common = dict(root=str(image_tree), num_classes=3, channels=3, val_fraction=0.2, test_fraction=0.2)
    with pytest.raises(ValueError, match=f"not a decodable image: {bad}"):
        ImageFolderDataModule(**common, cache_dir=str(tmp_path / "cache")).setup()
    skipping = ImageFolderDataModule(**common, on_corrupt="skip", cache_dir=str(tmp_path / "cache"))
    with pytest.warns(RuntimeWarning, match=rf"data.on_corrupt=skip: skipped 1 of 30 files .*005.{ext}"):
        skipping.setup()
    assert sum(len(split) for split in skipping.splits.values()) == 29
    with pytest.raises(ValueError, match="data.on_corrupt must be error or skip"):
        ImageFolderDataModule(**common, on_corrupt="ignore")
    with pytest.raises(ValueError, match="data.on_corrupt=skip works on a tree decoded into memory"):
        ImageFolderDataModule(**common, on_corrupt="skip", stream=True)
