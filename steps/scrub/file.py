"""The scrubber on its own, for users who only need PII removal on a JSONL file:

    tuneline scrub --input in.jsonl --output out.jsonl --field text [--field messages] [--action hash]

Streams line by line (memory stays flat whatever the file size), keeps every other field
and the record order, and normalizes + redacts the named fields exactly as the pipeline's
scrub step does (``steps.text.pii``). A field may hold a string, or a list of chat messages
whose ``content`` strings are scrubbed. Blank lines are kept as they are. Found PII becomes
what the engine's action says (``--action``): a typed placeholder ``<EMAIL>``, a salted hash
``<EMAIL:1a2b3c4d5e6f>`` (salt from ``TUNELINE_PII_SALT``, never written; the stats carry
its non-reversible ``salt_id``) or a mask.

Bad input stops the run with the file, line and rule (not JSON, not an object, a named
field missing or of the wrong type) and leaves no output file: output is written to a
temporary file next to the target and renamed only when every line passed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from steps.core.errors import DataQualityError
from steps.text.normalize import normalize_text
from steps.text.pii import PiiEngine


def scrub_value(value: Any, engine: PiiEngine, counts: Counter[str]) -> Any | None:
    """The scrubbed value, or None when it is neither a string nor a list of messages."""

    def clean(text: str) -> str:
        text, found = engine.redact(normalize_text(text))
        counts.update(found)
        return text

    if isinstance(value, str):
        return clean(value)
    if isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in value):
        return [{**m, "content": clean(m["content"])} for m in value]
    return None


def scrub_lines(lines: Iterable[bytes], fields: list[str], engine: PiiEngine, origin: str,
                counts: Counter[str]) -> Iterable[str]:
    """Scrubbed JSONL lines, one per input line; raises DataQualityError naming the line and rule."""
    for number, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataQualityError(f"{origin}:{number}: rule 'line is valid UTF-8': byte {exc.start}") from None
        if not line.strip():
            yield line if line.endswith("\n") else line + "\n"
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataQualityError(f"{origin}:{number}: rule 'line is valid JSON': {exc.msg}") from None
        if not isinstance(record, dict):
            raise DataQualityError(f"{origin}:{number}: rule 'record is a JSON object'")
        for field in fields:
            if field not in record:
                raise DataQualityError(f"{origin}:{number}: rule 'field {field!r} is present'")
            scrubbed = scrub_value(record[field], engine, counts)
            if scrubbed is None:
                raise DataQualityError(f"{origin}:{number}: rule 'field {field!r} is a string or a list of "
                                       f"messages with string content'")
            record[field] = scrubbed
        yield json.dumps(record, ensure_ascii=False) + "\n"


def scrub_file(source: Path, target: Path, fields: list[str], engine: PiiEngine | None = None) -> dict[str, Any]:
    """Scrub ``source`` into ``target`` atomically; returns line and per-entity counts (and the salt id)."""
    engine = engine or PiiEngine()
    counts: Counter[str] = Counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    lines = 0
    try:
        with open(source, "rb") as reader, os.fdopen(handle, "w", encoding="utf-8") as writer:
            for out in scrub_lines(reader, fields, engine, str(source), counts):
                writer.write(out)
                lines += 1
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return {"lines": lines, "pii": {entity: counts.get(entity, 0) for entity in engine.entities},
            "salt_id": engine.salt_id}
