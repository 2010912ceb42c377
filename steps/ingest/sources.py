"""One source as JSON lines streamed into a local file: JSONL (also ``.gz``), Parquet, CSV, a Hugging
Face ``datasets`` folder, a folder of such files, an ``s3://`` object or prefix, or a built-in corpus
(steps/ingest/corpora.py).

    origin = write_source("data/", store, out)   # out: a binary file; returns where the records came from

JSONL bytes are copied as they are (gzip decompressed, a missing final newline added); other file
types are converted row by row to JSON records, in batches, so memory holds one batch whatever the
file size. A folder or prefix is read file by file in name order (files of other types are left out
and logged).
"""

from __future__ import annotations

import gzip
import json
import logging
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterable

from botocore.exceptions import ClientError

from steps.core.errors import ConfigError, DataQualityError
from steps.core.store import ArtifactStore
from steps.ingest.corpora import corpus_jsonl

log = logging.getLogger(__name__)

BATCH_ROWS = 10_000  # rows per batch of a Parquet, CSV or Arrow file
COPY_BYTES = 1 << 20
FILE_TYPES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson", ".parquet", ".csv", ".zst")  # what a folder or prefix holds


def write_source(source: str, store: ArtifactStore, out: BinaryIO) -> str:
    """Write ``source``'s records to ``out`` as JSON lines; returns its origin (a path or URI)."""
    if (data := corpus_jsonl(source)) is not None:
        out.write(data)
        return source
    if source.startswith("s3://"):
        return _write_s3(source, store, out)
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            _write_datasets_folder(path, out)
        else:
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            _write_many([(str(p), p) for p in files], out, source)
        return str(path)
    if not path.is_file():
        raise ConfigError(f"ingest.source {source!r}: no such file")
    write_file(path, out, str(path))
    return str(path)


def write_file(path: Path, out: BinaryIO, name: str) -> None:
    """One file by its type (its name's ending)."""
    lower = name.lower()
    if lower.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as fh:
                _copy_lines(fh, out)
        except (OSError, EOFError) as exc:
            raise DataQualityError(f"{name}: rule 'readable gzip': {exc}") from None
    elif lower.endswith(".zst"):
        raise ConfigError(f"ingest.source {name!r}: zstandard files need the zstandard package, which this "
                          "install does not have; decompress it (zstd -d) or use gzip")
    elif lower.endswith(".parquet"):
        _write_parquet(path, out, name)
    elif lower.endswith(".csv"):
        _write_csv(path, out, name)
    elif lower.endswith(".json") and _starts_with(path, b"["):
        _write_json_array(path, out, name)
    else:
        with open(path, "rb") as fh:
            _copy_lines(fh, out)


def _starts_with(path: Path, char: bytes) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4096).lstrip()[:1] == char


def _write_json_array(path: Path, out: BinaryIO, name: str) -> None:
    """A JSON array of records (Alpaca's own files): each element becomes a line (the file is read whole)."""
    try:
        rows = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataQualityError(f"{name}: rule 'valid JSON array': {exc}") from None
    for begin in range(0, len(rows), BATCH_ROWS):
        _write_rows(rows[begin:begin + BATCH_ROWS], out)


def _copy_lines(fh: BinaryIO, out: BinaryIO) -> None:
    """Copy the bytes; a file whose last line has no newline gets one (the next file starts a line)."""
    last = b""
    for chunk in iter(lambda: fh.read(COPY_BYTES), b""):
        out.write(chunk)
        last = chunk
    if last and not last.endswith(b"\n"):
        out.write(b"\n")


def _write_many(files: list[tuple[str, Path]], out: BinaryIO, source: str) -> None:
    """Every file of a known type, in the given order; others are logged and left out."""
    known = [(name, path) for name, path in files if name.lower().endswith(FILE_TYPES)]
    skipped = [name for name, _ in files if not name.lower().endswith(FILE_TYPES)]
    if skipped:
        log.warning("ingest: %d files of %s are not of a known type (%s) and are left out, e.g. %s",
                    len(skipped), source, ", ".join(FILE_TYPES), skipped[0])
    if not known:
        raise ConfigError(f"ingest.source {source!r} holds no files of a known type ({', '.join(FILE_TYPES)})")
    for name, path in known:
        write_file(path, out, name)
    log.info("ingest: %d files from %s", len(known), source)


