"""Every door of the default stack (``tuneline services up``, as ``make run`` starts it), tried as an
attacker with a shell on the same machine would: without the generated credentials each one refuses,
and the artifact the probes aim at is still there afterwards. The insecure mode's open doors show
that the probes are real.

    .venv/bin/python -m pytest -q -n 0 tests/reliability/test_doors.py
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from helpers import free_port, free_weed_base

pytestmark = pytest.mark.services
EVIL = "http://evil.example"  # a web page's origin: cross-origin requests from a browser
ARTIFACT = "mlflow/doors/weights.safetensors"


def _request(url: str, method: str = "GET", data: bytes | None = None, headers: dict | None = None,
             auth: tuple[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    headers = dict(headers or {})
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=15) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def _stack(tmp_path_factory, insecure: bool, prefect: bool):
    from services.stack import ServiceConfig

    base = free_weed_base(40000)
    weed = {base + i for i in range(5)} | {base + 10000 + i for i in range(5)}
    ports = []
    while len(ports) < 2:
        port = free_port()
        if port not in weed and port not in ports:
            ports.append(port)
    return ServiceConfig(tmp_path_factory.mktemp("doors") / "services", s3_port=base, mlflow_port=ports[0],
                         prefect_port=ports[1], bucket="tuneline-doors", insecure=insecure)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The default stack (SQLite, Prefect included) with one artifact in the bucket."""
    from services.stack import down, up

    cfg = _stack(tmp_path_factory, insecure=False, prefect=True)
    try:
        env = up(cfg, prefect=True)
        _s3(env).put_object(Bucket=cfg.bucket, Key=ARTIFACT, Body=b"the real weights")
        yield {"cfg": cfg, "env": env, "creds": json.loads((cfg.state_dir / "credentials.json").read_text())}
    finally:
        down(cfg)


def _s3(env: dict[str, str]):
    import boto3

    return boto3.client("s3", endpoint_url=env["TUNELINE_S3_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


def _port(stack, component: str) -> int:
    return stack["cfg"].s3_port + ("s3", "master", "volume", "filer", "admin").index(component)


def _artifact_intact(stack) -> bool:
    body = _s3(stack["env"]).get_object(Bucket=stack["cfg"].bucket, Key=ARTIFACT)["Body"].read()
    return body == b"the real weights"


def test_s3_refuses_requests_without_the_keys(stack):
    url = f"{stack['env']['TUNELINE_S3_ENDPOINT_URL']}/{stack['cfg'].bucket}/{ARTIFACT}"
    assert _request(url)[0] == 403
    assert _request(url, "PUT", b"evil")[0] == 403
    assert _request(url, "DELETE")[0] == 403
    status, headers, _ = _request(url, "OPTIONS", headers={"Origin": EVIL, "Access-Control-Request-Method": "GET"})
    assert headers.get("access-control-allow-origin") not in (EVIL, "*")
    assert _artifact_intact(stack)


def test_the_filer_answers_nothing_over_http(stack):
    """List, download, overwrite, delete and a web page's cross-origin POST: all refused."""
    filer = f"http://127.0.0.1:{_port(stack, 'filer')}/buckets/{stack['cfg'].bucket}"
    attempts = {
        "list": _request(f"{filer}/mlflow/doors/", headers={"Accept": "application/json"}),
        "download": _request(f"{filer}/{ARTIFACT}"),
        "overwrite": _request(f"{filer}/{ARTIFACT}", "PUT", b"evil", {"Content-Type": "text/plain"}),
        "create": _request(f"{filer}/mlflow/doors/evil.txt", "POST", b"evil", {"Content-Type": "text/plain"}),
        "cross-origin POST": _request(f"{filer}/mlflow/doors/evil.txt", "POST", b"evil",
                                      {"Content-Type": "text/plain", "Origin": EVIL}),
        "delete": _request(f"{filer}/{ARTIFACT}", "DELETE"),
    }
    assert {name: status for name, (status, _, _) in attempts.items() if status < 400} == {}
    assert all(b"the real weights" not in body for _, _, body in attempts.values())
    assert _artifact_intact(stack)
    keys = [o["Key"] for o in _s3(stack["env"]).list_objects_v2(Bucket=stack["cfg"].bucket).get("Contents", [])]
    assert "mlflow/doors/evil.txt" not in keys


def test_the_master_and_volume_servers_refuse_unsigned_requests(stack):
    """No volume assignment, no collection (bucket) deletion, no blob read, write or delete without a
    JWT signed with the stack's keys."""
    master, volume = (f"http://127.0.0.1:{_port(stack, c)}" for c in ("master", "volume"))
    attempts = {
        "assign": _request(f"{master}/dir/assign"),
        "delete the bucket's collection": _request(f"{master}/col/delete?collection={stack['cfg'].bucket}"),
        "grow volumes": _request(f"{master}/vol/grow?count=1"),
        "read a blob": _request(f"{volume}/1,0123456789"),
        "write a blob": _request(f"{volume}/1,0123456789", "POST", b"evil", {"Content-Type": "text/plain"}),
        "delete a blob": _request(f"{volume}/1,0123456789", "DELETE"),
        "delete a volume": _request(f"{volume}/admin/volume/delete?volume=1"),
    }
    assert {name: status for name, (status, _, _) in attempts.items() if status < 400} == {}
    assert _artifact_intact(stack)


def test_the_admin_ui_asks_for_a_password(stack):
    admin = f"http://127.0.0.1:{_port(stack, 'admin')}"
    status, _, body = _request(f"{admin}/api/cluster/topology")
    assert status == 401, body[:200]
    assert b"Login" in _request(f"{admin}/")[2]
    argv = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in _group(stack, "s3")]
    assert not any(stack["creds"]["weed_admin_password"].encode() in a for a in argv)  # in a mode-600 file, not argv


def _group(stack, name: str) -> list[str]:
    pgid = json.loads((stack["cfg"].state_dir / f"{name}.json").read_text())["pid"]
    return [p for p in os.listdir("/proc") if p.isdigit() and _pgid(p) == pgid]


def _pgid(pid: str) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError):
        return None


