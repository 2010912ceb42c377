"""Steps in their own flow runs (and so, on Docker or Kubernetes pools, their own containers):
a tiny pipeline run with `dispatch` sends scrub and train to the `tuneline-step/gpu` deployment,
which `tuneline worker` runs as separate processes. Only JSON references cross; the artifacts
pass through S3; the run registers its model as usual."""

from __future__ import annotations

import uuid

import pytest
from test_deploy import wait_final, worker

from flows.cli import main
from helpers import chat, write_jsonl
from steps.config import PipelineParams
from steps.core.errors import ConfigError, StepRunError

pytestmark = pytest.mark.services


def test_dispatched_steps_run_as_their_own_flow_runs(prefect_api, tiny_model, tmp_path, capsys):
    from mlflow import MlflowClient
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import get_current_settings

    from flows.cli import DEFAULT_PARAMS
    from flows.pipeline import finetune
    from steps.core.store import ArtifactStore

    pool = f"tuneline-step-{uuid.uuid4().hex[:6]}"
    assert main(["deploy", "--pool-name", pool, "--only", "gpu"]) == 0, capsys.readouterr().err
    assert "tuneline-step/gpu" in capsys.readouterr().out

    name = f"dispatch-{uuid.uuid4().hex[:6]}"
    rows = [chat(f"What is {i} plus two?", f"{i} plus two is {i + 2}.") for i in range(24)]
    rows.append(chat("Mail kim.minji@example.co.kr", "Noted."))
    params = PipelineParams.from_yaml(DEFAULT_PARAMS.with_name("tiny.yaml"), [
        f"ingest.source={write_jsonl(tmp_path / 'd.jsonl', rows)}", "artifacts_prefix=shared",
        f"register.model_name={name}", "train.max_steps=2", "evaluate.max_records=8", "evaluate.bleu_samples=1",
    ]).model_copy(update={"dispatch": {"scrub": "tuneline-step/gpu", "train": "tuneline-step/gpu"}})

    log = tmp_path / "worker.log"
    with worker(pool, get_current_settings().api.url, log):
        state = finetune(params, return_state=True)
    assert state.is_completed(), f"{state.message}\n{log.read_text(errors='replace')[-4000:]}"
    summary = state.result()

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["tuneline-step"])))
        mine = {r.parameters["step"]: r for r in children
                if r.parameters["inputs"].get("prefix") == "shared"
                and r.parameters["inputs"]["cfg"] == params.model_dump(mode="json", by_alias=True)[r.parameters["step"]]}
        assert set(mine) == {"scrub", "train"}
        assert all(r.state.is_completed() and r.work_pool_name == pool for r in mine.values())
        # Linked to the calling run's tasks (the UI shows them as subflows of scrub and train).
        parents = {client.read_task_run(r.parent_task_run_id).flow_run_id for r in mine.values()}
        assert parents == {state.state_details.flow_run_id}
        wait_final(client, [r.id for r in mine.values()], log)

    # The references the child runs returned are the artifacts in S3, manifests and all.
    store = ArtifactStore.from_env("shared")
    clean, tuned = summary.record.datasets["scrub"], summary.record.model
    assert clean.stats["pii"]["EMAIL"] == 1
    assert store.manifest(clean.key)["digest"] == clean.digest and store.manifest(tuned.adapter.key)["digest"] == tuned.adapter.digest
    [version] = MlflowClient().search_model_versions(f"name = '{name}'")
    assert version.tags["tuneline.data_digest"] == summary.record.datasets["tokenize"].digest


def test_a_dispatched_step_that_fails_there_fails_here_with_its_reason(prefect_api, tmp_path, capsys):
    """No worker: the unknown deployment is refused at once, naming it."""
    from flows import tasks
    from steps.config import ScrubConfig
    from steps.core.store import DatasetRef

    ref = DatasetRef(step="validate", key="x/validate/abc", digest="0" * 64)
    with pytest.raises(ConfigError, match="no deployment .tuneline-step/nowhere."):
        tasks.scrub.fn(ScrubConfig(), ref, "x", dispatch="tuneline-step/nowhere")
    with pytest.raises(ValueError, match="dispatch.train: 'gpu' is not a deployment name"):
        PipelineParams.model_validate({"dispatch": {"train": "gpu"}})
    with pytest.raises(ValueError, match="dispatch"):
        PipelineParams.model_validate({"dispatch": {"promote": "tuneline-step/gpu"}})
    assert issubclass(StepRunError, Exception)
