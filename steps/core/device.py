"""Where a step computes: the device ``auto`` stands for, the dtype of weights there, the C allocator's
settings for tensor work, and the peak memory a step used (reported by train and evaluate)."""

from __future__ import annotations

import functools
import resource
import sys
from typing import Any

# glibc malloc, as train and evaluate set it (mallopt parameters; bench/allocator.py measures the effect).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
ALLOCATOR = {_M_MMAP_THRESHOLD: 64 * 2**20, _M_TRIM_THRESHOLD: 512 * 2**20, _M_TOP_PAD: 128 * 2**20}


def pick_device(choice: str) -> str:
    """``auto``: CUDA when present, else the CPU; any other choice as it is."""
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


@functools.cache
def _glibc() -> Any:
    """The process's C library when it is glibc (mallopt, malloc_trim), else None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") else None


@functools.cache
def tune_allocator() -> bool:
    """Keep freed tensor memory for reuse instead of returning it to the kernel after every step.

    glibc serves a block of 32 MiB or more (the logits of one small batch over a 50k vocabulary) with a
    fresh ``mmap`` and unmaps it on free, so every forward pass faults in and zeroes its activations
    again: on a small CPU run half the CPU time is the kernel's. Blocks up to 64 MiB come from the heap
    instead, and the heap keeps up to 512 MiB of free space (grown 128 MiB ahead). Once per process;
    False where the C library is not glibc (nothing changes there)."""
    libc = _glibc()
    return libc is not None and all(libc.mallopt(param, value) == 1 for param, value in ALLOCATOR.items())


def release_free_memory() -> bool:
    """Hand the free heap memory the tuned allocator keeps back to the kernel (``malloc_trim``), so that
    resident memory counts only what is in use: the CPU peak meter's baseline. False where not glibc."""
    libc = _glibc()
    return libc is not None and libc.malloc_trim(0) in (0, 1)


def dtype_for(device: str, precision: str = "auto") -> Any:
    """Weights in bf16 on CUDA, fp32 on the CPU (``auto``); ``bf16`` or ``fp32`` anywhere (train.precision)."""
    import torch

    if precision == "auto":
        precision = "bf16" if device == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


def peak_memory_gib(device: str) -> float:
    """Peak memory so far: CUDA max allocated, or the process's max RSS on CPU."""
    import torch

    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return round(peak / 2**30, 3)
