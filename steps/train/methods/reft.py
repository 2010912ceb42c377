"""LoReFT (Wu et al. 2024, "ReFT: Representation Finetuning", arXiv:2404.03592): the base
stays frozen; small low-rank interventions edit hidden states at a few prompt positions.

    tuneline run --params deployments/params/reft.yaml [--set 'train.reft.layers=[4,-1]' ...]

What trains: one intervention per layer in ``reft.layers`` (negative counts from the last
layer), applied to that decoder layer's output hidden state ``h``:

    h <- h + R^T (W h + b - R h)

R (rank x hidden) has orthonormal rows (a Householder parametrization of a rank x hidden
tensor, robust to weight decay); W, b is a linear map to rank.
That is 2 * rank * hidden + rank parameters per layer, kept in float32 whatever the base's
dtype. ``reft.dropout`` drops elements of the edit ``R^T (...)``, not of ``h``.

Where: in each row, the first ``first_positions`` and the last ``last_positions`` tokens of
the prompt (both sets together; they overlap on short prompts). The prompt is
- with labels (training, perplexity): the real tokens before the first label != -100;
- without labels (generation): all real tokens.
Padding never counts, left or right. In ``generate()`` only the prefill forward is edited;
cached decoding steps (generated tokens) are not, they see the edit through the KV cache.

Saved: ``reft.safetensors`` (the intervention tensors, exactly as trained) and
``reft.json`` (settings and resolved layer indices); ``load`` needs only these and the base.

Limits:
- decoder-only models (the decoder layers are found by shape, ``common.blocks``);
- rows are left- or right-padded (real tokens contiguous); no sequence packing;
- a training row whose labels start at its first token has no prompt and gets no edit;
- ``generate()`` continuing from a given ``past_key_values`` is not edited;
- the edit depends on positions, so it cannot be merged into the weights (no ``merge_weights``);
- at initialisation W is random (as in the paper's code), so an untrained model already
  differs from the base.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils.parametrize import register_parametrization

from steps.config import ReftSettings, TrainConfig
from steps.core.contract import CAUSAL, IGNORE, Task
from steps.core.errors import ConfigError
from steps.train.methods.common import blocks, load_base

WEIGHTS_FILE = "reft.safetensors"
CONFIG_FILE = "reft.json"


def intervention_mask(attention_mask: torch.Tensor, labels: torch.Tensor | None, first: int, last: int) -> torch.Tensor:
    """(batch, seq) bool: the first ``first`` and last ``last`` prompt tokens of each row.

    The prompt is a row's real tokens (attention_mask 1) before its first label != -100, or
    all its real tokens without labels. Real tokens must be contiguous (left or right padding).
    """
    real = attention_mask.bool()
    pos = torch.arange(real.shape[1], device=real.device).expand_as(real)
    start = real.int().argmax(dim=1, keepdim=True)  # first real token; > 0 under left padding
    end = start + real.sum(dim=1, keepdim=True)
    if labels is not None:
        answer = (labels != IGNORE) & real
        end = torch.where(answer.any(dim=1, keepdim=True), answer.int().argmax(dim=1, keepdim=True), end)
    prompt = (pos >= start) & (pos < end)
    return prompt & ((pos < start + first) | (pos >= end - last))


class OrthonormalRows(nn.Module):
    """Parametrization: a (rank, hidden) matrix -> one with orthonormal rows, a product of
    Householder reflections read from the strictly lower triangle of its transpose.

    torch's ``parametrizations.orthogonal`` (householder) reads signs from the diagonal with
    ``.int()``: once weight decay pulls a diagonal entry off +-1 that row becomes zero and
    training stops. Here the diagonal is not read at all.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reflectors = x.mT.tril(diagonal=-1)
        tau = 2.0 / (1.0 + (reflectors * reflectors).sum(dim=0))
        return torch.linalg.householder_product(reflectors, tau).mT


class LoreftIntervention(nn.Module):
    """h + R^T (W h + b - R h), R with orthonormal rows."""

    def __init__(self, hidden: int, rank: int, dropout: float):
        super().__init__()
        self.rotate = nn.Linear(hidden, rank, bias=False)
        register_parametrization(self.rotate, "weight", OrthonormalRows())
        self.source = nn.Linear(hidden, rank)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        r = self.rotate.weight
        return h + self.dropout((self.source(h) - h @ r.T) @ r)


