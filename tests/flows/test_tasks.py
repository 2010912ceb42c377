"""The task wrappers' policies: what is retried and what the cache key depends on."""

from types import SimpleNamespace

import pytest
from botocore.exceptions import EndpointConnectionError
from prefect.states import Failed

from flows.tasks import StepCachePolicy, is_transient
from steps.config import ScrubConfig
from steps.core.errors import ConfigError, DataQualityError, TransientError
from steps.core.store import DatasetRef


@pytest.mark.parametrize("exc, retried", [
    (TransientError("S3 answered 503"), True),
    (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
    (DataQualityError("rule broken"), False),
    (ConfigError("bad key"), False),
    (ValueError("bug"), False),
])
def test_only_transient_failures_are_retried(exc, retried):
    assert is_transient(None, None, Failed(data=exc)) is retried


def key(name="scrub", cfg=ScrubConfig(), digest="d1"):
    ctx = SimpleNamespace(task=SimpleNamespace(name=name))
    ref = DatasetRef(step="validate", key="p/validate/k", digest=digest)
    return StepCachePolicy().compute_key(ctx, {"cfg": cfg, "validated": ref, "prefix": "p"}, {})


def test_cache_key_follows_config_inputs_and_task():
    assert key() == key()
    assert key(cfg=ScrubConfig(dedup=False)) != key()
    assert key(digest="d2") != key()
    assert key(name="validate") != key()
