"""steps/register/report.py: the end-of-run summary, line by line as the README shows it."""

from __future__ import annotations

from steps.core.store import ArtifactRef, DatasetRef, EvalReport, ModelRef
from steps.register.report import PipelineSummary, render_summary
from steps.register.step import PromotionDecision, RegisteredVersion, RunRecord


def ref(cls, step: str, **stats):
    return cls(step=step, key=f"p/{step}/k", digest=f"{step}-digest", stats=stats)


def summary(task_stats: dict, base: dict, tuned: dict, version: str = "1", champion: str | None = "1") -> PipelineSummary:
    record = RunRecord(
        params={},
        datasets={"ingest": ref(DatasetRef, "ingest", lines=2479, source="chatterbot:english,korean"),
                  "validate": ref(DatasetRef, "validate", records=2479, rules=11),
                  "scrub": ref(DatasetRef, "scrub", records_in=2479, records_out=1349, duplicates_removed=1130,
                               pii={"EMAIL": 2, "PHONE": 0}),
                  "tokenize": ref(DatasetRef, "tokenize", **task_stats)},
        model=ModelRef(base=ref(ArtifactRef, "base-model"),
                       adapter=ref(ArtifactRef, "train", steps=60, first_loss=1.7384, final_loss=3.3641)),
        evaluations={"base": ref(EvalReport, "evaluate", **base), "candidate": ref(EvalReport, "evaluate", **tuned)},
    )
    decision = PromotionDecision(promoted=champion == version, reason="promoted: perplexity 6.88 vs base model 9.469",
                                 champion_version=champion, metric="perplexity", candidate_value=6.88,
                                 incumbent_value=9.469, incumbent="base model")
    return PipelineSummary(record=record, version=RegisteredVersion(name="tuneline-chat", version=version, run_id="r",
                                                                    run_key="k"), decision=decision)


def test_the_summary_of_a_chat_run_reads_as_in_the_readme():
    text = render_summary(summary({"train_records": 1213, "eval_records": 136, "truncated": 32},
                                  {"perplexity": 9.4685, "bleu": 3.202}, {"perplexity": 6.8801, "bleu": 2.542}),
                          {"mlflow": "http://127.0.0.1:5000"})
    assert text.splitlines() == [
        "tuneline run summary",
        "  ingest     2479 lines from chatterbot:english,korean",
        "  validate   2479 records passed 11 rules",
        "  scrub      2479 -> 1349 records (1130 duplicates removed)",
        "             PII replaced: EMAIL=2, PHONE=0",
        "  tokenize   1213 train / 136 eval records, 32 truncated",
        "  train      60 steps, loss 1.738 -> 3.364",
        "  evaluate   perplexity 9.4685 (base) -> 6.8801 (fine-tuned)",
        "             bleu 3.202 (base) -> 2.542 (fine-tuned)",
        "  register   tuneline-chat version 1 @champion",
        "  promotion  promoted: perplexity 6.88 vs base model 9.469",
        "  mlflow     http://127.0.0.1:5000",
    ]


def test_a_version_not_promoted_is_the_challenger_and_text_runs_name_blocks():
    text = render_summary(summary({"train_documents": 30, "eval_documents": 4, "train_records": 90, "eval_records": 12},
                                  {"perplexity": 20.0}, {"perplexity": 30.0}, version="2", champion="1"), {})
    assert "  register   tuneline-chat version 2 @challenger" in text.splitlines()
    assert "  tokenize   30 train / 4 eval documents packed into 90 / 12 blocks" in text.splitlines()


def test_each_task_shows_its_own_metrics():
    text = render_summary(summary({"train_records": 40, "eval_records": 10, "truncated": 0},
                                  {"accuracy": 0.33, "f1_macro": 0.2}, {"accuracy": 0.9, "f1_macro": 0.88}), {})
    lines = text.splitlines()
    assert "  evaluate   accuracy 0.33 (base) -> 0.9 (fine-tuned)" in lines
    assert "             f1_macro 0.2 (base) -> 0.88 (fine-tuned)" in lines
    assert not any("perplexity" in line for line in lines if "(base) ->" in line)


