"""The tuneline flow: ingest -> validate -> scrub -> tokenize -> train -> evaluate ->
register -> promote, each a retryable task passing JSON references through S3.

    tuneline run --params deployments/params/default.yaml
"""

from __future__ import annotations

import os
from typing import NamedTuple

from prefect import flow
from prefect_aws import AwsClientParameters, AwsCredentials, S3Bucket

from flows import pages, tasks
from steps.config import PipelineParams
from steps.core.store import DatasetRef, ModelRef
from steps.register.report import PipelineSummary
from steps.register.step import RunRecord
from steps.train.rewards import pin_reward_models

RESULTS_BLOCK = tasks.RESULT_STORAGE.split("/", 1)[1]


def save_result_storage() -> None:
    """Persist task results (JSON) to the artifact bucket. Keys come from the environment
    at run time (boto3's default chain), so the block stores no secret.

    Saved only when the server has no such block or a different one: a save costs ~1 s of
    CPU in this process (Prefect derives the block's JSON schema dozens of times), a load
    one request, and every flow run calls this."""
    endpoint = os.environ.get("TUNELINE_S3_ENDPOINT_URL")
    block = S3Bucket(
        bucket_name=os.environ["TUNELINE_BUCKET"],
        bucket_folder="prefect-results",
        credentials=AwsCredentials(
            region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            aws_client_parameters=AwsClientParameters(endpoint_url=endpoint) if endpoint else AwsClientParameters(),
        ),
    )
    try:
        if _block_fields(S3Bucket.load(RESULTS_BLOCK)) == _block_fields(block):
            return
    except ValueError:  # no such block yet (or one this version cannot read): save ours
        pass
    block.save(RESULTS_BLOCK, overwrite=True)


def _block_fields(block: S3Bucket) -> dict:
    """The block's settings, without the server's bookkeeping (document id and name)."""
    return {k: v for k, v in block.model_dump(mode="json").items() if not k.startswith("_")}


class Prepared(NamedTuple):
    """The data steps' references: what training starts from."""

    raw: DatasetRef
    validated: DatasetRef
    clean: DatasetRef
    base: ModelRef
    data: DatasetRef


def data_steps(params: PipelineParams) -> Prepared:
    """ingest, validate, scrub, base model and tokenize as tasks of the current flow run, each page published;
    cached tasks: a sweep's trials (flows/sweep.py) find them all done."""
    prefix, name, where = params.artifacts_prefix, params.register_.model_name, params.dispatch
    raw = pages.step(name, "ingest", tasks.ingest(params.ingest, prefix, dispatch=where.get("ingest")))
    validated = pages.step(name, "validate",
                           tasks.validate(params.validate_, raw, prefix, dispatch=where.get("validate")))
    clean = pages.step(name, "scrub", tasks.scrub(params.scrub, validated, prefix, dispatch=where.get("scrub")))
    base = tasks.base_model(params.base_model, prefix, chat_template=params.tokenize.chat_template,
                            dispatch=where.get("base_model"))
    pages.step(name, "base_model", base.base)
    data = pages.step(name, "tokenize",
                      tasks.tokenize(params.tokenize, clean, base, prefix, dispatch=where.get("tokenize")))
    return Prepared(raw, validated, clean, base, data)


@flow(name="tuneline-finetune", persist_result=False)
def finetune(params: PipelineParams = PipelineParams()) -> PipelineSummary:
    """Fine-tune a base model on a dataset and register it: ingest, validate, scrub, tokenize, train,
    evaluate (base, candidate, champion), register as `challenger`, promote to `champion` through the gate.

    Every step is a retryable task whose result (a JSON reference to its artifact in S3) is cached:
    a rerun with the same inputs reuses every finished step. Bad data or configuration fails the run
    before anything is registered, naming the rule; the summary lists what each step did.
    """
    save_result_storage()
    params = pin_reward_models(params)  # one reward model version for the whole run
    pages.label_run(params)
    prefix, name = params.artifacts_prefix, params.register_.model_name
    where = params.dispatch  # step -> a tuneline-step deployment; others run in this flow run
    raw, validated, clean, base, data = data_steps(params)
    tuned = tasks.train(params.train, data, base, prefix, dispatch=where.get("train"))
    pages.step(name, "train", tuned.adapter)
    base_eval = tasks.evaluate(params.evaluate, base, data, prefix, role="base", dispatch=where.get("evaluate"))
    tuned_eval = tasks.evaluate(params.evaluate, tuned, data, prefix, role="candidate", dispatch=where.get("evaluate"))
    # The incumbent is evaluated before registering, so a failure there leaves no orphan version.
    current = tasks.champion(params.register_)
    if current is not None and current.model.digest != tuned.digest:
        incumbent = tasks.evaluate(params.evaluate, current.model, data, prefix, role="champion",
                                   dispatch=where.get("evaluate"))
        label = f"champion v{current.version}"
    else:
        incumbent, label = base_eval, "base model"
    champion = {"champion": incumbent} if incumbent is not base_eval else {}
    record = RunRecord(
        params=params.model_dump(mode="json", by_alias=True),
        datasets={"ingest": raw, "validate": validated, "scrub": clean, "tokenize": data},
        model=tuned,
        evaluations={"base": base_eval, "candidate": tuned_eval, **champion},
    )
    pages.evaluation(name, {"base": base_eval, "candidate": tuned_eval,
                            **({label: incumbent} if champion else {})})
    version = tasks.register(params.register_, record, prefix, run=pages.pipeline_run(),
                             dispatch=where.get("register"))
    decision = tasks.promote(params.register_, version, tuned_eval, incumbent, label, base_eval)
    summary = PipelineSummary(record=record, version=version, decision=decision)
    pages.decision(summary)
    return summary
