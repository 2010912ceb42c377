from helpers import chat, write_jsonl
from steps.config import IngestConfig, ScrubConfig, ValidateConfig
from steps.core.contract import RECORDS_FILE
from steps.ingest import ingest_records
from steps.scrub.step import scrub_records
from steps.validate import validate_records


def scrub(store, tmp_path, rows, cfg=ScrubConfig()):
    raw = ingest_records(IngestConfig(source=str(write_jsonl(tmp_path / "raw.jsonl", rows))), store)
    return scrub_records(cfg, validate_records(ValidateConfig(), raw, store), store)


def test_pii_is_replaced_and_counted_by_type(store, tmp_path):
    rows = [
        chat("Mail me at Jane.Doe+ml@Example.com or call (415) 555-0132", "Card 4111 1111 1111 1111 noted."),
        chat("제 번호는 010-1234-5678 이고 주민번호는 900101-1234568 입니다", "SSN 123-45-6789 from 192.168.0.12"),
    ]
    ref = scrub(store, tmp_path, rows)
    out = store.read_jsonl(ref, RECORDS_FILE)
    assert out[0]["messages"][0]["content"] == "Mail me at <EMAIL> or call <PHONE>"
    assert out[0]["messages"][1]["content"] == "Card <CREDIT_CARD> noted."
    assert out[1]["messages"][0]["content"] == "제 번호는 <PHONE> 이고 주민번호는 <KR_RRN> 입니다"
    assert out[1]["messages"][1]["content"] == "SSN <US_SSN> from <IP_ADDRESS>"
    assert ref.stats["pii"] == {"EMAIL": 1, "PHONE": 2, "CREDIT_CARD": 1, "KR_RRN": 1, "US_SSN": 1, "IP_ADDRESS": 1,
                                "URL_CREDENTIALS": 0, "SECRET": 0}
    manifest = store.manifest(ref.key)
    assert "Jane" not in str(manifest) and "4111" not in str(manifest)


def test_look_alikes_are_kept(store, tmp_path):
    text = "Order 12345 shipped 2024-01-15, version 2.10.3, total $1,234.56; card 4111 1111 1111 1112"
    ref = scrub(store, tmp_path, [chat(text, "ok")])
    assert store.read_jsonl(ref, RECORDS_FILE)[0]["messages"][0]["content"] == text
    assert sum(ref.stats["pii"].values()) == 0


def test_normalization_and_exact_dedup(store, tmp_path):
    rows = [
        chat("Hello   world\u200b", "Ｈｉ\tthere"),
        chat("Hello world", "Hi there"),          # same after normalization
        chat("Different", "text"),
        chat("Hello world", "Hi there"),
    ]
    ref = scrub(store, tmp_path, rows)
    out = store.read_jsonl(ref, RECORDS_FILE)
    assert [m["content"] for m in out[0]["messages"]] == ["Hello world", "Hi there"]
    assert len(out) == 2
    assert ref.stats | {"pii": None} == {"record_kind": "chat", "records_in": 4, "records_out": 2,
                                         "duplicates_removed": 2, "near_duplicates_removed": 0, "pii": None,
                                         "pii_only_records": 0}


def test_dedup_can_be_switched_off(store, tmp_path):
    ref = scrub(store, tmp_path, [chat("a", "b")] * 3, ScrubConfig(dedup=False))
    assert ref.stats["records_out"] == 3


def test_near_duplicates_are_dropped_with_a_cluster_report(store, tmp_path):
    base = "Our delivery to Busan takes three days, and express shipping costs twelve dollars extra per order."
    rows = [chat("When will it arrive?", base, id="first"),
            chat("When will it arrive?", base.replace("three days", "three business days"), id="near"),
            chat("Do you ship abroad?", "Yes, to forty countries in Asia, Europe and the Americas.", id="other")]
    ref = scrub(store, tmp_path, rows)
    assert [r["id"] for r in store.read_jsonl(ref, RECORDS_FILE)] == ["first", "other"]
    assert ref.stats["near_duplicates_removed"] == 1 and ref.stats["duplicates_removed"] == 1
    report = store.read_json(ref, "dedup_report.json")
    assert report["removed"] == 1 and report["largest"][0]["ids"] == ["first", "near"]
    assert "Busan" not in str(report)
    off = scrub(store, tmp_path, rows, ScrubConfig(near_dedup=False))
    assert off.stats["records_out"] == 3


