"""`tuneline run --resume`: a run that failed in the middle of training is run again with its
own parameters; finished tasks come from the cache and training continues from its checkpoint."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from test_pipeline import dataset, task_states, tiny_params

from flows.cli import main
from helpers import all_keys, die_after_checkpoint

pytestmark = pytest.mark.services


def test_a_failed_run_resumes_from_its_last_task_and_checkpoint(prefect_api, store, tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient
    from prefect import get_client

    from flows.pipeline import finetune
    from steps.train import step as train

    name = f"resume-{uuid.uuid4().hex[:6]}"
    params = tiny_params(dataset(tmp_path), store.prefix, name)
    params = params.model_copy(update={"train": params.train.model_copy(update={"max_steps": 6, "checkpoint_every": 2})})
    original = die_after_checkpoint(monkeypatch, 4)  # the step dies after its 2nd checkpoint
    failed = finetune(params, return_state=True)
    assert failed.is_failed()
    failed_id = failed.state_details.flow_run_id
    assert not [k for k in all_keys(store) if "/train/" in k and k.endswith("_MANIFEST.json")]
    monkeypatch.setattr(train.Checkpoints, "save", original)

    with pytest.raises(SystemExit):  # the parameters come from the run, never from the command line
        main(["run", "--resume", "--set", "train.max_steps=7"])
    capsys.readouterr()
    assert main(["run", "--resume", str(failed_id)]) == 0
    out = capsys.readouterr().out
    assert f"resuming flow run {failed_id}" in out

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
        resumed = next(r for r in runs if f"resume-of:{failed_id}" in (r.tags or []))
        assert resumed.state.is_completed() and resumed.name.startswith("resume-of-")
    states = task_states(resumed.id, expected=11)
    for step in ("ingest", "validate", "scrub", "base-model", "tokenize"):
        assert states[step] == ["Cached"], states
    assert states["train"] == ["Completed"], states
    trained = [k for k in all_keys(store) if "/train/" in k and k.endswith("_MANIFEST.json")]
    assert len(trained) == 1
    stats = json.loads(store.get_bytes(trained[0]))["stats"]
    assert stats["resumed_from"] == 4 and stats["steps"] == 6
    assert len(MlflowClient().search_model_versions(f"name = '{name}'")) == 1

    # A finished run has nothing to resume.
    assert main(["run", "--resume", str(resumed.id)]) == 2
    assert "only failed, crashed or cancelled runs resume" in capsys.readouterr().err


# ---------------------------------------------------------------- honest resume: dead processes, this checkout only

KILLED_RUN = """
import os, pathlib, sys, time
sys.path[:0] = [{tests!r}, {flows_tests!r}]
from test_pipeline import tiny_params
from flows.cli import start
from flows.pipeline import finetune
from steps.train import step as train

params = tiny_params(pathlib.Path({source!r}), {prefix!r}, {name!r})
params = params.model_copy(update={{"train": params.train.model_copy(update={{"max_steps": 6, "checkpoint_every": 2}})}})
original = train.Checkpoints.save

def save_then_hang(self, step, *args, **kwargs):  # the test SIGKILLs this process while it waits here
    original(self, step, *args, **kwargs)
    if step == 2:
        from prefect.runtime import flow_run
        pathlib.Path({marker!r}).write_text(str(flow_run.id))
        time.sleep(600)

