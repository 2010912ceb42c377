"""The whole flow against the real SeaweedFS and MLflow servers, on a tiny random Llama."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from flows.cli import DEFAULT_PARAMS, main
from helpers import chat, flow_run_page, newest_flow_run, write_jsonl
from steps.config import PipelineParams

pytestmark = pytest.mark.services
TINY = DEFAULT_PARAMS.with_name("tiny.yaml")
STEPS = {"ingest": 1, "validate": 1, "scrub": 1, "base_model": 1, "tokenize": 1, "train": 1, "evaluate": 2}


def dataset(tmp_path: Path) -> Path:
    rows = [chat(f"What is {i} times two?", f"{i} times two is {2 * i}.") for i in range(48)]
    rows += [chat("Email me at kim.minji@example.co.kr", "Sure, or call 010-2345-6789.")] * 2  # PII + a duplicate
    return write_jsonl(tmp_path / "chats.jsonl", rows)


def tiny_params(source: Path, prefix: str, model_name: str) -> PipelineParams:
    return PipelineParams.from_yaml(TINY, [f"ingest.source={source}", f"artifacts_prefix={prefix}",
                                             f"register.model_name={model_name}"])


def task_states(flow_run_id, expected: int) -> dict[str, list[str]]:
    """Task-run state names by task; the server records them from events, so wait until all are final."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.time() + 60
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            final = [r for r in runs if r.state is not None and r.state.is_final()]
            if len(final) >= expected or time.time() > deadline:
                break
            time.sleep(0.5)
    states: dict[str, list[str]] = {}
    for run in final:
        states.setdefault(run.name.rsplit("-", 1)[0], []).append(run.state.name)
    return states


def task_names(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return [r.name for r in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
            any_=[flow_run_id])))]


def test_full_flow_registers_promotes_and_reruns_fully_cached(prefect_api, store, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    from flows.pipeline import finetune

    name = f"tiny-{uuid.uuid4().hex[:6]}"
    params = tiny_params(dataset(tmp_path), store.prefix, name)
    state = finetune(params, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()

    keys = store.list_keys(store.prefix + "/")
    for step, count in STEPS.items():
        assert len([k for k in keys if k.startswith(f"{store.prefix}/{step}/") and k.endswith("_MANIFEST.json")]) == count, step
    scrub = summary.record.datasets["scrub"].stats
    # PII is counted where it was found, before the duplicate copy is dropped.
    assert scrub["duplicates_removed"] == 1 and scrub["pii"]["EMAIL"] == 2 and scrub["pii"]["PHONE"] == 2

    client = MlflowClient()
    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 1
    version = client.get_model_version_by_alias(name, "champion")
    assert version.version == versions[0].version == summary.version.version
    assert "challenger" not in client.get_registered_model(name).aliases  # it left the version at promotion
    assert version.tags["tuneline.data_digest"] == summary.record.datasets["tokenize"].digest
    assert {"tuneline.run_key", "tuneline.code_version", "tuneline.config_hash", "tuneline.base_digest"} <= set(version.tags)
    assert summary.decision.promoted and "base model" in summary.decision.reason
    artifacts = {a.path for a in client.list_artifacts(summary.version.run_id, "plots")}
    assert artifacts == {"plots/loss_curve.png", "plots/record_losses.png"}
    assert len(client.get_metric_history(summary.version.run_id, "loss")) == params.train.max_steps
    inputs = client.get_run(summary.version.run_id).inputs.dataset_inputs
    contexts = {i.tags[0].value: i.dataset for i in inputs}
    assert set(contexts) == {"raw", "training", "evaluation"}
    assert contexts["training"].digest == summary.record.datasets["tokenize"].digest[:32]
    assert "train.jsonl" in contexts["training"].source

    # Prefect: a name and tags from the parameters, the steps' own log lines, a page per step, evaluation
    # task runs named by role, and links to MLflow; MLflow: a run that starts with the flow run and links to it.
    flow_run_id = state.state_details.flow_run_id
    page = flow_run_page(flow_run_id)
    assert page["name"].startswith(f"{name}-lora-"), page["name"]
    assert {f"model:{name}", "method:lora", "task:sft", "data:jsonl", "manual"} <= set(page["tags"])
    logs = "\n".join(page["logs"])
    assert "validate: 50 chat records pass" in logs and "evaluate base:" in logs and "evaluate candidate:" in logs
    assert {f"{name}-{p}" for p in ("ingest", "validate", "scrub", "base-model", "tokenize", "train", "evaluation",
                                    "promotion")} <= set(page["artifacts"])
    assert "| EMAIL | 2 |" in page["artifacts"][f"{name}-scrub"]
    assert "| base |" in page["artifacts"][f"{name}-evaluation"]
    promotion = page["artifacts"][f"{name}-promotion"]
    assert f"/#/models/{name}/versions/{version.version}" in promotion and summary.version.run_id in promotion
    evaluations = sorted(n for n in task_names(flow_run_id) if n.startswith("evaluate"))
    assert evaluations == ["evaluate-base", "evaluate-candidate"]
    run = client.get_run(summary.version.run_id)
    flow_run = newest_flow_run(f"model:{name}")
    assert run.data.tags["tuneline.prefect_flow_run_id"] == str(flow_run_id) == str(flow_run.id)
    assert run.info.start_time <= flow_run.start_time.timestamp() * 1000 + 1000  # the run covers the pipeline
    assert f"/runs/flow-run/{flow_run_id}" in run.data.tags["mlflow.note.content"]
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    logged = client.get_logged_model(version.source.split("/")[-1]) if version.source.startswith("models:/m-") \
        else None
    assert logged is None or logged.name == name
    mlmodel = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion/MLmodel",
                                                       dst_path=str(tmp_path / "mlmodel"))).read_text()
    assert "tuneline-register-" not in mlmodel and "/tmp/" not in mlmodel and "saved_input_example_info" in mlmodel
    assert f"s3://{store.bucket}/{summary.record.model.adapter.key}" in mlmodel
    metrics = {m.key: m for m in client.get_logged_model(logged.model_id).metrics} if logged else {}
    assert not logged or metrics["candidate_perplexity"].dataset_name == "tokenize/eval.jsonl"

    # The registered pyfunc loads from the registry alone and answers.
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    answers = model.predict(["What is 3 times two?"], params={"max_new_tokens": 4})
    assert len(answers) == 1 and isinstance(answers[0], str)
    assert len(answers[0].split()) <= 4  # the max_new_tokens parameter reached generate()

    # A second identical run: every step task is cached, nothing new is stored or registered.
    before = sorted(store.list_keys(""))
    again = finetune(params, return_state=True)
    assert again.is_completed()
    states = task_states(again.state_details.flow_run_id, expected=11)
    cached = {task: s for task, s in states.items() if task not in {"find-champion", "promote"}}
    assert cached and all(s == ["Cached"] * len(s) for s in cached.values()), states
    assert sorted(store.list_keys("")) == before
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    assert again.result().decision.reason.startswith("already champion")


