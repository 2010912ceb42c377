"""One thin Prefect task per step: retries for transient failures, a cache key from
code version + step config + input digests, JSON results persisted to S3.

No business logic here: each task builds the store from the environment and calls
its step function.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

from botocore.exceptions import BotoCoreError, ReadTimeoutError
from botocore.exceptions import ConnectionError as BotoConnectionError
from prefect import task
from prefect.cache_policies import CachePolicy
from prefect.tasks import exponential_backoff
from requests.exceptions import ConnectionError as HttpConnectionError
from requests.exceptions import Timeout as HttpTimeout

from flows import logs
from steps.base_model import prepare_base_model
from steps.config import (
    BaseModelConfig,
    EvaluateConfig,
    IngestConfig,
    RegisterConfig,
    ScrubConfig,
    TokenizeConfig,
    TrainConfig,
    ValidateConfig,
)
from steps.core.errors import ConfigError, StepRunError, TransientError
from steps.core.lineage import canonical_json, code_version
from steps.core.store import ArtifactStore, DatasetRef, EvalReport, ModelRef
from steps.evaluate import evaluate_model
from steps.ingest import ingest_records
from steps.register.step import (
    Champion,
    PipelineRun,
    PromotionDecision,
    RegisteredVersion,
    RunRecord,
    find_champion,
    promote_model,
    register_model,
)
from steps.scrub.step import scrub_records
from steps.tokenize.step import tokenize_dataset
from steps.train.step import train_model
from steps.validate import validate_records

logs.attach()  # step logs reach the run's Logs tab; expected errors read as one line
RESULT_STORAGE = "s3-bucket/tuneline-results"
NOT_KEYED = ("dispatch", "role", "run")
TRANSIENT = (TransientError, BotoConnectionError, ReadTimeoutError, HttpConnectionError, HttpTimeout)


class StepCachePolicy(CachePolicy):
    """Key = task name + code version of steps/ + canonical JSON of the inputs (configs and
    references, which carry the digests). Prefect's TASK_SOURCE would only see the wrapper."""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str:
        # Where a step runs (``dispatch``), what its run is called (``role``) and which flow run asks (``run``)
        # do not change what it computes.
        payload = canonical_json({k: _jsonable(v) for k, v in inputs.items() if k not in NOT_KEYED})
        return hashlib.sha256(f"{task_ctx.task.name}:{code_version()}:{payload}".encode()).hexdigest()


def _jsonable(value: Any) -> Any:
    return value.model_dump(mode="json", by_alias=True) if hasattr(value, "model_dump") else value


def is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry storage and network trouble; never bad data or bad config."""
    exc, seen = state.data, 0
    # Walk the chain: MLflow wraps a refused connection or a timeout in MlflowException ("API request
    # to ... failed with exception ..."), with the requests error as its context.
    while isinstance(exc, BaseException) and seen < 8:
        if isinstance(exc, TRANSIENT) or (isinstance(exc, BotoCoreError) and "connect" in str(exc).lower()):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def step_task(name: str, timeout_seconds: int = 3600, tags: tuple[str, ...] = ("tuneline",),
              task_run_name: str | None = None) -> Any:
    return task(
        name=name,
        task_run_name=task_run_name,
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


def remote(step: str, deployment: str, returns: Any, **inputs: Any) -> Any:
    """Run one step as a flow run of a ``tuneline-step`` deployment (flows/step_flow.py): its own
    process, container or pod, as the deployment's work pool decides, e.g. the GPU image for
    ``train``. Only JSON crosses: configs and references in, a reference out (the flow's result,
    persisted as JSON in the artifact bucket); the artifacts themselves pass through S3."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    inputs = {k: _jsonable(v) for k, v in inputs.items()}
    try:
        # Polled every second (Prefect's default is 5 s): a short step's result is not left waiting.
        run = run_deployment(deployment, parameters={"step": step, "inputs": inputs}, timeout=None, poll_interval=1)
    except ObjectNotFound:
        raise ConfigError(f"dispatch.{step}: the Prefect server has no deployment {deployment!r} "
                          "(register it with `tuneline deploy --only gpu`, or name another)") from None
    state = run.state
    if state is not None and state.is_completed():
        return returns.model_validate(state.result())
    where = f"step {step!r} in flow run {run.name!r} of deployment {deployment!r}"
    message = state.message if state is not None else "no state"
    if state is not None and state.is_crashed():  # the infrastructure went away: worth another try
        raise TransientError(f"{where} crashed: {message}")
    raise StepRunError(f"{where} ended {state.name if state else 'without a state'}: {message}")


