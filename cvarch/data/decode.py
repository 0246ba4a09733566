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
