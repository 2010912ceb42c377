"""Security at run time, on a real pipeline run against the production-shaped stack
(MLflow with basic auth, MLflow and Prefect on PostgreSQL; tests/reliability/prod_stack.py):

- MLflow refuses a client without the right user and password (401), the pipeline registers with them;
- no secret (S3 keys, MLflow and database passwords, the CSRF key) appears in the run's log records,
  its Prefect API logs, its flow-run parameters, its task results, its MLflow run, the services' logs
  and files, or a server's command line;
- task results are JSON documents (no pickles) and every stored weight file is safetensors.

The code-level half of the same properties is tests/reliability/test_code_scan.py.

    .venv/bin/python -m pytest -q tests/reliability/test_security.py
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request

import pytest

from prod_stack import client_of, report_section  # fixtures: tests/reliability/conftest.py

pytestmark = pytest.mark.services
PICKLE_OR_ZIP = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")  # torch.save writes a zip of pickles
# The files made to hold secrets (mode 600, in the private state dir); every other file is scanned.
SECRET_FILES = {"credentials.json", "security.toml", "weed-options", "node.key", "mini.options"}
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".h5", ".npy", ".npz")


def _request(url: str, user: str | None = None, password: str | None = None, data: dict | None = None) -> int:
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data is not None else None,
                                 headers={"Content-Type": "application/json"})
    if user is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def leaks(text: str, secrets: dict[str, str]) -> list[str]:
    """Names of the secrets found in text (names only: the report must not repeat the values)."""
    return sorted(name for name, value in secrets.items() if value in text)


def _s3(prod_stack):
    import boto3

    env = prod_stack["env"]
    return boto3.client("s3", endpoint_url=env["TUNELINE_S3_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


def _objects(prod_stack, prefix: str = "") -> dict[str, int]:
    """Key -> size of every object under prefix."""
    pages = _s3(prod_stack).get_paginator("list_objects_v2").paginate(Bucket=prod_stack["cfg"].bucket, Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def test_mlflow_refuses_clients_without_the_password(prod_stack, first_run):
    env = prod_stack["env"]
    user, password, api = env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"], env["MLFLOW_TRACKING_URI"]
    search = f"{api}/api/2.0/mlflow/registered-models/search?max_results=5"
    create = f"{api}/api/2.0/mlflow/experiments/create"
    codes = {
        "health, anonymous": _request(f"{api}/health"),
        "read, anonymous": _request(search),
        "write, anonymous": _request(create, data={"name": "intruder"}),
        "read, wrong password": _request(search, user, password + "x"),
        "read, unknown user": _request(search, "admin", password),
        "read, with the password": _request(search, user, password),
    }
    assert codes == {"health, anonymous": 200, "read, anonymous": 401, "write, anonymous": 401,
                     "read, wrong password": 401, "read, unknown user": 401, "read, with the password": 200}

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    with client_of(env):
        # The pipeline registered its version through the auth layer with the client env's credentials.
        versions = MlflowClient().search_model_versions(f"name = '{first_run.model_name}'")
        assert first_run.runs[0]["summary"]["version"]["version"] in [v.version for v in versions]
        os.environ.pop("MLFLOW_TRACKING_USERNAME")
        os.environ.pop("MLFLOW_TRACKING_PASSWORD")
        with pytest.raises(MlflowException, match="401|nauthorized|credentials"):
            MlflowClient().search_model_versions(f"name = '{first_run.model_name}'")
    report_section("security", {"mlflow_auth_http_status": codes})


def test_the_secret_scan_can_fail(prod_stack, first_run):
    """The scan below proves something only if the secrets are real, distinct and long enough to
    never occur by chance, and if it finds a secret where there is one."""
    secrets = first_run.secrets
    assert {"access_key_id", "secret_access_key", "db_password", "mlflow_password", "mlflow_flask_secret"} <= set(secrets)
    assert all(len(v) >= 16 for v in secrets.values()) and len(set(secrets.values())) == len(secrets) - 1
    assert leaks(f"boto said {secrets['secret_access_key']}!", secrets) == ["secret_access_key"]
    assert leaks(json.dumps({"url": f"postgresql://u:{secrets['db_password']}@h/db"}), secrets) == ["db_password"]


def test_no_secret_in_logs_parameters_results_or_the_registry(prod_stack, first_run):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    secrets, run = first_run.secrets, first_run.runs[0]
    found: dict[str, list[str]] = {}
    scanned: dict[str, int] = {}

    def scan(where: str, texts: list[str]) -> None:
        scanned[where] = len(texts)
        hits = sorted({name for text in texts for name in leaks(text, secrets)})
        if hits:
            found[where] = hits

    scan("log records of the run's process", first_run.log_lines)
    with client_of(prod_stack["env"]):
        with get_client(sync_client=True) as prefect:
            flow_run = prefect.read_flow_run(run["flow_run_id"])
            api_logs = prefect.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
            task_runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
        scan("Prefect API logs", [log.message for log in api_logs])
        scan("flow-run parameters", [json.dumps(flow_run.parameters, default=str)])
        scan("task-run records", [r.model_dump_json() for r in task_runs])
        client = MlflowClient()
        version = client.get_model_version(first_run.model_name, run["summary"]["version"]["version"])
        mlrun = client.get_run(version.run_id)
        scan("MLflow run params, tags and model card",
             [json.dumps(mlrun.data.params), json.dumps(mlrun.data.tags), version.description or "",
              json.dumps(version.tags)])
    s3 = _s3(prod_stack)
    results = _objects(prod_stack, "prefect-results/")
    scan("task results in S3", [s3.get_object(Bucket=prod_stack["cfg"].bucket, Key=k)["Body"].read().decode()
                                for k in results])
    state = prod_stack["cfg"].state_dir
    files = [p for p in state.rglob("*") if p.is_file() and p.name not in SECRET_FILES]
    assert {p.name for p in state.rglob("*") if p.name in SECRET_FILES} == SECRET_FILES
    assert all(p.stat().st_mode & 0o077 == 0 for p in state.rglob("*") if p.name in SECRET_FILES)
    scan("services' logs and state files", [p.read_bytes().decode(errors="replace") for p in files])
    scan("services' command lines", _command_lines(prod_stack))

    assert found == {}
    assert scanned["log records of the run's process"] > 30 and scanned["Prefect API logs"] > 10
    assert any("Completed" in line for line in first_run.log_lines)  # the capture saw the run to its end
    assert scanned["task results in S3"] >= 8 and scanned["services' command lines"] >= 3
    report_section("security", {"secret_scan": {"secrets": len(secrets), "texts_scanned": scanned, "found": 0}})


def _command_lines(prod_stack) -> list[str]:
    """argv of every process of the stack's services (argv is readable by every local user)."""
    groups = {json.loads((prod_stack["cfg"].state_dir / f"{n}.json").read_text())["pid"]
              for n in ("postgres", "s3", "mlflow", "prefect") if (prod_stack["cfg"].state_dir / f"{n}.json").exists()}
    out = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            if int(fields[2]) in groups:
                out.append(open(f"/proc/{entry}/cmdline", "rb").read().replace(b"\0", b" ").decode())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def test_task_results_are_json_documents(prod_stack, first_run):
    s3 = _s3(prod_stack)
    keys = _objects(prod_stack, "prefect-results/")
    serializers = set()
    for key in keys:
        body = s3.get_object(Bucket=prod_stack["cfg"].bucket, Key=key)["Body"].read()
        assert not body.startswith(PICKLE_OR_ZIP), key
        record = json.loads(body)  # raises on anything but JSON
        serializers.add(record["metadata"]["serializer"]["type"])
    assert len(keys) >= 8 and serializers == {"json"}, (len(keys), serializers)
    report_section("security", {"task_results": {"objects": len(keys), "serializers": sorted(serializers)}})


