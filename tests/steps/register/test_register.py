"""steps/register/step.py: the promotion rule, the KL ceiling and win rates of RL policies, the parameters and
figures logged to MLflow (the gate end to end: test_promotion_gate.py)."""

import pytest

from steps.config import PipelineParams, RegisterConfig
from steps.core.store import EvalReport
from steps.register.step import decide, flatten, gate_checks, win_rate


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


def test_an_rl_policy_above_the_kl_ceiling_fails_the_gate_naming_value_and_ceiling():
    def report(**stats):
        return EvalReport(step="evaluate", key="k", digest="d", stats=stats)

    cfg = RegisterConfig(metric="mean_reward", max_kl=0.5, require_smoke=False, forgetting_tolerance=None)
    [(ok, why)] = gate_checks(cfg, report(mean_reward=1.0, kl_to_reference=0.7), None)
    assert not ok and why == "KL to the base 0.7 per answer token (allowed <= 0.5)"
    [(ok, _)] = gate_checks(cfg, report(mean_reward=1.0, kl_to_reference=0.5), None)  # the ceiling itself passes
    assert ok
    assert gate_checks(cfg, report(perplexity=3.0), None) == []  # no KL measured: not an RL policy
    unset = RegisterConfig(metric="mean_reward", require_smoke=False, forgetting_tolerance=None)
    assert gate_checks(unset, report(mean_reward=1.0, kl_to_reference=9.0), None) == []  # no ceiling unless set
    with pytest.raises(ValueError):
        RegisterConfig(max_kl=0.0)


def test_the_win_rate_counts_prompts_both_answered_ties_half():
    assert win_rate({"a": 1.0, "b": 0.0, "c": 0.5, "d": 2.0}, {"a": 0.0, "b": 1.0, "c": 0.5}) == pytest.approx(0.5)
    assert win_rate({"a": 1.0}, {"a": 0.0, "z": 5.0}) == 1.0
    assert win_rate({"a": 0.2, "b": 0.2}, {"a": 0.2, "b": 0.2}) == 0.5
    assert win_rate({}, {"a": 1.0}) == 0.0


def test_figures_render_as_png_and_pyplot_keeps_none_of_them():
    """A long-lived worker registers many runs: pyplot would keep every figure (mlflow.log_figure
    does not close them), and its state is shared by the threads that register at once."""
    import io
    from concurrent.futures import ThreadPoolExecutor

    import matplotlib.pyplot as plt

    from steps.register.step import confusion_figure, loss_curve, record_loss_histogram, rl_curves

    def pngs(_: int) -> list[bytes]:
        figures = [loss_curve([{"step": i, "loss": 3.0 - i / 10} for i in range(1, 30)], [{"step": 10, "loss": 2.5}],
                              {"base": {"eval_loss": 3.1}, "candidate": {"eval_loss": 2.2}}),
                   record_loss_histogram([{"loss": 0.1 * i, "split": ("train", "eval")[i % 2]} for i in range(40)]),
                   confusion_figure({"confusion_matrix": [[5, 1], [2, 4]], "labels": ["a", "b"], "accuracy": 0.75,
                                     "f1_macro": 0.74}),
                   rl_curves([{"step": i, "reward": i / 10, "kl": 0.01 * i, "completion_length": 5, "loss": 0.1}
                              for i in range(1, 9)])]
        out = []
        for fig in figures:
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png")
            out.append(buffer.getvalue())
        return out

    plt.close("all")
    with ThreadPoolExecutor(4) as threads:
        rendered = [png for pngs_of_one in threads.map(pngs, range(8)) for png in pngs_of_one]
    assert len(rendered) == 32 and all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in rendered)
    assert plt.get_fignums() == []


def test_rl_curves_draw_reward_kl_and_length_in_three_panels_and_say_when_kl_was_not_measured():
    from steps.register.step import rl_curves

    history = [{"step": i, "reward": i / 10, "kl": 0.01 * i, "completion_length": 5 + i} for i in range(1, 9)]
    figure = rl_curves(history)
    assert [ax.get_title() for ax in figure.axes] == ["mean reward", "KL to the reference (per token)",
                                                      "completion length (tokens)"]
    reward, kl, length = figure.axes
    assert list(reward.lines[0].get_ydata()) == [h["reward"] for h in history]
    assert reward.lines[1].get_ydata()[-1] < history[-1]["reward"]  # smoothed: behind a rising curve
    assert list(length.lines[0].get_xdata()) == list(range(1, 9)) and not kl.texts
    no_kl = rl_curves([{k: v for k, v in h.items() if k != "kl"} for h in history])  # train.rl.beta 0
    assert [t.get_text() for t in no_kl.axes[1].texts] == ["not measured"]
    assert len(no_kl.axes[1].lines[0].get_xdata()) == 0
