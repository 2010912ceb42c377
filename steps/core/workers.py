"""Worker processes for the data steps: chunks of records processed on every core, in order.

Scrub and tokenize spend their time in per-record Python work (normalization, the PII
scan, MinHash signatures, chat templates, tokenization) that one process runs on one
core. ``ChunkWorkers`` starts ``count`` worker processes (``python -m steps.core.workers``,
fresh interpreters, not forks of a process that holds threads and sockets), sends each one
chunks of JSON lines in turn and yields their answers in the order the chunks were sent,
so a step's output is byte-identical with any number of workers. Only bytes cross: a JSON
header naming the job, then length-prefixed frames (JSON lines in, JSON plus raw arrays
out); no pickles. A worker's typed error (``DataQualityError``, ``ConfigError``) is raised
again in the step with its message; a worker that dies is an error naming its exit code.

How many: ``TUNELINE_DATA_WORKERS`` (``auto``, the default: one per available core when
there are at least two and the step's input has at least ``MIN_RECORDS`` records, else
none; ``0``: in the step's own process; ``N``: N workers). The value changes speed, never
the output, so it is not part of any cache key.

    TUNELINE_DATA_WORKERS=2 tuneline run ...
"""

from __future__ import annotations

import importlib
import json
import os
import queue
import struct
import subprocess
import sys
import threading
from collections import deque
from typing import Any, Iterable, Iterator

from steps.core.errors import ConfigError, DataQualityError, TunelineError

ENV = "TUNELINE_DATA_WORKERS"
MIN_RECORDS = 20_000  # below this, starting workers (imports, model files) costs more than it saves
_LENGTH = struct.Struct(">Q")
_ERRORS: dict[str, type[Exception]] = {"DataQualityError": DataQualityError, "ConfigError": ConfigError}


def worker_count(records: int) -> int:
    """Workers to use for a step over ``records`` records (``TUNELINE_DATA_WORKERS``)."""
    value = os.environ.get(ENV, "auto").strip().lower()
    if value == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return cores if cores >= 2 and records >= MIN_RECORDS else 0
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise ConfigError(f"{ENV}={value!r}: expected 'auto', 0 (no worker processes) or a number of workers")
    return count


SHARES = 12  # chunks come in multiples of 12: an even share each for 1, 2, 3, 4 or 6 workers


def batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """The items in lists of at most ``size``."""
    part: list[Any] = []
    for item in items:
        part.append(item)
        if len(part) == size:
            yield part
            part = []
    if part:
        yield part


