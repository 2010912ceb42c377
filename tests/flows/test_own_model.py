"""Bring your own base model, through the whole flow: deployments/params/tiny.yaml with a local folder
of a tiny Qwen2 that has its own tokenizer, the same model from an s3:// prefix, and a continuation
from the registered model's @champion whose version names its parent in lineage and model card."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest

from flows.cli import DEFAULT_PARAMS
from steps.config import PipelineParams

pytestmark = pytest.mark.services
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))


def test_local_then_s3_then_champion_continuation(prefect_api, store, tmp_path):
    from mlflow import MlflowClient

    import zoo
    from flows.pipeline import finetune

    folder = zoo.build("qwen2", tmp_path / "tiny-qwen2", zoo.corpus())
    name = f"own-{uuid.uuid4().hex[:6]}"
    common = [f"artifacts_prefix={store.prefix}", f"register.model_name={name}", "train.max_steps=3",
              "evaluate.max_records=8", "evaluate.bleu_samples=2", "evaluate.max_new_tokens=4",
              "evaluate.smoke_max_new_tokens=4", "tokenize.max_truncated_share=1.0"]  # a tiny BPE: long token runs

    def run(source: str):
        params = PipelineParams.from_yaml(DEFAULT_PARAMS.parent / "tiny.yaml", [*common, f"base_model.source={source}"])
        state = finetune(params, return_state=True)
        assert state.is_completed(), state.message
        return state.result()

    local = run(str(folder))
    assert local.record.model.base.stats["kind"] == "local"
    assert local.record.model.base.stats["architecture"] == "Qwen2ForCausalLM"
    client = MlflowClient()
    client.set_registered_model_alias(name, "champion", local.version.version)

    for path in sorted(folder.iterdir()):
        store.put_bytes(f"{store.prefix}/models/tiny-qwen2/{path.name}", path.read_bytes())
    remote = run(f"s3://{store.bucket}/{store.prefix}/models/tiny-qwen2/")
    assert remote.record.model.base.digest == local.record.model.base.digest  # same content, same base artifact

    child = run(f"models:/{name}@champion")
    base = child.record.model.base.stats
    assert base["kind"] == "registry" and base["parent"]["version"] == local.version.version
    assert base["parent"]["method"] == "lora"
    assert base["chain"] == [str(folder), f"models:/{name}/{local.version.version}"]
    version = client.get_model_version(name, child.version.version)
    assert version.tags["tuneline.parent"] == f"models:/{name}/{local.version.version}"
    assert json.loads(version.tags["tuneline.base_chain"]) == base["chain"]
    assert f"`models:/{name}/{local.version.version}` -> `this version`" in version.description
