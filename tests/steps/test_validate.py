import json

import pytest

from helpers import all_keys, chat, validate_stats, write_jsonl
from steps.config import IngestConfig, ValidateConfig
from steps.core.errors import DataQualityError
from steps.core.records import validated_records
from steps.ingest import ingest_records
from steps.validate import validate_records

SECRET = "zebra-canary-4417"


def run(store, tmp_path, rows, cfg=ValidateConfig()):
    raw = ingest_records(IngestConfig(source=str(write_jsonl(tmp_path / "raw.jsonl", rows))), store)
    return validate_records(cfg, raw, store)


def test_chat_and_instruction_records_pass_in_chat_form(store, tmp_path):
    rows = [
        chat("hi", "hello", id="a"),
        {"instruction": "Translate", "input": "bonjour", "output": "hello", "system": "be brief"},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "a"}, {"role": "user", "content": "u2"},
                      {"role": "assistant", "content": "a2"}]},
    ]
    ref = run(store, tmp_path, rows)
    out = list(validated_records(store, ref))
    assert [r["id"] for r in out] == ["a", "line-2", "line-3"]
    assert out[1]["messages"] == [{"role": "system", "content": "be brief"},
                                  {"role": "user", "content": "Translate\n\nbonjour"},
                                  {"role": "assistant", "content": "hello"}]
    assert validate_stats(ref) == {"records": 3, "rules": 12, "record_kind": "chat"}
    assert all(r["success"] for r in store.read_json(ref, "report.json")["rules"])


def test_sharegpt_records_pass_in_chat_form_and_unknown_speakers_fail(store, tmp_path):
    rows = [{"id": "s1", "conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"},
                                           {"from": "gpt", "value": "hello"}]},
            {"conversations": [{"from": "user", "value": "2+2?"}, {"from": "assistant", "value": "4"}]}]
    out = list(validated_records(store, run(store, tmp_path, rows)))
    assert out[0] == {"id": "s1", "messages": [{"role": "system", "content": "be brief"},
                                               {"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": "hello"}]}
    assert out[1]["id"] == "line-2" and [m["role"] for m in out[1]["messages"]] == ["user", "assistant"]
    bad = [*rows, {"conversations": [{"from": "narrator", "value": "x"}, {"from": "gpt", "value": "y"}]}]
    with pytest.raises(DataQualityError, match=r"rule 'role is present': 1 of 7 turns fail \(e.g. lines 3\)"):
        run(store, tmp_path, bad)


def test_validated_records_come_from_the_raw_file_in_chat_form_and_no_copy_is_written(store, tmp_path):
    """Extra fields are dropped and a missing or non-string id is filled in; validate's artifact holds no
    records (the raw area is ingest's file only): scrub reads them with ``validated_records``."""
    lines = ['{"messages": [{"role": "user", "content": "caf\\u00e9"}, {"role": "assistant", "content": "ok"}],'
             ' "id": "kept"}',
             json.dumps(chat("q", "a", id="extra") | {"source": "web"}),
             json.dumps(chat("q2", "a2", id=7)),
             json.dumps({"messages": chat("q3", "a3")["messages"]})]
    raw = tmp_path / "raw.jsonl"
    raw.write_text("\n".join(lines) + "\n")
    ref = validate_records(ValidateConfig(), ingest_records(IngestConfig(source=str(raw)), store), store)
    assert list(validated_records(store, ref)) == [chat("café", "ok", id="kept"), chat("q", "a", id="extra"),
                                                   chat("q2", "a2", id="7"), chat("q3", "a3", id="line-4")]
    assert not any(name.endswith(".jsonl") and name != "quarantine.jsonl" for name in store.manifest(ref.key)["files"])


@pytest.mark.parametrize("bad, rule", [
    (f'{{"messages": [{{"role": "user", "content": "{SECRET}"', "line is valid JSON"),
    ({"text": SECRET}, "record is a chat, instruction or ShareGPT record"),
    ({"messages": [{"role": "user", "content": SECRET}, {"role": "user", "content": SECRET}]},
     "roles alternate user/assistant and end with assistant"),
    ({"messages": [{"role": "user", "content": SECRET}, {"role": "bot", "content": SECRET}]},
     "role is one of system, user, assistant, tool"),
    ({"messages": [{"role": "user", "content": SECRET}, {"role": "assistant", "content": "   "}]},
     "content is not empty or blank"),
    ({"messages": [{"role": "user", "content": SECRET}, {"role": "assistant", "content": None}]},
     "content is a string (not null)"),
    ({"messages": [{"role": "user", "content": SECRET * 300}, {"role": "assistant", "content": "ok"}]},
     "content length between 1 and 4000 characters"),
])
def test_each_broken_rule_stops_with_rule_count_and_line_but_no_content(store, tmp_path, bad, rule):
    rows = [chat("fine", "fine"), bad, chat("also fine", "yes")]
    with pytest.raises(DataQualityError) as err:
        run(store, tmp_path, rows)
    message = str(err.value)
    assert f"rule '{rule}': 1 of" in message
    assert "e.g. lines 2" in message
    assert SECRET not in message
    # Nothing past the raw copy was written.
    assert not [k for k in all_keys(store) if "/validate/" in k]


def test_failure_counts_every_bad_record(store, tmp_path):
    rows = [chat("q", "a")] + [{"messages": [{"role": "assistant", "content": "x"}]}] * 7
    with pytest.raises(DataQualityError, match=r"7 of 8 records fail \(e.g. lines 2, 3, 4, 5, 6\)"):
        run(store, tmp_path, rows)


def test_limits_come_from_the_config(store, tmp_path):
    with pytest.raises(DataQualityError, match="content length between 1 and 3 characters"):
        run(store, tmp_path, [chat("four", "ok")], ValidateConfig(max_chars=3))


