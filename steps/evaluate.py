"""Evaluate: the metrics of the task on the eval split.

The same function evaluates the base model, the fine-tuned candidate and the current
champion (a ``ModelRef`` with or without adapter), each result cached under its own
key, so they are compared on exactly the same eval set.

- sft, cpt: perplexity = exp(mean token NLL over answer tokens (all tokens for cpt) of the
  first ``max_records`` eval rows); BLEU and chrF (sacrebleu, default 13a tokenization) of
  greedy answers to the first ``bleu_samples`` held-out prompts against their references.
- classification: accuracy, macro precision/recall/F1, per-class precision/recall/F1/support
  and the confusion matrix (scikit-learn), plus the mean eval loss. The base model gets the
  task's head freshly initialised (seed 0), so its numbers are the untrained-head floor.
- regression: MSE, MAE and R² of the single output against the labels.
- preference: perplexity of the chosen answers; ``pref_accuracy`` = share of pairs whose
  chosen answer has a higher length-normalised log-probability than the rejected one, and
  the mean margin ``logp_margin``; for a trained model also DPO's implicit rewards against
  the base (``reward_accuracy``, ``reward_margin``, beta from the training config or 0.1);
  BLEU/chrF of answers against the chosen answers.
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
from steps.batching import collate, sequence_loss, token_nll
from steps.methods.common import CAUSAL, Task, load_base
from steps.train import pick_device

log = logging.getLogger(__name__)

STEP = "evaluate"


def evaluate_model(cfg: EvaluateConfig, model: ModelRef, data: DatasetRef, store: ArtifactStore) -> EvalReport:
    inputs = [model.base] + ([model.adapter] if model.adapter else []) + [data]
    key = run_key(STEP, cfg, [ref.digest for ref in inputs])
    if (done := store.lookup(STEP, key)) is not None:
        return EvalReport(**done.model_dump())
    task = Task(kind=data.stats.get("task", "sft"), labels=data.stats.get("labels", []))
    net, tokenizer, device = load_model(model, store, task)
    rows = store.read_jsonl(data, "eval.jsonl")[: cfg.max_records]
    pad_id = net.config.pad_token_id or 0
    stats: dict[str, Any] = {"model": model.label, "task": task.kind, "eval_records": len(rows)}
    if task.sequence_head:
        stats |= sequence_metrics(net, rows, task, cfg.batch_size, pad_id, device)
    else:
        loss, tokens = token_nll(net, rows, cfg.batch_size, pad_id, device)
        stats |= {"perplexity": round(math.exp(loss), 4), "eval_loss": round(loss, 5), "eval_tokens": tokens}
    if task.kind == "preference":
        stats |= preference_metrics(net, model, rows, cfg.batch_size, pad_id, device, store)
    prompts = store.read_jsonl(data, "eval_prompts.jsonl")[: cfg.bleu_samples] if not task.sequence_head else []
    answers = generate(net, tokenizer, [p["messages"] for p in prompts], cfg, device) if prompts else []
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


def sequence_metrics(net: Any, rows: list[dict], task: Task, batch_size: int, pad_id: int, device: str
                     ) -> dict[str, Any]:
    import torch

    predictions: list[Any] = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate(rows[i : i + batch_size], pad_id).items()}
            logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            predictions += (logits.argmax(-1) if task.kind == "classification" else logits[:, 0]).tolist()
    truth = [r["label"] for r in rows]
    loss = round(sequence_loss(net, rows, batch_size, pad_id, device), 5)
    if task.kind == "regression":
        from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

        return {"mse": round(float(mean_squared_error(truth, predictions)), 6),
                "mae": round(float(mean_absolute_error(truth, predictions)), 6),
                "r2": round(float(r2_score(truth, predictions)), 6) if len(rows) > 1 else None, "eval_loss": loss}
    return classification_metrics(truth, predictions, task.labels) | {"eval_loss": loss}


def classification_metrics(truth: list[int], predicted: list[int], labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro and per-class precision/recall/F1, and the confusion matrix (rows: true label)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    indices = list(range(len(labels)))
    p, r, f, support = precision_recall_fscore_support(truth, predicted, labels=indices, zero_division=0)
    macro = precision_recall_fscore_support(truth, predicted, labels=indices, average="macro", zero_division=0)
    return {
        "accuracy": round(float(accuracy_score(truth, predicted)), 6),
        "precision_macro": round(float(macro[0]), 6),
        "recall_macro": round(float(macro[1]), 6),
        "f1_macro": round(float(macro[2]), 6),
        "per_class": {label: {"precision": round(float(p[i]), 6), "recall": round(float(r[i]), 6),
                              "f1": round(float(f[i]), 6), "support": int(support[i])}
                      for i, label in enumerate(labels)},
        "labels": labels,
        "confusion_matrix": confusion_matrix(truth, predicted, labels=indices).tolist(),
    }


def preference_metrics(net: Any, model: ModelRef, rows: list[dict], batch_size: int, pad_id: int, device: str,
                       store: ArtifactStore) -> dict[str, Any]:
    """Pair ranking by length-normalised log-probability; DPO implicit rewards against the base."""
    good, bad, good_mean, bad_mean = pair_logps(net, rows, batch_size, pad_id, device)
    ahead = [c - r for c, r in zip(good_mean, bad_mean)]
    stats: dict[str, Any] = {"pref_accuracy": round(sum(a > 0 for a in ahead) / max(len(ahead), 1), 6),
                             "logp_margin": round(sum(ahead) / max(len(ahead), 1), 6)}
    if model.adapter is not None:
        base = load_base(None, store.download(model.base), device).eval()
        ref_good, ref_bad, _, _ = pair_logps(base, rows, batch_size, pad_id, device)
        del base
        meta = methods.train_config_of(store.download(model.adapter))
        beta = meta.preference.beta if meta is not None else 0.1
        rewards = [beta * ((c - rc) - (r - rr)) for c, r, rc, rr in zip(good, bad, ref_good, ref_bad)]
        stats |= {"reward_accuracy": round(sum(x > 0 for x in rewards) / max(len(rewards), 1), 6),
                  "reward_margin": round(sum(rewards) / max(len(rewards), 1), 6), "reward_beta": beta}
    return stats


def pair_logps(net: Any, rows: list[dict], batch_size: int, pad_id: int, device: str
               ) -> tuple[list[float], list[float], list[float], list[float]]:
    """Summed and length-normalised log-probabilities of the chosen and rejected answers."""
    import torch

    from steps.preference import forward_logps

    out: tuple[list[float], list[float], list[float], list[float]] = ([], [], [], [])
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            logps, counts, _ = forward_logps(net, chunk, pad_id, device)
            n = len(chunk)
            means = (logps / counts.clamp(min=1)).tolist()
            for target, values in zip(out, (logps[:n].tolist(), logps[n:].tolist(), means[:n], means[n:])):
                target.extend(values)
    return out


def load_model(model: ModelRef, store: ArtifactStore, task: Task = CAUSAL) -> tuple[Any, Any, str]:
    import torch
    from transformers import AutoTokenizer

    device = pick_device("auto")
    base_dir = store.download(model.base)
    if model.adapter is None:
        torch.manual_seed(0)  # a sequence head starts random: the same floor every time
        net = load_base(None, base_dir, device, task)
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
