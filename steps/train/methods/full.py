"""Full fine-tuning: every weight of the base model trains.

Saved: the whole model (``model.safetensors`` + ``config.json`` + ``generation_config.json``),
loadable by itself. Limits: optimizer state is twice the model size (AdamW), so this is
for small models; with bf16 weights (CUDA, or train.precision bf16) AdamW updates an fp32
master copy (train.master_weights, ``steps/train/master.py``): 12 bytes of optimizer state
per weight, and no tiny update rounds away over a long run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from steps.config import TrainConfig
from steps.core.contract import CAUSAL, Task
from steps.train.methods.common import load_base


def prepare(cfg: TrainConfig, base_dir: Path, device: str, task: Task = CAUSAL) -> Any:
    return load_base(cfg, base_dir, device, task).requires_grad_(True)


def save(cfg: TrainConfig, model: Any, folder: Path) -> None:
    # transformers 5 always writes safetensors (tied embeddings stored once).
    model.save_pretrained(folder)


def load(cfg: TrainConfig, base_dir: Path, folder: Path, device: str, task: Task = CAUSAL) -> Any:
    # The folder holds the complete model (with its head and label names): the base is not needed.
    return load_base(None, folder, device, task)
