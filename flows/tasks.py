"""One thin Prefect task per step: retries for transient failures, a cache key from
code version + step config + input digests, JSON results persisted to S3.

No business logic here: each task builds the store from the environment and calls
its step function.
"""

from __future__ import annotations

import hashlib
from typing import Any

from botocore.exceptions import BotoCoreError, ConnectionError as BotoConnectionError, ReadTimeoutError
from prefect import task
from prefect.cache_policies import CachePolicy
from prefect.tasks import exponential_backoff
from requests.exceptions import ConnectionError as HttpConnectionError
from requests.exceptions import Timeout as HttpTimeout

from steps.base_model import prepare_base_model
from steps.config import (BaseModelConfig, EvaluateConfig, IngestConfig, RegisterConfig, ScrubConfig,
                          TokenizeConfig, TrainConfig, ValidateConfig)
from steps.errors import TransientError
from steps.evaluate import evaluate_model
from steps.ingest import ingest_records
from steps.lineage import canonical_json, code_version
from steps.register import (Champion, PromotionDecision, RegisteredVersion, RunRecord, find_champion,
                            promote_model, register_model)
from steps.scrub import scrub_records
from steps.store import ArtifactStore, DatasetRef, EvalReport, ModelRef
from steps.tokenize import tokenize_dataset
from steps.train import train_model
from steps.validate import validate_records

RESULT_STORAGE = "s3-bucket/tuneline-results"
TRANSIENT = (TransientError, BotoConnectionError, ReadTimeoutError, HttpConnectionError, HttpTimeout)


class StepCachePolicy(CachePolicy):
    """Key = task name + code version of steps/ + canonical JSON of the inputs (configs and
    references, which carry the digests). Prefect's TASK_SOURCE would only see the wrapper."""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str:
        payload = canonical_json({k: _jsonable(v) for k, v in inputs.items()})
        return hashlib.sha256(f"{task_ctx.task.name}:{code_version()}:{payload}".encode()).hexdigest()


def _jsonable(value: Any) -> Any:
    return value.model_dump(mode="json", by_alias=True) if hasattr(value, "model_dump") else value


def is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry storage and network trouble; never bad data or bad config."""
    exc = state.data
    return isinstance(exc, TRANSIENT) or (isinstance(exc, BotoCoreError) and "connect" in str(exc).lower())


def step_task(name: str, timeout_seconds: int = 3600, tags: tuple[str, ...] = ("tuneline",)) -> Any:
    return task(
        name=name,
        retries=3,
        retry_delay_seconds=exponential_backoff(backoff_factor=2),
        retry_jitter_factor=0.5,
        retry_condition_fn=is_transient,
        cache_policy=StepCachePolicy(),
        persist_result=True,
        result_storage=RESULT_STORAGE,
        result_serializer="json",
        timeout_seconds=timeout_seconds,
        tags=list(tags),
    )


def live_task(name: str) -> Any:
    """For registry look-ups and the promotion gate: cheap, never cached, results not stored."""
    return task(name=name, retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2),
                retry_condition_fn=is_transient, persist_result=False, tags=["tuneline"])


@step_task("ingest")
def ingest(cfg: IngestConfig, prefix: str) -> DatasetRef:
    return ingest_records(cfg, ArtifactStore.from_env(prefix))


@step_task("validate")
def validate(cfg: ValidateConfig, raw: DatasetRef, prefix: str) -> DatasetRef:
    return validate_records(cfg, raw, ArtifactStore.from_env(prefix))


@step_task("scrub")
def scrub(cfg: ScrubConfig, validated: DatasetRef, prefix: str) -> DatasetRef:
    return scrub_records(cfg, validated, ArtifactStore.from_env(prefix))


@step_task("base-model")
def base_model(cfg: BaseModelConfig, prefix: str) -> ModelRef:
    return prepare_base_model(cfg, ArtifactStore.from_env(prefix))


@step_task("tokenize")
def tokenize(cfg: TokenizeConfig, clean: DatasetRef, model: ModelRef, prefix: str) -> DatasetRef:
    return tokenize_dataset(cfg, clean, model, ArtifactStore.from_env(prefix))


@step_task("train", timeout_seconds=4 * 3600, tags=("tuneline", "tuneline-gpu"))
def train(cfg: TrainConfig, data: DatasetRef, model: ModelRef, prefix: str) -> ModelRef:
    return train_model(cfg, data, model, ArtifactStore.from_env(prefix))


@step_task("evaluate", tags=("tuneline", "tuneline-gpu"))
def evaluate(cfg: EvaluateConfig, model: ModelRef, data: DatasetRef, prefix: str) -> EvalReport:
    return evaluate_model(cfg, model, data, ArtifactStore.from_env(prefix))


@live_task("find-champion")
def champion(cfg: RegisterConfig) -> Champion | None:
    return find_champion(cfg)


@step_task("register")
def register(cfg: RegisterConfig, record: RunRecord, prefix: str) -> RegisteredVersion:
    return register_model(cfg, record, ArtifactStore.from_env(prefix))


@live_task("promote")
def promote(cfg: RegisterConfig, version: RegisteredVersion, candidate: EvalReport, incumbent: EvalReport,
            incumbent_label: str, base: EvalReport | None = None) -> PromotionDecision:
    return promote_model(cfg, version, candidate, incumbent, incumbent_label, base)
