"""Scrub: normalize text, replace PII, drop exact and near duplicates.

Every message's content (chat records), the text (text, classification and regression
records) or the prompt, chosen and rejected answers (preference records) are
NFKC-normalized (control characters removed, whitespace collapsed, 3+ newlines become
2), then PII (``steps/text/pii.py``: email, phone, card, Korean RRN, US SSN, IP, URL
credentials, secrets) is replaced as ``pii_action``/``pii_actions`` say: typed
placeholders (``<EMAIL>``), salted hashes (salt from ``TUNELINE_PII_SALT``) or masks.
Labels pass through unchanged.

Records whose normalized, scrubbed content repeats an earlier record are dropped: the
messages (chat), the text (text), all three fields (preference), and for classification
and regression the text alone, so the same text with another label keeps the first
label; such repeats are counted as ``label_conflicts`` (also with ``dedup`` off). The
manifest carries per-entity counts and the number of duplicates removed, never the
values; ``record_kind`` passes through from validate, and classification records get
the class balance ``label_counts`` of the kept records.

Near duplicates (``near_dedup``): a record whose MinHash-estimated Jaccard similarity with
an earlier kept record reaches ``near_threshold`` is dropped too (``steps/text/dedup.py``,
character 5-grams, so Korean works); ``near_duplicates_removed`` in the stats and
``dedup_report.json`` (cluster sizes and example ids, never text) in the artifact.

Streaming: records are read from S3 in chunks of ``CHUNK_RECORDS``; each chunk's texts are
normalized and redacted as one batch and its near duplicates checked as one batch, with the
same result as record by record; kept records go to a local file that is uploaded at the
end. Memory holds a few chunks plus the dedup state (an 8-byte key per kept record and the
MinHash index), whatever the file size. Large inputs are normalized, redacted and signed
by worker processes, one per core (``TUNELINE_DATA_WORKERS``, steps/core/workers.py), while this
process deduplicates in order: the output is byte-identical with any number of workers.

Two gates stop the run before anything is written (``DataQualityError`` naming the file,
the rule, the count and example record ids -- ``line-<n>`` when the records have no id):
more than ``max_duplicate_share`` of the records removed as duplicates (a file of copies),
or more than ``max_pii_only_share`` of the records nothing but PII (no letter left once
PII is replaced). Within the share, PII-only records are dropped and listed in
``quarantine.jsonl`` (their scrubbed ids and the rule, never contents), counted as
``pii_only_records`` and ``quarantined`` in the stats, the summary and the model card.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from steps.config import ScrubConfig
from steps.core.contract import RECORDS_FILE
from steps.core.errors import DataQualityError
from steps.core.lineage import run_key
from steps.core.records import QUARANTINE_FILE, record_form, validated_lines, validated_records
from steps.core.store import ArtifactStore, DatasetRef
from steps.core.workers import ChunkWorkers, balanced_chunk, batches, pack, unpack, worker_count
from steps.text.dedup import NearDuplicates, SortedRuns, record_text
from steps.text.normalize import normalize_text
from steps.text.pii import PiiEngine

log = logging.getLogger(__name__)

STEP = "scrub"
LABELED_KINDS = {"classification", "regression"}
EXAMPLES = 5
CHUNK_RECORDS = 10_000  # records per chunk of the stream
# The text fields scrubbed per kind (chat records: every message's content).
_TEXT_FIELDS = {"text": ("text",), "classification": ("text",), "regression": ("text",),
                "preference": ("prompt", "chosen", "rejected"), "prompt": ("prompt",), "seq2seq": ("input", "target")}
# What a replaced value becomes under the placeholder and hash actions (masks keep no letters).
PLACEHOLDER = re.compile(r"<[A-Z_]+(?::[0-9a-f]{12})?>")


def scrub_records(cfg: ScrubConfig, source: DatasetRef, store: ArtifactStore) -> DatasetRef:
    """Normalize, replace PII and drop exact and near duplicates of the validated records ``source``.

    Writes ``records.jsonl``, ``dedup_report.json`` (near-duplicate clusters, ids only) and, when
    records are nothing but PII, ``quarantine.jsonl`` (their ids and the rule); the stats count
    records in and out, duplicates, quarantined records and PII by entity. Raises ``DataQualityError`` before writing
    anything when duplicates or PII-only records exceed ``max_duplicate_share`` / ``max_pii_only_share``.
    """
    engine = _engine(cfg)
    # A hash action's output depends on the salt: its (non-reversible) id is part of the cache key.
    key = run_key(STEP, cfg, [source.digest] + ([engine.salt_id] if engine.salt_id else []))
    if (done := store.lookup(STEP, key)) is not None:
        return DatasetRef(**done.model_dump())
    kind = source.stats["record_kind"]
    near = _near(cfg)
    tally = _Tally(kind)
    writer = store.writer(STEP, key, cfg, inputs=[source])
    # Records stream through in chunks: memory holds a few chunks plus the dedup state (an
    # 8-byte key per kept record, and the MinHash index), whatever the file size. Kept
    # records go to a local file that is uploaded only after the gates passed. With worker
    # processes (steps/core/workers.py) they prepare the chunks and this process deduplicates.
    workers = worker_count(source.stats.get("records", 0))
    size = balanced_chunk(source.stats.get("records", 0), CHUNK_RECORDS)
    with writer.jsonl_file(RECORDS_FILE) as out:
        if workers:
            config = {"scrub": cfg.model_dump(mode="json"), "kind": kind}
            with ChunkWorkers("scrub", config, workers) as pool:
                # The raw lines go to the workers as they are, each after its number (record_form needs it).
                lines = (b"%d\t%s" % numbered for numbered in validated_lines(store, source))
                for answer in pool.map(b"\n".join(chunk) for chunk in batches(lines, size)):
                    chunk = PreparedChunk.from_bytes(answer, cfg.minhash_permutations)
                    out.write_lines(keep_chunk(chunk, near, cfg.dedup, tally))
        else:
            for chunk in batches(validated_records(store, source), size):
                out.write_lines(scrub_chunk(chunk, kind, engine, near, cfg.dedup, tally))
        records = tally.records
        gates = [(f"at most {cfg.max_pii_only_share:.0%} of records are nothing but PII", tally.pii_only,
                  cfg.max_pii_only_share, "hold no letter once PII is replaced"),
                 (f"at most {cfg.max_duplicate_share:.0%} of records are duplicates", tally.removed,
                  cfg.max_duplicate_share, "repeat an earlier record (exactly or nearly)")]
        for rule, (count, ids), limit, what in gates:
            if records and count / records > limit:
                raise DataQualityError(
                    f"scrub of {source_name(source, store)}: rule '{rule}': {count} of {records} records "
                    f"({count / records:.1%}) {what} (e.g. records {', '.join(ids)})"
                )
    kept = records - tally.removed[0] - len(tally.quarantine)
    stats = {
        "record_kind": kind,
        "records_in": records,
        "records_out": kept,
        "duplicates_removed": tally.removed[0],
        "near_duplicates_removed": near.removed if near is not None else 0,
        "pii": {entity: tally.pii.get(entity, 0) for entity in cfg.pii_entities},
        "pii_only_records": tally.pii_only[0],
    }
    if tally.quarantine:
        rule = gates[0][0]
        stats |= {"quarantined": len(tally.quarantine), "quarantine_rules": {rule: len(tally.quarantine)}}
        writer.put_jsonl(QUARANTINE_FILE, [{"id": record_id, "rules": [rule]} for record_id in tally.quarantine])
    if kind in LABELED_KINDS:
        stats["label_conflicts"] = tally.conflicts
    if tally.labels is not None:
        stats["label_counts"] = dict(sorted(tally.labels.items()))
    if near is not None:
        writer.put_json("dedup_report.json", near.report())
    log.info("scrub: %d -> %d records, %d PII replaced", records, kept, sum(tally.pii.values()))
    return DatasetRef(**writer.commit(stats=stats).model_dump())


def _engine(cfg: ScrubConfig) -> PiiEngine:
    return PiiEngine(cfg.pii_entities, actions=cfg.pii_actions, default_action=cfg.pii_action)


def _near(cfg: ScrubConfig) -> NearDuplicates | None:
    return NearDuplicates(cfg.near_threshold, cfg.minhash_permutations) if cfg.dedup and cfg.near_dedup else None


class _Tally:
    """What scrub counts over the whole stream; ids are kept for the first EXAMPLES only."""

    def __init__(self, kind: str):
        self.labeled = kind in LABELED_KINDS
        self.records = 0
        self.pii: Counter[str] = Counter()
        self.removed: list = [0, []]     # [count, example ids] of duplicates dropped
        self.pii_only: list = [0, []]    # [count, example ids] of records that are nothing but PII
        self.quarantine: list[str] = []  # ids of the PII-only records, left out
        self.conflicts = 0
        # label -> kept records (classification)
        self.labels: Counter | None = Counter() if kind == "classification" else None
        # The 8-byte fingerprint of each kept record's content -> its label's number (labeled kinds):
        # 12 bytes per kept record in sorted runs; a chunk's new ones are added at its end (``commit``).
        self.seen = SortedRuns(np.uint64)
        self._fresh: tuple[list[int], list[int]] = ([], [])
        self._label_number: dict[Any, int] = {}
        self._label_of: list[Any] = []   # number -> label

    @staticmethod
    def note(slot: list, record_id: str) -> None:
        slot[0] += 1
        if len(slot[1]) < EXAMPLES:
            slot[1].append(record_id)

    def kept_before(self, prints: list[int]) -> dict[int, Any]:
        """Position -> label of the kept record (None for kinds without labels), for the fingerprints
        of this chunk that a record of an earlier chunk was kept with."""
        positions, numbers = self.seen.find(np.array(prints, dtype=np.uint64))
        found: dict[int, Any] = {}
        for p, n in zip(positions.tolist(), numbers.tolist()):  # the first kept record's label
            found.setdefault(p, self._label_of[n] if self.labeled else None)
        return found

    def keep(self, fingerprint: int, label: Any) -> None:
        number = 0
        if self.labeled:
            number = self._label_number.setdefault(json.dumps(label, sort_keys=True), len(self._label_of))
            if number == len(self._label_of):
                self._label_of.append(label)
        self._fresh[0].append(fingerprint)
        self._fresh[1].append(number)

    def commit(self) -> None:
        """The fingerprints kept since the last commit join ``seen``."""
        keys, numbers = self._fresh
        self.seen.add(np.array(keys, dtype=np.uint64), np.array(numbers, dtype=np.uint32))
        self._fresh = ([], [])


@dataclass
class PreparedChunk:
    """One chunk of records scrubbed but not yet deduplicated: per record its id, its output line
    (JSON of the id and the scrubbed body), its exact-dedup fingerprint, its label (labeled
    kinds) and its MinHash signature (near dedup on); the PII found and the records that are
    nothing but PII. The part of scrub that needs no state from other chunks, so it can run in
    a worker process (``chunk_worker``)."""

    ids: list[str]
    lines: list[str]
    prints: list[int]
    labels: list[Any]
    pii: Counter[str]
    pii_only: list[int]
    sigs: np.ndarray | None

    def to_bytes(self) -> bytes:
        head = {k: v for k, v in self.__dict__.items() if k not in ("sigs", "lines")}
        return pack(head | {"signed": self.sigs is not None}, [] if self.sigs is None else [self.sigs],
                    {"lines": self.lines})

    @classmethod
    def from_bytes(cls, data: bytes, num_perm: int) -> PreparedChunk:
        head, sigs = unpack(data, num_perm)
        signed = head.pop("signed")
        return cls(**head | {"pii": Counter(head["pii"])}, sigs=sigs if signed else None)


def prepare_chunk(records: list[dict[str, Any]], kind: str, engine: PiiEngine,
                  near: NearDuplicates | None) -> PreparedChunk:
    """Normalize and redact one chunk, and compute what dedup decides on (``PreparedChunk``)."""
    pii: Counter[str] = Counter()
    bodies, had_pii = scrub_bodies(records, kind, engine, pii)
    texts = [record_text(body) for body in bodies]
    pii_only = [i for i in sorted(had_pii) if not any(c.isalpha() for c in PLACEHOLDER.sub("", texts[i]))]
    ids = scrubbed_ids(records, engine, pii)
    # The id (and a pinned split side) come first in each line; the fingerprint is the body's alone.
    heads = [{"id": record_id, **({"split": r["split"]} if "split" in r else {})} for record_id, r in zip(ids, records)]
    if kind in LABELED_KINDS:
        lines = [json.dumps(head | body, ensure_ascii=False) for head, body in zip(heads, bodies)]
        prints = [dedup_fingerprint(body, kind) for body in bodies]
    else:  # the fingerprint hashes the body's JSON, which the output line holds after the head: dump it once
        dumped = [json.dumps(body, ensure_ascii=False) for body in bodies]
        prints = [_fingerprint_of(text) for text in dumped]
        lines = [f'{json.dumps(head, ensure_ascii=False)[:-1]}, {text[1:]}' for head, text in zip(heads, dumped)]
    return PreparedChunk(
        ids=ids,
        lines=lines,
        prints=prints,
        labels=[body.get("label") for body in bodies],
        pii=pii, pii_only=pii_only,
        sigs=near.signatures(texts) if near is not None else None,
    )


def scrubbed_ids(records: list[dict[str, Any]], engine: PiiEngine, pii: Counter[str]) -> list[str]:
    """The records' ids with their PII redacted like the texts (and counted in ``pii``). A changed id gets
    ``#`` and 10 hex digits of the sha256 of the whole original record, so that two records whose ids
    redact alike keep distinct ids, and the same record always gets the same one."""
    originals = [str(record["id"]) for record in records]
    clean, found = engine.redact_many(originals)
    for counts in found.values():
        pii.update(counts)
    return [new if new == old else
            f"{new}#{hashlib.sha256(json.dumps(record, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:10]}"
            for old, new, record in zip(originals, clean, records)]


def chunk_worker(config: dict[str, Any]) -> Callable[[bytes], bytes]:
    """The worker side (``steps/core/workers.py``): validated raw lines in (``<line number>\\t<JSON>``
    each), a ``PreparedChunk`` out. The salt of the hash action comes from the worker's environment."""
    cfg, kind = ScrubConfig.model_validate(config["scrub"]), config["kind"]
    engine = _engine(cfg)
    near = _near(cfg)

    def handle(chunk: bytes) -> bytes:
        records = [record_form(json.loads(line), kind, int(number))
                   for number, line in (numbered.split(b"\t", 1) for numbered in chunk.split(b"\n"))]
        return prepare_chunk(records, kind, engine, near).to_bytes()

    return handle


