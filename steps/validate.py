"""Validate: a Great Expectations gate on the raw records, one suite per record kind.

``ValidateConfig.record_kind`` picks the suite. Each raw JSONL line becomes one row of a
record table (JSON syntax, record shape) and, once it has the right shape, rows of the
kind's own table(s).

chat (supervised fine-tuning): one row per message of a turn table; the suite checks
message count, roles and their order, nulls and content length. Accepted shapes:
- chat: ``{"id"?: str, "messages": [{"role": ..., "content": ...}, ...]}``: an optional
  leading system message, then user/assistant turns alternating, ending with assistant;
- instruction: ``{"id"?: str, "instruction": str, "input"?: str, "response"|"output": str, "system"?: str}``;
- ShareGPT: ``{"id"?: str, "conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}``
  (speakers mapped by ``SHAREGPT_ROLES``; an unknown speaker fails the roles rule).

text (continued pretraining): ``{"id"?: str, "text": str}``; one row of a text table: the
text is a string, not blank, and within ``min_chars``..``max_text_chars``.

classification: ``{"id"?: str, "text": str, "label": str}``; the text table as for text,
and a label table: the label is a non-empty string, one of ``labels`` when given, and the
file has at least two distinct labels.

regression: ``{"id"?: str, "text": str, "label": number}``; the text table as for text,
and a label table: the label is an int or float (not a bool or a string) and finite.

preference (DPO, ORPO): ``{"id"?: str, "prompt": str, "chosen": str, "rejected": str}``;
one row of a pair table: each of the three is a string, not blank, and within
``min_chars``..``max_chars``, and chosen differs from rejected (ignoring surrounding
whitespace).

seq2seq (encoder-decoder): ``{"id"?: str, "input": str, "target": str}``, or a chat, ShareGPT or instruction
record whose last message is the answer (``seq2seq_pair``, steps/core/records.py: the prompt is the input);
one row of a pair table: input and target are strings, not blank, within ``min_chars``..``max_chars``.

prompt (online RL): ``{"id"?: str, "prompt": str, "answer"?: str}``; one row of a prompt table: the
prompt is a string, not blank, within ``min_chars``..``max_chars``, and the answer (the reference the
rewards check), when given, a non-blank string. A record with ``chosen`` or ``rejected`` is a
preference record, not a prompt record.

Every kind also checks each line: valid UTF-8, and no control characters other than whitespace
(tab, newline, CR, VT, form feed; raw or JSON-escaped). Results use ``exclude_unexpected_values`` so reports hold counts and line numbers, never
record contents. A file of another kind fails the record-shape rule.

Streaming: the raw file is read from S3 in chunks of ``CHUNK_LINES`` lines; each chunk's
tables go through the suite and its records straight to the output file, so memory holds
one chunk whatever the file size. Counts add up over chunks, example lines are the file's
first failing ones; the distinct-labels rule runs once at the end on the distinct values
seen. The data-docs pages show the first chunk's validation.

Policy (``on_invalid``): ``fail`` stops at any broken rule; ``drop`` (the default) runs the per-record
rules with every failing line listed, leaves those records out and writes ``quarantine.jsonl`` (line,
id, rules; never contents), as long as they are at most ``max_invalid_share`` of the records.

Output: ``report.json`` plus one GX data-docs page per table (``data_docs/<table>.html``), the
quarantine, and in the stats ``record_kind`` (what scrub and tokenize read the records as) and ``raw``
(ingest's artifact). No copy of the records: scrub reads the valid ones from ingest's raw file in the
kind's form (``validated_records``, steps/core/records.py: chat ``{"id", "messages"}``, text ``{"id",
"text"}``, classification and regression ``{"id", "text", "label"}``, preference ``{"id", "prompt",
"chosen", "rejected"}``), so the raw area is ingest's file only. A missing id becomes ``line-<n>``; ids
in the quarantine have their PII replaced (``steps/text/pii.py``). Label
names are schema, not contents: classification adds the class balance ``label_counts``
(label -> records) and regression ``label_stats`` (``min``, ``max``, ``mean``) to both the
report and the stats.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import numbers
import os
import re
import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from steps.config import ValidateConfig
from steps.core.contract import FORMAT_KINDS, RAW_FILE, SEQ2SEQ_CHAT_FORMATS
from steps.core.errors import ConfigError, DataQualityError
from steps.core.lineage import run_key
from steps.core.records import QUARANTINE_FILE, as_messages, seq2seq_pair
from steps.core.store import ArtifactStore, DatasetRef

log = logging.getLogger(__name__)

STEP = "validate"
EXAMPLES = 5
CHUNK_LINES = 20_000  # raw lines per chunk of the stream (one suite run per chunk; 50k kept ~80 MiB more)
PAIR_FIELDS = ("prompt", "chosen", "rejected")
SEQ2SEQ_FIELDS = ("input", "target")
TEXT_COLUMNS = ["line", "text_chars", "text_blank"]
Kept = list[tuple[int, Any]]  # per record that passes: its line number and its label (None for unlabelled kinds)


@dataclass(frozen=True)
class Rule:
    name: str
    table: str  # "lines" (every kind), "records", "turns" (chat), "texts" (text, classification, regression), "labels", "pairs"
    expectation: Any


def validate_records(cfg: ValidateConfig, source: DatasetRef, store: ArtifactStore) -> DatasetRef:
    """Check every raw line against the Great Expectations suite of ``cfg.record_kind``.

    Writes ``report.json`` (per rule: failing count and example line numbers, never contents), a
    data-docs page per table and, under the drop policy, ``quarantine.jsonl``; ``record_kind`` and the
    raw file (``raw``: its artifact's key and digest) in the stats. No copy of the records: later steps
    read them from the raw file (``validated_records``, steps/core/records.py). Raises ``DataQualityError`` naming the file, the
    rule, the failing count and example lines when any rule fails: then nothing is committed.
    """
    check_format(cfg.record_kind, source)
    key = run_key(STEP, cfg, [source.digest])
    if (done := store.lookup(STEP, key)) is not None:
        return DatasetRef(**done.model_dump())
    build_tables, build_rules = SUITES[cfg.record_kind]
    rules = line_rules() + build_rules(cfg)
    # Rules about a whole column (distinct labels) run once at the end, on the distinct values.
    whole = [r for r in rules if type(r.expectation).__name__ == "ExpectColumnUniqueValueCountToBeBetween"]
    per_row = [r for r in rules if r not in whole]
    distinct: dict[str, dict[Any, int]] = {r.table: {} for r in whole}  # table -> value -> first line
    rows_seen: Counter[str] = Counter()
    merged: dict[str, dict[str, Any]] = {}
    pages: dict[str, str] = {}
    summary_state = _LabelSummary(cfg.record_kind)
    writer = store.writer(STEP, key, cfg, inputs=[source])
    records = 0
    quarantine: list[dict[str, Any]] = []  # line, id (when the record parsed), rules: never contents
    drop = cfg.on_invalid == "drop"
    # The raw file streams through in chunks of CHUNK_LINES lines: each chunk's tables are validated by
    # the suite, so memory holds one chunk. No copy of the records is written: the raw area is ingest's
    # file, and scrub reads the records from it (steps/core/records.py: validated_records).
    for start, raw_lines in _chunks(store.iter_lines(source, RAW_FILE), CHUNK_LINES):
        lines = Lines((b.decode("utf-8", errors="replace") for b in raw_lines), start)
        tables, kept = build_tables(lines)
        tables["lines"] = _line_table(raw_lines, lines)
        chunk = run_suite(per_row, tables, pages if not pages else None, every_line=drop)
        if drop:
            kept = _quarantined(chunk["rules"], kept, lines, quarantine)
        _merge(merged, chunk["rules"])
        for rule in whole:
            column = rule.expectation.column
            frame = tables[rule.table]
            rows_seen[rule.table] = rows_seen[rule.table] + len(frame)
            for value, line in zip(frame[column], frame["line"]):
                if value is not None and value == value:  # GX counts non-null values
                    distinct[rule.table].setdefault(value, int(line))
        summary_state.update(label for _, label in kept)
        records += len(kept)
    if whole:
        import pandas as pd

        for table, values in distinct.items():
            frame = pd.DataFrame({"line": list(values.values()),
                                  **{r.expectation.column: list(values) for r in whole if r.table == table}})
            result = run_suite([r for r in whole if r.table == table], {table: frame})
            for entry in result["rules"]:
                entry["element_count"] = rows_seen[table]
            _merge(merged, result["rules"])
    rules_out = [merged[r.name] for r in rules if r.name in merged]
    broken = [r for r in rules_out if not r["success"]]
    share = len(quarantine) / max(records + len(quarantine), 1)
    # Under the drop policy a broken per-record rule only quarantines its records, up to the share.
    whole_names = {w.name for w in whole}
    tolerated = drop and share <= cfg.max_invalid_share and all(r["rule"] not in whole_names for r in broken)
    report = {"success": not broken or tolerated, "rules": rules_out}
    if not report["success"]:
        policy = (f"\n  {len(quarantine)} of {records + len(quarantine)} records break a rule ({share:.2%}): more "
                  f"than validate.max_invalid_share ({cfg.max_invalid_share:.2%}) allows to quarantine"
                  if drop and quarantine else "")
        raise DataQualityError(
            f"validation failed for {source.stats.get('source', source.key)} as {cfg.record_kind} records: "
            f"{len(broken)} of {len(report['rules'])} rules broken\n" + "\n".join(map(_describe, broken)) + policy
        )
    if quarantine:
        counts = Counter(rule for row in quarantine for rule in row["rules"])
        report["quarantined"] = len(quarantine)
        report["quarantine_rules"] = dict(sorted(counts.items()))
        writer.put_jsonl(QUARANTINE_FILE, quarantine)
        log.warning("validate: %d of %d records quarantined (%s)", len(quarantine), records + len(quarantine),
                    ", ".join(f"{rule}: {n}" for rule, n in sorted(counts.items())))
    summary = summary_state.result()
    report.update(summary)
    writer.put_json("report.json", report)
    for table, html in pages.items():
        writer.put_bytes(f"data_docs/{table}.html", html.encode("utf-8"))
    log.info("validate: %d %s records pass %d rules", records, cfg.record_kind, len(report["rules"]))
    stats = {"records": records, "rules": len(report["rules"]), "record_kind": cfg.record_kind, **summary,
             "raw": {"key": source.key, "digest": source.digest}}
    if quarantine:
        stats |= {"quarantined": len(quarantine), "quarantine_rules": report["quarantine_rules"]}
    ref = writer.commit(stats=stats)
    return DatasetRef(**ref.model_dump())


def check_format(kind: str, source: DatasetRef) -> None:
    """The records' format (ingest's ``format`` stat) must be one the record kind reads: a ConfigError
    naming both, before any rule runs (text records may come from labelled files)."""
    fmt = source.stats.get("format")
    if fmt is None or FORMAT_KINDS.get(fmt) == kind or (kind == "text" and fmt in ("classification", "regression")) \
            or (kind == "seq2seq" and fmt in SEQ2SEQ_CHAT_FORMATS):
        return
    readable = sorted(f for f, k in FORMAT_KINDS.items() if k == kind)
    raise ConfigError(f"validate.record_kind is {kind!r}, but ingest found {fmt!r} records in "
                      f"{source.stats.get('source', source.key)} ({FORMAT_KINDS.get(fmt)} records): set "
                      f"validate.record_kind: {FORMAT_KINDS.get(fmt)}, or bring {' / '.join(readable)} records")


def _quarantined(entries: list[dict[str, Any]], kept: Kept, lines: Lines, quarantine: list[dict[str, Any]]) -> Kept:
    """``kept`` without the records of the lines that broke a rule; those lines (number, id, rules)
    are added to ``quarantine``. Each entry's ``failing_lines`` is removed (the report keeps examples)."""
    failing: dict[int, list[str]] = {}
    for entry in entries:
        for line in entry.pop("failing_lines", []):
            failing.setdefault(line, []).append(entry["rule"])
    if not failing:
        return kept
    kept = [(line, label) for line, label in kept if line not in failing]
    for line in sorted(failing):
        obj = lines.parsed(line - lines.start)
        record_id = obj.get("id") if isinstance(obj, dict) and isinstance(obj.get("id"), str) else None
        quarantine.append({"line": line, "id": _redacted(record_id), "rules": failing[line]})
    return kept


