"""steps/register/step.py: the promotion rule and the parameters logged to MLflow (the gate end to end:
test_promotion_gate.py)."""

import pytest

from steps.config import PipelineParams, RegisterConfig
from steps.register.step import decide, flatten


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
    assert flat["train.lora.r"] == 8 and flat["validate.allowed_roles"] == '["system", "user", "assistant", "tool"]'


