"""``cvarch-compress [ckpt_path=…] [compress=squeezenet|squeezenet_8bit|alexnet] [reference=alexnet]``: Deep
Compression, stage by stage, with the real size and accuracy after each stage.

Han, Mao & Dally 2016, "Deep Compression: Compressing Deep Neural Networks with Pruning, Trained Quantization
and Huffman Coding" (ICLR, arXiv:1510.00149), on every conv and linear weight of a cvarch model:

1. pruning (§2): each layer's smallest-magnitude weights are set to zero (``torch.nn.utils.prune``); the
   survivors are stored sparse, each with its relative index (the zeros skipped since the previous entry) in
   ``index_bits`` (§2, Fig. 2);
2. weight sharing (§3): a layer's survivors are clustered by k-means with linear initialization (§3.1); each
   becomes its centroid, stored as an index into the layer's codebook of 2^``bits`` centroids;
3. Huffman coding (§4) of the codebook indices and of the relative indices.

Every size is the bit count of the encoded tensors, not an estimate; what each stage stores is listed in
:class:`LayerReport`. Biases, norm parameters and float buffers are stored dense at 32 bits in every stage.
The paper retrains after pruning and fine-tunes the centroids after sharing (§2, §3.3); this tool does not, so
the accuracy after each stage is what the stage costs a trained model by itself.
"""

from __future__ import annotations

import heapq
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.nn.utils import prune

from cvarch.build import Trained, build_model, build_trained, instantiate
from cvarch.checkpoint import atomic_save
from cvarch.config import ConfigError, compose_nested, plain_config_errors, validate
from cvarch.cost import MB
from cvarch.data import SPLITS

STAGES = ("dense", "pruned", "quantized", "huffman")
FLOAT_BITS = 32  # a dense weight, a bias, a centroid
MAX_BITS = 16  # widest codebook index or relative index accepted (2^16 symbols)
# A canonical Huffman code is stored as one code length per symbol of its alphabet (0: symbol absent), as
# DEFLATE stores its tables (RFC 1951 §3.2.2). 6 bits hold any length up to 63; a Huffman code of fewer than
# 2^32 symbols is never longer than 45 bits (the counts at depth L grow at least like Fibonacci numbers).
CODE_LENGTH_BITS = 6
MAX_ITER = 300  # Lloyd iterations at most (scikit-learn's KMeans default); 1-D layers converge in far fewer
# Iandola et al. 2016 Table 2: AlexNet 240MB / SqueezeNet with Deep Compression at 6 bits 0.47MB
PAPER_REDUCTION = 510
MIB = 2**20  # the papers' "MB": SqueezeNet's 1,248,424 fp32 weights are 4.76 MiB, Iandola's "4.8MB"


class DeepCompression:
    """The settings of the three stages, per layer type (Han et al. 2016 §2–4); the papers' presets are
    ``conf/compress/*.yaml``. A layer is a ``nn.Conv2d`` ("conv") or a ``nn.Linear`` ("fc").

    Args:
        sparsity: share of each layer's weights pruned (set to zero), in [0, 1).
        conv_sparsity: share pruned in conv layers instead of ``sparsity``; ``None``: ``sparsity``.
        fc_sparsity: share pruned in linear layers instead of ``sparsity``; ``None``: ``sparsity``.
        layer_sparsity: one share per layer, in the order the model registers its conv and linear layers (a
            paper's per-layer table); overrides the three above.
        conv_bits: codebook index width of conv layers: 2^bits shared weights per layer (AlexNet: 8).
        fc_bits: codebook index width of linear layers (AlexNet: 5).
        conv_index_bits: width of a conv layer's relative indices (§2: 8).
        fc_index_bits: width of a linear layer's relative indices (§2: 5).

    Raises:
        ConfigError: naming the ``compress.*`` key of a share outside [0, 1) or a width outside 1..16.
    """

    def __init__(
        self,
        sparsity: float = 0.0,
        conv_sparsity: float | None = None,
        fc_sparsity: float | None = None,
        layer_sparsity: Sequence[float] | None = None,
        conv_bits: int = 8,
        fc_bits: int = 5,
        conv_index_bits: int = 8,
        fc_index_bits: int = 5,
    ) -> None:
        shares = {"sparsity": sparsity, "conv_sparsity": conv_sparsity, "fc_sparsity": fc_sparsity}
        shares |= {f"layer_sparsity[{i}]": s for i, s in enumerate(layer_sparsity or ())}
        widths = {
            "conv_bits": conv_bits,
            "fc_bits": fc_bits,
            "conv_index_bits": conv_index_bits,
            "fc_index_bits": fc_index_bits,
        }
        errors = [
            f"compress.{key}: the share of a layer's weights pruned, in [0, 1), got {value}"
            for key, value in shares.items()
            if value is not None and not 0 <= value < 1
        ]
        errors += [
            f"compress.{key}: a width in bits, 1 to {MAX_BITS}, got {value}"
            for key, value in widths.items()
            if not 1 <= value <= MAX_BITS
        ]
        if errors:
            raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
        self.sparsity = {"conv": sparsity if conv_sparsity is None else conv_sparsity}
        self.sparsity["fc"] = sparsity if fc_sparsity is None else fc_sparsity
        self.layer_sparsity = None if layer_sparsity is None else [float(s) for s in layer_sparsity]
        self.bits = {"conv": conv_bits, "fc": fc_bits}
        self.index_bits = {"conv": conv_index_bits, "fc": fc_index_bits}

    def plan(self, model: nn.Module) -> list[LayerPlan]:
        """What each conv and linear layer of ``model`` gets, in registration order.

        Raises:
            ConfigError: naming ``compress.layer_sparsity`` when it has not one share per layer.
        """
        layers = [
            (name, "conv" if isinstance(m, nn.Conv2d) else "fc")
            for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))
        ]
        shares = [self.sparsity[kind] for _, kind in layers]
        if self.layer_sparsity is not None:
            if len(self.layer_sparsity) != len(layers):
                raise ConfigError(
                    f"compress.layer_sparsity: {len(self.layer_sparsity)} shares for the {len(layers)} conv "
                    f"and linear layers of {type(model).__name__} ({', '.join(n for n, _ in layers)})"
                )
            shares = self.layer_sparsity
        return [
            LayerPlan(name, kind, share, self.bits[kind], self.index_bits[kind])
            for (name, kind), share in zip(layers, shares, strict=True)
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "sparsity": self.sparsity,
            "layer_sparsity": self.layer_sparsity,
            "bits": self.bits,
            "index_bits": self.index_bits,
        }