def _redacted(record_id: str | None) -> str | None:
    """An id with its PII replaced by placeholders (the quarantine lies outside the raw area)."""
    return None if record_id is None else _pii_engine().redact(record_id)[0]


@functools.cache
def _pii_engine() -> Any:
    from steps.text.pii import PiiEngine

    return PiiEngine()


class Lines(list):
    """The decoded lines of one chunk of the file, and the file line number of the first.
    ``parsed(i)`` is line i's JSON value (``_INVALID`` when it is not JSON), parsed once for
    every table and check that reads it."""

    def __init__(self, lines: Iterable[str], start: int = 1):
        super().__init__(lines)
        self.start = start
        self._parsed: list[Any] = [_UNPARSED] * len(self)

    def parsed(self, i: int) -> Any:
        value = self._parsed[i]
        if value is _UNPARSED:
            try:
                value = json.loads(self[i])
            except json.JSONDecodeError:
                value = _INVALID
            self._parsed[i] = value
        return value


_UNPARSED, _INVALID = object(), object()


def _chunks(lines: Iterable[bytes], size: int) -> Iterator[tuple[int, list[bytes]]]:
    """(file line number of the first line, up to ``size`` lines) over the stream."""
    chunk: list[bytes] = []
    start = 1
    for line in lines:
        chunk.append(line)
        if len(chunk) == size:
            yield start, chunk
            start += size
            chunk = []
    if chunk or start == 1:
        yield start, chunk


