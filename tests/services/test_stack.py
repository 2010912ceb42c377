"""The real local stack (services/stack.py): SeaweedFS S3 + MLflow, and the Prefect server.

One stack per module, in a tmp state dir on free ports, so a developer's own stack (on the
default ports) keeps running. The tests run in file order: the last one stops the stack.
"""

import json
import os
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request

import boto3
import pytest
from botocore.exceptions import ClientError

from helpers import free_weed_base
from services.stack import ServiceConfig, ServiceError, client_env, down, status, up, urls

pytestmark = pytest.mark.services


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _weed_ports(base: int) -> set[int]:
    """What the module promises: s3/master/volume/filer/admin on base..base+4, gRPC at +10000."""
    return {base + i for i in range(5)} | {base + i + 10000 for i in range(5)}


def _free_ports(avoid: set[int]) -> tuple[int, set[int], int, int]:
    """A SeaweedFS base with all ten ports free, then two more free ports (bound to port 0) outside them."""
    base = free_weed_base(20000)
    taken, others = avoid | _weed_ports(base), []
    while len(others) < 2:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            taken.add(port)
            others.append(port)
    return base, _weed_ports(base), *others


def _live_group_members(pgids: list[int]) -> list[int]:
    """Non-zombie processes in these process groups (zombies stay where PID 1 never reaps them)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):  # exited meanwhile
            continue
        if int(fields[2]) in pgids and fields[0] != "Z":
            found.append(int(entry))
    return found


def _records(cfg: ServiceConfig) -> list[str]:
    return sorted(p.name for p in cfg.state_dir.glob("*.json") if p.name != "credentials.json")


def _s3(cfg: ServiceConfig, key: str, secret: str):
    return boto3.client("s3", endpoint_url=urls(cfg)["s3"], region_name="us-east-1",
                        aws_access_key_id=key, aws_secret_access_key=secret)


def _get(url: str) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    base, _, mlflow_port, prefect_port = _free_ports(set())
    cfg = ServiceConfig(tmp_path_factory.mktemp("tuneline") / "services", s3_port=base,
                        mlflow_port=mlflow_port, prefect_port=prefect_port, bucket="tl-test")
    # A record left by a process that has died: up() must replace it, not trust it.
    cfg.state_dir.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (cfg.state_dir / "mlflow.json").write_text(json.dumps({"pid": dead.pid, "port": mlflow_port}))
    try:
        t0 = time.monotonic()
        env = up(cfg, prefect=False)
        yield {"cfg": cfg, "env": env, "up_s": time.monotonic() - t0, "stale_pid": dead.pid}
    finally:
        down(cfg)  # also when a test failed half-way


def test_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNELINE_HOME", str(tmp_path))
    monkeypatch.setenv("TUNELINE_S3_PORT", "28333")
    monkeypatch.setenv("TUNELINE_MLFLOW_PORT", "25000")
    monkeypatch.delenv("TUNELINE_PREFECT_PORT", raising=False)
    monkeypatch.setenv("TUNELINE_BUCKET", "other")
    cfg = ServiceConfig.from_env()
    assert (cfg.state_dir, cfg.s3_port, cfg.mlflow_port, cfg.prefect_port, cfg.bucket) == (
        tmp_path / "services", 28333, 25000, 4200, "other")
    monkeypatch.setenv("TUNELINE_S3_PORT", "60000")  # its gRPC ports would pass 65535
    with pytest.raises(ServiceError, match="s3_port"):
        ServiceConfig.from_env()
    with pytest.raises(ServiceError, match="overlap"):  # mlflow on SeaweedFS's master gRPC port
        ServiceConfig(tmp_path, s3_port=28333, mlflow_port=38334)


def test_backend_and_auth_options(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNELINE_HOME", str(tmp_path))
    for var in ("TUNELINE_S3_PORT", "TUNELINE_MLFLOW_PORT", "TUNELINE_PREFECT_PORT", "TUNELINE_BUCKET"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TUNELINE_DB_BACKEND", "postgres")
    monkeypatch.setenv("TUNELINE_DB_PORT", "25433")
    monkeypatch.delenv("TUNELINE_INSECURE", raising=False)
    cfg = ServiceConfig.from_env()
    assert (cfg.backend, cfg.db_port, cfg.insecure, cfg.mlflow_auth) == ("postgres", 25433, False, True)
    assert cfg.with_options("sqlite", True).backend == "sqlite" and not cfg.with_options("sqlite", True).mlflow_auth
    assert cfg.with_options().mlflow_auth
    monkeypatch.setenv("TUNELINE_INSECURE", "1")
    assert ServiceConfig.from_env().insecure
    # The database URL carries no password (argv is readable by every local user).
    assert urls(cfg)["postgres"] == "postgresql://tuneline@127.0.0.1:25433"
    with pytest.raises(ServiceError, match="backend must be one of sqlite, postgres"):
        ServiceConfig(tmp_path, backend="mysql")
    with pytest.raises(ServiceError, match="overlap"):
        ServiceConfig(tmp_path, backend="postgres", db_port=5000)  # MLflow's port


def test_busy_port_is_refused_before_anything_starts(tmp_path):
    base, _, mlflow_port, prefect_port = _free_ports(set())
    cfg = ServiceConfig(tmp_path / "services", s3_port=base, mlflow_port=mlflow_port, prefect_port=prefect_port)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", mlflow_port))
        squatter.listen()
        with pytest.raises(ServiceError, match=f"{mlflow_port}.*in use"):
            up(cfg, prefect=False)
    assert _records(cfg) == [], "nothing may have been started"
    assert all(_port_free(p) for p in _weed_ports(base))


def test_up_is_running_and_idempotent(stack):
    cfg = stack["cfg"]
    st = status(cfg)
    assert st["s3"]["running"] and st["mlflow"]["running"] and not st["prefect"]["running"]
    assert st["mlflow"]["pid"] != stack["stale_pid"]
    assert st["prefect"]["pid"] is None and st["s3"]["url"] == urls(cfg)["s3"]
    assert up(cfg, prefect=False) == stack["env"]  # a second up starts nothing: the same processes answer
    assert {n: s["pid"] for n, s in status(cfg).items()} == {n: s["pid"] for n, s in st.items()}
    env = stack["env"]
    assert "PREFECT_API_URL" not in env
    assert env["TUNELINE_S3_ENDPOINT_URL"] == env["MLFLOW_S3_ENDPOINT_URL"] == urls(cfg)["s3"]
    assert env["MLFLOW_TRACKING_URI"] == urls(cfg)["mlflow"] and env["TUNELINE_BUCKET"] == "tl-test"
    assert env["DO_NOT_TRACK"] == "1" and env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    # The running stack is locked down: asking for the open mode restarts nothing and says how.
    with pytest.raises(ServiceError, match=r"another mode\): `tuneline services down`, then up again"):
        up(cfg.with_options(insecure=True), prefect=False)
    assert {n: s["pid"] for n, s in status(cfg).items()} == {n: s["pid"] for n, s in st.items()}


def test_weed_listens_only_on_ports_derived_from_the_base(stack):
    psutil = pytest.importorskip("psutil")
    cfg = stack["cfg"]
    proc = psutil.Process(status(cfg)["s3"]["pid"])
    listening = {c.laddr.port for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    assert listening == _weed_ports(cfg.s3_port)


def test_s3_requires_the_generated_credentials(stack):
    cfg, env = stack["cfg"], stack["env"]
    s3 = _s3(cfg, env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
    s3.put_object(Bucket=cfg.bucket, Key="probe/hello.txt", Body=b"hello")
    assert s3.get_object(Bucket=cfg.bucket, Key="probe/hello.txt")["Body"].read() == b"hello"
    for key, secret in [(env["AWS_ACCESS_KEY_ID"], "wrong" * 8), ("AKIAWRONGWRONGWRONG0", env["AWS_SECRET_ACCESS_KEY"])]:
        with pytest.raises(ClientError) as err:
            _s3(cfg, key, secret).get_object(Bucket=cfg.bucket, Key="probe/hello.txt")
        assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert _get(f"{urls(cfg)['s3']}/{cfg.bucket}/probe/hello.txt")[0] == 403  # anonymous


def test_s3_conditional_create(stack):
    """The artifact store commits manifests with IfNoneMatch="*": a second create must fail with 412."""
    cfg, env = stack["cfg"], stack["env"]
    s3 = _s3(cfg, env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
    s3.put_object(Bucket=cfg.bucket, Key="probe/_MANIFEST.json", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as err:
        s3.put_object(Bucket=cfg.bucket, Key="probe/_MANIFEST.json", Body=b"second", IfNoneMatch="*")
    assert err.value.response["Error"]["Code"] == "PreconditionFailed"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert s3.get_object(Bucket=cfg.bucket, Key="probe/_MANIFEST.json")["Body"].read() == b"first"


def test_mlflow_answers_and_stores_artifacts_in_s3(stack, tmp_path, monkeypatch):
    cfg, env = stack["cfg"], stack["env"]
    assert _get(f"{urls(cfg)['mlflow']}/health") == (200, b"OK")
    from mlflow import MlflowClient

    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # the pipeline's own user
        monkeypatch.setenv(var, env[var])
    # The client holds no S3 keys: the server proxies artifacts to S3 with its own.
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    run = client.create_run(client.create_experiment("services-test"))
    (tmp_path / "note.txt").write_text("stored in s3")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
    s3 = _s3(cfg, env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=cfg.bucket, Prefix="mlflow/")["Contents"]]
    assert any(k.endswith(f"{run.info.run_id}/artifacts/note.txt") for k in keys), keys


def test_prefect_server(stack):
    cfg = stack["cfg"]
    env = up(cfg, prefect=True)  # s3 and mlflow already run: only prefect starts (~15 s here)
    assert env["PREFECT_API_URL"] == f"{urls(cfg)['prefect_ui']}/api"
    assert _get(f"{env['PREFECT_API_URL']}/health") == (200, b"true")
    assert (cfg.state_dir / "prefect").is_dir()  # PREFECT_HOME stays in the state dir
    assert client_env(cfg) == env


def test_credentials_never_written_outside_their_file(stack):
    cfg, env = stack["cfg"], stack["env"]
    creds = cfg.state_dir / "credentials.json"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    secrets = [env["AWS_ACCESS_KEY_ID"].encode(), env["AWS_SECRET_ACCESS_KEY"].encode()]
    logs = list((cfg.state_dir / "logs").glob("*.log"))
    assert {p.name for p in logs} == {"s3.log", "mlflow.log", "prefect.log"}
    for path in cfg.state_dir.rglob("*"):
        if path.is_file() and path != creds:
            data = path.read_bytes()
            assert not any(s in data for s in secrets), f"credentials found in {path}"


def test_down_stops_everything(stack):
    cfg = stack["cfg"]
    pids = [s["pid"] for s in status(cfg).values()]
    down(cfg)
    st = status(cfg)
    assert not any(s["running"] for s in st.values()) and all(s["pid"] is None for s in st.values())
    ports = _weed_ports(cfg.s3_port) | {cfg.mlflow_port, cfg.prefect_port}
    assert [p for p in sorted(ports) if not _port_free(p)] == []
    assert _records(cfg) == [] and (cfg.state_dir / "credentials.json").exists()
    assert _live_group_members(pids) == []
    down(cfg)  # stopping a stopped stack is harmless
