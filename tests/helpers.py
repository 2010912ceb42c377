"""Small builders shared by the tests."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
from pathlib import Path


def chat(user: str, assistant: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], **extra}


def write_jsonl(path: Path, rows: list) -> Path:
    import json

    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def validate_stats(ref) -> dict:
    """A validate artifact's stats without ``raw`` (the key and digest of ingest's artifact, which vary)."""
    return {k: v for k, v in ref.stats.items() if k != "raw"}


def all_keys(store) -> list[str]:
    return store.list_keys(store.prefix + "/")


def sft_dataset(store, tmp_path: Path, model, n: int = 40, max_seq_len: int = 64):
    """Ingest -> validate -> scrub -> tokenize a small arithmetic chat set; returns the tokenized DatasetRef."""
    from steps.config import IngestConfig, ScrubConfig, TokenizeConfig, ValidateConfig
    from steps.ingest import ingest_records
    from steps.scrub.step import scrub_records
    from steps.tokenize.step import tokenize_dataset
    from steps.validate import validate_records

    rows = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(n)]
    raw = ingest_records(IngestConfig(source=str(write_jsonl(tmp_path / "raw.jsonl", rows))), store)
    clean = scrub_records(ScrubConfig(), validate_records(ValidateConfig(), raw, store), store)
    return tokenize_dataset(TokenizeConfig(eval_fraction=0.2, max_seq_len=max_seq_len), clean, model, store)


TOPICS = {"sport": ["match", "goal", "team", "coach"], "tech": ["phone", "chip", "software", "network"],
          "money": ["bank", "shares", "profit", "market"]}


def labelled_rows(kind: str, n: int = 60) -> list[dict]:
    """Classification: short texts whose topic words decide the label; regression: the label
    is the number of times "up" occurs minus the times "down" occurs, over 2."""
    import random

    rng = random.Random(7)
    rows = []
    for i in range(n):
        if kind == "classification":
            label = sorted(TOPICS)[i % len(TOPICS)]
            words = rng.choices(TOPICS[label], k=5) + rng.choices(["the", "a", "today", "news"], k=3)
            rng.shuffle(words)
            rows.append({"id": f"r{i:03d}", "text": " ".join(words), "label": label})
        else:
            ups, downs = rng.randint(0, 4), rng.randint(0, 4)
            words = ["up"] * ups + ["down"] * downs + ["day", "price"]
            rng.shuffle(words)
            rows.append({"id": f"r{i:03d}", "text": " ".join(words) + f" {i}", "label": (ups - downs) / 2})
    return rows


def preference_rows(n: int = 40) -> list[dict]:
    """Pairs whose chosen answer is the right sum and whose rejected answer is a wrong one."""
    return [{"id": f"p{i:03d}", "prompt": f"What is {i} plus {i}?", "chosen": f"{i} plus {i} is {2 * i}.",
             "rejected": f"I think it is {2 * i + 7}, maybe."} for i in range(n)]


def kind_dataset(store, tmp_path: Path, model, kind: str, rows: list[dict], max_seq_len: int = 64):
    """Ingest -> validate -> scrub -> tokenize records of ``kind``; returns the tokenized DatasetRef."""
    from steps.config import IngestConfig, ScrubConfig, TokenizeConfig, ValidateConfig
    from steps.ingest import ingest_records
    from steps.scrub.step import scrub_records
    from steps.tokenize.step import tokenize_dataset
    from steps.validate import validate_records

    raw = ingest_records(IngestConfig(source=str(write_jsonl(tmp_path / f"{kind}.jsonl", rows))), store)
    clean = scrub_records(ScrubConfig(), validate_records(ValidateConfig(record_kind=kind), raw, store), store)
    return tokenize_dataset(TokenizeConfig(eval_fraction=0.25, max_seq_len=max_seq_len), clean, model, store)


def token_documents(n: int = 5, seed: int = 0) -> list[dict]:
    """Rows of random token ids with a masked 3-token prompt, 6, 9, 12, ... tokens long (as SFT rows)."""
    import torch

    from steps.core.contract import IGNORE

    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 6 + 3 * i
        ids = torch.randint(5, 1000, (length,), generator=g).tolist()
        labels = [IGNORE] * 3 + ids[3:]  # a masked prompt, as in SFT rows
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_weed_base(low: int) -> int:
    """A SeaweedFS base port (it uses base..base+4 and the same +10000 for gRPC) in this process's own
    window of 1000 above ``low``: one window per pytest-xdist worker, so parallel workers never race
    for one block."""
    window = low + 1000 * (int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0) % 9)
    for _ in range(200):
        base = random.randint(window, window + 990)
        if all(_free(base + i) and _free(base + 10000 + i) for i in range(5)):
            return base
    raise RuntimeError(f"no free port block for SeaweedFS in {window}..{window + 1000}")



def drain_prefect_workers() -> None:
    """Send what this process's Prefect log and event workers still hold, and stop them: the next log
    line or event starts new ones, bound to the API the settings name then (a worker keeps the API it
    started with: a test switching servers would send its task runs' events to the old one)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()
    EventsWorker.drain_all()


def flow_run_page(flow_run_id) -> dict:
    """What the Prefect UI shows of a flow run: its name, tags, log lines (messages, in order) and
    markdown artifacts by key (logs sent first)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    drain_prefect_workers()
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), sort=LogSort.TIMESTAMP_ASC)
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
    return {"name": run.name, "tags": list(run.tags), "logs": [log.message for log in logs],
            "artifacts": {a.key: a.data for a in artifacts}}


def newest_flow_run(tag: str):
    """The newest flow run carrying ``tag``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])),
                                     sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=1)
    assert runs, f"no flow run tagged {tag}"
    return runs[0]