@pytest.mark.parametrize("kind, good", [("chat", chat("hi", "hello")), ("text", {"text": "a document"}),
                                        ("classification", {"text": "a match", "label": "sport"}),
                                        ("preference", {"prompt": "p", "chosen": "a", "rejected": "b"})])
def test_every_kind_rejects_invalid_utf8_and_control_characters(store, tmp_path, kind, good):
    source = tmp_path / f"{kind}.jsonl"
    other = {"classification": {"text": "b news", "label": "money"}}.get(kind, good)
    lines = [json.dumps(good).encode(), json.dumps(other).encode(),
             json.dumps(good).encode().replace(b"a", b"\xff", 1),
             json.dumps({**good, "id": "ctl"}).encode().replace(b'"ctl"', b'"c\\u0007tl"')]
    source.write_bytes(b"\n".join(lines) + b"\n")
    raw = ingest_records(IngestConfig(source=str(source)), store)
    with pytest.raises(DataQualityError) as failure:
        validate_records(ValidateConfig(record_kind=kind), raw, store)
    message = str(failure.value)
    assert "rule 'line is valid UTF-8': 1 of 4 lines fail (e.g. lines 3)" in message
    assert "rule 'no control characters (other than whitespace)': 1 of 4 lines fail (e.g. lines 4)" in message


def test_form_feeds_and_tabs_are_whitespace_not_control_noise(store, tmp_path):
    source = write_jsonl(tmp_path / "t.jsonl", [{"text": "page one\x0cpage two\twith a tab"}])
    validated = validate_records(ValidateConfig(record_kind="text"), ingest_records(IngestConfig(source=str(source)),
                                                                                     store), store)
    assert validated.stats["records"] == 1


def test_a_passing_gate_stores_gx_data_docs_without_contents(store, tmp_path):
    rows = [chat(f"{SECRET} question {i}", f"answer {i}") for i in range(3)]
    ref = run(store, tmp_path, rows)
    for table in ("lines", "records", "turns"):
        html = store.read_bytes(ref, f"data_docs/{table}.html").decode()
        assert html.startswith("<html>") or "<html" in html[:200]
        assert "Great Expectations" in html and SECRET not in html


def test_a_file_streamed_in_chunks_gets_the_same_verdicts_and_file_line_numbers(store, tmp_path, monkeypatch):
    """Chunks of 2 lines: line numbers, default ids and counts are the file's, and the
    distinct-labels rule sees every chunk (each chunk alone has a single label)."""
    import steps.validate as validate

    monkeypatch.setattr(validate, "CHUNK_LINES", 2)
    rows = [chat(f"q{i}", f"a{i}") for i in range(5)]
    ref = run(store, tmp_path, rows)
    assert [r["id"] for r in validated_records(store, ref)] == [f"line-{n}" for n in range(1, 6)]
    report = store.read_json(ref, "report.json")
    assert {r["rule"]: r["element_count"] for r in report["rules"]}["role is present"] == 10
    with pytest.raises(DataQualityError) as failed:
        run(store, tmp_path, rows + [chat(SECRET, "   ")])
    assert "1 of 12 turns fail (e.g. lines 6)" in str(failed.value) and SECRET not in str(failed.value)
    labeled = [{"text": f"t{i}", "label": "a" if i < 2 else "b"} for i in range(4)]
    ref = run(store, tmp_path, labeled, ValidateConfig(record_kind="classification"))
    assert ref.stats["label_counts"] == {"a": 2, "b": 2}
    with pytest.raises(DataQualityError, match="at least 2 distinct labels': observed 1 across 4"):
        run(store, tmp_path, [{"text": f"t{i}", "label": "a"} for i in range(4)],
            ValidateConfig(record_kind="classification"))


def chats_with_bad_turns(n: int, bad: int) -> list[dict]:
    """``n`` chat records; ``bad`` of them (spread out) have an empty answer."""
    every = n // bad if bad else n + 1
    return [chat(f"question {i}?", "" if bad and i % every == every - 1 and i // every < bad else f"answer {i}.",
                 id=f"c{i:03d}") for i in range(n)]


def test_a_few_bad_records_are_quarantined_by_line_id_and_rule_never_contents(store, tmp_path):
    rows = chats_with_bad_turns(200, 1)  # 0.5%
    (line, bad), = [(i + 1, r) for i, r in enumerate(rows) if not r["messages"][1]["content"]]
    ref = run(store, tmp_path, rows)
    kept = list(validated_records(store, ref))
    assert len(kept) == 199 and bad["id"] not in {r["id"] for r in kept}
    assert ref.stats["quarantined"] == 1 and ref.stats["records"] == 199
    quarantined = store.read_jsonl(ref, "quarantine.jsonl")
    assert [(q["line"], q["id"]) for q in quarantined] == [(line, bad["id"])] and quarantined[0]["rules"]
    assert bad["messages"][0]["content"] not in json.dumps(quarantined)
    assert store.read_json(ref, "report.json")["quarantine_rules"] == ref.stats["quarantine_rules"]


def test_too_many_bad_records_fail_naming_the_rule_and_the_share(store, tmp_path):
    with pytest.raises(DataQualityError, match=r"(?s)content.*10 of 200 records break a rule \(5\.00%\): more than "
                                               r"validate.max_invalid_share \(1\.00%\)"):
        run(store, tmp_path, chats_with_bad_turns(200, 10))
    with pytest.raises(DataQualityError, match="rules broken"):  # on_invalid: fail keeps the all-or-nothing gate
        run(store, tmp_path, chats_with_bad_turns(200, 1), ValidateConfig(on_invalid="fail"))
    assert not [k for k in all_keys(store) if "/validate/" in k and k.endswith("_MANIFEST.json")]  # nothing committed
