"""The container stage (``make test-containers``, run by .ci/run after the unit suite; marker ``containers``):
the CPU image built with podman from a local base (``make images``), the data steps and training in it as the
non-root user, two containers as two torchrun nodes, a flow run through a real Docker-API worker on podman's
socket, and the Kubernetes pool's pod template under ``podman kube play``. Needs podman, runc and mmdebstrap
(the make target installs them with apt) and the local services (SeaweedFS, MLflow; Prefect where asked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from helpers import assert_same_training, background, free_port, sft_dataset, weights

pytestmark = [pytest.mark.containers, pytest.mark.services]

CLIENT_ENV = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "TUNELINE_S3_ENDPOINT_URL"]


def podman(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    from services import images

    done = subprocess.run([images.engine(), *args], env=images.engine_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{images.engine()} {' '.join(args[:3])} exited {done.returncode}: {done.stderr[-3000:]}")
    return done


@pytest.fixture(scope="session")
def image():
    """The CPU image as `make images` builds it (the layers are cached: a rebuild after a code change is short);
    the images this session made (the image, the local base, the build's cached layers) are removed afterwards,
    those that were there before are kept."""
    from services import images

    made = [name for name in (images.tag("cpu"), images.BASE) if not images.exists(name)]
    report = images.build("cpu")
    assert report["size_mib"] > 0 and report["seconds"] > 0
    yield report["image"]
    for name in made:
        podman("rmi", "--force", name, check=False)
    if made:
        podman("image", "prune", "--force", check=False)  # the build's intermediate layers, now dangling


@pytest.fixture
def containers():
    """Names of the containers a test starts; every one is removed afterwards, whatever happened."""
    names: list[str] = []
    yield names
    for name in names:
        podman("rm", "--force", "--time", "0", name, check=False)


def test_the_image_runs_a_data_step_as_its_non_root_user(image, tmp_path):
    assert podman("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip() == "10001:10001"
    records = [{"text": "write to kim.minji@example.co.kr or call 010-1234-5678"}, {"text": "nothing to hide"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp_path.chmod(0o777)  # the container's user (10001) writes its output here
    done = podman("run", "--rm", "--network", "none", "--volume", f"{tmp_path}:/data", image, "sh", "-c",
                  "id -u && tuneline scrub --input /data/in.jsonl --output /data/out.jsonl --field text")
    assert done.stdout.splitlines()[0] == "10001"
    out = [json.loads(line)["text"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert "kim.minji@example.co.kr" not in out[0] and "<EMAIL>" in out[0] and out[1] == "nothing to hide"
    assert (tmp_path / "out.jsonl").stat().st_uid != 0  # written by the container's user, not root


def test_two_containers_as_two_torchrun_nodes_train_like_one_process(image, services, tiny_model, tmp_path, containers):
    """Two containers on the host network, one rank each, meet through a c10d rendezvous (gloo): DDP, then FSDP,
    give the steps, losses and weights of one process on the same global batches."""
    from safetensors.torch import load_file

    from steps.config import TrainConfig
    from steps.core.lineage import run_key
    from steps.core.store import ArtifactRef, ArtifactStore, ModelRef
    from steps.train import parallel
    from steps.train.step import STEP, train_model

    store = ArtifactStore.from_env(prefix=f"test-{uuid.uuid4().hex[:10]}")
    data = sft_dataset(store, tmp_path, tiny_model, n=30)
    one = TrainConfig(method="full", max_steps=4, batch_size=5, grad_accum_steps=2, learning_rate=1e-3,
                      warmup_steps=1, seed=5, checkpoint_every=2)
    single = train_model(one, data, tiny_model, store)
    for strategy in ("ddp", "fsdp"):
        two = one.model_copy(update={"processes": 2, "distributed": strategy})
        key = run_key(STEP, two, [data.digest, tiny_model.base.digest])
        args = parallel.rank_args(two, data, tiny_model, store, key, cache_dir="/tmp/tuneline-cache")
        endpoint, run_id = f"127.0.0.1:{free_port()}", uuid.uuid4().hex[:8]
        names = [f"tuneline-node{i}-{run_id}" for i in range(2)]
        containers.extend(names)
        for i, name in enumerate(names):  # each node its own address (loopback has all of 127/8): torchrun tells
            # nodes apart by address and process id, and both containers' ranks are process 1 of their own
            command = parallel.torchrun_command(args, 1, nodes=2, endpoint=endpoint, run_id=run_id,
                                                local_addr=f"127.0.0.{i + 1}", python="python")
            podman("run", "--detach", "--name", name, "--network", "host", *[f"--env={v}" for v in CLIENT_ENV],
                   "--env=GLOO_SOCKET_IFNAME=lo", "--env=OMP_NUM_THREADS=1", image, *command)
        codes = [podman("wait", name, timeout=300, check=False).stdout.strip() for name in names]
        logs = "\n".join(podman("logs", name, check=False).stderr[-2000:] for name in names)
        assert codes == ["0", "0"], logs
        done = store.lookup(STEP, key)
        assert done is not None, logs
        double = ModelRef(base=tiny_model.base, adapter=ArtifactRef(**done.model_dump()))
        assert_same_training(store, single, double, "full")
        assert store.read_json(double.adapter, "train_report.json")["distributed"] == strategy
    base = load_file(store.download(tiny_model.base) / "model.safetensors")
    trained = weights(store, single, "full")
    assert max((trained[k] - base[k]).abs().max().item() for k in base) > 1e-3  # the comparison is not vacuous


@pytest.fixture
def docker_socket(tmp_path_factory):
    """podman's Docker-compatible API (``podman system service``) on a socket of its own, stopped afterwards."""
    from services import images

    sock = tmp_path_factory.mktemp("podman") / "podman.sock"
    service = subprocess.Popen([images.engine(), "system", "service", "--time=0", f"unix://{sock}"],
                               env=images.engine_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert service.poll() is None and time.monotonic() < deadline, "podman system service did not start"
        time.sleep(0.2)
    yield f"unix://{sock}"
    service.terminate()
    try:
        service.wait(timeout=20)
    except subprocess.TimeoutExpired:
        service.kill()
        service.wait()


def docker_worker(pool: str, docker_host: str, api_url: str, log: Path):
    """A real prefect-docker worker (``prefect worker start --type docker``) talking to podman's socket."""
    env = {**os.environ, "DOCKER_HOST": docker_host, "PREFECT_API_URL": api_url,
           "PREFECT_HOME": str(log.parent / "prefect-home"), "PREFECT_WORKER_QUERY_SECONDS": "1"}
    return background([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "docker"],
                      env, log)


def test_dispatched_steps_run_in_containers_through_a_docker_worker(image, prefect_api, docker_socket, tiny_model,
                                                                     tmp_path, capsys):
    """A pipeline run dispatches scrub and train to the step deployment on a Docker pool (the shipped template,
    credentials by reference); a prefect-docker worker on podman's socket runs each in a container of the image, as
    its non-root user; the run registers its model with the artifacts those containers wrote."""
    from mlflow import MlflowClient
    from prefect import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    from flows.cli import DEFAULT_PARAMS, main
    from flows.pipeline import finetune
    from steps.config import PipelineParams
    from steps.core.store import ArtifactStore

    pool = f"tuneline-docker-{uuid.uuid4().hex[:6]}"
    assert main(["deploy", "--pool", "docker", "--pool-name", pool, "--only", "gpu", "--image-gpu", image,
                 "--publish-service-env"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "tuneline-step/gpu" in out and os.environ["AWS_SECRET_ACCESS_KEY"] not in out
    with get_client(sync_client=True) as client:
        template = client.read_work_pool(pool).base_job_template
        deployment = client.read_deployment_by_name("tuneline-step/gpu")
        for secret in (os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["MLFLOW_TRACKING_PASSWORD"]):
            assert secret not in json.dumps(template) + json.dumps(deployment.job_variables)
        # This host's services listen on 127.0.0.1, the image is local, and the containers stay for inspection.
        client.update_deployment(deployment.id, DeploymentUpdate(job_variables={
            **deployment.job_variables, "network_mode": "host", "image_pull_policy": "Never", "auto_remove": False}))

    name = f"docker-{uuid.uuid4().hex[:6]}"
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus two?"},
                          {"role": "assistant", "content": f"{i} plus two is {i + 2}."}]} for i in range(24)]
    rows.append({"messages": [{"role": "user", "content": "Mail kim.minji@example.co.kr"},
                              {"role": "assistant", "content": "Noted."}]})
    source = tmp_path / "d.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = PipelineParams.from_yaml(DEFAULT_PARAMS.with_name("tiny.yaml"), [
        f"ingest.source={source}", "artifacts_prefix=shared", f"register.model_name={name}", "train.max_steps=2",
        "evaluate.max_records=8", "evaluate.bleu_samples=1",
    ]).model_copy(update={"dispatch": {"scrub": "tuneline-step/gpu", "train": "tuneline-step/gpu"}})

    log = tmp_path / "worker.log"
    try:
        with docker_worker(pool, docker_socket, prefect_api, log):
            state = finetune(params, return_state=True)
        assert state.is_completed(), f"{state.message}\n{log.read_text(errors='replace')[-4000:]}"
        summary = state.result()

        with get_client(sync_client=True) as client:
            children = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["tuneline-step"])))
            mine = {r.parameters["step"]: r for r in children if r.work_pool_name == pool}
            assert set(mine) == {"scrub", "train"} and all(r.state.is_completed() for r in mine.values())
        # Each step ran in its own container of the image, as the image's user.
        ran = json.loads(podman("ps", "--all", "--format", "json", "--filter", f"ancestor={image}").stdout or "[]")
        runs = {str(r.id) for r in mine.values()}
        ours = [c for c in ran if c.get("Labels", {}).get("io.prefect.flow-run-id") in runs]
        assert len(ours) == 2, [c.get("Labels") for c in ran]
        for c in ours:
            info = json.loads(podman("inspect", c["Id"]).stdout)[0]
            assert info["Config"]["User"] == "10001:10001" and info["State"]["ExitCode"] == 0
    finally:  # the worker's containers (kept for the inspection above), whatever happened
        for c in json.loads(podman("ps", "--all", "--format", "json", "--filter", "label=io.prefect.flow-run-id",
                                   check=False).stdout or "[]"):
            podman("rm", "--force", c["Id"], check=False)

    store = ArtifactStore.from_env("shared")
    clean, tuned = summary.record.datasets["scrub"], summary.record.model
    assert clean.stats["pii"]["EMAIL"] == 1
    assert store.manifest(clean.key)["digest"] == clean.digest
    assert store.manifest(tuned.adapter.key)["digest"] == tuned.adapter.digest
    [version] = MlflowClient().search_model_versions(f"name = '{name}'")
    assert version.tags["tuneline.data_digest"] == summary.record.datasets["tokenize"].digest


