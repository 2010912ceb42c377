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

from steps import methods
from steps.config import EvaluateConfig
from steps.lineage import run_key
from steps.store import ArtifactStore, DatasetRef, EvalReport, ModelRef
from steps.batching import token_nll
from steps.train import pick_device

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
    from transformers import AutoTokenizer

    from steps.methods.common import load_base

    device = pick_device("auto")
    base_dir = store.download(model.base)
    if model.adapter is None:
        net = load_base(None, base_dir, device)
    else:
        net = methods.load(base_dir, store.download(model.adapter), device)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    return net.eval(), tokenizer, device


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
