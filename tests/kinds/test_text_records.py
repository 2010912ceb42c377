"""Continued pretraining, data side: the konlpy text source, the text validation suite,
and scrubbing of text records."""

import importlib.util
import sys
from pathlib import Path

import pytest

from helpers import all_keys, chat, validate_stats, write_jsonl
from steps.config import IngestConfig, ScrubConfig, ValidateConfig
from steps.core.contract import RAW_FILE, RECORDS_FILE
from steps.core.errors import ConfigError, DataQualityError
from steps.core.records import validated_records
from steps.ingest import ingest_records
from steps.scrub.step import scrub_records
from steps.validate import validate_records

SECRET = "zebra-canary-4417"
TEXT = ValidateConfig(record_kind="text")


def ingest(store, tmp_path, rows):
    return ingest_records(IngestConfig(source=str(write_jsonl(tmp_path / "raw.jsonl", rows))), store)


def test_konlpy_source_is_one_sorted_text_record_per_file(store):
    corpus = Path(importlib.util.find_spec("konlpy").origin).parent / "data" / "corpus"
    files = sorted(corpus.glob("kolaw/*.txt")) + sorted(corpus.glob("kobill/*.txt"))
    ref = ingest_records(IngestConfig(source="konlpy:kolaw,kobill"), store)
    rows = store.read_jsonl(ref, RAW_FILE)
    ids = [r["id"] for r in rows]
    assert len(rows) == len(files) == ref.stats["lines"] == 11
    assert ids == sorted(ids) and "kolaw/constitution" in ids and ids[0] == "kobill/1809890"
    assert all(set(r) == {"id", "text"} for r in rows)
    constitution = next(r["text"] for r in rows if r["id"] == "kolaw/constitution")
    assert constitution == (corpus / "kolaw" / "constitution.txt").read_text(encoding="utf-8")
    assert constitution.startswith("대한민국헌법")
    # The order of the names does not change the bytes; konlpy (Java-backed) is never imported.
    assert ingest_records(IngestConfig(source="konlpy:kobill, kolaw"), store).digest == ref.digest
    assert "konlpy" not in sys.modules


def test_unknown_konlpy_corpus_is_a_config_error(store):
    with pytest.raises(ConfigError, match=r"konlpy has no corpus 'kowiki' \(known: kobill, kolaw\)"):
        ingest_records(IngestConfig(source="konlpy:kolaw,kowiki"), store)
    assert all_keys(store) == []


def test_text_records_pass_in_text_form(store, tmp_path):
    rows = [{"id": "doc-a", "text": "First document.\n\nSecond paragraph."}, {"text": "No id here.", "source": "x"}]
    ref = validate_records(TEXT, ingest(store, tmp_path, rows), store)
    assert list(validated_records(store, ref)) == [
        {"id": "doc-a", "text": "First document.\n\nSecond paragraph."}, {"id": "line-2", "text": "No id here."}]
    assert validate_stats(ref) == {"records": 2, "rules": 7, "record_kind": "text"}
    report = store.read_json(ref, "report.json")
    assert report["success"] and {r["table"] for r in report["rules"]} == {"lines", "records", "texts"}


@pytest.mark.parametrize("bad, rule, table", [
    (f'{{"text": "{SECRET}"', "line is valid JSON", "records"),
    (chat(SECRET, SECRET), 'record is a text record with a "text" field', "records"),
    ([SECRET], 'record is a text record with a "text" field', "records"),
    ({"text": None, "note": SECRET}, "text is a string (not null)", "texts"),
    ({"text": 4417}, "text is a string (not null)", "texts"),
    ({"text": " \n\t "}, "text is not empty or blank", "texts"),
    ({"text": SECRET * 10}, "text length between 1 and 100 characters", "texts"),
])
def test_each_broken_text_rule_stops_with_rule_count_and_line_but_no_content(store, tmp_path, bad, rule, table):
    rows = [{"text": "fine"}, bad, {"text": "also fine"}]
    with pytest.raises(DataQualityError) as err:
        validate_records(TEXT.model_copy(update={"max_text_chars": 100}), ingest(store, tmp_path, rows), store)
    message = str(err.value)
    assert "as text records: 1 of 7 rules broken" in message
    assert f"rule '{rule}': 1 of" in message and f" {table} fail (e.g. lines 2)" in message
    assert SECRET not in message
    assert not [k for k in all_keys(store) if "/validate/" in k]


def test_a_file_of_the_other_kind_is_refused_and_stray_records_fail_the_shape_rule(store, tmp_path):
    from steps.core.errors import ConfigError

    chats = ingest(store, tmp_path, [chat("q", "a"), chat("q2", "a2")])
    with pytest.raises(ConfigError, match="record_kind is 'text', but ingest found 'messages' records"):
        validate_records(TEXT, chats, store)
    texts = ingest(store, tmp_path, [{"text": "a document"}, {"text": "another"}, chat("q", "a")])
    with pytest.raises(DataQualityError, match=r"rule 'record is a text record with a \"text\" field': 1 of 3 records"):
        validate_records(TEXT.model_copy(update={"on_invalid": "fail"}), texts, store)
    mixed = ingest(store, tmp_path, [chat("q", "a"), chat("q2", "a2"), {"text": "a document"}])
    with pytest.raises(DataQualityError, match=r"as chat records: .*\n.*rule 'record is a chat, instruction or "
                                               r"ShareGPT record': 1 of 3 records fail \(e.g. lines 3\)"):
        validate_records(ValidateConfig(on_invalid="fail"), mixed, store)


def test_text_length_limit_is_separate_from_the_chat_message_limit(store, tmp_path):
    long_text = {"text": "법 " * 3000}  # 6,000 characters: over max_chars (4,000), a normal document length
    assert validate_records(TEXT, ingest(store, tmp_path, [long_text]), store).stats["records"] == 1


def test_text_records_are_normalized_redacted_and_deduplicated(store, tmp_path):
    rows = [
        {"id": "a", "text": "Contact: jane@example.com\n\n\n\nCall 010-1234-5678   today.\u200b"},
        {"id": "b", "text": "Contact: jane@example.com\n\nCall 010-1234-5678 today."},  # same after normalization
        {"id": "c", "text": "제 주민번호는 900101-1234568 입니다"},
    ]
    validated = validate_records(TEXT, ingest(store, tmp_path, rows), store)
    ref = scrub_records(ScrubConfig(), validated, store)
    assert store.read_jsonl(ref, RECORDS_FILE) == [
        {"id": "a", "text": "Contact: <EMAIL>\n\nCall <PHONE> today."},
        {"id": "c", "text": "제 주민번호는 <KR_RRN> 입니다"},
    ]
    assert ref.stats == {"record_kind": "text", "records_in": 3, "records_out": 2, "duplicates_removed": 1,
                         "pii": {"EMAIL": 2, "PHONE": 2, "CREDIT_CARD": 0, "KR_RRN": 1, "US_SSN": 0, "IP_ADDRESS": 0,
                                 "URL_CREDENTIALS": 0, "SECRET": 0}, "near_duplicates_removed": 0,
                         "pii_only_records": 0}
    assert "jane" not in str(store.manifest(ref.key))
