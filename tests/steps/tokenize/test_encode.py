"""steps/tokenize/encode.py: long conversations under tokenize.long_conversations: windows at turn
boundaries that keep every answer (learned once), truncation and dropping, in the step's stats."""

import pytest

from helpers import write_jsonl
from steps.config import IngestConfig, ScrubConfig, TokenizeConfig, ValidateConfig
from steps.core.contract import IGNORE
from steps.tokenize.encode import chat_rows, encode_chat, turn_groups

SYSTEM = {"role": "system", "content": "You answer in one short sentence."}


def conversation(turns: int, seed: int = 0) -> list[dict]:
    messages = [SYSTEM]
    for t in range(turns):
        messages += [{"role": "user", "content": f"Question {seed}-{t}: what is {t} times {seed + 2}?"},
                     {"role": "assistant", "content": f"Answer {seed}-{t} is {t * (seed + 2)} exactly."}]
    return messages


def learned(tokenizer, row) -> str:
    return tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE])


def test_turn_groups_end_with_each_answer():
    head, groups = turn_groups(conversation(3))
    assert head == [SYSTEM] and len(groups) == 3
    assert all(group[-1]["role"] == "assistant" and len(group) == 2 for group in groups)


def test_windows_fit_keep_the_system_prompt_and_learn_every_answer_once(tiny_tokenizer):
    record = {"id": "long-1", "messages": conversation(8)}
    ids, labels = encode_chat(tiny_tokenizer, record["messages"])
    cfg = TokenizeConfig(max_seq_len=len(ids) // 3)
    result = chat_rows(tiny_tokenizer, record, ids, labels, cfg)
    assert result.outcomes == ("windowed",) and len(result.rows) >= 3
    assert [row["window"] for row in result.rows] == list(range(len(result.rows)))
    answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
    seen = []
    for row in result.rows:
        assert len(row["input_ids"]) <= cfg.max_seq_len and row["id"] == "long-1"
        text = tiny_tokenizer.decode(row["input_ids"])
        assert SYSTEM["content"] in text
        assert row["labels"][-1] != IGNORE or row["labels"][-2] != IGNORE  # ends with a learned answer
        seen += [a for a in answers if a in learned(tiny_tokenizer, row)]
    assert seen == answers  # every answer, in order, exactly once
    # Windows after the first open with the previous window's last turn, shown but not learned.
    second = tiny_tokenizer.decode(result.rows[1]["input_ids"])
    last_of_first = [a for a in answers if a in learned(tiny_tokenizer, result.rows[0])][-1]
    assert last_of_first in second and last_of_first not in learned(tiny_tokenizer, result.rows[1])
    assert result.prompt["reference"] == answers[-1] and result.prompt["messages"][0] == SYSTEM


@pytest.mark.parametrize(("policy", "outcome", "rows"), [("truncate", "truncated", 1), ("drop", "dropped_long", 0)])
def test_truncate_and_drop(tiny_tokenizer, policy, outcome, rows):
    record = {"id": "long-2", "messages": conversation(6)}
    ids, labels = encode_chat(tiny_tokenizer, record["messages"])
    result = chat_rows(tiny_tokenizer, record, ids, labels, TokenizeConfig(max_seq_len=len(ids) // 2,
                                                                          long_conversations=policy))
    assert result.outcomes == (outcome,) and len(result.rows) == rows
    assert all(len(row["input_ids"]) == len(ids) // 2 for row in result.rows)


def test_a_single_turn_longer_than_max_seq_len_is_truncated(tiny_tokenizer):
    messages = conversation(2)
    messages[2]["content"] = "long " * 300
    ids, labels = encode_chat(tiny_tokenizer, messages)
    result = chat_rows(tiny_tokenizer, {"id": "x", "messages": messages}, ids, labels, TokenizeConfig(max_seq_len=64))
    assert result.outcomes == ("truncated",) and len(result.rows[0]["input_ids"]) == 64


def test_the_step_windows_long_conversations_and_loses_no_answer(store, tmp_path, tiny_model, tiny_tokenizer):
    from steps.ingest import ingest_records
    from steps.scrub.step import scrub_records
    from steps.tokenize.step import tokenize_dataset
    from steps.validate import validate_records

    rows = [{"id": f"c{i}", "messages": conversation(2 + i % 7, seed=i)} for i in range(40)]
    raw = ingest_records(IngestConfig(source=str(write_jsonl(tmp_path / "long.jsonl", rows))), store)
    clean = scrub_records(ScrubConfig(near_dedup=False), validate_records(ValidateConfig(), raw, store), store)
    data = tokenize_dataset(TokenizeConfig(max_seq_len=96, eval_fraction=0.25), clean, tiny_model, store)
    assert data.stats["windowed"] > 10 and data.stats["truncated"] == 0 and data.stats["dropped_long"] == 0
    learned_text = {}
    for side in ("train", "eval"):
        for row in store.read_jsonl(data, f"{side}.jsonl"):
            assert len(row["input_ids"]) <= 96
            learned_text[row["id"]] = learned_text.get(row["id"], "") + learned(tiny_tokenizer, row)
    assert set(learned_text) == {r["id"] for r in rows}
    for record in rows:
        for message in record["messages"]:
            if message["role"] == "assistant":
                assert learned_text[record["id"]].count(message["content"]) == 1
    prompts = store.read_jsonl(data, "eval_prompts.jsonl")
    assert prompts and all(p["messages"][-1]["role"] == "user" for p in prompts)
