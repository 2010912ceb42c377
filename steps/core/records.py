"""Records in their kind's form, read from ingest's raw file: what validate checks and scrub reads.

    for record in validated_records(store, validated):   # a validate artifact
        ...  # {"id", "messages"} / {"id", "text"} / {"id", "text", "label"} / {"id", "input", "target"}
             # / {"id", "prompt", "chosen", "rejected"} / {"id", "prompt", "answer"?}

Validate writes no copy of the records (the raw area is ingest's file only): its artifact names the raw
file (``raw`` in its stats) and the lines it quarantined; ``validated_records`` streams the raw file,
leaves out blank and quarantined lines, and converts each record with ``record_form``.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

from steps.core.contract import PINNED_SPLIT, RAW_FILE
from steps.core.errors import ArtifactError

QUARANTINE_FILE = "quarantine.jsonl"  # validate and scrub: records left out (line, id, rules; never contents)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                  "system": "system", "tool": "tool", "observation": "tool", "function_call": "assistant"}


def as_messages(obj: Any) -> list | None:
    """A chat, ShareGPT or instruction (Alpaca) record's messages, or None when it is none of them."""
    if not isinstance(obj, dict):
        return None
    if "messages" in obj:
        return obj["messages"] if isinstance(obj["messages"], list) else None
    if "conversations" in obj:  # ShareGPT: [{"from": "human" | "gpt" | "system", "value": ...}, ...]
        turns = obj["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            return None
        return [_sharegpt_message(str(t.get("from", "")).lower(), t.get("value")) for t in turns]
    answer = obj.get("response", obj.get("output"))
    if not isinstance(obj.get("instruction"), str) or not isinstance(answer, str):
        return None
    prompt = obj["instruction"] + (f"\n\n{obj['input']}" if obj.get("input") else "")
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    if obj.get("system"):
        messages.insert(0, {"role": "system", "content": obj["system"]})
    return messages


def _sharegpt_message(speaker: str, value: Any) -> dict[str, Any]:
    """A ShareGPT turn as a message; a ``function_call`` turn (a JSON {"name", "arguments"}) becomes an
    assistant message with that tool call (an unreadable one keeps its value as content)."""
    if speaker == "function_call" and isinstance(value, str):
        try:
            call = json.loads(value)
        except json.JSONDecodeError:
            call = None
        if isinstance(call, dict) and "name" in call:
            function = {"name": call["name"], "arguments": call.get("arguments", {})}
            return {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": function}]}
    return {"role": SHAREGPT_ROLES.get(speaker), "content": value}


def seq2seq_pair(obj: Any) -> tuple[Any, Any] | None:
    """A seq2seq record's (input, target): its ``input`` and ``target`` fields, or a chat or instruction record
    whose last message is the assistant's answer (the target) to the messages before it (the input: the user's
    text, after the system prompt when there is one; earlier turns as ``role: content`` lines). None when it
    is neither."""
    if not isinstance(obj, dict):
        return None
    if "target" in obj and "instruction" not in obj:
        return (obj["input"], obj["target"]) if "input" in obj else None
    messages = as_messages(obj)
    if not messages or not all(isinstance(m, dict) for m in messages) or messages[-1].get("role") != "assistant":
        return None
    before = messages[:-1]
    if all(m.get("role") in ("system", "user") for m in before) and sum(m.get("role") == "user" for m in before) == 1:
        texts = [m.get("content") for m in before]
        prompt = "\n\n".join(t for t in texts if isinstance(t, str)) if all(isinstance(t, str) for t in texts) \
            else None
    else:
        prompt = "\n".join(f"{m.get('role')}: {m.get('content')}" for m in before) if before else None
    return prompt, messages[-1].get("content")


def record_id(obj: dict[str, Any], line: int) -> str:
    """The record's id, or ``line-<n>`` when it has none."""
    return str(obj.get("id", f"line-{line}"))


def record_form(obj: dict[str, Any], kind: str, line: int) -> dict[str, Any]:
    """A valid raw record of ``kind`` in the form the later steps read (instruction and ShareGPT records
    as chat messages; text records keep only their text), with ``split`` when ingest pinned its source
    to a side (``PINNED_SPLIT``)."""
    form: dict[str, Any] = {"id": record_id(obj, line)}
    if obj.get(PINNED_SPLIT) in ("train", "eval"):
        form["split"] = obj[PINNED_SPLIT]
    if kind == "chat":
        form["messages"] = as_messages(obj)
    elif kind == "text":
        form["text"] = obj["text"]
    elif kind == "preference":
        form |= {"prompt": obj["prompt"], "chosen": obj["chosen"], "rejected": obj["rejected"]}
    elif kind == "prompt":
        form["prompt"] = obj["prompt"]
        if obj.get("answer") is not None:
            form["answer"] = obj["answer"]
    elif kind == "seq2seq":
        form["input"], form["target"] = seq2seq_pair(obj)  # type: ignore[misc]
    else:
        form |= {"text": obj["text"], "label": obj["label"]}
    return form


def validated_records(store: Any, validated: Any) -> Iterator[dict[str, Any]]:
    """The records a validate artifact passed, in order, in their kind's form (``record_form``), streamed
    from ingest's raw file (checked against the digest validate recorded)."""
    kind = validated.stats["record_kind"]
    for number, line in validated_lines(store, validated):
        yield record_form(json.loads(line), kind, number)


def validated_lines(store: Any, validated: Any) -> Iterator[tuple[int, bytes]]:
    """(line number, raw JSON line) of each record a validate artifact passed, in order: what
    ``validated_records`` parses (worker processes parse them themselves: steps/scrub/step.py)."""
    from steps.core.store import ArtifactRef

    raw_stats = validated.stats.get("raw")
    if not raw_stats:
        raise ArtifactError(f"{validated.key} names no raw file (an artifact of an older validate: run it again)")
    raw = ArtifactRef(step="ingest", key=raw_stats["key"], digest=raw_stats["digest"])
    if store.manifest(raw.key)["digest"] != raw.digest:
        raise ArtifactError(f"{raw.key} does not match the digest validate recorded")
    left_out = set()
    if QUARANTINE_FILE in store.manifest(validated.key)["files"]:
        left_out = {row["line"] for row in store.iter_jsonl(validated, QUARANTINE_FILE) if "line" in row}
    for number, line in enumerate(store.iter_lines(raw, RAW_FILE), start=1):
        if number in left_out or not _filled(line):
            continue
        yield number, line


def _filled(line: bytes) -> bool:
    """Whether a raw line is not blank, as validate numbers them (Unicode whitespace is blank too)."""
    return line.lstrip()[:1] == b"{" or bool(line.decode("utf-8", errors="replace").strip())
