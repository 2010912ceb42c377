"""Loading a base model the same way for every method, for every task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from steps.config import TrainConfig
from steps.core.contract import CAUSAL, Task
from steps.core.device import dtype_for

# Dropout settings by architecture: Llama-style configs and BERT-style configs.
DROPOUT_KEYS = ("attention_dropout", "attention_probs_dropout_prob", "hidden_dropout_prob")
# Attention projections per architecture: the default LoRA targets.
ATTENTION_TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
                     "bert": ["query", "key", "value", "attention.output.dense"]}


def load_base(cfg: TrainConfig | None, base_dir: Path, device: str, task: Task = CAUSAL, **kwargs: Any) -> Any:
    """The base model on ``device`` with the task's head; ``cfg.dropout`` overrides its dropout."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    overrides: dict[str, Any] = {}
    if cfg is not None and cfg.dropout is not None:
        config = AutoConfig.from_pretrained(base_dir)
        overrides = {key: cfg.dropout for key in DROPOUT_KEYS if hasattr(config, key)}
    kwargs.setdefault("dtype", dtype_for(device))
    if cfg is not None:
        kwargs.setdefault("attn_implementation", attention_for(cfg, device))
    if task.sequence_head:
        labels = task.labels if task.kind == "classification" else ["value"]
        overrides |= dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                          label2id={label: i for i, label in enumerate(labels)},
                          problem_type="single_label_classification" if task.kind == "classification" else "regression")
        auto = AutoModelForSequenceClassification
    else:
        auto = AutoModelForCausalLM
    model = auto.from_pretrained(base_dir, trust_remote_code=False, **overrides, **kwargs)
    if task.sequence_head and model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id  # decoder classifiers find the last token by padding
    return model if "quantization_config" in kwargs else model.to(device)


def attention_for(cfg: TrainConfig, device: str) -> str:
    """``train.attention``; 'auto' = flex_attention (block-sparse per-document mask) when packing on CUDA, else sdpa."""
    if cfg.attention != "auto":
        return cfg.attention
    return "flex_attention" if cfg.packing and device == "cuda" else "sdpa"


def attention_targets(cfg: TrainConfig, model: Any) -> list[str]:
    """``train.lora.target_modules``, or the attention projections of the model's architecture."""
    from steps.core.errors import ConfigError

    if cfg.lora.target_modules is not None:
        return list(cfg.lora.target_modules)
    kind = model.config.model_type
    if kind not in ATTENTION_TARGETS:
        raise ConfigError(f"no default LoRA targets for {kind!r} models; set train.lora.target_modules")
    return ATTENTION_TARGETS[kind]


def save_adapter(model: Any, folder: Path) -> None:
    """A peft adapter as ``adapter_model.safetensors`` + ``adapter_config.json`` only.

    peft also writes a template README.md naming the local base folder; the registered
    model version carries its own model card, so that template is dropped.
    """
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "README.md").unlink(missing_ok=True)
