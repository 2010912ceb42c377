"""Loading a base model the same way for every method, for every task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from steps.config import TrainConfig
from steps.core.contract import CAUSAL, Task
from steps.core.device import dtype_for
from steps.core.errors import ConfigError

# Dropout settings by architecture: Llama-style configs and BERT-style configs.
DROPOUT_KEYS = ("attention_dropout", "attention_probs_dropout_prob", "hidden_dropout_prob")
# The shipped models' default LoRA targets (all attention projections); other architectures get
# peft's defaults for their type, else every linear layer of the backbone.
ATTENTION_TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
                     "bert": ["query", "key", "value", "attention.output.dense"]}


def load_base(cfg: TrainConfig | None, base_dir: Path, device: str, task: Task = CAUSAL, **kwargs: Any) -> Any:
    """The base model on ``device`` with the task's head; ``cfg.dropout`` overrides its dropout."""
    from transformers import AutoConfig

    overrides: dict[str, Any] = {}
    # The config is read where it decides something: dropout keys, and the head width for flex_attention (CUDA).
    needs_config = cfg is not None and (cfg.dropout is not None or device == "cuda")
    config = AutoConfig.from_pretrained(base_dir) if needs_config else None
    if cfg is not None and cfg.dropout is not None:
        overrides = {key: cfg.dropout for key in DROPOUT_KEYS if hasattr(config, key)}
    kwargs.setdefault("dtype", dtype_for(device, cfg.precision if cfg is not None else "auto"))
    if cfg is not None and (attention := attention_for(cfg, device, config)) is not None:
        kwargs.setdefault("attn_implementation", attention)
    auto, head = task_head(task)
    if task.kind in ("reward", "mlm"):  # a new head, or an encoder checkpoint without its masked-LM head
        model, info = auto.from_pretrained(base_dir, trust_remote_code=False, output_loading_info=True, **overrides,
                                           **head, **kwargs)
        seed_new_head(model, info["missing_keys"])
    else:
        model = auto.from_pretrained(base_dir, trust_remote_code=False, **overrides, **head, **kwargs)
    if task.sequence_head and model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id  # decoder classifiers find the last token by padding
    return model if "quantization_config" in kwargs else model.to(device)


def seed_new_head(model: Any, missing: Any, seed: int = 0) -> None:
    """Initialise the linear layers the checkpoint lacked (a new reward head; the masked-LM head a sentence-embedding
    checkpoint such as all-MiniLM-L6-v2 was saved without) from their own seeded generator: N(0,
    initializer_range) weights, zero biases. The untrained head is then the same whatever the global RNG
    (train.seed), so the base model's evaluation scores exactly the head that training starts from."""
    import torch

    modules = dict(model.named_modules())
    generator = torch.Generator().manual_seed(seed)
    std = getattr(model.config, "initializer_range", 0.02)
    with torch.no_grad():
        for name in sorted(missing):
            owner, _, leaf = name.rpartition(".")
            module = modules.get(owner)
            if not isinstance(module, torch.nn.Linear) or leaf not in ("weight", "bias"):
                continue
            value = getattr(module, leaf)
            if leaf == "bias":
                value.zero_()
            else:
                value.copy_(torch.randn(value.shape, generator=generator) * std)


