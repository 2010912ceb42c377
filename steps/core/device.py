"""Where a step computes: the device ``auto`` stands for, the dtype of weights there, and the peak
memory a step used (reported by train and evaluate)."""

from __future__ import annotations

import resource
from typing import Any


def pick_device(choice: str) -> str:
    """``auto``: CUDA when present, else the CPU; any other choice as it is."""
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def dtype_for(device: str) -> Any:
    """Weights in bf16 on CUDA, fp32 on the CPU."""
    import torch

    return torch.bfloat16 if device == "cuda" else torch.float32


def peak_memory_gib(device: str) -> float:
    """Peak memory so far: CUDA max allocated, or the process's max RSS on CPU."""
    import torch

    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return round(peak / 2**30, 3)
