"""Resume a failed, crashed or cancelled flow run: ``tuneline run --resume [RUN_ID]``.

The run's parameters are read back from the Prefect API and the flow runs again with
exactly those parameters. Nothing is re-done: every task whose inputs, configuration
and code are unchanged returns its persisted result (the step cache policy in
``flows/tasks.py``; results are JSON in the artifact bucket), and the train step
continues from the newest complete checkpoint in the store, with optimizer, scheduler,
RNG and data position restored. Without RUN_ID the newest unfinished run of the flow
is resumed. The new run is named ``resume-of-<old run name>`` and tagged
``resume-of:<old run id>``.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from steps.config import PipelineParams
from steps.core.errors import ConfigError

FLOW_NAME = "tuneline-finetune"
RESUMABLE = ("FAILED", "CRASHED", "CANCELLED")


def find_run(run_id: str | None) -> Any:
    """The flow run to resume: the given one, or the newest failed/crashed/cancelled one."""
    from prefect import get_client
    from prefect.client.schemas import filters
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        if run_id is not None:
            try:
                return client.read_flow_run(UUID(run_id))
            except (ValueError, Exception) as exc:  # noqa: BLE001 - bad id or unknown run: one readable error
                raise ConfigError(f"--resume {run_id}: no such flow run ({type(exc).__name__})") from exc
        runs = client.read_flow_runs(
            flow_filter=filters.FlowFilter(name=filters.FlowFilterName(any_=[FLOW_NAME])),
            flow_run_filter=filters.FlowRunFilter(state=filters.FlowRunFilterState(
                type=filters.FlowRunFilterStateType(any_=[StateType[s] for s in RESUMABLE]))),
            sort=FlowRunSort.START_TIME_DESC, limit=1,
        )
    if not runs:
        raise ConfigError(f"--resume: no failed, crashed or cancelled {FLOW_NAME} run to resume")
    return runs[0]


def resume_plan(run: Any) -> tuple[PipelineParams, dict[str, Any]]:
    """The run's parameters and the name and tags of the resuming run; refuses runs that finished."""
    state = run.state.type.value if run.state else "UNKNOWN"
    if state not in RESUMABLE:
        raise ConfigError(f"flow run {run.id} ({run.name}) is {state}; only failed, crashed or cancelled runs resume")
    params = PipelineParams.parse(run.parameters.get("params", {}), origin=f"parameters of flow run {run.id}")
    return params, {"flow_run_name": f"resume-of-{run.name}", "tags": [f"resume-of:{run.id}"]}
