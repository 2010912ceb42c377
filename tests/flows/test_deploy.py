"""Deployments as the Prefect UI uses them: `tuneline deploy` against a real Prefect server (the
session's test server, an HTTP server in its own process), the run form's schema read back from
the API, a run created from the form's values with a few fields edited, executed by
`tuneline worker`, and parameters that the server or the flow refuse."""

from __future__ import annotations

import copy
import os
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from flows.deploy import REPO, SPEC_FILE, base_job_template, job_manifest, load_spec
from helpers import background, chat, write_jsonl

PARAM_SETS = sorted(p.stem for p in (REPO / "deployments" / "params").glob("*.yaml"))
FINAL_WAIT_S = 300


def test_prefect_yaml_has_one_deployment_per_parameter_set_and_the_gpu_settings_render(monkeypatch):
    import json
    import re

    from prefect.cli.deploy._models import PrefectYamlModel

    monkeypatch.setenv("TUNELINE_BUCKET", "tuneline")
    PrefectYamlModel.model_validate(yaml.safe_load(SPEC_FILE.read_text()))  # Prefect reads it too
    for pool in ("process", "docker", "kubernetes"):
        planned = {p.name: p for p in load_spec(pool=pool)}
        assert sorted(n for n, p in planned.items() if p.entrypoint == "flows.pipeline.finetune") == PARAM_SETS
        assert planned["incoming"].entrypoint == "flows.watch.watch"
        assert planned["gpu"].entrypoint == "flows.step_flow.run_step"  # dispatched steps (test_dispatch.py)
        # The sweep: tiny.yaml's values, the space of sweeps/lora-tiny.yaml, 6 trials 2 at once; its trials' target.
        sweep = planned["sweep"]
        assert sweep.entrypoint == "flows.sweep.sweep" and planned["trial"].entrypoint == "flows.sweep.trial"
        assert (sweep.parameters["trials"], sweep.parameters["parallel"]) == (6, 2)
        assert sweep.parameters["params"]["register"]["model_name"] == "tuneline-tiny"
        assert set(sweep.parameters["space"]["parameters"]) == {"train.learning_rate", "train.lora.r"}
        assert planned["incoming"].parameters == {"prefix": "s3://tuneline/incoming/",
                                                  "deployment": "tuneline-finetune/default"}
        assert planned["default"].parameters["params"]["train"]["max_steps"] == 60  # from params/default.yaml
        assert [s["cron"] for s in planned["default"].schedules] == ["0 2 * * *"]
        assert all(not s["active"] for p in planned.values() for s in p.schedules)  # registered inactive
    assert load_spec(pool="process")[0].job_variables == {"working_dir": str(REPO)}
    readme = (REPO / "README.md").read_text()
    assert f"registers all {len(load_spec(pool='process'))} on the process pool" in readme  # the README's count

    # Kubernetes: training runs get the GPU image, one GPU and a GPU node; the sensor does not.
    k8s = {p.name: p for p in load_spec(pool="kubernetes", image_gpu="reg.example/tuneline-gpu:1")}
    template = base_job_template("kubernetes", k8s["default"].pool["base_job_template"])
    manifest = job_manifest(template, k8s["default"].job_variables)
    assert manifest["kind"] == "Job" and manifest["apiVersion"] == "batch/v1" and manifest["spec"]["backoffLimit"] == 0
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "reg.example/tuneline-gpu:1"
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    # Non-root (the images' user 10001), no privilege escalation; the services' credentials by reference only.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    assert container["envFrom"] == [{"secretRef": {"name": "tuneline-services"}}] and "env" not in container
    assert not re.search(r"(?i)password|secret_access_key|auth_string", json.dumps(manifest).replace(
        "tuneline-services", ""))
    watcher = job_manifest(template, k8s["incoming"].job_variables)["spec"]["template"]["spec"]
    assert watcher["containers"][0]["image"] == "tuneline-cpu:0.1.0"
    assert "nvidia.com/gpu" not in watcher["containers"][0]["resources"].get("limits", {})
    assert "nodeSelector" not in watcher and watcher["securityContext"]["runAsNonRoot"] is True
    # A step dispatched to tuneline-step/gpu gets its own pod on a GPU node.
    step_pod = job_manifest(template, k8s["gpu"].job_variables)["spec"]["template"]["spec"]
    assert step_pod["containers"][0]["image"] == "reg.example/tuneline-gpu:1"
    assert step_pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    # The images named there are the ones containers/Dockerfile.<kind> builds.
    images = yaml.safe_load(SPEC_FILE.read_text())["definitions"]["images"]
    for kind, image in images.items():
        assert image.startswith(f"tuneline-{kind}:") and (REPO / "containers" / f"Dockerfile.{kind}").is_file()