@dataclass(frozen=True)
class LayerPlan:
    """One layer's settings (:meth:`DeepCompression.plan`)."""

    name: str  # module name, e.g. features.0
    kind: str  # conv | fc
    sparsity: float  # share of the weights pruned
    bits: int  # codebook index width: at most 2^bits shared weights
    index_bits: int  # relative index width


# --- stage 1: pruning ---------------------------------------------------------------------------------------


class StableL1Unstructured(prune.L1Unstructured):
    """``prune.L1Unstructured`` with its ties broken by position: among weights of equal magnitude the first
    in row-major order is pruned first (a stable sort), where ``L1Unstructured``'s ``torch.topk`` leaves the
    order of ties unspecified. A layer's mask is then a function of its weights alone.

    Args:
        amount: the number of weights to prune.
    """

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        mask = default_mask.clone(memory_format=torch.contiguous_format)
        smallest = torch.sort(t.abs().flatten(), stable=True).indices[: self.amount]
        mask.view(-1)[smallest] = 0
        return mask


def prune_layer(module: nn.Module, sparsity: float) -> None:
    """Zeroes the ``round(sparsity × numel)`` smallest-magnitude weights of ``module.weight`` in place (Han et
    al. 2016 §2) and makes the mask permanent (``prune.remove``): the weight stays a plain parameter, the
    state dict keeps its keys. Its bias is left dense. Pruned weights are +0.0 (a mask turns a negative weight
    into −0.0).
    """
    StableL1Unstructured.apply(module, "weight", amount=round(sparsity * module.weight.numel()))
    prune.remove(module, "weight")
    with torch.no_grad():
        module.weight.masked_fill_(module.weight == 0, 0.0)


def relative_indices(positions: np.ndarray, index_bits: int) -> np.ndarray:
    """A layer's sparse structure as a stream of ``index_bits``-wide symbols (Han et al. 2016 §2, Fig. 2).

    ``positions`` are the flat, row-major positions of the nonzero weights, ascending. Each nonzero weight is
    the number of zeros skipped since the previous entry, 0 to 2^index_bits − 2; the largest symbol,
    2^index_bits − 1, is a filler: it skips that many zeros and holds no weight. Han et al. store a filler as
    a zero weight, with a value slot; here the filler symbol itself says so, which costs one symbol of the
    alphabet and keeps the value stream to the nonzero weights only, each one of the 2^bits centroids. Zeros
    after the last nonzero weight are not stored: the shape gives them.
    """
    filler = 2**index_bits - 1
    gaps = np.diff(positions, prepend=-1) - 1
    fillers = gaps // filler
    stream = np.full(int(fillers.sum()) + len(positions), filler, dtype=np.int64)
    stream[np.cumsum(fillers + 1) - 1] = gaps % filler
    return stream


