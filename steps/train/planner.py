"""Memory planner: what training will need, estimated before any weight is loaded, from the model's
config (its architecture built on the meta device), the method, dtype, sequence length and micro-batch.

    plan = plan_memory(cfg, base_dir, task, device, seq_len=512)   # fits the device, or ConfigError with numbers
    plan["micro_batch"], plan["grad_accum_steps"], plan["estimate"]["total_gib"]

Parts: weights (4-bit for QLoRA's quantized linears), gradients and optimizer state of the trainable
parameters, activations per token and layer (10h + 5i values stored for backward, plus each LoRA
adapter's dropped-out input, and the attention scores and probabilities where the architecture runs
eager attention, e.g. Gemma 2; with gradient checkpointing only each layer's input plus one layer's
worth), the logits with their fp32 copy, log-softmax and gradient, and on the CPU the mapped pages of
the weights file while it loads.
``batch_size: auto`` takes the largest power-of-two micro-batch (up to ``auto_global_batch``) whose
estimate fits in 85% of the device, and accumulates to keep the global batch. The estimate goes into
``train_report.json`` next to the measured peak (``measured_peak``: CUDA max allocated, or on the CPU the
growth of resident memory from before loading to the peak of the loop).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from steps.config import TrainConfig
from steps.core.contract import Task
from steps.core.device import dtype_for, release_free_memory
from steps.core.errors import ConfigError

GIB = 2**30
FIT_SHARE = 0.85  # of the device's memory an estimate may take


def plan_memory(cfg: TrainConfig, base_dir: Path, task: Task, device: str, seq_len: int) -> dict[str, Any]:
    """The micro-batch and accumulation to train with, and the estimate for them; raises ``ConfigError``
    with the numbers when even one sequence per micro-batch cannot fit."""
    shape = model_shape(cfg, base_dir, task)
    capacity = device_memory(device)
    if cfg.batch_size != "auto":
        estimate = estimate_memory(cfg, shape, device, seq_len, cfg.batch_size)
        if estimate["total"] > capacity:
            raise ConfigError(f"train: the estimated memory ({describe(estimate)}) exceeds the {device}'s "
                              f"{capacity / GIB:.1f} GiB; lower train.batch_size, turn on "
                              "train.gradient_checkpointing, or use lora/qlora")
        return {"micro_batch": cfg.batch_size, "grad_accum_steps": cfg.grad_accum_steps, "auto": False,
                "device_gib": round(capacity / GIB, 2), "estimate": in_gib(estimate)}
    wanted = cfg.auto_global_batch
    micro = 2 ** int(math.log2(wanted))
    while micro >= 1:
        estimate = estimate_memory(cfg, shape, device, seq_len, micro)
        if estimate["total"] <= FIT_SHARE * capacity:
            return {"micro_batch": micro, "grad_accum_steps": math.ceil(wanted / micro), "auto": True,
                    "device_gib": round(capacity / GIB, 2), "estimate": in_gib(estimate)}
        micro //= 2
    raise ConfigError(f"train.batch_size auto: one sequence of {seq_len} tokens needs about {describe(estimate)}, "
                      f"more than {FIT_SHARE:.0%} of the {device}'s {capacity / GIB:.1f} GiB; turn on "
                      "train.gradient_checkpointing, lower tokenize.max_seq_len, or use lora/qlora")


def model_shape(cfg: TrainConfig, base_dir: Path, task: Task) -> dict[str, Any]:
    """Parameter counts of the model as the method will train it, from its architecture on the meta device."""
    import torch

    from steps.train.methods.common import attention_targets, blocks, head_names, meta_model

    model = meta_model(base_dir, task)
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    layers = blocks(model)
    linear = sum(m.weight.numel() for m in model.base_model.modules()
                 if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")
    head = sum(p.numel() for name in head_names(model) for p in getattr(model, name).parameters())
    lora_inputs = 0  # input features of the adapted layers, summed (lora: their dropout outputs are stored)
    if cfg.method == "full":
        trainable = total
    elif cfg.method in ("lora", "qlora"):
        targets = set(attention_targets(cfg, model))
        trainable = head if task.sequence_head else 0
        for name, m in model.base_model.named_modules():
            if any(name == t or name.endswith("." + t) for t in targets) and hasattr(m, "weight"):  # as peft matches
                rows, cols = m.weight.shape[:2]
                trainable += cfg.lora.r * (rows + cols)
                lora_inputs += m.weight.shape[0 if type(m).__name__ == "Conv1D" else 1]
    elif cfg.method == "head":
        n = cfg.head.trainable_layers
        out = model.get_output_embeddings() if task.causal_lm else None  # untied and trained alone
        trainable = (out.weight.numel() if out is not None else head) + sum(
            p.numel() for block in list(layers)[len(layers) - n:] for p in block.parameters()) * (n > 0)
    else:  # reft
        trainable = len(cfg.reft.layers) * (2 * cfg.reft.rank * config.hidden_size + cfg.reft.rank)
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) \
        or 4 * config.hidden_size
    return {"parameters": total, "linear_parameters": linear, "trainable": trainable, "layers": len(layers),
            "hidden": config.hidden_size, "intermediate": intermediate, "vocab": config.vocab_size,
            "lora_inputs": lora_inputs // max(len(layers), 1), "heads": config.num_attention_heads,
            "eager_attention": getattr(config, "_attn_implementation", None) == "eager",
            "sequence_head": task.sequence_head, "causal_lm": task.causal_lm}


def estimate_memory(cfg: TrainConfig, shape: dict[str, Any], device: str, seq_len: int, micro: int
                    ) -> dict[str, float]:
    """Bytes per part for ``micro`` sequences of ``seq_len`` tokens (docstring of the module)."""
    width = dtype_for(device, cfg.precision).itemsize  # auto: bf16 on CUDA, fp32 on the CPU
    params, trainable = shape["parameters"], shape["trainable"]
    if cfg.method == "qlora":
        weights = shape["linear_parameters"] * 0.5 + (params - shape["linear_parameters"]) * 4
    else:
        weights = params * width
    if cfg.method == "head" and shape["causal_lm"]:
        weights += shape["vocab"] * shape["hidden"] * width  # the untied copy of the output head
    grad_width = width if cfg.method in ("full", "head") else 4  # adapters and interventions stay fp32
    gradients = trainable * grad_width
    states = {"adamw": 2 * grad_width, "adamw_8bit": 2, "sgd": grad_width}.get(cfg.optimizer, 2 * grad_width)
    if cfg.optimizer == "adamw" and cfg.master_weights and grad_width == 2:  # fp32 master copy and moments
        states = 12
    optimizer = trainable * states
    tokens = cfg.tokens_per_batch if cfg.packing and cfg.tokens_per_batch else micro * seq_len
    per_layer = (10 * shape["hidden"] + 5 * shape["intermediate"]) * width
    if cfg.method in ("lora", "qlora") and cfg.lora.dropout > 0:  # each adapter keeps its dropped-out input
        per_layer += shape["lora_inputs"] * (width + 1)
    if shape.get("eager_attention") and cfg.attention in ("auto", "eager"):  # scores and probabilities kept
        per_layer += 2 * shape["heads"] * (seq_len if not cfg.packing else tokens) * width
    if cfg.gradient_checkpointing:
        activations = tokens * (shape["layers"] * shape["hidden"] * width + per_layer)
    else:
        activations = tokens * shape["layers"] * per_layer
    outputs = 2 if shape["sequence_head"] else shape["vocab"]
    chunk = min(cfg.loss_chunk_tokens or tokens, tokens)
    logits = tokens * outputs * width + chunk * outputs * 4 * 3  # logits; fp32 copy, log-softmax and gradient
    parts = {"weights": weights, "gradients": gradients, "optimizer": optimizer, "activations": activations,
             "logits": logits}
    if device != "cuda":  # loading reads the safetensors file through mapped pages, counted as resident
        parts["loading"] = weights if cfg.method != "qlora" else params * 4
    return {**parts, "total": sum(parts.values())}


def device_memory(device: str) -> float:
    """Bytes of memory the device has: the GPU's total, or the machine's available memory."""
    if device == "cuda":
        import torch

        return float(torch.cuda.mem_get_info()[1])
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
        return float(info.get("MemAvailable", info["MemTotal"]))
    except (OSError, KeyError, ValueError):
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def in_gib(estimate: dict[str, float]) -> dict[str, float]:
    return {f"{name}_gib": round(value / GIB, 4) for name, value in estimate.items()}


def describe(estimate: dict[str, float]) -> str:
    parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in estimate.items() if k != "total")
    return f"{estimate['total'] / GIB:.2f} GiB: {parts}"


def import_method_libraries(method: str) -> None:
    """Import what the method's code imports on first use (peft, bitsandbytes), so that a ``PeakMeter``
    started afterwards measures training memory, not module code."""
    import importlib

    for name in {"lora": ["peft"], "qlora": ["peft", "bitsandbytes"]}.get(method, []):
        importlib.import_module(name)


class PeakMeter:
    """The memory training itself takes: CUDA max allocated, or on Linux CPUs the growth of resident memory
    from ``start()`` (before the model loads) to its peak (the kernel's high-water mark, reset at start)."""

    def __init__(self, device: str):
        self.device, self.base = device, 0

    def start(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
            return
        release_free_memory()  # free heap kept by tune_allocator is resident: it must not hide new growth
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets VmHWM to the current resident size
            self.base = self._status("VmRSS")
        except OSError:
            self.base = -1

    def peak_gib(self) -> float | None:
        if self.device == "cuda":
            import torch

            return round(torch.cuda.max_memory_allocated() / GIB, 4)
        if self.base < 0:
            return None
        return round((self._status("VmHWM") - self.base) / GIB, 4)

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(field)