def task_head(task: Task) -> tuple[Any, dict[str, Any]]:
    """The Auto class for ``task`` and the config overrides of its head (labels of a sequence head)."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
    )

    if task.kind == "mlm":
        return AutoModelForMaskedLM, {}
    if task.kind == "seq2seq":
        return AutoModelForSeq2SeqLM, {}
    if not task.sequence_head:
        return AutoModelForCausalLM, {}
    labels = task.labels if task.kind == "classification" else ["reward"] if task.kind == "reward" else ["value"]
    return AutoModelForSequenceClassification, dict(
        num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
        problem_type="single_label_classification" if task.kind == "classification" else "regression")


def language_model(net: Any) -> Any:
    """The language model (causal or masked) inside a training wrapper (peft), sharing its modules."""
    return net.get_base_model() if hasattr(net, "get_base_model") else net


def meta_model(base_dir: Path, task: Task) -> Any:
    """The task model of ``base_dir`` built from its config on the meta device: its architecture and
    parameter shapes, no weights read or allocated."""
    import torch
    from transformers import AutoConfig

    auto, head = task_head(task)
    with torch.device("meta"):
        return auto.from_config(AutoConfig.from_pretrained(base_dir, **head), trust_remote_code=False)


FLEX_MIN_HEAD_DIM = 16  # torch's flex_attention kernels refuse query/key/value heads narrower than this


def head_dim(config: Any) -> int | None:
    """The width of one attention head (``head_dim``, else hidden size / heads), None where the config has neither."""
    width = getattr(config, "head_dim", None)
    if width is None and getattr(config, "num_attention_heads", None) and getattr(config, "hidden_size", None):
        width = config.hidden_size // config.num_attention_heads
    return width


def attention_for(cfg: TrainConfig, device: str, config: Any = None) -> str | None:
    """``train.attention``; 'auto' = flex_attention (block-sparse per-document mask) when packing on CUDA and the
    model's heads are wide enough for its kernels (``config``, where given), else None: the architecture's default
    (sdpa where it supports it, e.g. eager for Gemma 2), which builds the per-document mask densely."""
    narrow = device == "cuda" and config is not None and (head_dim(config) or FLEX_MIN_HEAD_DIM) < FLEX_MIN_HEAD_DIM
    if cfg.attention != "auto":
        if cfg.attention == "flex_attention" and narrow:
            raise ConfigError(f"train.attention 'flex_attention' needs attention heads of at least {FLEX_MIN_HEAD_DIM} "
                              f"values; this model's are {head_dim(config)}: use attention 'sdpa' or 'auto'")
        return cfg.attention
    return "flex_attention" if cfg.packing and device == "cuda" and not narrow else None


def attention_targets(cfg: TrainConfig, model: Any) -> list[str]:
    """``train.lora.target_modules``; else the attention projections of the shipped architectures
    (Llama, BERT), peft's defaults for the model type, or every linear layer of the backbone (the
    output and task heads excluded), in that order."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    if cfg.lora.target_modules is not None:
        return list(cfg.lora.target_modules)
    kind = model.config.model_type
    if kind in ATTENTION_TARGETS:
        return ATTENTION_TARGETS[kind]
    if kind in PEFT_DEFAULTS:
        return list(PEFT_DEFAULTS[kind])
    return backbone_linear_names(model)


def backbone_linear_names(model: Any) -> list[str]:
    """The distinct names of the linear layers inside the backbone (``model.base_model``): peft's
    ``all-linear`` without the heads. GPT-2 style ``Conv1D`` layers count as linear."""
    import torch
    from transformers.pytorch_utils import Conv1D

    from steps.core.errors import ConfigError

    names = sorted({name.rsplit(".", 1)[-1] for name, module in model.base_model.named_modules()
                    if isinstance(module, (torch.nn.Linear, Conv1D)) and name})
    if not names:
        raise ConfigError(f"no linear layers found in {type(model).__name__}; set train.lora.target_modules")
    return names


def blocks(model: Any) -> Any:
    """The transformer blocks of any architecture, in order: the ``ModuleList`` of identical blocks
    holding the most parameters inside the backbone (``layers`` of Llama, Qwen, Gemma, ModernBERT;
    ``h`` of GPT-2; ``encoder.layer`` of BERT, RoBERTa, DeBERTa)."""
    import torch

    from steps.core.errors import ConfigError

    best, size = None, 0
    for _, module in model.base_model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and \
                len({type(m) for m in module}) == 1:
            params = sum(p.numel() for p in module.parameters())
            if params > size:
                best, size = module, params
    if best is None:
        raise ConfigError(f"cannot find the transformer blocks of {type(model).__name__}")
    return best


def head_names(model: Any) -> list[str]:
    """The modules of a task model outside its backbone (e.g. ``classifier``, ``score``, ``pooler``,
    ModernBERT's ``head``): what a new sequence head consists of."""
    return [name for name, module in model.named_children()
            if name != model.base_model_prefix and any(True for _ in module.parameters())]


def masked_lm_head_names(model: Any) -> list[str]:
    """The layers of a masked-LM head that hold their own weights: every leaf module with parameters outside the
    backbone except the output projection, which is (tied to) the input embeddings (BERT's
    ``cls.predictions.transform.dense`` and ``.LayerNorm``, RoBERTa's ``lm_head.dense`` and ``lm_head.layer_norm``)."""
    output = model.get_output_embeddings()
    return [f"{head}.{name}" for head in head_names(model) for name, module in getattr(model, head).named_modules()
            if name and module is not output and not list(module.children())
            and any(True for _ in module.parameters(recurse=False))]


def sequence_head_names(base_dir: Path, task: Task) -> list[str]:
    """``head_names`` of the task model of ``base_dir``, found on the meta device (no weights loaded)."""
    return head_names(meta_model(base_dir, task))


def save_adapter(model: Any, folder: Path) -> None:
    """A peft adapter as ``adapter_model.safetensors`` + ``adapter_config.json`` only.

    peft also writes a template README.md naming the local base folder; the registered
    model version carries its own model card, so that template is dropped.
    """
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "README.md").unlink(missing_ok=True)
