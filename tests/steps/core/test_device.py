"""steps/core/device.py: the device ``auto`` stands for, weight dtypes, the allocator and peak memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
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


FAULTS = """
import json, resource, sys, torch
from steps.core.device import tune_allocator
tuned = tune_allocator() if sys.argv[1] == "tuned" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
# 40 MiB, as the logits of a small batch over a 50k vocabulary. Warm-up: torch's 64-byte aligned
# request is a little larger than the chunk the last one freed, so the heap grows for the first few
# (1 to 8 seen) until freed neighbours merge; from then on the same blocks serve every step.
for _ in range(10):
    torch.ones(10 * 2**20).sum()
before = faults()
for _ in range(20):
    torch.ones(10 * 2**20).sum()
print(json.dumps({"tuned": tuned, "faults": faults() - before}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_allocator_reuses_freed_tensor_memory_instead_of_faulting_it_in_again():
    def run(mode: str) -> dict:
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parents[3], env={**os.environ, "OMP_NUM_THREADS": "1"})
        return json.loads(out.stdout.strip().splitlines()[-1])

    plain, tuned = run("plain"), run("tuned")
    assert tuned["tuned"] is True
    # Untuned, each 40 MiB block is a fresh mmap: ~10k page faults per allocation.
    assert plain["faults"] > 20 * 5000, plain
    assert tuned["faults"] < plain["faults"] / 4, (plain, tuned)  # measured here: 205k vs 0-10k
