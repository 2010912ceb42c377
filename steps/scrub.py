"""Scrub: normalize text, replace PII with typed placeholders, drop exact duplicates.

Every message's content (chat records) or the whole text (text records) is
NFKC-normalized (control characters removed, whitespace collapsed, 3+ newlines become
2), then PII (email, phone, card, Korean RRN, US SSN, IP) is replaced by
``<EMAIL>``-style placeholders. Records whose normalized, scrubbed messages or text
repeat an earlier record are dropped. The manifest carries per-entity counts and the
number of duplicates removed, never the values; ``record_kind`` passes through from
validate.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from typing import Any

from steps.config import ScrubConfig
from steps.lineage import run_key
from steps.pii import PiiEngine, normalize_text
from steps.store import ArtifactStore, DatasetRef
from steps.validate import RECORDS_FILE

log = logging.getLogger(__name__)

STEP = "scrub"


def scrub_records(cfg: ScrubConfig, source: DatasetRef, store: ArtifactStore) -> DatasetRef:
    key = run_key(STEP, cfg, [source.digest])
    if (done := store.lookup(STEP, key)) is not None:
        return DatasetRef(**done.model_dump())
    records = store.read_jsonl(source, RECORDS_FILE)
    kind = source.stats["record_kind"]
    engine = PiiEngine(cfg.pii_entities)
    pii: Counter[str] = Counter()
    seen: set[str] = set()
    kept: list[dict] = []
    for record in records:
        body = scrub_body(record, kind, engine, pii)
        fingerprint = hashlib.sha256(json.dumps(body, ensure_ascii=False).encode()).hexdigest()
        if cfg.dedup and fingerprint in seen:
            continue
        seen.add(fingerprint)
        kept.append({"id": record["id"], **body})
    stats = {
        "record_kind": kind,
        "records_in": len(records),
        "records_out": len(kept),
        "duplicates_removed": len(records) - len(kept),
        "pii": {entity: pii.get(entity, 0) for entity in cfg.pii_entities},
    }
    writer = store.writer(STEP, key, cfg, inputs=[source])
    writer.put_jsonl(RECORDS_FILE, kept)
    log.info("scrub: %d -> %d records, %d PII replaced", len(records), len(kept), sum(pii.values()))
    return DatasetRef(**writer.commit(stats=stats).model_dump())


def scrub_body(record: dict[str, Any], kind: str, engine: PiiEngine, pii: Counter[str]) -> dict[str, Any]:
    """The record without its id, every text normalized and redacted; PII found is added to `pii`."""

    def clean(text: str) -> str:
        text, found = engine.redact(normalize_text(text))
        pii.update(found)
        return text

    if kind == "text":
        return {"text": clean(record["text"])}
    return {"messages": [{"role": m["role"], "content": clean(m["content"])} for m in record["messages"]]}
