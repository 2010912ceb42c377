"""Scrub: normalize text, replace PII, drop exact and near duplicates.

Every message's content (chat records), the text (text, classification and regression
records) or the prompt, chosen and rejected answers (preference records) are
NFKC-normalized (control characters removed, whitespace collapsed, 3+ newlines become
2), then PII (``steps/pii.py``: email, phone, card, Korean RRN, US SSN, IP, URL
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
an earlier kept record reaches ``near_threshold`` is dropped too (``steps/dedup.py``,
character 5-grams, so Korean works); ``near_duplicates_removed`` in the stats and
``dedup_report.json`` (cluster sizes and example ids, never text) in the artifact.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from typing import Any

from steps.config import ScrubConfig
from steps.dedup import NearDuplicates, record_text
from steps.lineage import run_key
from steps.pii import PiiEngine, normalize_text
from steps.store import ArtifactStore, DatasetRef
from steps.validate import RECORDS_FILE

log = logging.getLogger(__name__)

STEP = "scrub"
LABELED_KINDS = {"classification", "regression"}


def scrub_records(cfg: ScrubConfig, source: DatasetRef, store: ArtifactStore) -> DatasetRef:
    engine = PiiEngine(cfg.pii_entities, actions=cfg.pii_actions, default_action=cfg.pii_action)
    # A hash action's output depends on the salt: its (non-reversible) id is part of the cache key.
    key = run_key(STEP, cfg, [source.digest] + ([engine.salt_id] if engine.salt_id else []))
    if (done := store.lookup(STEP, key)) is not None:
        return DatasetRef(**done.model_dump())
    records = store.read_jsonl(source, RECORDS_FILE)
    kind = source.stats["record_kind"]
    near = NearDuplicates(cfg.near_threshold, cfg.minhash_permutations) if cfg.dedup and cfg.near_dedup else None
    pii: Counter[str] = Counter()
    seen: dict[str, Any] = {}  # fingerprint -> label of its first record (None for unlabeled kinds)
    kept: list[dict] = []
    conflicts = 0
    for record in records:
        body = scrub_body(record, kind, engine, pii)
        fingerprint = dedup_fingerprint(body, kind)
        if fingerprint in seen:
            conflicts += seen[fingerprint] != body.get("label")
            if cfg.dedup:
                continue
        if near is not None and near.check_and_add(record["id"], record_text(body)) is not None:
            continue
        seen.setdefault(fingerprint, body.get("label"))
        kept.append({"id": record["id"], **body})
    stats = {
        "record_kind": kind,
        "records_in": len(records),
        "records_out": len(kept),
        "duplicates_removed": len(records) - len(kept),
        "near_duplicates_removed": near.removed if near is not None else 0,
        "pii": {entity: pii.get(entity, 0) for entity in cfg.pii_entities},
    }
    if kind in LABELED_KINDS:
        stats["label_conflicts"] = conflicts
    if kind == "classification":
        stats["label_counts"] = dict(sorted(Counter(r["label"] for r in kept).items()))
    writer = store.writer(STEP, key, cfg, inputs=[source])
    writer.put_jsonl(RECORDS_FILE, kept)
    if near is not None:
        writer.put_json("dedup_report.json", near.report())
    log.info("scrub: %d -> %d records, %d PII replaced", len(records), len(kept), sum(pii.values()))
    return DatasetRef(**writer.commit(stats=stats).model_dump())


def scrub_body(record: dict[str, Any], kind: str, engine: PiiEngine, pii: Counter[str]) -> dict[str, Any]:
    """The record without its id: texts normalized and redacted, labels kept; PII found is added to `pii`."""

    def clean(text: str) -> str:
        text, found = engine.redact(normalize_text(text))
        pii.update(found)
        return text

    if kind == "text":
        return {"text": clean(record["text"])}
    if kind in LABELED_KINDS:
        return {"text": clean(record["text"]), "label": record["label"]}
    if kind == "preference":
        return {field: clean(record[field]) for field in ("prompt", "chosen", "rejected")}
    return {"messages": [{"role": m["role"], "content": clean(m["content"])} for m in record["messages"]]}


def dedup_fingerprint(body: dict[str, Any], kind: str) -> str:
    """SHA-256 of what makes a record a duplicate: the text alone for labeled kinds, else the whole body."""
    content = {"text": body["text"]} if kind in LABELED_KINDS else body
    return hashlib.sha256(json.dumps(content, ensure_ascii=False).encode()).hexdigest()