def _merge(merged: dict[str, dict[str, Any]], entries: list[dict[str, Any]]) -> None:
    """Add one chunk's rule results: counts add up, example lines are the first EXAMPLES."""
    for entry in entries:
        total = merged.get(entry["rule"])
        if total is None:
            merged[entry["rule"]] = dict(entry)
            continue
        total["success"] = total["success"] and entry["success"]
        total["element_count"] += entry["element_count"]
        total["unexpected_count"] += entry["unexpected_count"]
        total["example_lines"] = sorted(set(total["example_lines"]) | set(entry["example_lines"]))[:EXAMPLES]


class _LabelSummary:
    """``label_summary`` accumulated over chunks."""

    def __init__(self, kind: str):
        self.kind = kind
        self.counts: Counter = Counter()
        self.values: list[int | float] = []  # regression labels

    def update(self, labels: Iterable[Any]) -> None:
        if self.kind == "classification":  # a label that is not a string (a list, say) fails its rule: skip it here
            self.counts.update(label for label in labels if isinstance(label, str))
        elif self.kind == "regression":
            self.values.extend(labels)

    def result(self) -> dict[str, Any]:
        if self.kind == "classification":
            return {"label_counts": dict(sorted(self.counts.items()))}
        return label_summary(self.kind, [{"label": v} for v in self.values])


def _describe(result: dict[str, Any]) -> str:
    """One line of the failure message: counts and line numbers, or the observed count of a whole-table rule."""
    if "observed_value" in result and not result["example_lines"]:
        return (f"  - rule '{result['rule']}': observed {result['observed_value']} across "
                f"{result['element_count']} {result['table']}")
    return (f"  - rule '{result['rule']}': {result['unexpected_count']} of {result['element_count']} "
            f"{result['table']} fail (e.g. lines {', '.join(map(str, result['example_lines']))})")


