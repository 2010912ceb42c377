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




def test_figures_render_as_png_and_pyplot_keeps_none_of_them():
    """A long-lived worker registers many runs: pyplot would keep every figure (mlflow.log_figure
    does not close them), and its state is shared by the threads that register at once."""
    import io
    from concurrent.futures import ThreadPoolExecutor

    import matplotlib.pyplot as plt

    from steps.register.step import confusion_figure, loss_curve, record_loss_histogram

    def pngs(_: int) -> list[bytes]:
        figures = [loss_curve([{"step": i, "loss": 3.0 - i / 10} for i in range(1, 30)], [{"step": 10, "loss": 2.5}],
                              {"base": {"eval_loss": 3.1}, "candidate": {"eval_loss": 2.2}}),
                   record_loss_histogram([{"loss": 0.1 * i, "split": ("train", "eval")[i % 2]} for i in range(40)]),
                   confusion_figure({"confusion_matrix": [[5, 1], [2, 4]], "labels": ["a", "b"], "accuracy": 0.75,
                                     "f1_macro": 0.74})]
        out = []
        for fig in figures:
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png")
            out.append(buffer.getvalue())
        return out

    plt.close("all")
    with ThreadPoolExecutor(4) as threads:
        rendered = [png for pngs_of_one in threads.map(pngs, range(8)) for png in pngs_of_one]
    assert len(rendered) == 24 and all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in rendered)
    assert plt.get_fignums() == []
