"""Your own data through the whole flow: a two-source mixture of a ShareGPT JSONL file (long multi-turn
conversations, one broken turn in 200 records) and an Alpaca Parquet file, weighted 2:1."""

from __future__ import annotations

import json
import uuid

import pytest

from flows.cli import DEFAULT_PARAMS
from helpers import write_jsonl
from steps.config import PipelineParams

pytestmark = pytest.mark.services


def sharegpt(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        turns = [{"from": "system", "value": "You answer arithmetic questions."}]
        for t in range(2 + i % 6):
            turns += [{"from": "human", "value": f"Conversation {i}, question {t}: what is {i} plus {t}?"},
                      {"from": "gpt", "value": f"{i} plus {t} is {i + t}."}]
        rows.append({"id": f"sg-{i}", "conversations": turns})
    rows[7]["conversations"][2]["value"] = "   "  # a blank answer: 1 record in 200 breaks a rule
    return rows


def test_a_weighted_sharegpt_and_alpaca_parquet_mixture_runs_end_to_end(prefect_api, store, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flows.cli import main
    from flows.pipeline import finetune

    shared = write_jsonl(tmp_path / "sharegpt.jsonl", sharegpt(200))
    alpaca = tmp_path / "alpaca.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": f"Double {i}.", "input": "", "output": str(2 * i)}
                                         for i in range(150)]), alpaca)
    sources = json.dumps([{"source": str(shared), "weight": 2}, {"source": str(alpaca), "weight": 1}])
    name = f"own-data-{uuid.uuid4().hex[:6]}"
    params = PipelineParams.from_yaml(DEFAULT_PARAMS.with_name("tiny.yaml"), [
        f"ingest.sources={sources}", f"artifacts_prefix={store.prefix}", f"register.model_name={name}",
        "tokenize.max_seq_len=96", "train.max_steps=3", "evaluate.max_records=8"])
    state = finetune(params, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    data = {step: ref.stats for step, ref in summary.record.datasets.items()}
    taken = {s["source"]: s["taken"] for s in data["ingest"]["sources"]}
    assert taken == {str(shared): 200, str(alpaca): 100} and data["ingest"]["format"] in ("sharegpt", "alpaca")
    assert data["validate"]["quarantined"] == 1 and data["validate"]["records"] == 299
    assert data["tokenize"]["windowed"] > 0 and data["tokenize"]["truncated"] == 0
    assert main(["data", "worst", f"{name}/{summary.version.version}", "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "records (" in out and len([line for line in out.splitlines() if line.strip()[:1].isdigit()]) == 5
