"""Artifact store over boto3, following the artifact contract (DESIGN.md).

Key layout: ``<prefix>/<step>/<run_key>/<file>``. A step writes its payload first and
``_MANIFEST.json`` LAST with a create-only condition (``IfNoneMatch="*"``): no manifest
means the artifact does not exist, and a retry that finds a valid manifest reuses it.

    store = ArtifactStore.from_env(prefix="tuneline")
    key = run_key("scrub", cfg, [source.digest])
    if (done := store.lookup("scrub", key)) is not None:
        return DatasetRef(**done.model_dump())
    writer = store.writer("scrub", key, cfg, inputs=[source])
    writer.put_bytes("records.jsonl", data)
    return DatasetRef(**writer.commit(stats={"rows": n}).model_dump())

Credentials come from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY),
never from parameters, and are never logged.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, ReadTimeoutError
from botocore.exceptions import ConnectionError as BotoConnectionError
from pydantic import BaseModel

from steps.core.contract import StrictModel
from steps.core.errors import ArtifactError, TransientError
from steps.core.lineage import canonical_json, code_version, sha256_bytes, sha256_file
from steps.core.workers import batches

log = logging.getLogger(__name__)

MANIFEST = "_MANIFEST.json"


class ArtifactRef(StrictModel):
    """A small JSON reference to a committed artifact: what tasks pass to each other."""

    step: str
    key: str
    digest: str
    stats: dict[str, Any] = {}


class DatasetRef(ArtifactRef):
    """Records or token shards."""


class EvalReport(ArtifactRef):
    """Metrics of one model on one eval set (stats hold the numbers)."""


class ModelRef(StrictModel):
    """A base model, optionally with what training produced on top of it (``adapter``: the
    train artifact, whatever the method: adapter, head, interventions or full weights)."""

    base: ArtifactRef
    adapter: ArtifactRef | None = None

    @property
    def digest(self) -> str:
        return self.adapter.digest if self.adapter else self.base.digest

    @property
    def label(self) -> str:
        return "fine-tuned" if self.adapter else "base"


_PRECONDITION = {"PreconditionFailed", "412", "ConditionalRequestConflict"}


def _code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


def _transient(exc: Exception) -> bool:
    if isinstance(exc, (BotoConnectionError, ReadTimeoutError, HTTPClientError)):  # incl. a connection reset
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = exc.response.get("Error", {}).get("Code", "")
        return status >= 500 or code in {"SlowDown", "RequestTimeout", "ServiceUnavailable", "InternalError"}
    return False


# Multipart transfers with two threads instead of boto3's ten: as fast against a store on the same
# machine or network (a 160 MB file: 4.3 s vs 5.0 s), and each thread's buffers stay in its own
# malloc arena after the transfer (+47 MiB of RSS kept with ten threads, +7 with two).
TRANSFER = TransferConfig(max_concurrency=2)


class ArtifactStore:
    def __init__(self, client: Any, bucket: str, prefix: str, cache_dir: Path | None = None):
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.cache_dir = cache_dir or Path(
            os.environ.get("TUNELINE_CACHE", Path.home() / ".cache" / "tuneline")
        )

    @classmethod
    def from_env(cls, prefix: str) -> ArtifactStore:
        """Endpoint and bucket from TUNELINE_S3_ENDPOINT_URL / TUNELINE_BUCKET; keys from the AWS_* variables."""
        endpoint = os.environ.get("TUNELINE_S3_ENDPOINT_URL") or None
        bucket = os.environ.get("TUNELINE_BUCKET")
        if not bucket:
            raise ArtifactError("TUNELINE_BUCKET is not set: start the services (`tuneline services up`) or export it")
        return cls(s3_client(endpoint), bucket, prefix)

    # ---- low-level S3 calls, with transient failures typed for the retry policy
    def _call(self, op: str, **kwargs: Any) -> Any:
        try:
            return getattr(self.client, op)(Bucket=self.bucket, **kwargs)
        except (ClientError, BotoCoreError) as exc:
            if _transient(exc):
                raise TransientError(f"object storage {op} failed transiently: {exc}") from exc
            raise

    def exists(self, key: str) -> bool:
        try:
            self._call("head_object", Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                return False
            raise

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._call("get_object", Key=key)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                raise ArtifactError(f"s3://{self.bucket}/{key} does not exist") from exc
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call("put_object", Key=key, Body=data)

    @contextlib.contextmanager
    def lock(self, name: str, timeout: float = 300.0, stale_after: float = 900.0) -> Iterator[None]:
        """A mutual-exclusion lock: the create-only object ``<prefix>/<name>.lock`` (``IfNoneMatch="*"``).

        Waits up to ``timeout`` seconds. Staleness is judged by the server's clocks only: the lock
        object's ``LastModified`` against the ``Date`` of the same reply, never the time in its body
        (a holder's clock, or a forged time, cannot keep a lock alive). A lock older than
        ``stale_after`` (its holder died) is broken, and the lock is released, by a conditional delete
        (``IfMatch`` on the ETag judged stale, or on the ETag of our own write): a lock another holder
        took meanwhile is never deleted.
        """
        key = f"{self.prefix}/{name}.lock"
        token = uuid.uuid4().hex  # makes the body, hence the ETag, unique to this holder
        body = json.dumps({"host": platform.node(), "pid": os.getpid(), "at": time.time(), "token": token}).encode()
        deadline = time.monotonic() + timeout
        while True:
            try:
                etag = self._call("put_object", Key=key, Body=body, IfNoneMatch="*")["ETag"]
                break
            except ClientError as exc:
                if _code(exc) not in _PRECONDITION:
                    raise
            held = self._lock_held(key)
            if held is None:  # released between our write and our read: try again
                continue
            if held["token"] == token:  # our own write landed but its reply was lost: a retry met it
                etag = held["etag"]
                break
            if held["age"] > stale_after:
                log.warning("lock %s last written %.0f s ago (server time): breaking it", key, held["age"])
                self._delete_if_match(key, held["etag"])  # 412: someone else broke or re-took it first
                continue
            if time.monotonic() > deadline:
                raise TransientError(f"lock s3://{self.bucket}/{key} still held after {timeout:.0f} s")
            time.sleep(0.2)
        try:
            yield
        finally:
            self._release(key, etag, token)

    def _release(self, key: str, etag: str, token: str) -> None:
        for _ in range(3):
            if self._delete_if_match(key, etag):
                return
            held = self._lock_held(key)
            if held is None:  # gone: broken by another holder, or our delete landed and a retry met 412
                return
            if held["token"] != token:
                log.warning("lock %s was no longer ours at release: judged stale and taken by another holder", key)
                return
            etag = held["etag"]  # still ours (a concurrent-request conflict): delete again

    def _lock_held(self, key: str) -> dict[str, Any] | None:
        """The lock object's holder token, ETag and age by the server's clock; None if there is none."""
        try:
            reply = self._call("get_object", Key=key)
        except ClientError as exc:
            if _code(exc) in {"404", "NoSuchKey", "NotFound"}:
                return None
            raise
        try:
            token = json.loads(reply["Body"].read()).get("token")
        except (ValueError, AttributeError):
            token = None  # unreadable: judged by its age like any other
        date = reply.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = email.utils.parsedate_to_datetime(date) if date else dt.datetime.now(dt.timezone.utc)
        return {"token": token, "etag": reply["ETag"], "age": (now - reply["LastModified"]).total_seconds()}

    def _delete_if_match(self, key: str, etag: str) -> bool:
        """Delete ``key`` only if its ETag is still ``etag``; False if it was gone or replaced."""
        try:
            self._call("delete_object", Key=key, IfMatch=etag)
            return True
        except ClientError as exc:
            if _code(exc) in _PRECONDITION | {"404", "NoSuchKey", "NotFound"}:
                return False
            raise

    def list_keys(self, prefix: str) -> list[str]:
        keys: list[str] = []
        token: dict[str, str] = {}
        while True:
            page = self._call("list_objects_v2", Prefix=prefix, **token)
            keys += [obj["Key"] for obj in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return keys
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def delete_prefix(self, prefix: str) -> None:
        keys = self.list_keys(prefix)
        for i in range(0, len(keys), 1000):
            self._call("delete_objects", Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True})

    # ---- the artifact contract
    def artifact_key(self, step: str, run_key: str) -> str:
        return f"{self.prefix}/{step}/{run_key}"

    def lookup(self, step: str, run_key: str) -> ArtifactRef | None:
        """The committed artifact for this key, or None. A manifest is the only proof of existence."""
        key = self.artifact_key(step, run_key)
        if not self.exists(f"{key}/{MANIFEST}"):
            return None
        manifest = self.manifest(key)
        log.info("%s: reusing committed artifact %s", step, key)
        return ArtifactRef(step=step, key=key, digest=manifest["digest"], stats=manifest["stats"])

    def manifest(self, key: str, digest: str | None = None) -> dict[str, Any]:
        """The artifact's manifest, verified: its ``digest`` recomputed over its file list and input
        digests (as ``commit`` computed it), and equal to ``digest`` when the caller holds a reference.
        A manifest rewritten together with a file (a changed sha256 entry) fails the first check; a
        reference handed over for another artifact, the second. ArtifactError names the key."""
        try:
            manifest = json.loads(self.get_bytes(f"{key}/{MANIFEST}"))
            recomputed = manifest_digest(manifest)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ArtifactError(f"{key}: the manifest cannot be read ({type(exc).__name__}: {exc})") from exc
        if recomputed != manifest["digest"]:
            raise ArtifactError(f"{key}: the manifest's digest does not match its files and inputs (recorded "
                                f"{str(manifest['digest'])[:16]}, computed {recomputed[:16]}): it was altered")
        if digest is not None and digest != manifest["digest"]:
            raise ArtifactError(f"{key}: the reference's digest {digest[:16]} is not the committed artifact's "
                                f"{manifest['digest'][:16]}")
        return manifest

    def writer(
        self, step: str, run_key: str, config: BaseModel | dict, inputs: Iterable[ArtifactRef] = ()
    ) -> ArtifactWriter:
        return ArtifactWriter(self, step, self.artifact_key(step, run_key), run_key, config, list(inputs))

    def read_bytes(self, ref: ArtifactRef, name: str) -> bytes:
        files = self.manifest(ref.key, ref.digest)["files"]
        if name not in files:
            raise ArtifactError(f"{ref.key} has no file {name!r} (has: {', '.join(sorted(files))})")
        data = self.get_bytes(f"{ref.key}/{name}")
        if sha256_bytes(data) != files[name]["sha256"]:
            raise ArtifactError(f"{ref.key}/{name} does not match its manifest digest")
        return data

    def read_json(self, ref: ArtifactRef, name: str) -> Any:
        return json.loads(self.read_bytes(ref, name))

    def read_jsonl(self, ref: ArtifactRef, name: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.read_bytes(ref, name).decode("utf-8").splitlines() if line]

    def iter_lines(self, ref: ArtifactRef, name: str, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
        """The file's lines (without the newline) streamed from S3, a chunk at a time: memory stays
        flat whatever the file size. The digest is checked when the last line has been read, so a
        consumer that reaches the end has read exactly the committed bytes (ArtifactError if not)."""
        files = self.manifest(ref.key, ref.digest)["files"]
        if name not in files:
            raise ArtifactError(f"{ref.key} has no file {name!r} (has: {', '.join(sorted(files))})")
        try:
            body = self._call("get_object", Key=f"{ref.key}/{name}")["Body"]
        except ClientError as exc:
            raise ArtifactError(f"s3://{self.bucket}/{ref.key}/{name} cannot be read: {exc}") from exc
        digest, rest = hashlib.sha256(), b""
        for chunk in body.iter_chunks(chunk_bytes):
            digest.update(chunk)
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            yield from lines
        if rest:
            yield rest
        if digest.hexdigest() != files[name]["sha256"]:
            raise ArtifactError(f"{ref.key}/{name} does not match its manifest digest")

    def iter_jsonl(self, ref: ArtifactRef, name: str) -> Iterator[dict[str, Any]]:
        """``read_jsonl`` as a stream (``iter_lines``)."""
        return (json.loads(line) for line in self.iter_lines(ref, name) if line)

    def iter_jsonl_chunks(self, ref: ArtifactRef, name: str, size: int) -> Iterator[list[dict[str, Any]]]:
        """``iter_jsonl`` in lists of at most ``size`` records."""
        return batches(self.iter_jsonl(ref, name), size)

    def iter_line_chunks(self, ref: ArtifactRef, name: str, size: int) -> Iterator[bytes]:
        """The file's non-blank lines in chunks of at most ``size`` lines, each chunk one
        newline-joined bytes object (for worker processes: ``steps/core/workers.py``)."""
        chunk: list[bytes] = []
        for line in self.iter_lines(ref, name):
            if line:
                chunk.append(line)
                if len(chunk) == size:
                    yield b"\n".join(chunk)
                    chunk = []
        if chunk:
            yield b"\n".join(chunk)

    def download(self, ref: ArtifactRef) -> Path:
        """Materialise every file of an artifact locally, verified against the manifest; cached by digest.

        A cache hit (``<cache>/<digest>/``) is re-checked before reuse: the cached manifest's digest must be
        the reference's, and every cached file must have its recorded size and sha256. A mismatch (a file
        changed, truncated or missing in the cache) is logged with the file's name and the artifact is
        downloaded again from the store, verified as on a miss: the caller always gets the committed bytes."""
        target = self.cache_dir / ref.digest
        if (target / MANIFEST).exists():
            problem = cached_problem(target, ref.digest)
            if problem is None:
                return target
            log.warning("cache %s: %s; downloading %s again", target, problem, ref.key)
            stale = target.with_name(f".stale-{uuid.uuid4().hex}")
            with contextlib.suppress(OSError):
                target.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        manifest = self.manifest(ref.key, ref.digest)
        files = manifest["files"]
        staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=self._ensure_cache()))
        try:
            for name, meta in files.items():
                path = staging / name
                path.parent.mkdir(parents=True, exist_ok=True)
                self.client.download_file(self.bucket, f"{ref.key}/{name}", str(path), Config=TRANSFER)
                if sha256_file(path) != meta["sha256"]:
                    raise ArtifactError(f"{ref.key}/{name} does not match its manifest digest")
            (staging / MANIFEST).write_text(json.dumps({"key": ref.key, "digest": manifest["digest"], "files": files,
                                                        "inputs": manifest["inputs"]}))
            try:
                staging.rename(target)
            except OSError:  # another process materialised it first
                pass
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def _ensure_cache(self) -> Path:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        return self.cache_dir


def manifest_digest(manifest: dict[str, Any]) -> str:
    """An artifact's digest from its manifest's file list and input digests (what ``commit`` records)."""
    inputs = [i["digest"] for i in manifest["inputs"]]
    return sha256_bytes(canonical_json({"files": manifest["files"], "inputs": inputs}).encode())


def cached_problem(folder: Path, digest: str) -> str | None:
    """What is wrong with a cached artifact (``download``'s cache), or None: its manifest must recompute to
    ``digest`` (the folder's name) and each listed file have its size, then its sha256."""
    try:
        cached = json.loads((folder / MANIFEST).read_text())
        if "inputs" not in cached or manifest_digest(cached) != digest:
            return "the cached manifest is not the artifact's (older cache layout or altered)"
        files = cached["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"the cached manifest cannot be read ({type(exc).__name__})"
    for name, meta in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta.get("size", path.stat().st_size) or sha256_file(path) != meta["sha256"]:
            return f"{name} does not match its manifest digest"
    return None


class ArtifactWriter:
    """Collects payload files, then commits the manifest last (create-only)."""

    def __init__(self, store: ArtifactStore, step: str, key: str, run_key: str, config: Any, inputs: list[ArtifactRef]):
        self.store, self.step, self.key, self.run_key = store, step, key, run_key
        self.config = json.loads(canonical_json(config))
        self.inputs = inputs
        self.files: dict[str, dict[str, Any]] = {}

    def put_bytes(self, name: str, data: bytes) -> None:
        self.store.put_bytes(f"{self.key}/{name}", data)
        self.files[name] = {"sha256": sha256_bytes(data), "size": len(data)}

    def put_json(self, name: str, value: Any) -> None:
        self.put_bytes(name, (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))

    def put_jsonl(self, name: str, rows: Iterable[dict[str, Any]]) -> None:
        self.put_bytes(name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))

    @contextlib.contextmanager
    def jsonl_file(self, name: str) -> Iterator[JsonlSink]:
        """Rows written one at a time go to a local temporary file, uploaded (multipart, streamed)
        as ``name`` when the block ends without an error; memory stays flat whatever the size."""
        handle, temporary = tempfile.mkstemp(prefix="tuneline-", suffix=".jsonl")
        path = Path(temporary)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as f:
                sink = JsonlSink(f)
                yield sink
            self.put_file(name, path)
        finally:
            path.unlink(missing_ok=True)

    def put_file(self, name: str, path: Path, sha256: str | None = None) -> None:
        """Upload ``path`` as ``name``; ``sha256``: its digest when the caller already computed it."""
        try:
            self.store.client.upload_file(str(path), self.store.bucket, f"{self.key}/{name}", Config=TRANSFER)
        except (ClientError, BotoCoreError) as exc:
            if _transient(exc):
                raise TransientError(f"upload of {name} failed transiently: {exc}") from exc
            raise
        self.files[name] = {"sha256": sha256 or sha256_file(path), "size": path.stat().st_size}

    def put_dir(self, directory: Path, under: str = "") -> None:
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            self.put_file(f"{under}{path.relative_to(directory).as_posix()}", path)

    def commit(self, stats: dict[str, Any] | None = None) -> ArtifactRef:
        stats = stats or {}
        digest = sha256_bytes(canonical_json({"files": self.files, "inputs": [i.digest for i in self.inputs]}).encode())
        manifest = {
            "step": self.step,
            "run_key": self.run_key,
            "digest": digest,
            "code_version": code_version(),
            "config": self.config,
            "inputs": [{"key": i.key, "digest": i.digest} for i in self.inputs],
            "files": self.files,
            "stats": stats,
            "producer": {
                "host": platform.node(),
                "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            },
        }
        body = json.dumps(manifest, indent=2, ensure_ascii=False).encode("utf-8")
        try:
            self.store._call("put_object", Key=f"{self.key}/{MANIFEST}", Body=body, IfNoneMatch="*")
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code not in {"PreconditionFailed", "412", "ConditionalRequestConflict"}:
                raise
            # A concurrent attempt committed first: its artifact is the one that exists.
            log.info("%s: %s was committed concurrently; using that manifest", self.step, self.key)
            existing = self.store.manifest(self.key)
            return ArtifactRef(step=self.step, key=self.key, digest=existing["digest"], stats=existing["stats"])
        log.debug("%s: committed %s (%d files)", self.step, self.key, len(self.files))
        return ArtifactRef(step=self.step, key=self.key, digest=digest, stats=stats)


class JsonlSink:
    """Writes rows as JSON lines (``ArtifactWriter.jsonl_file``); ``rows`` counts them."""

    def __init__(self, f: Any):
        self._f = f
        self.rows = 0

    def write(self, row: dict[str, Any]) -> None:
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.rows += 1

    def write_many(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            self.write(row)

    def write_lines(self, lines: list[str]) -> None:
        """Rows already serialized as JSON, one per line."""
        if lines:
            self._f.write("\n".join(lines) + "\n")
            self.rows += len(lines)


_SESSION: dict[str, Any] = {}
_SESSION_LOCK = threading.Lock()


def s3_client(endpoint_url: str | None, keys: tuple[str | None, str | None] | None = None) -> Any:
    """An S3 client for ``endpoint_url`` with ``keys`` (access key, secret) or the keys in the environment now.

    One boto3 session per process, so that S3's service model is parsed once (a fresh session costs
    ~0.15 s of CPU per client, a shared one ~0.01 s); the keys are read from the environment for
    each client and passed explicitly, so a session never serves keys it saw earlier. Without keys
    in the environment, the session's own provider chain (files, instance roles) applies.
    """
    with _SESSION_LOCK:  # a session is not thread-safe; the clients it makes are
        session = _SESSION.get("s3") or _SESSION.setdefault("s3", boto3.session.Session())
        return session.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            aws_access_key_id=keys[0] if keys else os.environ.get("AWS_ACCESS_KEY_ID") or None,
            aws_secret_access_key=keys[1] if keys else os.environ.get("AWS_SECRET_ACCESS_KEY") or None,
            aws_session_token=None if keys else os.environ.get("AWS_SESSION_TOKEN") or None,
            config=Config(
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=120,
                s3={"addressing_style": "path"},
            ),
        )
