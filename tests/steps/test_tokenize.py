import pytest

from steps.config import IngestConfig, ScrubConfig, TokenizeConfig, ValidateConfig
from steps.errors import DataQualityError
from steps.ingest import ingest_records
from steps.scrub import scrub_records
from steps.tokenize import IGNORE, encode_chat, in_eval, tokenize_dataset
from steps.validate import validate_records
from helpers import chat, write_jsonl


def clean_dataset(store, tmp_path, rows):
    raw = ingest_records(IngestConfig(source=str(write_jsonl(tmp_path / "raw.jsonl", rows))), store)
    return scrub_records(ScrubConfig(), validate_records(ValidateConfig(), raw, store), store)


def test_only_assistant_tokens_are_labelled(tiny_tokenizer):
    messages = [{"role": "user", "content": "Where is Seoul?"}, {"role": "assistant", "content": "In Korea."},
                {"role": "user", "content": "고마워요"}, {"role": "assistant", "content": "천만에요!"}]
    ids, labels = encode_chat(tiny_tokenizer, messages)
    assert len(ids) == len(labels)
    kept = tiny_tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE])
    assert kept == "In Korea.<|im_end|>천만에요!<|im_end|>"
    assert tiny_tokenizer.decode(ids).startswith("<|im_start|>system\n")


def test_split_is_seeded_and_stable():
    cfg = TokenizeConfig(eval_fraction=0.2, seed=7)
    ids = [f"r{i}" for i in range(2000)]
    first = [in_eval(i, cfg) for i in ids]
    assert first == [in_eval(i, cfg) for i in ids]
    assert 0.17 < sum(first) / len(ids) < 0.23
    assert first != [in_eval(i, TokenizeConfig(eval_fraction=0.2, seed=8)) for i in ids]


def test_tokenize_writes_both_splits_and_eval_prompts(store, tmp_path, tiny_model):
    rows = [chat(f"question {i}", f"answer number {i}") for i in range(60)]
    data = tokenize_dataset(TokenizeConfig(eval_fraction=0.25, max_seq_len=64), clean_dataset(store, tmp_path, rows),
                            tiny_model, store)
    train, evals = store.read_jsonl(data, "train.jsonl"), store.read_jsonl(data, "eval.jsonl")
    prompts = store.read_jsonl(data, "eval_prompts.jsonl")
    assert len(train) + len(evals) == 60 and len(evals) == len(prompts) > 0
    assert {r["id"] for r in train}.isdisjoint(r["id"] for r in evals)
    assert prompts[0]["messages"][-1]["role"] == "user" and prompts[0]["reference"].startswith("answer number")
    assert data.stats["train_records"] == len(train) and data.stats["truncated"] == 0
    assert all(any(label != IGNORE for label in r["labels"]) for r in train)


def test_truncation_that_removes_every_answer_drops_the_record(store, tmp_path, tiny_model):
    rows = [chat("long " * 200, "short answer")] + [chat(f"q{i}", f"a{i}") for i in range(40)]
    data = tokenize_dataset(TokenizeConfig(max_seq_len=64, eval_fraction=0.3), clean_dataset(store, tmp_path, rows),
                            tiny_model, store)
    assert data.stats["truncated"] == 1 and data.stats["dropped_no_answer"] == 1


def test_a_split_left_empty_is_an_error(store, tmp_path, tiny_model):
    with pytest.raises(DataQualityError, match="both splits non-empty"):
        tokenize_dataset(TokenizeConfig(eval_fraction=0.01), clean_dataset(store, tmp_path, [chat("a", "b")]),
                         tiny_model, store)