def label_summary(kind: str, records: list[dict]) -> dict[str, Any]:
    """Class balance (classification) or label range (regression) of valid records; {} for other kinds."""
    if kind == "classification":
        return {"label_counts": dict(sorted(Counter(r["label"] for r in records).items()))}
    if kind == "regression" and records:
        values = [r["label"] for r in records]
        return {"label_stats": {"min": min(values), "max": max(values), "mean": statistics.fmean(values)}}
    return {}


def _chat_tables(lines: list[str]) -> tuple[dict[str, Any], Kept]:
    """Flatten raw lines into a record table, a turn table and the lines of the chat records (``Kept``).
    Columns are built as lists (no per-row dicts)."""
    lines = lines if isinstance(lines, Lines) else Lines(lines)
    rec_line: list[int] = []
    rec_json: list[bool] = []
    rec_shape: list[str | None] = []
    rec_count: list[int | None] = []  # None = "not applicable": a line that is not JSON fails only the JSON rule
    rec_order: list[bool | None] = []
    turn_line: list[int] = []
    turn_role: list[str | None] = []
    turn_chars: list[int | None] = []
    turn_blank: list[bool] = []
    turn_calls: list[bool | None] = []  # None: no tool calls
    kept: Kept = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        number = lines.start + i
        obj = lines.parsed(i)
        rec_line.append(number)
        messages = None if obj is _INVALID else as_messages(obj)
        rec_json.append(obj is not _INVALID)
        if messages is None:
            rec_shape.append(None if obj is _INVALID else "unknown")
            rec_count.append(None)
            rec_order.append(None)
            continue
        rec_shape.append("chat" if "messages" in obj else "sharegpt" if "conversations" in obj else "instruction")
        rec_count.append(len(messages))
        roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
        calls = [m.get("tool_calls") if isinstance(m, dict) else None for m in messages]
        rec_order.append(_order_ok(roles, [bool(c) for c in calls]))
        for m, role, call in zip(messages, roles, calls):
            content = m.get("content") if isinstance(m, dict) else None
            is_str = isinstance(content, str)
            turn_line.append(number)
            turn_role.append(role if isinstance(role, str) else None)
            if call is not None:  # a tool call's payload is its calls: content may be empty or null
                shape_ok = _tool_calls_ok(call) and role == "assistant" and (content is None or is_str)
                turn_calls.append(shape_ok)
                turn_chars.append((len(content) if is_str else 0) + len(json.dumps(call, ensure_ascii=False)))
                turn_blank.append(False)
                continue
            turn_calls.append(None)
            turn_chars.append(len(content) if is_str else None)
            turn_blank.append(not (is_str and content.strip()))
        kept.append((number, None))
    return {"records": _columns({"line": rec_line, "json_valid": rec_json, "shape": rec_shape,
                                 "n_messages": rec_count, "order_ok": rec_order}),
            "turns": _columns({"line": turn_line, "role": turn_role, "content_chars": turn_chars,
                               "content_blank": turn_blank, "tool_calls_ok": turn_calls})}, kept


def _text_tables(lines: list[str]) -> tuple[dict[str, Any], Kept]:
    """Flatten raw lines into a record table, a text table and the lines of the text records."""
    records: list[dict] = []
    texts: list[dict] = []
    kept: Kept = []
    for number, row, obj in _parsed(lines, {}):
        records.append(row)
        if row["json_valid"] is False:
            continue
        if not isinstance(obj, dict) or "text" not in obj:
            continue
        row["shape"] = "text"
        texts.append(_text_row(number, obj["text"]))
        kept.append((number, None))
    return {"records": _frame(records, ["line", "json_valid", "shape"]),
            "texts": _frame(texts, TEXT_COLUMNS)}, kept


def _text_row(number: int, text: Any) -> dict[str, Any]:
    """A text-table row; a non-string text fails only the string rule."""
    is_str = isinstance(text, str)
    return {"line": number, "text_chars": len(text) if is_str else None,
            "text_blank": not text.strip() if is_str else None}


def _classification_tables(lines: list[str]) -> tuple[dict[str, Any], Kept]:
    """Record, text and label tables (the label, or None when it is not a non-empty string)."""
    def label_row(label: Any) -> dict[str, Any]:
        return {"label": label if isinstance(label, str) and label.strip() else None}

    return _labeled_tables(lines, "classification", label_row, ["label"])


def _regression_tables(lines: list[str]) -> tuple[dict[str, Any], Kept]:
    """Record, text and label tables (whether the label is a number, and whether it is finite)."""
    def label_row(label: Any) -> dict[str, Any]:
        is_number = isinstance(label, (int, float)) and not isinstance(label, bool)
        return {"label_number": is_number, "label_finite": _finite(label) if is_number else None}

    return _labeled_tables(lines, "regression", label_row, ["label_number", "label_finite"])


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _labeled_tables(
    lines: list[str], kind: str, label_row: Callable[[Any], dict[str, Any]], label_columns: list[str]
) -> tuple[dict[str, Any], Kept]:
    """Flatten ``{"text", "label"}`` lines into a record table, a text table, a label table and the records'
    lines and labels."""
    records: list[dict] = []
    texts: list[dict] = []
    labels: list[dict] = []
    kept: Kept = []
    for number, row, obj in _parsed(lines, {}):
        records.append(row)
        if row["json_valid"] is False:
            continue
        if not isinstance(obj, dict) or "text" not in obj or "label" not in obj:
            continue
        row["shape"] = kind
        texts.append(_text_row(number, obj["text"]))
        labels.append({"line": number, **label_row(obj["label"])})
        kept.append((number, obj["label"]))
    return {"records": _frame(records, ["line", "json_valid", "shape"]),
            "texts": _frame(texts, TEXT_COLUMNS),
            "labels": _frame(labels, ["line", *label_columns])}, kept


