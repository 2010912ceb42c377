"""Tokenize: turn scrubbed records into token rows and split train/eval with a seeded hash.

The split hashes each record id with the seed, so a record stays on its side when the
dataset grows. What a row is depends on the records' kind (``record_kind`` in the
scrub stats, set by ``validate.record_kind``):

chat (supervised fine-tuning): one row per conversation, rendered with the base model's
chat template and cut at ``max_seq_len`` tokens. Labels are -100 outside assistant turns:
the loss teaches answers, not prompts. ``eval_prompts.jsonl`` holds each eval
conversation's prompt messages and reference answer, for BLEU.

text (continued pretraining): each side's documents are tokenized without special tokens,
joined into one stream with the tokenizer's EOS token between documents, and cut into
blocks of exactly ``max_seq_len`` tokens; labels = input_ids (every token is trained).
The split is by document, so no document has tokens on both sides. Limits:
- the last partial block of each side (fewer than ``max_seq_len`` tokens) is dropped
  and counted in ``dropped_tail_tokens``;
- standard causal-LM packing: a block may hold the end of one document and the start of
  the next, and their tokens attend to each other (only the EOS marks the boundary);
  per-document attention masks are not implemented;
- ``eval_prompts.jsonl`` is empty, so evaluate reports perplexity only (no BLEU).
Stats: ``<side>_documents``, ``<side>_records`` (blocks), ``<side>_tokens`` and
``dropped_tail_tokens``.

classification / regression: each text is encoded with the base tokenizer's special tokens
(``[CLS] ... [SEP]`` for BERT) and truncated to ``max_seq_len``; a row is ``{"id",
"input_ids", "label"}`` with the label's index in the sorted label set (classification,
stats ``labels`` and per-side ``<side>_label_counts``) or the number itself (regression).

preference (DPO, ORPO): the prompt becomes a user turn and each answer an assistant turn
rendered with the chat template, masked as in chat; a row is ``{"id", "input_ids",
"labels"}`` for the chosen conversation plus ``rejected_ids`` / ``rejected_labels``, each
cut at ``max_seq_len``; a pair that loses every answer token on either side is dropped.
``eval_prompts.jsonl`` holds the prompt and the chosen answer as reference.

Augmentation (``augment``, off by default): seeded copies of train records only, added
after the split and the leakage check (``steps/augment.py``); counts in ``augmentation``.

No leakage: after the split, eval records whose MinHash similarity with any train record
reaches ``leakage_threshold`` are dropped from eval (``eval_leakage_removed``). When the
records come from a scrub whose exact and near dedup ran at the same threshold with the
same signatures (the defaults), no such pair can exist, so the check is not repeated;
``leakage_checked_by`` in the stats says which step ruled leakage out ("scrub",
"tokenize", or None when off). The truncation gate (``max_truncated_share``) fails the
step when too many records are cut.

Streaming: chat records without augmentation are read from S3 in chunks of
``CHUNK_RECORDS``, in one pass, and written through local files (``stream_chats``): memory
holds a few chunks, the leakage index (a MinHash signature per train record) and the eval
records' signatures, whatever the size. Large inputs are encoded by worker processes, one
per core (``TUNELINE_DATA_WORKERS``, steps/workers.py), with byte-identical output. The
other kinds, and augmentation, load the records of the step into memory.

Encoding chats: a content-transparent template is filled into per-role-sequence layouts
instead of rendered (``_ChatLayout``), and byte-level BPE tokenizers encode through a cache
of pre-tokens with the tokenizer's own ids (``pretoken_encoder``, steps/pretokens.py); any
conversation either cannot vouch for is rendered and encoded by the tokenizer itself.

Output: ``train.jsonl`` and ``eval.jsonl`` and ``eval_prompts.jsonl``; the stats carry
``task`` (sft, cpt, classification, regression, preference), which the train step reads.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import logging
import re
import tempfile
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from tqdm import tqdm

from steps.augment import augment_inputs, augment_train
from steps.batching import IGNORE
from steps.config import TASKS, TokenizeConfig
from steps.errors import ConfigError, DataQualityError
from steps.lineage import run_key
from steps.store import ArtifactStore, DatasetRef, ModelRef
from steps.validate import RECORDS_FILE
from steps.workers import ChunkWorkers, balanced_chunk, pack, unpack, worker_count

log = logging.getLogger(__name__)

STEP = "tokenize"
ENCODE_BATCH = 1024  # conversations per tokenizer call
CHUNK_RECORDS = 10_000  # chat records per chunk of the stream
LEAKAGE_PERMUTATIONS = 128  # MinHash permutations of the leakage check (steps.dedup.LeakageIndex's default)


def tokenize_dataset(cfg: TokenizeConfig, source: DatasetRef, model: ModelRef, store: ArtifactStore) -> DatasetRef:
    key = run_key(STEP, cfg, [source.digest, model.base.digest, *augment_inputs(cfg.augment)])
    if (done := store.lookup(STEP, key)) is not None:
        return DatasetRef(**done.model_dump())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(store.download(model.base))
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
        log.info("tokenize: %s", stats)
        return DatasetRef(**writer.commit(stats=stats).model_dump())
    records = store.read_jsonl(source, RECORDS_FILE)
    sides = split_records(records, cfg)
    leaked = drop_leakage(sides, work)
    kind = source.stats["record_kind"]
    # Train records only, after the split and the leakage check (steps/augment.py).
    augmented = augment_train(cfg.augment, sides, kind) if cfg.augment is not None else None
    if kind == "text":
        splits, prompts, stats = pack_texts(tokenizer, sides, cfg)
    elif kind in ("classification", "regression"):
        splits, prompts, stats = encode_labelled(tokenizer, sides, cfg, kind)
    elif kind == "preference":
        splits, prompts, stats = encode_pairs(tokenizer, sides, cfg)
    else:
        splits, prompts, stats = encode_chats(tokenizer, sides, cfg)
    stats = {"task": TASKS[kind], **stats, "eval_leakage_removed": len(leaked), "leakage_checked_by": checked_by}
    if augmented is not None:
        stats["augmentation"] = augmented
    check_truncation(cfg, stats, len(records) + (augmented or {}).get("records_added", 0))
    check_both_splits(cfg, len(splits["train"]), len(splits["eval"]), len(records))
    writer = store.writer(STEP, key, cfg, inputs=[source, model.base])
    for side, rows in splits.items():
        writer.put_jsonl(f"{side}.jsonl", rows)
    writer.put_jsonl("eval_prompts.jsonl", prompts)
    log.info("tokenize: %s", stats)
    return DatasetRef(**writer.commit(stats=stats).model_dump())


def stream_chats(tokenizer: Any, source: DatasetRef, store: ArtifactStore, cfg: TokenizeConfig,
                 writer: Any) -> dict[str, Any]:
    """Chat records without augmentation, streamed in one pass: the same rows, prompts and stats
    as ``split_records`` + ``drop_leakage`` + ``encode_chats``, with memory for a few chunks plus
    the leakage index (a MinHash signature per train record) and the eval records' signatures.
    Each chunk is split, encoded and signed (``prepare_chats``, in worker processes for large
    inputs: steps/workers.py); train rows are written at once and indexed, eval rows wait in a
    local file until every train record is indexed, then those that copy one are dropped."""
    from steps.dedup import LeakageIndex

    leak = LeakageIndex(cfg.leakage_threshold, num_perm=LEAKAGE_PERMUTATIONS) if cfg.leakage_threshold is not None else None
    workers = worker_count(source.stats.get("records_out", 0))
    counts: Counter[str] = Counter()
    eval_ids: list[str] = []
    eval_sigs: list[Any] = []
    with writer.jsonl_file("train.jsonl") as train, tempfile.TemporaryFile("w+", encoding="utf-8") as spool:
        for chunk in _prepared_chats(tokenizer, source, store, cfg, workers):
            counts["records"] += chunk.records
            counts.update(chunk.train_counts)
            train.write_lines(chunk.train_lines)
            if leak is not None:
                leak.add_signatures(chunk.train_ids, chunk.train_sigs)
                eval_sigs.append(chunk.eval_sigs)
            eval_ids += chunk.eval_ids
            for entry in zip(chunk.eval_ids, chunk.eval_lines, chunk.eval_prompts, chunk.eval_truncated):
                spool.write(_spooled(*entry))
        pairs: list[tuple[str, str]] = []
        if leak is not None and eval_ids:
            import numpy as np

            sigs = np.concatenate(eval_sigs)
            for begin in range(0, len(eval_ids), CHUNK_RECORDS):
                pairs += leak.matches_signatures(eval_ids[begin:begin + CHUNK_RECORDS], sigs[begin:begin + CHUNK_RECORDS])
        if pairs:
            log.info("tokenize: %d eval records dropped as near copies of train records (e.g. %s ~ %s)",
                     len(pairs), *pairs[0])
        leaked = {eval_id for eval_id, _ in pairs}
        spool.seek(0)
        with writer.jsonl_file("eval.jsonl") as evals, writer.jsonl_file("eval_prompts.jsonl") as prompts:
            for entry in spool:
                record_id, line, prompt, truncated = _unspooled(entry)
                if record_id in leaked:
                    continue
                counts["truncated"] += truncated
                if line is None:
                    counts["dropped_no_answer"] += 1
                    continue
                evals.write_lines([line])
                prompts.write_lines([prompt])
            stats = {"task": TASKS["chat"], "train_records": train.rows, "eval_records": evals.rows,
                     "train_tokens": counts["train_tokens"], "trainable_tokens": counts["trainable_tokens"],
                     "truncated": counts["truncated"], "dropped_no_answer": counts["dropped_no_answer"],
                     "eval_leakage_removed": len(pairs)}
            check_truncation(cfg, stats, counts["records"])
            check_both_splits(cfg, stats["train_records"], stats["eval_records"], counts["records"])
    return stats


def _spooled(record_id: str, line: str | None, prompt: str | None, truncated: int) -> str:
    """One eval record in the spool file: tab-separated, the id JSON-quoted; the row and prompt
    are JSON lines (no raw tab or newline in them) or empty for None."""
    return f"{json.dumps(record_id, ensure_ascii=False)}\t{truncated}\t{line or ''}\t{prompt or ''}\n"


def _unspooled(entry: str) -> tuple[str, str | None, str | None, int]:
    record_id, truncated, line, prompt = entry.rstrip("\n").split("\t")
    return json.loads(record_id), line or None, prompt or None, int(truncated)


@dataclass
class PreparedChats:
    """One chunk of chat records split and encoded: train rows as JSON lines (dropped rows left
    out) with their counts, and per eval record its row and prompt lines (None: dropped, no
    answer token left) and whether it was truncated; MinHash signatures of both sides' records
    for the leakage check (None when it is off). Ids: every train and eval record of the chunk."""

    records: int
    train_ids: list[str]
    train_lines: list[str]
    train_counts: dict[str, int]
    eval_ids: list[str]
    eval_lines: list[str | None]
    eval_prompts: list[str | None]
    eval_truncated: list[int]
    train_sigs: Any
    eval_sigs: Any

    def to_bytes(self) -> bytes:
        lines = {k: getattr(self, k) for k in ("train_lines", "eval_lines", "eval_prompts")}
        head = {k: v for k, v in self.__dict__.items() if not k.endswith("_sigs") and k not in lines}
        signed = self.train_sigs is not None
        return pack(head | {"signed": signed}, [self.train_sigs, self.eval_sigs] if signed else [], lines)

    @classmethod
    def from_bytes(cls, data: bytes, num_perm: int) -> PreparedChats:
        head, sigs = unpack(data, num_perm or 1)
        n = len(head["train_ids"])
        signed = head.pop("signed")
        return cls(**head, train_sigs=sigs[:n] if signed else None, eval_sigs=sigs[n:] if signed else None)


def prepare_chats(tokenizer: Any, records: list[dict[str, Any]], cfg: TokenizeConfig, signer: Any
                  ) -> PreparedChats:
    """Split, encode and (with a ``signer``, ``NearDuplicates``) sign one chunk of chat records."""
    from steps.dedup import record_text

    sides = split_records(records, cfg)
    counts = Counter(train_tokens=0, trainable_tokens=0, truncated=0, dropped_no_answer=0)
    train_lines = []
    eval_lines: list[str | None] = []
    eval_prompts: list[str | None] = []
    eval_truncated: list[int] = []
    for side, rows in sides.items():
        for begin in range(0, len(rows), ENCODE_BATCH):  # a batch of encodings in memory at a time
            batch = rows[begin:begin + ENCODE_BATCH]
            for record, (ids, labels) in zip(batch, encode_chat_batch(tokenizer, [r["messages"] for r in batch])):
                row, truncated = chat_row(record, ids, labels, cfg)
                if side == "eval":
                    eval_truncated.append(int(truncated))
                    eval_lines.append(None if row is None else json.dumps(row, ensure_ascii=False))
                    eval_prompts.append(None if row is None else json.dumps(eval_prompt(record), ensure_ascii=False))
                    continue
                counts["truncated"] += truncated
                if row is None:
                    counts["dropped_no_answer"] += 1
                    continue
                counts["train_tokens"] += len(row["input_ids"])
                counts["trainable_tokens"] += len(row["labels"]) - row["labels"].count(IGNORE)
                train_lines.append(json.dumps(row, ensure_ascii=False))
    sigs = [signer.signatures([record_text(r) for r in sides[side]]) if signer is not None else None
            for side in ("train", "eval")]
    return PreparedChats(len(records), [r["id"] for r in sides["train"]], train_lines, dict(counts),
                         [r["id"] for r in sides["eval"]], eval_lines, eval_prompts, eval_truncated, *sigs)


def _signer(cfg: TokenizeConfig) -> Any:
    from steps.dedup import NearDuplicates

    return NearDuplicates(cfg.leakage_threshold, LEAKAGE_PERMUTATIONS) if cfg.leakage_threshold is not None else None


def _prepared_chats(tokenizer: Any, source: DatasetRef, store: ArtifactStore, cfg: TokenizeConfig, workers: int
                    ) -> Iterator[PreparedChats]:
    """``prepare_chats`` of each chunk, in order: here, or in ``workers`` worker processes."""
    signer = _signer(cfg)
    num_perm = signer.num_perm if signer is not None else 0
    progress = tqdm(desc="tokenize", unit="rec", mininterval=2)
    worker_config = worker_tokenizer(tokenizer) if workers else None
    size = balanced_chunk(source.stats.get("records_out", 0), CHUNK_RECORDS)
    if worker_config is not None:
        config = {"tokenize": cfg.model_dump(mode="json"), "tokenizer": worker_config}
        with ChunkWorkers("tokenize", config, workers) as pool:
            for answer in pool.map(store.iter_line_chunks(source, RECORDS_FILE, size)):
                chunk = PreparedChats.from_bytes(answer, num_perm)
                progress.update(chunk.records)
                yield chunk
    else:
        for records in store.iter_jsonl_chunks(source, RECORDS_FILE, size):
            chunk = prepare_chats(tokenizer, records, cfg, signer)
            progress.update(chunk.records)
            yield chunk
    progress.close()


def chunk_worker(config: dict[str, Any]) -> Callable[[bytes], bytes]:
    """The worker side (``steps/workers.py``): JSON lines of scrubbed chat records in, a
    ``PreparedChats`` out."""
    cfg = TokenizeConfig.model_validate(config["tokenize"])
    tokenizer = TemplateTokenizer(**config["tokenizer"])
    signer = _signer(cfg)

    def handle(chunk: bytes) -> bytes:
        records = [json.loads(line) for line in chunk.split(b"\n") if line]
        return prepare_chats(tokenizer, records, cfg, signer).to_bytes()

    return handle


class TemplateTokenizer:
    """The two parts of a transformers tokenizer that chat encoding uses, rebuilt from plain
    data: its Rust tokenizer (``backend_tokenizer``, from its JSON) and its chat template
    rendered as ``apply_chat_template(..., tokenize=False)`` renders it. A worker process
    builds this in well under a second instead of importing transformers' tokenizer classes;
    ``worker_tokenizer`` checks it against the real tokenizer before any worker starts."""

    def __init__(self, backend: str, chat_template: str, template_kwargs: dict[str, Any]):
        from tokenizers import Tokenizer

        self.backend_tokenizer = Tokenizer.from_str(backend)
        self.chat_template, self.template_kwargs = chat_template, template_kwargs

    @property
    def special_tokens_map(self) -> dict[str, Any]:
        return self.template_kwargs

    def get_chat_template(self) -> str:
        return self.chat_template

    @classmethod
    def config_of(cls, tokenizer: Any) -> dict[str, Any]:
        return {"backend": tokenizer.backend_tokenizer.to_str(), "chat_template": tokenizer.get_chat_template(),
                "template_kwargs": dict(tokenizer.special_tokens_map)}

    def apply_chat_template(self, conversation: list, tokenize: bool = False, add_generation_prompt: bool = False
                            ) -> str | list[str]:
        if tokenize:
            raise ValueError("TemplateTokenizer renders text only")
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        chats = [[{k: v for k, v in m.items() if v is not None} for m in chat]
                 for chat in (conversation if batched else [conversation])]
        plain = _plain_template(self.chat_template, frozenset(self.template_kwargs))
        if plain is not None:
            rendered = [plain.render(messages=chat, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self.template_kwargs)
                        for chat in chats]
        else:
            from transformers.utils.chat_template_utils import render_jinja_template

            rendered, _ = render_jinja_template(conversations=chats, chat_template=self.chat_template,
                                                add_generation_prompt=add_generation_prompt, **self.template_kwargs)
        return rendered if batched else rendered[0]


@functools.lru_cache(maxsize=16)
def _plain_template(template: str, token_names: frozenset[str]) -> Any:
    """A content-transparent template (``_template_is_transparent``) compiled in a sandboxed
    Jinja environment set up as transformers sets up its own (``trim_blocks``, ``lstrip_blocks``,
    loop controls, ``raise_exception``), or None. Such a template calls nothing but
    ``raise_exception`` and reads only messages' roles and contents, the loop and special tokens,
    so transformers' other globals and its message preprocessing cannot change its output; its
    ``tojson`` filter differs from Jinja's, so a template using it gets None. This spares a worker
    process the import of transformers (~1 s); ``worker_tokenizer`` still compares renderings with
    the real tokenizer's before any worker starts."""
    try:
        if not _cached_transparent(template, token_names):
            return None
        import jinja2
        from jinja2 import nodes
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        if any(f.name == "tojson" for f in env.parse(template).find_all(nodes.Filter)):
            return None

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        return env.from_string(template)
    except Exception:  # noqa: BLE001 - rendered by transformers instead
        return None