def _write_s3(source: str, store: ArtifactStore, out: BinaryIO) -> str:
    """An object, or every object under a prefix (``s3://bucket/prefix/``), downloaded one at a time."""
    bucket, _, key = source[len("s3://"):].partition("/")
    if not bucket:
        raise ConfigError(f"ingest.source {source!r} is not of the form s3://bucket/key or s3://bucket/prefix/")
    keys = [key] if key and not key.endswith("/") else []
    if not keys:
        paginator = store.client.get_paginator("list_objects_v2")
        try:
            keys = [obj["Key"] for page in paginator.paginate(Bucket=bucket, Prefix=key)
                    for obj in page.get("Contents", []) if not obj["Key"].endswith("/")]
        except ClientError as exc:
            raise ConfigError(f"ingest.source {source!r}: cannot list: {exc}") from exc
        if not keys:
            raise ConfigError(f"ingest.source {source!r}: no objects under this prefix")
    with tempfile.TemporaryDirectory(prefix="tuneline-ingest-") as tmp:
        files = []
        for n, name in enumerate(sorted(keys)):
            local = Path(tmp) / f"{n}-{Path(name).name}"
            try:
                store.client.download_file(bucket, name, str(local))
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "NoSuchBucket", "404"):
                    raise ConfigError(f"ingest.source {source!r}: no such object") from exc
                raise
            files.append((f"s3://{bucket}/{name}", local))
        if len(files) == 1 and keys == [key]:
            write_file(files[0][1], out, files[0][0])
        else:
            _write_many(files, out, source)
    return source


def _write_rows(rows: Iterable[dict], out: BinaryIO) -> None:
    out.write("".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows).encode("utf-8"))


def _write_parquet(path: Path, out: BinaryIO, name: str) -> None:
    """Each row of a Parquet file as a JSON record (columns as fields, nested columns as JSON), in batches."""
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a broken file
        raise DataQualityError(f"{name}: rule 'readable Parquet': {exc}") from None
    for batch in reader.iter_batches(batch_size=BATCH_ROWS):
        _write_rows(batch.to_pylist(), out)


def _write_csv(path: Path, out: BinaryIO, name: str) -> None:
    """Each row of a CSV file with a header line as a JSON record; every value is a string (numbers
    as well: use JSONL or Parquet for numeric regression labels). UTF-8 (a BOM is dropped)."""
    import csv

    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        batch: list[dict] = []
        for number, row in enumerate(reader, start=2):
            if None in row:
                header = len(reader.fieldnames or [])
                raise DataQualityError(f"{name}: rule 'CSV row has the header's columns': line {number} has "
                                       f"{len(row) - 1 + len(row[None])} fields, the header {header}")
            batch.append(row)
            if len(batch) == BATCH_ROWS:
                _write_rows(batch, out)
                batch = []
        _write_rows(batch, out)


def _write_datasets_folder(path: Path, out: BinaryIO) -> None:
    """The rows of a Hugging Face ``datasets`` folder (``Dataset.save_to_disk``), read from its Arrow
    files batch by batch (a ``DatasetDict`` folder: name a split's subfolder instead)."""
    import pyarrow as pa

    state = path / "state.json"
    if not state.is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
        raise ConfigError(f"ingest.source {str(path)!r} is a datasets folder without state.json"
                          + (f"; it holds the splits {splits}: name one, e.g. {path / splits[0]}" if splits else ""))
    for file in (path / f["filename"] for f in json.loads(state.read_text())["_data_files"]):
        with pa.memory_map(str(file)) as source:
            for batch in pa.ipc.open_stream(source):
                _write_rows(batch.to_pylist(), out)
