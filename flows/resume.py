"""Resume a failed, crashed or cancelled flow run: ``tuneline run --resume [RUN_ID]``.

The run's parameters are read back from the Prefect API and the flow runs again with
exactly those parameters. Nothing is re-done: every task whose inputs, configuration
and code are unchanged returns its persisted result (the step cache policy in
``flows/tasks.py``; results are JSON in the artifact bucket), and the train step
continues from the newest complete checkpoint in the store, with optimizer, scheduler,
RNG and data position restored. The new run is named ``resume-of-<old run name>`` and
tagged ``resume-of:<old run id>``.

Where a run runs is in its tags (``origin_tags``): ``host:<hostname>``,
``checkout:<digest of hostname and repository path>`` and ``pid:<pid>@<start time>@<boot id>``
(the flow-run process, its start time in clock ticks from ``/proc``). A process killed
with SIGKILL cannot report its end, so its run stays RUNNING; ``reap_dead_runs`` (at every
``tuneline run`` start and periodically in ``tuneline worker``) marks Crashed every RUNNING or
PENDING run of this host whose recorded process is gone or whose pid now belongs to another
process. Runs without a pid tag, or from another host, are never judged.

Without RUN_ID only runs of this checkout (same host and repository path) and of the model
named by ``--params`` (default: deployments/params/default.yaml) qualify, and only those not
resumed already (no other run is tagged ``resume-of:<its id>``). One qualifying run is
resumed; several are listed and an id is asked for.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from uuid import UUID

from steps.config import PipelineParams
from steps.core.errors import ConfigError

log = logging.getLogger(__name__)
FLOW_NAME = "tuneline-finetune"
RESUMABLE = ("FAILED", "CRASHED", "CANCELLED")
LIVE = ("RUNNING", "PENDING")
ROOT = Path(__file__).resolve().parents[1]


def checkout_id() -> str:
    """This checkout: the host and the repository's path, digested (12 hex digits)."""
    return hashlib.sha256(f"{platform.node()}:{ROOT}".encode()).hexdigest()[:12]


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:8]
    except OSError:
        return "noboot"


def process_id(pid: int | None = None) -> str | None:
    """``<pid>@<start time in clock ticks>@<boot id>`` of a live process; None if it is gone (or no /proc)."""
    pid = os.getpid() if pid is None else pid
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": field 3 onwards
    if fields[0] == "Z":  # a zombie process: dead, only waiting for its parent
        return None
    return f"{pid}@{fields[19]}@{_boot_id()}"


def origin_tags() -> list[str]:
    """The tags that say where this process runs the flow (host, checkout, process)."""
    proc = process_id()
    return [f"host:{platform.node()}", f"checkout:{checkout_id()}"] + ([f"pid:{proc}"] if proc else [])


def _tag(run: Any, prefix: str) -> str | None:
    return next((t[len(prefix):] for t in (run.tags or []) if t.startswith(prefix)), None)


def process_alive(recorded: str) -> bool:
    """Whether the process a ``pid:`` tag recorded still runs (same pid, same start time, same boot)."""
    pid = recorded.split("@", 1)[0]
    return pid.isdigit() and process_id(int(pid)) == recorded


def _flow_filter() -> Any:
    from prefect.client.schemas import filters

    return filters.FlowFilter(name=filters.FlowFilterName(any_=[FLOW_NAME]))


def reap_dead_runs() -> list[Any]:
    """Mark Crashed the RUNNING/PENDING runs of this host whose recorded process is gone; return them."""
    from prefect import get_client
    from prefect.client.schemas import filters
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    host = platform.node()
    reaped = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=_flow_filter(),
            flow_run_filter=filters.FlowRunFilter(
                state=filters.FlowRunFilterState(type=filters.FlowRunFilterStateType(any_=[StateType[s] for s in LIVE])),
                tags=filters.FlowRunFilterTags(all_=[f"host:{host}"])),
        )
        for run in runs:
            recorded = _tag(run, "pid:")
            if recorded is None or process_alive(recorded):
                continue
            message = (f"the flow-run process {recorded.split('@')[0]} on {host} is gone (killed, or the machine "
                       "restarted) while the run was " + run.state.type.value + "; marked Crashed by tuneline")
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
            log.warning("flow run %s (%s): %s", run.id, run.name, message)
            reaped.append(run)
    return reaped


def _when(run: Any) -> datetime:
    return run.start_time or run.expected_start_time or run.created or datetime.min.replace(tzinfo=timezone.utc)


def find_run(run_id: str | None, model_name: str | None = None) -> Any:
    """The flow run to resume: the given one, or the only unresumed failed/crashed/cancelled run of this
    checkout and of ``model_name``; several such runs are listed in the error, to pick one by id."""
    from prefect import get_client
    from prefect.client.schemas import filters
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        if run_id is not None:
            try:
                return client.read_flow_run(UUID(run_id))
            except (ValueError, Exception) as exc:  # noqa: BLE001 - bad id or unknown run: one readable error
                raise ConfigError(f"--resume {run_id}: no such flow run ({type(exc).__name__})") from exc
        if not model_name:
            raise ConfigError("--resume without a run id needs the model name (from --params)")
        mine = [f"checkout:{checkout_id()}", f"model:{model_name}"]
        runs = client.read_flow_runs(
            flow_filter=_flow_filter(),
            flow_run_filter=filters.FlowRunFilter(tags=filters.FlowRunFilterTags(all_=mine)),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=200,
        )
    resumed = {t.split(":", 1)[1] for r in runs for t in (r.tags or []) if t.startswith("resume-of:")}
    candidates = sorted((r for r in runs if r.state and r.state.type.value in RESUMABLE and str(r.id) not in resumed),
                        key=_when, reverse=True)
    if not candidates:
        raise ConfigError(f"--resume: no failed, crashed or cancelled {FLOW_NAME} run of model {model_name} "
                          f"started from this checkout ({platform.node()}:{ROOT}) is left to resume")
    if len(candidates) > 1:
        listing = "\n".join(f"  {r.id}  {r.name}  {r.state.type.value}  {_when(r):%Y-%m-%d %H:%M:%S} UTC"
                            for r in candidates)
        raise ConfigError(f"--resume: {len(candidates)} runs of model {model_name} from this checkout can be "
                          f"resumed; name one: tuneline run --resume RUN_ID\n{listing}")
    return candidates[0]


def resume_plan(run: Any) -> tuple[PipelineParams, dict[str, Any]]:
    """The run's parameters and the name and tags of the resuming run; refuses runs that finished."""
    state = run.state.type.value if run.state else "UNKNOWN"
    if state not in RESUMABLE:
        hint = (" (if its process died, `tuneline run` marks it Crashed only on the host that ran it)"
                if state in LIVE else "")
        raise ConfigError(f"flow run {run.id} ({run.name}) is {state}; only failed, crashed or cancelled runs "
                          f"resume{hint}")
    params = PipelineParams.parse(run.parameters.get("params", {}), origin=f"parameters of flow run {run.id}")
    return params, {"flow_run_name": f"resume-of-{run.name}", "tags": [f"resume-of:{run.id}"]}