def _weed_shell(stack, cwd: Path, timeout: float = 20) -> str:
    from services.stack import _weed_binary

    master = f"127.0.0.1:{_port(stack, 'master')}"
    try:
        done = subprocess.run([_weed_binary(), "shell", f"-master={master}"], input="collection.list\nexit\n",
                              capture_output=True, text=True, cwd=cwd, timeout=timeout,
                              env={**os.environ, "HOME": str(cwd)})
        return done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        return (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")


def test_grpc_needs_the_stacks_client_certificate(stack, tmp_path):
    """`weed shell` (collection.delete would erase a bucket) gets nowhere without the certificate; with
    the stack's own security.toml it lists the bucket's collection, so the probe is real."""
    outsider = tmp_path / "outsider"
    outsider.mkdir()
    assert f'collection:"{stack["cfg"].bucket}"' not in _weed_shell(stack, outsider, timeout=10)
    insider = tmp_path / "insider"
    insider.mkdir()
    (insider / "security.toml").write_text((stack["cfg"].state_dir / "security.toml").read_text())
    assert f'collection:"{stack["cfg"].bucket}"' in _weed_shell(stack, insider, timeout=60)
    assert _artifact_intact(stack)


def test_mlflow_refuses_anonymous_and_wrong_credentials(stack):
    from services.stack import urls

    api = f"{urls(stack['cfg'])['mlflow']}/api/2.0"
    json_body = {"Content-Type": "application/json"}
    creds = stack["creds"]
    anonymous = {
        "search models": _request(f"{api}/mlflow/registered-models/search"),
        "create a model": _request(f"{api}/mlflow/registered-models/create", "POST", b'{"name": "evil"}', json_body),
        "move @champion": _request(f"{api}/mlflow/registered-models/alias", "POST",
                                   b'{"name": "m", "alias": "champion", "version": "1"}', json_body),
        "delete @champion": _request(f"{api}/mlflow/registered-models/alias?name=m&alias=champion", "DELETE"),
        "list artifacts": _request(f"{api}/mlflow-artifacts/artifacts?path=doors"),
        "download an artifact": _request(f"{api}/mlflow-artifacts/artifacts/doors/weights.safetensors"),
        "upload an artifact": _request(f"{api}/mlflow-artifacts/artifacts/doors/serving.py", "PUT", b"evil"),
        "delete an artifact": _request(f"{api}/mlflow-artifacts/artifacts/doors/weights.safetensors", "DELETE"),
    }
    assert {name: status for name, (status, _, _) in anonymous.items() if status != 401} == {}
    wrong = _request(f"{api}/mlflow/registered-models/search", auth=("pipeline", creds["pipeline_password"] + "x"))
    assert wrong[0] == 401
    # The pipeline's own user works, and is no admin: it cannot make users.
    assert _request(f"{api}/mlflow/registered-models/search", auth=("pipeline", creds["pipeline_password"]))[0] == 200
    made = _request(f"{api}/mlflow/users/create", "POST", b'{"username": "evil", "password": "Evil-password-123"}',
                    json_body, auth=("pipeline", creds["pipeline_password"]))
    assert made[0] == 403
    assert _artifact_intact(stack)


def test_prefect_refuses_anonymous_requests_foreign_origins_and_forged_posts(stack):
    """Without the auth string nothing is read or deployed (a deployment's job runs a shell command on
    whichever worker polls its pool); with it but without a CSRF token nothing changes; a web page
    from another origin gets no CORS grant."""
    from services.stack import prefect_auth_string, urls

    ui = urls(stack["cfg"])["prefect_ui"]
    api = f"{ui}/api"
    user, password = prefect_auth_string(stack["cfg"]).split(":", 1)
    deployment = json.dumps({"name": "evil", "flow_id": "00000000-0000-0000-0000-000000000000",
                             "work_pool_name": "tuneline-process",
                             "job_variables": {"command": "sh -c 'touch /tmp/owned'"}}).encode()
    json_body = {"Content-Type": "application/json"}
    anonymous = {
        "read the version": _request(f"{api}/admin/version"),
        "list flow runs": _request(f"{api}/flow_runs/filter", "POST", b"{}", json_body),
        "get a CSRF token": _request(f"{api}/csrf-token?client=evil"),
        "create a deployment": _request(f"{api}/deployments/", "POST", deployment, json_body),
    }
    assert {name: status for name, (status, _, _) in anonymous.items() if status not in (401, 403)} == {}
    forged = _request(f"{api}/deployments/", "POST", deployment, json_body, auth=(user, password))
    assert forged[0] == 403 and b"CSRF" in forged[2]
    foreign = _request(f"{api}/flow_runs/filter", "OPTIONS",
                       headers={"Origin": EVIL, "Access-Control-Request-Method": "POST"})
    assert foreign[1].get("access-control-allow-origin") not in (EVIL, "*")
    own = _request(f"{api}/flow_runs/filter", "OPTIONS", headers={"Origin": ui, "Access-Control-Request-Method": "POST"})
    assert own[1].get("access-control-allow-origin") == ui
    assert _request(f"{api}/admin/version", auth=(user, password))[0] == 200
    assert _request(f"{api}/health")[0] == 200  # probes of liveness stay open


def test_the_pipeline_runs_a_flow_through_the_locked_doors(stack):
    """Prefect's client with the stack's environment (auth string, CSRF token) records a flow run."""
    code = ("from prefect import flow\n"
            "@flow\ndef hello():\n    return 41 + 1\n"
            "print('result', hello())\n")
    env = {**os.environ, **stack["env"], "PREFECT_HOME": str(stack["cfg"].state_dir.parent / "prefect-home")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0 and "result 42" in done.stdout, done.stderr[-2000:]


def test_insecure_mode_opens_the_doors_and_says_so(tmp_path_factory, capsys):
    """The probes above are real: in insecure mode the same requests go through."""
    from services.stack import down, up

    cfg = _stack(tmp_path_factory, insecure=True, prefect=False)
    try:
        env = up(cfg, prefect=False)
        assert "INSECURE MODE" in capsys.readouterr().err
        assert "MLFLOW_TRACKING_PASSWORD" not in env
        _s3(env).put_object(Bucket=cfg.bucket, Key=ARTIFACT, Body=b"the real weights")
        filer = f"http://127.0.0.1:{cfg.s3_port + 3}/buckets/{cfg.bucket}/{ARTIFACT}"
        status, _, body = _request(filer)
        assert (status, body) == (200, b"the real weights")
        assert _request(f"http://127.0.0.1:{cfg.mlflow_port}/api/2.0/mlflow/registered-models/search")[0] == 200
        assert not (cfg.state_dir / "security.toml").exists()
    finally:
        down(cfg)