# Conversations the worker tokenizer must render and encode exactly as the real one does.
_PROBES = [[{"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": "Hello, 안녕하세요.\n"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " a\tb "},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more?"},
            {"role": "assistant", "content": "<no>"}]]


def worker_tokenizer(tokenizer: Any) -> dict[str, Any] | None:
    """``TemplateTokenizer.config_of(tokenizer)`` when the rebuilt tokenizer renders and encodes the
    probe conversations exactly as ``tokenizer`` does; None (no workers) otherwise."""
    try:
        config = TemplateTokenizer.config_of(tokenizer)
        rebuilt = TemplateTokenizer(**config)
        for chat in _PROBES:
            for cut in range(1, len(chat) + 1):
                for prompt in (False, True):
                    text = tokenizer.apply_chat_template(chat[:cut], tokenize=False, add_generation_prompt=prompt)
                    if rebuilt.apply_chat_template(chat[:cut], add_generation_prompt=prompt) != text:
                        return None
                    if rebuilt.backend_tokenizer.encode(text, add_special_tokens=False).ids != \
                            tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids:
                        return None
        return config
    except Exception:  # noqa: BLE001 - any difference means: encode in this process
        log.info("tokenize: the chat template cannot be rebuilt for worker processes; encoding here")
        return None


def leakage_checked_by(cfg: TokenizeConfig, source: DatasetRef, store: ArtifactStore) -> str | None:
    """Which step rules out train/eval leakage: "scrub" when the records come from a scrub whose
    exact and near dedup ran at the leakage threshold with the same MinHash signatures (then no
    two kept records reach the threshold: the later one of any such pair was checked against
    the earlier one, which was indexed, under the same LSH bands, and dropped), "tokenize"
    when this step has to check, None when the check is off."""
    if cfg.leakage_threshold is None:
        return None
    manifest = store.manifest(source.key)
    scrub = manifest.get("config") or {}
    covered = (manifest.get("step") == "scrub" and scrub.get("dedup") is True and scrub.get("near_dedup") is True
               and scrub.get("near_threshold") == cfg.leakage_threshold
               and scrub.get("minhash_permutations") == LEAKAGE_PERMUTATIONS)
    return "scrub" if covered else "tokenize"