def balanced_chunk(records: int, most: int) -> int:
    """Records per chunk of a step over ``records`` records: at most ``most``, and a multiple of
    ``SHARES`` chunks, so that no worker is left with a whole chunk more to do at the end
    (92,837 records, at most 10k: 12 chunks of 7,737 instead of 9 of 10k and one of 2,837).
    It depends on the input only, never on the number of workers, so a step's output stays
    byte-identical with any number of them (scrub's cluster report lists a cluster's members in
    the order the chunks reveal them). Small inputs get chunks of at least 1,000 records."""
    if records <= 0:
        return most
    rounds = -(-records // (most * SHARES))
    return max(-(-records // (rounds * SHARES)), min(most, 1_000))


def _write_frame(stream: Any, payload: bytes) -> None:
    stream.write(_LENGTH.pack(len(payload)))
    stream.write(payload)
    stream.flush()


def _read_frame(stream: Any) -> bytes | None:
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (size,) = _LENGTH.unpack(head)
    payload = stream.read(size)
    if len(payload) < size:
        return None
    return payload


class _Worker:
    def __init__(self, job: str, config: dict[str, Any]):
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # where `steps` imports from
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        # One thread per worker: the workers are the parallelism. PYTHONSAFEPATH: ``-m`` would put the
        # working directory first on sys.path, where a user's own ``steps`` folder would shadow ours.
        env = {**os.environ, "PYTHONPATH": path, "PYTHONSAFEPATH": "1", "TOKENIZERS_PARALLELISM": "false",
               "RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "steps.core.workers"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env)
        self.inbox: queue.Queue[bytes | None] = queue.Queue()
        _write_frame(self.proc.stdin, json.dumps({"job": job, "config": config}).encode())
        # A feeder thread writes chunks while the step reads answers: a worker blocked on a full
        # output pipe never waits for a step blocked on a full input pipe.
        self.feeder = threading.Thread(target=self._feed, daemon=True)
        self.feeder.start()

    def _feed(self) -> None:
        try:
            while (payload := self.inbox.get()) is not None:
                _write_frame(self.proc.stdin, payload)
            self.proc.stdin.close()
        except (BrokenPipeError, ValueError, OSError):
            pass  # the worker died; its reader reports it

    def answer(self) -> bytes:
        frame = _read_frame(self.proc.stdout)
        if frame is None:
            code = self.proc.wait()
            raise RuntimeError(f"a data worker process (python -m steps.core.workers) exited with code {code} "
                               "before answering; see its error output above")
        kind, body = frame[:1], frame[1:]
        if kind == b"E":
            error = json.loads(body)
            raise _ERRORS.get(error["type"], TunelineError)(error["message"])
        return body

    def close(self, kill: bool) -> None:
        self.inbox.put(None)
        if kill:
            self.proc.kill()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


class ChunkWorkers:
    """``map`` over chunks (bytes) with ``count`` worker processes running ``job``; answers in order.

    Used as a context manager: the workers stop when the block ends (killed if it ends by an error).
    """

    def __init__(self, job: str, config: dict[str, Any], count: int, in_flight: int = 2):
        if job not in JOBS:
            raise ConfigError(f"unknown data worker job {job!r}")
        self.workers = [_Worker(job, config) for _ in range(count)]
        self.in_flight = in_flight * count

    def map(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        pending: deque[_Worker] = deque()
        turn = 0
        for chunk in chunks:
            if len(pending) >= self.in_flight:
                yield pending.popleft().answer()
            worker = self.workers[turn % len(self.workers)]
            turn += 1
            worker.inbox.put(chunk)
            pending.append(worker)
        while pending:
            yield pending.popleft().answer()

    def __enter__(self) -> ChunkWorkers:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        for worker in self.workers:
            worker.close(kill=exc_type is not None)


# What a worker can be asked to run: the module whose ``chunk_worker(config)`` returns the chunk
# function (JSON lines in, an answer out) of that data step.
JOBS = {"scrub": "steps.scrub.step", "tokenize": "steps.tokenize.chats"}


def pack(head: dict[str, Any], sigs: list[Any], lines: dict[str, list[str | None]] | None = None) -> bytes:
    """An answer: 8-byte length and the JSON ``head``; 8-byte length and the named lists of
    ``lines`` (JSON lines: no newline inside; None goes as an empty line) joined by newlines,
    so they are not escaped again inside the head; then the uint32 arrays ``sigs`` (MinHash
    signatures) as raw little-endian bytes."""
    lines = lines or {}
    data = json.dumps(head | {"_lines": {name: len(rows) for name, rows in lines.items()}}, ensure_ascii=False).encode()
    text = "\n".join(row or "" for rows in lines.values() for row in rows).encode()
    return b"".join([len(data).to_bytes(8, "big"), data, len(text).to_bytes(8, "big"), text,
                     *(a.astype("<u4").tobytes() for a in sigs)])


def unpack(data: bytes, num_perm: int) -> tuple[dict[str, Any], Any]:
    """``pack``'s head, with each list of ``lines`` under its name (empty lines as None), and its
    arrays as one (rows, num_perm) uint32 array (read-only, no copy)."""
    import numpy as np

    size = int.from_bytes(data[:8], "big")
    head = json.loads(data[8:8 + size])
    at = 8 + size
    text_size = int.from_bytes(data[at:at + 8], "big")
    counts = head.pop("_lines")
    rows = data[at + 8:at + 8 + text_size].decode().split("\n") if counts and sum(counts.values()) else []
    begin = 0
    for name, count in counts.items():
        head[name] = [row or None for row in rows[begin:begin + count]]
        begin += count
    sigs = np.frombuffer(data, dtype="<u4", offset=at + 8 + text_size).reshape(-1, num_perm)
    return head, sigs


def serve(stdin: Any, stdout: Any) -> None:
    """A worker: the job header, then one answer frame per chunk frame until the input ends."""
    header = _read_frame(stdin)
    if header is None:
        return
    spec = json.loads(header)
    try:
        handle = importlib.import_module(JOBS[spec["job"]]).chunk_worker(spec["config"])
    except (DataQualityError, ConfigError) as exc:
        failed = _error_frame(exc)  # answered to every chunk: the step raises it with its message
        handle = None
    while (chunk := _read_frame(stdin)) is not None:
        if handle is None:
            _write_frame(stdout, failed)
            continue
        try:
            _write_frame(stdout, b"R" + handle(chunk))
        except (DataQualityError, ConfigError) as exc:
            _write_frame(stdout, _error_frame(exc))


def _error_frame(exc: Exception) -> bytes:
    return b"E" + json.dumps({"type": type(exc).__name__, "message": str(exc)}).encode()


if __name__ == "__main__":
    # Frames go to the original stdout; anything a library prints goes to stderr instead.
    frames = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    serve(sys.stdin.buffer, frames)
