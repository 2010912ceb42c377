"""Loading a base model the same way for every method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from steps.config import TrainConfig


def dtype_for(device: str) -> Any:
    import torch

    return torch.bfloat16 if device == "cuda" else torch.float32


def load_base(cfg: TrainConfig | None, base_dir: Path, device: str, **kwargs: Any) -> Any:
    """The base causal LM on ``device``; ``cfg.dropout`` overrides the attention dropout."""
    from transformers import AutoModelForCausalLM

    overrides = {"attention_dropout": cfg.dropout} if cfg is not None and cfg.dropout is not None else {}
    kwargs.setdefault("dtype", dtype_for(device))
    model = AutoModelForCausalLM.from_pretrained(base_dir, trust_remote_code=False, **overrides, **kwargs)
    return model if "quantization_config" in kwargs else model.to(device)


def save_adapter(model: Any, folder: Path) -> None:
    """A peft adapter as ``adapter_model.safetensors`` + ``adapter_config.json`` only.

    peft also writes a template README.md naming the local base folder; the registered
    model version carries its own model card, so that template is dropped.
    """
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "README.md").unlink(missing_ok=True)
