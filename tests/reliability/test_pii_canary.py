"""PII canary sweep: unique canaries of every entity type are planted in the raw records,
the whole tiny pipeline runs, and then every place the run could have written them is
searched: each S3 object of the bucket outside the raw area (gzip and zip members
opened, token ids of tokenized rows decoded back to text), the MLflow database file (its
artifacts are S3 objects), the Prefect database file, the flow run's logs, flow and task
runs read through the Prefect client, the services' log files and the local artifact
cache. Zero hits is the guarantee.

The raw area is what ingest copied (``<prefix>/ingest/``; validate keeps no copy of the records):
the canaries must be found there, which proves that the search sees them.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import string
import time
import uuid
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

import pytest

from flows.cli import DEFAULT_PARAMS
from helpers import chat, drain_prefect_workers, write_jsonl
from reliability_report import record_figures
from steps.config import PipelineParams

pytestmark = pytest.mark.services
TINY = DEFAULT_PARAMS.with_name("tiny.yaml")
RAW_AREA = ("ingest",)
# entity -> (user turn, assistant turn); {v} is the canary. Each sentence is distinct so that
# no canary record is a (near) duplicate of another and every one reaches training.
SENTENCES = {
    "EMAIL": ("Please send the invoice to {v} before Friday.", "Sure, the invoice goes to {v} by Thursday evening."),
    "PHONE": ("제 휴대폰 번호는 {v}입니다. 연락 주세요.", "알겠습니다, {v} 번호로 내일 오전에 전화드리겠습니다."),
    "CREDIT_CARD": ("Charge my card {v} for the annual plan.", "The annual plan was charged to card {v} successfully."),
    "KR_RRN": ("주민등록번호 {v} 로 본인 확인 부탁드립니다.", "본인 확인이 {v} 번호로 완료되었습니다."),
    "US_SSN": ("My social security number is {v} for the tax form.", "The tax form now lists SSN {v} in box three."),
    "IP_ADDRESS": ("Our office router sits at {v} behind the firewall.", "Then whitelist {v} in the firewall rules."),
    "URL_CREDENTIALS": ("Connect with {v} to read the quarterly reports.", "I used {v} and the reports loaded fine."),
    "SECRET": ("Use the payment key {v} in the checkout service.", "Checkout calls now send {v} to the payment API."),
}


def luhn_digit(body: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch) * (1 if i % 2 else 2)
        total += d - 9 if d > 9 else d
    return str(-total % 10)


def rrn_digit(body: str) -> str:
    return str((11 - sum(int(d) * w for d, w in zip(body, (2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5))) % 11) % 10)


def make_canaries(rng: random.Random) -> dict[str, tuple[str, list[str]]]:
    """entity -> (the planted value, the strings searched for: the value and its other forms)."""
    def digits(n: int) -> str:
        return "".join(rng.choice(string.digits) for _ in range(n))

    def token(n: int) -> str:
        return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(n - 2)) + "a7"

    tag = "".join(rng.choice(string.ascii_lowercase) for _ in range(8))
    email = f"canary.{tag}@mail{digits(4)}.example.com"
    mid, last = digits(4), digits(4)
    card_body = "4" + digits(14)
    card = card_body + luhn_digit(card_body)
    rrn_body = f"{rng.randint(70, 99)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}{rng.choice('12')}{digits(5)}"
    rrn = rrn_body + rrn_digit(rrn_body)
    ssn = f"{rng.randint(100, 665)}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}"
    ip = f"{rng.randint(11, 99)}.{rng.randint(100, 254)}.{rng.randint(100, 254)}.{rng.randint(100, 254)}"
    user, password = f"canary{tag}", f"Pw{token(14)}"
    key = f"sk_live_{token(24)}"
    return {
        "EMAIL": (email, [email, f"canary.{tag}"]),
        "PHONE": (f"010-{mid}-{last}", [f"010-{mid}-{last}", f"{mid}{last}"]),
        "CREDIT_CARD": (" ".join(card[i:i + 4] for i in range(0, 16, 4)), [card, " ".join(card[i:i + 4] for i in range(0, 16, 4))]),
        "KR_RRN": (f"{rrn[:6]}-{rrn[6:]}", [f"{rrn[:6]}-{rrn[6:]}", rrn]),
        "US_SSN": (ssn, [ssn, ssn.replace("-", "")]),
        "IP_ADDRESS": (ip, [ip]),
        "URL_CREDENTIALS": (f"postgres://{user}:{password}@db.example.com:5432/reports", [user, password]),
        "SECRET": (key, [key, key[len("sk_live_"):]]),
    }


def planted_rows(canaries: dict[str, tuple[str, list[str]]]) -> list[dict]:
    rows = [chat(f"What is {i} times two?", f"{i} times two is {2 * i}.") for i in range(48)]
    for entity, (value, _) in canaries.items():
        user, assistant = SENTENCES[entity]
        rows.append(chat(user.format(v=value), assistant.format(v=value)))
    email = canaries["EMAIL"][0]  # a record id is user data too: one carries a canary (scrub redacts ids)
    rows[-1]["id"] = f"ticket-{email}"
    return rows


# --- the search --------------------------------------------------------------------


def readable(name: str, data: bytes, tokenizer) -> Iterator[tuple[str, bytes]]:
    """The bytes of an object as stored, plus what they hold once opened: gzip and zip
    members, and the text of token ids (a leak into tokenized rows is only ids)."""
    yield name, data
    if data[:2] == b"\x1f\x8b":
        yield from readable(f"{name}!gunzip", gzip.decompress(data), tokenizer)
    elif data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for member in archive.namelist():
                yield from readable(f"{name}!{member}", archive.read(member), tokenizer)
    elif name.endswith(".jsonl") and b'"input_ids"' in data[:100_000]:
        texts = []
        for line in data.splitlines():
            row = json.loads(line)
            for field in ("input_ids", "chosen_input_ids", "rejected_input_ids"):
                if isinstance(row.get(field), list):
                    texts.append(tokenizer.decode(row[field]))
        yield f"{name}!decoded", "\n".join(texts).encode("utf-8")


def search(places: Iterable[tuple[str, bytes]], needles: dict[str, list[str]]) -> dict:
    """Places and bytes searched, and (place, entity) for every needle found, case-insensitively.
    Streams: one place in memory at a time."""
    lowered = {entity: [n.lower().encode("utf-8") for n in forms] for entity, forms in needles.items()}
    result: dict = {"places": 0, "bytes": 0, "hits": []}
    for where, data in places:
        result["places"] += 1
        result["bytes"] += len(data)
        low = data.lower()
        result["hits"] += [(where, entity) for entity, forms in lowered.items() if any(f in low for f in forms)]
    return result


def bucket_keys(store) -> list[str]:
    paginator = store.client.get_paginator("list_objects_v2")
    return [item["Key"] for page in paginator.paginate(Bucket=store.bucket) for item in page.get("Contents", [])]


def objects(store, keys: list[str], tokenizer) -> Iterator[tuple[str, bytes]]:
    for key in keys:
        yield from readable(key, store.client.get_object(Bucket=store.bucket, Key=key)["Body"].read(), tokenizer)


def files_under(*roots: Path) -> Iterator[tuple[str, bytes]]:
    """Each file given, and each file under each folder given."""
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]:
            yield str(path), path.read_bytes()


def sqlite_files(url_or_path: str) -> list[Path]:
    """The database file of a sqlite URL (or path) and its journal files, those that exist."""
    path = Path(url_or_path.split(":///", 1)[-1])
    return [p for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-journal")) if p.is_file()]


def prefect_records(flow_run_id) -> Iterator[tuple[str, bytes]]:
    """The flow run, its task runs (states, result references) and its logs, as the Prefect API serves them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # logs still queued in this process reach the API (and its database) first
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        yield "prefect:flow-run", flow_run.model_dump_json().encode()
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        for run in runs:
            yield f"prefect:task-run:{run.name}", run.model_dump_json().encode()
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        yield "prefect:logs", "\n".join(log.model_dump_json() for log in logs).encode()
    assert runs and logs  # the search saw something


