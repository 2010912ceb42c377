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

Two gates stop the run before anything is written (``DataQualityError`` naming the file,
the rule, the count and example record ids -- ``line-<n>`` when the records have no id):
more than ``max_duplicate_share`` of the records removed as duplicates (a file of copies),
or more than ``max_pii_only_share`` of the records nothing but PII (no letter left once
PII is replaced). ``pii_only_records`` in the stats counts the latter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from typing import Any

from steps.config import ScrubConfig
from steps.dedup import NearDuplicates, record_text
from steps.errors import DataQualityError
from steps.lineage import run_key
from steps.pii import PiiEngine, normalize_text
from steps.store import ArtifactStore, DatasetRef
from steps.validate import RECORDS_FILE

log = logging.getLogger(__name__)

STEP = "scrub"
LABELED_KINDS = {"classification", "regression"}
EXAMPLES = 5
# What a replaced value becomes under the placeholder and hash actions (masks keep no letters).
PLACEHOLDER = re.compile(r"<[A-Z_]+(?::[0-9a-f]{12})?>")


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
    removed: list[str] = []  # ids of the duplicates dropped
    pii_only: list[str] = []  # ids of the records that are nothing but PII
    conflicts = 0
    for record in records:
        found = sum(pii.values())
        body = scrub_body(record, kind, engine, pii)
        if sum(pii.values()) > found and not any(c.isalpha() for c in PLACEHOLDER.sub("", record_text(body))):
            pii_only.append(record["id"])
        fingerprint = dedup_fingerprint(body, kind)
        if fingerprint in seen:
            conflicts += seen[fingerprint] != body.get("label")
            if cfg.dedup:
                removed.append(record["id"])
                continue
        if near is not None and near.check_and_add(record["id"], record_text(body)) is not None:
            removed.append(record["id"])
            continue
        seen.setdefault(fingerprint, body.get("label"))
        kept.append({"id": record["id"], **body})
    gates = [(f"at most {cfg.max_pii_only_share:.0%} of records are nothing but PII", pii_only,
              cfg.max_pii_only_share, "hold no letter once PII is replaced"),
             (f"at most {cfg.max_duplicate_share:.0%} of records are duplicates", removed,
              cfg.max_duplicate_share, "repeat an earlier record (exactly or nearly)")]
    for rule, ids, limit, what in gates:
        if records and len(ids) / len(records) > limit:
            raise DataQualityError(
                f"scrub of {source_name(source, store)}: rule '{rule}': {len(ids)} of {len(records)} records "
                f"({len(ids) / len(records):.1%}) {what} (e.g. records {', '.join(ids[:EXAMPLES])})"
            )
    stats = {
        "record_kind": kind,
        "records_in": len(records),
        "records_out": len(kept),
        "duplicates_removed": len(records) - len(kept),
        "near_duplicates_removed": near.removed if near is not None else 0,
        "pii": {entity: pii.get(entity, 0) for entity in cfg.pii_entities},
        "pii_only_records": len(pii_only),
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


def source_name(ref: DatasetRef, store: ArtifactStore) -> str:
    """The ingested source (file or URI) that ``ref`` descends from, followed through the manifests' inputs."""
    manifest = store.manifest(ref.key)
    while manifest["inputs"]:
        manifest = store.manifest(manifest["inputs"][0]["key"])
    return manifest["stats"].get("source", ref.key)


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