def positions_from_relative(stream: np.ndarray, index_bits: int) -> np.ndarray:
    """The inverse of :func:`relative_indices`: the flat positions of the nonzero weights."""
    filler = 2**index_bits - 1
    weight = stream < filler
    ends = np.cumsum(np.where(weight, stream + 1, filler))
    return ends[weight] - 1


# --- stage 2: weight sharing --------------------------------------------------------------------------------


def kmeans_1d(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on scalars with Han et al.'s linear initialization (2016 §3.1: centroids spaced
    linearly between the min and the max, which keeps the rare large weights represented).

    The same iterations as scikit-learn's ``KMeans(init=…, n_init=1, algorithm="lloyd", tol=0)`` (tested), in
    one dimension: on the sorted values a cluster is a run between two midpoints of neighbouring centroids,
    found by binary search, and its mean comes from prefix sums, so an iteration costs O(k log n) after one
    sort instead of O(n k). In NumPy: an iteration is a few small operations, where torch's intra-op threads
    cost more than the work (a binary search of 255 midpoints took 7.7 ms with 2 threads, 0.05 ms in NumPy, on
    the 2-core VM). Empty clusters are re-seeded, as scikit-learn does, at the values farthest from their
    clusters' means, so every centroid is used: with at least k distinct values, exactly k distinct values
    come out.

    Args:
        values: the weights to share, 1-D.
        k: clusters; lowered to the number of distinct values where there are fewer.

    Returns:
        ``(centroids, labels)``: ascending float32 centroids and each value's cluster (int64).
    """
    x = values.detach().cpu().double().numpy()
    order = np.argsort(x, kind="stable")
    x = x[order]
    n = len(x)
    k = min(k, int(np.count_nonzero(np.diff(x))) + 1 if n else 0)
    if k == 0:
        return torch.zeros(0), torch.zeros(0, dtype=torch.int64)
    prefix = np.concatenate([[0.0], np.cumsum(x)])
    centroids = np.linspace(x[0], x[-1], k)
    previous = None
    for _ in range(MAX_ITER):
        cuts = _cuts(x, centroids)
        centroids = _means(prefix, cuts, centroids)
        empty = int(np.count_nonzero(np.diff(cuts) == 0))
        if empty:
            centroids, previous = _reseed(x, centroids, cuts, at_most=empty), None
            continue
        if previous is not None and np.array_equal(cuts, previous):
            break
        previous = cuts
    cuts = _cuts(x, centroids)
    while (np.diff(cuts) == 0).any():  # MAX_ITER ran out while re-seeding: fill the rest, one at a time
        centroids = _reseed(x, _means(prefix, cuts, centroids), cuts, at_most=1)
        cuts = _cuts(x, centroids)
    # the final means from sums over each cluster, not from prefix-sum differences, whose rounding error grows
    # with the layer: neighbouring clusters, disjoint runs of float32 values, then round to distinct centroids
    centroids = np.add.reduceat(x, cuts[:-1]) / np.diff(cuts)
    labels = np.empty(n, dtype=np.int64)
    labels[order] = np.repeat(np.arange(k), np.diff(cuts))
    return torch.from_numpy(centroids).float(), torch.from_numpy(labels)


def _cuts(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Where each cluster starts in the sorted values, and ``n`` last: a value goes to its nearest centroid,
    the lower one on a tie (as scikit-learn's argmin)."""
    inner = np.searchsorted(x, (centroids[1:] + centroids[:-1]) / 2, side="right")
    return np.concatenate([[0], inner, [len(x)]])


