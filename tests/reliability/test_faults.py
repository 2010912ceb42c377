"""Fault injection at every step boundary, against the real local services.

- S3: 500, 503, read timeouts (the request applied, its reply lost) and connection resets,
  injected at the wire (a botocore ``before-send`` hook, ``s3faults.py``) into each step's
  reads and writes for a bounded number of calls; some bursts exhaust botocore's attempts so
  that Prefect's task retries must finish the job.
- MLflow: a dedicated tracking server is killed right after the register step created the
  model version, and started again on the same port and database.
- Training: the training process is killed (SIGKILL) while a checkpoint is being uploaded.

Each run must end completed, with exactly one manifest per step, no object visible under an
artifact key that its manifest does not list, and exactly one model version.

Figures go to the JSON file named by TUNELINE_RELIABILITY_REPORT (section "faults"), if set.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from helpers import chat, write_jsonl
from s3faults import KINDS, READS, WRITES, S3Faults, step_boundary_faults, wait_for

pytestmark = pytest.mark.services
REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "deployments" / "params" / "tiny.yaml"
MANIFEST = "_MANIFEST.json"
FLOW_STEPS = {"ingest": 1, "validate": 1, "scrub": 1, "base_model": 1, "tokenize": 1, "train": 1, "evaluate": 2}


# ---------------------------------------------------------------- shared checks and figures


def artifact_problems(store, expect: dict[str, int]) -> list[str]:
    """Every object under the prefix belongs to a committed artifact that lists it with the same
    digest (nothing partial or orphaned is visible), and each step has the expected manifests."""
    from steps.core.lineage import sha256_bytes

    problems: list[str] = []
    groups: dict[str, set[str]] = defaultdict(set)
    for key in store.list_keys(store.prefix + "/"):
        rest = key[len(store.prefix) + 1 :].split("/")
        if rest[0] == "train-checkpoints":
            problems.append(f"checkpoint left after the run: {key}")
            continue
        groups["/".join([store.prefix, *rest[:2]])].add("/".join(rest[2:]))
    counts: dict[str, int] = defaultdict(int)
    for artifact, names in sorted(groups.items()):
        if MANIFEST not in names:
            problems.append(f"{artifact}: objects without a manifest: {sorted(names)}")
            continue
        counts[artifact.split("/")[-2]] += 1
        listed = store.manifest(artifact)["files"]
        if names - {MANIFEST} != set(listed):
            problems.append(f"{artifact}: stored {sorted(names - {MANIFEST})} but the manifest lists {sorted(listed)}")
        for name, meta in listed.items():
            if sha256_bytes(store.get_bytes(f"{artifact}/{name}")) != meta["sha256"]:
                problems.append(f"{artifact}/{name} differs from its manifest digest")
    if dict(counts) != expect:
        problems.append(f"manifests per step {dict(counts)}, expected {expect}")
    return problems


def record_figures(name: str, figures: dict) -> None:
    """Merge ``figures`` into section "faults" of $TUNELINE_RELIABILITY_REPORT (if set)."""
    path = os.environ.get("TUNELINE_RELIABILITY_REPORT")
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        text = f.read()
        report = json.loads(text) if text.strip() else {}
        report.setdefault("faults", {})[name] = {**figures, "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                         time.gmtime())}
        f.seek(0)
        f.truncate()
        f.write(json.dumps(report, indent=2, sort_keys=True) + "\n")


def task_runs(flow_run_id, expected: int) -> list:
    """The flow run's task runs once their final states are recorded (the server learns them from events)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        def final():
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return [r for r in runs if r.state is not None and r.state.is_final()]

        wait_for(lambda: len(final()) >= expected, timeout=60, every=0.5)
        return final()


# ---------------------------------------------------------------- a tracking server this test may kill


