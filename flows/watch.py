"""Data-triggered retraining: the ``tuneline-watch`` sensor flow.

One pass lists an S3 prefix and starts one run of a ``tuneline-finetune`` deployment per new
object, with ``ingest.source=s3://<bucket>/<key>`` and every other parameter as the deployment
has it. Deployed as ``tuneline-watch/incoming`` with an interval schedule
(deployments/prefect.yaml); one pass can also be run by hand:

    python -c "from flows.watch import watch; watch('s3://tuneline/incoming/')"

An object is "new" until the sensor has left a marker for it: a small JSON object at
``s3://<bucket>/<state_prefix>/<deployment>/<id>.json`` where ``id`` hashes the object's key and
ETag, so a re-upload with other content under the same key counts as new, and an unchanged
object never starts a second run. The marker is written (create-only) after the run is created,
and the run is created with an idempotency key made of the same id: a pass that dies between
the two, or two passes at once, still end with one run per object.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import os
from pathlib import PurePosixPath
from typing import Any

from prefect import flow, get_run_logger

from flows.pages import DATA_TRIGGERED
from steps.config import PipelineParams
from steps.core.errors import ConfigError

FLOW_NAME = "tuneline-watch"


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not bucket:
        raise ConfigError(f"prefix {uri!r} is not of the form s3://bucket/prefix/")
    return bucket, key


def _objects(s3: Any, bucket: str, prefix: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found += page.get("Contents", [])
    return found


def marker_id(bucket: str, key: str, etag: str) -> str:
    return hashlib.sha256(f"{bucket}/{key}\n{etag.strip(chr(34))}".encode()).hexdigest()[:32]


def deployment_parameters(deployment: str) -> dict[str, Any]:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        found = client.read_deployment_by_name(deployment)
    return copy.deepcopy(found.parameters or {})


@flow(name=FLOW_NAME, persist_result=False)
def watch(
    prefix: str,
    deployment: str = "tuneline-finetune/default",
    suffixes: tuple[str, ...] = (".jsonl",),
    state_prefix: str = "_tuneline-watch",
    max_runs: int = 10,
) -> list[dict[str, str]]:
    """Start a run of `deployment` for each new object under `prefix`, with ingest.source set to it.

    Args:
        prefix: The watched location, s3://bucket/prefix/ (same endpoint and credentials as the artifact store).
        deployment: The tuneline-finetune deployment to run, as flow-name/deployment-name.
        suffixes: Only keys ending with one of these start a run.
        state_prefix: Key prefix, in the watched bucket, of the markers of objects already handled.
        max_runs: Most runs one pass starts (the oldest new objects first; the rest wait for the next pass).
    """
    from botocore.exceptions import ClientError
    from prefect.deployments import run_deployment

    from steps.core.store import s3_client

    log = get_run_logger()
    bucket, key_prefix = _split(prefix)
    state = f"{state_prefix.strip('/')}/{deployment.replace('/', '--')}/"
    s3 = s3_client(os.environ.get("TUNELINE_S3_ENDPOINT_URL") or None)
    done = {PurePosixPath(o["Key"]).stem for o in _objects(s3, bucket, state)}
    candidates = sorted(
        (o for o in _objects(s3, bucket, key_prefix)
         if o["Key"].endswith(tuple(suffixes)) and not o["Key"].startswith(state_prefix.strip("/") + "/")
         and o.get("Size", 0) > 0),
        key=lambda o: (o["LastModified"], o["Key"]),
    )
    new = [(o, mid) for o in candidates if (mid := marker_id(bucket, o["Key"], o["ETag"])) not in done]
    log.info("%s: %d object(s), %d new", prefix, len(candidates), len(new))
    if not new:
        return []

    base = deployment_parameters(deployment)
    started = []
    for obj, mid in new[:max_runs]:
        source = f"s3://{bucket}/{obj['Key']}"
        parameters = copy.deepcopy(base)
        params = parameters.setdefault("params", {})
        params.setdefault("ingest", {})["source"] = source
        PipelineParams.parse(params, origin=f"parameters of {deployment} with ingest.source={source}")
        run = run_deployment(
            deployment,
            parameters=parameters,
            timeout=0,
            as_subflow=False,
            idempotency_key=f"{FLOW_NAME}:{mid}",
            flow_run_name=f"data-{PurePosixPath(obj['Key']).name}"[:100],
            tags=[FLOW_NAME, DATA_TRIGGERED],
        )
        marker = {"source": source, "etag": obj["ETag"].strip('"'), "size": obj["Size"],
                  "deployment": deployment, "flow_run_id": str(run.id),
                  "created": dt.datetime.now(dt.timezone.utc).isoformat()}
        try:
            s3.put_object(Bucket=bucket, Key=f"{state}{mid}.json", Body=json.dumps(marker).encode(), IfNoneMatch="*")
        except ClientError as exc:  # a concurrent pass wrote it first: same object, same run
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 412:
                raise
        log.info("started flow run %s (%s) for %s", run.name, run.id, source)
        started.append({"source": source, "flow_run_id": str(run.id)})
    if len(new) > max_runs:
        log.info("%d new object(s) left for the next pass (max_runs=%d)", len(new) - max_runs, max_runs)
    return started
