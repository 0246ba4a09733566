"""The ``preprocess`` group: the lecture's "Step 1: preprocess the data", as a module in the model wrapper.

Statistics are fitted on the training split only, before the first step, and live in buffers, so they are
saved in the checkpoint and evaluation reuses exactly the transform training used. Every option first rescales
uint8 pixels to [0, 1], so all statistics are in units of pixel/255.

Each option is one fused pass over a uint8 batch: the rescaling is folded into the affine map (or, for
whitening, into the matrix product), and the uint8 → float conversion happens inside that kernel by type
promotion, so a batch is read once as uint8 and written once as float. Float inputs (already in [0, 1], e.g.
after a colour augmentation or mixup) take the same map without the 1/255.
"""

from __future__ import annotations

import torch
from torch import nn

# a D×D float64 covariance of 16384² entries is 2 GiB; beyond that whitening is the wrong tool
MAX_WHITEN_DIM = 16384


class Rescale(nn.Module):
    """Maps uint8 pixels to floats in [0, 1]; fits nothing. Every other option builds on it."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("fitted", torch.tensor(False))

    def fit(self, images: torch.Tensor) -> None:
        """Fits the statistics on the uint8 (N, C, H, W) training images."""
        self.fitted.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.div(x, 255.0) if x.dtype == torch.uint8 else x  # one kernel: uint8 in, float out


class _Fitted(Rescale):
    """Base of the options with fitted statistics, empty until ``fit`` or a checkpoint fills the buffers."""

    option = ""  # the option's name in conf/preprocess/, for error messages
    statistics: tuple[str, ...] = ("mean",)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the buffers are empty until fitted: take the checkpoint's shapes before the strict copy
        for name in self.statistics:
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check_fitted(self) -> None:
        if self.mean.numel() == 0:  # a shape test: no device sync per step
            raise RuntimeError(f"preprocess={self.option} was used before fit() on the training images")


def _unit(x: torch.Tensor) -> float:
    """The factor that maps ``x``'s pixels to [0, 1]: 1/255 for uint8, 1 for floats."""
    return 1.0 / 255.0 if x.dtype == torch.uint8 else 1.0


def _chunks(images: torch.Tensor):
    """Yields the images as float64 in [0, 1], 4096 at a time, so float64 memory stays small on big splits."""
    for chunk in images.split(4096):
        yield chunk.to(torch.float64).div_(255.0)


class MeanImage(_Fitted):
    """Subtracts the mean image, (C, H, W) averaged over the training split (the lecture's AlexNet option).

    Krizhevsky, Sutskever & Hinton 2012, "ImageNet Classification with Deep CNNs", §2: "subtracting the mean
    activity over the training set from each pixel".
    """

    option = "mean_image"

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(0))

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> None:
        total = torch.zeros(images.shape[1:], dtype=torch.float64)
        for x in _chunks(images):
            total += x.sum(dim=0)
        self.mean = (total / images.shape[0]).float()
        self.fitted.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        return torch.add(-_fit_to(self.mean, x.shape[-2:]), x, alpha=_unit(x))  # x·unit − mean, one pass