def scrub_chunk(records: list[dict[str, Any]], kind: str, engine: PiiEngine, near: NearDuplicates | None,
                dedup: bool, tally: _Tally) -> list[str]:
    """The output lines of one chunk's kept records (``keep_chunk`` of ``prepare_chunk``)."""
    return keep_chunk(prepare_chunk(records, kind, engine, near), near, dedup, tally)


def keep_chunk(chunk: PreparedChunk, near: NearDuplicates | None, dedup: bool, tally: _Tally) -> list[str]:
    """The output lines of the kept records of one prepared chunk, in order, exactly as one record
    at a time would keep them: exact duplicates of a kept record are dropped (``dedup``), then
    near duplicates (``near``); counts go to ``tally``."""
    ids, prints, labels = chunk.ids, chunk.prints, chunk.labels
    tally.records += len(ids)
    tally.pii.update(chunk.pii)
    pii_only = set(chunk.pii_only)
    for i in chunk.pii_only:  # quarantined: neither kept nor indexed for dedup
        tally.note(tally.pii_only, ids[i])
        tally.quarantine.append(ids[i])
    kept = [False] * len(ids)
    removed: list[int] = []
    first: dict[int, int] = {}   # fingerprint -> its first record in this chunk that was not a repeat
    later: list[int] = []        # repeats of such a record, decided once it is
    check: list[int] = []        # records for the near-duplicate check, in order
    before = tally.kept_before(prints)
    for i, fingerprint in enumerate(prints):
        if i in pii_only:
            continue
        if i in before:
            tally.conflicts += before[i] != labels[i]
            if dedup:
                removed.append(i)
            else:
                kept[i] = True
        elif fingerprint in first:
            later.append(i)
        else:
            first[fingerprint] = i
            check.append(i)
    recheck: list[int] = []
    for batch, after in ((check, later), (recheck, [])):
        matches = near.check_and_add_signatures([ids[i] for i in batch], chunk.sigs[batch]) \
            if near is not None and batch else [None] * len(batch)
        for i, match in zip(batch, matches):
            if match is None:
                kept[i] = True
                tally.keep(prints[i], labels[i])
            else:
                removed.append(i)
        for i in after:  # a repeat of a kept record is an exact duplicate; of a dropped one, near-checked
            j = first[prints[i]]
            if kept[j]:
                tally.conflicts += labels[j] != labels[i]
                if dedup:
                    removed.append(i)
                else:
                    kept[i] = True
            else:
                recheck.append(i)
    tally.commit()
    for i in sorted(removed):
        tally.note(tally.removed, ids[i])
    if tally.labels is not None:
        tally.labels.update(label for label, keep in zip(labels, kept) if keep)
    return [line for line, keep in zip(chunk.lines, kept) if keep]