def _preference_tables(lines: list[str]) -> tuple[dict[str, Any], Kept]:
    """Flatten raw lines into a record table, a pair table (per-field length and blankness) and the pairs' lines."""
    records: list[dict] = []
    pair_rows: list[dict] = []
    kept: Kept = []
    for number, row, obj in _parsed(lines, {}):
        records.append(row)
        if row["json_valid"] is False:
            continue
        if not isinstance(obj, dict) or not all(field in obj for field in PAIR_FIELDS):
            continue
        row["shape"] = "preference"
        pair_row = _field_row(number, {field: obj[field] for field in PAIR_FIELDS})
        chosen, rejected = obj["chosen"], obj["rejected"]
        both = isinstance(chosen, str) and isinstance(rejected, str)
        pair_row["distinct"] = chosen.strip() != rejected.strip() if both else None
        pair_rows.append(pair_row)
        kept.append((number, None))
    columns = ["line", *(f"{field}_{c}" for field in PAIR_FIELDS for c in ("chars", "blank")), "distinct"]
    return {"records": _frame(records, ["line", "json_valid", "shape"]), "pairs": _frame(pair_rows, columns)}, kept


def _field_row(number: int, values: dict[str, Any]) -> dict[str, Any]:
    """A pair-table row: each field's length and blankness (None for a value that is not a string)."""
    row: dict[str, Any] = {"line": number}
    for field, value in values.items():
        is_str = isinstance(value, str)  # a non-string fails only its string rule
        row[f"{field}_chars"] = len(value) if is_str else None
        row[f"{field}_blank"] = not value.strip() if is_str else None
    return row


def _seq2seq_tables(lines: list[str]) -> tuple[dict[str, Any], Kept]:
    """Flatten raw lines into a record table and a pair table (input and target length and blankness)."""
    records: list[dict] = []
    pair_rows: list[dict] = []
    kept: Kept = []
    for number, row, obj in _parsed(lines, {}):
        records.append(row)
        if row["json_valid"] is False or (pair := seq2seq_pair(obj)) is None:
            continue
        row["shape"] = "seq2seq"
        pair_rows.append(_field_row(number, dict(zip(SEQ2SEQ_FIELDS, pair))))
        kept.append((number, None))
    columns = ["line", *(f"{field}_{c}" for field in SEQ2SEQ_FIELDS for c in ("chars", "blank"))]
    return {"records": _frame(records, ["line", "json_valid", "shape"]), "pairs": _frame(pair_rows, columns)}, kept


def _prompt_tables(lines: list[str]) -> tuple[dict[str, Any], Kept]:
    """Flatten raw lines into a record table, a prompt table (prompt length and blankness, the answer's
    shape) and the prompt records' lines."""
    records: list[dict] = []
    prompt_rows: list[dict] = []
    kept: Kept = []
    for number, row, obj in _parsed(lines, {}):
        records.append(row)
        if row["json_valid"] is False:
            continue
        if not isinstance(obj, dict) or "prompt" not in obj or {"chosen", "rejected"} & obj.keys():
            continue
        row["shape"] = "prompt"
        prompt, answer = obj["prompt"], obj.get("answer")
        is_str = isinstance(prompt, str)
        prompt_rows.append({"line": number, "prompt_chars": len(prompt) if is_str else None,
                            "prompt_blank": not prompt.strip() if is_str else None,
                            "answer_ok": answer is None or (isinstance(answer, str) and bool(answer.strip()))})
        kept.append((number, None))
    return {"records": _frame(records, ["line", "json_valid", "shape"]),
            "prompts": _frame(prompt_rows, ["line", "prompt_chars", "prompt_blank", "answer_ok"])}, kept


# C0 controls other than whitespace (tab, newline, VT, form feed, CR), DEL and the C1 controls.
_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f]")
# What a JSON line that decodes to such a character must contain: the character itself or an
# escape of it (\\uXXXX, or \\b for backspace). A line without any is control-free without parsing.
_MAYBE_CONTROL = re.compile(_CONTROL.pattern + r"|\\(?:u00(?:0[0-8]|0[eEfF]|1[0-9a-fA-F]|7[fF]|[89][0-9a-fA-F])|b)")


