"""steps/tokenize/step.py: the step end to end on chat records: labels on answers only, both splits and
the eval prompts, truncation, the gates and the leakage check (other kinds: tests/kinds/)."""

import pytest

from helpers import chat, write_jsonl
from steps.config import IngestConfig, ScrubConfig, TokenizeConfig, ValidateConfig
from steps.core.contract import IGNORE
from steps.core.errors import DataQualityError
from steps.ingest import ingest_records
from steps.scrub.step import scrub_records
from steps.tokenize.encode import encode_chat
from steps.tokenize.step import tokenize_dataset
from steps.validate import validate_records


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


def test_the_truncation_gate_names_the_rule_and_the_share(store, tmp_path, tiny_model):
    from helpers import chat, sft_dataset, write_jsonl  # noqa: F401
    from steps.config import IngestConfig, ScrubConfig, TokenizeConfig, ValidateConfig
    from steps.core.errors import DataQualityError
    from steps.ingest import ingest_records
    from steps.scrub.step import scrub_records
    from steps.tokenize.step import tokenize_dataset
    from steps.validate import validate_records

    rows = [chat(f"question {i}", "a long answer " * (40 if i % 2 else 1)) for i in range(20)]
    raw = ingest_records(IngestConfig(source=str(write_jsonl(tmp_path / "r.jsonl", rows))), store)
    clean = scrub_records(ScrubConfig(), validate_records(ValidateConfig(), raw, store), store)
    ok = tokenize_dataset(TokenizeConfig(max_seq_len=64, eval_fraction=0.2, max_truncated_share=1.0), clean,
                          tiny_model, store)
    assert ok.stats["truncated_share"] == 0.5
    with pytest.raises(DataQualityError, match=r"truncated share at most 25%': 10 of 20 records \(50.0%\)"):
        tokenize_dataset(TokenizeConfig(max_seq_len=64, eval_fraction=0.2, max_truncated_share=0.25), clean,
                         tiny_model, store)


def test_eval_records_that_nearly_copy_a_train_record_are_dropped(store, tmp_path, tiny_model):
    from steps.tokenize.split import in_eval as goes_to_eval

    cfg = TokenizeConfig(max_seq_len=64, eval_fraction=0.3)
    rows = [chat(f"Tell me fact number {i} about the moon {'x' * i}", f"Fact {i}: the moon is {i} km away.",
                 id=f"r{i}") for i in range(30)]
    train_row = next(r for r in rows if not goes_to_eval(r["id"], cfg))
    eval_ids = [r["id"] for r in rows if goes_to_eval(r["id"], cfg)]
    copy = dict(train_row, id=next(f"c{i}" for i in range(100) if goes_to_eval(f"c{i}", cfg)))
    copy["messages"] = [dict(m) for m in train_row["messages"]]
    copy["messages"][1]["content"] += "!"  # a near copy, not an exact one
    raw = ingest_records(IngestConfig(source=str(write_jsonl(tmp_path / "r.jsonl", rows + [copy]))), store)
    # scrub's own near dedup would drop the copy first; off here, so tokenize's leakage check is what is tested
    clean = scrub_records(ScrubConfig(near_dedup=False), validate_records(ValidateConfig(), raw, store), store)
    data = tokenize_dataset(cfg, clean, tiny_model, store)
    assert data.stats["eval_leakage_removed"] == 1
    kept = {r["id"] for r in store.read_jsonl(data, "eval.jsonl")}
    assert copy["id"] not in kept and kept == set(eval_ids)
    off = tokenize_dataset(cfg.model_copy(update={"leakage_threshold": None}), clean, tiny_model, store)
    assert copy["id"] in {r["id"] for r in store.read_jsonl(off, "eval.jsonl")}




@pytest.mark.parametrize("kind", ["chat", "classification"])
def test_a_source_pinned_to_a_side_lands_there_whole(store, tmp_path, tiny_model, tiny_encoder, kind):
    """ingest.sources[].split: every record of the pinned source reaches that side through validate,
    scrub and tokenize (chat: the streamed path; classification: the in-memory one); the others split
    by the hash, and the stats count the pinned records."""
    from helpers import labelled_rows
    from steps.core.contract import PINNED_SPLIT, RAW_FILE, RECORDS_FILE

    if kind == "chat":
        rows, model = [chat(f"question {i}", f"answer number {i}", id=f"r{i:03d}") for i in range(60)], tiny_model
    else:
        rows, model = labelled_rows("classification", n=60), tiny_encoder
    held_out = [{**r, "id": f"held-{r['id']}"} for r in rows[:12]]
    extra = [{**r, "id": f"extra-{r['id']}"} for r in rows[12:20]]
    sources = [{"source": str(write_jsonl(tmp_path / "main.jsonl", rows[20:]))},
               {"source": str(write_jsonl(tmp_path / "held.jsonl", held_out)), "split": "eval"},
               {"source": str(write_jsonl(tmp_path / "extra.jsonl", extra)), "split": "train"}]
    raw = ingest_records(IngestConfig(sources=sources), store)
    assert [s.get("split") for s in raw.stats["sources"]] == [None, "eval", "train"]
    raw_rows = store.read_jsonl(raw, RAW_FILE)
    assert {r["id"] for r in raw_rows if r.get(PINNED_SPLIT) == "eval"} == {r["id"] for r in held_out}
    clean = scrub_records(ScrubConfig(), validate_records(ValidateConfig(record_kind=kind), raw, store), store)
    scrubbed = store.read_jsonl(clean, RECORDS_FILE)
    assert {r["id"]: r.get("split") for r in scrubbed if "split" in r} == \
        {**{r["id"]: "eval" for r in held_out}, **{r["id"]: "train" for r in extra}}

    data = tokenize_dataset(TokenizeConfig(eval_fraction=0.1, max_seq_len=64, leakage_threshold=None), clean, model,
                            store)
    eval_ids = {r["id"] for r in store.read_jsonl(data, "eval.jsonl")}
    train_ids = {r["id"] for r in store.read_jsonl(data, "train.jsonl")}
    assert {r["id"] for r in held_out} <= eval_ids and {r["id"] for r in extra} <= train_ids
    assert eval_ids - {r["id"] for r in held_out}  # the unpinned source still gives eval records by the hash
    assert data.stats["pinned"] == {"train": len(extra), "eval": len(held_out)}
