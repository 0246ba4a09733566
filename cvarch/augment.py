"""The ``augment`` group: random transforms of training batches, as batched tensor ops on the model's device.

The LightningModule calls :class:`Augment` on each training batch after it reaches the device, so no op works
per image in PIL or in the DataLoader workers. Every random number comes from one ``torch.Generator`` on the
batch's device, seeded with the run's ``seed``, so a run is reproducible from its seed and its checkpoint.
Options are dicts of named ops (``conf/augment/<option>.yaml``); a list of options on the command line
(``augment=[cifar,cutout]``) merges their ops, and :class:`Augment` runs them in the order of their ``stage``:
ops keyed by the image's pixels (alternating flips), geometric, colour, erasing, label mixing. Validation and
test batches are never augmented.

Size-like options (cutout's square, the crop's padding, TrivialAugment's translation) are either pixels, an
int, or a fraction of the image side, a float in (0, 1] (see :func:`pixels`), so one option fits 8×8 digits,
32×32 CIFAR and 224×224 ImageNet. :meth:`Augment.check` checks every op against the training images' side
before the first step (``Augment.output_shape`` runs it) and names the key that cannot apply.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2


class AugmentOp(nn.Module):
    """Base of every augmentation op: a random map of a float batch and its targets.

    Subclasses set ``stage`` (the order :class:`Augment` runs them in: −1 ops keyed by the image's own pixels,
    0 geometric, 1 colour, 2 erasing, 3 label mixing) and implement ``forward(x, y, generator)`` on float
    (N, C, H, W) images in [0, 1] (or
    also uint8 ones where ``on_uint8``) and int64 (N,) labels or float (N, K) soft targets.
    """

    stage: int = 0
    key: str = "augment.ops"  # the op's config key, for errors; Augment sets augment.ops.<name>
    padding: int = 0  # padding of the random crop in pixels; only Crop sets it, test-time views reuse it
    padding_mode: str = "constant"  # how Crop pads: zeros ("constant") or mirrored pixels ("reflect")
    epoch: int = 0  # the training epoch, set by Augment.set_epoch; AlternatingFlip's flips depend on it
    # pure index ops (crops, flips) give the same pixels on uint8 as on floats: they run on the uint8 batch,
    # a quarter of the bytes, and the preprocess group's fused pass does the one conversion to float
    on_uint8: bool = False

    def output_size(self, size: int) -> int:
        """Side of the images this op outputs, given the side of its input images."""
        return size

    def check(self, size: int) -> None:
        """Raises a ValueError naming the key and the image size if the op cannot apply to images of side
        ``size`` (the shorter side, in pixels), and fixes its fractions of the side to pixels; ops whose
        options are all relative to the image (probabilities, areas, ratios) have nothing to check."""

    def fit(self, images: torch.Tensor) -> None:
        """Fits statistics on the uint8 (N, C, H, W) training split; most ops have none."""

    def draw(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """The random numbers of one call on the batch ``x``, drawn on its device (ops that split their draws
        from :meth:`apply` implement both; the draws can then be replayed on another device)."""
        raise NotImplementedError

    def apply(
        self, x: torch.Tensor, y: torch.Tensor, *draws: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The op with the given draws (from :meth:`draw`)."""
        raise NotImplementedError

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply(x, y, *self.draw(x, generator))


