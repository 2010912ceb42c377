"""Continued pretraining, tokenize side: documents split by id, joined by EOS, packed
into blocks of exactly max_seq_len tokens with labels = input_ids."""

import pytest

from helpers import write_jsonl
from steps.config import IngestConfig, ScrubConfig, TokenizeConfig, ValidateConfig
from steps.core.errors import DataQualityError
from steps.ingest import ingest_records
from steps.scrub.step import scrub_records
from steps.tokenize.split import in_eval
from steps.tokenize.step import tokenize_dataset
from steps.validate import validate_records

CFG = TokenizeConfig(max_seq_len=32, eval_fraction=0.25, seed=3)


def documents(n: int) -> list[dict]:
    return [{"id": f"doc-{i:02d}", "text": f"Article {i}. The committee meets on day {i} and records {3 * i} votes. "
             f"제{i}조 국회는 법률안을 심의한다."} for i in range(n)]


def clean_texts(store, tmp_path, rows):
    raw = ingest_records(IngestConfig(source=str(write_jsonl(tmp_path / "raw.jsonl", rows))), store)
    return scrub_records(ScrubConfig(), validate_records(ValidateConfig(record_kind="text"), raw, store), store)


def expected_stream(tokenizer, docs: list[dict]) -> list[int]:
    stream: list[int] = []
    for i, doc in enumerate(docs):
        stream += ([tokenizer.eos_token_id] if i else []) + tokenizer(doc["text"], add_special_tokens=False)["input_ids"]
    return stream


def test_documents_are_packed_into_full_blocks_split_by_document(store, tmp_path, tiny_model, tiny_tokenizer):
    docs = documents(24)
    data = tokenize_dataset(CFG, clean_texts(store, tmp_path, docs), tiny_model, store)
    sides = {"train": [d for d in docs if not in_eval(d["id"], CFG)], "eval": [d for d in docs if in_eval(d["id"], CFG)]}
    assert sides["train"] and sides["eval"]
    dropped = 0
    for side, side_docs in sides.items():
        rows = store.read_jsonl(data, f"{side}.jsonl")
        assert [r["id"] for r in rows] == [f"block-{n}" for n in range(len(rows))]
        assert all(len(r["input_ids"]) == CFG.max_seq_len and r["labels"] == r["input_ids"] for r in rows)
        # The blocks are the side's documents, in order, joined by EOS; only a tail shorter than a block is dropped.
        stream = expected_stream(tiny_tokenizer, side_docs)
        packed = [t for r in rows for t in r["input_ids"]]
        assert packed == stream[: len(packed)] and 0 <= len(stream) - len(packed) < CFG.max_seq_len
        dropped += len(stream) - len(packed)
        first = len(tiny_tokenizer(side_docs[0]["text"], add_special_tokens=False)["input_ids"])
        assert packed[first] == tiny_tokenizer.eos_token_id and tiny_tokenizer.eos_token_id not in packed[:first]
        assert packed.count(tiny_tokenizer.eos_token_id) in (len(side_docs) - 1, len(side_docs) - 2)
        assert data.stats[f"{side}_documents"] == len(side_docs)
        assert data.stats[f"{side}_records"] == len(rows) and data.stats[f"{side}_tokens"] == len(packed)
    assert data.stats["dropped_tail_tokens"] == dropped
    # No eval prompts: evaluate reports perplexity only.
    assert store.read_jsonl(data, "eval_prompts.jsonl") == []


def test_no_document_has_tokens_on_both_sides(store, tmp_path, tiny_model, tiny_tokenizer):
    # Each document is one distinct marker word repeated: its tokens identify it.
    markers = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
               "kilo", "lima", "mike", "november", "oscar", "papa"]
    docs = [{"id": m, "text": " ".join([m] * 40)} for m in markers]
    data = tokenize_dataset(CFG, clean_texts(store, tmp_path, docs), tiny_model, store)
    seen = {}
    for side in ("train", "eval"):
        text = " ".join(tiny_tokenizer.decode(r["input_ids"]) for r in store.read_jsonl(data, f"{side}.jsonl"))
        seen[side] = {m for m in markers if m in text}
        assert seen[side] <= {m for m in markers if in_eval(m, CFG) == (side == "eval")}
    assert seen["train"] and seen["eval"] and seen["train"].isdisjoint(seen["eval"])


def test_a_side_shorter_than_one_block_is_an_error(store, tmp_path, tiny_model):
    with pytest.raises(DataQualityError, match="both splits non-empty.*max_seq_len=512"):
        tokenize_dataset(TokenizeConfig(max_seq_len=512, eval_fraction=0.25, seed=3),
                         clean_texts(store, tmp_path, documents(24)), tiny_model, store)
