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
- reward (a reward model on preference pairs): ``reward_accuracy`` = share of held-out pairs whose chosen
  answer scores higher than the rejected one, ``reward_margin`` = mean r_chosen - r_rejected, and the mean
  Bradley-Terry loss (``eval_loss``); the base model gets the untrained head (seeded as in training with
  train.seed 0), the floor a first reward model must beat; smoke: finite scores.
- preference: perplexity of the chosen answers; ``pref_accuracy`` = share of pairs whose
  chosen answer has a higher length-normalised log-probability than the rejected one, and
  the mean margin ``logp_margin``; for a trained model also DPO's implicit rewards against
  the base (``reward_accuracy``, ``reward_margin``, beta from the training config or 0.1);
  BLEU/chrF of answers against the chosen answers.
- rl (prompt records): ``mean_reward``, the mean weighted reward (``rewards``: train.rl.rewards unless given)
  of greedy answers (``max_new_tokens``, KV cache on) to the first ``reward_prompts`` held-out prompts, and
  each answer with its reward in the samples; ``kl_to_reference``, the mean of logp_policy - logp_base over
  the answer tokens (the base: LoRA's adapters off, else the base model; 0 for the base), which
  ``register.max_kl`` caps; no perplexity (prompt rows have no reference tokens) and no BLEU. The register
  step adds the win rates against the base and the champion from the per-prompt rewards
  (``reward_win_rate``: share of prompts where the candidate's answer scores higher, ties count half).

- seq2seq ({input, target} records on an encoder-decoder): perplexity = exp(mean NLL of the target tokens of the
  first ``max_records`` eval rows); BLEU, chrF and ROUGE-L (``rouge_l``: LCS F-measure x100, steps/train/seq2seq.py)
  of greedy targets generated for the first ``bleu_samples`` held-out inputs against their references.

- mlm (text records on an encoder): ``masked_accuracy``, the share of masked held-out tokens predicted
  exactly, and ``eval_loss``, their mean NLL, on the first ``max_records`` blocks with ``EVAL_PROBABILITY``
  of each block's tokens masked by a generator seeded with the block's id (steps/train/mlm.py: the same
  positions for the base and the candidate); ``pseudo_perplexity``, exp of the mean NLL of the first
  ``pseudo_perplexity_tokens`` tokens each masked in turn. The base model of an encoder checkpoint saved
  without its masked-LM head (all-MiniLM-L6-v2) gets that head seeded as training starts from it.

Every model also gets, for the promotion gate:
- a smoke test (``smoke`` stats, ``smoke_passed``): generative models answer the golden
  ``smoke_prompts`` greedily (an encoder-decoder reads each as its input); each answer must be
  non-empty, end with EOS within
  ``smoke_max_new_tokens`` and not be degenerate (more than 30% repeated 4-grams);
  classifiers must predict every class on a balanced probe (up to 5 eval rows per class);
  regressors must give finite outputs; masked-LMs fill one masked token of each of a few held-out blocks,
  with finite scores and an ordinary (not special) token. Latency per input and peak memory are recorded.
- causal LMs: ``reference_perplexity`` on ``steps/reference/general.txt`` (general English
  and Korean text, shipped with the project): the forgetting check compares it with the
  base model's.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from steps.config import EvaluateConfig
from steps.core.contract import CAUSAL, Task
from steps.core.device import peak_memory_gib, pick_device, tune_allocator
from steps.core.lineage import run_key
from steps.core.progress import progress
from steps.core.store import ArtifactStore, DatasetRef, EvalReport, ModelRef
from steps.train import methods, seq2seq
from steps.train.batching import collate
from steps.train.losses import token_nll
from steps.train.methods.common import load_base

log = logging.getLogger(__name__)

STEP = "evaluate"


def evaluate_model(cfg: EvaluateConfig, model: ModelRef, data: DatasetRef, store: ArtifactStore,
                   role: str | None = None) -> EvalReport:
    """The task's metrics of ``model`` (a base alone, or base plus trained weights) on ``data``'s eval split.

    Writes ``metrics.json`` (perplexity, BLEU/chrF; or accuracy, F1, confusion matrix; or MSE/MAE/R²;
    preference accuracy and rewards; the smoke test and forgetting perplexity) and ``samples.jsonl``
    (generated answers with their references). Run for the base, the candidate and the champion on
    the same data, so the register step compares like with like. ``role`` (base, candidate,
    champion) only names the model in the log lines.
    """
    inputs = [model.base] + ([model.adapter] if model.adapter else []) + [data]
    key = run_key(STEP, cfg, [ref.digest for ref in inputs])
    if (done := store.lookup(STEP, key)) is not None:
        return EvalReport(**done.model_dump())
    task = Task.of_data(data.stats)
    net, tokenizer, device = load_model(model, store, task)
    rows = store.read_jsonl(data, "eval.jsonl")[: cfg.max_records]
    pad_id = net.config.pad_token_id or 0
    stats: dict[str, Any] = {"model": model.label, "task": task.kind, "eval_records": len(rows)}
    if task.sequence_head:
        stats |= sequence_metrics(net, rows, task, cfg.batch_size, pad_id, device)
    elif task.kind == "mlm":
        stats |= masked_lm_metrics(net, rows, cfg, task, pad_id, device)
    elif task.kind == "seq2seq":
        loss, tokens = seq2seq.mean_nll(net, rows, cfg.batch_size, pad_id, device)
        stats |= {"perplexity": round(math.exp(loss), 4), "eval_loss": round(loss, 5), "eval_tokens": tokens}
    elif task.kind == "rl":
        reference = None
        if model.adapter is not None:  # the KL to the base: LoRA's adapters off, else the base model itself
            reference = net if hasattr(net, "disable_adapter") else load_base(None, store.download(model.base),
                                                                                device).eval()
        stats |= reward_metrics(net, tokenizer, cfg, store.read_jsonl(data, "eval.jsonl")[: cfg.reward_prompts],
                                pad_id, device, reference)
    else:
        loss, tokens = token_nll(net, rows, cfg.batch_size, pad_id, device)
        stats |= {"perplexity": round(math.exp(loss), 4), "eval_loss": round(loss, 5), "eval_tokens": tokens}
    reward_samples = stats.pop("reward_samples", [])
    if task.kind == "preference":
        stats |= preference_metrics(net, model, rows, cfg.batch_size, pad_id, device, store)
    if task.sequence_head:
        stats["smoke"] = smoke_sequence(net, rows, task, pad_id, device)
    elif task.kind == "mlm":
        stats["smoke"] = smoke_fill_mask(net, tokenizer, rows[:SMOKE_BLOCKS], task, device)
    else:
        stats["smoke"] = smoke_generation(net, tokenizer, cfg, device, task)
        if cfg.reference_blocks and task.causal_lm:
            stats["reference_perplexity"] = reference_perplexity(net, tokenizer, cfg, pad_id, device)
    stats["smoke_passed"] = stats["smoke"]["passed"]
    prompts = [] if task.sequence_head or task.kind == "rl" else stratified(store.read_jsonl(data, "eval_prompts.jsonl"), cfg.bleu_samples)
    if task.kind == "seq2seq":
        answers = seq2seq.generate(net, tokenizer, [p["input"] for p in prompts], cfg.max_new_tokens, cfg.batch_size,
                                   device, data.stats.get("max_seq_len"))
    else:
        answers = generate(net, tokenizer, [p["messages"] for p in prompts], cfg, device) if prompts else []
    if prompts:
        import sacrebleu

        references = [[p["reference"] for p in prompts]]
        stats["bleu"] = round(sacrebleu.corpus_bleu(answers, references).score, 3)
        stats["chrf"] = round(sacrebleu.corpus_chrf(answers, references).score, 3)
        stats["bleu_samples"] = len(prompts)
        if task.kind == "seq2seq":
            stats["rouge_l"] = round(seq2seq.rouge_l(answers, references[0]), 3)
    writer = store.writer(STEP, key, cfg, inputs=inputs)
    writer.put_json("metrics.json", stats)
    writer.put_jsonl("samples.jsonl", [
        {"id": p["id"], "group": prompt_group(p), "reference": p["reference"], "prediction": a}
        for p, a in zip(prompts, answers)
    ] + reward_samples)
    shown = [f"{k} {v}" for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
             and k in LOGGED]
    log.info("evaluate %s: %s, smoke test %s", role or model.label, ", ".join(shown),
             "passed" if stats["smoke_passed"] else "failed")
    return EvalReport(**writer.commit(stats=stats).model_dump())


REFERENCE_TEXT = Path(__file__).resolve().parent / "reference" / "general.txt"
REFERENCE_BLOCK = 256


LOGGED = ("perplexity", "bleu", "chrf", "rouge_l",
          "accuracy", "f1_macro", "mse", "mae", "r2", "pref_accuracy", "reward_margin",
          "reward_accuracy", "mean_reward", "kl_to_reference", "reference_perplexity", "masked_accuracy",
          "pseudo_perplexity")


def prompt_group(prompt: dict) -> str:
    """What a held-out prompt is about, for sampling: its ``category`` if the record had one, else the
    writing system of its last user turn (latin, hangul, cjk, kana, cyrillic, arabic, ...)."""
    if isinstance(prompt.get("category"), str):
        return prompt["category"]
    if isinstance(prompt.get("input"), str):  # a seq2seq input
        return script_of(prompt["input"])
    turns = [m.get("content") for m in prompt.get("messages") or [] if m.get("role") == "user"]
    return script_of(turns[-1] if turns and isinstance(turns[-1], str) else "")


def script_of(text: str) -> str:
    """The writing system most of ``text``'s letters belong to (from their Unicode names)."""
    import unicodedata

    counts: dict[str, int] = {}
    for ch in text:
        if ch.isalpha():
            name = unicodedata.name(ch, "OTHER").split(" ")[0]
            script = {"HIRAGANA": "kana", "KATAKANA": "kana", "CJK": "cjk"}.get(name, name.lower())
            counts[script] = counts.get(script, 0) + 1
    return max(counts, key=counts.__getitem__) if counts else "none"


def stratified(prompts: list[dict], n: int) -> list[dict]:
    """``n`` prompts taken in turn from each group (``prompt_group``), in file order within a group, so a
    mixed-language eval set is sampled in every language; deterministic."""
    groups: dict[str, list[dict]] = {}
    for prompt in prompts:
        groups.setdefault(prompt_group(prompt), []).append(prompt)
    chosen: list[dict] = []
    for i in range(max((len(g) for g in groups.values()), default=0)):
        chosen += [g[i] for g in groups.values() if i < len(g)]
        if len(chosen) >= n:
            break
    return chosen[:n]


def degenerate(tokens: list[int], n: int = 4, limit: float = 0.3) -> bool:
    """More than ``limit`` of the answer's n-grams repeat an earlier one (loops like "the the the")."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) >= 8 and 1 - len(set(grams)) / len(grams) > limit


def smoke_generation(net: Any, tokenizer: Any, cfg: EvaluateConfig, device: str, task: Task = CAUSAL
                     ) -> dict[str, Any]:
    """Greedy answers to the golden prompts: non-empty, ended by EOS within the limit, not degenerate. A causal
    LM answers each as a user turn (chat template); an encoder-decoder reads it as its input."""
    import time

    import torch

    eos = net.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    stops.discard(None)
    results, started = [], time.time()
    for prompt in cfg.smoke_prompts:
        if task.kind == "seq2seq":  # the decoder's output after its start token
            enc = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False).to(device)
            start = 1
        else:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
            enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
            start = enc["input_ids"].shape[1]
        with torch.no_grad():
            out = net.generate(**enc, max_new_tokens=cfg.smoke_max_new_tokens, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
        new = out[0, start:].tolist()
        ended = any(t in stops for t in new)
        body = new[: next((i for i, t in enumerate(new) if t in stops), len(new))]
        answer = tokenizer.decode(body, skip_special_tokens=True).strip()
        checks = {"non_empty": bool(answer), "ended": ended, "not_degenerate": not degenerate(body)}
        results.append({"prompt": prompt, "tokens": len(body), **checks, "passed": all(checks.values())})
    seconds = time.time() - started
    return {"kind": "generation", "passed": all(r["passed"] for r in results), "prompts": results,
            "seconds_per_input": round(seconds / max(len(results), 1), 3), "peak_memory_gib": peak_memory_gib(device)}


def smoke_sequence(net: Any, rows: list[dict], task: Task, pad_id: int, device: str) -> dict[str, Any]:
    """Classifiers predict every class on a balanced probe; regressors give finite outputs."""
    import math
    import time

    import torch

    if task.kind == "classification":
        by_class: dict[int, list[dict]] = {}
        for r in rows:
            by_class.setdefault(r["label"], []).append(r)
        probe = [r for label in sorted(by_class) for r in by_class[label][:5]]
    else:
        probe = rows[:16]
    started = time.time()
    with torch.no_grad():
        batch = {k: v.to(device) for k, v in collate(probe, pad_id).items()} if probe else None
        logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float() \
            if batch else torch.zeros(0, 1)
    seconds = time.time() - started
    result: dict[str, Any] = {"kind": task.kind, "probe": len(probe),
                              "seconds_per_input": round(seconds / max(len(probe), 1), 4),
                              "peak_memory_gib": peak_memory_gib(device)}
    if task.kind == "classification":
        predicted = sorted({task.labels[i] for i in logits.argmax(-1).tolist()})
        missing = sorted(set(task.labels) - set(predicted))
        result |= {"predicted_classes": predicted, "missing_classes": missing,
                   "passed": bool(probe) and not missing}
    else:
        result["passed"] = bool(probe) and all(math.isfinite(v) for v in logits[:, 0].tolist())
    return result


def masked_lm_metrics(net: Any, rows: list[dict], cfg: EvaluateConfig, task: Task, pad_id: int, device: str
                      ) -> dict[str, Any]:
    """A masked-LM's held-out masked_accuracy and eval_loss (fixed masks) and pseudo_perplexity."""
    from steps.train import mlm

    assert task.mask_token_id is not None
    scores = mlm.masked_scores(net, rows, task.mask_token_id, cfg.batch_size, pad_id, device)
    nll, count, correct = (sum(s[i] for s in scores) for i in range(3))
    stats: dict[str, Any] = {"masked_accuracy": round(correct / max(count, 1), 6),
                             "eval_loss": round(nll / max(count, 1), 5), "masked_tokens": count}
    if cfg.pseudo_perplexity_tokens:
        total, tokens = mlm.pseudo_nll(net, rows, cfg.pseudo_perplexity_tokens, task.mask_token_id, cfg.batch_size,
                                       device)
        stats |= {"pseudo_perplexity": round(math.exp(total / max(tokens, 1)), 4),
                  "pseudo_perplexity_tokens": tokens}
    return stats


SMOKE_BLOCKS = 4


def smoke_fill_mask(net: Any, tokenizer: Any, rows: list[dict], task: Task, device: str) -> dict[str, Any]:
    """The middle token of each block masked: its scores finite and its top prediction an ordinary token."""
    import time

    import torch

    started, results = time.time(), []
    special = set(tokenizer.all_special_ids)
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        maskable = [t for t, w in enumerate(row["word_ids"]) if w is not None]
        at = maskable[len(maskable) // 2]
        ids[0, at] = task.mask_token_id
        with torch.no_grad():
            scores = net(input_ids=ids.to(device)).logits[0, at].float()
        top = int(scores.argmax())
        checks = {"finite": bool(torch.isfinite(scores).all()), "ordinary_token": top not in special}
        results.append({"block": row["id"], "expected": tokenizer.convert_ids_to_tokens(row["input_ids"][at]),
                        "predicted": tokenizer.convert_ids_to_tokens(top), **checks, "passed": all(checks.values())})
    return {"kind": "fill_mask", "passed": bool(results) and all(r["passed"] for r in results), "blocks": results,
            "seconds_per_input": round((time.time() - started) / max(len(results), 1), 4),
            "peak_memory_gib": peak_memory_gib(device)}


def reference_perplexity(net: Any, tokenizer: Any, cfg: EvaluateConfig, pad_id: int, device: str) -> float:
    """Perplexity on the shipped general text, in blocks of 256 tokens (the forgetting check)."""
    ids = tokenizer(REFERENCE_TEXT.read_text(encoding="utf-8"), add_special_tokens=False, verbose=False)["input_ids"]
    rows = [{"input_ids": ids[i : i + REFERENCE_BLOCK]}
            for i in range(0, len(ids), REFERENCE_BLOCK)][: cfg.reference_blocks]
    loss, _ = token_nll(net, [r for r in rows if len(r["input_ids"]) > 1], cfg.batch_size, pad_id, device,
                        progress=False)
    return round(math.exp(loss), 4)


def sequence_metrics(net: Any, rows: list[dict], task: Task, batch_size: int, pad_id: int, device: str
                     ) -> dict[str, Any]:
    import torch

    if task.kind == "reward":
        from steps.train import reward

        return reward.pair_metrics(*reward.score_pairs(net, rows, batch_size, pad_id, device))
    predictions: list[Any] = []
    total = 0.0
    with torch.no_grad():  # one pass: the loss (as sequence_loss computes it) and the predictions
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            out = net(**{k: v.to(device) for k, v in collate(chunk, pad_id).items()})
            total += out.loss.item() * len(chunk)
            logits = out.logits.float()
            predictions += (logits.argmax(-1) if task.kind == "classification" else logits[:, 0]).tolist()
    truth = [r["label"] for r in rows]
    loss = round(total / max(len(rows), 1), 5)
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


def reward_metrics(net: Any, tokenizer: Any, cfg: EvaluateConfig, rows: list[dict], pad_id: int, device: str,
                   reference: Any = None) -> dict[str, Any]:
    """Mean reward of greedy answers to held-out prompts (``rewards``), the answers as samples, and with a
    ``reference`` (a trained model's base) the mean KL to it per answer token (``kl_to_reference``; 0 for
    the base itself)."""
    from steps.train.rewards import build_rewards
    from steps.train.rl import greedy_rewards

    if not cfg.rewards:
        from steps.core.errors import ConfigError

        raise ConfigError("evaluate.rewards: prompt records are scored by reward functions; none are configured")
    values, answers, kl = greedy_rewards(net, tokenizer, rows, build_rewards(cfg.rewards, device), cfg.max_new_tokens,
                                         cfg.batch_size, pad_id, device, reference)
    samples = [{"id": r["id"], "group": "prompt", "reference": r.get("answer", ""), "prediction": a, "reward": v}
               for r, a, v in zip(rows, answers, values)]
    return {"mean_reward": round(sum(values) / max(len(values), 1), 6), "reward_prompts": len(rows),
            "kl_to_reference": round(kl, 6) if kl is not None else 0.0, "reward_samples": samples}


def pair_logps(net: Any, rows: list[dict], batch_size: int, pad_id: int, device: str
               ) -> tuple[list[float], list[float], list[float], list[float]]:
    """Summed and length-normalised log-probabilities of the chosen and rejected answers."""
    import torch

    from steps.train.preference import forward_logps

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
    tune_allocator()
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
    for i in progress(range(0, len(conversations), cfg.batch_size), desc="generate", unit="batch"):
        texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                 for c in conversations[i : i + cfg.batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            out = net.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
        answers += [s.strip() for s in tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    return answers
