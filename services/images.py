"""Build the container images (containers/Dockerfile.cpu, .gpu) with podman or docker, offline-capable.

    make images                                  # the CPU image, tuneline-cpu:<version>, with podman (else docker)
    python -m services.images build --gpu       # also the GPU image (where the CUDA wheels can be downloaded)
    python -m services.images base              # only the local base image (mmdebstrap, no registry)

No registry is needed: the base image is made locally with mmdebstrap (Debian bookworm, Python 3.11 at
/usr/local as in python:3.11-slim) and passed with ``--from``; every wheel of the image's lock file is downloaded
once into ``.tuneline/wheels/<lock>/`` (the CPU torch build from pip's find-links) with a PEP 503 index beside
it, mounted read-only into the build, so ``pip install --require-hashes`` inside it reads files only. The
report (build seconds, image size) is printed and written to ``.tuneline/images/<tag>.json``.
"""

from __future__ import annotations

import argparse
import functools
import html
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATE = ROOT / ".tuneline"
BASE = "localhost/tuneline-base:bookworm"
BASE_PACKAGES = ["python3", "python3-venv", "ca-certificates", "passwd"]
DEBIAN = "http://deb.debian.org/debian"


class ImageError(RuntimeError):
    """A build step failed: the message names the command and the end of its output."""


def version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def tag(kind: str) -> str:
    return f"localhost/tuneline-{kind}:{version()}"


def engine() -> str:
    """``TUNELINE_CONTAINER_ENGINE``, else podman, else docker."""
    chosen = os.environ.get("TUNELINE_CONTAINER_ENGINE") or shutil.which("podman") or shutil.which("docker")
    if not chosen:
        raise ImageError("no container engine: install podman (apt-get install podman runc) or docker")
    return Path(chosen).name