def test_mistakes_in_the_spec_are_named(tmp_path, monkeypatch):
    from steps.core.errors import ConfigError

    monkeypatch.delenv("NOPE", raising=False)
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "x.yaml").write_text("train:\n  max_steps: 0\n")
    spec = tmp_path / "prefect.yaml"
    pools = {"work_pools": {"process": {"name": "p", "type": "process"}}}

    def write(*deployments):
        spec.write_text(yaml.safe_dump({"definitions": pools, "deployments": list(deployments)}))

    write({"name": "w", "entrypoint": "flows.watch.watch", "parameters": {"prefix": "s3://{{ $NOPE }}/in/"}})
    with pytest.raises(ConfigError, match=r"deployment 'w' uses \{\{ \$NOPE \}\} but the environment variable NOPE"):
        load_spec(spec)
    with pytest.raises(ConfigError, match="no deployment named other"):
        load_spec(spec, only=["other"])
    with pytest.raises(ConfigError, match="no 'kubernetes' pool"):
        load_spec(spec, pool="kubernetes")
    write({"name": "x", "entrypoint": "flows.pipeline.finetune", "paramters_file": "params/x.yaml"})
    with pytest.raises(ConfigError, match=r"unknown keys \['paramters_file'\]"):
        load_spec(spec)
    write({"name": "x", "entrypoint": "flows.pipeline.finetune", "parameters_file": "params/x.yaml"})
    with pytest.raises(ConfigError, match="train.max_steps: Input should be greater than or equal to 1"):
        load_spec(spec)  # a broken parameter file fails the deploy, not the nightly run


def worker(pool: str, api_url: str, log: Path):
    """`tuneline worker` in its own process group, as a user starts it; stopped with Ctrl-C (SIGINT)."""
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(log.parent / "prefect-home"),
           "PREFECT_WORKER_QUERY_SECONDS": "1"}
    return background([sys.executable, "-m", "flows.cli", "worker", "--pool-name", pool], env, log, cwd=REPO)


def wait_final(client, run_ids, log: Path):
    deadline = time.monotonic() + FINAL_WAIT_S
    while True:
        runs = [client.read_flow_run(i) for i in run_ids]
        if all(r.state is not None and r.state.is_final() for r in runs):
            return runs
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-4000:]
            raise AssertionError(f"runs not final after {FINAL_WAIT_S}s: {[r.state_name for r in runs]}\n{tail}")
        time.sleep(1)