def test_a_file_of_copies_stops_with_the_duplicate_rule(store, tmp_path):
    import pytest

    from steps.core.errors import DataQualityError

    rows = [chat("How do I reset it?", "Open Settings.")] * 10 + [chat("Other", "question")]
    with pytest.raises(DataQualityError, match=r"scrub of .*raw.jsonl: rule 'at most 50% of records are duplicates': "
                                               r"9 of 11 records \(81.8%\) repeat an earlier record .*"
                                               r"\(e.g. records line-2, line-3, line-4, line-5, line-6\)"):
        scrub(store, tmp_path, rows, ScrubConfig(max_duplicate_share=0.5))
    assert not [k for k in store.list_keys(store.prefix + "/") if "/scrub/" in k]  # nothing written
    assert scrub(store, tmp_path, rows).stats["duplicates_removed"] == 9  # the default allows 90%


def test_records_that_are_nothing_but_pii_are_quarantined_and_stop_the_run_past_the_share(store, tmp_path):
    import pytest

    from steps.core.errors import DataQualityError

    rows = [chat("jane.doe@example.com", "010-2345-6789"), chat("4111 1111 1111 1111", "192.0.2.44"),
            chat("Mail jane.doe@example.com", "Noted."), chat("What is two plus two?", "Four.")]
    with pytest.raises(DataQualityError, match=r"rule 'at most 25% of records are nothing but PII': 2 of 4 records "
                                               r"\(50.0%\) hold no letter once PII is replaced \(e.g. records line-1, "
                                               r"line-2\)") as failure:
        scrub(store, tmp_path, rows, ScrubConfig(max_pii_only_share=0.25))
    assert "jane" not in str(failure.value) and "010" not in str(failure.value)
    for action in ("placeholder", "mask"):  # a mask keeps no letter either
        ref = scrub(store, tmp_path, rows, ScrubConfig(pii_action=action))
        assert ref.stats["pii_only_records"] == 2 and ref.stats["records_out"] == 2  # quarantined, not kept
        rule = "at most 50% of records are nothing but PII"
        assert ref.stats["quarantined"] == 2 and ref.stats["quarantine_rules"] == {rule: 2}
        assert store.read_jsonl(ref, "quarantine.jsonl") == [{"id": "line-1", "rules": [rule]},
                                                             {"id": "line-2", "rules": [rule]}]
        assert [r["id"] for r in store.read_jsonl(ref, RECORDS_FILE)] == ["line-3", "line-4"]


def test_ids_are_scrubbed_too_and_stay_distinct(store, tmp_path):
    rows = [chat("first question", "first answer", id="jane.doe@example.com"),
            chat("second question", "second answer", id="bob@example.org"),
            chat("third question", "third answer", id="plain-3")]
    ref = scrub(store, tmp_path, rows)
    ids = [r["id"] for r in store.read_jsonl(ref, RECORDS_FILE)]
    assert ids[2] == "plain-3" and len(set(ids)) == 3
    assert all(i.startswith("<EMAIL>#") and len(i) == len("<EMAIL>#") + 10 for i in ids[:2])
    assert "example" not in store.get_bytes(f"{ref.key}/{RECORDS_FILE}").decode()
    assert ref.stats["pii"]["EMAIL"] == 2
    again = scrub(store, tmp_path, rows, ScrubConfig(dedup=False))  # the same record: the same id
    assert [r["id"] for r in store.read_jsonl(again, RECORDS_FILE)] == ids
