"""What a flow run shows in the Prefect UI beyond its task runs: a name and tags read from its
parameters, and one markdown artifact per step (rendered by ``steps/register/report.py``).

    tuneline-chat-lora-2026-12-02-0200   tags: model:tuneline-chat method:lora task:sft data:chatterbot scheduled

Artifact keys are per registered model (``tuneline-chat-scrub``, ...), so the Artifacts page
keeps each key's history across runs. Outside a flow run every function here does nothing.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime, timezone
from typing import Any

from steps.config import PipelineParams

log = logging.getLogger(__name__)
CORPORA = ("chatterbot-pairs", "chatterbot", "konlpy", "bbcnews", "arithmetic")
TRIGGERS = ("scheduled", "manual", "data-triggered")
DATA_TRIGGERED = "data-triggered"  # the tag flows/watch.py gives the runs it starts
KEPT_NAMES = ("resume-of-", "data-")


def _flow_run() -> Any:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return ctx.flow_run if ctx is not None else None


def source_kind(params: PipelineParams) -> str:
    """What the data comes from, as a tag value: a corpus name, s3, a file type, a folder, or a mixture."""
    ingest = params.ingest
    if ingest.sources:
        return "mixture"
    source = ingest.source
    for corpus in CORPORA:
        if source.startswith(f"{corpus}:"):
            return corpus
    if source.startswith("s3://"):
        return "s3"
    suffix = re.search(r"\.(jsonl(\.gz)?|parquet|csv)$", source)
    return suffix.group(1).replace(".gz", "") if suffix else "folder"


def run_labels(params: PipelineParams, tags: list[str], auto_scheduled: bool, start: datetime) -> tuple[str, list[str]]:
    """The run's name (``MODEL-METHOD-YYYY-MM-DD-HHMM``, UTC) and its tags, existing ones kept first."""
    trigger = DATA_TRIGGERED if DATA_TRIGGERED in tags else ("scheduled" if auto_scheduled else "manual")
    mine = [f"model:{params.register_.model_name}", f"method:{params.train.method}", f"task:{params.task}",
            f"data:{source_kind(params)}", trigger]
    name = f"{params.register_.model_name}-{params.train.method}-{start.astimezone(timezone.utc):%Y-%m-%d-%H%M}"
    return name, list(dict.fromkeys([t for t in tags if t not in TRIGGERS] + mine))


def label_run(params: PipelineParams) -> None:
    """Name and tag this flow run from its parameters, and with where it runs (host, checkout, process:
    flows/resume.py). Names tuneline gave on purpose stay: ``resume-of-...`` (the run it resumes) and
    ``data-...`` (the object that triggered it, flows/watch.py)."""
    from prefect import get_client

    from flows.resume import origin_tags

    run = _flow_run()
    if run is None:
        return
    start = run.expected_start_time or run.start_time or datetime.now(timezone.utc)
    name, tags = run_labels(params, list(run.tags or []), run.auto_scheduled, start)
    tags = list(dict.fromkeys(tags + origin_tags()))  # where it runs: a worker's run has no other way to say
    if run.name.startswith(KEPT_NAMES):
        name = run.name
    with get_client(sync_client=True) as client:
        client.update_flow_run(run.id, name=name, tags=tags)
    run.name, run.tags = name, tags  # the run context's copy, read again by pipeline_run()


def flow_run_url() -> str | None:
    """This flow run's page in the Prefect UI, if the API has a UI."""
    from prefect.settings import get_current_settings

    run, ui = _flow_run(), get_current_settings().ui_url
    return f"{ui.rstrip('/')}/runs/flow-run/{run.id}" if run is not None and ui else None


def artifact_key(model_name: str, page: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{model_name}-{page}".lower()).strip("-")


def publish(model_name: str, page: str, markdown: str, description: str) -> None:
    """A markdown artifact on this flow run's Artifacts tab (kept under its key across runs)."""
    from prefect.artifacts import create_markdown_artifact

    if _flow_run() is None:
        return
    create_markdown_artifact(markdown=markdown, key=artifact_key(model_name, page), description=description)


def publish_image(model_name: str, page: str, url: str | None, description: str) -> None:
    """An image artifact (a plot the MLflow server holds; the browser shows it when logged in to MLflow)."""
    from prefect.artifacts import create_image_artifact

    if _flow_run() is None or url is None:
        return
    create_image_artifact(image_url=url, key=artifact_key(model_name, page), description=description)


def step(model_name: str, name: str, ref: Any) -> Any:
    """Publish step ``name``'s page from its reference's stats; returns the reference."""
    from steps.register.report import step_markdown, step_sentence

    if ref is not None:
        publish(model_name, name.replace("_", "-"), step_markdown(name, ref.stats),
                f"{name}: {step_sentence(name, ref.stats)}"[:250])
    return ref


def evaluation(model_name: str, reports: dict[str, Any]) -> None:
    """The evaluation table: base, candidate and (when there is one) the champion, on the same eval set."""
    from steps.register.report import evaluation_markdown

    publish(model_name, "evaluation", evaluation_markdown({k: r.stats for k, r in reports.items()}),
            "evaluation: base vs candidate vs champion")


def decision(summary: Any) -> None:
    """The promotion decision with its checks and links to the MLflow run and version."""
    from steps.register.report import decision_markdown
    from steps.register.step import run_artifact_url, version_links

    if _flow_run() is None:
        return
    publish(summary.version.name, "promotion", decision_markdown(summary, version_links(summary.version)),
            f"promotion: {summary.decision.reason.partition(':')[0]}")
    if summary.record.datasets["tokenize"].stats.get("task") == "rl":
        publish_image(summary.version.name, "rl-curves", run_artifact_url(summary.version.run_id, "plots/rl_curves.png"),
                      "online RL: reward, KL to the reference and completion length per step (plots/rl_curves.png)")


def pipeline_run() -> Any:
    """This flow run as the register step records it on the MLflow run (start time, name, link); None outside
    a flow run."""
    from steps.register.step import PipelineRun

    run = _flow_run()
    if run is None:
        return None
    start = run.start_time or run.expected_start_time or datetime.now(timezone.utc)
    return PipelineRun(flow_run_id=str(run.id), flow_run_name=run.name, started=start.isoformat(), url=flow_run_url())
