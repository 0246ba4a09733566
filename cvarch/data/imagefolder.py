"""The ``data=imagefolder`` dataset: a ``root/{train,val,test}/<class>/<image>`` tree, held or streamed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from cvarch.data.datamodule import ImageDataModule
from cvarch.data.decode import check_files, decode_files
from cvarch.data.placement import available_memory
from cvarch.data.scan import scan_split
from cvarch.data.splits import FileSplit, Split, carve


class ImageFolderDataModule(ImageDataModule):
    """An image-folder tree ``root/{train,val,test}/<class>/<image>``; missing val/test are carved from train.

    Images are decoded once (in threads) into uint8 tensors and cached on disk; the cache key covers every
    file's path, size and modification time, so a changed file invalidates it. A tree too big for memory is
    streamed instead: ``num_workers`` DataLoader processes decode each batch's files, and the preprocess and
    augment statistics are fitted on a seeded sample of the training images.

    Args:
        root: folder holding ``train/`` and optionally ``val/`` and ``test/``.
        val_fraction: stratified share of ``train/`` held out for validation when ``val/`` is absent; 0 holds
            none out (an empty validation split): training uses every image but the test split, as airbench
            does for its final figure, and the run keeps its last weights.
        test_fraction: stratified share of ``train/`` held out for testing when ``test/`` is absent.
        max_per_class: keep only the first N files (sorted by name) of each class; ``None`` keeps all.
        classes: class folders of ``train/`` to use, labelled in this order (label i is ``classes[i]``); the
            other folders, in every split, are ignored. ``None`` uses all folders, sorted by name.
        stream: decode files per batch instead of holding the tree in memory: ``True``, ``False``, or
            ``"auto"`` (when the decoded images would take more than half the host's available memory).
        on_corrupt: a file that cannot be decoded (truncated JPEG, not an image) is an error naming it
            (``"error"``), or is left out with a warning counting the skipped files (``"skip"``; in-memory
            trees only, since a streamed tree is decoded batch by batch).
        **kwargs: see :class:`ImageDataModule`.
    """

    def __init__(
        self,
        root: str,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        max_per_class: int | None = None,
        classes: list[str] | None = None,
        stream: bool | str = "auto",
        on_corrupt: str = "error",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if on_corrupt not in ("error", "skip"):
            raise ValueError(f"data.on_corrupt must be error or skip, got {on_corrupt!r}")
        self.on_corrupt = on_corrupt
        if stream not in (True, False, "auto"):
            raise ValueError(f"data.stream must be true, false or auto, got {stream!r}")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root: image folder {self.root} does not exist")
        if not (self.root / "train").is_dir():
            raise FileNotFoundError(
                f"data.root: {self.root} has no train/ folder (expected root/train/<class>/...)"
            )
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.max_per_class = max_per_class
        self._folders = sorted(d.name for d in (self.root / "train").iterdir() if d.is_dir())
        if classes is None:
            self.classes = self._folders
            if len(self.classes) != self.num_classes:
                raise ValueError(
                    f"data.num_classes={self.num_classes} but {self.root / 'train'} has {len(self.classes)} "
                    f"class folders: {self.classes[:10]}{' …' if len(self.classes) > 10 else ''}"
                )
        else:
            self.classes = [str(name) for name in classes]  # Hydra passes a ListConfig
            missing = [name for name in self.classes if name not in self._folders]
            if missing:
                raise ValueError(
                    f"data.classes: {missing} have no folder in {self.root / 'train'}; "
                    f"available: {self._folders}"
                )
            repeated = sorted({name for name in self.classes if self.classes.count(name) > 1})
            if repeated:  # one folder under two labels would make the task unlearnable
                raise ValueError(f"data.classes lists {repeated} more than once")
            if len(self.classes) != self.num_classes:
                raise ValueError(
                    f"data.num_classes={self.num_classes} but data.classes lists "
                    f"{len(self.classes)} classes: {self.classes}"
                )
        self._files = {
            name: scan_split(self.root / name, self.classes, self._folders, self.max_per_class)
            for name in ("train", "val", "test")
            if (self.root / name).is_dir()
        }
        self.streamed = stream is True or (
            stream == "auto" and self.decoded_bytes() > available_memory(torch.device("cpu")) // 2
        )
        if self.streamed and self.on_corrupt == "skip":
            raise ValueError(
                "data.on_corrupt=skip works on a tree decoded into memory, but this one is streamed "
                "(data.stream): check its files first, or set data.on_corrupt=error"
            )

    def decoded_bytes(self) -> int:
        """Bytes the whole tree takes decoded, estimated from the size of its first training image (read from
        the file's header, not decoded) or from ``image_size``."""
        if self.image_size is None:
            from PIL import Image

            with Image.open(self._files["train"][0][0]) as image:
                width, height = image.size
        else:
            width = height = self.image_size
        return self.channels * width * height * sum(len(files) for files in self._files.values())

    def fingerprint(self) -> str | None:
        if self.streamed:  # nothing decoded to cache
            return None
        # on_corrupt=skip caches a tree without its bad files; error must still see them: part of the key
        skip = "|skip" if self.on_corrupt == "skip" else ""
        h = hashlib.sha256(f"{self.image_size}|{self.channels}{skip}".encode())
        root = len(str(self.root)) + 1
        for split, files in self._files.items():
            for path, label in files:
                st = os.stat(path)
                h.update(f"{split}|{path[root:]}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def load_splits(self) -> dict[str, Split | FileSplit]:
        if self.streamed:  # each file's signature and end marker are read now, so a bad one is named at once
            for files in self._files.values():
                check_files(files)
            decoded = {
                name: FileSplit([f for f, _ in files], torch.tensor([y for _, y in files], dtype=torch.long))
                for name, files in self._files.items()
            }
        else:
            decoded = {
                name: decode_files(files, self.channels, self.image_size, self.on_corrupt == "skip")
                for name, files in self._files.items()
            }
        return decoded

    def carve_splits(self, splits: dict[str, Split | FileSplit]) -> dict[str, Split | FileSplit]:
        """Carves the missing ``test`` and ``val`` from ``train`` (after the cache, which holds the decoded
        folders only: the split keys are not part of its fingerprint)."""
        decoded = dict(splits)
        train = decoded["train"]
        if "test" not in decoded:
            train, decoded["test"] = carve(train, self.test_fraction, self.split_seed, "data.test_fraction")
        if "val" not in decoded and self.val_fraction == 0:  # no validation: train on all non-test images
            decoded["val"] = train.subset([])
        elif "val" not in decoded:
            share = self.val_fraction / (1.0 - (self.test_fraction if "test" not in self._files else 0.0))
            train, decoded["val"] = carve(train, share, self.split_seed, "data.val_fraction")
        decoded["train"] = train
        return decoded
