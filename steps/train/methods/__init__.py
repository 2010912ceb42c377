"""Fine-tuning methods. Each module makes exactly the intended parameters trainable,
saves only what it trained (safetensors, never pickles) and loads it back for inference:

    model = prepare(cfg, base_dir, device, task)  # base loaded with the task's head, requires_grad set
    save(cfg, model, folder, task)                # trained weights + method.json
    model = load(base_dir, folder, device)        # eval-mode model for evaluate and serving

``task`` (``common.Task``) says which head the base gets: the causal LM head (SFT,
continued pretraining, preference tuning), a new sequence head (classification, regression)
or an encoder's masked-LM head (mlm).

| method | module   | trains |
|--------|----------|--------|
| full   | full.py  | every weight |
| head   | head.py  | the output head (and the last N transformer layers); base frozen |
| lora   | lora.py  | low-rank adapters (peft), optionally rsLoRA / DoRA |
| qlora  | qlora.py | LoRA on a 4-bit (bitsandbytes nf4/fp4) frozen base |
| reft   | reft.py  | LoReFT interventions on hidden states; base frozen (chat SFT only) |

On classification and regression models the new sequence head always trains (lora and
qlora save it next to the adapter; head trains it with the last N encoder layers).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any, get_args

from steps.config import TrainConfig
from steps.core.contract import CAUSAL, Task

METHOD_FILE = "method.json"


METHODS = get_args(TrainConfig.model_fields["method"].annotation)


def module_for(method: str) -> ModuleType:
    """``steps/train/methods/<method>.py``, imported on first use (reft and qlora pull in torch/bitsandbytes)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    return importlib.import_module(f"steps.train.methods.{method}")


def prepare(cfg: TrainConfig, base_dir: Path, device: str, task: Task = CAUSAL) -> Any:
    return module_for(cfg.method).prepare(cfg, base_dir, device, task)


def save(cfg: TrainConfig, model: Any, folder: Path, task: Task = CAUSAL) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    module_for(cfg.method).save(cfg, model, folder)
    meta = {"method": cfg.method, "task": task.model_dump(mode="json", exclude_none=True),
            "train": cfg.model_dump(mode="json")}
    (folder / METHOD_FILE).write_text(json.dumps(meta, indent=2))


def task_of(folder: Path) -> Task:
    """The task a trained folder was made for (causal LM for folders from before tasks were recorded)."""
    path = folder / METHOD_FILE
    return Task.model_validate(json.loads(path.read_text()).get("task", {})) if path.exists() else CAUSAL


def train_config_of(folder: Path) -> TrainConfig | None:
    """The training configuration recorded with a trained folder, if any."""
    path = folder / METHOD_FILE
    return TrainConfig.model_validate(json.loads(path.read_text())["train"]) if path.exists() else None


def load(base_dir: Path, folder: Path, device: str) -> Any:
    """The trained model for inference, whatever the method (read from method.json).

    Train artifacts from before method.json existed hold a peft LoRA adapter only.
    """
    path = folder / METHOD_FILE
    if path.exists():
        meta = json.loads(path.read_text())
        cfg, method = TrainConfig.model_validate(meta["train"]), meta["method"]
    else:
        cfg, method = TrainConfig(method="lora"), "lora"
    return module_for(method).load(cfg, base_dir, folder, device, task_of(folder)).eval()


def trainable_parameters(model: Any) -> list[Any]:
    return [p for p in model.parameters() if p.requires_grad]
