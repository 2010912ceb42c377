"""Bad inputs: every file of a corpus of broken JSONL (tests/reliability/corpus/, plus a 10 MB
record generated here) stops the whole flow with an error naming the file, the line (or
record) and the rule, without raw contents; nothing is registered, and the store holds
nothing of the run but the raw copy (and, for a scrub-level rule, validate's unscrubbed
records, which belong to the raw area).

The flow runs in-process against a temporary Prefect API (a failure at ingest, validate or
scrub costs a few seconds); one case also goes through the `tuneline` command in a
subprocess to prove the exit code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from flows.cli import DEFAULT_PARAMS
from reliability_report import record_figures
from steps.config import PipelineParams

pytestmark = pytest.mark.services
CORPUS = Path(__file__).parent / "corpus"
TINY = DEFAULT_PARAMS.with_name("tiny.yaml")
CLASSIFY = ["validate.record_kind=classification", "base_model.source=tiny-random-bert"]
HUGE_CHARS = 10 * 1024 * 1024


@dataclass(frozen=True)
class Case:
    file: str
    step: str  # the step whose rule stops the run
    rules: dict[str, str]  # rule -> the evidence the message must hold (count and example lines or records)
    rejected: int  # records (lines) the rules reject
    contents: tuple[str, ...]  # raw values that must not appear in the message
    overrides: list[str] = field(default_factory=list)


CASES = [
    Case("malformed_json.jsonl", "validate",
         {"line is valid JSON": "3 of 11 records fail (e.g. lines 3, 6, 8)"}, 3, ("cut off", "python repr")),
    Case("invalid_utf8.jsonl", "validate",
         {"line is valid UTF-8": "2 of 5 lines fail (e.g. lines 2, 4)"}, 2, ("caf", "cut")),
    Case("empty.jsonl", "ingest", {"non-empty input": "the file holds no records"}, 0, ()),
    Case("missing_fields.jsonl", "validate",
         {"record is a chat, instruction or ShareGPT record": "1 of 9 records fail (e.g. lines 2)",
          "role is present": "1 of 16 turns fail (e.g. lines 6)",
          "content is a string (not null)": "1 of 16 turns fail (e.g. lines 4)"}, 3, ("no-messages", "who am I")),
    Case("wrong_role_order.jsonl", "validate",
         {"roles alternate user/assistant and end with assistant": "3 of 9 records fail (e.g. lines 3, 5, 7)"}, 3,
         ("I speak first", "unanswered")),
    Case("empty_assistant.jsonl", "validate",
         {"content is not empty or blank": "3 of 16 turns fail (e.g. lines 2, 4, 5)",
          "content is a string (not null)": "1 of 16 turns fail (e.g. lines 5)"}, 3, ("Say something", "Anything?")),
    Case("huge_record.jsonl", "validate",
         {"content length between 1 and 4000 characters": "1 of 2 turns fail (e.g. lines 1)"}, 1,
         ("Summarize", "lorem")),
    Case("all_duplicates.jsonl", "scrub",
         {"at most 90% of records are duplicates":
          "19 of 20 records (95.0%) repeat an earlier record (exactly or nearly) (e.g. records line-2, line-3, "
          "line-4, line-5, line-6)"}, 19, ("reset my password", "Security")),
    Case("all_pii.jsonl", "scrub",
         {"at most 50% of records are nothing but PII":
          "8 of 8 records (100.0%) hold no letter once PII is replaced (e.g. records line-1, line-2, line-3, "
          "line-4, line-5)"}, 8, ("jane.doe", "010-2345-6789", "4111", "192.0.2.44")),
    Case("wrong_label_types.jsonl", "validate",
         {"label is a non-empty string": "5 of 8 labels fail (e.g. lines 2, 4, 5, 7, 8)"}, 5, ("striker", "tech"),
         CLASSIFY),
]


def source_file(case: Case, tmp_path: Path) -> Path:
    """The corpus file; the 10 MB record is generated (not committed)."""
    if case.file != "huge_record.jsonl":
        return CORPUS / case.file
    words = "lorem ipsum " * (HUGE_CHARS // 12)
    record = {"messages": [{"role": "user", "content": "Summarize: " + words}, {"role": "assistant", "content": "No."}]}
    path = tmp_path / case.file
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    return path


def run_args(source: Path, prefix: str, model: str, overrides: list[str]) -> list[str]:
    return [f"ingest.source={source}", f"artifacts_prefix={prefix}", f"register.model_name={model}", *overrides]


def assert_nothing_kept_but_the_raw_area(store, source: Path, step: str) -> None:
    """Only ingest's raw copy (byte for byte) and, past validation, validate's records exist under the prefix."""
    keys = store.list_keys(store.prefix + "/")
    steps = {k[len(store.prefix) + 1:].split("/", 1)[0] for k in keys}
    expected = {"ingest": set(), "validate": {"ingest"}, "scrub": {"ingest", "validate"}}[step]
    assert steps == expected, keys
    if "ingest" in steps:
        raw = next(k for k in keys if k.startswith(f"{store.prefix}/ingest/") and k.endswith("/raw.jsonl"))
        assert store.get_bytes(raw) == source.read_bytes()


def assert_nothing_registered(model: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    assert client.search_model_versions(f"name = '{model}'") == []
    assert client.search_registered_models(f"name = '{model}'") == []


@pytest.mark.parametrize("case", CASES, ids=[c.file.removesuffix(".jsonl") for c in CASES])
def test_a_bad_file_stops_the_flow_naming_file_line_and_rule(case, prefect_api, store, tmp_path):
    from flows.pipeline import finetune
    from steps.core.errors import DataQualityError

    source = source_file(case, tmp_path)
    model = f"bad-{uuid.uuid4().hex[:8]}"
    params = PipelineParams.from_yaml(TINY, run_args(source, store.prefix, model, case.overrides))
    started = time.perf_counter()
    state = finetune(params, return_state=True)
    seconds = time.perf_counter() - started
    assert state.is_failed(), state
    error = state.result(raise_on_failure=False)
    assert isinstance(error, DataQualityError), repr(error)
    message = str(error)
    assert str(source) in message, message
    for rule, evidence in case.rules.items():
        assert f"rule '{rule}': {evidence}" in message, message
    for value in case.contents:
        assert value not in message, value
    assert_nothing_kept_but_the_raw_area(store, source, case.step)
    assert_nothing_registered(model)
    lines = source.read_bytes().count(b"\n")
    record_figures("bad_inputs", case.file, {
        "lines": lines, "records_rejected": case.rejected, "step": case.step, "rules": sorted(case.rules),
        "bytes": source.stat().st_size, "seconds_to_fail": round(seconds, 2),
    })


def test_the_tuneline_command_exits_2_with_the_message_and_registers_nothing(prefect_api, store):
    """The same contract through the installed command in its own process."""
    from prefect.settings import PREFECT_API_URL

    source = CORPUS / "wrong_role_order.jsonl"
    model = f"bad-cli-{uuid.uuid4().hex[:8]}"
    command = Path(sys.executable).with_name("tuneline")
    args = [str(command), "run", "--params", str(TINY)]
    for override in run_args(source, store.prefix, model, []):
        args += ["--set", override]
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    started = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - started
    assert done.returncode == 2, done.stderr[-3000:]
    assert (f"error: validation failed for {source} as chat records: 1 of 12 rules broken\n"
            "  - rule 'roles alternate user/assistant and end with assistant': 3 of 9 records fail "
            "(e.g. lines 3, 5, 7)") in done.stderr
    assert "I speak first" not in done.stdout + done.stderr
    assert_nothing_kept_but_the_raw_area(store, source, "validate")
    assert_nothing_registered(model)
    record_figures("bad_inputs", "cli_subprocess", {"file": source.name, "exit_code": done.returncode,
                                                    "seconds": round(seconds, 2)})
