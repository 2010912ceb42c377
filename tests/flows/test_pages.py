"""flows/pages.py: a flow run's name and tags come from its parameters."""

from __future__ import annotations

from datetime import datetime, timezone

from flows.pages import artifact_key, run_labels, source_kind
from steps.config import PipelineParams


def params(**sections) -> PipelineParams:
    return PipelineParams.parse(sections)


def test_a_run_is_named_and_tagged_from_its_parameters():
    p = params(register={"model_name": "tuneline-chat"}, train={"method": "lora"})
    start = datetime(2026, 12, 2, 2, 0, 30, tzinfo=timezone.utc)
    name, tags = run_labels(p, ["tuneline", "manual"], auto_scheduled=True, start=start)
    assert name == "tuneline-chat-lora-2026-12-02-0200"
    assert tags == ["tuneline", "model:tuneline-chat", "method:lora", "task:sft", "data:chatterbot", "scheduled"]
    assert run_labels(p, ["data-triggered"], auto_scheduled=False, start=start)[1][-1] == "data-triggered"
    assert run_labels(p, [], auto_scheduled=False, start=start)[1][-1] == "manual"


def test_the_data_source_kind_is_a_short_tag():
    assert source_kind(params(ingest={"source": "s3://bucket/data/"})) == "s3"
    assert source_kind(params(ingest={"source": "/data/chats.jsonl.gz"})) == "jsonl"
    assert source_kind(params(ingest={"source": "/data/rows.parquet"})) == "parquet"
    assert source_kind(params(ingest={"source": "/data/hf-dataset"})) == "folder"
    assert source_kind(params(ingest={"source": "bbcnews:"}, validate={"record_kind": "classification"},
                              base_model={"source": "all-minilm-l6-v2"})) == "bbcnews"
    mixture = params(ingest={"sources": [{"source": "a.jsonl"}, {"source": "b.jsonl"}]})
    assert source_kind(mixture) == "mixture"
    assert artifact_key("My_Model.v2", "base-model") == "my-model-v2-base-model"