def check_both_splits(cfg: TokenizeConfig, train: int, evals: int, records: int) -> None:
    if not train or not evals:
        raise DataQualityError(
            f"tokenize: rule 'both splits non-empty': {train} train and {evals} eval "
            f"rows from {records} records (eval_fraction={cfg.eval_fraction}, max_seq_len={cfg.max_seq_len}); "
            "add records or change the fraction"
        )


def drop_leakage(sides: dict[str, list[dict[str, Any]]], cfg: TokenizeConfig) -> list[tuple[str, str]]:
    """Remove eval records that nearly copy a train record; returns the (eval id, train id) pairs."""
    if cfg.leakage_threshold is None or not sides["eval"]:
        return []
    from steps.dedup import leakage, record_text

    pairs = leakage([(r["id"], record_text(r)) for r in sides["train"]],
                    [(r["id"], record_text(r)) for r in sides["eval"]], threshold=cfg.leakage_threshold,
                    num_perm=LEAKAGE_PERMUTATIONS)
    if pairs:
        gone = {eval_id for eval_id, _ in pairs}
        sides["eval"] = [r for r in sides["eval"] if r["id"] not in gone]
        log.info("tokenize: %d eval records dropped as near copies of train records (e.g. %s ~ %s)",
                 len(pairs), *pairs[0])
    return pairs


