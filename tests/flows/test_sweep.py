"""`tuneline sweep` against the real local services: a 6-trial, 2-at-once sweep of the tiny model (learning
rate and LoRA rank) that prunes, records a parent run with a child per trial, computes the data steps once,
registers the best trial through the gate; a rerun continues the study; a bad space fails before anything runs."""

from __future__ import annotations

import uuid

import pytest

from flows.cli import DEFAULT_PARAMS, main
from helpers import chat, write_jsonl
from steps.config import PipelineParams
from steps.sweep.space import SweepSpace

pytestmark = pytest.mark.services
TINY = DEFAULT_PARAMS.parent / "tiny.yaml"
SPACE = {"sampler": "tpe", "seed": 3, "eval_every": 2,
         "pruner": {"kind": "median", "startup_trials": 2},
         "parameters": {"train.learning_rate": {"type": "log", "low": 1.0e-5, "high": 3.0e-2},
                        "train.lora.r": {"type": "categorical", "choices": [2, 4, 8]}}}


def tiny_params(store, tmp_path) -> PipelineParams:
    rows = [chat(f"What is {i} plus one?", f"{i} plus one is {i + 1}.") for i in range(40)]
    source = write_jsonl(tmp_path / "chats.jsonl", rows)
    return PipelineParams.from_yaml(TINY, [
        f"ingest.source={source}", f"artifacts_prefix={store.prefix}",
        f"register.model_name=sweep-{uuid.uuid4().hex[:6]}",
        "train.max_steps=6", "train.record_losses=false", "evaluate.max_records=8", "evaluate.bleu_samples=2"])


def data_task_runs(flow_run_id) -> dict[str, list[str]]:
    """State names of the data tasks in the sweep's flow run and every flow run under it."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        ids = [flow_run_id, *(run.id for run in children)]
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
    states: dict[str, list[str]] = {}
    for run in runs:
        step = run.name.rsplit("-", 1)[0]
        if step in ("ingest", "validate", "scrub", "base-model", "tokenize"):
            states.setdefault(step, []).append(run.state.name)
    return states


def stale_trial(study_name: str) -> int:
    """A running trial of ``study_name`` whose last heartbeat is an hour old (its sweeper was killed)."""
    import optuna
    import sqlalchemy

    from steps.core.study import storage, storage_url

    rdb = storage(storage_url())
    ghost = optuna.load_study(study_name=study_name, storage=rdb).ask()
    rdb.record_heartbeat(ghost._trial_id)
    with sqlalchemy.create_engine(storage_url()).begin() as db:
        db.execute(sqlalchemy.text("UPDATE trial_heartbeats SET heartbeat = datetime('now', '-1 hour') "
                                   "WHERE trial_id = :id"), {"id": ghost._trial_id})
    return ghost.number


def test_a_six_trial_sweep_prunes_records_and_registers_the_best(prefect_api, store, tmp_path):
    from mlflow import MlflowClient
    from prefect.artifacts import Artifact

    from flows.pages import artifact_key
    from flows.sweep import sweep
    from steps.sweep.record import STATE_TAG

    params = tiny_params(store, tmp_path)
    space = SweepSpace.parse(SPACE)
    state = sweep(params, space, trials=6, parallel=2, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    n = result.numbers
    assert n["trials"] == 6 and n["complete"] + n["pruned"] == 6 and n["pruned"] >= 1, result.table
    assert [row["baseline"] for row in result.table].count(True) == 1  # trial 0: the parameter file's values
    assert result.table[0]["train.learning_rate"] == 1e-3 and n["baseline_value"] is not None

    client = MlflowClient()
    parent = client.get_run(result.parent_run)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run}'")
    assert len(children) == 6
    states = sorted(c.data.tags[STATE_TAG] for c in children)
    assert states.count("pruned") == n["pruned"] and states.count("complete") == n["complete"]
    pruned = next(c for c in children if c.data.tags[STATE_TAG] == "pruned")
    history = client.get_metric_history(pruned.info.run_id, "eval_loss")
    assert history and max(m.step for m in history) < 6  # stopped before the last step
    plots = {a.path for a in client.list_artifacts(result.parent_run, "sweep")}
    assert plots == {"sweep/optimization_history.png", "sweep/param_importances.png"}
    assert parent.data.metrics["pruned"] == n["pruned"]

    # Data steps: computed once (in the sweep's own run), cache hits in the trials and the registration.
    for step, names in data_task_runs(state.state_details.flow_run_id).items():
        assert names.count("Completed") == 1 and names.count("Cached") >= 6, (step, names)

    # The best trial went through register and the gate; no trial registered on its own.
    best = result.best
    assert best is not None and best.record.model.adapter.stats["steps"] == 6
    versions = client.search_model_versions(f"name = '{params.register_.model_name}'")
    assert [v.version for v in versions] == [best.version.version]
    assert best.decision.metric == "perplexity"
    assert best.record.params["train"]["learning_rate"] == n["best_params"]["train.learning_rate"]

    table = Artifact.get(artifact_key(params.register_.model_name, "sweep"))
    assert table is not None and table.type == "table" and "trial" in str(table.data)

    # A sweeper killed mid-trial leaves a running trial whose heartbeat stops (injected: an hour old).
    ghost = stale_trial(result.study)
    # The same sweep again, with 7 trials: the study continues (one new trial, same parent run), the ghost failed.
    again = sweep(params, space, trials=7, parallel=1, return_state=True).result()
    assert again.study == result.study and again.parent_run == result.parent_run
    assert again.numbers["complete"] + again.numbers["pruned"] == 7 and again.numbers["failed"] == 1
    assert next(row for row in again.table if row["trial"] == ghost)["state"] == "fail"
    assert len(client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{result.parent_run}'")) == 7


def test_a_bad_space_fails_before_anything_runs(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("parameters:\n  train.lerning_rate: {type: log, low: 1.0e-5, high: 1.0e-2}\n")
    assert main(["sweep", "--params", str(TINY), "--space", str(space), "--trials", "2"]) == 2
    assert "'train.lerning_rate' names no field: train has" in capsys.readouterr().err
    space.write_text("parameters:\n  train.learning_rate: {type: log, low: 1.0e-5, high: 2.0}\n")
    assert main(["sweep", "--params", str(TINY), "--space", str(space), "--trials", "2"]) == 2
    assert "train.learning_rate = 2.0 (a bound of its range) is refused" in capsys.readouterr().err
    space.write_text("parameters:\n  train.lora.r: {type: categorical, choices: [4]}\n")
    assert main(["sweep", "--params", str(TINY), "--space", str(space), "--trials", "2"]) == 2
    assert "List should have at least 2 items" in capsys.readouterr().err


def test_a_missing_trial_deployment_is_named_before_any_trial(prefect_api, store, tmp_path):
    from flows.sweep import sweep

    state = sweep(tiny_params(store, tmp_path), SweepSpace.parse(SPACE), trials=2,
                  trial_deployment="tuneline-trial/missing", return_state=True)
    assert state.is_failed()
    assert "the Prefect server has no deployment 'tuneline-trial/missing'" in state.message
    assert not store.list_keys(f"{store.prefix}/")  # nothing ran: no artifact under the run's prefix
