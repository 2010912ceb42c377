"""Fine-tuning methods. Each module makes exactly the intended parameters trainable,
saves only what it trained (safetensors, never pickles) and loads it back for inference:

    model = prepare(cfg, base_dir, device)        # base loaded, requires_grad set as the method says
    save(cfg, model, folder)                      # trained weights + method.json
    model = load(base_dir, folder, device)        # eval-mode model for evaluate and serving

| method | module   | trains |
|--------|----------|--------|
| full   | full.py  | every weight |
| head   | head.py  | the output head (and the last N transformer layers); base frozen |
| lora   | lora.py  | low-rank adapters (peft), optionally rsLoRA / DoRA |
| qlora  | qlora.py | LoRA on a 4-bit (bitsandbytes nf4/fp4) frozen base |
| reft   | reft.py  | LoReFT interventions on hidden states; base frozen |
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any, get_args

from steps.config import TrainConfig

METHOD_FILE = "method.json"


METHODS = get_args(TrainConfig.model_fields["method"].annotation)


def module_for(method: str) -> ModuleType:
    """``steps/methods/<method>.py``, imported on first use (reft and qlora pull in torch/bitsandbytes)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    return importlib.import_module(f"steps.methods.{method}")


def prepare(cfg: TrainConfig, base_dir: Path, device: str) -> Any:
    return module_for(cfg.method).prepare(cfg, base_dir, device)


def save(cfg: TrainConfig, model: Any, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    module_for(cfg.method).save(cfg, model, folder)
    (folder / METHOD_FILE).write_text(json.dumps({"method": cfg.method, "train": cfg.model_dump(mode="json")}, indent=2))


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
    return module_for(method).load(cfg, base_dir, folder, device).eval()


def trainable_parameters(model: Any) -> list[Any]:
    return [p for p in model.parameters() if p.requires_grad]