def check_truncation(cfg: TokenizeConfig, stats: dict[str, Any], records: int) -> None:
    """The truncation-rate gate: too many records cut at max_seq_len means the length is wrong for the data."""
    share = stats.get("truncated", 0) / max(records, 1)
    stats["truncated_share"] = round(share, 4)
    if share > cfg.max_truncated_share:
        raise DataQualityError(
            f"tokenize: rule 'truncated share at most {cfg.max_truncated_share:.0%}': {stats['truncated']} of "
            f"{records} records ({share:.1%}) are longer than max_seq_len={cfg.max_seq_len} tokens; raise "
            "tokenize.max_seq_len or the gate"
        )


def split_records(records: list[dict[str, Any]], cfg: TokenizeConfig) -> dict[str, list[dict[str, Any]]]:
    sides: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
    for record in records:
        sides["eval" if in_eval(record["id"], cfg) else "train"].append(record)
    return sides


def encode_chats(tokenizer: Any, sides: dict[str, list[dict]], cfg: TokenizeConfig
                 ) -> tuple[dict[str, list[dict]], list[dict], dict[str, Any]]:
    """One labelled row per conversation (truncated to max_seq_len), eval prompts and stats."""
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
    prompts: list[dict[str, Any]] = []
    truncated = dropped = 0
    for side, records in sides.items():
        progress = tqdm(total=len(records), desc=f"tokenize {side}", unit="rec", mininterval=2)
        for start in range(0, len(records), ENCODE_BATCH):
            batch = records[start:start + ENCODE_BATCH]
            for record, (ids, labels) in zip(batch, encode_chat_batch(tokenizer, [r["messages"] for r in batch])):
                truncated, dropped = _add_chat_row(splits[side], prompts if side == "eval" else None,
                                                   record, ids, labels, cfg, truncated, dropped)
            progress.update(len(batch))
        progress.close()
    stats = {
        "train_records": len(splits["train"]),
        "eval_records": len(splits["eval"]),
        "train_tokens": sum(len(r["input_ids"]) for r in splits["train"]),
        "trainable_tokens": sum(len(r["labels"]) - r["labels"].count(IGNORE) for r in splits["train"]),
        "truncated": truncated,
        "dropped_no_answer": dropped,
    }
    return splits, prompts, stats


