"""LoRA through peft: low-rank adapters on the chosen linear layers, base frozen.

rsLoRA (scale alpha/sqrt(r)) and DoRA (magnitude + direction) are peft switches.
Saved: ``adapter_model.safetensors`` + ``adapter_config.json``; with ``merge_weights``
also ``merged/`` full weights (adapter folded into the base). On classification and
regression models peft's ``SEQ_CLS`` task type trains and saves the new head in full
(``modules_to_save``) next to the adapter; an encoder-decoder (T5, BART) gets ``SEQ_2_SEQ_LM``;
on a masked-LM model the head's own layers do (its output
projection stays tied to the frozen input embeddings). ``target_modules`` left out: the attention
projections of the shipped architectures, peft's defaults for others, else every linear layer of
the backbone (``common.attention_targets``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from steps.config import TrainConfig
from steps.core.contract import CAUSAL, Task
from steps.train.methods.common import attention_targets, head_names, load_base, masked_lm_head_names, save_adapter


def lora_config(cfg: TrainConfig, model: Any, task: Task = CAUSAL) -> Any:
    from peft import LoraConfig

    s = cfg.lora
    # A new sequence head trains in full: every module outside the backbone (not only peft's
    # classifier/score: DeBERTa's pooler and ModernBERT's head are new too). A masked-LM head trains its own
    # layers (an encoder checkpoint may come without them: seeded, common.seed_new_head); peft has no masked-LM
    # task type, so its model is peft's generic one.
    saved = head_names(model) if task.sequence_head else masked_lm_head_names(model) if task.kind == "mlm" else None
    kind = {"mlm": None, "seq2seq": "SEQ_2_SEQ_LM"}.get(task.kind, "SEQ_CLS" if task.sequence_head else "CAUSAL_LM")
    return LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=attention_targets(cfg, model),
                      use_rslora=s.use_rslora, use_dora=s.use_dora, modules_to_save=saved, task_type=kind)


def prepare(cfg: TrainConfig, base_dir: Path, device: str, task: Task = CAUSAL) -> Any:
    from peft import get_peft_model

    model = load_base(cfg, base_dir, device, task)
    return get_peft_model(model, lora_config(cfg, model, task))


def save(cfg: TrainConfig, model: Any, folder: Path) -> None:
    save_adapter(model, folder)
    if cfg.merge_weights:
        merged = model.merge_and_unload(safe_merge=True)
        merged.save_pretrained(folder / "merged", safe_serialization=True)


def load(cfg: TrainConfig, base_dir: Path, folder: Path, device: str, task: Task = CAUSAL) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(None, base_dir, device, task), folder).to(device)
