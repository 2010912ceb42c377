"""The lock files (locks/*.txt, written by locks/lock.py): the environment the tests run in is
exactly locks/dev.txt, every lock agrees with pyproject.toml, and the image locks with it."""

from __future__ import annotations

import re
import sys
import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCKS = ROOT / "locks"
ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)((?:\s*\\\n\s*--hash=sha256:[0-9a-f]{64})+)", re.M)
NOT_LOCKED = {"tuneline", "pip"}  # the project itself (editable) and the installer


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock(name: str) -> dict[str, str]:
    text = (LOCKS / f"{name}.txt").read_text()
    entries = {normalize(m[1]): m[2] for m in ENTRY.finditer(text)}
    requirement_lines = [line for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    assert len(requirement_lines) == len(entries), f"locks/{name}.txt: an entry without a pin or a sha256 hash"
    return entries


def installed() -> dict[str, str]:
    """What pip installed into the environment: its site-packages only, not sys.path (importing setuptools, as
    torch's compiler does, appends setuptools/_vendor with its bundled distributions to sys.path)."""
    found = {normalize(d.metadata["Name"]): d.version for d in metadata.distributions(path=site_packages())}
    return {name: version for name, version in found.items() if name not in NOT_LOCKED}


def site_packages() -> list[str]:
    return sorted({path for path in sysconfig.get_paths().values() if path.endswith("site-packages")})


def test_the_environment_is_exactly_the_dev_lock():
    """Fails when anything was installed, upgraded or removed by hand: `make setup` rebuilds from the lock."""
    import setuptools  # noqa: F401  as another test in this worker may have: its _vendor must not count
    locked, present = lock("dev"), installed()
    drift = {name: (locked.get(name), present.get(name)) for name in locked.keys() | present.keys()
             if locked.get(name) != present.get(name)}
    assert not drift, (f"the environment at {sys.prefix} drifted from locks/dev.txt (locked, installed): {drift}; "
                       "`rm -r .venv && make setup` reinstalls it, `make lock` records a tested change")


@pytest.mark.parametrize("name", ["dev", "cpu", "gpu"])
def test_each_lock_satisfies_pyproject(name):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + (project["optional-dependencies"]["dev"] if name == "dev" else [])
    wanted += [line.split("#")[0].strip() for line in (ROOT / "requirements-models.txt").read_text().splitlines()
               if line.split("#")[0].strip()]
    locked = lock(name)
    for text in wanted:
        requirement = Requirement(text)
        version = locked.get(normalize(requirement.name))
        assert version is not None, f"locks/{name}.txt lacks {requirement.name}"
        assert requirement.specifier.contains(Version(version), prereleases=True), \
            f"locks/{name}.txt has {requirement.name}=={version}, pyproject.toml asks {text}: run `make lock`"


def test_the_image_locks_agree_with_the_dev_lock():
    """cpu.txt is dev.txt without the dev extra; gpu.txt differs only in torch's build and its CUDA wheels."""
    dev, cpu, gpu = lock("dev"), lock("cpu"), lock("gpu")
    assert {n: v for n, v in cpu.items() if dev.get(n) != v} == {}
    assert cpu["torch"].endswith("+cpu") and dev["torch"] == cpu["torch"]
    assert gpu["torch"] == cpu["torch"].split("+")[0]
    assert {n: v for n, v in cpu.items() if n != "torch" and gpu.get(n) != v} == {}
    cuda_only = set(gpu) - set(cpu)
    assert cuda_only and all(n.startswith(("nvidia-", "cuda-", "triton")) for n in cuda_only), cuda_only