def _has_control(value: Any) -> bool:
    """A control character other than whitespace (tab, newline, CR, VT, form feed) in the string values."""
    if isinstance(value, str):
        return _CONTROL.search(value) is not None
    if isinstance(value, dict):
        return any(_has_control(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_control(v) for v in value)
    return False


def _strict_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _line_table(raw_lines: list[bytes], lines: list[str]) -> Any:
    """Per non-blank line: valid UTF-8, and free of control characters (raw or JSON-escaped)."""
    numbers: list[int] = []
    utf8: list[bool] = []
    control_free: list[bool] = []
    lines = lines if isinstance(lines, Lines) else Lines(lines)
    maybe_control = _MAYBE_CONTROL.search
    for i, (raw, line) in enumerate(zip(raw_lines, lines)):
        if not line.strip():
            continue
        numbers.append(lines.start + i)
        utf8.append("\ufffd" not in line or _strict_utf8(raw))  # decoded with errors="replace"
        free = True
        # A printable line holds no control character itself (C0, DEL and C1 are not printable):
        # then only an escape of one can, and both escapes start with a backslash.
        if ("\\u00" in line or "\\b" in line or not line.isprintable()) and maybe_control(line):
            parsed = lines.parsed(i)
            free = not _has_control(line.rstrip("\r") if parsed is _INVALID else parsed)
        control_free.append(free)
    return _columns({"line": numbers, "utf8_valid": utf8, "control_free": control_free})


def line_rules() -> list[Rule]:
    import great_expectations as gx

    E = gx.expectations
    return [
        Rule("line is valid UTF-8", "lines", E.ExpectColumnValuesToBeInSet(column="utf8_valid", value_set=[True])),
        Rule("no control characters (other than whitespace)", "lines",
             E.ExpectColumnValuesToBeInSet(column="control_free", value_set=[True])),
    ]


def _parsed(lines: list[str], extra: dict[str, Any]) -> Iterator[tuple[int, dict[str, Any], Any]]:
    """Each non-blank line as (line number, its record-table row, the parsed JSON or None)."""
    lines = lines if isinstance(lines, Lines) else Lines(lines)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        row = {"line": lines.start + i, "json_valid": True, "shape": "unknown", **extra}
        obj = lines.parsed(i)
        if obj is _INVALID:
            row["json_valid"], row["shape"], obj = False, None, None
        yield lines.start + i, row, obj


def _frame(rows: list[dict], columns: list[str]) -> Any:
    import pandas as pd

    return pd.DataFrame(rows, columns=columns)


def _columns(columns: dict[str, list]) -> Any:
    """``_frame`` from columns: the same frame (dtypes included) without a dict per row."""
    import pandas as pd

    if not next(iter(columns.values())):
        return _frame([], list(columns))  # no rows: object columns, as _frame makes them
    return pd.DataFrame(columns)


# ShareGPT speakers -> chat roles; another speaker keeps no role and fails the roles rule.
def _order_ok(roles: list[Any], tool_calls: list[bool] | None = None) -> bool:
    """Optional leading system message, then user/assistant alternating, ending with assistant. An
    assistant message with tool calls is followed by one or more tool results, then by the assistant again."""
    calls = tool_calls or [False] * len(roles)
    start = 1 if roles[:1] == ["system"] else 0
    state = "user"  # what comes next: user, assistant, tool (at least one), tool+ (tool or assistant), or end
    for role, called in zip(roles[start:], calls[start:]):
        if state in ("user", "end") and role == "user":
            state = "assistant"
        elif state in ("assistant", "tool+") and role == "assistant":
            state = "tool" if called else "end"
        elif state in ("tool", "tool+") and role == "tool":
            state = "tool+"
        else:
            return False
    return state == "end"


def _tool_calls_ok(calls: Any) -> bool:
    """OpenAI tool calls: a non-empty list of {"function": {"name": str, "arguments": str | object}}."""
    return isinstance(calls, list) and bool(calls) and all(
        isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)
        and bool(c["function"]["name"]) and isinstance(c["function"].get("arguments", ""), (str, dict))
        for c in calls)


def chat_rules(cfg: ValidateConfig) -> list[Rule]:
    import great_expectations as gx

    E = gx.expectations
    return [
        Rule("line is valid JSON", "records", E.ExpectColumnValuesToBeInSet(column="json_valid", value_set=[True])),
        Rule("record is a chat, instruction or ShareGPT record", "records",
             E.ExpectColumnValuesToBeInSet(column="shape", value_set=["chat", "instruction", "sharegpt"])),
        Rule(f"at least {cfg.min_messages} messages", "records",
             E.ExpectColumnValuesToBeBetween(column="n_messages", min_value=cfg.min_messages)),
        Rule("roles alternate user/assistant and end with assistant", "records",
             E.ExpectColumnValuesToBeInSet(column="order_ok", value_set=[True])),
        Rule("role is present", "turns", E.ExpectColumnValuesToNotBeNull(column="role")),
        Rule(f"role is one of {', '.join(cfg.allowed_roles)}", "turns",
             E.ExpectColumnValuesToBeInSet(column="role", value_set=list(cfg.allowed_roles))),
        Rule("content is a string (not null)", "turns", E.ExpectColumnValuesToNotBeNull(column="content_chars")),
        Rule("content is not empty or blank", "turns",
             E.ExpectColumnValuesToBeInSet(column="content_blank", value_set=[False])),
        Rule(f"content length between {cfg.min_chars} and {cfg.max_chars} characters", "turns",
             E.ExpectColumnValuesToBeBetween(column="content_chars", min_value=cfg.min_chars, max_value=cfg.max_chars)),
        Rule('tool calls are assistant turns of {"function": {"name", "arguments"}}', "turns",
             E.ExpectColumnValuesToBeInSet(column="tool_calls_ok", value_set=[True])),
    ]


