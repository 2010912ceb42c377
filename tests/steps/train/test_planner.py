"""steps/train/planner.py: the memory estimate is built from the architecture alone, grows as it should
with batch, method and checkpointing, picks a micro-batch that fits, and fails early with numbers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from steps.config import TrainConfig
from steps.core.contract import Task
from steps.core.errors import ConfigError
from steps.train import planner

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
CHAT = Task(kind="sft")


@pytest.fixture
def qwen_dir(tmp_path):
    import zoo

    return zoo.build("qwen2", tmp_path / "qwen2", zoo.corpus())


def test_the_shape_comes_from_the_architecture_without_weights(qwen_dir):
    from transformers import AutoModelForCausalLM

    shape = planner.model_shape(TrainConfig(method="full"), qwen_dir, CHAT)
    model = AutoModelForCausalLM.from_pretrained(qwen_dir)
    assert shape["parameters"] == sum(p.numel() for p in model.parameters())
    assert shape["trainable"] == shape["parameters"] and shape["layers"] == 2
    lora = planner.model_shape(TrainConfig(method="lora"), qwen_dir, CHAT)
    from peft import get_peft_model

    from steps.train.methods.lora import lora_config

    peft_model = get_peft_model(model, lora_config(TrainConfig(method="lora"), model))
    assert lora["trainable"] == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_estimates_grow_with_batch_and_shrink_with_checkpointing_and_adapters(qwen_dir):
    full = TrainConfig(method="full")
    shape = planner.model_shape(full, qwen_dir, CHAT)
    one, eight = (planner.estimate_memory(full, shape, "cpu", 128, b) for b in (1, 8))
    assert eight["activations"] == 8 * one["activations"] and eight["weights"] == one["weights"]
    checkpointed = planner.estimate_memory(full.model_copy(update={"gradient_checkpointing": True}), shape, "cpu",
                                           128, 8)
    assert checkpointed["activations"] < eight["activations"]
    lora = TrainConfig(method="lora")
    lora_estimate = planner.estimate_memory(lora, planner.model_shape(lora, qwen_dir, CHAT), "cpu", 128, 8)
    assert lora_estimate["optimizer"] < eight["optimizer"] / 10


def test_auto_batch_fits_the_device_and_keeps_the_global_batch(qwen_dir, monkeypatch):
    cfg = TrainConfig(method="full", batch_size="auto", auto_global_batch=16)
    shape = planner.model_shape(cfg, qwen_dir, CHAT)
    per_sequence = planner.estimate_memory(cfg, shape, "cpu", 64, 2)["total"] - \
        planner.estimate_memory(cfg, shape, "cpu", 64, 1)["total"]
    room = planner.estimate_memory(cfg, shape, "cpu", 64, 4)["total"] + per_sequence / 2
    monkeypatch.setattr(planner, "device_memory", lambda device: room / planner.FIT_SHARE)
    plan = planner.plan_memory(cfg, qwen_dir, CHAT, "cpu", seq_len=64)
    assert (plan["micro_batch"], plan["grad_accum_steps"], plan["auto"]) == (4, 4, True)
    monkeypatch.setattr(planner, "device_memory", lambda device: 1024.0)
    with pytest.raises(ConfigError, match=r"one sequence of 64 tokens needs about .* GiB: weights"):
        planner.plan_memory(cfg, qwen_dir, CHAT, "cpu", seq_len=64)
    with pytest.raises(ConfigError, match="exceeds the cpu's"):
        planner.plan_memory(TrainConfig(method="full", batch_size=4), qwen_dir, CHAT, "cpu", seq_len=64)


def test_the_peak_meter_sees_what_the_process_allocates():
    import numpy as np

    from steps.core.device import tune_allocator

    tune_allocator()  # as train leaves a process: 120 MiB freed below stays resident for reuse
    first, second = np.ones(60 * 2**20 // 8), np.ones(60 * 2**20 // 8)
    del first, second
    meter = planner.PeakMeter("cpu")
    meter.start()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    peak = meter.peak_gib()
    del block
    assert peak is not None and peak >= 0.05
