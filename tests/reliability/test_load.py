"""Load: RUNS (20) concurrent flow runs of the tiny pipeline against one set of local services
(Prefect server and MLflow on PostgreSQL, MLflow with basic auth) all complete, each registers
its own version of one model, and no database reports a lock error. After a warm-up run, the
runs differ only in their MLflow experiment: their steps come from the cache and each one
registers (and promotes) its own version concurrently with the others (prod_stack.py says why).

    .venv/bin/python -m pytest -q tests/reliability/test_load.py
"""

from __future__ import annotations

import re

import pytest

from prod_stack import RUNS, client_of, report_section  # fixtures: tests/reliability/conftest.py

pytestmark = [pytest.mark.services, pytest.mark.timeout(2400)]  # the fixture setup runs 21 pipelines
LOCK_ERRORS = re.compile(r"database is locked|deadlock detected|could not serialize access|"
                         r"remaining connection slots|too many clients", re.IGNORECASE)


def test_concurrent_runs_complete_each_with_its_own_version(prod_stack, load_run):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client

    from steps.register.report import PipelineSummary

    failed = [(r["flow_run_id"], r["state"], r["message"]) for r in load_run.runs if r["state"] != "Completed"]
    assert not failed, failed
    summaries = [PipelineSummary.model_validate(r["summary"]) for r in load_run.runs]
    versions = sorted(int(s.version.version) for s in summaries)
    # Version 1 is the warm-up run's: each concurrent run got its own new version, none lost or shared.
    assert versions == list(range(2, RUNS + 2)), versions
    assert len({s.version.run_id for s in summaries}) == RUNS  # each its own MLflow run

    with client_of(prod_stack["env"]):
        client = MlflowClient()
        registered = client.search_model_versions(f"name = '{load_run.model_name}'")
        assert sorted(int(v.version) for v in registered) == [1, *versions]
        by_version = {v.version: v for v in registered}
        for s in summaries:  # the registry holds what each run registered, in the experiment it asked for
            assert by_version[s.version.version].run_id == s.version.run_id
            experiment = client.get_experiment(client.get_run(s.version.run_id).info.experiment_id).name
            assert experiment == s.record.params["register"]["experiment"]
        assert len({s.record.params["register"]["experiment"] for s in summaries}) == RUNS
        champion = client.get_model_version_by_alias(load_run.model_name, "champion")
        assert champion.version in by_version  # the concurrent promotions left exactly one champion
        with get_client(sync_client=True) as prefect:
            recorded = [prefect.read_flow_run(r["flow_run_id"]).state.type.value for r in load_run.runs]
        assert recorded == ["COMPLETED"] * RUNS  # the Prefect server agrees

    report_section("load", {
        "runs": RUNS, "completed": RUNS - len(failed), "distinct_versions": len(set(versions)),
        "wall_s": round(load_run.wall_s, 1), "s_per_run": round(load_run.wall_s / RUNS, 1),
        "warmup_run_s": round(load_run.warmup_s, 1),
        "peak_rss_mib_of_the_process_running_the_20": round(load_run.runs[0]["process_peak_rss_mib"]),
        "services_up_s": round(prod_stack["up_s"], 1), "backend": prod_stack["cfg"].backend, "mlflow_auth": True,
    })


def test_no_database_lock_errors(prod_stack, load_run):
    """Neither the clients (this process's log records) nor a server (its log file) saw a lock error."""
    logs = prod_stack["cfg"].state_dir / "logs"
    found = [line for line in load_run.log_lines if LOCK_ERRORS.search(line)]
    for log in sorted(logs.glob("*.log")):
        found += [f"{log.name}: {line}" for line in log.read_text(errors="replace").splitlines()
                  if LOCK_ERRORS.search(line)]
    assert load_run.log_lines, "the log capture saw nothing: the scan would prove nothing"
    assert found == []
    report_section("load", {"lock_errors": len(found), "log_lines_scanned": len(load_run.log_lines)})
