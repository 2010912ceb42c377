"""Chat records streamed through tokenize in one pass (no augmentation): chunks of ``CHUNK_RECORDS``
split, encoded and MinHash-signed here or in worker processes (``chunk_worker``,
steps/core/workers.py), train rows written at once, eval rows spooled until every train record is
indexed for the leakage check. The same rows, prompts and stats as the in-memory path.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from steps.config import TASKS, TokenizeConfig
from steps.core.contract import IGNORE, RECORDS_FILE
from steps.core.progress import progress as tqdm
from steps.core.store import ArtifactStore, DatasetRef
from steps.core.workers import ChunkWorkers, balanced_chunk, pack, unpack, worker_count
from steps.tokenize.encode import ENCODE_BATCH, LONG_OUTCOMES, chat_rows, encode_chat_batch
from steps.tokenize.split import (
    LEAKAGE_PERMUTATIONS,
    check_both_splits,
    check_truncation,
    pinned_counts,
    pinned_stats,
    split_records,
)
from steps.tokenize.template import TemplateTokenizer, worker_tokenizer

log = logging.getLogger(__name__)


CHUNK_RECORDS = 10_000  # chat records per chunk of the stream

def stream_chats(tokenizer: Any, source: DatasetRef, store: ArtifactStore, cfg: TokenizeConfig,
                 writer: Any) -> dict[str, Any]:
    """Chat records without augmentation, streamed in one pass: the same rows, prompts and stats
    as ``split_records`` + ``drop_leakage`` + ``encode_chats``, with memory for a few chunks plus
    the leakage index (a MinHash signature per train record) and the eval records' signatures.
    Each chunk is split, encoded and signed (``prepare_chats``, in worker processes for large
    inputs: steps/core/workers.py); train rows are written at once and indexed, eval rows wait in a
    local file until every train record is indexed, then those that copy one are dropped."""
    from steps.text.dedup import LeakageIndex

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
            for entry in zip(chunk.eval_ids, chunk.eval_outcomes, chunk.eval_prompts, chunk.eval_lines):
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
                record_id, outcome, prompt, lines = _unspooled(entry)
                if record_id in leaked:
                    continue
                counts.update(outcome.split(",") if outcome else [])
                evals.write_lines(lines)
                if prompt is not None:
                    prompts.write_lines([prompt])
            stats = {"task": TASKS["chat"], "train_records": train.rows, "eval_records": evals.rows,
                     "train_tokens": counts["train_tokens"], "trainable_tokens": counts["trainable_tokens"],
                     **{outcome: counts[outcome] for outcome in LONG_OUTCOMES}, **pinned_stats(counts),
                     "eval_leakage_removed": len(pairs)}
            check_truncation(cfg, stats, counts["records"])
            check_both_splits(cfg, stats["train_records"], stats["eval_records"], counts["records"])
    return stats

def _spooled(record_id: str, outcome: str, prompt: str | None, lines: str | None) -> str:
    """One eval record in the spool file: tab-separated, the id JSON-quoted, its outcomes (comma-separated), its prompt
    (empty for None) and its rows, JSON lines (no raw tab or newline in them)."""
    return "\t".join([json.dumps(record_id, ensure_ascii=False), outcome, prompt or "", lines or ""]) + "\n"

def _unspooled(entry: str) -> tuple[str, str, str | None, list[str]]:
    record_id, outcome, prompt, *lines = entry.rstrip("\n").split("\t")
    return json.loads(record_id), outcome, prompt or None, [line for line in lines if line]

@dataclass
class PreparedChats:
    """One chunk of chat records split and encoded: train rows as JSON lines (dropped rows left
    out) with their counts (tokens, and the outcomes of ``chat_rows``), and per eval record its
    outcomes (comma-separated), prompt line (None: dropped) and row lines; MinHash signatures of both sides' records
    for the leakage check (None when it is off). Ids: every train and eval record of the chunk."""

    records: int
    train_ids: list[str]
    train_lines: list[str]
    train_counts: dict[str, int]
    eval_ids: list[str]
    eval_outcomes: list[str]
    eval_prompts: list[str | None]
    eval_lines: list[str | None]  # a record's rows joined by tabs (none in a JSON line); None: no rows
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
    from steps.text.dedup import record_text

    sides = split_records(records, cfg)
    counts = Counter(train_tokens=0, trainable_tokens=0, **dict.fromkeys(LONG_OUTCOMES, 0), **pinned_counts(sides))
    train_lines = []
    eval_outcomes: list[str] = []
    eval_prompts: list[str | None] = []
    eval_lines: list[str | None] = []
    for side, rows in sides.items():
        for begin in range(0, len(rows), ENCODE_BATCH):  # a batch of encodings in memory at a time
            batch = rows[begin:begin + ENCODE_BATCH]
            for record, (ids, labels) in zip(batch, encode_chat_batch(tokenizer, [r["messages"] for r in batch])):
                result = chat_rows(tokenizer, record, ids, labels, cfg)
                lines = [json.dumps(row, ensure_ascii=False) for row in result.rows]
                if side == "eval":
                    eval_outcomes.append(",".join(result.outcomes))
                    eval_prompts.append(None if result.prompt is None else json.dumps(result.prompt, ensure_ascii=False))
                    eval_lines.append("\t".join(lines) or None)
                    continue
                counts.update(result.outcomes)
                for row in result.rows:
                    counts["train_tokens"] += len(row["input_ids"])
                    counts["trainable_tokens"] += len(row["labels"]) - row["labels"].count(IGNORE)
                train_lines += lines
    sigs = [signer.signatures([record_text(r) for r in sides[side]]) if signer is not None else None
            for side in ("train", "eval")]
    return PreparedChats(len(records), [r["id"] for r in sides["train"]], train_lines, dict(counts),
                         [r["id"] for r in sides["eval"]], eval_outcomes, eval_prompts, eval_lines, *sigs)

def _signer(cfg: TokenizeConfig) -> Any:
    from steps.text.dedup import NearDuplicates

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
    """The worker side (``steps/core/workers.py``): JSON lines of scrubbed chat records in, a
    ``PreparedChats`` out."""
    cfg = TokenizeConfig.model_validate(config["tokenize"])
    tokenizer = TemplateTokenizer(**config["tokenizer"])
    signer = _signer(cfg)

    def handle(chunk: bytes) -> bytes:
        records = [json.loads(line) for line in chunk.split(b"\n") if line]
        return prepare_chats(tokenizer, records, cfg, signer).to_bytes()

    return handle
