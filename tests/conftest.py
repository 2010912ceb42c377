"""Shared fixtures: the real local services (SeaweedFS S3 + MLflow server) on free
ports for the whole session, a store with a fresh prefix per test, and a tiny base model."""

from __future__ import annotations

import os
import uuid
from itertools import islice
from pathlib import Path

import pytest

from helpers import drain_prefect_workers, free_port, free_weed_base

os.environ.update({
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
})
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest-xdist workers share the cores: one compute thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory):
    from services.stack import ServiceConfig, down, up

    root = tmp_path_factory.mktemp("tuneline")
    os.environ["TUNELINE_CACHE"] = str(root / "cache")
    # The converted GGUF tokenizers (content-addressed, converted under a lock) are shared by the
    # pytest-xdist workers: one conversion per session instead of one per worker.
    basetemp = tmp_path_factory.getbasetemp()
    shared = (basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp) / "gguf-tokenizers"
    shared.mkdir(exist_ok=True)
    (root / "cache").mkdir()
    (root / "cache" / "gguf-tokenizers").symlink_to(shared, target_is_directory=True)
    base = free_weed_base(20000)
    weed_ports = {base + i for i in range(5)} | {base + 10000 + i for i in range(5)}
    mlflow_port, prefect_port = islice((p for p in iter(free_port, None) if p not in weed_ports), 2)
    cfg = ServiceConfig(state_dir=root / "services", s3_port=base, mlflow_port=mlflow_port,
                        prefect_port=prefect_port, bucket="tuneline-test")
    os.environ.update(up(cfg, prefect=False))
    yield cfg
    down(cfg)


@pytest.fixture
def store(services):
    from steps.core.store import ArtifactStore

    return ArtifactStore.from_env(prefix=f"test-{uuid.uuid4().hex[:10]}")


@pytest.fixture(scope="session")
def tiny_model(services):
    """A tiny random Llama with the SmolLM2 tokenizer, committed once under a shared prefix."""
    from steps.base_model import prepare_base_model
    from steps.config import BaseModelConfig
    from steps.core.store import ArtifactStore

    return prepare_base_model(BaseModelConfig(source="tiny-random-llama"), ArtifactStore.from_env("shared"))


@pytest.fixture(scope="session")
def tiny_encoder(services):
    """A tiny random BERT with the all-MiniLM-L6-v2 tokenizer, committed once under a shared prefix."""
    from steps.base_model import prepare_base_model
    from steps.config import BaseModelConfig
    from steps.core.store import ArtifactStore

    return prepare_base_model(BaseModelConfig(source="tiny-random-bert"), ArtifactStore.from_env("shared"))


@pytest.fixture(scope="session")
def tiny_model_dir(request) -> Path:
    """The tiny Llama's folder (weights, config, tokenizer); ``TUNELINE_TINY_MODEL_DIR`` names one already built on a
    machine without the services (the GPU machine's run of the CUDA cases: bench/gpu_check.sh)."""
    if os.environ.get("TUNELINE_TINY_MODEL_DIR"):
        return Path(os.environ["TUNELINE_TINY_MODEL_DIR"])
    from steps.core.store import ArtifactStore

    request.getfixturevalue("services")
    return ArtifactStore.from_env("shared").download(request.getfixturevalue("tiny_model").base)


