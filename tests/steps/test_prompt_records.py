"""Prompt records for online RL (validate.record_kind 'prompt'): the built-in arithmetic source, format
detection, the validation suite (errors name the rule and the line, never the content), scrub and tokenize."""

from __future__ import annotations

import json

import pytest

from helpers import write_jsonl
from steps.config import IngestConfig, ScrubConfig, TokenizeConfig, ValidateConfig
from steps.core.errors import ConfigError, DataQualityError
from steps.core.records import validated_records
from steps.ingest import ingest_records
from steps.ingest.corpora import arithmetic_jsonl
from steps.ingest.formats import formats_of
from steps.validate import validate_records

SECRET = "zebra-canary-4417"


def test_arithmetic_source_is_seeded_distinct_and_correct():
    lines = [json.loads(line) for line in arithmetic_jsonl(["300", "7"]).decode().splitlines()]
    assert len(lines) == 300 and len({r["prompt"] for r in lines}) == 300
    assert arithmetic_jsonl(["300", "7"]) == arithmetic_jsonl(["300", "7"]) != arithmetic_jsonl(["300", "8"])
    assert lines[0]["id"] == "arithmetic/0" and set(lines[0]) == {"id", "prompt", "answer"}
    for r in lines:
        question = r["prompt"].removeprefix("What is ").removesuffix("? Answer with the number only.")
        a, op, b = question.split()
        assert int(r["answer"]) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] >= 0
    assert {r["prompt"].split()[3] for r in lines} == {"+", "-", "*"}
    assert len(arithmetic_jsonl([]).decode().splitlines()) == 1000
    assert {int(n) for r in map(json.loads, arithmetic_jsonl(["90", "0", "9"]).decode().splitlines())
            for n in r["prompt"].removeprefix("What is ").removesuffix("? Answer with the number only.").split()[::2]
            } <= set(range(1, 10))
    for bad in (["0"], ["x"], ["1", "2", "3", "4"], ["5", "0", "1"], ["20000"], ["300", "0", "9"]):
        with pytest.raises(ConfigError, match="arithmetic"):
            arithmetic_jsonl(bad)


def test_prompt_format_is_detected_and_not_confused_with_preference():
    assert formats_of({"prompt": "q", "answer": "a"}) == {"prompt"}
    assert formats_of({"prompt": "q"}) == {"prompt"}
    assert formats_of({"prompt": "q", "chosen": "a", "rejected": "b"}) == {"preference"}


def run(store, tmp_path, rows, **cfg):
    raw = ingest_records(IngestConfig(source=str(write_jsonl(tmp_path / "raw.jsonl", rows)), format="prompt"), store)
    return validate_records(ValidateConfig(record_kind="prompt", **cfg), raw, store)


def test_prompt_records_pass_in_their_form(store, tmp_path):
    ref = run(store, tmp_path, [{"id": "a", "prompt": "What is 1 + 1?", "answer": "2"}, {"prompt": "Say hi."}])
    assert ref.stats["record_kind"] == "prompt"
    assert list(validated_records(store, ref)) == [{"id": "a", "prompt": "What is 1 + 1?", "answer": "2"},
                                                   {"id": "line-2", "prompt": "Say hi."}]


@pytest.mark.parametrize("bad, rule", [
    ({"text": SECRET}, 'record is a prompt record with a "prompt" field (and no "chosen"/"rejected")'),
    ({"prompt": SECRET, "chosen": SECRET, "rejected": "x"},
     'record is a prompt record with a "prompt" field (and no "chosen"/"rejected")'),
    ({"prompt": None}, "prompt is a string (not null)"),
    ({"prompt": "   "}, "prompt is not empty or blank"),
    ({"prompt": SECRET * 300}, "prompt length between 1 and 4000 characters"),
    ({"prompt": SECRET, "answer": 42}, "answer, when given, is a non-blank string"),
    ({"prompt": SECRET, "answer": "  "}, "answer, when given, is a non-blank string"),
])
def test_each_broken_prompt_rule_names_rule_and_line_but_no_content(store, tmp_path, bad, rule):
    rows = [{"prompt": "fine", "answer": "1"}, bad, {"prompt": "also fine"}]
    with pytest.raises(DataQualityError) as err:
        run(store, tmp_path, rows)
    message = str(err.value)
    assert f"rule '{rule}': 1 of" in message and "e.g. lines 2" in message
    assert SECRET not in message


def test_scrub_redacts_the_prompt_and_keeps_the_answer_and_tokenize_renders_a_generation_prompt(
        store, tmp_path, tiny_model, tiny_tokenizer):
    from steps.scrub.step import scrub_records
    from steps.tokenize.step import tokenize_dataset

    rows = [{"id": f"r{i}", "prompt": f"Mail bob{i}@example.com the sum of {i} and {i}.", "answer": f"{2 * i}"}
            for i in range(12)] + [{"id": "free", "prompt": "Say hi."}]
    clean = scrub_records(ScrubConfig(near_dedup=False), run(store, tmp_path, rows), store)
    records = store.read_jsonl(clean, "records.jsonl")
    assert records[0] == {"id": "r0", "prompt": "Mail <EMAIL> the sum of 0 and 0.", "answer": "0"}
    assert records[-1] == {"id": "free", "prompt": "Say hi."}
    data = tokenize_dataset(TokenizeConfig(eval_fraction=0.3, leakage_threshold=None), clean, tiny_model, store)
    assert data.stats["task"] == "rl"
    rows_out = store.read_jsonl(data, "train.jsonl") + store.read_jsonl(data, "eval.jsonl")
    assert len(rows_out) == 13
    by_id = {r["id"]: r for r in rows_out}
    expected = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}], tokenize=False,
                                                  add_generation_prompt=True)
    assert tiny_tokenizer.decode(by_id["free"]["input_ids"]) == expected and "answer" not in by_id["free"]
    assert by_id["r3"]["answer"] == "6" and by_id["r3"]["prompt"] == "Mail <EMAIL> the sum of 3 and 3."
    prompts = store.read_jsonl(data, "eval_prompts.jsonl")
    assert len(prompts) == data.stats["eval_records"] and prompts[0]["messages"][0]["role"] == "user"
