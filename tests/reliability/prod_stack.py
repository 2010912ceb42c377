"""The production-shaped local stack for the load and security tests, and the one load run
both use.

- ``prod_stack``: SeaweedFS + MLflow (basic auth) + Prefect server, both on PostgreSQL
  (``ServiceConfig(backend="postgres")``, credentials on every service as by default), in a tmp state dir on free ports.
- ``first_run``: one tiny flow run in its own process (the security tests' run, the load's warm-up);
- ``load_run``: then ``RUNS`` concurrent flow runs of the tiny pipeline against the same stack;
  every log record of every run is kept for the lock-error and secret scans.
- ``reliability_report``: merges a section of figures into the JSON file named by
  ``TUNELINE_RELIABILITY_REPORT`` (nothing when it is unset), for docs/RELIABILITY.md.

tests/reliability/conftest.py registers the fixtures once for the directory (imported into each
test module instead, a session fixture would run once per module).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import multiprocessing
import os
import shutil
import socket
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers import chat, free_weed_base, write_jsonl
from reliability_report import record_figures

RUNS = 20
TINY = Path(__file__).resolve().parents[2] / "deployments" / "params" / "tiny.yaml"
# The cheapest run that still passes every step. The runs differ only in their MLflow experiment:
# data, base model, training and evaluation come from the cache after the first run (as for any
# rerun with unchanged inputs), and every run registers its own version of the one model: the
# part of a run that writes to the databases. (Training each run anew adds CPU, not database load.)
LOAD_OVERRIDES = ["train.max_steps=2", "evaluate.max_records=8", "evaluate.bleu_samples=1",
                  "evaluate.max_new_tokens=4", "evaluate.smoke_prompts=[hi]", "evaluate.smoke_max_new_tokens=4",
                  "evaluate.reference_blocks=0"]


def report_section(name: str, figures: dict) -> None:
    """Merge ``{name: figures}`` into $TUNELINE_RELIABILITY_REPORT (a JSON object), if set."""
    for key, value in figures.items():
        record_figures(name, key, value)


@pytest.fixture(scope="session")
def prod_stack(tmp_path_factory):
    from services.stack import ServiceConfig, down, postgres_data_dir, up

    backend = os.environ.get("TUNELINE_LOAD_BACKEND", "postgres")  # sqlite: the same tests on the default backend
    if backend == "postgres" and not any(Path("/usr/lib/postgresql").glob("*/bin/postgres")) \
            and not shutil.which("postgres"):
        pytest.skip("PostgreSQL server binaries not found: apt-get install postgresql")
    base = free_weed_base(30000)
    weed = {base + i for i in range(5)} | {base + 10000 + i for i in range(5)}
    ports: list[int] = []
    while len(ports) < 3:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in weed and port not in ports:
            ports.append(port)
    cfg = ServiceConfig(tmp_path_factory.mktemp("prod") / "services", s3_port=base, mlflow_port=ports[0],
                        prefect_port=ports[1], db_port=ports[2], bucket="tuneline-prod", backend=backend)
    t0 = time.monotonic()
    try:
        env = up(cfg, prefect=True)
        yield {"cfg": cfg, "env": env, "up_s": time.monotonic() - t0}
    finally:
        down(cfg)
        if backend == "postgres":
            shutil.rmtree(postgres_data_dir(cfg), ignore_errors=True)


def api_settings(env: dict[str, str]) -> dict:
    """Prefect settings of a client of that stack. Settings are read at import, so the API's URL and
    its auth string go in explicitly."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL

    return {PREFECT_API_URL: env["PREFECT_API_URL"], PREFECT_API_AUTH_STRING: env.get("PREFECT_API_AUTH_STRING")}


@contextlib.contextmanager
def client_of(env: dict[str, str]):
    """This process as a client of that stack: its environment and its Prefect API."""
    from prefect.settings import temporary_settings

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with temporary_settings(updates=api_settings(env)):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(f"{record.name} {record.levelname} {record.getMessage()}")
            if record.exc_info:
                self.lines.append(logging.Formatter().formatException(record.exc_info))
        except Exception:  # noqa: BLE001 - a log line that cannot be formatted is not a test failure
            pass


@dataclass
class LoadRun:
    model_name: str
    prefix: str
    wall_s: float  # the RUNS concurrent runs, after the warm-up run
    warmup_s: float
    runs: list = field(default_factory=list)  # one dict per run: flow_run_id, state, message, summary, peak_rss_mib
    log_lines: list[str] = field(default_factory=list)  # every log record of every run's process
    secrets: dict[str, str] = field(default_factory=dict)


