"""The ``augment`` group: random transforms of training batches, as batched tensor ops on the model's device.

The LightningModule calls :class:`Augment` on each training batch after it reaches the device, so no op works
per image in PIL or in the DataLoader workers. Every random number comes from one ``torch.Generator`` on the
batch's device, seeded with the run's ``seed``, so a run is reproducible from its seed and its checkpoint.
Options are dicts of named ops (``conf/augment/<option>.yaml``); a list of options on the command line
(``augment=[cifar,cutout]``) merges their ops, and :class:`Augment` runs them in the order of their ``stage``:
ops keyed by the image's pixels (alternating flips), geometric, colour, erasing, label mixing. Validation and
test batches are never augmented.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class AugmentOp(nn.Module):
    """Base of every augmentation op: a random map of a float batch and its targets.

    Subclasses set ``stage`` (the order :class:`Augment` runs them in: −1 ops keyed by the image's own pixels,
    0 geometric, 1 colour, 2 erasing, 3 label mixing) and implement ``forward(x, y, generator)`` on float
    (N, C, H, W) images in [0, 1] (or
    also uint8 ones where ``on_uint8``) and int64 (N,) labels or float (N, K) soft targets.
    """

    stage: int = 0
    padding: int = 0  # padding of the random crop; only Crop sets it, test-time views reuse it
    padding_mode: str = "constant"  # how Crop pads: zeros ("constant") or mirrored pixels ("reflect")
    epoch: int = 0  # the training epoch, set by Augment.set_epoch; AlternatingFlip's flips depend on it
    # pure index ops (crops, flips) give the same pixels on uint8 as on floats: they run on the uint8 batch,
    # a quarter of the bytes, and the preprocess group's fused pass does the one conversion to float
    on_uint8: bool = False

    def output_size(self, size: int) -> int:
        """Side of the images this op outputs, given the side of its input images."""
        return size

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
        self.ops = nn.ModuleDict(sorted(ops.items(), key=lambda item: item[1].stage))  # sorted() is stable
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._pending_state: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.ops)

    @property
    def padding(self) -> int:
        """The random crop's zero padding, or 0 without one."""
        return next((op.padding for op in self.ops.values() if op.padding), 0)

    @property
    def padding_mode(self) -> str:
        """How the random crop pads: ``"constant"`` (zeros) or ``"reflect"``."""
        return next((op.padding_mode for op in self.ops.values() if op.padding), "constant")

    def set_epoch(self, epoch: int) -> None:
        """Tells every op the training epoch about to run (the module calls it at each epoch start)."""
        for op in self.ops.values():
            op.epoch = epoch

    def output_size(self, size: int) -> int:
        """Side of the augmented images, given the side of the training images."""
        for op in self.ops.values():
            size = op.output_size(size)
        return size

    def output_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """(C, H, W) of what the model is trained on, given the images' shape."""
        channels, height, width = shape
        return channels, self.output_size(height), self.output_size(width)

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
        padding: pixels added on each side before cropping.
        scale: crop side as a fraction of the input side (1: the input size).
        padding_mode: ``"constant"`` pads zeros (He et al.), ``"reflect"`` mirrors the border (airbench).
    """

    stage = 0
    on_uint8 = True

    def __init__(self, padding: int = 4, scale: float = 1.0, padding_mode: str = "constant") -> None:
        super().__init__()
        if padding < 0:
            raise ValueError(f"augment.ops.crop.padding must be >= 0, got {padding}")
        if not 0.0 < scale <= 1.0:
            raise ValueError(f"augment.ops.crop.scale must be in (0, 1], got {scale}")
        if padding_mode not in ("constant", "reflect"):
            raise ValueError(
                f"augment.ops.crop.padding_mode must be constant or reflect, got {padding_mode!r}"
            )
        self.padding = padding
        self.scale = scale
        self.padding_mode = padding_mode

    def output_size(self, size: int) -> int:
        return round(self.scale * size)

    def draw(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 (N,) each: ``(top, left)`` of every crop in the padded image."""
        n, _, h, w = x.shape
        slack_h, slack_w = (
            h + 2 * self.padding - self.output_size(h),
            w + 2 * self.padding - self.output_size(w),
        )
        top = torch.randint(0, slack_h + 1, (n,), generator=generator, device=x.device)
        left = torch.randint(0, slack_w + 1, (n,), generator=generator, device=x.device)
        return top, left

    def apply(
        self, x: torch.Tensor, y: torch.Tensor, top: torch.Tensor, left: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, c, h, w = x.shape
        out_h, out_w = self.output_size(h), self.output_size(w)
        if self.padding:
            x = F.pad(x, [self.padding] * 4, mode=self.padding_mode)
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
        crop: the paper's crop side in pixels; only the ratios ``short_side / crop`` matter.
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
        scale: range of the window's area, as a fraction of the image area.
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
        area = (
            h
            * w
            * (
                self.scale[0]
                + (self.scale[1] - self.scale[0])
                * torch.rand(n, self.tries, generator=generator, device=x.device)
            )
        )
        log_low, log_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(
            log_low + (log_high - log_low) * torch.rand(n, self.tries, generator=generator, device=x.device)
        )
        width = (area * aspect).sqrt().round()
        height = (area / aspect).sqrt().round()
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


class Cutout(AugmentOp):
    """Fills one size×size square per image, centred uniformly in the image and clipped at the border.

    DeVries & Taylor 2017, "Improved Regularization of CNNs with Cutout", §3.2, §4.1 (16×16 on CIFAR-10).

    Args:
        size: side of the square in pixels.
        p: probability of cutting an image (the paper: 1).
        fill: value of the cut pixels, in [0, 1] pixel units. The paper zeroes the normalized image, i.e.
            fills with the data mean; this op runs before normalization, so 0.5 stands in for the mean.
    """

    stage = 2

    def __init__(self, size: int = 16, p: float = 1.0, fill: float = 0.5) -> None:
        super().__init__()
        if size <= 0:
            raise ValueError(f"augment.ops.cutout.size must be > 0, got {size}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"augment.ops.cutout.p must be in [0, 1], got {p}")
        self.size = size
        self.p = p
        self.fill = fill

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
        mask = _box_mask(
            centre_y - self.size // 2, centre_x - self.size // 2, self.size, self.size, x.shape, x.device
        )
        mask &= cut.view(-1, 1, 1, 1)
        return x.masked_fill(mask, self.fill), y


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
