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
    from steps.core.records import validated_records
    from steps.validate import validate_records

    raw = ingest_records(IngestConfig(source=str(file_of(kind, tmp_path))), store)
    assert [json.loads(line) for line in store.read_bytes(raw, "raw.jsonl").splitlines()] == ROWS
    records = list(validated_records(store, validate_records(ValidateConfig(record_kind="classification"), raw,
                                                             store)))
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


def test_a_folder_and_an_s3_prefix_of_many_files_are_read_in_name_order(store, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", ROWS[3:])
    (folder / "a.jsonl").write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in ROWS[:3]).rstrip(b"\n"))
    (folder / "notes.txt").write_text("not records")
    raw = ingest_records(IngestConfig(source=str(folder)), store)
    assert [json.loads(line) for line in store.read_bytes(raw, RAW_FILE).splitlines()] == ROWS
    assert raw.stats["format"] == "classification"
    for name in ("a.jsonl", "b.jsonl"):
        store.client.upload_file(str(folder / name), store.bucket, f"{store.prefix}/incoming/{name}")
    from_s3 = ingest_records(IngestConfig(source=f"s3://{store.bucket}/{store.prefix}/incoming/"), store)
    assert store.read_bytes(from_s3, RAW_FILE) == store.read_bytes(raw, RAW_FILE)
    with pytest.raises(ConfigError, match="no objects under this prefix"):
        ingest_records(IngestConfig(source=f"s3://{store.bucket}/{store.prefix}/nothing/"), store)


def test_an_alpaca_json_array_file(store, tmp_path):
    rows = [{"instruction": f"Add {i} and 1", "input": "", "output": str(i + 1)} for i in range(5)]
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps(rows, indent=2))
    raw = ingest_records(IngestConfig(source=str(path)), store)
    assert store.read_jsonl(raw, RAW_FILE) == rows and raw.stats["format"] == "alpaca"


def chats(prefix: str, n: int) -> list[dict]:
    return [chat(f"{prefix} question {i}", f"{prefix} answer {i}", id=f"{prefix}-{i}") for i in range(n)]


def test_a_weighted_mixture_honours_the_weights_and_is_seeded(store, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", chats("a", 1000))
    b = write_jsonl(tmp_path / "b.jsonl", chats("b", 600))
    cfg = IngestConfig(sources=[{"source": str(a), "weight": 3}, {"source": str(b), "weight": 1}], seed=7)
    raw = ingest_records(cfg, store)
    rows = store.read_jsonl(raw, RAW_FILE)
    share = sum(r["id"].startswith("a-") for r in rows) / len(rows)
    assert abs(share - 0.75) <= 0.02 and len(rows) == 1000 + 333  # a runs out first: 1000 of a, 333 of b
    assert len({r["id"] for r in rows}) == len(rows)  # sampled without replacement
    assert [r["id"][0] for r in rows[:40]] != sorted(r["id"][0] for r in rows[:40])  # interleaved
    sources = raw.stats["sources"]
    assert [(s["records"], s["taken"], s["share"]) for s in sources] == [(1000, 1000, 0.7502), (600, 333, 0.2498)]
    again = ingest_records(cfg, store)
    assert again == raw  # same config and files: same bytes, same artifact
    other = ingest_records(cfg.model_copy(update={"seed": 8}), store)
    assert store.read_bytes(other, RAW_FILE) != store.read_bytes(raw, RAW_FILE)


def test_max_records_caps_a_source_and_weights_go_with_every_source(store, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", chats("a", 50))
    b = write_jsonl(tmp_path / "b.jsonl", chats("b", 50))
    raw = ingest_records(IngestConfig(sources=[{"source": str(a), "max_records": 10}, {"source": str(b)}]), store)
    assert [s["taken"] for s in raw.stats["sources"]] == [10, 50]
    with pytest.raises(ValueError, match="every source needs a weight"):
        IngestConfig(sources=[{"source": str(a), "weight": 1}, {"source": str(b)}])


def test_columns_map_the_users_fields(store, tmp_path):
    rows = [{"review": f"text {i}", "stars": "good" if i % 2 else "bad"} for i in range(4)]
    path = write_jsonl(tmp_path / "reviews.jsonl", rows)
    with pytest.raises(ConfigError, match=r"no known record format .*fields: review, stars.*ingest.columns"):
        ingest_records(IngestConfig(source=str(path)), store)
    raw = ingest_records(IngestConfig(source=str(path), columns={"text": "review", "label": "stars"}), store)
    assert store.read_jsonl(raw, RAW_FILE)[1] == {"text": "text 1", "label": "good"}
    assert raw.stats["format"] == "classification"
