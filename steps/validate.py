"""Validate: a Great Expectations gate on the raw records, chat or plain text.

``ValidateConfig.record_kind`` picks the suite.

chat (supervised fine-tuning): each raw JSONL line becomes one row of a record table
and one row per message of a turn table; the suite checks JSON syntax, record shape,
message count, roles and their order, nulls and content length. Accepted shapes:
- chat: ``{"id"?: str, "messages": [{"role": ..., "content": ...}, ...]}``: an optional
  leading system message, then user/assistant turns alternating, ending with assistant;
- instruction: ``{"id"?: str, "instruction": str, "input"?: str, "response"|"output": str, "system"?: str}``.

text (continued pretraining): each line becomes one row of a record table and, when it
has a ``"text"`` field, one row of a text table; the suite checks JSON syntax, that the
record is ``{"id"?: str, "text": str}``, that the text is a string, not blank, and within
``min_chars``..``max_text_chars``.

Results use ``exclude_unexpected_values`` so reports hold counts and line numbers, never
record contents. A file of the other kind fails the record-shape rule.

Output: ``records.jsonl`` in chat form (``{"id", "messages"}``) or text form
(``{"id", "text"}``), ``report.json``, and ``record_kind`` in the stats, which tells
scrub and tokenize what the records are. A missing id becomes ``line-<n>``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

from steps.config import ValidateConfig
from steps.errors import DataQualityError
from steps.ingest import RAW_FILE
from steps.lineage import run_key
from steps.store import ArtifactStore, DatasetRef

log = logging.getLogger(__name__)

STEP = "validate"
RECORDS_FILE = "records.jsonl"
EXAMPLES = 5


@dataclass(frozen=True)
class Rule:
    name: str
    table: str  # "records", "turns" (chat) or "texts" (text)
    expectation: Any


def validate_records(cfg: ValidateConfig, source: DatasetRef, store: ArtifactStore) -> DatasetRef:
    key = run_key(STEP, cfg, [source.digest])
    if (done := store.lookup(STEP, key)) is not None:
        return DatasetRef(**done.model_dump())
    lines = store.read_bytes(source, RAW_FILE).decode("utf-8", errors="replace").splitlines()
    if cfg.record_kind == "text":
        tables, output = _text_tables(lines)
        suite_rules = text_rules(cfg)
    else:
        tables, output = _chat_tables(lines)
        suite_rules = chat_rules(cfg)
    report = run_suite(suite_rules, tables)
    if not report["success"]:
        broken = [r for r in report["rules"] if not r["success"]]
        detail = "\n".join(
            f"  - rule '{r['rule']}': {r['unexpected_count']} of {r['element_count']} {r['table']} fail"
            f" (e.g. lines {', '.join(map(str, r['example_lines']))})"
            for r in broken
        )
        raise DataQualityError(
            f"validation failed for {source.stats.get('source', source.key)} as {cfg.record_kind} records: "
            f"{len(broken)} of {len(report['rules'])} rules broken\n{detail}"
        )
    writer = store.writer(STEP, key, cfg, inputs=[source])
    writer.put_jsonl(RECORDS_FILE, output)
    writer.put_json("report.json", report)
    log.info("validate: %d %s records pass %d rules", len(output), cfg.record_kind, len(report["rules"]))
    ref = writer.commit(stats={"records": len(output), "rules": len(report["rules"]), "record_kind": cfg.record_kind})
    return DatasetRef(**ref.model_dump())


def _chat_tables(lines: list[str]) -> tuple[dict[str, Any], list[dict]]:
    """Flatten raw lines into a record table, a turn table and the chat-form records."""
    records: list[dict] = []
    turns: list[dict] = []
    chats: list[dict] = []
    # None = "not applicable": a line that is not JSON fails only the JSON rule.
    for number, row, obj in _parsed(lines, {"n_messages": None, "order_ok": None}):
        records.append(row)
        if row["json_valid"] is False:
            continue
        messages = _as_messages(obj)
        if messages is None:
            continue
        row["shape"] = "chat" if "messages" in obj else "instruction"
        row["n_messages"] = len(messages)
        roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
        row["order_ok"] = _order_ok(roles)
        for m, role in zip(messages, roles):
            content = m.get("content") if isinstance(m, dict) else None
            turns.append({
                "line": number,
                "role": role if isinstance(role, str) else None,
                "content_chars": len(content) if isinstance(content, str) else None,
                "content_blank": not (isinstance(content, str) and content.strip()),
            })
        chats.append({"id": str(obj.get("id", f"line-{number}")), "messages": messages})
    return {"records": _frame(records, ["line", "json_valid", "shape", "n_messages", "order_ok"]),
            "turns": _frame(turns, ["line", "role", "content_chars", "content_blank"])}, chats


def _text_tables(lines: list[str]) -> tuple[dict[str, Any], list[dict]]:
    """Flatten raw lines into a record table, a text table and the text-form records."""
    records: list[dict] = []
    texts: list[dict] = []
    documents: list[dict] = []
    for number, row, obj in _parsed(lines, {}):
        records.append(row)
        if row["json_valid"] is False:
            continue
        if not isinstance(obj, dict) or "text" not in obj:
            continue
        row["shape"] = "text"
        text = obj["text"]
        is_str = isinstance(text, str)  # a non-string text fails only the string rule
        texts.append({"line": number, "text_chars": len(text) if is_str else None,
                      "text_blank": not text.strip() if is_str else None})
        documents.append({"id": str(obj.get("id", f"line-{number}")), "text": text})
    return {"records": _frame(records, ["line", "json_valid", "shape"]),
            "texts": _frame(texts, ["line", "text_chars", "text_blank"])}, documents


def _parsed(lines: list[str], extra: dict[str, Any]) -> Iterator[tuple[int, dict[str, Any], Any]]:
    """Each non-blank line as (line number, its record-table row, the parsed JSON or None)."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row = {"line": number, "json_valid": True, "shape": "unknown", **extra}
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            row["json_valid"], row["shape"], obj = False, None, None
        yield number, row, obj