@pytest.fixture
def tiny_tokenizer(tiny_model_dir):
    """A fresh copy per test: calls with padding or truncation, or a padding side, change a tokenizer's state."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# The flow tests' Prefect API keeps its database in memory, behind one connection (the URL Prefect's
# settings document for tests). With a database file (prefect_test_harness), a flow run's final state
# change once waited 60 s while the server's task-run recorder waited on SQLite's write lock (busy
# timeout 60 s) and failed; the client's request had timed out at 60 s meanwhile, and its retry got back
# the final state without its result (MissingResult). In memory, the flow tests also ran 7% faster.
PREFECT_TEST_DB = "sqlite+aiosqlite:///file::memory:?cache=shared&uri=true&check_same_thread=false"


@pytest.fixture(scope="session")
def prefect_api(services):
    """A temporary Prefect API server (its own in-memory database) for the flow tests: Prefect's
    ``prefect_test_harness`` with ``PREFECT_TEST_DB`` instead of a database file."""
    from prefect.context import _temporary_global_settings_context, get_settings_context
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.server.database.dependencies import temporary_database_interface
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_DATABASE_CONNECTION_URL, temporary_settings
    from prefect.testing.utilities import _find_available_port

    with temporary_database_interface(), temporary_settings({PREFECT_SERVER_DATABASE_CONNECTION_URL: PREFECT_TEST_DB}):
        server = SubprocessASGIServer(port=_find_available_port())
        SubprocessASGIServer._instances[None] = server  # code asking for "the" ephemeral server finds this one
        server.start(timeout=180)
        try:
            with temporary_settings({PREFECT_API_URL: server.api_url}), \
                    _temporary_global_settings_context(get_settings_context()):  # for contexts copied earlier
                yield server.api_url
                drain_prefect_workers()  # logs and events still queued reach the server before it stops
        finally:
            server.stop()
            SubprocessASGIServer._instances.pop(None, None)


# pytest-xdist hands out single tests, but for two kinds of module, which go whole to one worker:
# modules with module-scoped fixtures (set up once), and the modules that share the production-shaped
# stack of tests/reliability/prod_stack.py (PostgreSQL, MLflow with auth, 21 flow runs), as one unit.
# Collection checks both lists against the fixtures the tests use.
WHOLE_MODULES = {"tests/services/test_stack.py", "tests/reliability/test_doors.py",
                 "tests/reliability/test_pii_canary.py", "tests/steps/text/test_pretokens.py",
                 "tests/steps/text/test_pii_golden.py", "tests/steps/train/test_parallel.py",
                 "tests/steps/tokenize/test_augment.py"}
# Modules whose classes go whole to a worker each (class-scoped fixtures): a long module split in parts that
# run side by side (the architecture matrix: ~5 min on one worker as one unit).
CLASS_UNITS = {"tests/steps/test_model_matrix.py"}
SHARED_STACK = {"tests/reliability/test_load.py", "tests/reliability/test_security.py",
                "tests/reliability/test_browser.py"}
# Folders whose tests are handed out first: end-to-end tests are the long ones, and the short unit
# tests then fill the gaps at the end.
FIRST = ("tests/steps/test_model_matrix.py", "tests/reliability/", "tests/flows/", "tests/services/", "tests/kinds/",
         "tests/bench/", "tests/steps/train/")


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long tests first, each module's tests together and in their order (a stable sort by folder)."""
    for item in items:
        module = _module(item.nodeid)
        defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        if "prod_stack" in defs and module not in SHARED_STACK:
            raise pytest.UsageError(f"{item.nodeid} uses prod_stack: add {module} to SHARED_STACK in tests/conftest.py")
        scoped = [name for name, fixturedefs in defs.items() if fixturedefs[-1].scope in ("module", "class")]
        if scoped and module not in WHOLE_MODULES | SHARED_STACK | CLASS_UNITS:
            raise pytest.UsageError(f"{item.nodeid} uses module-scoped {scoped}: add {module} to WHOLE_MODULES "
                                    "in tests/conftest.py")
    items.sort(key=lambda item: next((i for i, folder in enumerate(FIRST) if item.nodeid.startswith(folder)),
                                     len(FIRST)))


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """pytest-xdist's scheduling by scope, where a scope is one test, a whole module (WHOLE_MODULES), a class
    (CLASS_UNITS) or the SHARED_STACK modules together, handed out in collection order."""
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = _module(nodeid)
            if module in SHARED_STACK:
                return "shared-stack"
            if module in CLASS_UNITS:
                return "::".join(nodeid.split("::")[:2])
            return module if module in WHOLE_MODULES else nodeid

    config.option.loadscopereorder = False  # keep the collection order (long tests first)
    return Scheduling(config, log)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: a worker per core and one more, since many tests wait on servers and subprocesses
    (on 2 cores, 3 workers: 14m29 against 15m09 with 2, same commit), at most 4 (each worker runs its
    own SeaweedFS, MLflow and Prefect)."""
    return min(4, (os.cpu_count() or 2) + 1)

