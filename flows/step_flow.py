"""One pipeline step as its own flow run: the ``tuneline-step`` flow, deployed as
``tuneline-step/gpu`` (deployments/prefect.yaml). A pipeline run with
``dispatch: {train: tuneline-step/gpu}`` sends its train step here (flows/tasks.remote), so
on a Docker or Kubernetes pool that step runs in its own container — the GPU image on a GPU
node — while the data steps stay on CPU. Only JSON crosses: the step's configs and artifact
references in, a reference out (persisted as JSON in the artifact bucket); the artifacts
themselves pass through S3. Caching and retries stay with the calling run's task.
"""

from __future__ import annotations

import typing
from typing import Any

from prefect import flow
from pydantic import TypeAdapter

from flows import tasks
from steps.core.errors import ConfigError

STEPS = {"ingest": tasks.ingest, "validate": tasks.validate, "scrub": tasks.scrub, "base_model": tasks.base_model,
         "tokenize": tasks.tokenize, "train": tasks.train, "evaluate": tasks.evaluate, "register": tasks.register}


@flow(name="tuneline-step", persist_result=True, result_storage=tasks.RESULT_STORAGE, result_serializer="json",
      flow_run_name="{step}")
def run_step(step: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """Run pipeline step ``step`` here with ``inputs`` (its task's arguments as JSON)."""
    if step not in STEPS:
        raise ConfigError(f"unknown step {step!r}; one of {', '.join(STEPS)}")
    fn = STEPS[step].fn
    hints = typing.get_type_hints(fn)
    unknown = set(inputs) - set(hints) | {"dispatch", "return"} & set(inputs)
    if unknown:
        raise ConfigError(f"step {step!r} takes no inputs {sorted(unknown)}")
    args = {name: TypeAdapter(hints[name]).validate_python(value) for name, value in inputs.items()}
    return fn(**args).model_dump(mode="json", by_alias=True)  # dispatch=None: the step runs in this process
