"""QLoRA: LoRA adapters (settings in ``train.lora``) on a frozen base quantized to 4 bits
by bitsandbytes (``train.quant``: nf4 or fp4, optional double quantization, compute dtype).

Only the adapters train. peft's ``prepare_model_for_kbit_training`` upcasts the small
unquantized tensors (norms, embeddings) to float32 for stable training and, with
``train.gradient_checkpointing``, turns on activation checkpointing.
Saved: the peft adapter (``adapter_model.safetensors`` + ``adapter_config.json``);
loading quantizes the same base again (deterministic) and applies the adapter.
Limits: runs on CUDA and, slowly, on CPU (bitsandbytes 0.50 CPU kernels; float16
compute is not supported there); no merged full weights (merging into 4-bit weights
would round the adapter away).

One CPU path of bitsandbytes is switched off (``same_path_on_every_cpu``): on a CPU with
AVX512-BF16, ``Linear4bit.forward`` in eval mode under ``no_grad`` repacks its weight in place
for a bf16 kernel. That repacking needs in_features to be a multiple of the quantization
block (64) and out_features of 32 (a 32-wide layer fails with ``shape '[32, 0]' is invalid
for input of size 16``), computes in bf16 (other numbers than every other CPU), and stays
after ``train()``, where the kernel has no backward. Without it every CPU runs the same
dequantize-and-matmul path, so results do not depend on the machine's instruction set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from steps.config import TrainConfig
from steps.core.contract import CAUSAL, Task
from steps.core.errors import ConfigError
from steps.train.methods.common import load_base, save_adapter, sequence_head_names
from steps.train.methods.lora import lora_config


def quantization_config(cfg: TrainConfig, base_dir: Path, device: str, task: Task = CAUSAL) -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    q = cfg.quant
    name = q.compute_dtype if q.compute_dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    if device == "cpu" and name == "float16":
        raise ConfigError("train.quant.compute_dtype float16 is not supported on CPU; use float32 or auto")
    # A new sequence head (every module outside the backbone) is created after loading: it must stay
    # plain (trainable) linear layers. The output head of a causal LM is kept by transformers itself.
    skip = sequence_head_names(base_dir, task) if task.sequence_head else None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                              bnb_4bit_use_double_quant=q.double_quant, bnb_4bit_compute_dtype=getattr(torch, name),
                              llm_int8_skip_modules=skip)


def load_quantized_base(cfg: TrainConfig, base_dir: Path, device: str, task: Task = CAUSAL) -> Any:
    # device_map places the weights while they are quantized (a 4-bit model is not moved
    # afterwards); without it bitsandbytes picks CUDA whenever present, even for device "cpu".
    model = load_base(cfg, base_dir, device, task, quantization_config=quantization_config(cfg, base_dir, device, task),
                      device_map=device)
    same_path_on_every_cpu(model)
    return model


def same_path_on_every_cpu(model: Any) -> None:
    """Keep bitsandbytes' 4-bit layers off their AVX512-BF16-only inference repacking (module docstring)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def prepare(cfg: TrainConfig, base_dir: Path, device: str, task: Task = CAUSAL) -> Any:
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = load_quantized_base(cfg, base_dir, device, task)
    # use_reentrant=False checkpointing needs no requires-grad hook on the input embeddings.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    return get_peft_model(model, lora_config(cfg, model, task))


def save(cfg: TrainConfig, model: Any, folder: Path) -> None:
    save_adapter(model, folder)


def load(cfg: TrainConfig, base_dir: Path, folder: Path, device: str, task: Task = CAUSAL) -> Any:
    from peft import PeftModel, prepare_model_for_kbit_training

    model = load_quantized_base(cfg, base_dir, device, task)
    # The same float32 upcast as in training, so inference computes what was trained.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return PeftModel.from_pretrained(model, folder)