def text_rules(cfg: ValidateConfig) -> list[Rule]:
    import great_expectations as gx

    E = gx.expectations
    return [
        Rule("line is valid JSON", "records", E.ExpectColumnValuesToBeInSet(column="json_valid", value_set=[True])),
        Rule('record is a text record with a "text" field', "records",
             E.ExpectColumnValuesToBeInSet(column="shape", value_set=["text"])),
        *_text_field_rules(cfg),
    ]


def _text_field_rules(cfg: ValidateConfig) -> list[Rule]:
    """The text table's rules, shared by text, classification and regression records."""
    import great_expectations as gx

    E = gx.expectations
    return [
        Rule("text is a string (not null)", "texts", E.ExpectColumnValuesToNotBeNull(column="text_chars")),
        Rule("text is not empty or blank", "texts",
             E.ExpectColumnValuesToBeInSet(column="text_blank", value_set=[False])),
        Rule(f"text length between {cfg.min_chars} and {cfg.max_text_chars} characters", "texts",
             E.ExpectColumnValuesToBeBetween(column="text_chars", min_value=cfg.min_chars,
                                             max_value=cfg.max_text_chars)),
    ]


def classification_rules(cfg: ValidateConfig) -> list[Rule]:
    import great_expectations as gx

    E = gx.expectations
    rules = [
        Rule("line is valid JSON", "records", E.ExpectColumnValuesToBeInSet(column="json_valid", value_set=[True])),
        Rule('record is a classification record with "text" and "label" fields', "records",
             E.ExpectColumnValuesToBeInSet(column="shape", value_set=["classification"])),
        *_text_field_rules(cfg),
        Rule("label is a non-empty string", "labels", E.ExpectColumnValuesToNotBeNull(column="label")),
    ]
    if cfg.labels is not None:
        rules.append(Rule(f"label is one of {', '.join(cfg.labels)}", "labels",
                          E.ExpectColumnValuesToBeInSet(column="label", value_set=list(cfg.labels))))
    rules.append(Rule("at least 2 distinct labels", "labels",
                      E.ExpectColumnUniqueValueCountToBeBetween(column="label", min_value=2)))
    return rules


def regression_rules(cfg: ValidateConfig) -> list[Rule]:
    import great_expectations as gx

    E = gx.expectations
    return [
        Rule("line is valid JSON", "records", E.ExpectColumnValuesToBeInSet(column="json_valid", value_set=[True])),
        Rule('record is a regression record with "text" and "label" fields', "records",
             E.ExpectColumnValuesToBeInSet(column="shape", value_set=["regression"])),
        *_text_field_rules(cfg),
        Rule("label is a number (not a string or bool)", "labels",
             E.ExpectColumnValuesToBeInSet(column="label_number", value_set=[True])),
        Rule("label is finite (not NaN or infinity)", "labels",
             E.ExpectColumnValuesToBeInSet(column="label_finite", value_set=[True])),
    ]


def preference_rules(cfg: ValidateConfig) -> list[Rule]:
    import great_expectations as gx

    E = gx.expectations
    rules = [
        Rule("line is valid JSON", "records", E.ExpectColumnValuesToBeInSet(column="json_valid", value_set=[True])),
        Rule('record is a preference record with "prompt", "chosen" and "rejected" fields', "records",
             E.ExpectColumnValuesToBeInSet(column="shape", value_set=["preference"])),
        *_field_rules(cfg, PAIR_FIELDS),
    ]
    rules.append(Rule("chosen differs from rejected", "pairs",
                      E.ExpectColumnValuesToBeInSet(column="distinct", value_set=[True])))
    return rules


def _field_rules(cfg: ValidateConfig, fields: tuple[str, ...]) -> list[Rule]:
    """Each field of the pair table: a string, not blank, within min_chars..max_chars."""
    import great_expectations as gx

    E = gx.expectations
    rules = []
    for field in fields:
        rules += [
            Rule(f"{field} is a string (not null)", "pairs", E.ExpectColumnValuesToNotBeNull(column=f"{field}_chars")),
            Rule(f"{field} is not empty or blank", "pairs",
                 E.ExpectColumnValuesToBeInSet(column=f"{field}_blank", value_set=[False])),
            Rule(f"{field} length between {cfg.min_chars} and {cfg.max_chars} characters", "pairs",
                 E.ExpectColumnValuesToBeBetween(column=f"{field}_chars", min_value=cfg.min_chars,
                                                 max_value=cfg.max_chars)),
        ]
    return rules


def seq2seq_rules(cfg: ValidateConfig) -> list[Rule]:
    import great_expectations as gx

    E = gx.expectations
    return [
        Rule("line is valid JSON", "records", E.ExpectColumnValuesToBeInSet(column="json_valid", value_set=[True])),
        Rule('record is a seq2seq record with "input" and "target" fields (or a chat ending with the answer)',
             "records", E.ExpectColumnValuesToBeInSet(column="shape", value_set=["seq2seq"])),
        *_field_rules(cfg, SEQ2SEQ_FIELDS),
    ]


