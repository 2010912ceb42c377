import json

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
