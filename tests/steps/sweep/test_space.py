"""A sweep's search space: paths and bounds checked against PipelineParams, values applied where they
belong, the parameter file's own values as the baseline trial, and a trial's report settings."""

from __future__ import annotations

import pytest

from steps.config import PipelineParams
from steps.core.errors import ConfigError
from steps.sweep.space import SweepSpace, with_reports

PARAMS = PipelineParams.parse({"train": {"max_steps": 12, "learning_rate": 1e-3, "lora": {"r": 8}}})


def space(parameters: dict, **extra) -> SweepSpace:
    return SweepSpace.parse({"parameters": parameters, "eval_every": 3, **extra})


def test_a_valid_space_applies_its_values_at_their_paths():
    s = space({"train.learning_rate": {"type": "log", "low": 1e-5, "high": 3e-2},
               "train.lora.r": {"type": "categorical", "choices": [2, 4, 8]},
               "validate.min_chars": {"type": "int", "low": 1, "high": 10},
               "train.early_stopping.patience": {"type": "int", "low": 1, "high": 4}})
    s.check(PARAMS)
    applied = s.apply(PARAMS, {"train.learning_rate": 0.02, "train.lora.r": 2, "validate.min_chars": 5,
                               "train.early_stopping.patience": 2})
    assert applied.train.learning_rate == 0.02 and applied.train.lora.r == 2
    assert applied.validate_.min_chars == 5  # the YAML name (an alias) of the validate section
    assert applied.train.early_stopping.patience == 2 and applied.train.early_stopping.eval_every == 20  # null section
    assert PARAMS.train.learning_rate == 1e-3  # the parameters themselves are untouched


@pytest.mark.parametrize("parameters, message", [
    ({"train.lerning_rate": {"type": "float", "low": 0.1, "high": 0.2}},
     "'train.lerning_rate' names no field: train has attention, "),
    ({"trian.learning_rate": {"type": "float", "low": 0.1, "high": 0.2}}, "'trian.learning_rate' names no field: "
     "PipelineParams has artifacts_prefix, base_model, dispatch, evaluate, ingest, register, scrub, tokenize, train"),
    ({"train.lora": {"type": "int", "low": 1, "high": 4}}, "'train.lora' is a section, not a value: name one of its "
     "fields (alpha, dropout, r,"),
    ({"train.max_steps.low": {"type": "int", "low": 1, "high": 4}}, "train.max_steps is a value, not a section"),
    ({"train.learning_rate": {"type": "log", "low": 1e-5, "high": 2.0}},
     "train.learning_rate = 2.0 (a bound of its range) is refused by the parameters' schema: invalid parameters with "
     "{'train.learning_rate': 2.0}: train.learning_rate: Input should be less than or equal to 1"),
    ({"train.warmup_ratio": {"type": "float", "low": -0.5, "high": 0.5}}, "train.warmup_ratio = -0.5"),
    ({"train.method": {"type": "categorical", "choices": ["lora", "dora"]}}, "train.method = 'dora'"),
])
def test_an_unknown_path_or_an_out_of_bounds_range_is_named(parameters, message):
    with pytest.raises(ConfigError) as err:
        space(parameters).check(PARAMS)
    assert message in str(err.value)


def test_malformed_distributions_and_unmeasured_steps_are_refused():
    with pytest.raises(ConfigError, match="low 0.5 must be below high 0.1"):
        space({"train.learning_rate": {"type": "float", "low": 0.5, "high": 0.1}})
    with pytest.raises(ConfigError, match="Input should be greater than 0"):
        space({"train.learning_rate": {"type": "log", "low": 0.0, "high": 0.1}})
    with pytest.raises(ConfigError, match="input_value='uniform'|does not match any of the expected tags"):
        space({"train.learning_rate": {"type": "uniform", "low": 0.0, "high": 0.1}})
    with pytest.raises(ConfigError, match=r"the space's eval_every 5 does not divide train.max_steps 12"):
        space({"train.learning_rate": {"type": "log", "low": 1e-5, "high": 0.1}}, eval_every=5).check(PARAMS)


def test_the_baseline_is_the_parameter_files_own_values_when_inside_the_space():
    inside = space({"train.learning_rate": {"type": "log", "low": 1e-5, "high": 3e-2},
                    "train.lora.r": {"type": "categorical", "choices": [4, 8]}})
    assert inside.baseline(PARAMS) == {"train.learning_rate": 1e-3, "train.lora.r": 8}
    outside = space({"train.lora.r": {"type": "categorical", "choices": [2, 4]}})
    assert outside.baseline(PARAMS) is None


def test_a_trial_reports_to_its_study_and_keeps_configured_early_stopping():
    s = space({"train.learning_rate": {"type": "log", "low": 1e-5, "high": 3e-2}})
    trial = with_reports(PARAMS, s, "study-a", 4)
    es = trial.train.early_stopping
    assert (es.eval_every, es.trial.study, es.trial.number) == (3, "study-a", 4)
    assert es.patience > 12  # pruning only: patience never stops a trial
    configured = PipelineParams.parse({"train": {"max_steps": 12, "early_stopping": {"eval_every": 4, "patience": 2}}})
    kept = with_reports(configured, s, "study-a", 5).train.early_stopping
    assert (kept.eval_every, kept.patience, kept.trial.number) == (4, 2, 5)