def run_one_flow(params: dict, env: dict[str, str]) -> dict:
    """One flow run in this (forked) process, as a worker would run it; returns what the test checks."""
    import resource

    import torch
    from prefect.settings import temporary_settings

    from flows.pipeline import finetune
    from steps.config import PipelineParams

    torch.set_num_threads(1)  # 20 processes share 2 cores
    keep = _capture_logs(env)
    with temporary_settings(updates=api_settings(env)):
        state = finetune(PipelineParams.model_validate(params), return_state=True)
        summary = state.result().model_dump(mode="json") if state.is_completed() else None
    return {"flow_run_id": str(state.state_details.flow_run_id), "state": state.name, "message": state.message,
            "summary": summary, "log_lines": keep.lines,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _capture_logs(env: dict[str, str]) -> _Keep:
    """This (forked) process takes the stack's environment and keeps every log line, logging
    configured as `tuneline run` does (flows/cli.py)."""
    os.environ.update(env)
    keep = _Keep()
    for lg in (logging.getLogger(), logging.getLogger("prefect")):
        lg.addHandler(keep)
    logging.getLogger().setLevel(logging.INFO)
    for chatty in ("httpx", "httpcore", "botocore", "urllib3", "alembic"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    return keep


def run_flows_in_threads(params: list[dict], env: dict[str, str]) -> list[dict]:
    """len(params) flow runs at once, each in a thread of this (forked) process."""
    import torch
    from prefect.settings import temporary_settings

    from flows.pipeline import finetune
    from steps.config import PipelineParams

    torch.set_num_threads(1)
    keep = _capture_logs(env)

    def one(p: dict) -> dict:
        state = finetune(PipelineParams.model_validate(p), return_state=True)
        summary = state.result().model_dump(mode="json") if state.is_completed() else None
        return {"flow_run_id": str(state.state_details.flow_run_id), "state": state.name,
                "message": state.message, "summary": summary}

    with temporary_settings(updates=api_settings(env)):
        with ThreadPoolExecutor(max_workers=len(params)) as threads:
            # Threads do not inherit context variables: each gets a copy of this one's (the settings).
            futures = [threads.submit(contextvars.copy_context().run, one, p) for p in params]
            runs = [f.result() for f in futures]
    import resource

    runs[0]["log_lines"] = keep.lines
    runs[0]["process_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return runs


@pytest.fixture(scope="session")
def run_pool():
    """Fresh processes for the runs, forked from a server that imported the pipeline once (an
    import of torch, transformers, Prefect and MLflow costs ~10 s of CPU): the test process keeps
    no Prefect or MLflow state, and the runs inherit none of it."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["flows.pipeline", "great_expectations", "mlflow.pyfunc", "matplotlib.pyplot",
                                "prod_stack"])
    with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
        yield pool


@pytest.fixture(scope="session")
def load_params(tmp_path_factory) -> tuple[str, list[dict]]:
    """RUNS + 1 parameter sets: same data, prefix and model name, an MLflow experiment each."""
    from steps.config import PipelineParams

    rows = [chat(f"What is {i} times three?", f"{i} times three is {3 * i}.") for i in range(40)]
    source = write_jsonl(tmp_path_factory.mktemp("load") / "chats.jsonl", rows)
    name = f"load-{uuid.uuid4().hex[:6]}"
    return name, [PipelineParams.from_yaml(TINY, [f"ingest.source={source}", f"artifacts_prefix={name}",
                                                  f"register.model_name={name}", f"register.experiment={name}-{i}",
                                                  *LOAD_OVERRIDES]).model_dump(mode="json", by_alias=True)
                  for i in range(RUNS + 1)]


def _secrets(prod_stack: dict) -> dict[str, str]:
    creds = json.loads((prod_stack["cfg"].state_dir / "credentials.json").read_text())
    return {**creds, "MLFLOW_TRACKING_PASSWORD": prod_stack["env"]["MLFLOW_TRACKING_PASSWORD"]}


@pytest.fixture(scope="session")
def first_run(prod_stack, run_pool, load_params) -> LoadRun:
    """One tiny flow run under MLflow basic auth; it also fills the cache for the load run."""
    name, params = load_params
    t0 = time.monotonic()
    run = run_pool.submit(run_one_flow, params[0], prod_stack["env"]).result()
    wall = time.monotonic() - t0
    assert run["state"] == "Completed", run["message"]
    return LoadRun(name, name, wall, 0.0, [run], run.pop("log_lines"), _secrets(prod_stack))


@pytest.fixture(scope="session")
def load_run(prod_stack, run_pool, load_params, first_run) -> LoadRun:
    """After ``first_run`` (the warm-up, in its own process), RUNS flow runs at once against the
    Prefect server and MLflow of ``prod_stack``, in threads of one process. A process per run
    needs ~250 MB each (5 GB for 20; measured on the shared 2-core CI machine, where that was
    more than was free); every step the threads run is cached but register and promote, which
    construct no model (transformers' model construction is not thread-safe)."""
    name, params = load_params
    t0 = time.monotonic()
    runs = run_pool.submit(run_flows_in_threads, params[1:], prod_stack["env"]).result()
    wall = time.monotonic() - t0
    lines = runs[0].pop("log_lines")
    return LoadRun(name, name, wall, first_run.wall_s, runs, lines, _secrets(prod_stack))