def _add_chat_row(rows: list[dict[str, Any]], prompts: list[dict[str, Any]] | None, record: dict[str, Any],
                  ids: list[int], labels: list[int], cfg: TokenizeConfig, truncated: int, dropped: int
                  ) -> tuple[int, int]:
    """Append one encoded conversation (``chat_row``) and, for eval, its prompt; returns the
    updated truncated and dropped counts."""
    row, cut = chat_row(record, ids, labels, cfg)
    if row is None:
        return truncated + cut, dropped + 1
    rows.append(row)
    if prompts is not None:
        prompts.append(eval_prompt(record))
    return truncated + cut, dropped


def chat_row(record: dict[str, Any], ids: list[int], labels: list[int], cfg: TokenizeConfig
             ) -> tuple[dict[str, Any] | None, bool]:
    """The row of one encoded conversation truncated to max_seq_len (None when truncation left no
    answer token), and whether it was truncated."""
    truncated = len(ids) > cfg.max_seq_len
    if truncated:
        ids, labels = ids[: cfg.max_seq_len], labels[: cfg.max_seq_len]
    if labels.count(IGNORE) == len(labels):
        return None, truncated
    return {"id": record["id"], "input_ids": ids, "labels": labels}, truncated


def eval_prompt(record: dict[str, Any]) -> dict[str, Any]:
    """An eval conversation's prompt messages and reference answer (for BLEU)."""
    return {"id": record["id"], "messages": record["messages"][:-1], "reference": record["messages"][-1]["content"]}


def encode_labelled(tokenizer: Any, sides: dict[str, list[dict]], cfg: TokenizeConfig, kind: str
                    ) -> tuple[dict[str, list[dict]], list[dict], dict[str, Any]]:
    """One row per text with its label index (classification) or value (regression)."""
    labels = sorted({r["label"] for records in sides.values() for r in records}) if kind == "classification" else []
    index = {label: i for i, label in enumerate(labels)}
    splits: dict[str, list[dict[str, Any]]] = {}
    truncated = 0
    for side, records in sides.items():
        rows = []
        for record in tqdm(records, desc=f"tokenize {side}", unit="rec", mininterval=2):
            ids = tokenizer(record["text"], verbose=False)["input_ids"]
            if len(ids) > cfg.max_seq_len:
                truncated += 1
                ids = ids[: cfg.max_seq_len - 1] + ids[-1:]  # keep the closing special token ([SEP])
            label = index[record["label"]] if kind == "classification" else float(record["label"])
            rows.append({"id": record["id"], "input_ids": ids, "label": label})
        splits[side] = rows
    stats: dict[str, Any] = {
        "train_records": len(splits["train"]), "eval_records": len(splits["eval"]),
        "train_tokens": sum(len(r["input_ids"]) for r in splits["train"]), "truncated": truncated,
    }
    if kind == "classification":
        stats["labels"] = labels
        for side, rows in splits.items():
            counts = {label: 0 for label in labels}
            for r in rows:
                counts[labels[r["label"]]] += 1
            stats[f"{side}_label_counts"] = counts
    return splits, [], stats


