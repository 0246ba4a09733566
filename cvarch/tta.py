"""The ``tta`` group: test-time augmentation, the softmax (or the logits) averaged over views of each test
image.

Every view is a ``crop``×``crop`` window, the network's training input size, of a canvas: the test image
(resized first when ``sizes`` is given) zero-padded by the training crop's ``padding``, so the corner windows
are the extreme crops training drew. Views are taken batched, on the input's device; uint8 stays uint8 unless
it is resized. A plain class: it holds no parameters and adds nothing to the checkpoint.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from cvarch.augment import check_size_option, pixels, too_large

# views per scale of each ``views`` option
VIEWS_PER_SCALE = {"none": 1, "flip": 2, "ten_crop": 10, "flip_translate": 6}
# airbench's (Jordan 2024 §3.7) weights of its six views: the centre and its flip a quarter each, the four
# translated views an eighth each
FLIP_TRANSLATE_WEIGHTS = (0.25, 0.125, 0.125, 0.25, 0.125, 0.125)


def _center_offset(length: int, crop: int) -> int:
    # torchvision's center_crop anchor, Python's round included: the views match its ten_crop pixel-exact
    return int(round((length - crop) / 2.0))


class TestTimeAugment:
    """Averages the softmax over views of each test image: centre, flips, ten crops, optionally multi-scale.

    Krizhevsky et al. 2012, "ImageNet Classification with Deep CNNs", §4.1 (ten crops); He et al. 2015, "Deep
    Residual Learning", §3.4 (scores averaged over scales; the paper runs the net fully-convolutionally at
    each scale, ten crops per scale stand in for that here).

    The views of one scale come in torchvision's ``ten_crop`` order: the windows of the canvas, then the same
    windows of the horizontally flipped canvas. ``ten_crop`` gives top-left, top-right, bottom-left,
    bottom-right, centre, then those five of the flipped canvas; ``flip`` gives the centre, then the centre of
    the flipped canvas. ``flip_translate`` (airbench, Jordan 2024 §3.7) gives the centre, the centre shifted
    by ``translate`` pixels up-left and down-right (of the centre view reflect-padded by ``translate``), then
    their flips, weighted ¼, ⅛, ⅛, ¼, ⅛, ⅛ as airbench does. Scales come in the order of ``sizes``.

    Args:
        views: ``"none"`` (the centre view), ``"flip"`` (centre and its horizontal flip), ``"ten_crop"``
            (four corners and centre, and their flips) or ``"flip_translate"`` (airbench's six views).
        sizes: ``None`` takes the views of the image at its own size. Otherwise ResNet's multi-scale protocol:
            for each size the image is resized (bilinear, antialiased) so its shorter side is
            ``round(crop * size / train_size)``, i.e. sizes are the paper's shorter sides (224 … 640) for its
            training crop ``train_size``, carried over to our training crop ``crop``. Every view is then float
            in [0, 1], uint8 input included.
        train_size: the paper's training crop, in its pixels (ResNet: 224); the unit of ``sizes``.
        chunk_size: views per forward pass, concatenated along the batch; bounds memory, not the result.
        translate: shift of the translated views of ``flip_translate``: pixels (an int >= 1; airbench94: 1)
            or a fraction of the crop side (a float in (0, 1]); less than the crop side, checked by
            :meth:`configure`.
        average: ``"softmax"`` averages the views' probabilities (Krizhevsky et al.), ``"logits"`` their
            logits
            (airbench), then takes the softmax.
    """

    __test__ = False  # a "Test…" class that pytest must not collect

    def __init__(
        self,
        views: str = "none",
        sizes: Sequence[int] | None = None,
        train_size: int = 224,
        chunk_size: int = 10,
        translate: int | float = 1,
        average: str = "softmax",
    ) -> None:
        if views not in VIEWS_PER_SCALE:
            raise ValueError(f"tta.views must be one of {', '.join(VIEWS_PER_SCALE)}, got {views!r}")
        if sizes is not None:
            sizes = tuple(sizes)
            if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
                raise ValueError(
                    f"tta.sizes must be null or a non-empty list of positive pixel counts, got {sizes}"
                )
        if train_size < 1:
            raise ValueError(f"tta.train_size must be a positive number of pixels, got {train_size}")
        if chunk_size < 1:
            raise ValueError(f"tta.chunk_size must be >= 1 view per forward pass, got {chunk_size}")
        check_size_option(translate, "tta.translate")
        if average not in ("softmax", "logits"):
            raise ValueError(f"tta.average must be softmax or logits, got {average!r}")
        self.mode = views  # not ``self.views``: that name is the method
        self.sizes = sizes
        self.train_size = train_size
        self.chunk_size = chunk_size
        self.translate = translate
        self.average = average
        self.crop: int | None = None  # None: the input's shorter side
        self.padding = 0
        self.padding_mode = "constant"
        self._warned = False  # the duplicate-views warning is given once

    def configure(self, crop: int, padding: int = 0, padding_mode: str = "constant") -> TestTimeAugment:
        """Sets the training input's geometry, which the views reproduce, and checks that every view fits it
        (the LightningModule calls it once the data's image size is known, before any step); returns self.

        Raises:
            ValueError: naming the key (``tta.sizes``, ``tta.translate``) and the crop, when a view cannot be
                taken at this size.

        Args:
            crop: side of the training inputs in pixels (the augment group's output size).
            padding: padding of the training random crop in pixels (CIFAR: 4, He et al. 2015 §4.2).
            padding_mode: how the training crop pads, ``"constant"`` (zeros) or ``"reflect"``.
        """
        if crop < 1:
            raise ValueError(f"tta crop (the augment group's output size) must be >= 1 pixel, got {crop}")
        if padding < 0:
            raise ValueError(f"tta padding (the augment crop's padding) must be >= 0, got {padding}")
        if padding >= crop:  # the corner views of ten_crop would be all padding
            raise too_large(
                "tta padding (the augment crop's padding)", padding, crop, "a view could be all padding"
            )
        if self.mode == "flip_translate" and pixels(self.translate, crop) >= crop:
            # reflect padding of the centre view, as airbench pads: less than its side
            raise too_large("tta.translate", self.translate, crop, "a shift must be less than the crop side")
        # the resized sides are known now: fail here, not at the first test batch
        for size in self.sizes or ():
            side = self._side(crop, size)
            self._check_fits(side, side, crop, padding, size)
        self.crop = crop
        self.padding = padding
        self.padding_mode = padding_mode
        return self

    @property
    def num_views(self) -> int:
        """Views per image: 1, 2, 6 or 10 per scale, times the number of scales."""
        return VIEWS_PER_SCALE[self.mode] * (len(self.sizes) if self.sizes else 1)

    def center(self, x: torch.Tensor) -> torch.Tensor:
        """The central ``crop``×``crop`` window of the padded image at its own size; x itself when crop == S.

        Krizhevsky et al. 2012 §4.1: the centre patch, the single-view prediction.

        Args:
            x: (N, C, H, W) images, uint8 or float in [0, 1]; the view keeps the dtype.
        """
        crop = self._check(x)
        height, width = x.shape[-2:]
        self._check_fits(height, width, crop, self.padding)
        top = _center_offset(height + 2 * self.padding, crop) - self.padding
        left = _center_offset(width + 2 * self.padding, crop) - self.padding
        if (top, left) == (0, 0) and (height, width) == (crop, crop):
            return x
        if 0 <= top <= height - crop and 0 <= left <= width - crop:  # inside the image: no padded copy
            return x[..., top : top + crop, left : left + crop]
        top, left = top + self.padding, left + self.padding
        return self._pad(x)[..., top : top + crop, left : left + crop]

    def views(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """Yields each (N, C, crop, crop) view, lazily, in the order documented on the class.

        Krizhevsky et al. 2012 §4.1 (ten crops); He et al. 2015 §3.4 (scales).

        Args:
            x: (N, C, H, W) images, uint8 or float in [0, 1].
        """
        crop = self._check(x)
        for size, image in self._scales(x, crop):
            self._check_fits(image.shape[-2], image.shape[-1], crop, self.padding, size)
            if self.mode == "flip_translate":
                yield from self._flip_translate(image)
                continue
            canvas = self._pad(image)
            height, width = canvas.shape[-2:]
            anchors = [(_center_offset(height, crop), _center_offset(width, crop))]
            if self.mode == "ten_crop" and (height, width) == (crop, crop):
                self._warn_duplicate_views(crop)
            if self.mode == "ten_crop":
                bottom, right = height - crop, width - crop
                anchors = [(0, 0), (0, right), (bottom, 0), (bottom, right), *anchors]
            for top, left in anchors:
                yield canvas[..., top : top + crop, left : left + crop]
            if self.mode == "none":
                continue
            # window (top, left) of the flipped canvas = the flip of the mirrored window: no flipped copy
            for top, left in anchors:
                mirror = width - crop - left
                yield canvas[..., top : top + crop, mirror : mirror + crop].flip(-1)

    def _flip_translate(self, image: torch.Tensor) -> Iterator[torch.Tensor]:
        """airbench's six views of one scale: centre, shifted up-left and down-right, then their flips."""
        centre = self.center(image)
        crop = centre.shape[-1]
        t = pixels(self.translate, crop)
        shifted = F.pad(centre, [t] * 4, mode="reflect")
        views = [centre, shifted[..., :crop, :crop], shifted[..., 2 * t :, 2 * t :]]
        yield from views
        for view in views:
            yield view.flip(-1)

    def weights(self) -> torch.Tensor:
        """(num_views,) float32 weights of the views, summing to 1: uniform, or airbench's ones."""
        scales = len(self.sizes) if self.sizes else 1
        if self.mode == "flip_translate":
            return torch.tensor(FLIP_TRANSLATE_WEIGHTS * scales) / scales
        return torch.full((self.num_views,), 1.0 / self.num_views)

    def _warn_duplicate_views(self, crop: int) -> None:
        """Warns once that ten crops of a canvas no larger than the crop are 2 distinct views at 10's cost."""
        if self._warned:
            return
        self._warned = True
        warnings.warn(
            f"tta=ten_crop: the test images (with the crop padding of {self.padding}) are no larger than "
            f"the training crop ({crop}×{crop}), so the ten crops are five copies of the centre view and "
            "five of its flip: 2 distinct views at the cost of 10. Use tta=flip, or a crop with padding "
            "(augment=crop, augment=cifar) or larger test images",
            RuntimeWarning,
            stacklevel=3,
        )

    @torch.no_grad()  # evaluation only: no graph outlives its chunk, so memory stays bounded by chunk_size
    def predict(self, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Returns the (N, K) weighted mean over views of softmax(forward(view)), in float32; with
        ``average="logits"``, the softmax of the weighted mean of the logits.

        Krizhevsky et al. 2012 §4.1: "averaging the predictions made by the network's softmax layer on the ten
        patches"; He et al. 2015 §3.4: "average the scores at multiple scales"; Jordan 2024 §3.7 (logits).

        Args:
            forward: maps (M, C, crop, crop) views to (M, K) logits; called on at most ``chunk_size`` views
                (M ≤ chunk_size·N) at a time.
            x: (N, C, H, W) images, uint8 or float in [0, 1].
        """
        n = x.shape[0]
        views = self.views(x)
        weights = self.weights().to(x.device)
        total, count = None, 0
        while chunk := list(itertools.islice(views, self.chunk_size)):
            scores = forward(torch.cat(chunk)).float()
            if self.average == "softmax":
                scores = scores.softmax(dim=-1)
            w = weights[count : count + len(chunk)].view(-1, 1, 1)
            scores = (scores.view(len(chunk), n, -1) * w).sum(dim=0)
            total = scores if total is None else total + scores
            count += len(chunk)
        return total if self.average == "softmax" else total.softmax(dim=-1)

    def __repr__(self) -> str:
        return (
            f"TestTimeAugment(views={self.mode!r}, sizes={self.sizes}, train_size={self.train_size}, "
            f"chunk_size={self.chunk_size}, translate={self.translate}, average={self.average!r}, "
            f"crop={self.crop}, padding={self.padding})"
        )

    def _check(self, x: torch.Tensor) -> int:
        """Checks the batch and returns the crop side: the configured one, else the image's shorter side."""
        if x.ndim != 4 or not (x.dtype == torch.uint8 or x.is_floating_point()):
            raise ValueError(
                f"tta expects (N, C, H, W) uint8 or float images, got shape {tuple(x.shape)} and {x.dtype}"
            )
        return self.crop if self.crop is not None else min(x.shape[-2:])

    def _check_fits(self, height: int, width: int, crop: int, padding: int, size: int | None = None) -> None:
        """Raises unless the crop fits the (height, width) image padded by ``padding``; ``size``: tta size."""
        if crop <= min(height, width) + 2 * padding:
            return
        if size is not None:
            raise ValueError(
                f"tta.sizes: size {size} resizes the image to {height}×{width} pixels, smaller than the "
                f"{crop}-pixel crop even with padding {padding}; sizes below tta.train_size "
                f"({self.train_size}) shrink the image below the crop"
            )
        raise ValueError(
            f"tta crop {crop} (the augment group's output size) is larger than the {height}×{width} test "
            f"image padded by {padding}: check data.image_size and the augment crop"
        )

    def _side(self, crop: int, size: int) -> int:
        return round(crop * size / self.train_size)

    def _scales(self, x: torch.Tensor, crop: int) -> Iterator[tuple[int | None, torch.Tensor]]:
        """Yields (size, image) per scale: (None, x) without ``sizes``, else x as float in [0, 1], resized."""
        if self.sizes is None:
            yield None, x
            return
        image = x.float().div(255.0) if x.dtype == torch.uint8 else x
        height, width = image.shape[-2:]
        for size in self.sizes:
            side = self._side(crop, size)
            # ResNet §3.4 sets the shorter side; the aspect ratio is kept
            shape = [round(height * side / min(height, width)), round(width * side / min(height, width))]
            if shape == [height, width]:
                yield size, image
            else:
                yield (
                    size,
                    F.interpolate(image, size=shape, mode="bilinear", align_corners=False, antialias=True),
                )

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        # as the training crop pads: zeros (black, in uint8 and in [0, 1] alike) or mirrored pixels
        return F.pad(x, [self.padding] * 4, mode=self.padding_mode) if self.padding else x