def test_validation_failure_stops_the_run_and_registers_nothing(prefect_api, store, tmp_path, capsys):
    from mlflow import MlflowClient

    name = f"tiny-bad-{uuid.uuid4().hex[:6]}"
    bad = write_jsonl(tmp_path / "bad.jsonl", [chat("fine", "fine"),
                                               {"messages": [{"role": "assistant", "content": "secret-77"}]}])
    code = main(["run", "--params", str(TINY), "--set", f"ingest.source={bad}",
                 "--set", f"artifacts_prefix={store.prefix}", "--set", f"register.model_name={name}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "rule 'roles alternate user/assistant and end with assistant': 1 of 2 records fail (e.g. lines 2)" in err
    assert "secret-77" not in err
    manifests = [k for k in store.list_keys(store.prefix + "/") if k.endswith("_MANIFEST.json")]
    assert len(manifests) == 1 and "/ingest/" in manifests[0]
    assert MlflowClient().search_model_versions(f"name = '{name}'") == []
    # The run's Logs tab: the rule once, as a line a person reads, no traceback for an expected data error.
    logs = flow_run_page(newest_flow_run(f"model:{name}").id)["logs"]
    said = [line for line in logs if "roles alternate user/assistant" in line]
    assert len(said) == 1 and said[0].startswith("DataQualityError: ") and "\\n" not in said[0], logs
    assert not [line for line in logs if "Traceback" in line], logs


def test_invalid_parameters_exit_2_before_anything_runs(tmp_path, capsys):
    params = tmp_path / "p.yaml"
    params.write_text("train:\n  lora_rank: 8\n")
    assert main(["run", "--params", str(params)]) == 2
    assert "train.lora_rank: Extra inputs are not permitted" in capsys.readouterr().err


def test_a_transient_failure_is_retried_and_a_data_error_is_not(prefect_api):
    from prefect import flow

    from flows.pipeline import save_result_storage
    from flows.tasks import step_task
    from steps.core.errors import DataQualityError, TransientError

    calls = {"transient": 0, "data": 0}

    @step_task("flaky-storage")
    def flaky(token: str) -> str:
        calls["transient"] += 1
        if calls["transient"] == 1:
            raise TransientError("S3 answered 503")
        return token

    @step_task("bad-data")
    def bad(token: str) -> str:
        calls["data"] += 1
        raise DataQualityError("rule 'x' broken")

    @flow
    def probe(token: str) -> str:
        save_result_storage()
        return flaky(token)

    @flow
    def probe_bad(token: str) -> str:
        save_result_storage()
        return bad(token)

    token = uuid.uuid4().hex
    assert probe(token) == token and calls["transient"] == 2
    with pytest.raises(DataQualityError):
        probe_bad(token)
    assert calls["data"] == 1