class ReftModel(nn.Module):
    """A frozen causal LM with LoReFT interventions hooked onto decoder-layer outputs.

    A pre-hook on the base computes the edited positions of every forward (so ``generate``,
    which calls the base directly, is covered too); the layer hooks read them.
    """

    reads_labels = True  # the interventions are placed by the labels (forward_inputs keeps them)

    def __init__(self, base: Any, settings: ReftSettings):
        super().__init__()
        layers = blocks(base)
        self.base = base.requires_grad_(False)
        self.settings = settings
        self.layer_indices = resolve_layers(settings.layers, len(layers))
        hidden = base.config.hidden_size
        self.interventions = nn.ModuleList(LoreftIntervention(hidden, settings.rank, settings.dropout)
                                           for _ in self.layer_indices)
        self._positions: tuple[torch.Tensor, torch.Tensor] | None = None
        base.register_forward_pre_hook(self._place, with_kwargs=True)
        for intervention, i in zip(self.interventions, self.layer_indices):
            layers[i].register_forward_hook(self._edit_hook(intervention))

    @property
    def config(self) -> Any:
        return self.base.config

    @property
    def generation_config(self) -> Any:
        return self.base.generation_config

    @property
    def device(self) -> torch.device:
        return self.base.device

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        return self.base(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base.generate(*args, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.base.activation_checkpointing_enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def _place(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        past = kwargs.get("past_key_values")
        if past is not None and past.get_seq_length() > 0:  # a cached decoding step: generated tokens
            self._positions = None
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        shape = ids.shape if ids is not None else kwargs["inputs_embeds"].shape[:2]
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(shape, dtype=torch.long, device=self.device)
        elif mask.dim() != 2:
            raise ValueError(f"reft places its edits by a 2-D (batch, seq) attention_mask, got {tuple(mask.shape)}")
        # nonzero syncs with the device once per forward; the layer hooks then touch only these positions
        self._positions = intervention_mask(mask, kwargs.get("labels"), self.settings.first_positions,
                                            self.settings.last_positions).nonzero(as_tuple=True)

    def _edit_hook(self, intervention: LoreftIntervention) -> Any:
        def edit(module: nn.Module, args: tuple, output: Any) -> Any:
            if self._positions is None:
                return output
            hidden = output[0] if isinstance(output, tuple) else output
            picked = hidden[self._positions]
            edited = intervention(picked.to(torch.float32)).to(hidden.dtype)
            hidden = hidden.index_put(self._positions, edited)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return edit


def resolve_layers(layers: list[int], count: int) -> list[int]:
    """Layer indices counted from the start; a bad or repeated index is a ConfigError."""
    resolved = []
    for i in layers:
        if not -count <= i < count:
            raise ConfigError(f"train.reft.layers: layer {i} does not exist; the base model has {count} layers "
                              f"(0..{count - 1}, or -{count}..-1 from the end)")
        if i % count in resolved:
            raise ConfigError(f"train.reft.layers: layer {i} is listed twice (as {i % count})")
        resolved.append(i % count)
    return resolved


def prepare(cfg: TrainConfig, base_dir: Path, device: str, task: Task = CAUSAL) -> ReftModel:
    if task.kind != "sft":
        raise ConfigError(f"train.method 'reft' trains chat SFT only, not {task.kind}")
    return ReftModel(load_base(cfg, base_dir, device), cfg.reft).to(device)


def save(cfg: TrainConfig, model: ReftModel, folder: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.interventions.state_dict().items()},
              folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps({
        "reft": model.settings.model_dump(mode="json"),
        "layer_indices": model.layer_indices,
        "hidden_size": model.config.hidden_size,
    }, indent=2))


def load(cfg: TrainConfig, base_dir: Path, folder: Path, device: str, task: Task = CAUSAL) -> ReftModel:
    """The base plus the saved interventions; ``reft.json`` says where they go."""
    from safetensors.torch import load_file

    meta = json.loads((folder / CONFIG_FILE).read_text())
    model = ReftModel(load_base(None, base_dir, device), ReftSettings.model_validate(meta["reft"]))
    model.interventions.load_state_dict(load_file(folder / WEIGHTS_FILE))
    return model.to(device)
