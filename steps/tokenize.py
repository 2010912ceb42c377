"""Tokenize: render conversations with the base model's chat template, mask every
token that is not an assistant answer, and split train/eval with a seeded hash.

Labels are -100 outside assistant turns: the loss teaches answers, not prompts. The
split hashes each record id with the seed, so a record stays on its side when the
dataset grows. Output: ``train.jsonl`` and ``eval.jsonl`` (``input_ids``, ``labels``),
and ``eval_prompts.jsonl`` (prompt messages and the reference answer, for BLEU).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from tqdm import tqdm

from steps.batching import IGNORE
from steps.config import TokenizeConfig
from steps.errors import ConfigError, DataQualityError
from steps.lineage import run_key
from steps.store import ArtifactStore, DatasetRef, ModelRef
from steps.validate import RECORDS_FILE

log = logging.getLogger(__name__)

STEP = "tokenize"


def tokenize_dataset(cfg: TokenizeConfig, source: DatasetRef, model: ModelRef, store: ArtifactStore) -> DatasetRef:
    key = run_key(STEP, cfg, [source.digest, model.base.digest])
    if (done := store.lookup(STEP, key)) is not None:
        return DatasetRef(**done.model_dump())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(store.download(model.base))
    records = store.read_jsonl(source, RECORDS_FILE)
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
    prompts: list[dict[str, Any]] = []
    truncated = dropped = 0
    for record in tqdm(records, desc="tokenize", unit="rec", mininterval=2):
        ids, labels = encode_chat(tokenizer, record["messages"])
        if len(ids) > cfg.max_seq_len:
            truncated += 1
            ids, labels = ids[: cfg.max_seq_len], labels[: cfg.max_seq_len]
        if all(label == IGNORE for label in labels):
            dropped += 1  # truncation removed every answer token
            continue
        side = "eval" if in_eval(record["id"], cfg) else "train"
        splits[side].append({"id": record["id"], "input_ids": ids, "labels": labels})
        if side == "eval":
            prompts.append({"id": record["id"], "messages": record["messages"][:-1],
                            "reference": record["messages"][-1]["content"]})
    if not splits["train"] or not splits["eval"]:
        raise DataQualityError(
            f"tokenize: rule 'both splits non-empty': {len(splits['train'])} train and {len(splits['eval'])} eval "
            f"records from {len(records)} (eval_fraction={cfg.eval_fraction}); add records or change the fraction"
        )
    writer = store.writer(STEP, key, cfg, inputs=[source, model.base])
    for side, rows in splits.items():
        writer.put_jsonl(f"{side}.jsonl", rows)
    writer.put_jsonl("eval_prompts.jsonl", prompts)
    stats = {
        "train_records": len(splits["train"]),
        "eval_records": len(splits["eval"]),
        "train_tokens": sum(len(r["input_ids"]) for r in splits["train"]),
        "trainable_tokens": sum(sum(label != IGNORE for label in r["labels"]) for r in splits["train"]),
        "truncated": truncated,
        "dropped_no_answer": dropped,
    }
    log.info("tokenize: %s", stats)
    return DatasetRef(**writer.commit(stats=stats).model_dump())


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels that keep only assistant turns.

    The template must render each conversation prefix as a prefix of the whole; an
    assistant turn is the text between the prompt (with generation header) and the end
    of that turn, including its end-of-turn token.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        turn = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False).rstrip("\n")
        if not (turn.startswith(prompt) and text.startswith(turn)):
            raise ConfigError("the chat template does not render conversation prefixes as prefixes; cannot mask prompts")
        spans.append((len(prompt), len(turn)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [
        token if any(start <= begin < end for start, end in spans) else IGNORE
        for token, (begin, _) in zip(ids, encoded["offset_mapping"])
    ]
    return ids, labels


def in_eval(record_id: str, cfg: TokenizeConfig) -> bool:
    h = hashlib.sha256(f"{cfg.seed}:{record_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < cfg.eval_fraction