def _code_zip(s3, bucket: str, key: str) -> bool:
    """The served model's ``code`` artifact: a zip of source and text files only (no pickle inside, unlike a
    torch.save zip, whose members include data.pkl)."""
    import io
    import zipfile

    if not key.endswith("/steps.zip"):
        return False
    with zipfile.ZipFile(io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read())) as archive:
        return all(name.endswith((".py", ".md", ".txt", ".tsv")) and not archive.read(name).startswith(PICKLE_OR_ZIP)
                   for name in archive.namelist())


def test_weights_are_stored_only_as_safetensors(prod_stack, first_run):
    """Every object the run stored (artifacts, checkpoints, the registered model) is read: no
    pickle or torch zip by content, no weight file by name other than .safetensors."""
    s3, bucket = _s3(prod_stack), prod_stack["cfg"].bucket
    keys = _objects(prod_stack)
    bad, safetensors = [], 0
    for key, size in keys.items():
        head = s3.get_object(Bucket=bucket, Key=key, Range="bytes=0-7")["Body"].read() if size else b""
        if key.lower().endswith(WEIGHT_SUFFIXES) or (head.startswith(PICKLE_OR_ZIP) and not _code_zip(s3, bucket, key)):
            bad.append(key)
        safetensors += key.endswith(".safetensors")
    registered = [k for k in keys if k.startswith("mlflow/") and k.endswith(".safetensors")]
    assert bad == []
    assert safetensors >= 3 and registered, (safetensors, registered)  # base, adapter, checkpoint; the registry's copy
    report_section("security", {"stored_objects": {"read": len(keys), "safetensors": safetensors, "pickles": 0}})
