"""Device placement: whether the in-memory splits fit on the accelerator, and moving them there together."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from cvarch.data.splits import FileSplit, Split


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors on ``device``: the GPU's free memory, or the host's ``MemAvailable``."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def place(
    splits: Mapping[str, Split | FileSplit], device: torch.device, on_device: bool | str
) -> dict[str, Split] | None:
    """The in-memory splits copied to ``device``, all together; ``None`` when ``on_device`` is ``"auto"`` and
    their bytes exceed half of the device's free memory. Streamed splits stay on disk.

    Args:
        splits: the data module's splits.
        device: the accelerator.
        on_device: ``True`` or ``"auto"`` (``data.on_device``).
    """
    in_memory = {name: split for name, split in splits.items() if isinstance(split, Split)}
    size = sum(split.images.nbytes + split.targets.nbytes for split in in_memory.values())
    if on_device == "auto" and size > available_memory(device) // 2:
        return None
    return {name: Split(s.images.to(device), s.targets.to(device)) for name, s in in_memory.items()}