def scrub_bodies(records: list[dict[str, Any]], kind: str, engine: PiiEngine, pii: Counter[str]
                 ) -> tuple[list[dict[str, Any]], set[int]]:
    """The records without their ids, texts normalized and redacted (one batch for the chunk), labels
    kept; PII found is added to ``pii``; also the positions of the records in which PII was found."""
    fields = _TEXT_FIELDS.get(kind)
    texts: list[str] = []
    for record in records:
        if fields is None:
            texts += [text for m in record["messages"] for text in _message_texts(m)]
        else:
            texts += [record[field] for field in fields]
    clean, found = engine.redact_many([normalize_text(text) for text in texts])
    owner: list[int] = []
    bodies = []
    pos = 0
    for n, record in enumerate(records):
        if fields is None:
            messages, width = [], 0
            for m in record["messages"]:
                count = len(_message_texts(m))
                messages.append(_scrubbed_message(m, clean[pos + width:pos + width + count]))
                width += count
            bodies.append({"messages": messages})
        else:
            body = {field: clean[pos + k] for k, field in enumerate(fields)}
            if kind in LABELED_KINDS:
                body["label"] = record["label"]
            if kind == "prompt" and "answer" in record:  # the reference the rewards check: kept verbatim
                body["answer"] = record["answer"]
            bodies.append(body)
            width = len(fields)
        owner += [n] * width
        pos += width
    had_pii: set[int] = set()
    for i, counts in found.items():
        pii.update(counts)
        had_pii.add(owner[i])
    return bodies, had_pii


