"""A sweep's Optuna study: named from what it searches, created once, continued by every later sweeper.

    name = study_name(params, space)              # the same command names the same study
    study = start_study(name, space, params)      # created (sampler, pruner, the baseline trial) or loaded
    remaining = trials_left(study, 6)             # 6 minus the trials already complete or pruned

The storage is the stack's database (steps/core/study.py). A new study's first trial is the parameter file's
own values of the swept fields (when they lie in the space), so the study measures best against default.
"""

from __future__ import annotations

import hashlib
from typing import Any

from steps.config import PipelineParams
from steps.core.lineage import canonical_json
from steps.core.study import PRUNER_ATTR, make_pruner, storage, storage_url
from steps.sweep.record import BASELINE_ATTR
from steps.sweep.space import SweepSpace

FINISHED = ("COMPLETE", "PRUNED")


def study_name(params: PipelineParams, space: SweepSpace) -> str:
    """``<model name>-<10 hex digits of the parameters and the space>``: rerunning a command continues its study."""
    payload = canonical_json({"params": params.model_dump(mode="json", by_alias=True),
                              "space": space.model_dump(mode="json")})
    return f"{params.register_.model_name}-{hashlib.sha256(payload.encode()).hexdigest()[:10]}"


def start_study(name: str, space: SweepSpace, params: PipelineParams) -> Any:
    """The study ``name`` (minimizing the eval loss) with the space's sampler and pruner; a new one records the
    pruner's settings for the trials' processes and enqueues the baseline trial."""
    import optuna
    from optuna.storages import fail_stale_trials

    settings = space.pruner.model_dump()
    if settings["kind"] == "hyperband":
        settings["max_resource"] = params.train.max_steps or "auto"
    study = optuna.create_study(study_name=name, storage=storage(storage_url()), pruner=make_pruner(settings),
                                direction="minimize", load_if_exists=True)
    if PRUNER_ATTR not in study.user_attrs:  # a new study (a concurrent creator writes the same values)
        study.set_user_attr(PRUNER_ATTR, settings)
        if (baseline := space.baseline(params)) is not None:
            study.enqueue_trial(baseline, user_attrs={BASELINE_ATTR: True}, skip_if_exists=True)
    fail_stale_trials(study)  # a killed sweeper's trials, silent for the grace period
    # Seeded past the trials already there: a resuming sweeper does not replay the first one's suggestions.
    seed = None if space.seed is None else space.seed + len(study.get_trials(deepcopy=False))
    study.sampler = (optuna.samplers.TPESampler(seed=seed) if space.sampler == "tpe"
                     else optuna.samplers.RandomSampler(seed=seed))
    return study


def trials_left(study: Any, total: int) -> int:
    done = sum(t.state.name in FINISHED for t in study.get_trials(deepcopy=False))
    return max(total - done, 0)
