"""steps/ingest/formats.py: the record format detected from the fields, ambiguity named, and the
validate step refusing a format its record kind does not read."""

import json

import pytest

from steps.core.errors import ConfigError
from steps.ingest.formats import detect_format, formats_of


def lines(rows):
    return [json.dumps(r).encode() + b"\n" for r in rows]


@pytest.mark.parametrize(("record", "fmt"), [
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, "sharegpt"),
    ({"instruction": "add", "input": "1 1", "output": "2"}, "alpaca"),
    ({"instruction": "add", "response": "2"}, "alpaca"),
    ({"prompt": "p", "chosen": "c", "rejected": "r"}, "preference"),
    ({"text": "t", "label": "a"}, "classification"),
    ({"text": "t", "label": 0.5}, "regression"),
    ({"text": "t"}, "text"),
])
def test_each_format_is_told_by_its_fields(record, fmt):
    assert formats_of(record) == {fmt}
    assert detect_format(lines([record] * 3), "auto", "f.jsonl") == fmt


def test_a_record_of_two_kinds_is_ambiguous_and_the_error_lists_the_candidates():
    rows = [{"messages": [], "text": "t"}]
    with pytest.raises(ConfigError, match=r"f.jsonl line 1 fits several record formats \(messages, text\): set "
                                          "ingest.format"):
        detect_format(lines(rows), "auto", "f.jsonl")
    assert detect_format(lines(rows), "messages", "f.jsonl") == "messages"  # declared: no detection


def test_the_majority_format_wins_over_a_few_broken_records_and_chat_shapes_mix():
    rows = [{"text": "t", "label": "a"}] * 9 + [{"text": "no label"}]
    assert detect_format(lines(rows) + [b"not json\n"], "auto", "f") == "classification"
    mixed = [{"messages": []}] * 3 + [{"instruction": "i", "output": "o"}] * 2
    assert detect_format(lines(mixed), "auto", "f") == "messages"
    tie = [{"text": "t", "label": "a"}, {"prompt": "p", "chosen": "c", "rejected": "r"}]
    with pytest.raises(ConfigError, match="as often one format as another"):
        detect_format(lines(tie), "auto", "f")


def test_validate_refuses_a_format_its_kind_does_not_read(store, tmp_path):
    from helpers import write_jsonl
    from steps.config import IngestConfig, ValidateConfig
    from steps.ingest import ingest_records
    from steps.validate import validate_records

    raw = ingest_records(IngestConfig(source=str(write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "p", "chosen": "c", "rejected": "r"}]))), store)
    with pytest.raises(ConfigError, match="record_kind is 'classification', but ingest found 'preference' records"):
        validate_records(ValidateConfig(record_kind="classification"), raw, store)
