"""steps/core/device.py: the device ``auto`` stands for, weight dtypes and peak memory."""

from __future__ import annotations

import torch

from steps.core.device import dtype_for, peak_memory_gib, pick_device


def test_auto_is_cuda_only_where_there_is_one():
    assert pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == "cpu" and pick_device("cuda") == "cuda"


def test_weights_are_bf16_on_cuda_and_fp32_on_the_cpu():
    assert dtype_for("cuda") == torch.bfloat16 and dtype_for("cpu") == torch.float32


def test_peak_memory_on_the_cpu_is_the_process_rss():
    held = torch.ones(64 * 2**20 // 4)  # 64 MiB
    assert peak_memory_gib("cpu") >= 64 / 1024
    del held
