"""The nightly cron schedule creates runs: `tuneline deploy --schedules on` against a real
`prefect server start` (its own process, its own database, with the server's services — the
session's test harness runs an ephemeral API without the scheduler service, so it cannot show
this). The scheduler must insert Scheduled flow runs for the deployment at the cron's times
(02:00 UTC), and switching the schedule off must remove the runs it had planned."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from datetime import timezone
from pathlib import Path

import pytest

from flows.cli import main
from helpers import wait_until_up

pytestmark = pytest.mark.services


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def prefect_server(tmp_path: Path):
    """A real Prefect server with its services; the scheduler loops every 2 s instead of 60."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "2",
        "PREFECT_UI_ENABLED": "false",
    })
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    wait_until_up(proc, f"{url}/health", 120, lambda: log.read_text(errors="replace"))
    try:
        yield url, log
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def _scheduled_runs(client, deployment_id) -> list:
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
    )


def test_nightly_cron_schedule_creates_runs_at_its_times(prefect_server, capsys):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url, log = prefect_server
    pool = f"tuneline-sched-{uuid.uuid4().hex[:6]}"
    with temporary_settings({PREFECT_API_URL: url}):
        assert main(["deploy", "--pool-name", pool, "--only", "default", "--schedules", "on"]) == 0, capsys.readouterr().err
        assert "nightly-retrain: cron 0 2 * * * UTC (on)" in capsys.readouterr().out
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("tuneline-finetune/default")
            assert [(s.slug, s.active) for s in deployment.schedules] == [("nightly-retrain", True)]

            deadline = time.monotonic() + 90
            while not (runs := _scheduled_runs(client, deployment.id)) and time.monotonic() < deadline:
                time.sleep(1)
            assert runs, f"the scheduler created no runs in 90 s:\n{log.read_text(errors='replace')[-3000:]}"
            # The scheduler's own runs, one per night at 02:00 UTC, with the deployment's parameters.
            assert all(r.auto_scheduled and r.work_pool_name == pool for r in runs)
            starts = sorted(r.expected_start_time.astimezone(timezone.utc) for r in runs)
            assert all((t.hour, t.minute, t.second) == (2, 0, 0) for t in starts), starts
            assert len({t.date() for t in starts}) == len(starts)
            assert all(r.parameters == deployment.parameters for r in runs)

            # Switched off: the runs it had planned are removed and no new ones come.
            assert main(["deploy", "--pool-name", pool, "--only", "default", "--schedules", "off"]) == 0
            time.sleep(5)
            assert _scheduled_runs(client, deployment.id) == []