def here_or_remote(step: str, dispatch: str | None, work: Callable[..., Any], returns: type, prefix: str,
                   **inputs: Any) -> Any:
    """``work(*inputs, store)`` in this flow run, or, with ``dispatch``, the same step as a flow run of
    that ``tuneline-step`` deployment (``remote``)."""
    if dispatch:
        return remote(step, dispatch, returns, **inputs, prefix=prefix)
    return work(*inputs.values(), ArtifactStore.from_env(prefix))


@step_task("ingest")
def ingest(cfg: IngestConfig, prefix: str, dispatch: str | None = None) -> DatasetRef:
    return here_or_remote("ingest", dispatch, ingest_records, DatasetRef, prefix, cfg=cfg)


@step_task("validate")
def validate(cfg: ValidateConfig, raw: DatasetRef, prefix: str, dispatch: str | None = None) -> DatasetRef:
    return here_or_remote("validate", dispatch, validate_records, DatasetRef, prefix, cfg=cfg, raw=raw)


@step_task("scrub")
def scrub(cfg: ScrubConfig, validated: DatasetRef, prefix: str, dispatch: str | None = None) -> DatasetRef:
    return here_or_remote("scrub", dispatch, scrub_records, DatasetRef, prefix, cfg=cfg, validated=validated)


@step_task("base-model")
def base_model(cfg: BaseModelConfig, prefix: str, chat_template: str | None = None,
               dispatch: str | None = None) -> ModelRef:
    def work(cfg: BaseModelConfig, chat_template: str | None, store: ArtifactStore) -> ModelRef:
        return prepare_base_model(cfg, store, chat_template)

    return here_or_remote("base_model", dispatch, work, ModelRef, prefix, cfg=cfg, chat_template=chat_template)


@step_task("tokenize")
def tokenize(cfg: TokenizeConfig, clean: DatasetRef, model: ModelRef, prefix: str,
             dispatch: str | None = None) -> DatasetRef:
    return here_or_remote("tokenize", dispatch, tokenize_dataset, DatasetRef, prefix, cfg=cfg, clean=clean, model=model)


@step_task("train", timeout_seconds=4 * 3600, tags=("tuneline", "tuneline-gpu"))
def train(cfg: TrainConfig, data: DatasetRef, model: ModelRef, prefix: str, dispatch: str | None = None) -> ModelRef:
    return here_or_remote("train", dispatch, train_model, ModelRef, prefix, cfg=cfg, data=data, model=model)


@step_task("evaluate", tags=("tuneline", "tuneline-gpu"), task_run_name="evaluate-{role}")
def evaluate(cfg: EvaluateConfig, model: ModelRef, data: DatasetRef, prefix: str, role: str = "model",
             dispatch: str | None = None) -> EvalReport:
    """``role`` (base, candidate, champion) names the task run and its log lines, not the result."""
    def work(cfg: EvaluateConfig, model: ModelRef, data: DatasetRef, role: str, store: ArtifactStore) -> EvalReport:
        return evaluate_model(cfg, model, data, store, role=role)

    return here_or_remote("evaluate", dispatch, work, EvalReport, prefix, cfg=cfg, model=model, data=data, role=role)


@live_task("find-champion")
def champion(cfg: RegisterConfig) -> Champion | None:
    return find_champion(cfg)


@step_task("register")
def register(cfg: RegisterConfig, record: RunRecord, prefix: str, run: PipelineRun | None = None,
             dispatch: str | None = None) -> RegisteredVersion:
    """``run`` (this flow run: start, name, link) goes onto the MLflow run; it does not change the cache key."""
    def work(cfg: RegisterConfig, record: RunRecord, run: PipelineRun | None,
             store: ArtifactStore) -> RegisteredVersion:
        return register_model(cfg, record, store, run)

    return here_or_remote("register", dispatch, work, RegisteredVersion, prefix, cfg=cfg, record=record, run=run)


@live_task("promote")
def promote(cfg: RegisterConfig, version: RegisteredVersion, candidate: EvalReport, incumbent: EvalReport,
            incumbent_label: str, base: EvalReport | None = None) -> PromotionDecision:
    return promote_model(cfg, version, candidate, incumbent, incumbent_label, base)