def _fit_to(mean: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """The (C, H, W) mean image for inputs of ``size``: itself, its central crop for the smaller crops an
    ``augment`` option trains on (AlexNet subtracts the 256×256 mean before cropping 224s, §2), or bilinearly
    resized for larger inputs. Mean images are smooth, so the central crop stands in for every window."""
    if mean.shape[-2:] == size:
        return mean
    height, width = size
    if height <= mean.shape[-2] and width <= mean.shape[-1]:
        top, left = (mean.shape[-2] - height) // 2, (mean.shape[-1] - width) // 2
        return mean[:, top : top + height, left : left + width]
    return torch.nn.functional.interpolate(mean[None], size=tuple(size), mode="bilinear")[0]


class ChannelMean(_Fitted):
    """Subtracts the per-channel mean over every pixel of the training split (the lecture's VGG option).

    Simonyan & Zisserman 2014, "Very Deep Convolutional Networks", §2.1: "subtracting the mean RGB value,
    computed on the training set, from each pixel".
    """

    option = "channel_mean"

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(0))

    @staticmethod
    def _moments(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the float64 per-channel mean and mean of squares of the images in [0, 1]."""
        channels = images.shape[1]
        if images.dtype == torch.uint8:  # exact, from each channel's histogram of the 256 levels (10× faster)
            levels = torch.arange(256, dtype=torch.float64) / 255.0
            counts = torch.stack(
                [torch.bincount(images[:, c].flatten(), minlength=256) for c in range(channels)]
            )
            counts = counts.double() / counts[0].sum()
            return counts @ levels, counts @ levels.square()
        total = torch.zeros(channels, dtype=torch.float64)
        squares = torch.zeros(channels, dtype=torch.float64)
        for x in _chunks(images):
            total += x.sum(dim=(0, 2, 3))
            squares += x.square().sum(dim=(0, 2, 3))
        count = images.numel() // channels
        return total / count, squares / count

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> None:
        mean, _ = self._moments(images)
        self.mean = mean.float().view(-1, 1, 1)
        self.fitted.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        return torch.add(-self.mean, x, alpha=_unit(x))  # x·unit − mean, one pass


class Standardize(ChannelMean):
    """Per-channel standardization: subtract the channel mean and divide by the channel std.

    Both are computed over every pixel of the training split (the lecture's "subtract per-channel mean", VGG,
    Simonyan & Zisserman 2014 §2.1, plus the common division by the std).

    Args:
        eps: floor on the std, for constant channels.
    """

    option = "standardize"
    statistics = ("mean", "std")

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("std", torch.ones(0))

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> None:
        mean, squares = self._moments(images)
        std = (squares - mean.square()).clamp_min(0).sqrt().clamp_min(self.eps)
        self.mean = mean.float().view(-1, 1, 1)
        self.std = std.float().view(-1, 1, 1)
        self.fitted.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        return torch.addcmul(-self.mean / self.std, x, _unit(x) / self.std)  # (x·unit − mean) / std, one pass


class Whiten(_Fitted):
    """PCA or ZCA whitening of the flattened images, fitted on the centred training split (D = C·H·W).

    With the training covariance Σ = U Λ Uᵀ, ``pca`` maps x ↦ (Λ + eps)^{-1/2} Uᵀ (x − μ) and ``zca`` maps
    x ↦ U (Λ + eps)^{-1/2} Uᵀ (x − μ). Both give (near) identity covariance on the training split; ZCA is the
    whitening closest to the identity map, so its output still looks like an image. The PCA output is reshaped
    back to (C, H, W) only to keep the input shape: it is NOT an image, but the D principal components in
    order of decreasing variance. The lecture notes that whitening is not common for CNNs.
    Krizhevsky 2009, "Learning Multiple Layers of Features from Tiny Images", App. A (ZCA on CIFAR);
    Coates, Lee & Ng 2011, "An Analysis of Single-Layer Networks in Unsupervised Feature Learning" (ZCA).

    Args:
        mode: ``"pca"`` or ``"zca"``.
        eps: added to each eigenvalue, in (pixel/255)²; it keeps a singular covariance (N ≤ D) finite.
    """

    statistics = ("mean", "matrix")

    def __init__(self, mode: str = "zca", eps: float = 1e-2) -> None:
        super().__init__()
        if mode not in ("pca", "zca"):
            raise ValueError(f"preprocess.mode must be 'pca' or 'zca', got {mode!r}")
        if eps <= 0:
            raise ValueError(f"preprocess.eps must be > 0 to keep the whitening finite, got {eps}")
        self.mode = mode
        self.eps = eps
        self.option = f"{mode}_whiten"
        self.register_buffer("mean", torch.zeros(0))
        self.register_buffer("matrix", torch.zeros(0))  # (D, D): flat output = (x − μ) @ matrix

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> None:
        dim = images[0].numel()
        if dim > MAX_WHITEN_DIM:
            raise ValueError(
                f"preprocess={self.option} needs a D×D covariance of the flattened images, but "
                f"D = C·H·W = {dim} > {MAX_WHITEN_DIM}: set data.image_size smaller"
            )
        total = torch.zeros(dim, dtype=torch.float64)
        for x in _chunks(images):
            total += x.flatten(1).sum(dim=0)
        mean = total / images.shape[0]
        # a second pass over centred data: better conditioned than E[xxᵀ] − μμᵀ
        cov = torch.zeros(dim, dim, dtype=torch.float64)
        for x in _chunks(images):
            centred = x.flatten(1) - mean
            cov += centred.T @ centred
        cov /= images.shape[0]
        eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
        # decreasing variance: component 0 is the first principal component
        eigvals, eigvecs = eigvals.flip(0), eigvecs.flip(1)
        # clamp: round-off makes the null eigenvalues of a singular covariance slightly negative
        pca = eigvecs / (eigvals.clamp_min(0) + self.eps).sqrt()
        matrix = pca if self.mode == "pca" else pca @ eigvecs.T
        self.mean = mean.float().view(images.shape[1:])
        self.matrix = matrix.float()
        self.fitted.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        if x.shape[1:] != self.mean.shape:
            raise ValueError(
                f"preprocess={self.option} was fitted on {tuple(self.mean.shape)} images but got "
                f"{tuple(x.shape[1:])}: whitening works on whole images of one size, so it does not combine "
                f"with augment or tta options that crop smaller (alexnet, crop.scale < 1)"
            )
        # (x·unit − μ) M = unit·(x M) − μ M: the rescaling and centring ride on the one matrix product
        flat = x.flatten(1).float()
        bias = -(self.mean.flatten() @ self.matrix)
        return torch.addmm(bias, flat, self.matrix, alpha=_unit(x)).view(x.shape)
