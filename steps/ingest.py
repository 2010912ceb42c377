"""Ingest: copy raw records into the store's raw area, addressed by their digest.

Sources (``IngestConfig.source``):
- a local JSONL file: ``data/train.jsonl``
- an object in S3: ``s3://bucket/path/train.jsonl`` (same endpoint and credentials as the store)
- the chatterbot-corpus package: ``chatterbot:english,korean`` (each conversation becomes a
  chat record whose turns alternate user/assistant; a trailing unanswered turn is dropped)
- the konlpy package's Korean corpora: ``konlpy:kolaw,kobill`` (each file becomes a text
  record ``{"id": "kolaw/constitution", "text": ...}``, for ``validate.record_kind: text``;
  records are sorted by id, so the order of the names does not change the bytes)

The bytes are copied as they are; parsing and checking is the validate step's job.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import yaml

from steps.config import IngestConfig
from steps.errors import ConfigError, DataQualityError
from steps.lineage import run_key, sha256_bytes
from steps.store import ArtifactStore, DatasetRef

log = logging.getLogger(__name__)

STEP = "ingest"
RAW_FILE = "raw.jsonl"


def ingest_records(cfg: IngestConfig, store: ArtifactStore) -> DatasetRef:
    data, origin = read_source(cfg.source, store)
    if not data.strip():
        raise DataQualityError(f"{origin}: rule 'non-empty input': the file holds no records")
    source_digest = sha256_bytes(data)
    key = run_key(STEP, cfg, [source_digest])
    if (done := store.lookup(STEP, key)) is not None:
        return DatasetRef(**done.model_dump())
    writer = store.writer(STEP, key, cfg)
    writer.put_bytes(RAW_FILE, data)
    lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    ref = writer.commit(stats={"source": origin, "source_sha256": source_digest, "lines": lines, "bytes": len(data)})
    log.info("ingest: %d lines from %s", lines, origin)
    return DatasetRef(**ref.model_dump())


def read_source(source: str, store: ArtifactStore) -> tuple[bytes, str]:
    if source.startswith("chatterbot:"):
        return chatterbot_jsonl(_names(source)), source
    if source.startswith("konlpy:"):
        return konlpy_jsonl(_names(source)), source
    if source.startswith("s3://"):
        bucket, _, key = source[len("s3://"):].partition("/")
        if not bucket or not key:
            raise ConfigError(f"ingest.source {source!r} is not of the form s3://bucket/key")
        body = store.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        return body, source
    path = Path(source).expanduser()
    if not path.is_file():
        raise ConfigError(f"ingest.source {source!r}: no such file")
    return path.read_bytes(), str(path)


def _names(source: str) -> list[str]:
    """'corpus:a, b' -> ['a', 'b']."""
    return [name.strip() for name in source.split(":", 1)[1].split(",") if name.strip()]


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode("utf-8")


def chatterbot_jsonl(languages: list[str]) -> bytes:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or spec.origin is None:
        raise ConfigError("the chatterbot-corpus package is not installed")
    root = Path(spec.origin).parent / "data"
    records: list[dict] = []
    for language in languages:
        folder = root / language
        if not folder.is_dir():
            known = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise ConfigError(f"chatterbot-corpus has no language {language!r} (known: {', '.join(known)})")
        for path in sorted(folder.glob("*.yml")):
            doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            for i, turns in enumerate(doc.get("conversations", [])):
                if not isinstance(turns, list):  # one corpus entry is a bare string, not a conversation
                    log.warning("chatterbot %s/%s #%d is not a list of turns; skipped", language, path.stem, i)
                    continue
                turns = [str(t) for t in turns]
                if len(turns) % 2:  # a question nobody answered teaches nothing
                    turns = turns[:-1]
                if not turns:
                    continue
                messages = [
                    {"role": "user" if j % 2 == 0 else "assistant", "content": t} for j, t in enumerate(turns)
                ]
                records.append({"id": f"{language}/{path.stem}/{i}", "messages": messages})
    return _jsonl(records)


def konlpy_jsonl(corpora: list[str]) -> bytes:
    # Read the files, never import konlpy: it is installed without its Java (JPype) dependencies.
    spec = importlib.util.find_spec("konlpy")
    if spec is None or spec.origin is None:
        raise ConfigError("the konlpy package is not installed")
    root = Path(spec.origin).parent / "data" / "corpus"
    records: list[dict] = []
    for corpus in sorted(set(corpora)):
        folder = root / corpus
        if not folder.is_dir():
            known = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise ConfigError(f"konlpy has no corpus {corpus!r} (known: {', '.join(known)})")
        for path in sorted(folder.glob("*.txt")):
            records.append({"id": f"{corpus}/{path.stem}", "text": path.read_text(encoding="utf-8")})
    return _jsonl(records)
