"""Hyperparameter sweeps: the ``tuneline-sweep`` flow and its ``tuneline-trial`` runs.

    tuneline sweep --params deployments/params/tiny.yaml --space deployments/sweeps/lora-tiny.yaml \\
        --trials 6 --parallel 2

The data steps run once, in the sweep's own flow run; the Optuna study (the stack's database) proposes
trials, each a ``tuneline-trial`` flow run (a subflow, K at once with ``--parallel K``; or runs of the
``tuneline-trial/trial`` deployment on its work pool with ``trial_deployment``) whose data tasks are cache
hits and whose training reports its eval losses so the pruner stops bad trials; each trial becomes a child
of the sweep's MLflow run; then the study's plots, the trials table (this run's artifact), and the best
trial's parameters through ``tuneline-finetune``: its training is a cache hit, then evaluate, register,
the promotion gate. How it works: docs/DESIGN.md, "Sweeps".
"""

from __future__ import annotations

import contextvars
import logging
from typing import Any

from prefect import flow

from flows import pages, tasks
from flows.pipeline import data_steps, finetune, save_result_storage
from steps.config import PipelineParams
from steps.core.contract import StrictModel
from steps.core.errors import ConfigError, StepRunError
from steps.core.store import ArtifactStore, ModelRef
from steps.register.report import PipelineSummary
from steps.sweep import record
from steps.sweep.space import SweepSpace, with_reports
from steps.sweep.study import start_study, study_name, trials_left

log = logging.getLogger(__name__)


class SweepSummary(StrictModel):
    study: str
    parent_run: str
    numbers: dict[str, Any]  # record.summary: trials, complete, pruned, failed, best and baseline values
    table: list[dict[str, Any]]
    best: PipelineSummary | None = None  # the best trial through register and the gate


@flow(name="tuneline-trial", persist_result=True, result_storage=tasks.RESULT_STORAGE, result_serializer="json",
      flow_run_name="trial-{number}")
def trial(params: PipelineParams, number: int) -> dict[str, Any]:
    """One trial of a sweep: the data steps (cache hits after the sweep's own run) and training, whose eval
    losses go to trial ``number`` of the study its parameters name; returns the trained model's reference."""
    prepared = data_steps(params)
    tuned = tasks.train(params.train, prepared.data, prepared.base, params.artifacts_prefix,
                        dispatch=params.dispatch.get("train"))
    pages.step(params.register_.model_name, "train", tuned.adapter)
    return tuned.model_dump(mode="json", by_alias=True)


@flow(name="tuneline-sweep", persist_result=False)
def sweep(params: PipelineParams, space: SweepSpace, trials: int = 6, parallel: int = 1,
          trial_deployment: str | None = None, study: str | None = None) -> SweepSummary:
    """Search ``space`` around ``params`` with ``trials`` trials (in total, over every sweeper of the study),
    ``parallel`` at once, then register the best trial through the promotion gate.

    ``trial_deployment``: run each trial as a flow run of that deployment (e.g. ``tuneline-trial/trial`` on a
    GPU pool) instead of a subflow here. ``study``: the study's name (default: from the parameters and space).
    """
    save_result_storage()
    space.check(params)
    if trial_deployment:
        require_deployment(trial_deployment)
    name = study or study_name(params, space)
    data_steps(params)  # once, before any trial: the trials find every data task cached
    optuna_study = start_study(name, space, params)
    parent = record.parent_run(params, name)
    store = ArtifactStore.from_env(params.artifacts_prefix)
    here = contextvars.copy_context()  # this flow run's context: each trial thread runs its subflow in a copy
    log.info("sweep: study %s, %d of %d trials to run, %d at once", name, trials_left(optuna_study, trials),
             trials, parallel)

    def objective(t: Any) -> float:
        import optuna

        values = space.suggest(t)
        trial_params = with_reports(space.apply(params, values), space, name, t.number)
        baseline = bool(t.user_attrs.get(record.BASELINE_ATTR))
        try:
            tuned = run_trial(trial_params, t.number, here, trial_deployment)
        except StepRunError:
            record.log_trial(parent, name, t.number, values, None, baseline)
            raise
        # Read again from the storage: the trial's process wrote pruned_at there (t.user_attrs is a cached copy).
        outcome = record.trial_outcome(tuned, store, optuna_study._storage.get_trial(t._trial_id).user_attrs)
        record.log_trial(parent, name, t.number, values, outcome, baseline)
        log.info("sweep: trial %d %s, eval loss %.4f (%s)", t.number, outcome.state, outcome.value, values)
        if outcome.pruned_at is not None:
            raise optuna.TrialPruned(f"pruned at step {outcome.pruned_at}")
        return outcome.value

    run_study(optuna_study, objective, trials, parallel)
    numbers = record.log_study(parent, optuna_study)
    table = record.trials_table(optuna_study)
    publish_table(params.register_.model_name, name, table, numbers)
    best = None
    if numbers["best_trial"] is not None:
        best_params = with_reports(space.apply(params, numbers["best_params"]), space, name, numbers["best_trial"])
        best = finetune.with_options(flow_run_name=f"{name}-best-trial-{numbers['best_trial']}")(best_params)
    return SweepSummary(study=name, parent_run=parent, numbers=numbers, table=table, best=best)


