"""The end-of-run summary a person reads: rows through each step, PII by type,
duplicates, the task's metrics base -> tuned, the version, its alias, and links."""

from __future__ import annotations

from steps.core.contract import StrictModel
from steps.register.step import PromotionDecision, RegisteredVersion, RunRecord, mixture_note, quarantine_note
from steps.tokenize.split import split_summary


class PipelineSummary(StrictModel):
    record: RunRecord
    version: RegisteredVersion
    decision: PromotionDecision


def render_summary(summary: PipelineSummary, links: dict[str, str]) -> str:
    d = {name: ref.stats for name, ref in summary.record.datasets.items()}
    base = summary.record.evaluations["base"].stats
    tuned = summary.record.evaluations["candidate"].stats
    pii = d["scrub"].get("pii", {})
    alias = "champion" if summary.decision.champion_version == summary.version.version else "challenger"
    lines = [
        "tuneline run summary",
        f"  ingest     {d['ingest'].get('lines')} lines from {d['ingest'].get('source')}" + mixture_note(d["ingest"]),
        f"  validate   {d['validate'].get('records')} records passed {d['validate'].get('rules')} rules"
        + quarantine_note(d["validate"]),
        f"  scrub      {d['scrub'].get('records_in')} -> {d['scrub'].get('records_out')} records"
        f" ({d['scrub'].get('duplicates_removed')} duplicates removed{quarantine_note(d['scrub'])})",
        "             PII replaced: " + (", ".join(f"{k}={v}" for k, v in pii.items()) or "none"),
        f"  tokenize   {split_summary(d['tokenize'])}",
        f"  train      {summary.record.model.adapter.stats.get('steps') if summary.record.model.adapter else 0} steps,"
        f" loss {_stat(summary.record.model.adapter, 'first_loss')} -> {_stat(summary.record.model.adapter, 'final_loss')}",
        *_metric_lines(base, tuned),
        f"  register   {summary.version.name} version {summary.version.version} @{alias}",
        f"  promotion  {summary.decision.reason}",
    ]
    lines += [f"  {name:<10} {url}" for name, url in links.items()]
    return "\n".join(lines)


SHOWN = ("perplexity", "bleu", "accuracy", "f1_macro", "mse", "mae", "r2", "pref_accuracy", "reward_accuracy",
         "reward_margin")


def _metric_lines(base: dict, tuned: dict) -> list[str]:
    """One line per metric the task measured, base -> fine-tuned."""
    names = [m for m in SHOWN if m in tuned or m in base]
    return [f"  {'evaluate' if i == 0 else '':<10} {m} {base.get(m, '-')} (base) -> {tuned.get(m, '-')} (fine-tuned)"
            for i, m in enumerate(names)]


def _stat(ref: object, name: str) -> str:
    value = getattr(ref, "stats", {}).get(name)
    return f"{value:.3f}" if isinstance(value, float) else str(value)
