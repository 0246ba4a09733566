"""What a model costs, counted from the model itself: the lecture's table of it, layer by layer
(:func:`profile_model`), and the multiply-accumulates of one forward pass (:func:`count_macs`).

The library under ``cvarch-profile`` (the table), ``cvarch-compare`` (Canziani 2017's columns) and
``cvarch-train`` (its ``params`` and ``gmacs`` metrics); it imports torch and nothing of Lightning, Hydra or
plotting.

:func:`profile_model` counts as the lecture's VGG16 table does (Stanford CS231n 2017, lecture 9, "VGGNet"
slide; Simonyan & Zisserman 2014 Table 1): one row per layer that computes something, with its output shape,
activations (output elements per image), parameters with and without biases, MACs and receptive field:

- Rows: the input, then in execution order every leaf module that has parameters, is a convolution, linear
  layer or norm (the lecture's AlexNet lists NORM1 and NORM2), or changes the tensor's shape. A pool is a row
  unless it is an identity (torchvision's ``AdaptiveAvgPool2d(7)`` on VGG's 7×7 map). Activations, dropout,
  identities and ``nn.Flatten`` (a view) are no rows, and their outputs are not counted, as in the lecture.
- MACs: one counter, ``torch.utils.flop_counter.FlopCounterMode``, run over the whole forward; a row's MACs
  are the FLOPs counted during its call / 2. That is ``out_numel · (in_channels / groups) · kh · kw`` for a
  convolution, ``out_numel · in_features`` for a linear layer, 0 for pools, norms and activations; biases
  are not counted. ``flops_counter`` is the whole forward's count: it differs from 2 · the rows' MACs only
  by work outside any leaf module (a matmul in a ``forward``), none in the zoo.
- Receptive field (Araujo et al. 2019, Distill, eq. 1–2): every tensor carries ``(rf, jump)`` on the input
  pixel grid. A convolution or pool of effective kernel ``k = dilation · (kernel − 1) + 1`` and stride ``s``
  gives ``rf + (k − 1) · jump`` and ``jump · s`` (width; the nets are square). An adaptive pool from side
  ``n`` to ``m`` acts as kernel ``⌈n/m⌉``, stride ``⌊n/m⌋``. A linear layer on a flattened ``n×n`` map sees
  all of it: ``rf + (n − 1) · jump``. Any other operation (concatenation, residual addition, flatten) gives
  its output the largest ``rf`` and ``jump`` of its tensor inputs.
- The forward runs in eval mode on the meta device (:func:`cvarch.models.meta_forward`): VGG16 costs no
  memory and no FLOP; auxiliary classifiers (GoogLeNet §5) run only in training, so they have no rows, but
  their parameters are in the total.
- Training-step memory estimate, after the lecture's "~96MB / image (only forward! ~*2 for bwd)": twice the
  forward activations with the input, in the run dtype, times the batch, plus weights, gradients and SGD
  momentum, 3 · parameters · 4 bytes (fp32).
- Measured: the peak memory allocated during one forward+backward of ``batch_size`` images in train mode
  (no optimizer step) above what was allocated before it. CUDA: ``torch.cuda.max_memory_allocated``; CPU:
  the running sum of the allocation events the torch profiler records with ``profile_memory=True``.

MB is 10⁶ bytes, as in the lecture's "24M · 4 bytes ≈ 96MB".
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves  # no public pytree module in torch 2.x
from torch.utils.flop_counter import FlopCounterMode

from cvarch.models import meta_forward

MB = 1e6  # decimal megabytes, as the lecture's "24M * 4 bytes ~= 96MB"
FP32_BYTES = 4

_CONV_POOL = (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)
_ADAPTIVE = (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
_VIEWS = (nn.Flatten, nn.Unflatten)


@dataclass
class Row:
    """One layer of the profile; counts are per image.

    Args:
        name: module path (``features.0``), or ``input``.
        type: module class name.
        shape: output shape without the batch dimension, (C, H, W) for feature maps.
        activations: output elements per image.
        bytes_fp32: activation bytes at 4 bytes each.
        bytes_dtype: activation bytes in the run dtype.
        params: parameters including biases.
        params_no_bias: parameters without biases (the lecture's "params (not counting biases)").
        macs: multiply-accumulates per image (FlopCounterMode's FLOPs of the layer's call / 2).
        rf: receptive field side on the input, in pixels.
        jump: distance on the input between neighbouring outputs (the product of the strides).
        depth: convolutions and linear layers on the longest path from the input to this output, this one
            included (Szegedy et al. 2014 §5: "22 layers deep when counting only layers with parameters").
    """

    name: str
    type: str
    shape: tuple[int, ...]
    activations: int
    bytes_fp32: int
    bytes_dtype: int
    params: int
    params_no_bias: int
    macs: int
    rf: int
    jump: int
    depth: int


@dataclass
class Totals:
    """Whole-model figures (see the module docstring for the rules).

    Args:
        input_shape: (C, H, W) of the profiled input.
        output_shape: the model output without the batch dimension.
        depth: convolutions and linear layers on the longest path from the input to the output, as the papers
            name their nets: AlexNet 8, VGG16 16, GoogLeNet 22, ResNet-152 152, DenseNet-121 121.
        params: every parameter of the model, auxiliary heads included.
        params_no_bias: the same without biases.
        activations: sum of the rows' activations per image, input excluded.
        activations_with_input: the same with the input, as the lecture's table sums it.
        activations_mb: ``activations`` at 4 bytes, in MB.
        activations_with_input_mb: ``activations_with_input`` at 4 bytes, in MB.
        macs: sum of the rows' MACs per image.
        flops: 2 · ``macs``.
        flops_counter: FlopCounterMode's FLOPs for the same forward of one image.
        flops_diff: ``flops_counter − flops``: FLOPs outside any row; 0 for every net of the zoo.
        train_memory_estimate_mb: the lecture's rule for one training step of ``batch_size`` images.
        measured_peak_mb: measured peak of one forward+backward, or ``None`` when not measured.
        measured_with: what measured it.
    """

    input_shape: tuple[int, int, int]
    output_shape: tuple[int, ...]
    depth: int
    params: int
    params_no_bias: int
    activations: int
    activations_with_input: int
    activations_mb: float
    activations_with_input_mb: float
    macs: int
    flops: int
    flops_counter: int
    flops_diff: int
    train_memory_estimate_mb: float
    measured_peak_mb: float | None = None
    measured_with: str | None = None


@dataclass
class Profile:
    """The rows and totals of one model at one input shape; ``to_dict()`` is what ``profile.json`` holds."""

    model: str
    batch_size: int
    dtype: str
    rows: list[Row] = field(default_factory=list)
    totals: Totals | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def row(self, name: str) -> Row:
        """The row of the module at path ``name`` (the first call, if the module runs more than once)."""
        return next(r for r in self.rows if r.name == name)


@dataclass(frozen=True)
class _Field:
    rf: int
    jump: int
    side: int  # side of the map the tensor holds, or of the map it was flattened from
    depth: int = 0  # convolutions and linear layers on the longest path from the input


class _FieldTracker(TorchFunctionMode):
    """Gives every tensor made during the forward the largest ``(rf, jump)`` of its tensor inputs; the layer
    hooks then overwrite it for convolutions, pools and linear layers."""

    def __init__(self) -> None:
        super().__init__()
        # keyed by id(); the tensor is kept so its id is not reused (meta tensors: no memory)
        self.fields: dict[int, tuple[torch.Tensor, _Field]] = {}

    def get(self, t: torch.Tensor) -> _Field | None:
        entry = self.fields.get(id(t))
        return entry[1] if entry else None

    def set(self, t: torch.Tensor, f: _Field) -> None:
        self.fields[id(t)] = (t, f)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [
            f for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and (f := self.get(t))
        ]
        if inputs:
            rf, jump, side, depth = (
                max(getattr(f, k) for f in inputs) for k in ("rf", "jump", "side", "depth")
            )
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and id(t) not in self.fields:  # in-place ops keep their field
                    self.set(t, _Field(rf, jump, t.shape[-1] if t.ndim == 4 else side, depth))
        return out


def _pair_last(v: int | tuple[int, ...]) -> int:
    return v[-1] if isinstance(v, tuple) else v


def _kernel_stride(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[int, int] | None:
    """Effective kernel and stride along the width, for layers that slide a window; ``None`` for others."""
    if isinstance(module, _CONV_POOL):
        dilation = _pair_last(getattr(module, "dilation", 1))
        kernel = dilation * (_pair_last(module.kernel_size) - 1) + 1
        return kernel, _pair_last(module.stride or module.kernel_size)
    if isinstance(module, _ADAPTIVE):
        n, m = x.shape[-1], y.shape[-1]
        return math.ceil(n / m), max(n // m, 1)
    return None


def _is_row(module: nn.Module, x: torch.Tensor, y: torch.Tensor, window: tuple[int, int] | None) -> bool:
    if isinstance(module, _VIEWS):
        return False
    if any(True for _ in module.parameters()) or isinstance(module, (nn.Linear, *_NORMS)):
        return True
    if window is not None:
        return window != (1, 1)
    return x.shape != y.shape


def count_flops(model: nn.Module, shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass of an input of ``shape``, as ``torch.utils.flop_counter.FlopCounterMode``
    counts them: two per multiply-add of convolutions, linear layers and matmuls, none for norms and
    activations.

    The forward runs in eval mode on the meta device (:func:`cvarch.models.meta_forward`): the count needs
    only the shapes, so a 224×224 VGG16 costs no memory and no FLOP, and norm statistics are left alone.

    Args:
        model: any ``nn.Module`` that accepts the input.
        shape: the input's shape, batch dimension included.
    """
    with FlopCounterMode(display=False) as counter:
        meta_forward(model, shape)
    return counter.get_total_flops()


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass of ``x``: PyTorch's FLOP count / 2 (conv, linear, matmul).

    Canziani 2017 Fig. 2 counts one operation per multiply-add and leaves norms and activations out. Only
    ``x``'s shape is used: the forward runs on the meta device, in eval mode (:func:`count_flops`).

    Args:
        model: any ``nn.Module`` that accepts ``x``.
        x: an input batch.
    """
    return count_flops(model, tuple(x.shape)) // 2


def profile_model(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    batch_size: int = 1,
    dtype: torch.dtype = torch.float32,
    measure_memory: bool = False,
) -> Profile:
    """Profiles ``model`` on (C, H, W) inputs: one :class:`Row` per layer and the :class:`Totals`.

    Counting rules are in the module docstring (CS231n 2017 lecture 9, VGGNet slide).

    Args:
        model: any ``nn.Module`` taking (N, C, H, W); on the meta device too, unless ``measure_memory``.
        input_shape: (C, H, W) of one image.
        batch_size: images in the measured step and the memory estimate.
        dtype: run dtype of the ``bytes_dtype`` column and of the activations in the estimate.
        measure_memory: run one forward+backward on the model's device and measure its peak memory.
    """
    tracker = _FieldTracker()
    counter = FlopCounterMode(display=False)
    names = {m: n for n, m in model.named_modules()}
    rows = [_row("input", "Input", tuple(input_shape), 0, 0, 0, 1, 1, 0, dtype)]
    flops_before: dict[nn.Module, int] = {}

    def pre_hook(module: nn.Module, args: tuple) -> None:
        flops_before[module] = counter.get_total_flops()

    def hook(module: nn.Module, args: tuple, y: Any) -> None:
        flops = counter.get_total_flops() - flops_before.pop(module)
        if not (args and isinstance(args[0], torch.Tensor) and isinstance(y, torch.Tensor)):
            return
        x = args[0]
        f = tracker.get(x) or _Field(1, 1, x.shape[-1])
        window = _kernel_stride(module, x, y)
        depth = f.depth + isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))
        if window is not None:
            kernel, stride = window
            out = _Field(f.rf + (kernel - 1) * f.jump, f.jump * stride, y.shape[-1], depth)
        elif isinstance(module, nn.Linear) and x.ndim == 2:  # a flattened side×side map: all of it
            out = _Field(f.rf + (f.side - 1) * f.jump, f.jump * f.side, 1, depth)
        else:
            out = _Field(f.rf, f.jump, y.shape[-1] if y.ndim == 4 else f.side, depth)
        tracker.set(y, out)
        if not _is_row(module, x, y, window):
            return
        params = dict(module.named_parameters())
        rows.append(
            _row(
                names[module],
                type(module).__name__,
                tuple(y.shape[1:]),
                sum(p.numel() for p in params.values()),
                sum(p.numel() for n, p in params.items() if not n.endswith("bias")),
                flops // 2,
                out.rf,
                out.jump,
                out.depth,
                dtype,
            )
        )

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_pre_hook(pre_hook) for m in leaves]
    handles += [m.register_forward_hook(hook) for m in leaves]
    x = torch.empty((1, *input_shape), device="meta")
    tracker.set(x, _Field(1, 1, input_shape[-1]))
    try:
        with counter, tracker:
            y = meta_forward(model, x)
    finally:
        for h in handles:
            h.remove()
    flops_counter = counter.get_total_flops()

    all_params = dict(model.named_parameters())
    n_params = sum(p.numel() for p in all_params.values())
    activations = sum(r.activations for r in rows[1:])
    with_input = activations + rows[0].activations
    macs = sum(r.macs for r in rows)
    estimate = 2 * with_input * dtype.itemsize * batch_size + 3 * n_params * FP32_BYTES
    totals = Totals(
        input_shape=tuple(input_shape),
        output_shape=tuple(y.shape[1:]),
        depth=max(f.depth for t in tree_leaves(y) if isinstance(t, torch.Tensor) and (f := tracker.get(t))),
        params=n_params,
        params_no_bias=sum(p.numel() for n, p in all_params.items() if not n.endswith("bias")),
        activations=activations,
        activations_with_input=with_input,
        activations_mb=activations * FP32_BYTES / MB,
        activations_with_input_mb=with_input * FP32_BYTES / MB,
        macs=macs,
        flops=2 * macs,
        flops_counter=flops_counter,
        flops_diff=flops_counter - 2 * macs,
        train_memory_estimate_mb=estimate / MB,
    )
    if measure_memory:
        peak, totals.measured_with = measure_step_memory(model, input_shape, batch_size)
        totals.measured_peak_mb = peak / MB
    return Profile(type(model).__name__, batch_size, str(dtype).removeprefix("torch."), rows, totals)


def _row(
    name: str,
    type_: str,
    shape: tuple[int, ...],
    params: int,
    params_no_bias: int,
    macs: int,
    rf: int,
    jump: int,
    depth: int,
    dtype: torch.dtype,
) -> Row:
    n = math.prod(shape)
    return Row(
        name,
        type_,
        shape,
        n,
        n * FP32_BYTES,
        n * dtype.itemsize,
        params,
        params_no_bias,
        macs,
        rf,
        jump,
        depth,
    )


def write_profile(prof: Profile, output_dir: str | Path, output: str) -> Path | None:
    """Writes ``profile.json`` (rows and totals) or ``profile.csv`` (the rows) for ``output`` json or csv.

    Returns:
        The file written, or ``None`` for ``output=table``.
    """
    if output not in ("table", "json", "csv"):
        raise ValueError(f"output={output!r} is not one of ['table', 'json', 'csv']")
    if output == "table":
        return None
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"profile.{output}"
    if output == "json":
        path.write_text(json.dumps(prof.to_dict(), indent=2) + "\n")
    else:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[f.name for f in dataclasses.fields(Row)])
            writer.writeheader()
            for row in prof.rows:
                writer.writerow({**dataclasses.asdict(row), "shape": "x".join(map(str, row.shape))})
    return path


def measure_step_memory(
    model: nn.Module, input_shape: tuple[int, int, int], batch_size: int
) -> tuple[int, str]:
    """Peak bytes allocated by one forward+backward (train mode, no optimizer step) above what was allocated
    before it; gradients are cleared afterwards.

    Args:
        model: a model with real (not meta) parameters.
        input_shape: (C, H, W) of one image.
        batch_size: images in the step.

    Returns:
        The peak in bytes and a description of what measured it.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    x = torch.randn((batch_size, *input_shape), device=device, dtype=dtype)
    was_training = model.training
    model.train()

    def step() -> None:
        out = model(x)
        sum(o.float().sum() for o in (out if isinstance(out, tuple) else (out,))).backward()

    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - before
            how = f"torch.cuda.max_memory_allocated on {torch.cuda.get_device_name(device)}"
        else:
            with torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
            ) as p:
                step()
            peak = _profiler_peak(p)
            how = "torch.profiler allocation events (profile_memory=True), CPU"
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return peak, how


def _profiler_peak(prof: torch.profiler.profile) -> int:
    """Peak of the running sum of the allocations (positive) and frees (negative) the profiler recorded."""
    # the public EventList folds allocations into the ops that made them; the event tree keeps each one,
    # timed. No public API gives them (export_memory_timeline needs stacks and shapes and writes a
    # file): this private one is tested on torch 2.4-2.14 (pyproject's range is >=2.4,<3);
    # tests/test_cost.py fails if it moves.
    allocations = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == torch._C._profiler._EventType.Allocation:
            allocations.append(event)
        stack.extend(event.children)
    running = peak = 0
    for event in sorted(allocations, key=lambda e: e.start_time_ns):
        running += event.extra_fields.alloc_size
        peak = max(peak, running)
    return peak
