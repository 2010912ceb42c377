"""What a sweep leaves behind: an MLflow parent run with a child run per trial, the study's plots, the table.

    parent = parent_run(params, study)                     # found again when the sweep resumes
    log_trial(parent, study_name, number, values, outcome) # a child run: the values, eval losses, pruned or complete
    rows = trials_table(study)                             # the Prefect artifact's rows
    log_study(parent, study, baseline_number)              # history and importance PNGs, best vs baseline

A trial's outcome comes from its train artifact (``train_report.json``: the eval loss at each evaluation)
and the study (``pruned_at``, set by the pruner's report in steps/core/study.py).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from steps.config import PipelineParams
from steps.core.contract import StrictModel
from steps.core.store import ArtifactStore, ModelRef
from steps.core.study import PRUNED_AT
from steps.register.step import flatten, training_experiment

log = logging.getLogger(__name__)

STUDY_TAG = "tuneline.sweep.study"
TRIAL_TAG = "tuneline.sweep.trial"
STATE_TAG = "tuneline.sweep.state"
BASELINE_ATTR = "baseline"  # the trial whose values are the parameter file's own


class TrialOutcome(StrictModel):
    """A finished trial: its eval loss at each evaluation, the last one (its value), and whether it was pruned."""

    evals: list[dict[str, float]]
    value: float
    pruned_at: int | None = None
    train_stats: dict[str, Any] = {}

    @property
    def state(self) -> str:
        return "pruned" if self.pruned_at is not None else "complete"


def trial_outcome(tuned: ModelRef, store: ArtifactStore, user_attrs: dict[str, Any]) -> TrialOutcome:
    """The outcome of a trial whose training committed ``tuned`` (its eval losses from ``train_report.json``)."""
    assert tuned.adapter is not None
    evals = store.read_json(tuned.adapter, "train_report.json")["evals"]
    if not evals:
        raise ValueError(f"trial trained {tuned.adapter.stats.get('steps')} steps without an evaluation: "
                         "lower the space's eval_every (or train.early_stopping.eval_every)")
    return TrialOutcome(evals=evals, value=evals[-1]["loss"], pruned_at=user_attrs.get(PRUNED_AT),
                        train_stats={k: v for k, v in tuned.adapter.stats.items() if isinstance(v, (int, float))})


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


def parent_run(params: PipelineParams, study: str) -> str:
    """The sweep's MLflow run in the training experiment (the one of an earlier sweeper of the study, if any)."""
    client = _client()
    experiment = training_experiment(params.register_.experiment)
    found = client.search_runs([experiment.experiment_id], f"tags.`{STUDY_TAG}` = '{study}' and "
                               f"attributes.run_name = 'sweep-{study}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment.experiment_id, run_name=f"sweep-{study}",
                            tags={STUDY_TAG: study, "tuneline.model": params.register_.model_name})
    client.log_batch(run.info.run_id, params=_params(flatten(params.model_dump(mode="json", by_alias=True))))
    return run.info.run_id


def _params(values: dict[str, Any]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in values.items()]


def log_trial(parent: str, study: str, number: int, values: dict[str, Any], outcome: TrialOutcome | None,
              baseline: bool = False) -> str:
    """A child run of ``parent`` for trial ``number``: its values as params, eval_loss per step, the value and
    the train stats as metrics, and its state (pruned, complete; failed without an outcome)."""
    from mlflow.entities import Metric

    client = _client()
    experiment_id = client.get_run(parent).info.experiment_id
    state = outcome.state if outcome is not None else "failed"
    run = client.create_run(experiment_id, run_name=f"trial-{number}", tags={
        "mlflow.parentRunId": parent, STUDY_TAG: study, TRIAL_TAG: str(number), STATE_TAG: state,
        **({BASELINE_ATTR: "true"} if baseline else {})})
    now = int(time.time() * 1000)
    metrics = []
    if outcome is not None:
        metrics += [Metric("eval_loss", e["loss"], now, int(e["step"])) for e in outcome.evals]
        metrics += [Metric("value", outcome.value, now, 0)]
        metrics += [Metric(f"train_{k}", float(v), now, 0) for k, v in outcome.train_stats.items()
                    if not isinstance(v, bool)]
        if outcome.pruned_at is not None:
            metrics.append(Metric("pruned_at_step", outcome.pruned_at, now, 0))
    client.log_batch(run.info.run_id, metrics=metrics, params=_params(values))
    client.set_terminated(run.info.run_id, "FINISHED" if outcome is not None else "FAILED")
    return run.info.run_id


def trials_table(study: Any) -> list[dict[str, Any]]:
    """One row per trial: number, state, value, pruned-at step, its values, seconds."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start \
            else None
        rows.append({"trial": t.number, "state": t.state.name.lower(), "value": t.value,
                     "pruned_at": t.user_attrs.get(PRUNED_AT), "baseline": bool(t.user_attrs.get(BASELINE_ATTR)),
                     **{k: v for k, v in t.params.items()},
                     "seconds": round(seconds, 1) if seconds is not None else None})
    return rows


def summary(study: Any) -> dict[str, Any]:
    """Counts, the best trial and the baseline trial's value (the parameter file's own values)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    baseline = next((t for t in trials if t.user_attrs.get(BASELINE_ATTR) and t.state == TrialState.COMPLETE), None)
    best = min(complete, key=lambda t: t.value) if complete else None
    return {"trials": len(trials), "complete": len(complete),
            "pruned": sum(t.state == TrialState.PRUNED for t in trials),
            "failed": sum(t.state == TrialState.FAIL for t in trials),
            "best_trial": best.number if best else None, "best_value": best.value if best else None,
            "best_params": best.params if best else None,
            "baseline_value": baseline.value if baseline else None}


def log_study(parent: str, study: Any) -> dict[str, Any]:
    """The optimization history and parameter importance plots (PNG) and the summary's numbers on the parent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm
    from mlflow.entities import Metric

    client, numbers = _client(), summary(study)
    with tempfile.TemporaryDirectory(prefix="tuneline-sweep-") as tmp:
        plots = {"optimization_history.png": ovm.plot_optimization_history}
        if numbers["complete"] >= 2:  # importances need two finished trials (fANOVA on their values)
            plots["param_importances.png"] = ovm.plot_param_importances
        for name, plot in plots.items():
            axes = plot(study)
            axes.figure.set_size_inches(8, 5)
            axes.figure.tight_layout()
            axes.figure.savefig(Path(tmp, name), dpi=100)
            plt.close(axes.figure)
            client.log_artifact(parent, str(Path(tmp, name)), artifact_path="sweep")
    now = int(time.time() * 1000)
    client.log_batch(parent, metrics=[Metric(k, float(v), now, 0) for k, v in numbers.items()
                                      if isinstance(v, (int, float)) and not isinstance(v, bool)])
    client.set_tag(parent, "tuneline.sweep.best_params", str(numbers["best_params"]))
    client.set_terminated(parent, "FINISHED")
    return numbers