def encode_pairs(tokenizer: Any, sides: dict[str, list[dict]], cfg: TokenizeConfig
                 ) -> tuple[dict[str, list[dict]], list[dict], dict[str, Any]]:
    """Chosen and rejected conversations per pair, prompt-masked and truncated."""
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
    prompts: list[dict[str, Any]] = []
    truncated = dropped = 0
    for side, records in sides.items():
        for record in tqdm(records, desc=f"tokenize {side}", unit="pair", mininterval=2):
            prompt = [{"role": "user", "content": record["prompt"]}]
            encoded = []
            for answer in (record["chosen"], record["rejected"]):
                ids, labels = encode_chat(tokenizer, prompt + [{"role": "assistant", "content": answer}])
                if len(ids) > cfg.max_seq_len:
                    truncated += 1
                    ids, labels = ids[: cfg.max_seq_len], labels[: cfg.max_seq_len]
                encoded.append((ids, labels))
            if any(all(label == IGNORE for label in labels) for _, labels in encoded):
                dropped += 1
                continue
            (chosen, chosen_labels), (rejected, rejected_labels) = encoded
            splits[side].append({"id": record["id"], "input_ids": chosen, "labels": chosen_labels,
                                 "rejected_ids": rejected, "rejected_labels": rejected_labels})
            if side == "eval":
                prompts.append({"id": record["id"], "messages": prompt, "reference": record["chosen"]})
    stats = {
        "train_records": len(splits["train"]), "eval_records": len(splits["eval"]),
        "train_tokens": sum(len(r["input_ids"]) + len(r["rejected_ids"]) for r in splits["train"]),
        "truncated": truncated, "dropped_no_answer": dropped,
    }
    return splits, prompts, stats


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels that keep only assistant turns.

    The template must render each conversation prefix as a prefix of the whole; an
    assistant turn is the text between the prompt (with generation header) and the end
    of that turn, including its end-of-turn token.
    """
    return encode_chat_batch(tokenizer, [messages])[0]


def encode_chat_batch(tokenizer: Any, conversations: list[list[dict[str, str]]]
                      ) -> list[tuple[list[int], list[int]]]:
    """``encode_chat`` for many conversations: the texts are tokenized in one batch call (the
    fast tokenizer's threads), and the prompt/turn prefixes that locate the assistant spans
    come from one rendering per role sequence with placeholder contents (``_ChatLayout``)
    instead of two template renderings per assistant turn."""
    layouts: dict[tuple[str, ...], _ChatLayout] = {}
    texts: list[str] = []
    all_spans: list[list[tuple[int, int]]] = []
    # A content-transparent template (``_transparent``) renders a conversation as its layout with
    # the contents filled in: no template run for it. Other conversations are rendered in one call.
    transparent = _transparent(tokenizer)
    plans: list[tuple[_ChatLayout | None, bool]] = []  # per conversation: its layout, and whether to fill it
    for messages in conversations:
        layout = None
        if _ChatLayout.applies(messages):
            roles = tuple(m["role"] for m in messages)
            layout = layouts.get(roles) or layouts.setdefault(roles, _ChatLayout(tokenizer, roles))
        plans.append((layout, transparent and layout is not None and layout.verified))
    rest = [messages for messages, (_, fill) in zip(conversations, plans) if not fill]
    rendered = iter(tokenizer.apply_chat_template(rest, tokenize=False) if rest else [])
    for messages, (layout, fill) in zip(conversations, plans):
        contents = [m["content"] for m in messages] if layout is not None else []
        text = layout.fill(contents) if fill else next(rendered)
        spans = layout.spans(text, contents) if layout is not None else None
        texts.append(text)
        all_spans.append(spans if spans is not None else _rendered_spans(tokenizer, messages, text))
    results: list[tuple[list[int], list[int]] | None] = [None] * len(texts)
    if (encoder := pretoken_encoder(tokenizer)) is not None:  # steps/pretokens.py: same ids, cached pre-tokens
        for k, (text, spans) in enumerate(zip(texts, all_spans)):
            bounds = sorted({bound for span in spans for bound in span})
            if (encoded := encoder.encode(text, bounds)) is not None:
                ids, at = encoded
                token_at = dict(zip(bounds, at))
                labels = [IGNORE] * len(ids)
                for start, end in spans:
                    first, stop = token_at[start], token_at[end]
                    labels[first:stop] = ids[first:stop]
                results[k] = (ids, labels)
    rest = [k for k, result in enumerate(results) if result is None]
    if rest:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:  # the Rust tokenizer directly: its ids and offsets, without per-row conversion
            encodings = backend.encode_batch([texts[k] for k in rest], add_special_tokens=False)
            pairs = [(e.ids, e.offsets) for e in encodings]
        else:
            encoded = tokenizer([texts[k] for k in rest], add_special_tokens=False, return_offsets_mapping=True)
            pairs = list(zip(encoded["input_ids"], encoded["offset_mapping"]))
        for k, (ids, offsets) in zip(rest, pairs):
            results[k] = (list(ids), _labels(ids, offsets, all_spans[k]))
    return results  # type: ignore[return-value]


_ENCODERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def pretoken_encoder(tokenizer: Any) -> Any:
    """The tokenizer's ``PretokenEncoder`` (steps/pretokens.py), built once per tokenizer object
    and process, or None (then the Rust tokenizer encodes every text)."""
    try:
        if tokenizer not in _ENCODERS:
            from steps.pretokens import PretokenEncoder

            backend = getattr(tokenizer, "backend_tokenizer", None)
            _ENCODERS[tokenizer] = PretokenEncoder.of(backend) if backend is not None else None
        return _ENCODERS[tokenizer]
    except TypeError:  # not weak-referenceable
        return None


def _labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """The token ids whose text starts inside an assistant span; IGNORE elsewhere."""
    begins = [begin for begin, _ in offsets]
    if begins != sorted(begins):  # token starts out of order: test each token against each span
        return [token if any(start <= begin < end for start, end in spans) else IGNORE
                for token, begin in zip(ids, begins)]
    labels = [IGNORE] * len(ids)
    for start, end in spans:  # the tokens starting in [start, end) are one run
        first, stop = bisect.bisect_left(begins, start), bisect.bisect_left(begins, end)
        labels[first:stop] = ids[first:stop]
    return labels


def _rendered_spans(tokenizer: Any, messages: list[dict[str, str]], text: str) -> list[tuple[int, int]]:
    """(start, end) of each assistant turn in ``text``, from renderings of the conversation's prefixes."""
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        turn = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False).rstrip("\n")
        spans.append(_span(prompt, turn, text))
    return spans


