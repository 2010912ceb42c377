"""Record formats: which one a file's records are in (``ingest.format: auto``: detected from their fields),
and the column mapping (``ingest.columns``) that renames a user's fields to the format's.

    detect_format(lines, "auto", origin)   # -> "sharegpt", or a ConfigError naming the candidates
    rewrite_record(line, {"text": "review"})  # -> the line with "review" renamed "text"

Formats and the fields that tell them apart (FORMAT_KINDS in steps/core/contract.py gives each one's
record kind): messages ``messages``; sharegpt ``conversations``; alpaca ``instruction`` with
``output`` or ``response``; seq2seq ``input`` and ``target`` (without ``instruction``);
preference ``prompt``, ``chosen`` and ``rejected``; prompt ``prompt`` without
``chosen``/``rejected`` (``answer`` optional); classification
``text`` with a string ``label``; regression ``text`` with a numeric ``label``; text ``text`` alone.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Iterable

from steps.core.contract import FORMAT_KINDS, PINNED_SPLIT
from steps.core.errors import ConfigError

SAMPLE = 1000  # records read to detect the format


def formats_of(record: Any) -> set[str]:
    """The formats whose fields ``record`` has."""
    if not isinstance(record, dict):
        return set()
    found = set()
    if "messages" in record:
        found.add("messages")
    if "conversations" in record:
        found.add("sharegpt")
    if "instruction" in record and ("output" in record or "response" in record):
        found.add("alpaca")
    if {"input", "target"} <= record.keys() and "instruction" not in record:
        found.add("seq2seq")
    if {"prompt", "chosen", "rejected"} <= record.keys():
        found.add("preference")
    elif "prompt" in record and not {"chosen", "rejected"} & record.keys():
        found.add("prompt")
    if "text" in record:
        label = record.get("label")
        if "label" not in record:
            found.add("text")
        elif isinstance(label, (int, float)) and not isinstance(label, bool):
            found.add("regression")
        else:
            found.add("classification")
    return found


def detect_format(lines: Iterable[bytes], declared: str, origin: str) -> str:
    """``declared``, or (auto) the format of most of the first SAMPLE records. A record that fits formats
    of several record kinds, or a tie between kinds, is ambiguous: a ConfigError listing the candidates."""
    if declared != "auto":
        return declared
    counts: Counter[str] = Counter()
    fields: Counter[str] = Counter()
    seen = 0
    for number, line in enumerate(lines, start=1):
        if seen == SAMPLE:
            break
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        seen += 1
        found = formats_of(record)
        if len({FORMAT_KINDS[f] for f in found}) > 1:
            raise ConfigError(f"ingest.format auto: {origin} line {number} fits several record formats "
                              f"({', '.join(sorted(found))}): set ingest.format to one of them")
        counts.update(found)
        if isinstance(record, dict):
            fields.update(record.keys())
    if not counts:
        seen_fields = ", ".join(name for name, _ in fields.most_common(12)) or "none (no JSON objects)"
        raise ConfigError(f"ingest.format auto: no known record format in the first {seen} records of {origin} "
                          f"(fields: {seen_fields}); formats: {', '.join(FORMAT_KINDS)}; rename your fields with "
                          "ingest.columns, e.g. {text: review, label: stars}")
    best = counts.most_common(1)[0][1]
    top = sorted(f for f, n in counts.items() if n == best)
    if len({FORMAT_KINDS[f] for f in top}) > 1:
        raise ConfigError(f"ingest.format auto: the records of {origin} are as often one format as another "
                          f"({', '.join(f'{f}: {counts[f]}' for f in top)}): set ingest.format")
    return top[0]


def rewrite_record(line: bytes, columns: dict[str, str], split: str | None = None) -> bytes:
    """The JSON line with each ``columns`` value (the user's field) renamed to its key (the format's field)
    and, for a pinned source, its ``split`` side under ``PINNED_SPLIT``; a line that is not a JSON object
    is kept as it is (validate reports it)."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return line
    if not isinstance(record, dict):
        return line
    for target, field in columns.items():
        if field in record:
            record[target] = record.pop(field)
    if split is not None:
        record[PINNED_SPLIT] = split
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
