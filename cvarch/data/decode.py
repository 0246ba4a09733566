"""Decoding: image files to uint8 (C, H, W) tensors, one at a time or a list in threads, resized once."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from cvarch.data.splits import Split


def resize_images(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Resizes a uint8 (N, C, H, W) batch to ``size``×``size`` (bilinear, antialiased); ``None`` keeps it."""
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    return TF.resize(images, [size, size], antialias=True)


def decode_image_file(path: str | Path, channels: int, size: int | None) -> torch.Tensor:
    """Decodes one image file to uint8 (C, H, W), resized to ``size`` if given.

    Raises:
        ValueError: naming the file, if it is not a decodable image.
    """
    from torchvision.io import ImageReadMode, decode_image

    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    try:
        image = decode_image(str(path), mode=mode)
    except (RuntimeError, ValueError):
        try:  # formats torchvision.io cannot read (BMP, TIFF, PPM) go through Pillow
            from PIL import Image

            with Image.open(path) as im:
                array = np.asarray(im.convert("RGB" if channels == 3 else "L"))
            image = (
                torch.from_numpy(array.copy()).reshape(array.shape[0], array.shape[1], -1).permute(2, 0, 1)
            )
        except Exception as err:
            raise ValueError(f"not a decodable image: {path} ({type(err).__name__}: {err})") from None
    if size is not None:
        image = resize_images(image.unsqueeze(0), size)[0]
    return image


# (magic at the start, what the last bytes of a complete file hold): a file cut short loses its end marker
END_MARKERS = {b"\xff\xd8\xff": b"\xff\xd9", b"\x89PNG\r\n\x1a\n": b"IEND\xaeB`\x82"}
TAIL_BYTES = 1024  # where the end marker is looked for (encoders may pad a few bytes after it)


def check_file(path: str | Path) -> None:
    """Checks one image file without decoding it: JPEG and PNG files must start with their signature and
    keep their end marker (a truncated or half-copied file loses it); other formats must have a header
    Pillow can identify.

    Raises:
        ValueError: naming the file, as :func:`decode_image_file` does for a file it cannot decode.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        head, tail = os.pread(fd, 16, 0), os.pread(fd, TAIL_BYTES, max(0, size - TAIL_BYTES))
    finally:
        os.close(fd)
    for magic, end in END_MARKERS.items():
        if head.startswith(magic):
            if end not in tail:
                raise ValueError(f"not a decodable image: {path} (truncated: no end marker {end!r})")
            return
    try:
        from PIL import Image

        with Image.open(path) as image:
            image.verify()
    except Exception as err:
        raise ValueError(f"not a decodable image: {path} ({type(err).__name__}: {err})") from None


def check_files(files: Sequence[tuple[str | Path, int]]) -> None:
    """:func:`check_file` on every file, in threads: a streamed folder names its bad file before training,
    as a decoded one does, at the cost of reading two small chunks per file.

    Raises:
        ValueError: naming the first bad file.
    """
    paths = [path for path, _ in files]
    workers = 2 * (os.cpu_count() or 1)  # a thread per chunk: the reads wait on the disk, not the CPU

    def check(chunk: Sequence[str | Path]) -> None:
        for path in chunk:
            check_file(path)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(check, [paths[i::workers] for i in range(workers)]))


def decode_files(
    files: Sequence[tuple[str | Path, int]], channels: int, size: int | None, skip_corrupt: bool = False
) -> Split:
    """Decodes ``(file, label)`` pairs, in threads, into one in-memory :class:`Split`.

    Args:
        files: the files and their labels.
        channels: 1 (grey) or 3 (RGB).
        size: side every image is resized to; ``None`` keeps the files' size, which must then agree.
        skip_corrupt: leave out files that cannot be decoded (truncated, not an image), with a warning that
            counts them, instead of raising.

    Raises:
        ValueError: naming the file, if one cannot be decoded (unless ``skip_corrupt``) or if the sizes differ
            and ``size`` is ``None``.
    """

    def decode(item: tuple[str | Path, int]) -> torch.Tensor | ValueError:
        try:
            return decode_image_file(item[0], channels, size)
        except ValueError as err:
            if not skip_corrupt:
                raise
            return err

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        images = list(pool.map(decode, files))
    skipped = [err for err in images if isinstance(err, ValueError)]
    if skipped:
        warnings.warn(
            f"data.on_corrupt=skip: skipped {len(skipped)} of {len(files)} files that cannot be decoded "
            f"(first: {skipped[0]})",
            RuntimeWarning,
            stacklevel=2,
        )
        files = [f for f, image in zip(files, images, strict=True) if not isinstance(image, ValueError)]
        images = [image for image in images if not isinstance(image, ValueError)]
    first = images[0].shape
    for (path, _), image in zip(files, images, strict=True):
        if image.shape != first:
            raise ValueError(
                f"{path} is {tuple(image.shape[1:])} but {files[0][0]} is {tuple(first[1:])}: "
                "set data.image_size to resize all images to one size"
            )
    return Split(torch.stack(images), torch.tensor([label for _, label in files], dtype=torch.long))