def _means(prefix: np.ndarray, cuts: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Each non-empty cluster's mean; an empty cluster keeps its centroid."""
    counts = np.diff(cuts)
    sums = prefix[cuts[1:]] - prefix[cuts[:-1]]
    return np.where(counts > 0, sums / np.maximum(counts, 1), centroids)


def _reseed(x: np.ndarray, centroids: np.ndarray, cuts: np.ndarray, at_most: int) -> np.ndarray:
    """Moves up to ``at_most`` empty clusters' centroids onto the values farthest from their own clusters'
    means (scikit-learn's ``_relocate_empty_clusters``), one value from each of the most spread clusters. A
    cluster is a sorted run, so that value is the first or the last of its run: O(k log k). ``centroids`` are
    the clusters' means, so a cluster that gives a value keeps the values on the far side of its mean; with
    ``at_most=1`` each re-seed therefore fills one more cluster."""
    full = np.diff(cuts) > 0
    first, last = x[cuts[:-1][full]], x[cuts[1:][full] - 1]
    below, above = centroids[full] - first, last - centroids[full]
    spread = np.maximum(below, above)
    givers = np.argsort(-spread, kind="stable")[: min(at_most, int(np.count_nonzero(spread > 0)))]
    moved = centroids.copy()
    moved[np.flatnonzero(~full)[: len(givers)]] = np.where(below >= above, first, last)[givers]
    return np.sort(moved)


def share_layer(module: nn.Module, bits: int) -> torch.Tensor:
    """Replaces each nonzero weight of ``module.weight`` by its k-means centroid, 2^``bits`` centroids (fewer
    where the layer has fewer distinct nonzero weights), in place (Han et al. 2016 §3). Zeros stay +0.0.

    Returns:
        The layer's codebook: its centroids, ascending.
    """
    weight = module.weight.detach()
    flat = weight.flatten()
    positions = torch.nonzero(flat).squeeze(1)
    codebook, labels = kmeans_1d(flat[positions], 2**bits)
    shared = torch.zeros_like(flat)
    shared[positions] = codebook.to(flat)[labels.to(flat.device)]
    with torch.no_grad():
        module.weight.copy_(shared.view(weight.shape))
    return codebook


# --- stage 3: Huffman coding --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bitstream:
    """Encoded bits, packed 8 to a byte (the last byte zero-padded), and how many of them there are."""

    data: bytes
    nbits: int


@dataclass(frozen=True)
class HuffmanCode:
    """A canonical Huffman code (Huffman 1952; canonical form as DEFLATE's, RFC 1951 §3.2.2): the codes follow
    from the code lengths alone, so the table stored is one length per symbol of the alphabet
    (:attr:`table_bits`). Built with ``heapq``; encoding and decoding are vectorized in NumPy.

    Args:
        lengths: code length per symbol of the alphabet; 0 for a symbol that does not occur.
    """

    lengths: np.ndarray

    @classmethod
    def fit(cls, symbols: np.ndarray, alphabet: int) -> HuffmanCode:
        """The Huffman code of ``symbols`` (integers in ``[0, alphabet)``); a lone symbol gets a 1-bit
        code."""
        counts = np.bincount(symbols, minlength=alphabet)
        present = np.flatnonzero(counts)
        lengths = np.zeros(alphabet, dtype=np.int64)
        if len(present) == 1:
            lengths[present] = 1
        if len(present) < 2:
            return cls(lengths)
        # nodes 0…alphabet−1 are the symbols, merged nodes count on from there; ties pop the lower node first
        heap = [(int(counts[s]), int(s)) for s in present]
        heapq.heapify(heap)
        parent = np.full(alphabet + len(present) - 1, -1, dtype=np.int64)
        node = alphabet
        while len(heap) > 1:
            (count_a, a), (count_b, b) = heapq.heappop(heap), heapq.heappop(heap)
            parent[a] = parent[b] = node
            heapq.heappush(heap, (count_a + count_b, node))
            node += 1
        depth = np.zeros(len(parent), dtype=np.int64)
        for child in range(len(parent) - 2, -1, -1):  # a parent is numbered after its children
            if parent[child] >= 0:
                depth[child] = depth[parent[child]] + 1
        lengths[present] = depth[present]
        return cls(lengths)

    @property
    def table_bits(self) -> int:
        """Bits of the stored table: :data:`CODE_LENGTH_BITS` per symbol of the alphabet."""
        return len(self.lengths) * CODE_LENGTH_BITS

    def codes(self) -> tuple[np.ndarray, np.ndarray]:
        """``(symbols, codes)``: the present symbols in canonical order (by length, then symbol) and their
        codes, as integers whose low ``length`` bits are the code."""
        symbols = np.lexsort((np.arange(len(self.lengths)), self.lengths))
        symbols = symbols[self.lengths[symbols] > 0]
        codes = np.zeros(len(symbols), dtype=np.uint64)
        code, length = 0, int(self.lengths[symbols[0]]) if len(symbols) else 0
        for i, s in enumerate(symbols):
            code <<= int(self.lengths[s]) - length
            length = int(self.lengths[s])
            codes[i] = code
            code += 1
        return symbols, codes

    def encode(self, symbols: np.ndarray, chunk: int = 1 << 20) -> Bitstream:
        """The concatenated codes of ``symbols``; exactly ``lengths[symbols].sum()`` bits."""
        order, codes = self.codes()
        code_of = np.zeros(len(self.lengths), dtype=np.uint64)
        code_of[order] = codes
        lengths = self.lengths[symbols]
        bits = np.empty(int(lengths.sum()), dtype=np.uint8)
        written = 0
        for start in range(0, len(symbols), chunk):  # ~10 bits a symbol: bounded temporaries
            part = lengths[start : start + chunk]
            total = int(part.sum())
            owner = np.repeat(np.arange(len(part)), part)
            offset = np.arange(total) - np.repeat(np.cumsum(part) - part, part)  # bit within its code
            shift = (part[owner] - 1 - offset).astype(np.uint64)
            bits[written : written + total] = (code_of[symbols[start : start + chunk]][owner] >> shift) & 1
            written += total
        return Bitstream(np.packbits(bits).tobytes(), len(bits))

    def decode(self, stream: Bitstream) -> np.ndarray:
        """The symbols of ``stream``, read back from its bits alone.

        Vectorized: at every bit position the code that would start there is looked up at once (the longest
        code's width of bits, searched among the canonical codes' left-aligned values); the codes that do
        start are the chain 0 → 0 + its length → …, followed by pointer doubling in O(log n) NumPy steps.

        Raises:
            ValueError: when the bits do not end with a whole code.
        """
        n = stream.nbits
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        bits = np.unpackbits(np.frombuffer(stream.data, dtype=np.uint8), count=n).astype(np.uint64)
        width = int(self.lengths.max())
        padded = np.concatenate([bits, np.zeros(width, dtype=np.uint64)])
        window = np.zeros(n, dtype=np.uint64)
        for j in range(width):
            window = (window << np.uint64(1)) | padded[j : j + n]
        order, codes = self.codes()
        lengths = self.lengths[order]
        aligned = codes << (width - lengths).astype(np.uint64)
        hit = np.searchsorted(aligned, window, side="right") - 1
        step = np.append(np.minimum(np.arange(n) + lengths[hit], n), n)  # past the end: the sentinel n
        starts, jump = np.zeros(1, dtype=np.int64), step
        while True:  # starts holds the first 2^i codes' positions, jump the 2^i-th successor of each bit
            more = jump[starts]
            more = more[more < n]
            if not len(more):
                break
            starts = np.concatenate([starts, more])
            jump = jump[jump]
        if step[starts[-1]] != n:
            raise ValueError(f"the {n} bits do not end with a whole code")
        return order[hit[starts]]


@dataclass(frozen=True)
class EncodedLayer:
    """One layer after the three stages: all that is stored of its weight (Han et al. 2016 Fig. 1)."""

    shape: tuple[int, ...]
    codebook: torch.Tensor  # the shared weights, float32, ascending
    index_bits: int  # relative index width
    value_code: HuffmanCode  # over the codebook indices
    values: Bitstream  # each nonzero weight's codebook index, Huffman-coded, row-major
    position_code: HuffmanCode  # over the 2^index_bits relative indices
    positions: Bitstream  # the relative indices (:func:`relative_indices`), Huffman-coded


def encode_layer(weight: torch.Tensor, codebook: torch.Tensor, index_bits: int) -> EncodedLayer:
    """Huffman-codes a shared layer (Han et al. 2016 §4): the codebook index of each nonzero weight and the
    relative indices of the sparse structure, each stream with its own code."""
    flat = weight.detach().cpu().flatten().numpy()
    positions = np.flatnonzero(flat)
    indices = np.searchsorted(codebook.numpy(), flat[positions])  # each value is exactly one centroid
    relative = relative_indices(positions, index_bits)
    value_code = HuffmanCode.fit(indices, len(codebook))
    position_code = HuffmanCode.fit(relative, 2**index_bits)
    return EncodedLayer(
        tuple(weight.shape),
        codebook.clone(),
        index_bits,
        value_code,
        value_code.encode(indices),
        position_code,
        position_code.encode(relative),
    )


def decode_layer(layer: EncodedLayer) -> torch.Tensor:
    """The weight tensor an :class:`EncodedLayer` stores, from its bitstreams and codebook alone."""
    positions = positions_from_relative(layer.position_code.decode(layer.positions), layer.index_bits)
    indices = torch.from_numpy(layer.value_code.decode(layer.values))
    flat = torch.zeros(math.prod(layer.shape), dtype=torch.float32)
    flat[torch.from_numpy(positions)] = layer.codebook[indices]
    return flat.view(layer.shape)


# --- the three stages on a model ----------------------------------------------------------------------------


@dataclass
class LayerReport:
    """One layer's stored size after each stage, in bits.

    - dense: ``weights`` × 32;
    - pruned: the ``kept`` weights at 32 bits + ``kept + fillers`` relative indices at ``index_bits``;
    - quantized: the ``kept`` codebook indices at ``bits`` (⌈log2 clusters⌉ where the layer has fewer) + the
      same relative indices + the codebook at 32 bits a centroid;
    - huffman: the Huffman-coded codebook indices and relative indices (``value_code_bits``,
      ``position_code_bits``: the bits written) + the codebook + both code tables (``table_bits``).
    """

    name: str
    kind: str  # conv | fc
    shape: list[int]
    weights: int
    zeros: int  # after pruning: round(sparsity × weights)
    kept: int  # nonzero weights
    fillers: int  # filler entries of the relative indices
    clusters: int  # shared weights: 2^bits, or the distinct nonzero weights where fewer
    bits: int  # codebook index width of the quantized stage
    index_bits: int  # relative index width
    value_code_bits: int
    position_code_bits: int
    table_bits: int
    dense_bits: int = field(init=False)
    pruned_bits: int = field(init=False)
    quantized_bits: int = field(init=False)
    huffman_bits: int = field(init=False)

    def __post_init__(self) -> None:
        entries = self.kept + self.fillers
        codebook = self.clusters * FLOAT_BITS
        self.dense_bits = self.weights * FLOAT_BITS
        self.pruned_bits = self.kept * FLOAT_BITS + entries * self.index_bits
        self.quantized_bits = self.kept * self.bits + entries * self.index_bits + codebook
        self.huffman_bits = self.value_code_bits + self.position_code_bits + codebook + self.table_bits

    def stage_bits(self, stage: str) -> int:
        return getattr(self, f"{stage}_bits")


@dataclass
class Compression:
    """What :func:`deep_compression` did to a model."""

    model: str  # the model's class name
    params: int  # parameters, all of them
    layers: list[LayerReport]
    dense_values: int  # values stored at 32 bits in every stage: biases, norm parameters, float buffers
    encoded: dict[str, EncodedLayer]  # layer name → what is stored of its weight
    weights: dict[str, dict[str, torch.Tensor]]  # stage → layer name → its weight after that stage

    def bits(self, stage: str) -> int:
        """The model's stored size after ``stage``: its layers' plus the dense values'."""
        return sum(layer.stage_bits(stage) for layer in self.layers) + self.dense_values * FLOAT_BITS

    def sizes(self) -> dict[str, dict[str, float]]:
        """Per stage: ``bits``, ``bytes``, ``mb`` (10⁶ bytes, as the lecture), ``mib`` (2^20 bytes, the
        papers' "MB"), and ``ratio``: dense ÷ this stage."""
        dense = self.bits("dense")
        return {
            stage: {
                "bits": (bits := self.bits(stage)),
                "bytes": bits / 8,
                "mb": bits / 8 / MB,
                "mib": bits / 8 / MIB,
                "ratio": dense / bits,
            }
            for stage in STAGES
        }


def dense_values(model: nn.Module, skip: set[str] = frozenset()) -> int:
    """Values of the parameters and floating-point buffers of ``model``'s state dict, each once, but the
    tensors named in ``skip``: what inference reads. Integer buffers (BatchNorm's ``num_batches_tracked``,
    a training counter) are left out."""
    seen, total = set(), 0
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name in skip or not tensor.is_floating_point() or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel()
    return total


def deep_compression(model: nn.Module, settings: DeepCompression) -> Compression:
    """Prunes, shares and Huffman-codes every conv and linear weight of ``model`` (Han et al. 2016 §2–4), in
    place: afterwards the model holds the weights decoded from the Huffman-coded streams, which are checked to
    be the shared weights bit for bit.

    Args:
        model: any ``nn.Module``; its ``nn.Conv2d`` and ``nn.Linear`` weights are compressed.
        settings: sparsity and widths per layer.

    Returns:
        The per-layer sizes, the encoded layers and every stage's weights.
    """
    plans = settings.plan(model)
    weights: dict[str, dict[str, torch.Tensor]] = {stage: {} for stage in STAGES}
    encoded, layers = {}, []
    for plan in plans:
        module = model.get_submodule(plan.name)
        weights["dense"][plan.name] = module.weight.detach().cpu().clone()
        prune_layer(module, plan.sparsity)
        weights["pruned"][plan.name] = module.weight.detach().cpu().clone()
        codebook = share_layer(module, plan.bits)
        shared = module.weight.detach().cpu().clone()
        weights["quantized"][plan.name] = shared
        layer = encode_layer(shared, codebook, plan.index_bits)
        decoded = decode_layer(layer)
        if not torch.equal(decoded.view(torch.int32), shared.view(torch.int32)):
            raise RuntimeError(f"{plan.name}: the Huffman-coded weights do not decode to the shared weights")
        with torch.no_grad():
            module.weight.copy_(decoded)
        weights["huffman"][plan.name] = decoded
        encoded[plan.name] = layer
        positions = np.flatnonzero(shared.flatten().numpy())
        kept = len(positions)
        layers.append(
            LayerReport(
                name=plan.name,
                kind=plan.kind,
                shape=list(shared.shape),
                weights=shared.numel(),
                zeros=shared.numel() - kept,
                kept=kept,
                fillers=len(relative_indices(positions, plan.index_bits)) - kept,
                clusters=len(codebook),
                bits=max(1, (len(codebook) - 1).bit_length()) if len(codebook) else 0,
                index_bits=plan.index_bits,
                value_code_bits=layer.values.nbits,
                position_code_bits=layer.positions.nbits,
                table_bits=layer.value_code.table_bits + layer.position_code.table_bits,
            )
        )
    return Compression(
        model=type(model).__name__,
        params=sum(p.numel() for p in model.parameters()),
        layers=layers,
        dense_values=dense_values(model, skip={f"{p.name}.weight" for p in plans}),
        encoded=encoded,
        weights=weights,
    )


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copies one stage's weights (``Compression.weights[stage]``) into ``model``, on any device."""
    with torch.no_grad():
        for name, weight in weights.items():
            model.get_submodule(name).weight.copy_(weight)


def reference_size(name: str, channels: int, num_classes: int) -> dict[str, Any]:
    """The dense fp32 size of the ``conf/model/<name>.yaml`` model for ``channels`` × ``num_classes``, built
    on the meta device (no memory, no init).

    Args:
        name: a ``model`` option, e.g. ``alexnet`` (the lecture's, 62,378,344 parameters).
        channels: input channels.
        num_classes: classifier outputs.
    """
    cfg = compose_nested(f"model={name}", f"data.channels={channels}", f"data.num_classes={num_classes}")
    with torch.device("meta"):
        model = build_model(cfg, initialize=False)
    bits = dense_values(model) * FLOAT_BITS
    return {
        "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "bits": bits,
        "mb": bits / 8 / MB,
    }


# --- the tool -----------------------------------------------------------------------------------------------


def evaluate_stages(
    compression: Compression, trained: Trained, trainer_cfg: DictConfig, split: str
) -> dict[str, dict[str, float]]:
    """Accuracy of each stage's weights on ``split``, as ``cvarch-eval`` measures it (Lightning's test loop on
    the checkpoint's module); the module is left holding the decoded weights.

    Args:
        compression: what :func:`deep_compression` did to ``trained.module.model``.
        trained: :func:`cvarch.build.build_trained`'s result.
        trainer_cfg: the ``trainer`` group node.
        split: ``test``, ``val`` or ``train``.
    """
    module = trained.module
    module.eval_split = split
    trainer = instantiate(trainer_cfg, logger=False, enable_checkpointing=False)
    accuracy = {}
    for stage in STAGES:
        load_weights(module.model, compression.weights[stage])
        results = trainer.test(module, dataloaders=trained.datamodule.dataloader(split), verbose=False)[0]
        accuracy[stage] = {
            "acc": float(results[f"{split}/acc"]),
            "acc_top5": float(results[f"{split}/acc_top5"]),
        }
    return accuracy


def write_checkpoint(trained: Trained, settings: DeepCompression, path: Path, source: str) -> Path:
    """Writes the module with its decoded weights as a checkpoint of the same format as ``cvarch-train``'s,
    which ``cvarch-eval`` takes. The optimizer and scheduler states are left out: they belong to the dense
    weights, so the file does not resume training."""
    state = {k: v.detach().cpu() for k, v in trained.module.state_dict().items()}
    ckpt = {k: v for k, v in trained.ckpt.items() if k not in ("optimizer_states", "lr_schedulers")}
    atomic_save({**ckpt, "state_dict": state, "compression": {"source": source, **settings.to_dict()}}, path)
    return path


def run(cfg: DictConfig) -> dict[str, Any]:
    """Compresses the model of ``cfg.ckpt_path`` (or, without one, ``cfg.model`` initialized with
    ``cfg.seed``) with ``cfg.compress``; with a checkpoint, evaluates each stage on ``cfg.split`` and writes
    ``compressed.ckpt``; with ``cfg.reference``, sets the result beside that model's dense size. Writes
    ``compress.json`` to the run directory and prints the tables.

    Args:
        cfg: the ``compress`` root config (``@hydra.main``, or
            ``cvarch.compose(..., config_name="compress")``).

    Returns:
        What ``compress.json`` holds.
    """
    start = time.perf_counter()
    validate(cfg)
    if cfg.split not in SPLITS:
        raise ConfigError(f"split: one of {SPLITS}, got {cfg.split!r}")
    OmegaConf.resolve(cfg)  # fixes paths.output_dir before a reference model's config is composed
    settings = instantiate(cfg.compress)
    output_dir = Path(cfg.paths.output_dir)
    trained = None
    if cfg.ckpt_path:
        trained = build_trained(cfg.ckpt_path, trust=cfg.get("trust"))
        model, data = trained.module.model, trained.data_cfg
    else:
        torch.manual_seed(cfg.seed)  # the constructor's init, each model's paper's (no init group here)
        model, data = build_model(cfg, initialize=False), cfg.data
    compression = deep_compression(model, settings)
    sizes = compression.sizes()
    report: dict[str, Any] = {
        "model": compression.model,
        "params": compression.params,
        "ckpt_path": str(Path(cfg.ckpt_path).resolve()) if cfg.ckpt_path else None,
        "settings": settings.to_dict(),
        "stages": sizes,
        "dense_values": compression.dense_values,
        "layers": [asdict(layer) for layer in compression.layers],
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    if trained is not None:
        accuracy = evaluate_stages(compression, trained, cfg.trainer, cfg.split)
        for stage in STAGES:
            sizes[stage].update(accuracy[stage])
        report["split"] = cfg.split
        report["compressed_ckpt"] = str(
            write_checkpoint(trained, settings, output_dir / "compressed.ckpt", report["ckpt_path"])
        )
    if cfg.reference:
        reference = reference_size(cfg.reference, data.channels, data.num_classes)
        reference["ratio"] = reference["bits"] / sizes["huffman"]["bits"]
        reference["paper_ratio"] = PAPER_REDUCTION
        report["reference"] = reference
    report["wall_s"] = round(time.perf_counter() - start, 2)
    report["output_dir"] = str(output_dir)
    (output_dir / "compress.json").write_text(json.dumps(report, indent=2) + "\n")
    print_tables(report)
    return report


def print_tables(report: dict[str, Any], console: Console | None = None) -> None:
    """Prints the per-layer table, the per-stage table and the reference line."""
    console = console or Console(width=160)
    layers = Table(title=f"Deep Compression of {report['model']}, per layer (kB = 10³ bytes)")
    columns = ("type", "weights", "kept", "zeros", "clusters", "bits", "index bits", "fillers")
    columns += ("pruned kB", "quantized kB", "huffman kB", "bits/kept")
    layers.add_column("layer", no_wrap=True)
    for column in columns:
        layers.add_column(column, justify="left" if column == "type" else "right")
    for r in report["layers"]:
        layers.add_row(
            r["name"],
            r["kind"],
            f"{r['weights']:,}",
            f"{r['kept']:,}",
            f"{r['zeros'] / r['weights']:.1%}",
            f"{r['clusters']:,}",
            str(r["bits"]),
            str(r["index_bits"]),
            f"{r['fillers']:,}",
            *(f"{r[f'{stage}_bits'] / 8e3:,.1f}" for stage in STAGES[1:]),
            f"{r['huffman_bits'] / max(r['kept'], 1):.2f}",
        )
    console.print(layers)
    stages = Table(title="size after each stage (MB = 10⁶ bytes; MiB = 2²⁰ bytes, the papers' MB)")
    accuracy = "acc" in report["stages"]["dense"]
    columns = ("stage", "bytes", "MB", "MiB", "× smaller") + (("acc", "top-5") if accuracy else ())
    for column in columns:
        stages.add_column(column, justify="left" if column == "stage" else "right")
    for stage, s in report["stages"].items():
        row = [stage, f"{s['bytes']:,.0f}", f"{s['mb']:.3f}", f"{s['mib']:.3f}", f"{s['ratio']:.1f}"]
        if accuracy:
            row += [f"{100 * s['acc']:.2f}%", f"{100 * s['acc_top5']:.2f}%"]
        stages.add_row(*row)
    console.print(stages)
    console.print(
        f"{report['model']}: {report['params']:,} parameters; {report['dense_values']:,} values (biases, "
        "norms, buffers) stay at 32 bits in every stage"
    )
    if "reference" in report:
        ref = report["reference"]
        console.print(
            f"{ref['model']} dense fp32 {ref['mb']:.2f} MB ({ref['params']:,} parameters) / "
            f"{report['model']} after Deep Compression {report['stages']['huffman']['mb']:.3f} MB = "
            f"{ref['ratio']:.0f}× smaller "
            f"(Iandola et al. 2016 Table 2: 240MB / 0.47MB = {ref['paper_ratio']}×)"
        )


def cli(cfg: DictConfig) -> None:
    """``cvarch-compress [ckpt_path=…]``; prints the tables, then the run directory as the last line."""
    with plain_config_errors("cvarch-compress"):
        run(cfg)
    print(cfg.paths.output_dir)


if __name__ == "__main__":  # python -m cvarch.compress, as torchrun, srun and DDP re-launches start it
    from cvarch.cli import compress

    compress()
