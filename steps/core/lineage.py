"""Code version and digests that make artifact keys content-addressed.

    run_key = sha256(step name, code version, canonical JSON of the step config, input digests)
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

STEPS_DIR = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=1)
def code_version() -> str:
    """Digest of the package version and every file of steps/ (modules of every subpackage and the
    reference data they read): any change to them gives new keys."""
    h = hashlib.sha256()
    try:
        h.update(metadata.version("tuneline").encode())
    except metadata.PackageNotFoundError:
        h.update(b"unpackaged")
    files = [*STEPS_DIR.rglob("*.py"), *(STEPS_DIR / "reference").iterdir()]
    for path in sorted(p for p in files if p.is_file() and "__pycache__" not in p.parts):
        h.update(path.relative_to(STEPS_DIR).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def canonical_json(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", by_alias=True)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_key(step: str, config: Any, input_digests: list[str]) -> str:
    payload = canonical_json(
        {"step": step, "code": code_version(), "config": config if not isinstance(config, BaseModel)
         else config.model_dump(mode="json", by_alias=True), "inputs": input_digests}
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]