def _span(prompt: str, turn: str, text: str) -> tuple[int, int]:
    if not (turn.startswith(prompt) and text.startswith(turn)):
        raise ConfigError("the chat template does not render conversation prefixes as prefixes; cannot mask prompts")
    return len(prompt), len(turn)


_MARK = re.compile("\ue000(\\d+)\ue001")  # a placeholder content: private-use characters around an index


class _ChatLayout:
    """A chat template rendered once for one sequence of roles, with placeholder contents: the
    full conversation, and per assistant turn its prompt (with generation header) and the
    turn itself, as literal pieces and content indices. Filling in a conversation's contents
    gives its prefixes without running the template again; ``spans`` uses that only when the
    filled-in full text equals the real rendering (else None: render the prefixes)."""

    def __init__(self, tokenizer: Any, roles: tuple[str, ...]):
        marked = [{"role": role, "content": f"\ue000{i}\ue001"} for i, role in enumerate(roles)]
        self.full = self._pieces(tokenizer.apply_chat_template(marked, tokenize=False))
        self.turns = [(self._pieces(tokenizer.apply_chat_template(marked[:i], tokenize=False,
                                                                  add_generation_prompt=True)),
                       self._pieces(tokenizer.apply_chat_template(marked[: i + 1], tokenize=False)))
                      for i, role in enumerate(roles) if role == "assistant"]
        # The fill equals real renderings of probe contents (spaces at the ends, markup, quotes,
        # newlines, Korean): the last guard before ``fill`` stands in for the template.
        self.verified = all(
            self.fill(contents) == tokenizer.apply_chat_template(
                [{"role": role, "content": c} for role, c in zip(roles, contents)], tokenize=False)
            for contents in ([f" <{i}> & 'x' \"y\"\n\n" for i in range(len(roles))],
                             [f"안녕 {{{{ {i} }}}}\t" for i in range(len(roles))]))

    def fill(self, contents: list[str]) -> str:
        """The full conversation's text with these contents."""
        return self._fill(self.full, contents)

    @staticmethod
    def applies(messages: list[dict[str, str]]) -> bool:
        """Only role and content, and no content holding the placeholder characters."""
        return all(m.keys() <= {"role", "content"} and isinstance(m.get("content"), str)
                   and "\ue000" not in m["content"] and "\ue001" not in m["content"] for m in messages)

    @staticmethod
    def _pieces(rendered: str) -> list[str | int]:
        parts = _MARK.split(rendered)
        return [int(part) if i % 2 else part for i, part in enumerate(parts)]

    @staticmethod
    def _fill(pieces: list[str | int], contents: list[str]) -> str:
        return "".join(contents[p] if isinstance(p, int) else p for p in pieces)

    def spans(self, text: str, contents: list[str]) -> list[tuple[int, int]] | None:
        if self._fill(self.full, contents) != text:
            return None
        return [_span(self._fill(prompt, contents), self._fill(turn, contents).rstrip("\n"), text)
                for prompt, turn in self.turns]


# The only names a content-transparent template may read, besides special tokens and the
# message loop variables: everything else could carry content somewhere (see ``_transparent``).
_SAFE_NAMES = {"messages", "loop", "add_generation_prompt", "raise_exception"}
_MESSAGE_KEYS = {"role", "content"}


