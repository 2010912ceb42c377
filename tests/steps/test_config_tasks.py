"""Task-dependent configuration: impossible combinations fail when the parameters are read."""

import pytest

from steps.config import PipelineParams
from steps.errors import ConfigError


def params(**sections) -> PipelineParams:
    return PipelineParams.parse(sections)


@pytest.mark.parametrize("kind, metric", [("chat", "perplexity"), ("text", "perplexity"),
                                          ("classification", "f1_macro"), ("regression", "mse"),
                                          ("preference", "pref_accuracy")])
def test_the_gate_metric_follows_the_record_kind_unless_given(kind, metric):
    base = {"base_model": {"source": "all-minilm-l6-v2"}} if kind in ("classification", "regression") else {}
    assert params(validate={"record_kind": kind}, **base).register_.metric == metric
    chosen = {"classification": "accuracy", "chat": "bleu", "regression": "mae"}.get(kind)
    if chosen:
        got = params(validate={"record_kind": kind}, register={"metric": chosen, "model_name": "m"}, **base)
        assert got.register_.metric == chosen and got.register_.model_name == "m"


@pytest.mark.parametrize("sections, message", [
    ({"validate": {"record_kind": "classification"}, "train": {"method": "reft"}}, "reft"),
    ({"validate": {"record_kind": "preference"}, "train": {"method": "reft"}}, "reft"),
    ({"base_model": {"source": "all-minilm-l6-v2"}}, "encoder"),
    ({"validate": {"record_kind": "preference"}, "base_model": {"source": "tiny-random-bert"}}, "encoder"),
    ({"train": {"preference": {"loss": "orpo"}}}, "preference records"),
    ({"validate": {"labels": ["a", "b"]}}, "classification records only"),
    ({"validate": {"record_kind": "classification"}, "base_model": {"source": "all-minilm-l6-v2"},
      "register": {"metric": "perplexity"}}, "not measured"),
    ({"validate": {"record_kind": "regression"}, "base_model": {"source": "all-minilm-l6-v2"},
      "register": {"metric": "accuracy"}}, "not measured"),
    ({"validate": {"record_kind": "text"}, "register": {"metric": "bleu"}}, "not measured"),
    ({"validate": {"record_kind": "classification", "labels": ["only"]}}, "at least 2"),
])
def test_impossible_combinations_fail_at_config_time(sections, message):
    with pytest.raises(ConfigError, match=message):
        params(**sections)


def test_a_decoder_may_classify():
    """Any causal LM can carry a sequence head; only encoders are refused for generation."""
    got = params(validate={"record_kind": "classification"}, base_model={"source": "tiny-random-llama"})
    assert got.task == "classification"


def test_preference_settings_are_accepted_for_preference_records():
    got = params(validate={"record_kind": "preference"}, train={"preference": {"loss": "orpo", "beta": 0.2}})
    assert got.train.preference.loss == "orpo" and got.task == "preference"