def test_the_kubernetes_pod_template_runs_a_flow_run_under_podman_kube_play(image, prefect_api, tiny_model, tmp_path,
                                                                           capsys):
    """The Kubernetes pool's base job template rendered for a deployment as its worker would submit it
    (``flows.deploy.job_manifest``); its pod template played by podman: the flow run completes in the pod, as user
    10001, with the services' endpoints and credentials from the Secret it names by reference."""
    import base64

    import yaml
    from mlflow import MlflowClient
    from prefect import get_client
    from prefect.deployments import run_deployment

    from flows.cli import main
    from flows.deploy import job_manifest

    pool, secret, name = (f"tuneline-{what}-{uuid.uuid4().hex[:6]}" for what in ("kubernetes", "services", "kube"))
    assert main(["deploy", "--pool", "kubernetes", "--pool-name", pool, "--only", "tiny", "--image-cpu", image]) == 0, \
        capsys.readouterr().err
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("tuneline-finetune/tiny")
        template = client.read_work_pool(pool).base_job_template
    params = json.loads(json.dumps(deployment.parameters["params"]))
    params["register"]["model_name"] = name
    params["train"]["max_steps"], params["evaluate"]["max_records"], params["evaluate"]["bleu_samples"] = 2, 8, 1
    flow_run = run_deployment("tuneline-finetune/tiny", parameters={"params": params}, timeout=0)

    job = job_manifest(template, {**deployment.job_variables, "image": image, "image_pull_policy": "Never",
                                  "command": ["prefect", "flow-run", "execute"],
                                  "env": [{"name": "PREFECT_API_URL", "value": prefect_api},
                                          {"name": "PREFECT__FLOW_RUN_ID", "value": str(flow_run.id)}],
                                  "env_from": [{"secretRef": {"name": secret}}]})
    spec = job["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] and spec["containers"][0]["envFrom"] == [
        {"secretRef": {"name": secret}}]
    manifest = json.dumps(job)
    assert all(os.environ[var] not in manifest for var in ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD"))
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
           "spec": {**spec, "hostNetwork": True}}  # this host's services listen on 127.0.0.1
    (tmp_path / "pod.yaml").write_text(yaml.safe_dump(pod))
    # A Kubernetes Secret as podman keeps one: a JSON map of base64 values.
    values = {var: os.environ[var] for var in (*CLIENT_ENV, "TUNELINE_BUCKET", "MLFLOW_TRACKING_URI",
                                               "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_USERNAME",
                                               "MLFLOW_TRACKING_PASSWORD")}
    (tmp_path / "secret.json").write_text(json.dumps({k: base64.b64encode(v.encode()).decode() for k, v in
                                                      values.items()}))
    (tmp_path / "secret.json").chmod(0o600)
    podman("secret", "create", secret, str(tmp_path / "secret.json"))
    try:
        podman("kube", "play", str(tmp_path / "pod.yaml"))
        container = f"{name}-{spec['containers'][0]['name']}"
        code = podman("wait", container, timeout=600).stdout.strip()
        logs = podman("logs", container, check=False)
        assert code == "0", (logs.stdout + logs.stderr)[-4000:]
        info = json.loads(podman("inspect", container).stdout)[0]
        assert info["Config"]["User"].split(":")[0] == "10001"
    finally:
        podman("kube", "down", str(tmp_path / "pod.yaml"), check=False)
        podman("secret", "rm", secret, check=False)
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(flow_run.id).state.is_completed()
    [version] = MlflowClient().search_model_versions(f"name = '{name}'")
    assert version.run_id
