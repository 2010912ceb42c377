"""Shared fixtures: the real local services (SeaweedFS S3 + MLflow server) on free
ports for the whole session, a store with a fresh prefix per test, and a tiny base model."""

from __future__ import annotations

import os
import uuid
from itertools import islice

import pytest

from helpers import free_port, free_weed_base

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
def tiny_tokenizer(services, tiny_model):
    from transformers import AutoTokenizer

    from steps.core.store import ArtifactStore

    return AutoTokenizer.from_pretrained(ArtifactStore.from_env("shared").download(tiny_model.base))


@pytest.fixture(scope="session")
def prefect_api(services):
    """A temporary Prefect API (its own SQLite database) for the flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests on the production-shaped stack (tests/reliability/prod_stack.py: PostgreSQL, MLflow with
    auth, 21 flow runs) share one session fixture: with pytest-xdist (``--dist loadgroup``) they run
    in one worker, so that the stack is started once."""
    for item in items:
        if "prod_stack" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("prod-stack"))


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: a worker per core, at least 2 (many tests wait on servers and subprocesses) and
    at most 4 (each worker runs its own SeaweedFS, MLflow and Prefect)."""
    return min(4, max(2, os.cpu_count() or 2))

