"""S3 fault injection at the wire: a botocore ``before-send`` hook on every S3 client.

The hook sees each HTTP attempt botocore is about to send (method, URL, body, the attempt
number of the call) and, where the plan says so, answers it with a fault instead:

- ``500``: an ``InternalError`` reply (status 500), the request never reaches SeaweedFS;
- ``503``: a ``SlowDown`` reply (status 503), the request never reaches SeaweedFS;
- ``timeout``: the request IS sent and SeaweedFS applies it, then the reply is lost
  (``ReadTimeoutError``): the retry repeats a write that already happened;
- ``reset``: the connection is reset before the request is sent (``ConnectionClosedError``).

Requests are grouped by the artifact step their key belongs to (``<prefix>/<step>/...``;
``locks/promote/...`` counts as ``promote-lock``), so a plan can fault each step's reads
and writes. Only the fault is simulated; every other request goes to the real server.

    faults = S3Faults(prefix, plan=step_boundary_faults({("scrub", "PutObject", "data"): ("500", "503", "reset", "500")}))
    faults.install()          # every S3 client created from now on carries the hook
    ...
    faults.uninstall()
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from typing import Callable
from urllib.parse import parse_qs, unquote, urlsplit

import botocore.session
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ConnectionClosedError, ReadTimeoutError
from botocore.httpsession import URLLib3Session

KINDS = ("500", "503", "timeout", "reset")
ERROR_BODY = {"500": (b"<?xml version='1.0' encoding='UTF-8'?>\n<Error><Code>InternalError</Code>"
                      b"<Message>injected: We encountered an internal error.</Message></Error>"),
              "503": (b"<?xml version='1.0' encoding='UTF-8'?>\n<Error><Code>SlowDown</Code>"
                      b"<Message>injected: Please reduce your request rate.</Message></Error>")}

# plan(step, operation, object, call index within (step, operation, object), attempt of that call from 1)
#   -> a kind or None; object is "manifest" for a _MANIFEST.json key, else "data"
Plan = Callable[[str, str, str, int, int], "str | None"]


class _Raw:
    def __init__(self, body: bytes):
        self.body = body

    def stream(self, **_kwargs):
        yield self.body


class S3Faults:
    def __init__(self, prefix: str, plan: Plan, lock_names: tuple[str, ...] = ()):
        self.prefix, self.plan, self.lock_names = prefix.strip("/"), plan, lock_names
        self.injected: Counter = Counter()  # (step, operation, kind) -> count
        self.sent: Counter = Counter()  # step -> attempts that reached the server
        self.calls: dict[tuple[str, str, str], list[str]] = {}  # (step, operation, object) -> invocation ids
        self._lock = threading.Lock()
        self._http = URLLib3Session()
        self._original = None

    # ---- wiring
    def install(self) -> None:
        original = self._original = botocore.session.Session.create_client
        faults = self

        def create_client(session, service_name, *args, **kwargs):
            client = original(session, service_name, *args, **kwargs)
            if service_name == "s3":
                client.meta.events.register("before-send.s3", faults.before_send)
            return client

        botocore.session.Session.create_client = create_client

    def uninstall(self) -> None:
        if self._original is not None:
            botocore.session.Session.create_client = self._original
            self._original = None

    # ---- classification
    def step_of(self, url: str, body: object) -> tuple[str, str] | None:
        parts = urlsplit(url)
        path = unquote(parts.path).lstrip("/").split("/", 1)
        key = path[1] if len(path) > 1 else ""
        if not key:  # bucket-level: ListObjectsV2 (prefix in the query) or DeleteObjects (keys in the body)
            query = parse_qs(parts.query)
            key = query.get("prefix", [""])[0]
            if not key and isinstance(body, (bytes, bytearray)):
                found = re.search(rb"<Key>([^<]+)</Key>", body)
                key = found.group(1).decode() if found else ""
        obj = "manifest" if key.endswith("/_MANIFEST.json") else "data"
        for name in self.lock_names:
            if key == f"locks/promote/{name}.lock":
                return "promote-lock", obj
        if key.startswith(self.prefix + "/"):
            step = key[len(self.prefix) + 1 :].split("/", 1)[0]
            return (step, obj) if step else None
        return None

    # ---- the hook
    def before_send(self, request, event_name: str, **_kwargs):
        operation = event_name.rsplit(".", 1)[-1]
        body = request.body if isinstance(request.body, (bytes, bytearray)) else None
        where = self.step_of(request.url, body)
        if where is None:
            return None
        step, obj = where
        # botocore numbers the attempts of one call in its retry headers (standard retry mode)
        headers = {k.lower(): (v.decode() if isinstance(v, bytes) else v) for k, v in request.headers.items()}
        found = re.search(r"attempt=(\d+)", headers.get("amz-sdk-request", ""))
        attempt = int(found.group(1)) if found else 1
        invocation = headers.get("amz-sdk-invocation-id") or str(id(request))
        with self._lock:
            seen = self.calls.setdefault((step, operation, obj), [])
            if invocation not in seen:
                seen.append(invocation)
            kind = self.plan(step, operation, obj, seen.index(invocation), attempt)
            if kind is not None:
                self.injected[(step, operation, kind)] += 1
            if kind in (None, "timeout"):
                self.sent[step] += 1
        if kind is None:
            return None
        if kind in ("500", "503"):
            return AWSResponse(request.url, int(kind), {"Content-Type": "application/xml"}, _Raw(ERROR_BODY[kind]))
        if kind == "timeout":
            self._http.send(request)  # the server applies the request; its reply never arrives
            raise ReadTimeoutError(endpoint_url=request.url, error="injected: read timeout")
        raise ConnectionClosedError(endpoint_url=request.url, error="injected: connection reset by peer")

    # ---- figures
    def total(self) -> int:
        return sum(self.injected.values())

    def by(self, index: int) -> dict[str, int]:
        out: Counter = Counter()
        for k, n in self.injected.items():
            out[k[index]] += n
        return dict(sorted(out.items()))

    def steps_faulted(self, operations: set[str]) -> set[str]:
        return {step for (step, op, _), n in self.injected.items() if n and op in operations}


READS = {"GetObject", "HeadObject", "ListObjectsV2"}
WRITES = {"PutObject", "DeleteObject", "DeleteObjects", "CreateMultipartUpload", "UploadPart",
          "CompleteMultipartUpload"}


BOUNDARY = (("HeadObject", "manifest"), ("GetObject", "data"), ("ListObjectsV2", "data"), ("PutObject", "data"),
            ("PutObject", "manifest"), ("DeleteObject", "data"), ("DeleteObjects", "data"))


def step_boundary_faults(bursts: dict[tuple[str, str, str], tuple[str, ...]] | None = None) -> Plan:
    """Faults for the first call of every step's reads and writes (``BOUNDARY``: the look-up of its
    manifest, reads, listings, writes and deletions of its files, the manifest commit):

    - the first call fails once (botocore's retry succeeds), the kind rotating per step so that each
      step meets several kinds;
    - the first manifest write of each step is applied but its reply is lost (``timeout``): the
      retry meets the create-only condition (412) and must adopt the manifest it wrote itself;
    - ``bursts`` gives explicit kinds for a first call; four in a row exhaust the store client's
      attempts (``max_attempts=3`` retries after the first), so the step's task fails with a
      transient error and Prefect retries it.
    """
    bursts = bursts or {}
    rotation: dict[str, int] = {}
    chosen: dict[tuple[str, str, str], tuple[str, ...]] = {}

    def plan(step: str, operation: str, obj: str, call: int, attempt: int) -> str | None:
        if call != 0:
            return None
        key = (step, operation, obj)
        if key not in chosen:
            if key in bursts:
                chosen[key] = bursts[key]
            elif (operation, obj) == ("PutObject", "manifest"):
                chosen[key] = ("timeout",)
            elif (operation, obj) in BOUNDARY:
                start = rotation.get(step, sum(step.encode()) % len(KINDS))
                chosen[key] = (KINDS[start % len(KINDS)],)
                rotation[step] = start + 1
            else:
                chosen[key] = ()
        kinds = chosen[key]
        return kinds[attempt - 1] if attempt <= len(kinds) else None

    return plan


def wait_for(predicate: Callable[[], bool], timeout: float, every: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()
