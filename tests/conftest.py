"""Shared fixtures: the real local services (SeaweedFS S3 + MLflow server) on free
ports for the whole session, a store with a fresh prefix per test, and a tiny base model."""

from __future__ import annotations

import os
import random
import socket
import uuid
from itertools import islice
from pathlib import Path

import pytest

os.environ.update({
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
})


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


def free_weed_base() -> int:
    """SeaweedFS uses base..base+4 and the same +10000 for gRPC."""
    for _ in range(200):
        base = random.randint(20000, 29000)
        if all(_free(base + i) and _free(base + 10000 + i) for i in range(5)):
            return base
    raise RuntimeError("no free port block for SeaweedFS")


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory):
    from flows.services import ServiceConfig, down, up

    root = tmp_path_factory.mktemp("tuneline")
    os.environ["TUNELINE_CACHE"] = str(root / "cache")
    base = free_weed_base()
    weed_ports = {base + i for i in range(5)} | {base + 10000 + i for i in range(5)}
    mlflow_port, prefect_port = islice((p for p in iter(free_port, None) if p not in weed_ports), 2)
    cfg = ServiceConfig(state_dir=root / "services", s3_port=base, mlflow_port=mlflow_port,
                        prefect_port=prefect_port, bucket="tuneline-test")
    os.environ.update(up(cfg, prefect=False))
    yield cfg
    down(cfg)


@pytest.fixture
def store(services):
    from steps.store import ArtifactStore

    return ArtifactStore.from_env(prefix=f"test-{uuid.uuid4().hex[:10]}")


@pytest.fixture(scope="session")
def tiny_model(services):
    """A tiny random Llama with the SmolLM2 tokenizer, committed once under a shared prefix."""
    from steps.base_model import prepare_base_model
    from steps.config import BaseModelConfig
    from steps.store import ArtifactStore

    return prepare_base_model(BaseModelConfig(source="tiny-random-llama"), ArtifactStore.from_env("shared"))


@pytest.fixture(scope="session")
def tiny_encoder(services):
    """A tiny random BERT with the all-MiniLM-L6-v2 tokenizer, committed once under a shared prefix."""
    from steps.base_model import prepare_base_model
    from steps.config import BaseModelConfig
    from steps.store import ArtifactStore

    return prepare_base_model(BaseModelConfig(source="tiny-random-bert"), ArtifactStore.from_env("shared"))


@pytest.fixture(scope="session")
def tiny_tokenizer(services, tiny_model):
    from transformers import AutoTokenizer

    from steps.store import ArtifactStore

    return AutoTokenizer.from_pretrained(ArtifactStore.from_env("shared").download(tiny_model.base))


@pytest.fixture(scope="session")
def prefect_api(services):
    """A temporary Prefect API (its own SQLite database) for the flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