def serve(model_uri: str, cwd: Path):
    """``mlflow models serve -m MODEL_URI --env-manager local`` on a free port, as a user starts it; a context
    manager yielding its base URL once ``/ping`` answers (the server is stopped on exit)."""
    import contextlib
    import subprocess
    import sys

    @contextlib.contextmanager
    def running():
        port = free_port()
        mlflow_cli = Path(sys.executable).with_name("mlflow")
        # As from an activated virtual environment: the scoring server runs `uvicorn` from PATH.
        env = {**os.environ, "PATH": f"{mlflow_cli.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        proc = subprocess.Popen([str(mlflow_cli), "models", "serve", "-m", model_uri, "--env-manager", "local",
                                 "-h", "127.0.0.1", "-p", str(port), "-w", "1"], cwd=cwd, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_up(proc, f"{url}/ping", 240, lambda: proc.stdout.read())
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()

    return running()


def invoke(url: str, payload: dict) -> list:
    """POST /invocations with a JSON payload; the predictions."""
    import json
    import urllib.request

    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.loads(reply.read())["predictions"]


def wait_until_up(proc, url: str, seconds: float, output) -> None:
    """Poll ``url`` until it answers 200; fail with the process's last output (``output()``) if the process
    exits first or ``seconds`` pass."""
    import time
    import urllib.request

    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{url} did not come up:\n{output()[-3000:]}")
        time.sleep(0.5)