def _frame(rows: list[dict], columns: list[str]) -> Any:
    import pandas as pd

    return pd.DataFrame(rows, columns=columns)


def _as_messages(obj: Any) -> list | None:
    if not isinstance(obj, dict):
        return None
    if "messages" in obj:
        return obj["messages"] if isinstance(obj["messages"], list) else None
    answer = obj.get("response", obj.get("output"))
    if not isinstance(obj.get("instruction"), str) or not isinstance(answer, str):
        return None
    prompt = obj["instruction"] + (f"\n\n{obj['input']}" if obj.get("input") else "")
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    if obj.get("system"):
        messages.insert(0, {"role": "system", "content": obj["system"]})
    return messages


def _order_ok(roles: list[Any]) -> bool:
    """Optional leading system message, then user/assistant alternating, ending with assistant."""
    body = roles[1:] if roles[:1] == ["system"] else roles
    expected = ["user", "assistant"] * (len(body) // 2)
    return bool(body) and body == expected


def chat_rules(cfg: ValidateConfig) -> list[Rule]:
    import great_expectations as gx

    E = gx.expectations
    return [
        Rule("line is valid JSON", "records", E.ExpectColumnValuesToBeInSet(column="json_valid", value_set=[True])),
        Rule("record is a chat or instruction record", "records",
             E.ExpectColumnValuesToBeInSet(column="shape", value_set=["chat", "instruction"])),
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
    ]


def text_rules(cfg: ValidateConfig) -> list[Rule]:
    import great_expectations as gx

    E = gx.expectations
    return [
        Rule("line is valid JSON", "records", E.ExpectColumnValuesToBeInSet(column="json_valid", value_set=[True])),
        Rule('record is a text record with a "text" field', "records",
             E.ExpectColumnValuesToBeInSet(column="shape", value_set=["text"])),
        Rule("text is a string (not null)", "texts", E.ExpectColumnValuesToNotBeNull(column="text_chars")),
        Rule("text is not empty or blank", "texts",
             E.ExpectColumnValuesToBeInSet(column="text_blank", value_set=[False])),
        Rule(f"text length between {cfg.min_chars} and {cfg.max_text_chars} characters", "texts",
             E.ExpectColumnValuesToBeBetween(column="text_chars", min_value=cfg.min_chars,
                                             max_value=cfg.max_text_chars)),
    ]


def run_suite(suite_rules: list[Rule], frames: dict[str, Any]) -> dict[str, Any]:
    """Run each table's rules on its frame; the report holds counts and line numbers only."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
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
            "result_format": "SUMMARY", "exclude_unexpected_values": True, "partial_unexpected_count": 10 * EXAMPLES,
        })
        for rule, result in zip(table_rules, _match(table_rules, outcome.results)):
            stats = result.result
            index = stats.get("partial_unexpected_index_list") or []
            results.append({
                "rule": rule.name,
                "table": table,
                "expectation": result.expectation_config.type,
                "success": bool(result.success),
                "element_count": int(stats.get("element_count", len(frame))),
                "unexpected_count": int(stats.get("unexpected_count") or 0),
                "example_lines": sorted({int(frame["line"].iloc[i]) for i in index})[:EXAMPLES],
            })
    return {"success": all(r["success"] for r in results), "rules": results}


def _match(table_rules: list[Rule], results: list[Any]) -> list[Any]:
    """GX returns results in its own order: pair them with our rules by the rule name in `meta`."""
    by_rule = {r.expectation_config.meta["rule"]: r for r in results}
    return [by_rule[rule.name] for rule in table_rules]
