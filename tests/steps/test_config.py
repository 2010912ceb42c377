"""Task-dependent configuration: impossible combinations fail when the parameters are read."""

import pytest

from steps.config import PipelineParams
from steps.core.errors import ConfigError


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


def test_unknown_and_invalid_parameters_fail_loudly():
    with pytest.raises(ConfigError, match="train.lora_rank: Extra inputs are not permitted"):
        PipelineParams.parse({"train": {"lora_rank": 8}})
    with pytest.raises(ConfigError, match="train.learning_rate"):
        PipelineParams.parse({"train": {"learning_rate": -1}})
    assert PipelineParams.parse({"validate": {"max_chars": 10}}).validate_.max_chars == 10


@pytest.mark.parametrize("method", ["full", "head", "lora", "qlora", "reft"])
def test_parameters_round_trip_through_json_for_every_method(method):
    """Prefect stores flow parameters as JSON: a dump must validate back to the same parameters."""
    params = PipelineParams.parse({"train": {"method": method}})
    assert PipelineParams.parse(params.model_dump(mode="json", by_alias=True)) == params
    assert PipelineParams.parse(params.model_dump(mode="json")) == params


def test_reft_on_text_records_is_refused_at_config_time():
    with pytest.raises(ConfigError, match="reft' intervenes at prompt positions"):
        PipelineParams.parse({"validate": {"record_kind": "text"}, "train": {"method": "reft"}})