def kill_at_first_checkpoint(script: str, args: dict, killed, env: dict[str, str], timeout: float = 120) -> None:
    """Run ``script`` (training into the store ``killed``) in a child process and SIGKILL it as soon as its
    first checkpoint is committed; asserts it died mid-run and left no train artifact."""
    import json
    import signal
    import subprocess
    import sys
    import time

    from steps.train.checkpoints import CHECKPOINTS

    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any(k.endswith("_MANIFEST.json") for k in killed.list_keys(f"{killed.prefix}/{CHECKPOINTS}/")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"training was not killed mid-run: {proc.stderr.read().decode()[-2000:]}"
    assert not killed.list_keys(f"{killed.prefix}/train/"), "a killed run must leave no train artifact"


TRAIN_SCRIPT = """
import json, sys
from steps.config import TrainConfig
from steps.core.store import ArtifactStore, DatasetRef, ModelRef
from steps.train.step import train_model
args = json.loads(sys.argv[1])
train_model(TrainConfig.model_validate(args["cfg"]), DatasetRef.model_validate(args["data"]),
            ModelRef.model_validate(args["model"]), ArtifactStore.from_env(args["prefix"]))
"""


def killed_and_resumed(cfg, data, model, store):
    """``cfg`` trained uninterrupted into ``store``, and into a fresh store by a child process SIGKILLed at its
    first checkpoint then retried here: (train log, full weights) of each run, and the step the retry resumed from."""
    import os
    import uuid

    from safetensors.torch import load_file

    from steps.core.store import ArtifactStore
    from steps.train.step import train_model

    reference = train_model(cfg, data, model, store)
    killed = ArtifactStore.from_env(f"test-{uuid.uuid4().hex[:10]}")
    args = {"cfg": cfg.model_dump(mode="json"), "data": data.model_dump(mode="json"),
            "model": model.model_dump(mode="json"), "prefix": killed.prefix}
    kill_at_first_checkpoint(TRAIN_SCRIPT, args, killed, os.environ.copy())
    resumed = train_model(cfg, data, model, killed)
    runs = [(s.read_json(ref.adapter, "train_log.json"), load_file(s.download(ref.adapter) / "model.safetensors"))
            for s, ref in ((store, reference), (killed, resumed))]
    return runs[0], runs[1], resumed.adapter.stats["resumed_from"]


def die_after_checkpoint(monkeypatch, step: int):
    """Fault injection: the train step raises right after committing its checkpoint at ``step`` (the training
    process died). Returns the real ``Checkpoints.save``, to put back with ``monkeypatch.setattr``."""
    from steps.train import step as train

    original = train.Checkpoints.save

    def save_then_die(self, at, *args, **kwargs):
        original(self, at, *args, **kwargs)
        if at == step:
            raise RuntimeError("injected: the training process died")

    monkeypatch.setattr(train.Checkpoints, "save", save_then_die)
    return original


# Data-parallel runs against one process (tests/steps/train/test_parallel.py, the two-container run in
# tests/containers): same steps, learning rates, losses and weights.
PARALLEL_WEIGHTS = {"lora": "adapter_model.safetensors", "full": "model.safetensors"}
PARALLEL_ATOL = 1e-5  # observed: about 3e-8 (lora) and 1e-7 (full) on CPU


def weights(store, ref, method):
    from safetensors.torch import load_file

    return load_file(store.download(ref.adapter) / PARALLEL_WEIGHTS[method])


def assert_same_training(store, single, double, method, resumed_from=None):
    from steps.train.checkpoints import CHECKPOINTS

    report = store.read_json(double.adapter, "train_report.json")
    assert report["processes"] == 2 and report["resumed_from"] == resumed_from
    assert store.read_json(single.adapter, "train_report.json")["processes"] == 1
    assert double.adapter.stats["tokens_seen"] == single.adapter.stats["tokens_seen"]
    a, b = store.read_json(single.adapter, "train_log.json"), store.read_json(double.adapter, "train_log.json")
    assert [h["step"] for h in b] == [h["step"] for h in a] and [h["lr"] for h in b] == [h["lr"] for h in a]
    assert all(abs(x["loss"] - y["loss"]) < PARALLEL_ATOL for x, y in zip(a, b)), (a, b)
    expected, got = weights(store, single, method), weights(store, double, method)
    assert expected.keys() == got.keys()
    worst = max((expected[k] - got[k]).abs().max().item() for k in expected)
    assert worst < PARALLEL_ATOL, f"largest weight difference {worst:.2e}"
    # Checkpoints of the data-parallel run (written by rank 0) are cleared once it committed.
    key = double.adapter.key.rsplit("/", 1)[1]
    assert store.list_keys(f"{store.prefix}/{CHECKPOINTS}/{key}/") == []


@contextlib.contextmanager
def background(argv: list[str], env: dict[str, str], log: Path, cwd: Path | None = None):
    """``argv`` in its own process group, output to ``log``; stopped as a user stops a worker (Ctrl-C, SIGINT),
    killed if it lingers: nothing of it may outlive the test."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
