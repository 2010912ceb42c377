"""Head tuning ("transfer learning"): the base is frozen, only the task head trains (and,
with ``head.trainable_layers = N``, the last N transformer blocks).

- causal LM (SFT, continued pretraining, preference): the head is the output projection.
  Tied embeddings (SmolLM2 and the tiny test model share ``lm_head.weight`` with
  ``embed_tokens.weight``) are untied first: the head gets its own copy, so training it
  leaves the input embeddings untouched. The final norm stays frozen.
- classification / regression: the head is the new sequence head (every parameter outside
  the base model, e.g. BERT's ``classifier``).
- masked-LM: the head's own layers and bias (BERT's ``cls.predictions.transform`` and ``bias``); its
  output projection is tied to the input embeddings and stays frozen with them.

Blocks are found by shape, whatever the architecture (``common.blocks``).
Saved: ``head.safetensors`` with only the trained tensors (state_dict names) and
``head.json`` listing them; loading applies them to a freshly loaded (untied) base.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from steps.config import TrainConfig
from steps.core.contract import CAUSAL, Task
from steps.core.errors import ArtifactError, ConfigError
from steps.train.methods.common import blocks, head_names, load_base

WEIGHTS_FILE = "head.safetensors"
INFO_FILE = "head.json"


def untie_head(model: Any) -> None:
    """Give the output head its own weight, so training it cannot move the input embeddings."""
    import torch

    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    # Without this, a later tie_weights() would share the two matrices again.
    model.config.tie_word_embeddings = False


def head_modules(model: Any, task: Task = CAUSAL) -> list[Any]:
    if task.causal_lm:
        return [model.get_output_embeddings()]
    return [getattr(model, name) for name in head_names(model)]


def prepare(cfg: TrainConfig, base_dir: Path, device: str, task: Task = CAUSAL) -> Any:
    model = load_base(cfg, base_dir, device, task)
    layers = blocks(model)
    n = cfg.head.trainable_layers
    if n > len(layers):
        raise ConfigError(f"train.head.trainable_layers is {n}, but the base model has only {len(layers)} layers")
    if task.causal_lm:
        untie_head(model)
    model.requires_grad_(False)
    for module in head_modules(model, task):
        module.requires_grad_(True)
    if task.kind == "mlm":  # the output projection is the (frozen) input embeddings
        model.get_output_embeddings().weight.requires_grad_(False)
    if n > 0:
        layers[-n:].requires_grad_(True)
    return model


def save(cfg: TrainConfig, model: Any, folder: Path) -> None:
    from safetensors.torch import save_file

    trained = {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}
    save_file(trained, str(folder / WEIGHTS_FILE))
    info = {"trainable_layers": cfg.head.trainable_layers, "tensors": sorted(trained)}
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2))


def load(cfg: TrainConfig, base_dir: Path, folder: Path, device: str, task: Task = CAUSAL) -> Any:
    from safetensors.torch import load_file

    model = load_base(None, base_dir, device, task)
    if task.causal_lm:
        untie_head(model)
    trained = load_file(str(folder / WEIGHTS_FILE), device=device)
    # strict=False: the file holds only the trained tensors, so most keys are "missing";
    # a saved key the model does not have means a different base and must not pass silently.
    unused = model.load_state_dict(trained, strict=False).unexpected_keys
    if unused:
        raise ArtifactError(f"{folder / WEIGHTS_FILE} has tensors the base model lacks: {sorted(unused)[:5]} "
                            f"({len(unused)} in all); was it trained on a different base?")
    return model