@pytest.mark.services
def test_deploy_then_run_from_the_form_like_the_ui(prefect_api, tiny_model, tmp_path, capsys):
    from mlflow import MlflowClient
    from prefect import get_client
    from prefect.exceptions import ParameterTypeError, PrefectHTTPStatusError
    from prefect.settings import get_current_settings

    from flows.pipeline import finetune

    pool = f"tuneline-test-{uuid.uuid4().hex[:6]}"
    assert main(["deploy", "--pool-name", pool]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "tuneline-finetune/default" in out and "nightly-retrain: cron 0 2 * * * UTC (off)" in out

    with get_client(sync_client=True) as client:
        # Every deployment is on the new process pool, which deploy created.
        assert client.read_work_pool(pool).type == "process"
        deployed = {d.name for d in client.read_deployments() if d.work_pool_name == pool}
        assert deployed == {*PARAM_SETS, "incoming", "gpu", "sweep", "trial"}
        # The sweep's form: the parameters and the space, each distribution a choice of its own shape.
        sweep = client.read_deployment_by_name("tuneline-sweep/sweep")
        definitions = sweep.parameter_openapi_schema["definitions"]
        assert {"PipelineParams", "SweepSpace", "LogRange", "Choices"} <= set(definitions)
        assert definitions["SweepSpace"]["properties"]["parameters"]["description"].startswith("Dotted PipelineParams")
        assert sweep.parameters["space"]["pruner"]["kind"] == "median"

        # The form: PipelineParams' schema with descriptions, defaults and bounds; the values of the file.
        default = client.read_deployment_by_name("tuneline-finetune/default")
        assert default.enforce_parameter_schema and default.entrypoint == "flows.pipeline.finetune"
        schema = default.parameter_openapi_schema
        train = schema["definitions"]["TrainConfig"]["properties"]
        assert train["max_steps"]["description"].startswith("Optimizer steps")
        assert train["max_steps"]["anyOf"][0]["minimum"] == 1 and train["learning_rate"]["default"] == 2e-4
        assert set(train["method"]["enum"]) == {"full", "head", "lora", "qlora", "reft"}
        assert schema["definitions"]["PipelineParams"]["additionalProperties"] is False
        assert default.parameters["params"]["train"]["max_steps"] == 60
        assert default.description.startswith("The default run")
        [nightly] = default.schedules
        assert nightly.schedule.cron == "0 2 * * *" and nightly.slug == "nightly-retrain" and not nightly.active

        # A schedule switched on in the UI stays on when deploy runs again; --schedules off switches it off.
        client.update_deployment_schedule(default.id, nightly.id, active=True)
        assert main(["deploy", "--pool-name", pool, "--only", "default"]) == 0
        assert [s.active for s in client.read_deployment_by_name("tuneline-finetune/default").schedules] == [True]
        assert main(["deploy", "--pool-name", pool, "--only", "default", "--schedules", "off"]) == 0
        assert [s.active for s in client.read_deployment_by_name("tuneline-finetune/default").schedules] == [False]

        # The user opens the tiny deployment's form and edits a few fields.
        tiny = client.read_deployment_by_name("tuneline-finetune/tiny")
        form = copy.deepcopy(tiny.parameters)
        name = f"ui-{uuid.uuid4().hex[:6]}"
        rows = [chat(f"What is {i} plus one?", f"{i} plus one is {i + 1}.") for i in range(24)]
        form["params"]["ingest"]["source"] = str(write_jsonl(tmp_path / "ui.jsonl", rows))
        # The session's shared prefix, where the tiny base model already is (its artifact is found, not rebuilt).
        form["params"]["artifacts_prefix"] = "shared"
        form["params"]["register"]["model_name"] = name
        form["params"]["train"].update(max_steps=2, batch_size=4)
        form["params"]["evaluate"].update(max_records=8, bleu_samples=1)
        run = client.create_flow_run_from_deployment(tiny.id, parameters=form)

        # Out of bounds: the server refuses the run at creation, naming the field.
        bad = copy.deepcopy(form)
        bad["params"]["train"]["max_steps"] = -1
        with pytest.raises(PrefectHTTPStatusError) as refused:  # 409, as Prefect answers it
            client.create_flow_run_from_deployment(tiny.id, parameters=bad)
        assert refused.value.response.status_code == 409
        detail = refused.value.response.json()["detail"]
        assert "Validation failed for field 'params.train.max_steps'" in detail, detail
        assert "-1 is less than the minimum of 1" in detail, detail
        # Valid per field but inconsistent (quant settings with method lora): the schema cannot say
        # so; the flow's own parameter check (what a worker runs first) refuses it, naming the field.
        odd = copy.deepcopy(form)
        odd["params"]["train"]["quant"]["quant_type"] = "fp4"
        with pytest.raises(ParameterTypeError, match=r"params.train: .*train.quant settings apply to method qlora"):
            finetune.validate_parameters(odd)

        log = tmp_path / "worker.log"
        with worker(pool, get_current_settings().api.url, log):
            [done] = wait_final(client, [run.id], log)
    assert done.state.is_completed(), f"{done.state.message}\n{log.read_text(errors='replace')[-4000:]}"
    [version] = MlflowClient().search_model_versions(f"name = '{name}'")
    assert version.tags["tuneline.base_digest"] == tiny_model.base.digest
