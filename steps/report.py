"""The end-of-run summary a person reads: rows through each step, PII by type,
duplicates, perplexity and BLEU base -> tuned, the version, its alias, and links."""

from __future__ import annotations

from steps.config import StrictModel
from steps.register import PromotionDecision, RegisteredVersion, RunRecord
from steps.tokenize import split_summary


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
        f"  ingest     {d['ingest'].get('lines')} lines from {d['ingest'].get('source')}",
        f"  validate   {d['validate'].get('records')} records passed {d['validate'].get('rules')} rules",
        f"  scrub      {d['scrub'].get('records_in')} -> {d['scrub'].get('records_out')} records"
        f" ({d['scrub'].get('duplicates_removed')} duplicates removed)",
        "             PII replaced: " + (", ".join(f"{k}={v}" for k, v in pii.items()) or "none"),
        f"  tokenize   {split_summary(d['tokenize'])}",
        f"  train      {summary.record.model.adapter.stats.get('steps') if summary.record.model.adapter else 0} steps,"
        f" loss {_stat(summary.record.model.adapter, 'first_loss')} -> {_stat(summary.record.model.adapter, 'final_loss')}",
        f"  evaluate   perplexity {base.get('perplexity')} (base) -> {tuned.get('perplexity')} (fine-tuned)",
        f"             BLEU {base.get('bleu', '-')} (base) -> {tuned.get('bleu', '-')} (fine-tuned)",
        f"  register   {summary.version.name} version {summary.version.version} @{alias}",
        f"  promotion  {summary.decision.reason}",
    ]
    lines += [f"  {name:<10} {url}" for name, url in links.items()]
    return "\n".join(lines)


def _stat(ref: object, name: str) -> str:
    value = getattr(ref, "stats", {}).get(name)
    return f"{value:.3f}" if isinstance(value, float) else str(value)
