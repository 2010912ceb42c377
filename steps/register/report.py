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
    tuned = {**summary.record.evaluations["candidate"].stats, **summary.version.metrics}
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


SHOWN = ("perplexity", "bleu", "rouge_l",
         "accuracy", "f1_macro", "mse", "mae", "r2", "pref_accuracy", "reward_accuracy",
         "reward_margin", "mean_reward", "kl_to_reference", "masked_accuracy", "pseudo_perplexity")
WIN_RATES = ("reward_win_rate", "reward_win_rate_vs_champion")  # the candidate's alone (register derives them)


def _metric_lines(base: dict, tuned: dict) -> list[str]:
    """One line per metric the task measured, base -> fine-tuned, then the candidate's win rates."""
    lines = [f"{m} {base.get(m, '-')} (base) -> {tuned.get(m, '-')} (fine-tuned)"
             for m in SHOWN if m in tuned or m in base]
    lines += [f"{m} {tuned[m]} (fine-tuned)" for m in WIN_RATES if m in tuned]
    return [f"  {'evaluate' if i == 0 else '':<10} {line}" for i, line in enumerate(lines)]


def _stat(ref: object, name: str) -> str:
    value = getattr(ref, "stats", {}).get(name)
    return f"{value:.3f}" if isinstance(value, float) else str(value)


# The pages a flow run publishes (Prefect markdown artifacts): one per step, the evaluation, the decision.

STEP_TITLES = {"ingest": "Ingest", "validate": "Validate", "scrub": "Scrub", "base_model": "Base model",
               "tokenize": "Tokenize", "train": "Train"}


def step_markdown(step: str, stats: dict) -> str:
    """A step's page: what it did in one sentence, then every number it recorded (nested ones as their own table)."""
    flat = {k: v for k, v in stats.items() if not isinstance(v, (dict, list))}
    lines = [f"# {STEP_TITLES.get(step, step)}", "", step_sentence(step, stats), "", *_table(flat, "value")]
    for name, value in stats.items():
        if isinstance(value, dict) and value and all(not isinstance(v, (dict, list)) for v in value.values()):
            lines += ["", f"**{name.replace('_', ' ')}**", "", *_table(value, "count")]
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):  # e.g. rl_curve
            columns = list(value[0])
            lines += ["", f"**{name.replace('_', ' ')}**", "", "| " + " | ".join(c.replace("_", " ") for c in columns)
                      + " |", "|" + "---|" * len(columns), *["| " + " | ".join(_cell(row.get(c, "")) for c in columns)
                                                            + " |" for row in value]]
    return "\n".join(lines) + "\n"


def step_sentence(step: str, s: dict) -> str:
    """The summary line of ``render_summary`` for one step, as a sentence."""
    if step == "ingest":
        return f"{s.get('lines')} lines from `{s.get('source')}`{mixture_note(s)}."
    if step == "validate":
        return (f"{s.get('records')} {s.get('record_kind', '')} records passed {s.get('rules')} rules"
                f"{quarantine_note(s)}.")
    if step == "scrub":
        pii = ", ".join(f"{k} {v}" for k, v in (s.get("pii") or {}).items() if v) or "none"
        return (f"{s.get('records_in')} -> {s.get('records_out')} records, {s.get('duplicates_removed')} exact and "
                f"{s.get('near_duplicates_removed', 0)} near duplicates removed{quarantine_note(s)}; "
                f"PII replaced: {pii}.")
    if step == "tokenize":
        return split_summary(s) + "."
    if step == "train":
        return (f"{s.get('method')} on {s.get('device')}: {s.get('steps')} steps, loss {_num(s.get('first_loss'))} -> "
                f"{_num(s.get('final_loss'))}, {s.get('trainable_params', 0):,} trainable parameters"
                + (f", resumed from step {s['resumed_from']}" if s.get("resumed_from") else "")
                + (", stopped early" if s.get("stopped_early") else "") + ".")
    if step == "base_model":
        return (f"`{s.get('source')}` ({s.get('architecture')}, {s.get('parameters', 0):,} parameters)"
                + (f", Hub commit `{s['revision']}`" if s.get("revision") else "") + ".")
    return ""


def evaluation_markdown(evals: dict[str, dict]) -> str:
    """Every model evaluated on the same eval set, one row each (base, candidate, champion), the task's metrics."""
    shown = [m for m in (*SHOWN, "chrf", "eval_loss", "smoke_passed", "reference_perplexity")
             if any(m in s for s in evals.values())]
    lines = ["# Evaluation (same eval set)", "", f"| model | {' | '.join(shown)} |", "|---|" + "---|" * len(shown)]
    lines += [f"| {name} | {' | '.join(str(s.get(m, '-')) for m in shown)} |" for name, s in evals.items()]
    return "\n".join(lines) + "\n"


def decision_markdown(summary: PipelineSummary, links: dict[str, str]) -> str:
    """The promotion decision with each check it made, the registered version, and where to look next."""
    decision, version = summary.decision, summary.version
    verdict, _, checks = decision.reason.partition(": ")
    alias = "champion" if decision.champion_version == version.version else "challenger"
    lines = [f"# Promotion: {verdict}", "", f"{version.name} version {version.version} is `@{alias}`.", "",
             f"| metric | candidate | {decision.incumbent} |", "|---|---|---|",
             f"| {decision.metric} | {decision.candidate_value:.6g} | {decision.incumbent_value:.6g} |",
             *[f"| {m} | {_num(version.metrics[m])} | - |" for m in WIN_RATES if m in version.metrics], "",
             "Checks:", "", *[f"- {check}" for check in top_level_parts(checks) if check], ""]
    lines += [f"- [{name}]({url})" for name, url in links.items()]
    return "\n".join(lines) + "\n"


def top_level_parts(text: str, sep: str = "; ") -> list[str]:
    """``text`` split at ``sep`` outside parentheses: "a (b; c); d" -> ["a (b; c)", "d"]."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0 and text.startswith(sep, i):
            parts.append(text[start:i])
            start = i = i + len(sep)
            continue
        i += 1
    return [*parts, text[start:]]


def _table(values: dict, header: str) -> list[str]:
    if not values:
        return []
    return ["| name | " + header + " |", "|---|---|",
            *[f"| {k.replace('_', ' ')} | {_cell(v)} |" for k, v in values.items()]]


def _cell(value: object) -> str:
    text = _num(value) if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _num(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