MESSAGE_KEYS = ("role", "content", "tool_calls", "tool_call_id", "name")  # what a scrubbed message keeps


def _message_texts(message: dict[str, Any]) -> list[str]:
    """The texts of a message that scrub normalizes and redacts: its content, and each tool call's arguments."""
    texts = [message.get("content") or ""]
    for call in message.get("tool_calls") or []:
        arguments = call["function"].get("arguments", "")
        texts.append(arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False))
    return texts


def _scrubbed_message(message: dict[str, Any], texts: list[str]) -> dict[str, Any]:
    """The message with its ``_message_texts`` replaced by ``texts`` (tool-call arguments as JSON strings)."""
    out = {k: message[k] for k in MESSAGE_KEYS if k in message}
    out["content"] = texts[0] if message.get("content") is not None else None
    if message.get("tool_calls"):
        out["tool_calls"] = [{**call, "function": {**call["function"], "arguments": text}}
                             for call, text in zip(message["tool_calls"], texts[1:])]
    return out


def source_name(ref: DatasetRef, store: ArtifactStore) -> str:
    """The ingested source (file or URI) that ``ref`` descends from, followed through the manifests' inputs."""
    manifest = store.manifest(ref.key)
    while manifest["inputs"]:
        manifest = store.manifest(manifest["inputs"][0]["key"])
    return manifest["stats"].get("source", ref.key)


def dedup_fingerprint(body: dict[str, Any], kind: str) -> int:
    """What makes a record a duplicate (the text alone for labeled kinds, else the whole body) as
    the first 8 bytes of its SHA-256: compact enough to keep one per record of a large file."""
    content = {"text": body["text"]} if kind in LABELED_KINDS else body
    return _fingerprint_of(json.dumps(content, ensure_ascii=False))


def _fingerprint_of(dumped: str) -> int:
    return int.from_bytes(hashlib.sha256(dumped.encode()).digest()[:8], "big")
