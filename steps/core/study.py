"""Optuna studies of ``tuneline sweep``: their storage, their pruner, and a trial's eval-loss reports.

    study = open_study("tuneline-tiny-1a2b3c4d5e")                  # created by the sweeper (steps/sweep/)
    stop = report_eval(study.study_name, number=3, loss=2.31, step=20)  # train.early_stopping.trial

The storage is the SQLAlchemy URL in ``TUNELINE_SWEEP_STORAGE``: the stack's database (``use_local_services``
sets it; services/stack.py ``sweep_storage_url``), so every process of a sweep (the sweeper, its trials on a
work pool) reads and writes the same study. The pruner is not stored by Optuna: its settings are a study
attribute (``PRUNER_ATTR``), and each process builds the same pruner from them.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any

from steps.core.errors import ConfigError

STORAGE_ENV = "TUNELINE_SWEEP_STORAGE"
PRUNER_ATTR = "tuneline.pruner"  # {"kind": "median"|"hyperband"|"none", ...its settings}
PRUNED_AT = "pruned_at"  # the trial's user attribute: the step at which its pruner stopped it
HEARTBEAT_S = 10  # a running trial's heartbeat; one silent for GRACE_S (its sweeper was killed) is failed
GRACE_S = 30


def storage_url() -> str:
    url = os.environ.get(STORAGE_ENV)
    if not url:
        raise ConfigError(f"no study storage: start the local services (`tuneline services up`) or set {STORAGE_ENV} "
                          "to an SQLAlchemy database URL")
    return url


@functools.lru_cache(maxsize=4)
def storage(url: str) -> Any:
    """One RDB storage per URL and process, with heartbeats: a killed sweeper's running trials are failed by the
    next trial start of any sweeper of the study (fresh trials take their place). SQLite waits for its lock."""
    import optuna
    from optuna.storages import RDBStorage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    with warnings.catch_warnings():  # heartbeats are still flagged experimental, printed by every trial process
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)


def make_pruner(settings: dict[str, Any]) -> Any:
    import optuna

    kind = settings.get("kind", "median")
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=settings.get("startup_trials", 2),
                                           n_warmup_steps=settings.get("warmup_steps", 0))
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=settings.get("min_resource", 1),
                                              max_resource=settings.get("max_resource", "auto"),
                                              reduction_factor=settings.get("reduction_factor", 3))
    return optuna.pruners.NopPruner()


def open_study(name: str) -> Any:
    """The study ``name`` in the sweep storage, with the pruner its sweeper chose."""
    import optuna

    url = storage_url()
    try:
        attrs = optuna.load_study(study_name=name, storage=storage(url)).user_attrs
    except KeyError:
        raise ConfigError(f"no study {name!r} in the sweep storage") from None
    return optuna.load_study(study_name=name, storage=storage(url), pruner=make_pruner(attrs.get(PRUNER_ATTR, {})))


def report_eval(study_name: str, number: int, loss: float, step: int) -> bool:
    """Report trial ``number``'s eval loss at ``step``; True when the study's pruner prunes it (recorded as
    ``pruned_at``)."""
    import optuna

    study = open_study(study_name)
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    live = optuna.Trial(study, trial_id)
    live.report(loss, step)
    if not live.should_prune():
        return False
    live.set_user_attr(PRUNED_AT, step)
    return True
