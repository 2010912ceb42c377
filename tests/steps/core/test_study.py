"""A sweep's study in its storage: a trial's eval losses reported from the training loop's side, the pruner
rebuilt there from the study's settings (median, Hyperband), and the errors a user can act on."""

from __future__ import annotations

import optuna
import pytest

from steps.config import PipelineParams
from steps.core.errors import ConfigError
from steps.core.study import PRUNED_AT, PRUNER_ATTR, STORAGE_ENV, open_study, report_eval
from steps.sweep.study import start_study, study_name, trials_left

PARAMS = PipelineParams.parse({"train": {"max_steps": 12}})


@pytest.fixture
def storage_env(tmp_path, monkeypatch):
    monkeypatch.setenv(STORAGE_ENV, f"sqlite:///{tmp_path / 'optuna.db'}")


def space(pruner: dict):
    from steps.sweep.space import SweepSpace

    return SweepSpace.parse({"parameters": {"train.learning_rate": {"type": "log", "low": 1e-5, "high": 1e-2}},
                             "eval_every": 3, "seed": 1, "pruner": pruner})


def finish(study, losses: list[float]) -> None:
    trial = study.ask()
    trial.suggest_float("train.learning_rate", 1e-5, 1e-2, log=True)
    for step, loss in enumerate(losses, start=1):
        trial.report(loss, step * 3)
    study.tell(trial, losses[-1])


def test_a_worse_trial_is_pruned_through_its_reports_and_a_better_one_is_not(storage_env):
    s = space({"kind": "median", "startup_trials": 1})
    name = study_name(PARAMS, s)
    study = start_study(name, s, PARAMS)
    baseline = study.ask()  # the parameter file's values (1e-3 lies in the space), enqueued first
    assert baseline.params == {} and baseline.user_attrs == {"baseline": True}
    study.tell(baseline, 1.0)
    finish(study, [1.2, 1.1, 1.0])
    worse, better = study.ask(), study.ask()
    assert report_eval(name, better.number, 1.1, 3) is False
    assert report_eval(name, worse.number, 1.5, 3) is True  # above the median at step 3
    stored = {t.number: t for t in open_study(name).get_trials(deepcopy=False)}
    assert stored[worse.number].user_attrs[PRUNED_AT] == 3 and PRUNED_AT not in stored[better.number].user_attrs
    assert stored[worse.number].intermediate_values == {3: 1.5}
    assert trials_left(study, 6) == 4  # the baseline and one finished trial count; running ones do not


def test_the_pruner_is_rebuilt_from_the_studys_settings(storage_env):
    s = space({"kind": "hyperband", "min_resource": 3, "reduction_factor": 2})
    name = study_name(PARAMS, s)
    start_study(name, s, PARAMS)
    reopened = open_study(name)
    assert reopened.user_attrs[PRUNER_ATTR]["max_resource"] == 12  # train.max_steps
    assert isinstance(reopened.pruner, optuna.pruners.HyperbandPruner)
    none = space({"kind": "none"})
    start_study(study_name(PARAMS, none), none, PARAMS)
    assert isinstance(open_study(study_name(PARAMS, none)).pruner, optuna.pruners.NopPruner)


def test_a_missing_storage_or_study_is_named(storage_env, monkeypatch):
    with pytest.raises(ConfigError, match="no study 'nope' in the sweep storage"):
        open_study("nope")
    monkeypatch.delenv(STORAGE_ENV)
    with pytest.raises(ConfigError, match=r"no study storage: start the local services \(`tuneline services up`\)"):
        open_study("nope")
