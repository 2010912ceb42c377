"""Evaluate: perplexity on the eval split and BLEU/chrF of generated answers.

The same function evaluates the base model, the fine-tuned candidate and the current
champion (a ``ModelRef`` with or without adapter), each result cached under its own
key, so they are compared on exactly the same eval set.

- perplexity = exp(mean token NLL over assistant tokens of the first ``max_records`` eval rows)
- BLEU and chrF (sacrebleu, default 13a tokenization) of greedy answers to the first
  ``bleu_samples`` held-out prompts against their reference answers.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from tqdm import tqdm

from steps.config import EvaluateConfig
from steps.lineage import run_key
from steps.store import ArtifactStore, DatasetRef, EvalReport, ModelRef
from steps.train import collate, pick_device

log = logging.getLogger(__name__)

STEP = "evaluate"


def evaluate_model(cfg: EvaluateConfig, model: ModelRef, data: DatasetRef, store: ArtifactStore) -> EvalReport:
    inputs = [model.base] + ([model.adapter] if model.adapter else []) + [data]
    key = run_key(STEP, cfg, [ref.digest for ref in inputs])
    if (done := store.lookup(STEP, key)) is not None:
        return EvalReport(**done.model_dump())
    net, tokenizer, device = load_model(model, store)
    rows = store.read_jsonl(data, "eval.jsonl")[: cfg.max_records]
    loss, tokens = token_nll(net, rows, cfg.batch_size, tokenizer.pad_token_id, device)
    prompts = store.read_jsonl(data, "eval_prompts.jsonl")[: cfg.bleu_samples]
    answers = generate(net, tokenizer, [p["messages"] for p in prompts], cfg, device) if prompts else []
    stats: dict[str, Any] = {
        "model": model.label,
        "perplexity": round(math.exp(loss), 4),
        "eval_loss": round(loss, 5),
        "eval_tokens": tokens,
        "eval_records": len(rows),
    }
    if prompts:
        import sacrebleu

        references = [[p["reference"] for p in prompts]]
        stats["bleu"] = round(sacrebleu.corpus_bleu(answers, references).score, 3)
        stats["chrf"] = round(sacrebleu.corpus_chrf(answers, references).score, 3)
        stats["bleu_samples"] = len(prompts)
    writer = store.writer(STEP, key, cfg, inputs=inputs)
    writer.put_json("metrics.json", stats)
    writer.put_jsonl("samples.jsonl", [
        {"id": p["id"], "reference": p["reference"], "prediction": a} for p, a in zip(prompts, answers)
    ])
    log.info("evaluate %s: %s", model.label, stats)
    return EvalReport(**writer.commit(stats=stats).model_dump())


def load_model(model: ModelRef, store: ArtifactStore) -> tuple[Any, Any, str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = pick_device("auto")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    base_dir = store.download(model.base)
    net = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    if model.adapter is not None:
        from peft import PeftModel

        net = PeftModel.from_pretrained(net, store.download(model.adapter))
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    return net.to(device).eval(), tokenizer, device


def token_nll(net: Any, rows: list[dict[str, Any]], batch_size: int, pad_id: int, device: str) -> tuple[float, int]:
    """Mean negative log-likelihood per label token, summed exactly over all rows."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for i in tqdm(range(0, len(rows), batch_size), desc="perplexity", unit="batch", mininterval=2):
            batch = {k: v.to(device) for k, v in collate(rows[i : i + batch_size], pad_id).items()}
            logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                ignore_index=-100, reduction="sum",
            )
            total += nll.item()
            count += int((targets != -100).sum())
    return total / max(count, 1), count


def generate(net: Any, tokenizer: Any, conversations: list[list[dict]], cfg: EvaluateConfig, device: str) -> list[str]:
    import torch

    tokenizer.padding_side = "left"
    answers: list[str] = []
    for i in tqdm(range(0, len(conversations), cfg.batch_size), desc="generate", unit="batch"):
        texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                 for c in conversations[i : i + cfg.batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            out = net.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
        answers += [s.strip() for s in tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    return answers
