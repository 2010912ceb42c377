"""Tokenize: scrubbed records -> token rows for the base model, split train/eval.

    tokenize_dataset(TokenizeConfig(...), scrubbed, base_model, store)

What a row is depends on the records' kind (chat: template-rendered conversation labelled on the
answers; text: packed blocks, for an encoder framed by its special tokens with word boundaries for
masked-LM; classification/regression: text and label; preference: chosen and rejected conversations). How each kind is encoded, the leakage check, streaming and the worker
processes: docs/DESIGN.md, "Tokenize".
"""

from __future__ import annotations

import logging

from steps.config import CAUSAL_KINDS, TASKS, TokenizeConfig
from steps.core.contract import RECORDS_FILE
from steps.core.errors import ConfigError
from steps.core.lineage import run_key
from steps.core.store import ArtifactStore, DatasetRef, ModelRef
from steps.tokenize.augment import augment_inputs, augment_train
from steps.tokenize.chats import stream_chats
from steps.tokenize.encode import (
    encode_chats,
    encode_labelled,
    encode_pairs,
    encode_prompts,
    encode_reward_pairs,
    encode_seq2seq,
    pack_texts,
)
from steps.tokenize.split import (
    check_both_splits,
    check_truncation,
    drop_leakage,
    leakage_checked_by,
    pinned_counts,
    pinned_stats,
    split_records,
    split_summary,
)

log = logging.getLogger(__name__)

STEP = "tokenize"


def tokenize_dataset(cfg: TokenizeConfig, source: DatasetRef, model: ModelRef, store: ArtifactStore) -> DatasetRef:
    """Token rows of the scrubbed records ``source`` for ``model``'s tokenizer.

    Writes ``train.jsonl``, ``eval.jsonl`` and ``eval_prompts.jsonl``; the stats carry ``task`` (read
    by train), the split sizes, truncation and leakage counts. Raises ``DataQualityError`` when a
    side is empty or too many records are truncated (``max_truncated_share``), ``ConfigError`` when
    the chat template cannot mask prompts or the tokenizer has no EOS for packing.
    """
    key = run_key(STEP, cfg, [source.digest, model.base.digest, *augment_inputs(cfg.augment)])
    if (done := store.lookup(STEP, key)) is not None:
        return DatasetRef(**done.model_dump())
    from transformers import AutoTokenizer

    check_model_fits_records(source.stats["record_kind"], model, cfg.reward_model)
    tokenizer = AutoTokenizer.from_pretrained(store.download(model.base))
    encoder = model.base.stats.get("causal") is False and not model.base.stats.get("seq2seq")
    pair_input = "text_pair" if encoder else "chat"  # reward_model only
    if source.stats["record_kind"] in CAUSAL_KINDS and not tokenizer.chat_template \
            and not (cfg.reward_model and pair_input == "text_pair"):
        raise ConfigError(f"the base model ({model.base.stats.get('source')}) has no chat template in its tokenizer; "
                          "set tokenize.chat_template (chatml, llama3, gemma or the path of a Jinja file)")
    checked_by = leakage_checked_by(cfg, source, store)
    # What this step checks: without the leakage MinHash when scrub's near dedup already ruled
    # leakage out. The manifest keeps the configuration as given (``cfg``).
    work = cfg
    if checked_by == "scrub":
        log.info("tokenize: train/eval leakage ruled out by scrub's near dedup (same threshold and signatures)")
        work = cfg.model_copy(update={"leakage_threshold": None})
    if source.stats["record_kind"] == "chat" and cfg.augment is None:
        writer = store.writer(STEP, key, cfg, inputs=[source, model.base])
        stats = stream_chats(tokenizer, source, store, work, writer) | {"leakage_checked_by": checked_by}
        log.info("tokenize: %s", split_summary(stats))
        return DatasetRef(**writer.commit(stats=stats).model_dump())
    records = store.read_jsonl(source, RECORDS_FILE)
    sides = split_records(records, cfg)
    pinned = pinned_stats(pinned_counts(sides))
    leaked = drop_leakage(sides, work)
    kind = source.stats["record_kind"]
    # Train records only, after the split and the leakage check (steps/tokenize/augment.py).
    augmented = augment_train(cfg.augment, sides, kind) if cfg.augment is not None else None
    if kind == "text":
        splits, prompts, stats = pack_texts(tokenizer, sides, cfg, encoder)
    elif kind in ("classification", "regression"):
        splits, prompts, stats = encode_labelled(tokenizer, sides, cfg, kind)
    elif kind == "preference" and cfg.reward_model:
        splits, prompts, stats = encode_reward_pairs(tokenizer, sides, cfg, pair_input)
    elif kind == "preference":
        splits, prompts, stats = encode_pairs(tokenizer, sides, cfg)
    elif kind == "prompt":
        splits, prompts, stats = encode_prompts(tokenizer, sides, cfg)
    elif kind == "seq2seq":
        splits, prompts, stats = encode_seq2seq(tokenizer, sides, cfg)
    else:
        splits, prompts, stats = encode_chats(tokenizer, sides, cfg)
    task = "reward" if cfg.reward_model else "mlm" if kind == "text" and encoder else TASKS[kind]
    stats = {"task": task, **stats, **pinned, "eval_leakage_removed": len(leaked),
             "leakage_checked_by": checked_by}
    if augmented is not None:
        stats["augmentation"] = augmented
    check_truncation(cfg, stats, len(records) + (augmented or {}).get("records_added", 0))
    check_both_splits(cfg, len(splits["train"]), len(splits["eval"]), len(records))
    writer = store.writer(STEP, key, cfg, inputs=[source, model.base])
    for side, rows in splits.items():
        writer.put_jsonl(f"{side}.jsonl", rows)
    writer.put_jsonl("eval_prompts.jsonl", prompts)
    log.info("tokenize: %s", split_summary(stats))
    return DatasetRef(**writer.commit(stats=stats).model_dump())


def check_model_fits_records(kind: str, model: ModelRef, reward_model: bool = False) -> None:
    """Chat, preference and prompt records need a causal LM: an encoder base is a ConfigError, except for
    preference records that train a reward model (``reward_model``: a scalar head on any base). Text records
    train either (masked-LM on an encoder). Seq2seq records need an encoder-decoder, and an encoder-decoder
    learns seq2seq records only."""
    if reward_model and kind != "preference":
        raise ConfigError(f"tokenize.reward_model needs preference records, not {kind!r} records")
    seq2seq = bool(model.base.stats.get("seq2seq"))
    if seq2seq != (kind == "seq2seq"):
        what = f"an encoder-decoder ({model.base.stats.get('architecture')})" if seq2seq else \
            f"not an encoder-decoder ({model.base.stats.get('architecture')})"
        raise ConfigError(f"base_model.source {model.base.stats.get('source')!r} is {what}; "
                          + ("it learns seq2seq records ({input, target}; validate.record_kind seq2seq), not "
                             f"{kind!r} records" if seq2seq else "seq2seq records need an AutoModelForSeq2SeqLM "
                             "model such as T5 or BART"))
    if kind in CAUSAL_KINDS and model.base.stats.get("causal") is False and not reward_model:
        raise ConfigError(f"base_model.source {model.base.stats.get('source')!r} is an encoder "
                          f"({model.base.stats.get('architecture')}) without a language-model head; {kind!r} "
                          "records need a causal LM (e.g. a *ForCausalLM model)")
