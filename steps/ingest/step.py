"""Ingest: raw records into the store's raw area (``raw.jsonl``), addressed by their digest.

    ingest_records(IngestConfig(source="data/chats.parquet"), store)
    ingest_records(IngestConfig(sources=[{"source": "a.jsonl", "weight": 3}, {"source": "s3://b/p/", "weight": 1}]),
                   store)

Sources and file types: steps/ingest/sources.py; built-in corpora: steps/ingest/corpora.py; record
formats and the column mapping: steps/ingest/formats.py. Each source streams to a local file first,
so memory stays flat whatever the size. A mixture (``ingest.sources``) samples each source's records
(``random.Random(seed)``) and interleaves them; with weights it is as large as the source that runs
out first allows, each source giving its weight's share. Parsing and checking the records is the
validate step's job: ingest only reads enough of them to name their format.
"""

from __future__ import annotations

import logging
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from steps.config import IngestConfig, SourceSpec
from steps.core.contract import RAW_FILE
from steps.core.errors import DataQualityError
from steps.core.lineage import run_key, sha256_file
from steps.core.store import ArtifactStore, DatasetRef
from steps.ingest.formats import detect_format, rewrite_record
from steps.ingest.sources import write_source

log = logging.getLogger(__name__)

STEP = "ingest"


@dataclass
class Part:
    """One source streamed to a local file, and how many records (non-blank lines) it holds."""

    spec: SourceSpec
    origin: str
    path: Path
    records: int


def ingest_records(cfg: IngestConfig, store: ArtifactStore) -> DatasetRef:
    """Read ``cfg.source`` (or the mixture ``cfg.sources``) into the store as ``raw.jsonl``.

    The stats carry the source(s), the raw file's sha256, line and byte counts, the record ``format``
    (declared or detected) and, for a mixture, each source's records, records taken and share.
    Raises ``DataQualityError`` for an empty source or an unreadable file, ``ConfigError`` for a
    source that cannot be found or read, or records whose format is unknown or ambiguous.
    """
    specs = cfg.sources or [SourceSpec(source=cfg.source)]
    with tempfile.TemporaryDirectory(prefix="tuneline-ingest-") as tmp:
        parts = []
        for i, spec in enumerate(specs):
            path = Path(tmp) / f"source-{i}.jsonl"
            with open(path, "wb") as out:
                origin = write_source(spec.source, store, out)
            part = Part(spec, origin, path, sum(1 for _ in _records(path)))
            if part.records == 0:
                raise DataQualityError(f"{origin}: rule 'non-empty input': the file holds no records")
            parts.append(part)
        taken = plan_mixture(cfg, parts)
        origin = " + ".join(p.origin for p in parts)
        if cfg.sources is None and not cfg.columns:
            raw = parts[0].path  # the bytes as they came
        else:
            raw = Path(tmp) / RAW_FILE
            with open(raw, "wb") as out:
                write_mixture(parts, taken, cfg, out)
        fmt = detect_format(_records(raw), cfg.format, origin)
        digest = sha256_file(raw)
        key = run_key(STEP, cfg, [digest])
        if (done := store.lookup(STEP, key)) is not None:
            return DatasetRef(**done.model_dump())
        size = raw.stat().st_size
        with open(raw, "rb") as fh:
            lines = sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
            fh.seek(max(size - 1, 0))
            lines += 1 if size and fh.read(1) != b"\n" else 0
        writer = store.writer(STEP, key, cfg)
        writer.put_file(RAW_FILE, raw, sha256=digest)
        stats = {"source": origin, "source_sha256": digest, "lines": lines, "bytes": size, "format": fmt}
        if cfg.sources is not None:
            total = sum(taken)
            stats["sources"] = [{"source": p.origin, "records": p.records, "taken": n,
                                 "share": round(n / max(total, 1), 4),
                                 **({"weight": p.spec.weight} if p.spec.weight is not None else {}),
                                 **({"max_records": p.spec.max_records} if p.spec.max_records is not None else {}),
                                 **({"split": p.spec.split} if p.spec.split is not None else {})}
                                for p, n in zip(parts, taken)]
        ref = writer.commit(stats=stats)
    log.info("ingest: %d lines of %s records from %s", lines, fmt, origin)
    return DatasetRef(**ref.model_dump())


def plan_mixture(cfg: IngestConfig, parts: list[Part]) -> list[int]:
    """Records to take from each source: with weights, the largest mixture in which each source has its
    weight's share (the first source to run out sets the size); else each source's ``max_records`` or all."""
    weights = [p.spec.weight for p in parts]
    if all(w is not None for w in weights) and cfg.sources is not None:
        shares = [w / sum(weights) for w in weights]  # type: ignore[operator, misc]
        size = min(p.records / share for p, share in zip(parts, shares))
        taken = [min(p.records, round(size * share)) for p, share in zip(parts, shares)]
    else:
        taken = [min(p.records, p.spec.max_records or p.records) for p in parts]
    for part, n in zip(parts, taken):
        if n == 0:
            log.warning("ingest: no records taken from %s (its weight is too small for the mixture)", part.origin)
    return taken


def write_mixture(parts: list[Part], taken: list[int], cfg: IngestConfig, out: BinaryIO) -> None:
    """The sampled records of each source, interleaved at random (one source: in file order), with the
    column mapping applied and pinned sources' records marked with their side. Seeded by ``cfg.seed``:
    the same config gives the same bytes."""
    rng = random.Random(cfg.seed)
    chosen = [set(rng.sample(range(p.records), n)) if n < p.records else None for p, n in zip(parts, taken)]
    order = [i for i, n in enumerate(taken) for _ in range(n)]
    if len(parts) > 1:
        rng.shuffle(order)
    streams = [_selected(p.path, keep) for p, keep in zip(parts, chosen)]
    for i in order:
        line, split = next(streams[i]), parts[i].spec.split
        out.write(rewrite_record(line, cfg.columns, split) if cfg.columns or split else line)


def _records(path: Path) -> Iterator[bytes]:
    """The non-blank lines of a file, each ending with a newline."""
    with open(path, "rb") as fh:
        for line in fh:
            if line.strip():
                yield line if line.endswith(b"\n") else line + b"\n"


def _selected(path: Path, keep: set[int] | None) -> Iterator[bytes]:
    """The records whose index is in ``keep`` (None: all), in file order."""
    for index, line in enumerate(_records(path)):
        if keep is None or index in keep:
            yield line
