"""Small builders shared by the tests."""

from __future__ import annotations

from pathlib import Path


def chat(user: str, assistant: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], **extra}


def write_jsonl(path: Path, rows: list) -> Path:
    import json

    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def all_keys(store) -> list[str]:
    return store.list_keys(store.prefix + "/")


def sft_dataset(store, tmp_path: Path, model, n: int = 40, max_seq_len: int = 64):
    """Ingest -> validate -> scrub -> tokenize a small arithmetic chat set; returns the tokenized DatasetRef."""
    from steps.config import IngestConfig, ScrubConfig, TokenizeConfig, ValidateConfig
    from steps.ingest import ingest_records
    from steps.scrub import scrub_records
    from steps.tokenize import tokenize_dataset
    from steps.validate import validate_records

    rows = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(n)]
    raw = ingest_records(IngestConfig(source=str(write_jsonl(tmp_path / "raw.jsonl", rows))), store)
    clean = scrub_records(ScrubConfig(), validate_records(ValidateConfig(), raw, store), store)
    return tokenize_dataset(TokenizeConfig(eval_fraction=0.2, max_seq_len=max_seq_len), clean, model, store)