def _transparent(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template copies each message's content verbatim into its
    output and lets nothing else depend on it: then the rendering of a conversation is its
    role sequence's layout with the contents filled in, whatever they hold.

    Checked on the template's syntax tree, by a whitelist (anything else: False, and every
    conversation is rendered): no assignments, macros, includes or calls (but
    ``raise_exception``); loops only over ``messages`` itself; a message read only as
    ``message['role']`` or ``message['content']`` (also ``messages[<int>][...]``),
    ``messages`` otherwise only looped over or measured (``| length``); and every
    content read sits in an output expression made only of ``+`` and ``~``, so no test,
    filter or comparison ever sees it. Names read must be those, the loop variables or
    special tokens. A Jinja template that breaks none of these cannot branch on a content."""
    try:
        return _cached_transparent(tokenizer.get_chat_template(), frozenset(tokenizer.special_tokens_map))
    except Exception:  # noqa: BLE001 - a template we cannot analyse is rendered per conversation
        return False


def _template_is_transparent(template: str, token_names: Iterable[str]) -> bool:
    import jinja2
    from jinja2 import nodes

    tree = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    parents: dict[int, nodes.Node] = {}
    for node in tree.find_all(nodes.Node):
        for child in node.iter_child_nodes():
            parents[id(child)] = node
    loop_vars = set()
    for loop in tree.find_all(nodes.For):
        if not (isinstance(loop.iter, nodes.Name) and loop.iter.name == "messages"
                and isinstance(loop.target, nodes.Name) and loop.recursive is False):
            return False
        loop_vars.add(loop.target.name)
    forbidden = (nodes.Assign, nodes.AssignBlock, nodes.Macro, nodes.CallBlock, nodes.FilterBlock, nodes.Include,
                 nodes.Import, nodes.FromImport, nodes.Scope, nodes.With, nodes.Block, nodes.Extends)
    if any(True for _ in tree.find_all(forbidden)):
        return False
    for call in tree.find_all(nodes.Call):
        if not (isinstance(call.node, nodes.Name) and call.node.name == "raise_exception"):
            return False
    allowed = _SAFE_NAMES | loop_vars | set(token_names)

    def key_of(node: nodes.Node) -> Any:
        if isinstance(node, nodes.Getattr):
            return node.attr
        if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            return node.arg.value
        return None

    for name in tree.find_all(nodes.Name):
        if name.ctx != "load":
            continue
        if name.name not in allowed:
            return False
        parent = parents.get(id(name))
        if name.name in loop_vars:
            if not (isinstance(parent, (nodes.Getitem, nodes.Getattr)) and parent.node is name
                    and key_of(parent) in _MESSAGE_KEYS):
                return False
        elif name.name == "messages":
            if isinstance(parent, nodes.For) and parent.iter is name:
                continue
            if isinstance(parent, nodes.Filter) and parent.name == "length" and parent.node is name:
                continue
            if not (isinstance(parent, nodes.Getitem) and parent.node is name and isinstance(key_of(parent), int)):
                return False
            grand = parents.get(id(parent))
            if not (isinstance(grand, (nodes.Getitem, nodes.Getattr)) and grand.node is parent
                    and key_of(grand) in _MESSAGE_KEYS):
                return False
    for node in tree.find_all((nodes.Getitem, nodes.Getattr, nodes.Const)):
        if isinstance(node, nodes.Const):
            if node.value == "content" and not isinstance(parents.get(id(node)), nodes.Getitem):
                return False  # "content" as a filter argument, a dict key, ...
            continue
        if key_of(node) != "content":
            continue
        child, parent = node, parents.get(id(node))
        while isinstance(parent, (nodes.Add, nodes.Concat)):
            child, parent = parent, parents.get(id(parent))
        if not isinstance(parent, nodes.Output):
            return False
    return True


_cached_transparent = functools.lru_cache(maxsize=16)(_template_is_transparent)  # one analysis per template


def pack_texts(tokenizer: Any, sides: dict[str, list[dict]], cfg: TokenizeConfig
               ) -> tuple[dict[str, list[dict]], list[dict], dict[str, Any]]:
    """Blocks of exactly max_seq_len tokens per side (labels = input_ids), no eval prompts, and stats."""
    if tokenizer.eos_token_id is None:
        raise ConfigError("the base model's tokenizer has no EOS token to separate packed documents")
    splits: dict[str, list[dict[str, Any]]] = {}
    stats: dict[str, Any] = {}
    dropped = 0
    for side, records in sides.items():
        stream = token_stream(tokenizer, [r["text"] for r in records], desc=f"tokenize {side}")
        blocks = len(stream) // cfg.max_seq_len
        dropped += len(stream) - blocks * cfg.max_seq_len
        rows = []
        for n in range(blocks):
            ids = stream[n * cfg.max_seq_len : (n + 1) * cfg.max_seq_len]
            rows.append({"id": f"block-{n}", "input_ids": ids, "labels": ids})
        splits[side] = rows
        stats |= {f"{side}_documents": len(records), f"{side}_records": blocks,
                  f"{side}_tokens": blocks * cfg.max_seq_len}
    return splits, [], stats | {"dropped_tail_tokens": dropped}


def token_stream(tokenizer: Any, texts: list[str], desc: str) -> list[int]:
    """The texts' token ids, without special tokens, joined by the EOS token."""
    stream: list[int] = []
    for i, text in enumerate(tqdm(texts, desc=desc, unit="doc", mininterval=2)):
        if i:
            stream.append(tokenizer.eos_token_id)
        # verbose=False: documents are longer than the model's context on purpose; they are cut into blocks.
        stream += tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return stream


def in_eval(record_id: str, cfg: TokenizeConfig) -> bool:
    h = hashlib.sha256(f"{cfg.seed}:{record_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < cfg.eval_fraction


def split_summary(stats: dict) -> str:
    """Chat records are truncated rows; text records are packed into blocks; augmented copies are counted."""
    added = f" (incl. {stats['augmentation']['records_added']} augmented)" if "augmentation" in stats else ""
    if "train_documents" in stats:
        return (f"{stats.get('train_documents')}{added} train / {stats.get('eval_documents')} eval documents packed "
                f"into {stats.get('train_records')} / {stats.get('eval_records')} blocks")
    return (f"{stats.get('train_records')}{added} train / {stats.get('eval_records')} eval records, "
            f"{stats.get('truncated')} truncated")
