"""The tuneline-watch sensor against the real SeaweedFS and a real Prefect server: one run of the
watched deployment per new object, with ingest.source pointing at it, and never a second one."""

from __future__ import annotations

import json
import uuid

import pytest

from helpers import chat

pytestmark = pytest.mark.services


def test_each_new_object_starts_one_run_with_its_source(prefect_api, store, tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.types.entrypoint import EntrypointType

    from flows.deploy import REPO, ensure_pool
    from flows.pipeline import finetune
    from flows.watch import watch
    from steps.config import PipelineParams

    # A deployment of its own on a pool no worker polls: the runs it gets stay scheduled.
    pool, name = f"watch-test-{uuid.uuid4().hex[:6]}", f"watched-{uuid.uuid4().hex[:6]}"
    assert ensure_pool(pool, "process")
    params = PipelineParams.from_yaml(REPO / "deployments" / "params" / "tiny.yaml",
                                      [f"register.model_name={name}", f"artifacts_prefix={store.prefix}"])
    deployment_id = finetune.to_deployment(
        name=name, parameters={"params": params.model_dump(mode="json", by_alias=True)}, work_pool_name=pool,
        entrypoint_type=EntrypointType.MODULE_PATH,
    ).apply()

    incoming = f"{store.prefix}/incoming/"
    rows = "".join(json.dumps(chat(f"q{i}", f"a{i}")) + "\n" for i in range(4)).encode()
    store.put_bytes(f"{incoming}day1.jsonl", rows)
    store.put_bytes(f"{incoming}notes.txt", b"not a dataset")  # wrong suffix: ignored
    sensor = {"prefix": f"s3://{store.bucket}/{incoming}", "deployment": f"tuneline-finetune/{name}",
              "state_prefix": f"{store.prefix}/watch-state"}

    [started] = watch(**sensor)
    source = f"s3://{store.bucket}/{incoming}day1.jsonl"
    assert started["source"] == source
    assert watch(**sensor) == []  # a second pass: nothing new, no duplicate
    # A pass that died after starting the run but before writing its marker: the next pass finds
    # the same run (the idempotency key), it does not start another.
    store.delete_prefix(f"{store.prefix}/watch-state/")
    assert watch(**sensor) == [started]

    # The same key with new content is new data; a second object too.
    store.put_bytes(f"{incoming}day1.jsonl", rows + json.dumps(chat("q9", "a9")).encode() + b"\n")
    store.put_bytes(f"{incoming}day2.jsonl", rows)
    assert sorted(s["source"] for s in watch(**sensor)) == [source, f"s3://{store.bucket}/{incoming}day2.jsonl"]
    assert watch(**sensor) == []

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
        assert sorted(r.parameters["params"]["ingest"]["source"] for r in runs) == sorted([source, source, source.replace("day1", "day2")])
        first = next(r for r in runs if str(r.id) == started["flow_run_id"])
        # Every other parameter is the deployment's; the run is tagged and named after its object.
        assert first.parameters["params"]["register"]["model_name"] == name
        assert first.parameters["params"]["train"] == params.model_dump(mode="json", by_alias=True)["train"]
        assert {"tuneline-watch", "data-triggered"} <= set(first.tags) and first.name == "data-day1.jsonl"
        assert all(r.state.is_scheduled() for r in runs)
        for run in runs:  # nothing left for a worker of a later test
            client.delete_flow_run(run.id)
    markers = store.list_keys(f"{store.prefix}/watch-state/")
    assert len(markers) == 3 and all(json.loads(store.get_bytes(k))["deployment"] == sensor["deployment"]
                                      for k in markers)