def ulimits() -> list[str]:
    """File and process limits at the host's or lower (runc may not raise a limit, and a sandboxed host can refuse
    even its own hard limit for nproc: one with 96362 refused 48181 and took 20000)."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[0], 16384)
    return [f"nofile={nofile[0]}:{nofile[1]}", f"nproc={nproc}:{nproc}"]


def engine_env() -> dict[str, str]:
    """The environment for podman: a containers.conf with ``ulimits()`` for every container it starts, and runc
    (crun fails on hybrid cgroup hosts)."""
    env = dict(os.environ)
    if engine() == "podman" and "CONTAINERS_CONF" not in env:
        env["CONTAINERS_CONF"] = containers_conf()
    return env


@functools.cache
def containers_conf() -> str:
    """Written once per process: ``STATE/containers/containers.conf``."""
    runtime = 'runtime = "runc"\n' if shutil.which("runc") else ""
    conf = STATE / "containers" / "containers.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(f"[containers]\ndefault_ulimits = {json.dumps(ulimits())}\n[engine]\n{runtime}")
    return str(conf)


def command(argv: list[str], quiet: bool = False, timeout: float | None = None) -> str:
    """Run ``argv`` in ``engine_env()``: its output goes to stderr as it comes, or is captured (``quiet``) and
    returned; ImageError on failure, with the end of the captured errors."""
    done = subprocess.run(argv, capture_output=quiet, text=True, env=engine_env(), timeout=timeout,
                          stdout=None if quiet else sys.stderr)
    if done.returncode != 0:
        tail = (done.stderr or "")[-2000:] if quiet else "(output above)"
        raise ImageError(f"{' '.join(argv[:4])} ... exited {done.returncode}: {tail}")
    return done.stdout or ""


def run(*args: str, quiet: bool = False, timeout: float | None = None) -> str:
    """The container engine with ``args``."""
    return command([engine(), *args], quiet, timeout)


def exists(image: str) -> bool:
    return subprocess.run([engine(), "image", "exists" if engine() == "podman" else "inspect", image],
                          capture_output=True, env=engine_env()).returncode == 0


def base_image(rebuild: bool = False) -> str:
    """``BASE``: Debian bookworm from its mirror (mmdebstrap), Python in a venv at /usr/local, imported once."""
    if exists(BASE) and not rebuild:
        return BASE
    if not shutil.which("mmdebstrap"):
        raise ImageError("mmdebstrap is not installed (apt-get install mmdebstrap): it makes the local base image")
    with tempfile.TemporaryDirectory(prefix="tuneline-base-") as tmp:
        tar = Path(tmp) / "base.tar"
        command(["mmdebstrap", "--quiet", "--variant=apt", f"--include={','.join(BASE_PACKAGES)}",
                 "--customize-hook=chroot \"$1\" python3 -m venv /usr/local", "--format=tar", "bookworm", str(tar),
                 DEBIAN])
        run("import", "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--change", "ENV LANG=C.UTF-8", str(tar), BASE, quiet=True)
    return BASE


def wheelhouse(lock: str) -> Path:
    """Every wheel of locks/<lock>.txt in ``.tuneline/wheels/<lock>/`` with a PEP 503 index in its ``simple/``;
    pip checks each file against the lock's sha256 here and again inside the build."""
    folder = STATE / "wheels" / lock
    folder.mkdir(parents=True, exist_ok=True)
    command([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes",
             "--only-binary=:all:", "--dest", str(folder), "-r", str(ROOT / "locks" / f"{lock}.txt")])
    simple = folder / "simple"
    shutil.rmtree(simple, ignore_errors=True)
    by_project: dict[str, list[str]] = {}
    for wheel in sorted(folder.glob("*.whl")):
        by_project.setdefault(re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower(), []).append(wheel.name)
    for project, files in by_project.items():
        (simple / project).mkdir(parents=True)
        links = "".join(f'<a href="../../{html.escape(f)}">{html.escape(f)}</a>\n' for f in files)
        (simple / project / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
    return folder


def size_mib(image: str) -> float:
    out = run("image", "inspect", "--format", "{{.Size}}", image, quiet=True)
    return round(int(out.split()[0]) / 2**20, 1)


def build(kind: str = "cpu") -> dict:
    """Build containers/Dockerfile.<kind> from the local base and the wheelhouse; returns the report."""
    started = time.monotonic()
    base = base_image() if engine() == "podman" else "the Dockerfile's FROM"
    wheels = wheelhouse(kind) if engine() == "podman" else None
    index = "file:///wheels/simple"
    dockerfile = ROOT / "containers" / f"Dockerfile.{kind}"
    torch_index = ["--build-arg", f"TORCH_INDEX_URL={index}"] if kind == "cpu" else []  # gpu: torch is on PyPI
    args = ["build", "--file", str(dockerfile), "--tag", tag(kind), "--build-arg", f"PIP_INDEX_URL={index}",
            *torch_index, "--volume", f"{wheels}:/wheels:ro"]
    if engine() == "podman":
        args += ["--from", base, "--ignorefile", f"{dockerfile}.dockerignore", "--network", "none"]
        args += [f"--ulimit={limit}" for limit in ulimits()]  # builds do not read containers.conf's limits
    else:  # docker builds online: its base from the registry, the wheels from PyPI and PyTorch's index
        args = ["build", "--file", str(dockerfile), "--tag", tag(kind)]
    run(*args, str(ROOT))
    report = {"image": tag(kind), "engine": engine(), "base": base, "seconds": round(time.monotonic() - started, 1),
              "size_mib": size_mib(tag(kind)), "lock": f"locks/{kind}.txt"}
    out = STATE / "images" / f"tuneline-{kind}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["build", "base"])
    parser.add_argument("--gpu", action="store_true", help="also the GPU image (needs the CUDA wheels)")
    parser.add_argument("--rebuild-base", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.what == "base":
            print(base_image(rebuild=args.rebuild_base))
            return 0
        if args.rebuild_base:
            base_image(rebuild=True)
        for kind in ["cpu"] + (["gpu"] if args.gpu else []):
            build(kind)
    except ImageError as exc:
        print(f"images: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