def prompt_rules(cfg: ValidateConfig) -> list[Rule]:
    import great_expectations as gx

    E = gx.expectations
    return [
        Rule("line is valid JSON", "records", E.ExpectColumnValuesToBeInSet(column="json_valid", value_set=[True])),
        Rule('record is a prompt record with a "prompt" field (and no "chosen"/"rejected")', "records",
             E.ExpectColumnValuesToBeInSet(column="shape", value_set=["prompt"])),
        Rule("prompt is a string (not null)", "prompts", E.ExpectColumnValuesToNotBeNull(column="prompt_chars")),
        Rule("prompt is not empty or blank", "prompts",
             E.ExpectColumnValuesToBeInSet(column="prompt_blank", value_set=[False])),
        Rule(f"prompt length between {cfg.min_chars} and {cfg.max_chars} characters", "prompts",
             E.ExpectColumnValuesToBeBetween(column="prompt_chars", min_value=cfg.min_chars, max_value=cfg.max_chars)),
        Rule("answer, when given, is a non-blank string", "prompts",
             E.ExpectColumnValuesToBeInSet(column="answer_ok", value_set=[True])),
    ]


# Per record kind: the table builder (raw lines -> GX tables and the kept records' lines and labels)
# and the suite's rules.
SUITES: dict[str, tuple[Callable[[list[str]], tuple[dict[str, Any], Kept]], Callable[[ValidateConfig], list[Rule]]]] = {
    "chat": (_chat_tables, chat_rules),
    "text": (_text_tables, text_rules),
    "classification": (_classification_tables, classification_rules),
    "regression": (_regression_tables, regression_rules),
    "preference": (_preference_tables, preference_rules),
    "prompt": (_prompt_tables, prompt_rules),
    "seq2seq": (_seq2seq_tables, seq2seq_rules),
}


def run_suite(suite_rules: list[Rule], frames: dict[str, Any], pages: dict[str, str] | None = None,
              every_line: bool = False) -> dict[str, Any]:
    """Run each table's rules on its frame; the report holds counts and line numbers only.

    With ``every_line``, each failing rule's entry also lists all its failing line numbers
    (``failing_lines``: what a drop policy quarantines), not only the first examples.

    With ``pages``, each table's result is also rendered as a Great Expectations data-docs
    page (HTML; the frames hold derived columns only, and unexpected values are excluded).
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # no "Calculating Metrics" bars on stderr
    source = context.data_sources.add_pandas("tuneline")
    results: list[dict[str, Any]] = []
    for table, frame in frames.items():
        table_rules = [r for r in suite_rules if r.table == table]
        for rule in table_rules:
            rule.expectation.meta = {"rule": rule.name}
        suite = gx.ExpectationSuite(name=f"tuneline-{table}", expectations=[r.expectation for r in table_rules])
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all").get_batch(
            batch_parameters={"dataframe": frame.reset_index(drop=True)}
        )
        outcome = batch.validate(suite, result_format={
            "result_format": "COMPLETE" if every_line else "SUMMARY", "exclude_unexpected_values": True,
            "partial_unexpected_count": 10 * EXAMPLES,
        })
        if pages is not None:
            pages[table] = data_docs_page(outcome)
        for rule, result in zip(table_rules, _match(table_rules, outcome.results)):
            stats = result.result
            index = stats.get("partial_unexpected_index_list") or []
            entry = {
                "rule": rule.name,
                "table": table,
                "expectation": result.expectation_config.type,
                "success": bool(result.success),
                "element_count": int(stats.get("element_count", len(frame))),
                "unexpected_count": int(stats.get("unexpected_count") or 0),
                "example_lines": sorted({int(frame["line"].iloc[i]) for i in index})[:EXAMPLES],
            }
            if every_line and not result.success:
                failing = stats.get("unexpected_index_list") or []
                entry["failing_lines"] = sorted({int(frame["line"].iloc[i]) for i in failing
                                                 if isinstance(i, (int, numbers.Integral))})
            observed = stats.get("observed_value")  # whole-table rules: a count, kept only when it is a number
            if isinstance(observed, numbers.Real) and not isinstance(observed, bool):
                entry["observed_value"] = observed.item() if hasattr(observed, "item") else observed
            results.append(entry)
    # GX keeps the newest context as the project context, and with it the last batch's frames: an
    # empty one in its place lets them go.
    gx.get_context(mode="ephemeral")
    return {"success": all(r["success"] for r in results), "rules": results}


def data_docs_page(outcome: Any) -> str:
    """One validation result as a GX data-docs HTML page."""
    from great_expectations.render.renderer import ValidationResultsPageRenderer

    return _page_view().render(ValidationResultsPageRenderer().render(outcome))


@functools.cache
def _page_view() -> Any:
    """GX's page view, made once per process: each one has its own Jinja environment, which
    compiles GX's ~70 templates again on first use (~0.5 CPU-s per validation otherwise)."""
    from great_expectations.render.view import DefaultJinjaPageView

    return DefaultJinjaPageView()


def _match(table_rules: list[Rule], results: list[Any]) -> list[Any]:
    """GX returns results in its own order: pair them with our rules by the rule name in `meta`."""
    by_rule = {r.expectation_config.meta["rule"]: r for r in results}
    return [by_rule[rule.name] for rule in table_rules]