@pytest.fixture(scope="module")
def prefect_file_api(services):
    """This module's own Prefect API with its database in a file, which the sweep searches (the session's
    ``prefect_api`` keeps its database in memory). Its client waits past SQLite's 60 s busy timeout: a
    state change that the server's task-run recorder held up is then slow, not lost (tests/conftest.py)."""
    from prefect.settings import PREFECT_API_REQUEST_TIMEOUT, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    drain_prefect_workers()  # the session API's log and event workers: this module's runs report here
    with prefect_test_harness(server_startup_timeout=180), temporary_settings({PREFECT_API_REQUEST_TIMEOUT: 180}):
        yield
    drain_prefect_workers()


def test_planted_pii_canaries_appear_nowhere_outside_the_raw_area(prefect_file_api, services, store, tmp_path,
                                                                   tiny_tokenizer):
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    from flows.pipeline import finetune
    from steps.core.contract import RECORDS_FILE

    canaries = make_canaries(random.Random(uuid.uuid4().int))
    needles = {entity: forms for entity, (_, forms) in canaries.items()}
    source = write_jsonl(tmp_path / "canaries.jsonl", planted_rows(canaries))
    name = f"canary-{uuid.uuid4().hex[:8]}"
    params = PipelineParams.from_yaml(TINY, [f"ingest.source={source}", f"artifacts_prefix={store.prefix}",
                                             f"register.model_name={name}"])
    state = finetune(params, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()

    # Every canary reached scrub and was replaced there (so each one travelled the whole pipeline).
    scrub = summary.record.datasets["scrub"]
    assert all(scrub.stats["pii"][entity] >= 2 for entity in canaries), scrub.stats["pii"]
    scrubbed = store.read_bytes(scrub, RECORDS_FILE).decode()
    assert all(f"<{entity}>" in scrubbed for entity in canaries)

    raw_area = tuple(f"{store.prefix}/{step}/" for step in RAW_AREA)
    started = time.perf_counter()
    keys = bucket_keys(store)
    inside = [k for k in keys if k.startswith(raw_area)]
    outside = [k for k in keys if not k.startswith(raw_area)]
    assert any(k.startswith("mlflow/") for k in outside)  # the registered model's artifacts are searched,
    assert any(k.startswith("prefect-results/") for k in outside)  # and the task results
    assert any(k.startswith(f"{store.prefix}/tokenize/") for k in outside)
    # The positive control: the same search finds every canary in the raw copy.
    raw_copy = [k for k in inside if k.startswith(raw_area[0]) and k.endswith("/raw.jsonl")]
    assert {entity for _, entity in search(objects(store, raw_copy, tiny_tokenizer), needles)["hits"]} == set(canaries)

    places = {
        "s3": objects(store, outside, tiny_tokenizer),
        "prefect_api": prefect_records(state.state_details.flow_run_id),
        "prefect_db": files_under(*sqlite_files(PREFECT_SERVER_DATABASE_CONNECTION_URL.value())),
        "mlflow_db": files_under(*sqlite_files(str(services.state_dir / "mlflow.db"))),
        "service_logs": files_under(services.state_dir / "logs"),
        "local_cache": files_under(Path(os.environ["TUNELINE_CACHE"])),
    }
    found = {area: search(items, needles) for area, items in places.items()}
    seconds = time.perf_counter() - started
    assert all(found[area]["places"] for area in ("s3", "prefect_api", "prefect_db", "mlflow_db")), found
    assert all(not f["hits"] for f in found.values()), {area: f["hits"] for area, f in found.items()}

    record_figures("canary", "sweep", {
        "canaries_planted": len(canaries),
        "entities": sorted(canaries),
        "search_strings": sum(len(forms) for forms in needles.values()),
        "s3_objects_searched": len(outside),
        "places_searched": {area: f["places"] for area, f in found.items()},
        "bytes_searched": sum(f["bytes"] for f in found.values()),
        "hits": {area: len(f["hits"]) for area, f in found.items()},
        "raw_area_objects_with_canaries": len({w for w, _ in search(objects(store, inside, tiny_tokenizer),
                                                                     needles)["hits"]}),
        "pii_replaced_by_scrub": scrub.stats["pii"],
        "search_seconds": round(seconds, 2),
    })


def test_the_search_opens_gzip_zip_and_token_ids():
    """The sweep's own check: a canary hidden in a gzip object, a zip member or token ids is found."""
    class ByteTokenizer:
        def decode(self, ids: list[int]) -> str:
            return bytes(ids).decode("utf-8")

    needles = {"EMAIL": ["canary.qwerty@example.com"]}
    secret = b"mail canary.QWERTY@example.com now"
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("model/card.md", secret)
    rows = json.dumps({"id": "r1", "input_ids": list(secret)}).encode() + b"\n"
    places = [("a.gz", gzip.compress(secret)), ("b.zip", archive.getvalue()), ("t/train.jsonl", rows),
              ("clean.txt", b"mail <EMAIL> now")]
    found = search((p for key, data in places for p in readable(key, data, ByteTokenizer())), needles)
    assert found["hits"] == [("a.gz!gunzip", "EMAIL"), ("b.zip!model/card.md", "EMAIL"),
                             ("t/train.jsonl!decoded", "EMAIL")]
