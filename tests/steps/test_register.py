import pytest

from steps.config import PipelineParams, RegisterConfig
from steps.errors import ConfigError
from steps.register import decide, flatten


@pytest.mark.parametrize("metric, candidate, incumbent, min_improvement, promoted", [
    ("perplexity", 10.0, 12.0, 0.0, True),
    ("perplexity", 12.0, 12.0, 0.0, False),      # a tie keeps the champion
    ("perplexity", 13.0, 12.0, 0.0, False),
    ("perplexity", 11.5, 12.0, 0.05, False),     # 4% better, 5% required
    ("perplexity", 11.0, 12.0, 0.05, True),
    ("bleu", 20.0, 10.0, 0.0, True),
    ("bleu", 5.0, 10.0, 0.0, False),
    ("bleu", 1.0, 0.0, 0.5, True),               # anything beats a zero BLEU
])
def test_promotion_rule(metric, candidate, incumbent, min_improvement, promoted):
    cfg = RegisterConfig(metric=metric, min_improvement=min_improvement)
    ok, reason = decide(cfg, candidate, incumbent, "champion v3")
    assert ok is promoted
    assert f"vs champion v3 {incumbent:.4g}" in reason and metric in reason


def test_params_flatten_for_mlflow():
    flat = flatten(PipelineParams().model_dump(mode="json", by_alias=True))
    assert flat["train.lora.r"] == 8 and flat["validate.allowed_roles"] == '["system", "user", "assistant"]'


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


def test_split_summary_names_documents_and_blocks_for_text():
    from steps.tokenize import split_summary

    assert split_summary({"train_documents": 9, "eval_documents": 2, "train_records": 390, "eval_records": 54}) == \
        "9 train / 2 eval documents packed into 390 / 54 blocks"
    assert split_summary({"train_records": 10, "eval_records": 2, "truncated": 1}) == \
        "10 train / 2 eval records, 1 truncated"
