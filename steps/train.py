"""Train: LoRA supervised fine-tuning of the base model on the tokenized train split.

A small readable loop (no Trainer): AdamW over the adapter weights only, warm-up then
linear/cosine/constant decay, gradient accumulation and clipping, a fixed step budget.
Runs on CUDA (bf16) when present and ``device="auto"``, otherwise on CPU (fp32).
The adapter is saved with peft as safetensors and committed to the store together
with ``train_log.json`` (loss and learning rate per step).

Limits: one method (LoRA), one process; resuming mid-run is not supported yet.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from steps.config import TrainConfig
from steps.lineage import run_key
from steps.store import ArtifactRef, ArtifactStore, DatasetRef, ModelRef
from steps.tokenize import IGNORE

log = logging.getLogger(__name__)

STEP = "train"


def train_model(cfg: TrainConfig, data: DatasetRef, model: ModelRef, store: ArtifactStore) -> ModelRef:
    key = run_key(STEP, cfg, [data.digest, model.base.digest])
    if (done := store.lookup(STEP, key)) is not None:
        return ModelRef(base=model.base, adapter=ArtifactRef(**done.model_dump()))
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, get_scheduler

    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    base_dir = store.download(model.base)
    net = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(device)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    net = get_peft_model(net, lora)
    net.train()
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.scheduler if cfg.scheduler != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)
    rows = store.read_jsonl(data, "train.jsonl")
    batches = batch_stream(rows, cfg.batch_size, cfg.seed, net.config.pad_token_id or 0)
    history: list[dict[str, float]] = []
    tokens = 0
    start = time.time()
    progress = tqdm(range(1, cfg.max_steps + 1), desc="train", unit="step")
    for step in progress:
        step_loss = 0.0
        for _ in range(cfg.grad_accum_steps):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            loss = net(**batch).loss / cfg.grad_accum_steps
            loss.backward()
            step_loss += loss.item()
            tokens += int(batch["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"step": step, "loss": step_loss, "lr": scheduler.get_last_lr()[0]})
        progress.set_postfix(loss=f"{step_loss:.3f}")
    seconds = time.time() - start

    with tempfile.TemporaryDirectory(prefix="tuneline-adapter-") as tmp:
        net.save_pretrained(tmp, safe_serialization=True)
        point_adapter_at_base(Path(tmp), f"s3://{store.bucket}/{model.base.key}")
        writer = store.writer(STEP, key, cfg, inputs=[data, model.base])
        writer.put_dir(Path(tmp))
        writer.put_json("train_log.json", history)
        stats = {
            "steps": cfg.max_steps,
            "first_loss": history[0]["loss"],
            "final_loss": history[-1]["loss"],
            "tokens_seen": tokens,
            "tokens_per_s": round(tokens / seconds, 1),
            "trainable_params": sum(p.numel() for p in trainable),
            "device": device,
        }
        ref = writer.commit(stats=stats)
    log.info("train: %d steps on %s, loss %.3f -> %.3f", cfg.max_steps, device, stats["first_loss"], stats["final_loss"])
    return ModelRef(base=model.base, adapter=ref)


def point_adapter_at_base(folder: Path, base_uri: str) -> None:
    """peft records the local temp folder as the base; record the base artifact instead."""
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base_uri
    path.write_text(json.dumps(config, indent=2))


def pick_device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def batch_stream(rows: list[dict[str, Any]], batch_size: int, seed: int, pad_id: int) -> Iterator[dict[str, Any]]:
    """Endless shuffled micro-batches of similar lengths, padded to the longest row of each.

    Rows are shuffled, cut into pools of 50 batches, sorted by length inside each pool, and
    the resulting batches shuffled again: order stays random, padding mostly disappears.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    pool = 50 * batch_size
    while True:
        order = torch.randperm(len(rows), generator=generator).tolist()
        batches: list[list[int]] = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start : start + pool], key=lambda j: len(rows[j]["input_ids"]))
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield collate([rows[j] for j in batches[b]], pad_id)


def collate(rows: list[dict[str, Any]], pad_id: int, left: bool = False) -> dict[str, Any]:
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids, labels, mask = [], [], []
    for r in rows:
        pad = width - len(r["input_ids"])
        fill = lambda seq, value: ([value] * pad + seq) if left else (seq + [value] * pad)  # noqa: E731
        ids.append(fill(list(r["input_ids"]), pad_id))
        labels.append(fill(list(r.get("labels", r["input_ids"])), IGNORE))
        mask.append(fill([1] * len(r["input_ids"]), 0))
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}
