import json
from pathlib import Path

import pytest

from helpers import all_keys, chat, write_jsonl
from steps.config import IngestConfig
from steps.core.contract import RAW_FILE
from steps.core.errors import ConfigError, DataQualityError
from steps.ingest import ingest_records


def test_local_jsonl_is_copied_byte_for_byte_with_digest(store, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [chat("hi", "hello"), {"instruction": "add 1+1", "output": "2"}])
    ref = ingest_records(IngestConfig(source=str(path)), store)
    assert store.read_bytes(ref, RAW_FILE) == path.read_bytes()
    assert ref.stats["lines"] == 2 and len(ref.stats["source_sha256"]) == 64


def test_same_input_twice_reuses_the_artifact(store, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [chat("hi", "hello")])
    first = ingest_records(IngestConfig(source=str(path)), store)
    keys = all_keys(store)
    assert ingest_records(IngestConfig(source=str(path)), store) == first
    assert all_keys(store) == keys


def test_s3_uri_source(store, tmp_path):
    store.put_bytes("incoming/data.jsonl", json.dumps(chat("q", "a")).encode() + b"\n")
    ref = ingest_records(IngestConfig(source=f"s3://{store.bucket}/incoming/data.jsonl"), store)
    assert ref.stats["lines"] == 1


def test_chatterbot_source_alternates_roles_and_drops_unanswered_turns(store):
    ref = ingest_records(IngestConfig(source="chatterbot:korean"), store)
    rows = store.read_jsonl(ref, RAW_FILE)
    assert len(rows) == 454
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles


def test_empty_file_and_missing_file_fail_clearly(store, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataQualityError, match="non-empty input"):
        ingest_records(IngestConfig(source=str(empty)), store)
    with pytest.raises(ConfigError, match="no such file"):
        ingest_records(IngestConfig(source=str(tmp_path / "nope.jsonl")), store)
    with pytest.raises(ConfigError, match=r"ingest.source 's3://.*/nope.jsonl': no such object"):
        ingest_records(IngestConfig(source=f"s3://{store.bucket}/{store.prefix}/nope.jsonl"), store)
    with pytest.raises(ConfigError, match="no language 'klingon'"):
        ingest_records(IngestConfig(source="chatterbot:klingon"), store)
    assert all_keys(store) == []


ROWS = [{"id": f"r{i}", "text": f"shares rose {i} points", "label": "business" if i % 2 else "sport"}
        for i in range(6)]


def file_of(kind: str, folder: Path) -> Path:
    """The same six classification rows as a file (or folder) of ``kind``."""
    if kind == "jsonl.gz":
        import gzip

        path = folder / "rows.jsonl.gz"
        path.write_bytes(gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in ROWS)))
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = folder / "rows.parquet"
        pq.write_table(pa.Table.from_pylist(ROWS), path, row_group_size=4)
    elif kind == "csv":
        import csv

        path = folder / "rows.csv"
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=["id", "text", "label"])
            writer.writeheader()
            writer.writerows(ROWS)
    else:
        from datasets import Dataset

        path = folder / "rows-dataset"
        Dataset.from_list(ROWS).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", ["jsonl.gz", "parquet", "csv", "datasets"])
def test_other_file_types_become_the_same_jsonl_records(store, tmp_path, kind):
    from steps.config import ValidateConfig
    from steps.core.contract import RECORDS_FILE
    from steps.validate import validate_records

    raw = ingest_records(IngestConfig(source=str(file_of(kind, tmp_path))), store)
    assert [json.loads(line) for line in store.read_bytes(raw, "raw.jsonl").splitlines()] == ROWS
    records = store.read_jsonl(validate_records(ValidateConfig(record_kind="classification"), raw, store),
                               RECORDS_FILE)
    assert [r["label"] for r in records] == [r["label"] for r in ROWS]


def test_broken_files_fail_naming_the_rule(store, tmp_path):
    (tmp_path / "bad.csv").write_text("id,text\nr1,a,extra\n")
    with pytest.raises(DataQualityError, match="rule 'CSV row has the header's columns': line 2 has 3 fields"):
        ingest_records(IngestConfig(source=str(tmp_path / "bad.csv")), store)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataQualityError, match="rule 'readable Parquet'"):
        ingest_records(IngestConfig(source=str(tmp_path / "bad.parquet")), store)
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(DataQualityError, match="rule 'readable gzip'"):
        ingest_records(IngestConfig(source=str(tmp_path / "bad.jsonl.gz")), store)