class Augment(nn.Module):
    """The training-batch augmentation: named ops run in the order of their stage, from one seeded generator.

    Krizhevsky et al. 2012 §4.1 and He et al. 2015 §3.4, §4.2 augment on the fly, a fresh draw at every visit
    of an image; so does this module, at every call.

    Args:
        ops: augmentation ops by name (the keys of ``augment.ops``); sorted stably by ``stage``. Empty or
            ``None``: no augmentation, batches pass through unchanged (still uint8).
        seed: seed of the generator, created on the batch's device at the first call.
    """

    def __init__(self, ops: Mapping[str, AugmentOp] | None = None, seed: int = 0) -> None:
        super().__init__()
        ops = dict((ops or {}).items())
        for name, op in ops.items():
            if not isinstance(op, AugmentOp):
                raise TypeError(f"augment.ops.{name} must build a cvarch.augment op, got {type(op).__name__}")
            op.key = f"augment.ops.{name}"  # errors name the key the user wrote, e.g. augment.ops.translate
        self.ops = nn.ModuleDict(sorted(ops.items(), key=lambda item: item[1].stage))  # sorted() is stable
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._pending_state: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.ops)

    @property
    def padding(self) -> int:
        """The random crop's padding in pixels, or 0 without one; a fraction of the side is known once
        :meth:`check` (or :meth:`output_size`, :meth:`output_shape`) has seen the image size."""
        return next((op.padding for op in self.ops.values() if op.padding), 0)

    @property
    def padding_mode(self) -> str:
        """How the random crop pads: ``"constant"`` (zeros) or ``"reflect"``."""
        return next((op.padding_mode for op in self.ops.values() if op.padding), "constant")

    def set_epoch(self, epoch: int) -> None:
        """Tells every op the training epoch about to run (the module calls it at each epoch start)."""
        for op in self.ops.values():
            op.epoch = epoch

    def check(self, size: int) -> None:
        """Checks every op against training images of side ``size`` (their shorter side, in pixels), each on
        the side the ops before it output, and fixes fractions of the side to pixels.

        Raises:
            ValueError: naming the key (``augment.ops.cutout.size=16 …``) and the image size, when an op
                cannot apply to images that small.
        """
        for op in self.ops.values():
            op.check(size)
            size = op.output_size(size)

    def output_size(self, size: int) -> int:
        """Side of the augmented images, given the side of the training images; checks the ops first."""
        self.check(size)
        return self._output_size(size)

    def output_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """(C, H, W) of what the model is trained on, given the images' shape; checks the ops first, on the
        shorter side, so a run with an option too large for its data fails before its first step."""
        channels, height, width = shape
        self.check(min(height, width))
        return channels, self._output_size(height), self._output_size(width)

    def _output_size(self, size: int) -> int:
        for op in self.ops.values():
            size = op.output_size(size)
        return size

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> None:
        """Fits every op on the uint8 (N, C, H, W) training split; re-run whenever a run starts or resumes."""
        for op in self.ops.values():
            op.fit(images)

    def rng_state(self) -> torch.Tensor | None:
        """The generator's state, for checkpoints; ``None`` before the first call."""
        if self._generator is None:
            return self._pending_state
        return self._generator.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        """Restores a state from :meth:`rng_state`; applied at the next call, on the batch's device."""
        self._pending_state = state.clone()
        if self._generator is not None:
            self._apply_pending_state()

    def _apply_pending_state(self) -> None:
        state, self._pending_state = self._pending_state, None
        if state.numel() != self._generator.get_state().numel():
            # a CPU state (mt19937) and a CUDA state (seed, offset) differ in layout: a run resumed on another
            # kind of device keeps its seed but not its exact stream
            warnings.warn(
                f"the augment generator state from the checkpoint does not fit a generator on "
                f"{self._generator.device}; augmentation restarts from seed={self.seed}",
                stacklevel=3,
            )
            return
        self._generator.set_state(state)

    def _generator_on(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            # a generator draws only on its own device: a module moved to another one starts again from seed
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        if self._pending_state is not None:
            self._apply_pending_state()
        return self._generator

    @torch.no_grad()
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.ops:
            return x, y
        generator = self._generator_on(x.device)
        for op in self.ops.values():
            if x.dtype == torch.uint8 and not op.on_uint8:
                x = torch.div(x, 255.0)  # floats in [0, 1] from here on
            x, y = op(x, y, generator)
        return x, y


def check_size_option(value: int | float, key: str, minimum: int = 1) -> None:
    """Raises a ValueError naming ``key`` unless ``value`` is pixels, an int >= ``minimum``, or a fraction of
    the image side, a float in (0, 1]."""
    if isinstance(value, bool) or not (
        (isinstance(value, int) and value >= minimum) or (isinstance(value, float) and 0.0 < value <= 1.0)
    ):
        raise ValueError(
            f"{key} must be pixels, an int >= {minimum}, or a fraction of the image side, a float in (0, 1]; "
            f"got {value!r}"
        )


def pixels(value: int | float, side: int) -> int:
    """Pixels of a size-like option on images of side ``side``: an int is pixels as it is, a float in (0, 1]
    a fraction of the side, rounded half up and at least 1 pixel (0.125, CIFAR's 4 of 32, is 1 on 8×8).

    Args:
        value: the option, checked by :func:`check_size_option`.
        side: the side of the images it applies to (the shorter side), in pixels.
    """
    if isinstance(value, int):
        return value
    return max(1, math.floor(value * side + 0.5))


def too_large(key: str, value: int | float, side: int, why: str) -> ValueError:
    """The error of a size-like option that cannot apply to images of side ``side``."""
    unit = "pixels" if isinstance(value, int) else f"of the side = {pixels(value, side)} pixels"
    return ValueError(
        f"{key}={value} ({unit}) does not fit the {side}×{side} images it receives: {why}. Give fewer pixels "
        "or a fraction of the image side (a float in (0, 1])"
    )


def _rand(n: int, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``n`` uniform draws in [0, 1) on x's device."""
    return torch.rand(n, generator=generator, device=x.device)


def _resample(
    x: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    height: torch.Tensor,
    width: torch.Tensor,
    size: tuple[int, int],
) -> torch.Tensor:
    """Bilinear resampling of one window per image to ``size``: windows in pixel units, float (N,) each.

    A pixel i of the output samples the input at ``top + (i + 0.5)·height/out_h`` (half-pixel centres, as
    ``F.interpolate`` with ``align_corners=False``), so it equals cropping then resizing, or resizing then
    cropping, without an image-sized copy per image. Samples beyond the border repeat the edge pixel, as
    ``F.interpolate`` does.
    """
    n, _, h, w = x.shape
    theta = x.new_zeros(n, 2, 3)
    theta[:, 0, 0] = width / w
    theta[:, 0, 2] = (2 * left + width) / w - 1
    theta[:, 1, 1] = height / h
    theta[:, 1, 2] = (2 * top + height) / h - 1
    grid = F.affine_grid(theta, [n, x.shape[1], *size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _box_mask(
    top: torch.Tensor,
    left: torch.Tensor,
    size_h: int | torch.Tensor,
    size_w: int | torch.Tensor,
    shape: Sequence[int],
    device: torch.device,
) -> torch.Tensor:
    """Bool (N, 1, H, W) mask of the boxes [top, top + size_h) × [left, left + size_w), clipped."""
    rows = torch.arange(shape[-2], device=device).view(1, 1, -1, 1)
    cols = torch.arange(shape[-1], device=device).view(1, 1, 1, -1)
    top, left = top.view(-1, 1, 1, 1), left.view(-1, 1, 1, 1)
    return (rows >= top) & (rows < top + size_h) & (cols >= left) & (cols < left + size_w)


class Flip(AugmentOp):
    """Horizontal flip of each image with probability ``p``.

    Krizhevsky et al. 2012 §4.1 ("horizontal reflections"); He et al. 2015 §4.2 (CIFAR).

    Args:
        p: probability of flipping an image.
    """

    stage = 0
    on_uint8 = True

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"augment.ops.flip.p must be in [0, 1], got {p}")
        self.p = p

    def draw(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor]:
        """Bool (N,): which images are mirrored."""
        return (_rand(x.shape[0], x, generator) < self.p,)

    def apply(
        self, x: torch.Tensor, y: torch.Tensor, flip: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # image i of [x, mirrored x] is x[i] or its mirror: one gather of whole images, 4× faster on the CPU
        # than torch.where with a broadcast (N, 1, 1, 1) mask, and no device sync
        index = torch.arange(x.shape[0], device=x.device) + x.shape[0] * flip.long()
        return torch.cat([x, x.flip(-1)]).index_select(0, index), y


class AlternatingFlip(Flip):
    """airbench's derandomized flips: each image is mirrored in every other epoch, from a random first one.

    Jordan 2024, airbench (arXiv:2404.00498) §3.6, "alternating flip": an image flipped in epoch 0 is shown
    unflipped in epoch 1, flipped in epoch 2, and so on; so over any two epochs every image is seen both ways,
    where random flips leave a quarter of the images one way only. The first-epoch choice is a fixed random
    bit per image. airbench stores it by pre-flipping the dataset; here it is keyed by the image itself, a
    seeded hash of its uint8 pixels, so no per-image state, index or loader change is needed, and streamed,
    resumed and DDP runs agree. The op runs first (stage −1), on the images as loaded.

    Args:
        seed: seed of the hash (different seeds, different first-epoch flips).
    """

    stage = -1

    def __init__(self, seed: int = 0) -> None:
        super().__init__(p=0.5)
        self.seed = seed
        self._keys: torch.Tensor | None = None

    def first_epoch_flip(self, x: torch.Tensor) -> torch.Tensor:
        """Bool (N,): the epoch-0 flip of each image, bit 30 of Σ pixel·key with seeded random 31-bit keys."""
        pixels = x if x.dtype == torch.uint8 else (x * 255).round()
        pixels = pixels.reshape(x.shape[0], -1).long()
        if self._keys is None or self._keys.numel() != pixels.shape[1] or self._keys.device != x.device:
            generator = torch.Generator().manual_seed(self.seed)
            self._keys = torch.randint(0, 2**31, (pixels.shape[1],), generator=generator).to(x.device)
        return ((pixels * self._keys).sum(dim=1) >> 30) & 1 == 1  # exact in int64: < 2^8 · 2^31 · 2^24

    def draw(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor]:
        """Bool (N,): which images are mirrored in this epoch; no random draw."""
        return (self.first_epoch_flip(x) ^ bool(self.epoch % 2),)


class Crop(AugmentOp):
    """Pads each side by ``padding``, then takes a random crop of side round(scale·S) per image.

    He et al. 2015 §4.2 (CIFAR: "4 pixels are padded on each side, and a 32×32 crop is randomly sampled");
    Krizhevsky et al. 2012 §4.1 (random 224×224 patches of the 256×256 images: padding 0, scale 224/256);
    airbench (Jordan 2024 §3.3): 2-pixel translations of the reflect-padded image
    (``augment=flip_translate``).

    Args:
        padding: added on each side before cropping: pixels (an int >= 0) or a fraction of the image side (a
            float in (0, 1]; He et al.'s 4 of CIFAR's 32 is 0.125, 1 pixel on 8×8 digits). Every crop must
            keep some of the image (padding < crop side), and reflect padding must be < the image side.
        scale: crop side as a fraction of the input side (1: the input size).
        padding_mode: ``"constant"`` pads zeros (He et al.), ``"reflect"`` mirrors the border (airbench).
    """

    stage = 0
    key = "augment.ops.crop"
    on_uint8 = True

    def __init__(self, padding: int | float = 4, scale: float = 1.0, padding_mode: str = "constant") -> None:
        super().__init__()
        check_size_option(padding, "augment.ops.crop.padding", minimum=0)
        if not 0.0 < scale <= 1.0:
            raise ValueError(f"augment.ops.crop.scale must be in (0, 1], got {scale}")
        if padding_mode not in ("constant", "reflect"):
            raise ValueError(
                f"augment.ops.crop.padding_mode must be constant or reflect, got {padding_mode!r}"
            )
        self.padding_option = padding  # as configured: pixels or a fraction of the side
        self._padding = padding if isinstance(padding, int) else None  # pixels, once the side is known
        self.scale = scale
        self.padding_mode = padding_mode

    @property
    def padding(self) -> int:
        """The padding in pixels, for the test-time views; a fraction needs the image side (:meth:`check`)."""
        if self._padding is None:
            raise RuntimeError(
                f"{self.key}.padding={self.padding_option} is a fraction of the image side: call "
                "Augment.check (or output_size, output_shape) with the image size first"
            )
        return self._padding

    def output_size(self, size: int) -> int:
        return round(self.scale * size)

    def check(self, size: int) -> None:
        out = self.output_size(size)
        if out < 1:
            raise too_large(f"{self.key}.scale", self.scale, size, "the crop is less than a pixel")
        padding = pixels(self.padding_option, size)
        if padding >= out:
            raise too_large(
                f"{self.key}.padding",
                self.padding_option,
                size,
                f"crops of {out}×{out} could hold no image pixel",
            )
        if self.padding_mode == "reflect" and padding >= size:
            raise too_large(
                f"{self.key}.padding", self.padding_option, size, "reflect padding must be less than the side"
            )
        self._padding = padding

    def draw(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 (N,) each: ``(top, left)`` of every crop in the padded image."""
        n, _, h, w = x.shape
        padding = pixels(self.padding_option, min(h, w))
        slack_h, slack_w = h + 2 * padding - self.output_size(h), w + 2 * padding - self.output_size(w)
        top = torch.randint(0, slack_h + 1, (n,), generator=generator, device=x.device)
        left = torch.randint(0, slack_w + 1, (n,), generator=generator, device=x.device)
        return top, left

    def apply(
        self, x: torch.Tensor, y: torch.Tensor, top: torch.Tensor, left: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, c, h, w = x.shape
        out_h, out_w = self.output_size(h), self.output_size(w)
        padding = pixels(self.padding_option, min(h, w))  # as draw() resolved it, from the batch itself
        if padding:
            x = F.pad(x, [padding] * 4, mode=self.padding_mode)
        # every window of every image as a view (N, rows, cols, C, out_h, out_w), then one gather of whole
        # windows by (image, top, left): no loop over images, 5× faster than per-pixel index grids
        x = x.contiguous()
        s_n, s_c, s_h, s_w = x.stride()
        windows = x.as_strided(
            (n, x.shape[-2] - out_h + 1, x.shape[-1] - out_w + 1, c, out_h, out_w),
            (s_n, s_h, s_w, s_c, s_h, s_w),
        )
        return windows[torch.arange(n, device=x.device), top, left], y  # (N, C, out_h, out_w)


class ScaleAugment(AugmentOp):
    """ResNet's scale augmentation: short side resized to a random L, then a random crop of the input size.

    He et al. 2015 §3.4: "the image is resized with its shorter side randomly sampled in [256, 480] for scale
    augmentation. A 224×224 crop is randomly sampled" (after Simonyan & Zisserman 2014 §3.1). For images of
    side S the range scales with S: the short side goes to L ∈ [S·256/224, S·480/224] pixels, an integer as in
    the paper, and the crop is S×S at an integer offset. A crop of side S from the image resized to L is a
    window of side S·S/L of the original, so each image is resampled once (bilinear) from its window.

    Args:
        short_side: the paper's range of the resized shorter side, in pixels at crop size ``crop``.
        crop: the paper's crop side in pixels; only the ratios ``short_side / crop`` matter, so the op fits
            images of any side and has nothing to check against it.
    """

    stage = 0

    def __init__(self, short_side: Sequence[int] = (256, 480), crop: int = 224) -> None:
        super().__init__()
        low, high = short_side
        if crop <= 0:
            raise ValueError(f"augment.ops.scale.crop must be > 0, got {crop}")
        if not crop <= low <= high:
            raise ValueError(
                "augment.ops.scale.short_side must be [low, high] with crop <= low <= high, "
                f"got {list(short_side)} (crop {crop})"
            )
        self.short_side = (low, high)
        self.crop = crop

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = x.shape
        short = min(h, w)
        low = round(short * self.short_side[0] / self.crop)
        high = round(short * self.short_side[1] / self.crop)
        side = torch.randint(low, high + 1, (n,), generator=generator, device=x.device)
        ratio = side.float() / short  # resize factor, ≥ 1
        # integer offsets in the resized image, uniform over every crop that fits
        resized_h, resized_w = (h * ratio).round(), (w * ratio).round()
        top = (_rand(n, x, generator) * (resized_h - h + 1)).floor()
        left = (_rand(n, x, generator) * (resized_w - w + 1)).floor()
        return _resample(x, top / ratio, left / ratio, h / ratio, w / ratio, (h, w)), y


class RandomResizedCrop(AugmentOp):
    """A window of random area and aspect ratio per image, resized to the input size.

    Szegedy et al. 2014 ("Going Deeper with Convolutions") §6: "sampling of various sized patches of the image
    whose size is distributed evenly between 8% and 100% of the image area and whose aspect ratio is chosen
    randomly between 3/4 and 4/3". torchvision's algorithm: up to 10 tries per image (run side by side here),
    falling back to the central crop. Unlike torchvision it resamples bilinearly without antialiasing.

    Args:
        scale: range of the window's area, as a fraction of the image area (relative: fits any image side).
        ratio: range of the window's aspect ratio (width / height), sampled log-uniformly.
    """

    stage = 0
    tries = 10  # torchvision's RandomResizedCrop.get_params

    def __init__(self, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3)) -> None:
        super().__init__()
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(
                f"augment.ops.random_resized_crop.scale must satisfy 0 < low <= high <= 1, got {list(scale)}"
            )
        if not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(
                f"augment.ops.random_resized_crop.ratio must satisfy 0 < low <= high, got {list(ratio)}"
            )
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))

    def windows(
        self, x: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Integer windows ``(top, left, height, width)``, float (N,) each, drawn as torchvision does."""
        n, _, h, w = x.shape
        width, height = box_tries(x, self.scale, self.ratio, self.tries, generator)
        fits = (width > 0) & (width <= w) & (height > 0) & (height <= h)
        first = fits.float().argmax(dim=1, keepdim=True)  # argmax returns the first of equal maxima
        found = fits.any(dim=1)
        # torchvision's fallback: the central crop, at the ratio's bound nearest to the image's own
        if w / h < self.ratio[0]:
            fallback = (round(w / self.ratio[0]), w)
        elif w / h > self.ratio[1]:
            fallback = (h, round(h * self.ratio[1]))
        else:
            fallback = (h, w)
        height = torch.where(found, height.gather(1, first).squeeze(1), float(fallback[0]))
        width = torch.where(found, width.gather(1, first).squeeze(1), float(fallback[1]))
        top = torch.where(found, (_rand(n, x, generator) * (h - height + 1)).floor(), (h - height) // 2)
        left = torch.where(found, (_rand(n, x, generator) * (w - width + 1)).floor(), (w - width) // 2)
        return top, left, height, width

    def draw(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        return self.windows(x, generator)

    def apply(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        top: torch.Tensor,
        left: torch.Tensor,
        height: torch.Tensor,
        width: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _resample(x, top, left, height, width, tuple(x.shape[-2:])), y


class PCAColour(AugmentOp):
    """AlexNet's "fancy PCA" colour augmentation: adds Σ_i α_i λ_i p_i to every pixel of an image.

    Krizhevsky et al. 2012 §4.1: p_i, λ_i are the eigenvectors and eigenvalues of the 3×3 covariance of the
    training set's RGB pixel values (here in [0, 1] units), α_i ~ N(0, 0.1²) drawn once per image each time it
    is seen. On a single channel it is brightness noise scaled by the pixel variance.

    Args:
        std: standard deviation of the α_i (the paper: 0.1).
    """

    stage = 1

    def __init__(self, std: float = 0.1) -> None:
        super().__init__()
        if std < 0:
            raise ValueError(f"augment.ops.pca_colour.std must be >= 0, got {std}")
        self.std = std
        # non-persistent: the state dict stays empty, so a checkpoint loads strictly with or without
        # augmentation; fit() recomputes these from the training split whenever a run starts
        self.register_buffer("eigvals", torch.zeros(0), persistent=False)  # (C,)
        self.register_buffer("eigvecs", torch.zeros(0), persistent=False)  # (C, C), columns p_i

    def fit(self, images: torch.Tensor) -> None:
        channels = images.shape[1]
        total = torch.zeros(channels, dtype=torch.float64)
        outer = torch.zeros(channels, channels, dtype=torch.float64)
        for chunk in images.split(4096):  # float64 of a whole ImageNet-sized split would not fit in memory
            pixels = chunk.to(torch.float64).div_(255.0).transpose(0, 1).reshape(channels, -1)
            total += pixels.sum(dim=1)
            outer += pixels @ pixels.T
        count = images.numel() // channels
        mean = total / count
        cov = outer / count - mean.outer(mean)  # C×C in float64: no cancellation worth a second pass
        eigvals, eigvecs = torch.linalg.eigh(cov)
        # round-off makes the null eigenvalues of a rank-deficient covariance slightly negative
        self.eigvals = eigvals.clamp_min(0).float().to(self.eigvals.device)
        self.eigvecs = eigvecs.float().to(self.eigvecs.device)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.eigvals.numel() == 0:  # a shape test: no device sync per step
            raise RuntimeError("augment.ops.pca_colour was used before fit() on the training images")
        if x.shape[1] != self.eigvals.numel():
            raise ValueError(
                f"augment.ops.pca_colour was fitted on {self.eigvals.numel()} channels, got {x.shape[1]}"
            )
        alpha = torch.randn(x.shape[0], x.shape[1], generator=generator, device=x.device) * self.std
        shift = (alpha * self.eigvals) @ self.eigvecs.T  # (N, C): Σ_i α_i λ_i p_i per image
        # not clamped to [0, 1]: the paper adds the shift to the raw RGB values and says nothing of clipping
        return x + shift.view(*shift.shape, 1, 1), y


def per_image(
    transform: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """``transform`` applied to each image of ``x`` alone, with its own random parameters.

    A torchvision v2 transform draws one parameter set per call, from torch's global CPU generator (also for
    images on an accelerator), so on a batch every image would get the same ones. Here each image gets a seed
    drawn from ``generator`` (one draw per batch: one device sync), the global CPU generator is seeded with it
    for that image, and the global generators are restored afterwards: the run's stream (dropout, init) never
    sees the draws, and a checkpointed ``generator`` state replays them exactly.

    Args:
        transform: maps one (C, H, W) image to one of the same shape.
        x: (N, C, H, W) images.
        generator: the source of the per-image seeds.
    """
    seeds = torch.randint(0, 2**62, (x.shape[0],), generator=generator, device=x.device).tolist()
    accelerator = [] if x.device.type == "cpu" else [x.device]
    with torch.random.fork_rng(devices=accelerator, device_type=x.device.type):
        out = []
        for image, seed in zip(x, seeds, strict=True):
            # the CPU generator alone: torch.manual_seed would also seed every accelerator, 200× slower
            torch.default_generator.manual_seed(seed)
            out.append(transform(image))
    return torch.stack(out)


class _PerImage(AugmentOp):
    """Base of the ops that run a torchvision v2 transform on each image, seeded from the run's generator.

    They run on [0, 1] floats, as :class:`Augment` gives every op that is not ``on_uint8``; torchvision's v2
    kernels handle those (posterize quantizes floats to 2^bits levels, equalize goes through uint8 and back,
    solarize's threshold is in [0, 1]) and keep them in [0, 1]. Colour stage (1): after crops and flips, as
    timm and torchvision's reference scripts order them, before erasing and label mixing.
    """

    stage = 1

    def __init__(self, transform: nn.Module) -> None:
        super().__init__()
        self.transform = transform

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return per_image(self.transform, x, generator), y


class RandAugment(_PerImage):
    """RandAugment: ``num_ops`` ops drawn uniformly from 14 (identity, shears, translations, rotation, colour,
    contrast, brightness, sharpness, posterize, solarize, autocontrast, equalize), each at magnitude
    ``magnitude`` of 30, a random sign for the signed ones; torchvision's ``transforms.v2.RandAugment``.

    Cubuk et al. 2020, "RandAugment: Practical automated data augmentation with a reduced search space", §3
    (N ops, one global magnitude M); torchvision's defaults N = 2, M = 9 are the paper's ImageNet ResNet-50
    setting. Translations are 150/331 of the image side at most (relative), so the op fits any image size.

    Args:
        num_ops: N, ops applied in sequence to each image.
        magnitude: M, on torchvision's scale of 31 bins (0 … 30).
    """

    def __init__(self, num_ops: int = 2, magnitude: int = 9) -> None:
        if not 0 <= num_ops:
            raise ValueError(f"augment.ops.randaugment.num_ops must be >= 0, got {num_ops}")
        if not 0 <= magnitude <= 30:
            raise ValueError(f"augment.ops.randaugment.magnitude must be in [0, 30], got {magnitude}")
        super().__init__(v2.RandAugment(num_ops=num_ops, magnitude=magnitude))
        self.num_ops = num_ops
        self.magnitude = magnitude


class _TrivialAugmentWide(v2.TrivialAugmentWide):
    """torchvision's TrivialAugmentWide with its translation bound given per image side."""

    def __init__(self, translate: int | float) -> None:
        super().__init__()

        def shifts(num_bins: int, height: int, width: int) -> torch.Tensor:
            return torch.linspace(0.0, float(pixels(translate, min(height, width))), num_bins)

        # _AUGMENTATION_SPACE is private but the same in every torchvision with transforms.v2 (0.15 to 0.2x):
        # the only way to bound the translation, which torchvision fixes at 32 pixels whatever the image size
        self._AUGMENTATION_SPACE = {
            **v2.TrivialAugmentWide._AUGMENTATION_SPACE,
            "TranslateX": (shifts, True),
            "TranslateY": (shifts, True),
        }


class TrivialAugment(_PerImage):
    """TrivialAugment (Wide): one op per image, drawn uniformly from 14, at a magnitude drawn uniformly from
    31 bins; torchvision's ``transforms.v2.TrivialAugmentWide``.

    Müller & Hutter 2021, "TrivialAugment: Tuning-free Yet State-of-the-Art Data Augmentation", §3 (one op,
    uniform strength), with the wide augmentation space of its Table 1 (shear 0.99, rotate 135°, translate
    32 pixels on every dataset). A 32-pixel shift empties an 8×8 image, so the translation here is
    ``translate``: pixels, or a fraction of the side (1.0 is the paper's 32 on CIFAR's 32).

    Args:
        translate: largest shift: pixels (an int >= 1) or a fraction of the image side (a float in (0, 1]);
            at most the image side.
    """

    def __init__(self, translate: int | float = 1.0) -> None:
        check_size_option(translate, "augment.ops.trivialaugment.translate")
        super().__init__(_TrivialAugmentWide(translate))
        self.translate = translate

    def check(self, size: int) -> None:
        if pixels(self.translate, size) > size:
            raise too_large(
                f"{self.key}.translate", self.translate, size, "shifts beyond the side add nothing"
            )


class AutoAugment(_PerImage):
    """AutoAugment: one of a learned policy's 25 sub-policies per image, each two ops with their own
    probability and magnitude; torchvision's ``transforms.v2.AutoAugment``.

    Cubuk et al. 2019, "AutoAugment: Learning Augmentation Policies from Data", §3 (search space and policy
    structure); the policies found on reduced CIFAR-10 and on ImageNet are those of its appendix, as
    torchvision transcribes them. Translations are 150/331 of the image side at most (relative).

    Args:
        policy: ``"cifar10"`` or ``"imagenet"`` (or torchvision's ``"svhn"``).
    """

    def __init__(self, policy: str = "imagenet") -> None:
        choices = [p.value for p in v2.AutoAugmentPolicy]
        if policy not in choices:
            raise ValueError(f"augment.ops.autoaugment.policy must be one of {choices}, got {policy!r}")
        super().__init__(v2.AutoAugment(v2.AutoAugmentPolicy(policy)))
        self.policy = policy


class ColorJitter(_PerImage):
    """Random brightness, contrast, saturation and hue, in a random order per image; torchvision's
    ``transforms.v2.ColorJitter``.

    Howard 2013, "Some Improvements on Deep CNN Based Image Classification" (arXiv:1312.5402) §2.1 (random
    contrast, brightness and colour); 0.4 for brightness, contrast and saturation and none for hue is the
    ImageNet recipe of fb.resnet.torch that timm keeps (``color_jitter=0.4``). Saturation and hue leave
    one-channel images as they are.

    Args:
        brightness: factor drawn uniformly in [1 − b, 1 + b].
        contrast: factor drawn uniformly in [1 − c, 1 + c].
        saturation: factor drawn uniformly in [1 − s, 1 + s].
        hue: hue shift drawn uniformly in [−h, h], in turns of the colour wheel (at most 0.5).
    """

    def __init__(
        self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4, hue: float = 0.0
    ) -> None:
        for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if value < 0:
                raise ValueError(f"augment.ops.color_jitter.{name} must be >= 0, got {value}")
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"augment.ops.color_jitter.hue must be in [0, 0.5], got {hue}")
        super().__init__(v2.ColorJitter(brightness, contrast, saturation, hue))
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue


class Cutout(AugmentOp):
    """Fills one size×size square per image, centred uniformly in the image and clipped at the border.

    DeVries & Taylor 2017, "Improved Regularization of CNNs with Cutout", §3.2, §4.1 (16×16 on CIFAR-10, 8×8
    on CIFAR-100).

    Args:
        size: side of the square: pixels (an int >= 1) or a fraction of the image side (a float in (0, 1];
            the paper's 16 of CIFAR-10's 32 is 0.5, 4 pixels on 8×8 digits; 8 of 32 on CIFAR-100 is 0.25).
            At most the image side: a larger square blanks every image.
        p: probability of cutting an image (the paper: 1).
        fill: value of the cut pixels, in [0, 1] pixel units. The paper zeroes the normalized image, i.e.
            fills with the data mean; this op runs before normalization, so 0.5 stands in for the mean.
    """

    stage = 2
    key = "augment.ops.cutout"

    def __init__(self, size: int | float = 0.5, p: float = 1.0, fill: float = 0.5) -> None:
        super().__init__()
        check_size_option(size, "augment.ops.cutout.size")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"augment.ops.cutout.p must be in [0, 1], got {p}")
        self.size = size
        self.p = p
        self.fill = fill

    def check(self, size: int) -> None:
        if pixels(self.size, size) > size:
            raise too_large(f"{self.key}.size", self.size, size, "the square would blank every image")

    def draw(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """``(centre_y, centre_x, cut)``: int64 (N,) square centres and bool (N,) which images are cut."""
        n, _, h, w = x.shape
        centre_y = torch.randint(0, h, (n,), generator=generator, device=x.device)
        centre_x = torch.randint(0, w, (n,), generator=generator, device=x.device)
        return centre_y, centre_x, _rand(n, x, generator) < self.p

    def apply(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        centre_y: torch.Tensor,
        centre_x: torch.Tensor,
        cut: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        size = pixels(self.size, min(x.shape[-2:]))
        mask = _box_mask(centre_y - size // 2, centre_x - size // 2, size, size, x.shape, x.device)
        mask &= cut.view(-1, 1, 1, 1)
        return x.masked_fill(mask, self.fill), y


class RandomErasing(AugmentOp):
    """Erases one box of random area and aspect ratio per image, with probability ``p``.

    Zhong et al. 2020, "Random Erasing Data Augmentation", §3.1, Algorithm 1: a box of area s·HW,
    s ~ U(s_l, s_h), aspect ratio r ~ U(r_1, 1/r_1), placed uniformly where it fits, its pixels set to random
    values. Boxes are drawn as torchvision's ``RandomErasing`` does (its defaults p = 0.5, area 0.02–0.33,
    ratio 0.3–3.3, log-uniform; up to 10 tries, else the image is left as it is), the tries of every image
    side by side, so the op is batched, on the device, from the run's generator.

    Args:
        p: probability of erasing an image.
        scale: range of the box's area, as a fraction of the image area (relative: fits any image side).
        ratio: range of the box's aspect ratio (height / width), sampled log-uniformly.
        value: ``"random"``, uniform values in [0, 1] per pixel and channel (the paper's RE-R, its best,
            Table 3), or a constant in [0, 1] pixel units. torchvision's default 0 is applied after
            normalization, i.e. the data mean; this op runs before normalization, so 0.5 stands in for it.
    """

    stage = 2
    tries = 10  # torchvision's RandomErasing.get_params

    def __init__(
        self,
        p: float = 0.5,
        scale: Sequence[float] = (0.02, 0.33),
        ratio: Sequence[float] = (0.3, 3.3),
        value: float | str = "random",
    ) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"augment.ops.random_erasing.p must be in [0, 1], got {p}")
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(
                f"augment.ops.random_erasing.scale must satisfy 0 < low <= high <= 1, got {list(scale)}"
            )
        if not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(
                f"augment.ops.random_erasing.ratio must satisfy 0 < low <= high, got {list(ratio)}"
            )
        if value != "random" and (isinstance(value, str) or not 0.0 <= value <= 1.0):
            raise ValueError(f"augment.ops.random_erasing.value must be 'random' or in [0, 1], got {value!r}")
        self.p = p
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.value = value

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = x.shape
        height, width = box_tries(x, self.scale, self.ratio, self.tries, generator)  # torchvision: h = √(a·r)
        fits = (height < h) & (width < w)  # torchvision's strict test
        first = fits.float().argmax(dim=1, keepdim=True)  # the first try that fits
        height, width = height.gather(1, first).squeeze(1), width.gather(1, first).squeeze(1)
        top = (_rand(n, x, generator) * (h - height + 1)).floor()
        left = (_rand(n, x, generator) * (w - width + 1)).floor()
        erase = fits.any(dim=1) & (_rand(n, x, generator) < self.p)
        mask = _box_mask(top, left, height.view(-1, 1, 1, 1), width.view(-1, 1, 1, 1), x.shape, x.device)
        mask &= erase.view(-1, 1, 1, 1)
        if self.value == "random":
            noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            return torch.where(mask, noise, x), y
        return x.masked_fill(mask, self.value), y


def box_tries(
    x: torch.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    tries: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``tries`` candidate boxes per image as torchvision draws them (RandomResizedCrop, RandomErasing): an
    area uniform in ``scale`` × the image's, an aspect log-uniform in ``ratio``; returns the rounded sides
    ``(√(area·aspect), √(area/aspect))``, float (N, tries) each."""
    n, _, h, w = x.shape
    area = (
        h
        * w
        * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, tries, generator=generator, device=x.device))
    )
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(
        log_low + (log_high - log_low) * torch.rand(n, tries, generator=generator, device=x.device)
    )
    return (area * aspect).sqrt().round(), (area / aspect).sqrt().round()


def sample_beta(alpha: float, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``n`` samples of Beta(alpha, alpha) on ``device``, by ``torch.distributions.Beta``, from ``generator``.

    Zhang et al. 2018, "mixup" §2: λ ~ Beta(α, α).

    Args:
        alpha: both shape parameters (> 0).
        n: number of samples.
        generator: the source of randomness.
        device: where the samples live.
    """
    alpha = torch.tensor(float(alpha), device=device)
    # validate_args=False: alpha > 0 is checked in the op's constructor; the check would sync with the device
    beta = torch.distributions.Beta(alpha, alpha, validate_args=False)
    return drawn_from(generator, lambda: beta.sample((n,)))


def drawn_from(generator: torch.Generator, draw: Callable[[], torch.Tensor]) -> torch.Tensor:
    """What ``draw`` returns when its random numbers come from ``generator``.

    ``torch.distributions`` samplers take no generator: they draw from the default generator of their device.
    Here that generator is given ``generator``'s state for the draw, ``generator`` continues from where the
    draw left it, and the default generator gets its own state back: dropout and init never see the draw.
    """
    device = generator.device
    accelerator = [] if device.type == "cpu" else [device]
    module = torch if device.type == "cpu" else torch.get_device_module(device)
    with torch.random.fork_rng(devices=accelerator, device_type=device.type):  # restores the default's state
        module.set_rng_state(generator.get_state(), *accelerator)
        out = draw()
        generator.set_state(module.get_rng_state(*accelerator))
    return out


class _Mix(AugmentOp):
    """Base of the label-mixing ops: λ ~ Beta(α, α) once per batch, each image paired with a permutation."""

    stage = 3
    option = ""

    def __init__(self, alpha: float, num_classes: int) -> None:
        super().__init__()
        if alpha <= 0:
            raise ValueError(f"augment.ops.{self.option}.alpha must be > 0, got {alpha}")
        if num_classes < 1:
            raise ValueError(f"augment.ops.{self.option}.num_classes must be >= 1, got {num_classes}")
        self.alpha = alpha
        self.num_classes = num_classes

    def _targets(self, y: torch.Tensor) -> torch.Tensor:
        """Soft targets (N, K) from int64 labels, or the soft targets of an earlier mixing op as they are."""
        if y.is_floating_point():
            if y.shape[-1] != self.num_classes:
                raise ValueError(
                    f"augment.ops.{self.option}.num_classes is {self.num_classes}, but the soft targets have "
                    f"{y.shape[-1]} classes"
                )
            return y
        return F.one_hot(y, self.num_classes).float()

    def _draw(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        lam = sample_beta(self.alpha, 1, generator, x.device)[0]
        perm = torch.randperm(x.shape[0], generator=generator, device=x.device)
        return lam, perm


class MixUp(_Mix):
    """Convex combinations of image pairs and of their targets, λ ~ Beta(α, α) once per batch.

    Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization", §2 and §3.1 (α = 0.2 on ImageNet; 1 on
    CIFAR-10, §3.2).

    Args:
        alpha: Beta(α, α) shape.
        num_classes: K of the soft targets (the ``data.num_classes``).
    """

    option = "mixup"

    def __init__(self, alpha: float = 0.2, num_classes: int = 10) -> None:
        super().__init__(alpha, num_classes)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lam, perm = self._draw(x, generator)
        targets = self._targets(y)
        return lam * x + (1 - lam) * x[perm], lam * targets + (1 - lam) * targets[perm]


class CutMix(_Mix):
    """Pastes a box of each paired image into the other; targets mixed by the pasted area.

    Yun et al. 2019, "CutMix", §3.1: a box of area (1 − λ)·HW with λ ~ Beta(α, α) (α = 1), centred uniformly
    in the image and clipped at the border, one box per batch; λ is then corrected to the area actually kept.

    Args:
        alpha: Beta(α, α) shape.
        num_classes: K of the soft targets (the ``data.num_classes``).
    """

    option = "cutmix"

    def __init__(self, alpha: float = 1.0, num_classes: int = 10) -> None:
        super().__init__(alpha, num_classes)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _, _, h, w = x.shape
        lam, perm = self._draw(x, generator)
        cut = (1 - lam).sqrt()
        cut_h, cut_w = (h * cut).floor(), (w * cut).floor()
        centre_y = torch.randint(0, h, (1,), generator=generator, device=x.device)
        centre_x = torch.randint(0, w, (1,), generator=generator, device=x.device)
        box = _box_mask(centre_y - cut_h // 2, centre_x - cut_w // 2, cut_h, cut_w, x.shape, x.device)
        kept = 1 - box.float().mean()  # λ corrected to the clipped box (one box for the batch)
        targets = self._targets(y)
        return torch.where(box, x[perm], x), kept * targets + (1 - kept) * targets[perm]