class MlflowServer:
    """An MLflow tracking server of its own (SQLite database in ``root``), started like the
    session's (services/stack.py) so that a test may kill and restart it."""

    def __init__(self, root: Path, port: int):
        self.root, self.port = root, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.stopped_at: float | None = None
        self.outage_s: float | None = None
        self.restarter: threading.Thread | None = None  # a test's restart, joined before the last kill

    def start(self) -> None:
        env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": os.environ["TUNELINE_S3_ENDPOINT_URL"],
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # as services/stack.py: no job runner
        argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination", f"s3://{os.environ['TUNELINE_BUCKET']}/mlflow-faults-{self.port}",
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        with open(self.root / "mlflow.log", "ab") as log:
            self.proc = subprocess.Popen(argv, env=env, cwd=self.root, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def healthy(self) -> bool:
        try:
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(self.url + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_healthy(self, timeout: float = 120) -> None:
        if not wait_for(self.healthy, timeout, every=0.25):
            raise RuntimeError(f"mlflow server on {self.url} did not start; see {self.root / 'mlflow.log'}")

    def kill(self) -> None:
        """SIGKILL the server's whole process group (the uvicorn worker too), as a crash would."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        wait_for(lambda: not self.healthy(), timeout=10)
        self.proc = None


@pytest.fixture
def mlflow_server(services, tmp_path):

    root = tmp_path / "mlflow-server"
    root.mkdir()
    server = MlflowServer(root, _free_port())
    server.start()
    yield server
    if server.restarter is not None:
        server.restarter.join(180)
    server.kill()


def chats(tmp_path: Path) -> Path:
    rows = [chat(f"What is {i} times two?", f"{i} times two is {2 * i}.") for i in range(40)]
    rows += [chat("Email me at kim.minji@example.co.kr", "Sure, or call 010-2345-6789.")] * 2
    return write_jsonl(tmp_path / "chats.jsonl", rows)


# ---------------------------------------------------------------- S3 faults everywhere + MLflow restart

BURSTS = {
    # four in a row (the store's client makes 1 + 3 attempts): botocore gives up, the step fails with
    # a transient error and Prefect retries the task
    ("scrub", "PutObject", "data"): ("503", "reset", "500", "timeout"),  # a step's write
    ("tokenize", "GetObject", "data"): ("500", "timeout", "503", "reset"),  # a step's read (train reads its data)
    # the lock object is written, its reply lost: the retry meets the lock it holds itself
    ("promote-lock", "PutObject", "data"): ("timeout",),
}


def test_s3_faults_at_every_step_and_mlflow_killed_during_registration(prefect_api, store, tmp_path, monkeypatch,
                                                                        mlflow_server):
    import mlflow
    from mlflow import MlflowClient

    from flows import tasks
    from flows.pipeline import finetune
    from steps.config import PipelineParams

    name = f"faults-{uuid.uuid4().hex[:6]}"
    params = PipelineParams.from_yaml(TINY, [f"ingest.source={chats(tmp_path)}", f"artifacts_prefix={store.prefix}",
                                             f"register.model_name={name}", "train.checkpoint_every=2"])
    faults = S3Faults(store.prefix, step_boundary_faults(BURSTS), lock_names=(name,))

    # MLflow: killed right after the version was created (the description and alias are still to
    # come), down for a few seconds, then started again on the same port and database.
    register_version = mlflow.register_model
    restarted = threading.Event()

    def restart() -> None:
        time.sleep(2)
        mlflow_server.start()
        try:
            mlflow_server.wait_healthy()
            mlflow_server.outage_s = time.monotonic() - mlflow_server.stopped_at
        finally:
            restarted.set()

    def register_then_crash(*args, **kwargs):
        version = register_version(*args, **kwargs)
        if mlflow_server.stopped_at is None:
            mlflow_server.kill()
            mlflow_server.stopped_at = time.monotonic()
            # one quick client-side retry, not MLflow's default 7 with back-off: the outage outlasts the
            # client, so the register task fails and Prefect's retry has to finish the registration
            monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            mlflow_server.restarter = threading.Thread(target=restart, daemon=True)
            mlflow_server.restarter.start()
        return version

    register_step = tasks.register_model

    def register_waits_for_the_server(*args, **kwargs):
        try:
            return register_step(*args, **kwargs)
        except Exception:
            restarted.wait(180)  # Prefect's retry comes a few seconds later; have the server back by then
            raise

    monkeypatch.setattr(mlflow, "register_model", register_then_crash)
    monkeypatch.setattr(tasks, "register_model", register_waits_for_the_server)
    # The server started with the fixture and has until find-champion (well after training) to answer;
    # MLflow's client retries (7, with back-off) cover a slow start.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)

    started = time.monotonic()
    faults.install()
    try:
        state = finetune(params, return_state=True)
    finally:
        faults.uninstall()
    seconds = time.monotonic() - started
    assert state.is_completed(), state.message
    summary = state.result()

    # Faults really happened, of every kind, in every step's reads and writes.
    flow_steps = {s for s in FLOW_STEPS} | {"train-checkpoints"}
    assert set(faults.by(2)) == set(KINDS), faults.injected
    assert flow_steps <= faults.steps_faulted(WRITES), faults.injected
    assert flow_steps <= faults.steps_faulted(READS), faults.injected
    assert mlflow_server.outage_s is not None and restarted.is_set()

    # Completed through retries: Prefect re-ran the tasks whose calls exhausted botocore's attempts.
    runs = task_runs(state.state_details.flow_run_id, expected=11)
    attempts = {r.name.rsplit("-", 1)[0]: r.run_count for r in runs}
    assert attempts["scrub"] == 2 and attempts["train"] == 2 and attempts["register"] == 2, attempts
    assert all(r.state.is_completed() for r in runs), [(r.name, r.state.name) for r in runs]

    # Exactly one manifest per step; nothing partial or orphaned is visible.
    assert artifact_problems(store, FLOW_STEPS) == []

    # Exactly one model version, completed on retry (alias and model card), and promoted.
    client = MlflowClient(mlflow_server.url)
    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 1, [(v.version, v.run_id) for v in versions]
    assert versions[0].version == summary.version.version
    assert client.get_model_version_by_alias(name, "champion").version == versions[0].version
    # registration finished (challenger set) before the gate moved it on: both moves on record, once each
    from steps.register.step import alias_history

    moves = [(e["alias"], e["from"], e["to"]) for e in alias_history(client, name)]
    assert moves == [("challenger", None, versions[0].version), ("champion", None, versions[0].version),
                     ("challenger", versions[0].version, None)], moves
    assert versions[0].description.startswith(f"# {name}")
    assert versions[0].tags["tuneline.registration"] == "complete"
    assert summary.decision.promoted
    lock_key = f"locks/promote/{name}.lock"
    assert not [k for k in store.list_keys("locks/promote/") if k == lock_key], "the promotion lock was not released"

    retries = {task: n - 1 for task, n in attempts.items() if n > 1}
    exhausted = sum(1 for kinds in BURSTS.values() if len(kinds) > 3)  # calls botocore gave up on
    record_figures("flow", {
        "runs": 1, "runs_completed": int(state.is_completed()), "flow_seconds": round(seconds, 1),
        "s3_faults_injected": faults.total(), "s3_faults_by_kind": faults.by(2), "s3_faults_by_step": faults.by(0),
        "s3_retries_by_botocore": faults.total() - exhausted, "s3_calls_failed_after_4_attempts": exhausted,
        "prefect_task_retries": retries, "manifests_per_step": FLOW_STEPS, "model_versions": len(versions),
        "mlflow_kills": 1, "mlflow_outage_s": round(mlflow_server.outage_s, 1),
    })


# ---------------------------------------------------------------- training killed during a checkpoint upload

TRAIN = """
import json, pathlib, sys, time
import botocore.session
from steps.config import TrainConfig
from steps.core.store import ArtifactStore, DatasetRef, ModelRef
from steps.train.step import train_model

args = json.loads(sys.argv[1])
marker = pathlib.Path(args["marker"])
# the run key holds the code version: use the parent's, so that its rerun is a retry of this run even
# while someone edits steps/ (as in CI, where nothing changes, both are the same anyway)
import steps.core.lineage
steps.core.lineage.code_version = lambda: args["code_version"]

def hang(request, **kwargs):  # the checkpoint at step 4: weights stored, optimizer state on the wire
    if "/step-000004/optimizer.safetensors" in request.url:
        marker.write_text(request.url)
        time.sleep(600)  # killed here

create_client = botocore.session.Session.create_client

def hooked(session, service_name, *a, **kw):
    client = create_client(session, service_name, *a, **kw)
    if service_name == "s3":
        client.meta.events.register("before-send.s3.PutObject", hang)
    return client

botocore.session.Session.create_client = hooked
train_model(TrainConfig.model_validate(args["cfg"]), DatasetRef.model_validate(args["data"]),
            ModelRef.model_validate(args["model"]), ArtifactStore.from_env(args["prefix"]))
"""


def test_training_killed_during_a_checkpoint_upload_resumes_from_the_last_complete_one(store, tmp_path, tiny_model):
    from helpers import sft_dataset
    from steps.config import LoraSettings, TrainConfig
    from steps.core.lineage import code_version, run_key
    from steps.train.checkpoints import CHECKPOINTS
    from steps.train.step import STEP, train_model

    cfg = TrainConfig(max_steps=6, checkpoint_every=2, batch_size=4, learning_rate=3e-3, warmup_steps=1,
                      lora=LoraSettings(r=4, alpha=8, dropout=0.0), seed=5)
    data = sft_dataset(store, tmp_path, tiny_model, n=24)
    checkpoints = f"{store.prefix}/{CHECKPOINTS}/{run_key(STEP, cfg, [data.digest, tiny_model.base.digest])}"
    marker = tmp_path / "uploading"
    args = {"cfg": cfg.model_dump(mode="json"), "data": data.model_dump(mode="json"),
            "model": tiny_model.model_dump(mode="json"), "prefix": store.prefix, "marker": str(marker),
            "code_version": code_version()}
    script = TRAIN
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(args)], cwd=REPO, env=os.environ.copy(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        uploading = wait_for(lambda: marker.exists() or proc.poll() is not None, timeout=240)
        assert uploading and marker.exists(), f"training never reached the upload: {proc.stderr.read().decode()[-3000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # What the crash left: checkpoint 2 complete, checkpoint 4 half-written without a manifest, no model.
    uploading_to = urlsplit(marker.read_text()).path
    assert f"/{checkpoints}/step-000004/" in uploading_to, (uploading_to, checkpoints)
    left = sorted(k[len(checkpoints) + 1 :] for k in store.list_keys(checkpoints + "/"))
    assert f"step-000002/{MANIFEST}" in left and "step-000004/trainable.safetensors" in left, left
    assert not [k for k in left if k.startswith("step-000004/") and k.endswith(MANIFEST)], left
    assert store.lookup(f"{CHECKPOINTS}/{checkpoints.rsplit('/', 1)[-1]}", "step-000004") is None
    assert not store.list_keys(f"{store.prefix}/{STEP}/")

    # The rerun ignores the partial checkpoint and resumes from the newest complete one.
    resumed = train_model(cfg, data, tiny_model, store)
    stats = resumed.adapter.stats
    assert stats["resumed_from"] == 2 and stats["steps"] == cfg.max_steps, stats
    log = store.read_json(resumed.adapter, "train_log.json")
    assert [h["step"] for h in log] == list(range(1, cfg.max_steps + 1))
    assert artifact_problems(store, {"ingest": 1, "validate": 1, "scrub": 1, "tokenize": 1, "train": 1}) == []
    record_figures("training_killed", {
        "runs": 1, "runs_completed": 1, "killed_during": "checkpoint step 4 upload (optimizer state)",
        "partial_objects_left": len([k for k in left if k.startswith("step-000004/")]),
        "resumed_from_step": stats["resumed_from"], "train_manifests": 1,
        "seconds": round(time.monotonic() - started, 1),
    })


# ---------------------------------------------------------------- a lock whose reply was lost


def test_a_lock_written_but_unanswered_is_still_held_by_its_writer(store):
    """The create-only PUT of a lock lands, its reply is lost; the retry meets a lock that exists
    (412). The writer must recognise its own lock, not wait for it to go stale (15 minutes)."""
    from steps.core.store import ArtifactStore

    lost_reply = lambda step, op, obj, call, attempt: "timeout" if (op, call, attempt) == ("PutObject", 0, 1) else None
    faults = S3Faults(store.prefix, lost_reply)
    faults.install()
    try:
        locks = ArtifactStore.from_env(store.prefix)
        started = time.monotonic()
        with locks.lock("promote/m", timeout=10):
            waited = time.monotonic() - started
            assert locks.exists(f"{store.prefix}/promote/m.lock")
    finally:
        faults.uninstall()
    assert dict(faults.injected) == {("promote", "PutObject", "timeout"): 1}
    assert waited < 10 and not locks.exists(f"{store.prefix}/promote/m.lock")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
