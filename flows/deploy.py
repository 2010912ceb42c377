"""Register the tuneline deployments with a Prefect server, and run a local worker.

    tuneline deploy                                   # every deployment of deployments/prefect.yaml,
                                                      # on the local process pool (created if missing)
    tuneline deploy --only default --schedules on     # one deployment, its schedule switched on
    tuneline deploy --pool kubernetes --image-gpu REG/tuneline-gpu:0.1.0 --image-cpu REG/tuneline-cpu:0.1.0
    tuneline worker                                   # a process worker polling tuneline-process

``deployments/prefect.yaml`` is the one description of the deployments (names, entrypoints,
schedules, work pools and their job variables). The parameters of each ``tuneline-finetune``
deployment come from its file in ``deployments/params/`` (``parameters_file``): validated as
``PipelineParams`` here, so a broken parameter file fails the deploy and not a nightly run, and
stored in full, so the UI's run form opens on the effective values. The flow's parameter schema
(what the form is drawn from, with every field's description, default and bounds) is generated
by Prefect from ``PipelineParams``, and the server enforces it: a run with ``train.max_steps=-1``
is refused when it is created, naming the field.

Entrypoints are module paths (``flows.pipeline.finetune``): the code is the installed package
(this venv, or the image on Docker and Kubernetes), so no pull step is needed anywhere.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from steps.config import PipelineParams
from steps.core.errors import ConfigError
from steps.sweep.space import SweepSpace

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
SPEC_FILE = REPO / "deployments" / "prefect.yaml"
POOL_KINDS = ("process", "docker", "kubernetes")
SCHEDULE_MODES = ("keep", "on", "off")
PROCESS_POOL = "tuneline-process"
_ENV_REF = re.compile(r"\{\{\s*\$([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_DEPLOYMENT_KEYS = {"name", "entrypoint", "description", "tags", "parameters", "parameters_file", "space_file",
                    "schedules", "work_pool", "pool_job_variables"}
_SCHEDULE_KEYS = {"slug", "cron", "interval", "timezone", "active"}


@dataclass
class Planned:
    """One deployment as it will be registered."""

    name: str
    entrypoint: str
    parameters: dict[str, Any]
    description: str | None
    tags: list[str]
    schedules: list[dict[str, Any]]
    pool: dict[str, Any]  # name, type, work_queue_name, base_job_template (a path, for kubernetes)
    job_variables: dict[str, Any] = field(default_factory=dict)


@dataclass
class Registered:
    full_name: str
    id: str
    pool: str
    schedules: list[str]  # "nightly-retrain: cron 0 2 * * * UTC (off)"


# ---------------------------------------------------------------- reading prefect.yaml


def load_spec(path: Path = SPEC_FILE, pool: str = "process", only: list[str] | None = None,
              image_cpu: str | None = None, image_gpu: str | None = None,
              pool_name: str | None = None) -> list[Planned]:
    """The deployments of ``path`` planned for the pool kind ``pool`` (process, docker, kubernetes)."""
    if pool not in POOL_KINDS:
        raise ConfigError(f"--pool must be one of {', '.join(POOL_KINDS)}, got {pool!r}")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    definitions = spec.get("definitions") or {}
    pools = definitions.get("work_pools") or {}
    if pool not in pools:
        raise ConfigError(f"{path}: definitions.work_pools has no {pool!r} pool")
    images = definitions.get("images") or {}
    swap = {images.get("cpu"): image_cpu, images.get("gpu"): image_gpu}
    swap = {old: new for old, new in swap.items() if old and new}

    env = {"TUNELINE_REPO": str(REPO), **os.environ}
    entries = spec.get("deployments") or []
    names = [e.get("name") for e in entries]
    if only:
        if unknown := sorted(set(only) - set(names)):
            raise ConfigError(f"no deployment named {', '.join(unknown)} in {path} (known: {', '.join(names)})")
        entries = [e for e in entries if e.get("name") in only]
    planned = []
    for entry in entries:
        where = f"{path.name}: deployment {entry.get('name')!r}"
        if extra := sorted(set(entry) - _DEPLOYMENT_KEYS):
            raise ConfigError(f"{where}: unknown keys {extra}")
        target = _expand(copy.deepcopy(pools[pool]), where, env)
        if pool_name:
            target["name"] = pool_name
        job_variables = {**(target.pop("job_variables", None) or {}),
                         **_expand((entry.get("pool_job_variables") or {}).get(pool) or {}, where, env)}
        if "image" in job_variables:
            job_variables["image"] = swap.get(job_variables["image"], job_variables["image"])
        parameters = _expand(entry.get("parameters") or {}, where, env)
        description, tags = entry.get("description"), ["tuneline"]
        if "parameters_file" in entry:
            if "params" in parameters:
                raise ConfigError(f"{where}: give params in parameters or parameters_file, not both")
            params_path = path.parent / entry["parameters_file"]
            params = PipelineParams.from_yaml(params_path)
            parameters = {"params": params.model_dump(mode="json", by_alias=True), **parameters}
            description = description or _leading_comment(params_path)
            tags = ["tuneline", f"task:{params.task}", f"method:{params.train.method}"]
        if "space_file" in entry:  # a sweep's search space, checked against the parameters as the sweep will
            space = SweepSpace.from_yaml(path.parent / entry["space_file"])
            if "params" in parameters:
                space.check(PipelineParams.model_validate(parameters["params"]))
            parameters["space"] = space.model_dump(mode="json")
        planned.append(Planned(
            name=entry["name"],
            entrypoint=entry["entrypoint"],
            parameters=parameters,
            description=description,
            tags=[*tags, *(entry.get("tags") or [])],
            schedules=[_check_schedule(s, where) for s in entry.get("schedules") or []],
            pool=target,
            job_variables=job_variables,
        ))
    return planned


def _expand(value: Any, where: str, env: dict[str, str]) -> Any:
    """Replace "{{ $NAME }}" with the environment variable NAME, recursively."""
    if isinstance(value, dict):
        return {k: _expand(v, where, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, where, env) for v in value]
    if isinstance(value, str):
        def sub(match: re.Match) -> str:
            name = match.group(1)
            if name not in env:
                raise ConfigError(f"{where} uses {{{{ ${name} }}}} but the environment variable {name} is not set "
                                  "(start the local services with `tuneline services up`, or export it)")
            return env[name]
        return _ENV_REF.sub(sub, value)
    return value


def _check_schedule(raw: dict[str, Any], where: str) -> dict[str, Any]:
    if extra := sorted(set(raw) - _SCHEDULE_KEYS):
        raise ConfigError(f"{where}: schedule keys {extra} are not supported (use {sorted(_SCHEDULE_KEYS)})")
    if ("cron" in raw) == ("interval" in raw) or not raw.get("slug"):
        raise ConfigError(f"{where}: each schedule needs a slug and exactly one of cron, interval")
    return dict(raw)


def _leading_comment(path: Path) -> str | None:
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(lines) or None


# ---------------------------------------------------------------- registering


def deploy(pool: str = "process", only: list[str] | None = None, schedules: str = "keep",
           image_cpu: str | None = None, image_gpu: str | None = None, pool_name: str | None = None,
           spec: Path = SPEC_FILE) -> list[Registered]:
    """Create or update the deployments of ``spec`` on the Prefect server the client points at.

    schedules: ``keep`` registers new schedules as prefect.yaml says (inactive) and leaves an
    existing schedule on or off as it is on the server; ``on`` / ``off`` set them all.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.flows import load_flow_from_entrypoint
    from prefect.types.entrypoint import EntrypointType

    if schedules not in SCHEDULE_MODES:
        raise ConfigError(f"--schedules must be one of {', '.join(SCHEDULE_MODES)}, got {schedules!r}")
    require_api()
    planned = load_spec(spec, pool, only, image_cpu, image_gpu, pool_name)
    for target in {p.pool["name"]: p.pool for p in planned}.values():
        ensure_pool(target["name"], target["type"], target.get("base_job_template"), spec.parent)

    registered = []
    flows: dict[str, Any] = {}
    for plan in planned:
        if plan.entrypoint not in flows:
            flows[plan.entrypoint] = load_flow_from_entrypoint(plan.entrypoint)
        flow = flows[plan.entrypoint]
        with get_client(sync_client=True) as client:
            try:
                current = client.read_deployment_by_name(f"{flow.name}/{plan.name}")
                found = {s.slug: s.active for s in current.schedules or [] if s.slug}
            except ObjectNotFound:
                found = {}
        made = [_schedule(raw, schedules, found) for raw in plan.schedules]
        deployment = flow.to_deployment(
            name=plan.name,
            parameters=plan.parameters,
            description=plan.description,
            tags=plan.tags,
            schedules=made or None,
            work_pool_name=plan.pool["name"],
            work_queue_name=plan.pool.get("work_queue_name"),
            job_variables=plan.job_variables,
            enforce_parameter_schema=True,
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        deployment_id = deployment.apply()
        registered.append(Registered(
            full_name=f"{flow.name}/{plan.name}", id=str(deployment_id), pool=plan.pool["name"],
            schedules=[_describe(raw, s.active) for raw, s in zip(plan.schedules, made)],
        ))
    return registered


def _schedule(raw: dict[str, Any], mode: str, found: dict[str, bool]) -> Any:
    from datetime import timedelta

    from prefect.schedules import Cron, Interval

    active = {"on": True, "off": False}.get(mode, found.get(raw["slug"], bool(raw.get("active", False))))
    common = {"timezone": raw.get("timezone"), "active": active, "slug": raw["slug"]}
    if "cron" in raw:
        return Cron(raw["cron"], **common)
    return Interval(timedelta(seconds=float(raw["interval"])), **common)


def _describe(raw: dict[str, Any], active: bool) -> str:
    when = f"cron {raw['cron']}" if "cron" in raw else f"every {raw['interval']}s"
    return f"{raw['slug']}: {when}{' ' + raw['timezone'] if raw.get('timezone') else ''} ({'on' if active else 'off'})"


def ensure_pool(name: str, kind: str, template_file: str | None = None, base: Path = SPEC_FILE.parent) -> bool:
    """Create the work pool ``name`` of type ``kind`` if the server has none; True if created.
    An existing pool is left as it is (its template may have been edited in the UI)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            pass
        template = base_job_template(kind, template_file, base)
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type=kind, base_job_template=template,
                                                   description=f"tuneline {kind} pool (tuneline deploy)"))
        except ObjectAlreadyExists:  # another deploy created it a moment ago
            return False
    return True


def base_job_template(kind: str, template_file: str | None = None, base: Path = SPEC_FILE.parent) -> dict[str, Any]:
    """The pool's base job template: a file named in prefect.yaml, else Prefect's default for the type
    (process from the worker class; docker and kubernetes from the worker metadata shipped with Prefect)."""
    if template_file:
        return json.loads((base / template_file).read_text(encoding="utf-8"))
    if kind == "process":
        from prefect.workers.process import ProcessWorker

        return ProcessWorker.get_default_base_job_template()
    from importlib.resources import files

    metadata = json.loads(files("prefect.server.api").joinpath(
        "collections_data/views/aggregate-worker-metadata.json").read_text(encoding="utf-8"))
    for workers in metadata.values():
        if kind in workers:
            return workers[kind]["default_base_job_configuration"]
    raise ConfigError(f"no default base job template for work pool type {kind!r}")


def job_manifest(template: dict[str, Any], job_variables: dict[str, Any]) -> dict[str, Any]:
    """The job manifest a worker of the pool submits for a deployment: the base job template's manifest with the
    pool variables' defaults, overridden by the deployment's job variables, filled in as Prefect fills them
    (``apply_values``; variables without a value leave their field out)."""
    from prefect.utilities.templating import apply_values

    defaults = {name: spec["default"] for name, spec in template["variables"].get("properties", {}).items()
                if "default" in spec}
    return apply_values(copy.deepcopy(template["job_configuration"]["job_manifest"]),
                        defaults | job_variables, remove_notset=True)


# What the Docker pool's template (work-pools/docker.json) refers to: endpoints as Prefect Variables,
# credentials as Secret blocks, each named after its environment variable.
SERVICE_VALUES = ("TUNELINE_S3_ENDPOINT_URL", "TUNELINE_BUCKET", "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI",
                  "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_USERNAME")
SERVICE_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD")


def service_reference(var: str) -> str:
    """The Prefect Variable (endpoints) or Secret block (credentials) that holds ``var`` for the Docker pool."""
    slug = var.lower().removeprefix("tuneline_")
    if var in SERVICE_SECRETS:
        return f"prefect.blocks.secret.tuneline-{slug.replace('_', '-')}"
    return f"prefect.variables.tuneline_{slug}"


def publish_service_env(env: dict[str, str]) -> list[str]:
    """Save the services' endpoints and credentials of ``env`` on the Prefect server, under the names the Docker
    pool's template refers to (``service_reference``), so flow-run containers get them by reference and no value
    is written into a pool, a deployment or a flow run's parameters. Returns the references saved."""
    from prefect.blocks.system import Secret
    from prefect.variables import Variable

    missing = [var for var in (*SERVICE_VALUES, *SERVICE_SECRETS) if not env.get(var)]
    if missing:
        raise ConfigError(f"cannot publish the services' environment: {', '.join(missing)} not set "
                          "(start the local services with `tuneline services up`, or export them)")
    saved = []
    for var in (*SERVICE_VALUES, *SERVICE_SECRETS):
        reference = service_reference(var)
        name = reference.rsplit(".", 1)[1]
        if var in SERVICE_SECRETS:
            Secret(value=env[var]).save(name, overwrite=True)
        else:
            Variable.set(name, env[var], overwrite=True)
        saved.append(reference)
    return saved


def require_api() -> str:
    """The Prefect API URL the client uses; deployments and workers need a server."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise ConfigError("no Prefect server: start the local one with `tuneline services up`, or set PREFECT_API_URL")
    return url


# ---------------------------------------------------------------- the local worker


def run_worker(pool_name: str = PROCESS_POOL, limit: int | None = 1, env: dict[str, str] | None = None) -> int:
    """``prefect worker start`` for a process pool, in the foreground. Ctrl-C and SIGTERM stop it
    (the worker is sent SIGINT: it stops cleanly on SIGINT, not always on SIGTERM)."""
    argv = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool_name, "--type", "process"]
    if limit:
        argv += ["--limit", str(limit)]
    proc = subprocess.Popen(argv, env={**os.environ, **(env or {})})
    reaper = _Reaper(REAP_EVERY)
    reaper.start()

    def forward(signum: int, _frame: Any) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        reaper.stop.set()
        for s, handler in previous.items():
            signal.signal(s, handler)


REAP_EVERY = 60.0  # seconds between two checks for this host's flow runs whose process died


class _Reaper(threading.Thread):
    """While the worker runs: mark Crashed, now and every ``every`` seconds, this host's RUNNING runs whose
    process died (flows/resume.py). The worker marks a run Crashed itself when its process exits; this
    catches the runs of a worker that was killed with them, or of `tuneline run` processes."""

    def __init__(self, every: float):
        super().__init__(name="tuneline-reaper", daemon=True)
        self.every, self.stop = every, threading.Event()

    def run(self) -> None:
        from flows.resume import reap_dead_runs

        while True:
            try:
                for run in reap_dead_runs():
                    print(f"flow run {run.id} ({run.name}): its process is gone, marked Crashed", flush=True)
            except Exception as exc:  # noqa: BLE001 - a server away for a moment: try again next time
                log.debug("checking for dead flow runs failed: %s", exc)
            if self.stop.wait(self.every):
                return