def test_an_rl_run_shows_its_kl_to_the_base_and_the_win_rates_register_derived():
    from steps.register.report import decision_markdown

    s = summary({"train_records": 40, "eval_records": 8, "truncated": 0},
                {"mean_reward": 0.4, "kl_to_reference": 0.0}, {"mean_reward": 0.7, "kl_to_reference": 0.0123})
    s = s.model_copy(update={"version": s.version.model_copy(update={
        "metrics": {"reward_win_rate": 0.625, "reward_win_rate_vs_champion": 0.5}})})
    lines = render_summary(s, {}).splitlines()
    i = lines.index("  evaluate   mean_reward 0.4 (base) -> 0.7 (fine-tuned)")
    assert lines[i + 1 : i + 4] == ["             kl_to_reference 0.0 (base) -> 0.0123 (fine-tuned)",
                                    "             reward_win_rate 0.625 (fine-tuned)",
                                    "             reward_win_rate_vs_champion 0.5 (fine-tuned)"]
    page = decision_markdown(s, {}).splitlines()
    assert "| reward_win_rate | 0.625 | - |" in page and "| reward_win_rate_vs_champion | 0.5 | - |" in page


def test_the_mixture_note_names_each_source_and_a_pinned_side():
    from steps.register.step import mixture_note

    stats = {"sources": [{"source": "a.jsonl", "records": 1000, "taken": 300, "share": 0.75},
                         {"source": "held.jsonl", "records": 100, "taken": 100, "share": 0.25, "split": "eval"}]}
    assert mixture_note(stats) == (" (mixture: a.jsonl 75.0% = 300 of 1000 records, "
                                   "held.jsonl 25.0% = 100 of 100 records, all eval)")
    assert mixture_note({"source": "a.jsonl"}) == ""


def test_each_step_page_says_what_the_step_did_and_lists_its_numbers():
    from steps.register.report import step_markdown

    page = step_markdown("scrub", {"records_in": 10, "records_out": 8, "duplicates_removed": 2,
                                   "pii": {"EMAIL": 3, "PHONE": 0}, "note": "a <b> | c"})
    lines = page.splitlines()
    assert lines[0] == "# Scrub"
    assert lines[2] == "10 -> 8 records, 2 exact and 0 near duplicates removed; PII replaced: EMAIL 3."
    assert "| records in | 10 |" in lines and "| EMAIL | 3 |" in lines and "| PHONE | 0 |" in lines
    assert "| note | a &lt;b&gt; \\| c |" in lines  # no raw markup from the data reaches the page
    train = step_markdown("train", {"method": "lora", "device": "cpu", "steps": 5, "first_loss": 3.21,
                                    "final_loss": 2.5, "trainable_params": 1234})
    assert "lora on cpu: 5 steps, loss 3.21 -> 2.5, 1,234 trainable parameters." in train


def test_the_evaluation_page_has_a_row_per_model_and_the_decision_page_each_check():
    from steps.register.report import decision_markdown, evaluation_markdown

    table = evaluation_markdown({"base": {"perplexity": 9.5, "bleu": 1.0}, "candidate": {"perplexity": 7.0},
                                 "champion v3": {"perplexity": 7.5, "bleu": 2.0}}).splitlines()
    assert table[2:] == ["| model | perplexity | bleu |", "|---|---|---|", "| base | 9.5 | 1.0 |",
                         "| candidate | 7.0 | - |", "| champion v3 | 7.5 | 2.0 |"]
    s = summary({"train_records": 1, "eval_records": 1, "truncated": 0}, {"perplexity": 9.4}, {"perplexity": 6.8})
    s = s.model_copy(update={"decision": s.decision.model_copy(update={
        "reason": "promoted: perplexity 6.88 vs base model 9.469 (lower is better; gain +27%); smoke test passed"})})
    page = decision_markdown(s, {"MLflow run": "http://m/#/experiments/1/runs/r"}).splitlines()
    assert page[0] == "# Promotion: promoted"
    assert "- perplexity 6.88 vs base model 9.469 (lower is better; gain +27%)" in page and "- smoke test passed" in page
    assert "- [MLflow run](http://m/#/experiments/1/runs/r)" in page
