"""Chat records with tool calls (OpenAI ``tool_calls`` and ``tool`` results, ShareGPT ``function_call`` and
``observation``): validated for shape and order, scrubbed (arguments too), and tokenized with the calls
and results as context: only the final answers are learned."""

import json

import pytest

from helpers import write_jsonl
from steps.config import IngestConfig, ScrubConfig, TokenizeConfig, ValidateConfig
from steps.core.contract import IGNORE, RECORDS_FILE
from steps.core.errors import ConfigError, DataQualityError
from steps.core.records import validated_records
from steps.ingest import ingest_records
from steps.scrub.step import scrub_records
from steps.validate import validate_records


def call(name: str, arguments: str) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def weather(i: int) -> dict:
    return {"id": f"w{i}", "messages": [
        {"role": "system", "content": "You can look up the weather."},
        {"role": "user", "content": f"What is the weather in city {i}? Mail me at kim{i}@example.com"},
        {"role": "assistant", "content": None,
         "tool_calls": [call("get_weather", json.dumps({"city": f"city {i}", "notify": f"kim{i}@example.com"}))]},
        {"role": "tool", "content": f"{10 + i} C and sunny"},
        {"role": "assistant", "content": f"It is {10 + i} C and sunny in city {i}."}]}


def test_tool_calls_pass_validation_and_broken_ones_name_the_rule(store, tmp_path):
    good = [weather(i) for i in range(3)]
    sharegpt = {"id": "s1", "conversations": [
        {"from": "human", "value": "Weather in Oslo?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})},
        {"from": "observation", "value": "-3 C"}, {"from": "gpt", "value": "It is -3 C in Oslo."}]}
    raw = ingest_records(IngestConfig(source=str(write_jsonl(tmp_path / "ok.jsonl", good + [sharegpt]))), store)
    ref = validate_records(ValidateConfig(), raw, store)
    records = list(validated_records(store, ref))
    assert records[0] == good[0] and records[3]["messages"][1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert records[3]["messages"][2] == {"role": "tool", "content": "-3 C"}
    no_name = weather(9)
    no_name["messages"][2]["tool_calls"] = [{"type": "function", "function": {"arguments": "{}"}}]
    orphan = weather(8)
    del orphan["messages"][2]  # a tool result nobody asked for
    for bad, rule in ((no_name, 'tool calls are assistant turns of {"function": {"name", "arguments"}}'),
                      (orphan, "roles alternate user/assistant and end with assistant")):
        raw = ingest_records(IngestConfig(source=str(write_jsonl(tmp_path / "bad.jsonl", [bad]))), store)
        with pytest.raises(DataQualityError, match=rule.replace("{", r"\{").replace("}", r"\}")):
            validate_records(ValidateConfig(on_invalid="fail"), raw, store)


def test_tool_calls_are_scrubbed_and_only_final_answers_are_learned(store, tmp_path, tiny_model):
    from transformers import AutoTokenizer

    from steps.base_model import prepare_base_model
    from steps.config import BaseModelConfig
    from steps.tokenize.step import tokenize_dataset

    rows = [weather(i) for i in range(24)]
    raw = ingest_records(IngestConfig(source=str(write_jsonl(tmp_path / "tools.jsonl", rows))), store)
    clean = scrub_records(ScrubConfig(near_dedup=False), validate_records(ValidateConfig(), raw, store), store)
    scrubbed = store.read_jsonl(clean, RECORDS_FILE)
    arguments = json.loads(scrubbed[0]["messages"][2]["tool_calls"][0]["function"]["arguments"])
    assert arguments == {"city": "city 0", "notify": "<EMAIL>"} and "example.com" not in json.dumps(scrubbed)

    cfg = TokenizeConfig(eval_fraction=0.25, max_seq_len=256)
    with pytest.raises(ConfigError, match="does not render them; set tokenize.chat_template"):
        tokenize_dataset(cfg, clean, tiny_model, store)  # SmolLM2's template has no tool calls
    chatml = prepare_base_model(BaseModelConfig(source="tiny-random-llama"), store, chat_template="chatml")
    data = tokenize_dataset(cfg, clean, chatml, store)
    tokenizer = AutoTokenizer.from_pretrained(store.download(chatml.base))
    rows_out = store.read_jsonl(data, "train.jsonl")
    assert rows_out and data.stats["truncated"] == 0
    for row in rows_out:
        text = tokenizer.decode(row["input_ids"])
        learned = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE])
        assert "<tool_call>" in text and "get_weather" in text and "C and sunny<|im_end|>" in text
        assert learned.startswith("It is ") and "get_weather" not in learned and learned.count("sunny") == 1