def run_study(study: Any, objective: Any, trials: int, parallel: int) -> None:
    """Optuna's loop until ``trials`` trials of the study are complete or pruned (other sweepers' too); a trial
    that fails is recorded and the loop goes on."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    enough = MaxTrialsCallback(trials, states=(TrialState.COMPLETE, TrialState.PRUNED))
    # Enqueued trials (the baseline) one at a time: two threads can both pop the same waiting trial from SQLite,
    # which has no row locks, and train the same run key at once.
    waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    if waiting and trials_left(study, trials):
        study.optimize(objective, n_trials=waiting, n_jobs=1, catch=(StepRunError,), callbacks=[enough])
    if left := trials_left(study, trials):
        study.optimize(objective, n_trials=left, n_jobs=parallel, catch=(StepRunError,), callbacks=[enough])


def require_deployment(name: str) -> None:
    """ConfigError before anything runs when the Prefect server has no deployment ``name``."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise ConfigError(f"trial_deployment: the Prefect server has no deployment {name!r} (register it with "
                              "`tuneline deploy --only trial`, and start a worker for its pool)") from None


def run_trial(params: PipelineParams, number: int, context: contextvars.Context,
              deployment: str | None) -> ModelRef:
    """Trial ``number`` as a ``tuneline-trial`` subflow of this run (in a copy of its context: Optuna runs
    each trial in a thread of its own), or as a run of ``deployment``; StepRunError when it does not complete."""
    if deployment:
        from prefect.deployments import run_deployment

        run = run_deployment(deployment, parameters={"params": params.model_dump(mode="json", by_alias=True),
                                                     "number": number}, timeout=None, poll_interval=1)
        state = run.state
    else:
        state = context.copy().run(trial, params, number, return_state=True)
    if state is None or not state.is_completed():
        message = state.message if state is not None else "no state"
        raise StepRunError(f"trial {number} ended {state.name if state else 'without a state'}: {message}")
    return ModelRef.model_validate(state.result())


def publish_table(model_name: str, study: str, table: list[dict[str, Any]], numbers: dict[str, Any]) -> None:
    """The trials table as this run's Prefect artifact (kept under ``<model>-sweep`` across runs)."""
    from prefect.artifacts import create_table_artifact

    best = numbers["best_value"]
    create_table_artifact(
        table=table, key=pages.artifact_key(model_name, "sweep"),
        description=f"Sweep {study}: {numbers['trials']} trials, {numbers['pruned']} pruned, best eval loss "
                    + (f"{best:.4f} (trial {numbers['best_trial']})" if best is not None else "none yet"))
