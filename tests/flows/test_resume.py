"""`tuneline run --resume`: a run that failed in the middle of training is run again with its
own parameters; finished tasks come from the cache and training continues from its checkpoint."""

from __future__ import annotations

import json
import uuid

import pytest
from test_pipeline import dataset, task_states, tiny_params

from flows.cli import main
from helpers import all_keys

pytestmark = pytest.mark.services


def test_a_failed_run_resumes_from_its_last_task_and_checkpoint(prefect_api, store, tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient
    from prefect import get_client

    from flows.pipeline import finetune
    from steps.train import step as train

    name = f"resume-{uuid.uuid4().hex[:6]}"
    params = tiny_params(dataset(tmp_path), store.prefix, name)
    params = params.model_copy(update={"train": params.train.model_copy(update={"max_steps": 6, "checkpoint_every": 2})})
    original = train.Checkpoints.save

    def save_then_die(self, step, *args, **kwargs):  # fault injection: the step dies after its 2nd checkpoint
        original(self, step, *args, **kwargs)
        if step == 4:
            raise RuntimeError("injected: the training process died")

    monkeypatch.setattr(train.Checkpoints, "save", save_then_die)
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