train.Checkpoints.save = save_then_hang
start(finetune, params, {{}})  # as `tuneline run` starts it: tagged with host, checkout and pid
"""


def test_a_sigkilled_run_is_marked_crashed_and_resumes_by_id(prefect_api, store, tmp_path, capsys):
    """SIGKILL leaves the run RUNNING (its process cannot report); the zombie check at `tuneline run`
    marks it Crashed, and `--resume ID` finishes it from its checkpoint."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from prefect import get_client

    from flows.resume import reap_dead_runs, resume_plan
    from steps.core.errors import ConfigError

    name, marker = f"killed-{uuid.uuid4().hex[:6]}", tmp_path / "flow-run-id"
    here = Path(__file__).resolve().parent
    script = KILLED_RUN.format(tests=str(here.parent), flows_tests=str(here), source=str(dataset(tmp_path)),
                               prefix=store.prefix, name=name, marker=str(marker))
    child = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PREFECT_API_URL": prefect_api},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert marker.exists(), child.stderr.read().decode()[-3000:] if child.poll() is not None else "no checkpoint"
    time.sleep(0.2)  # the id is written in full
    run_id = marker.read_text().strip()
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stderr.close()

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(uuid.UUID(run_id))
    assert run.state.is_running() and any(t.startswith("pid:") for t in run.tags), (run.state, run.tags)
    with pytest.raises(ConfigError, match="is RUNNING"):
        resume_plan(run)  # before the check: refused, as in the issue

    assert [str(r.id) for r in reap_dead_runs()] == [run_id]
    with get_client(sync_client=True) as client:
        crashed = client.read_flow_run(uuid.UUID(run_id)).state
    assert crashed.is_crashed() and "is gone" in crashed.message
    assert reap_dead_runs() == []  # live runs (this test process's) and finished ones are left alone

    assert main(["run", "--resume", run_id]) == 0
    assert f"resuming flow run {run_id}" in capsys.readouterr().out
    with get_client(sync_client=True) as client:
        resumed = next(r for r in client.read_flow_runs() if f"resume-of:{run_id}" in (r.tags or []))
    assert resumed.state.is_completed()
    trained = [k for k in all_keys(store) if "/train/" in k and k.endswith("_MANIFEST.json")]
    stats = json.loads(store.get_bytes(trained[0]))["stats"]
    assert len(trained) == 1 and stats["resumed_from"] == 2 and stats["steps"] == 6


def test_bare_resume_picks_only_this_checkouts_runs_of_the_same_model(prefect_api, tmp_path, capsys):
    import yaml
    from prefect import get_client
    from prefect.states import Completed, Crashed, Failed

    from flows.pipeline import finetune
    from flows.resume import checkout_id, find_run
    from steps.core.errors import ConfigError

    ours, other = f"ours-{uuid.uuid4().hex[:6]}", f"other-{uuid.uuid4().hex[:6]}"
    params_file = tmp_path / "ours.yaml"
    params_file.write_text(yaml.safe_dump({"register": {"model_name": ours}}))

    def recorded(model, state, checkout=None, extra=()):
        tags = [f"model:{model}", f"checkout:{checkout or checkout_id()}", *extra]
        with get_client(sync_client=True) as client:
            return client.create_flow_run(finetune, parameters={"params": {"register": {"model_name": model}}},
                                          tags=tags, state=state)

    recorded(ours, Failed(), checkout="0123456789ab")  # our model, another checkout
    time.sleep(0.01)
    newest_other = recorded(other, Failed())  # another model, this checkout, the newest failure of all
    with pytest.raises(ConfigError, match=f"no failed, crashed or cancelled .* of model {ours}"):
        find_run(None, ours)

    first = recorded(ours, Failed())
    time.sleep(0.01)
    recorded(other, Crashed())
    assert find_run(None, ours).id == first.id

    second = recorded(ours, Crashed())
    assert main(["run", "--resume", "--params", str(params_file)]) == 2
    err = capsys.readouterr().err
    assert "2 runs of model" in err and str(first.id) in err and str(second.id) in err
    assert str(newest_other.id) not in err
    assert err.index(str(second.id)) < err.index(str(first.id))  # newest first

    recorded(ours, Completed(), extra=[f"resume-of:{second.id}"])  # the second was resumed already
    assert find_run(None, ours).id == first.id
    with pytest.raises(ConfigError, match="2 runs of model other-"):
        find_run(None, other)
