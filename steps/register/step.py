"""Register: an MLflow run and a registered model version with lineage, then the
promotion gate that moves the ``champion`` alias only to a better model.

The version holds a pickle-free models-from-code pyfunc (``steps/register/serving.py``): the
trained weights (safetensors: an adapter, a head, interventions or full weights) and
the tokenizer as artifacts, with the ``steps`` package as code, and the base model by URI
(``runs:/<id>/base_model``, logged once per base digest), so
``mlflow.pyfunc.load_model("models:/NAME@champion")`` works wherever the tracking
server is reachable. Registration is idempotent: a version tagged with the same run
key is returned instead of registering a second one (and finished, when the attempt that
created it died before its last write, the ``tuneline.registration=complete`` tag).

Tracking server and S3 endpoint come from MLFLOW_TRACKING_URI / MLFLOW_S3_ENDPOINT_URL.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from steps.base_model.folder import is_tokenizer_file
from steps.config import GATE_METRICS, RegisterConfig
from steps.core.contract import RECORD_LOSSES, StrictModel
from steps.core.errors import ArtifactError, ConfigError
from steps.core.lineage import code_version, run_key, sha256_file
from steps.core.store import ArtifactRef, ArtifactStore, DatasetRef, EvalReport, ModelRef
from steps.register.verify import files_tags, folder_files
from steps.tokenize.split import split_summary

log = logging.getLogger(__name__)

STEP = "register"
BASE_EXPERIMENT = "tuneline-base-models"
STEPS_DIR = Path(__file__).resolve().parents[1]  # the package, shipped with the model as code
SERVING_CODE = STEPS_DIR / "register" / "serving.py"
LOWER_IS_BETTER = {metric: lower for metrics in GATE_METRICS.values() for metric, lower in metrics.items()}
CARD_METRICS = ("perplexity", "bleu", "chrf", "rouge_l", "accuracy", "f1_macro", "mse", "mae", "r2", "pref_accuracy",
                "logp_margin", "reward_accuracy", "reward_margin", "mean_reward", "kl_to_reference", "reward_win_rate",
                "reward_win_rate_vs_champion", "masked_accuracy", "pseudo_perplexity")


class RunRecord(StrictModel):
    """Everything a training run produced, as references: what a version's lineage is made of."""

    params: dict[str, Any]
    datasets: dict[str, DatasetRef]
    model: ModelRef
    evaluations: dict[str, EvalReport]


class PipelineRun(StrictModel):
    """The orchestrator's run a registration belongs to, recorded on the MLflow run (start, name, link)."""

    flow_run_id: str
    flow_run_name: str
    started: str  # ISO 8601 with a UTC offset: the MLflow run's start, so its duration covers the pipeline
    url: str | None = None


class RegisteredVersion(StrictModel):
    name: str
    version: str
    run_id: str
    run_key: str
    metrics: dict[str, float] = {}  # what register derives from the evaluations: the RL win rates


class Champion(StrictModel):
    version: str
    model: ModelRef


class PromotionDecision(StrictModel):
    promoted: bool
    reason: str
    champion_version: str | None
    metric: str
    candidate_value: float
    incumbent_value: float
    incumbent: str


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


def find_champion(cfg: RegisterConfig) -> Champion | None:
    """The version holding the ``champion`` alias and the model it was trained as, if any."""
    from mlflow.exceptions import MlflowException

    try:
        version = _client().get_model_version_by_alias(cfg.model_name, "champion")
    except MlflowException:
        return None
    ref = version.tags.get("tuneline.model_ref")
    if ref is None:
        log.warning("champion %s v%s has no tuneline.model_ref tag; ignoring it", cfg.model_name, version.version)
        return None
    return Champion(version=version.version, model=ModelRef.model_validate_json(ref))


def register_model(cfg: RegisterConfig, record: RunRecord, store: ArtifactStore,
                   run: PipelineRun | None = None) -> RegisteredVersion:
    """Log the run to MLflow and register the trained model as a new version with alias ``challenger``.

    The version holds the pickle-free pyfunc (``serving.py``), adapter or weights, tokenizer, model
    card, reports and lineage tags (run key, code version, digests). ``run`` (the flow run) gives the
    MLflow run its start time, description and link back. Registering the same run key again returns
    the existing version. Raises ``ConfigError`` when ``record`` holds no trained weights.
    """
    import mlflow

    inputs = [record.model.base, record.model.adapter, *record.evaluations.values(), *record.datasets.values()]
    key = run_key(STEP, cfg, [ref.digest for ref in inputs if ref is not None] + [json.dumps(record.params, sort_keys=True)])
    client = _client()
    wins = reward_win_rates(store, record.evaluations)
    existing = client.search_model_versions(f"name = '{cfg.model_name}' and tags.`tuneline.run_key` = '{key}'")
    if existing:
        v = existing[0]
        log.info("register: %s v%s already holds run key %s", cfg.model_name, v.version, key)
        if v.tags.get("tuneline.registration") != "complete":  # an attempt died after creating it: finish it
            finish_version(client, cfg.model_name, v.version, model_card(cfg, record, key, wins))
        return RegisteredVersion(name=cfg.model_name, version=v.version, run_id=v.run_id, run_key=key, metrics=wins)

    if record.model.adapter is None:
        raise ConfigError("register needs a fine-tuned model (a ModelRef with an adapter)")
    base_uri = base_model_uri(record.model.base, store)
    # By id, never mlflow.set_experiment (process-wide; see experiment_named).
    experiment = training_experiment(cfg.experiment)
    evals = {name: report.stats for name, report in record.evaluations.items()}
    evals["candidate"] = {**evals["candidate"], **wins}
    tags = lineage_tags(key, record)
    created = client.create_run(experiment.experiment_id, start_time=start_ms(run),
                                run_name=f"{cfg.model_name}-{key[:8]}",
                                tags={**tags, **run_page_tags(cfg, record, run)})
    with mlflow.start_run(run_id=created.info.run_id) as active, \
            tempfile.TemporaryDirectory(prefix="tuneline-register-") as tmp:
        mlflow.log_params(flatten(record.params))
        datasets = log_datasets(record, store)
        history = store.read_json(record.model.adapter, "train_log.json")
        train_report = store.read_json(record.model.adapter, "train_report.json")
        mlflow.log_figure(loss_curve(history, train_report.get("evals", []), evals), "plots/loss_curve.png")
        if history and "reward" in history[0]:
            mlflow.log_figure(rl_curves(history), "plots/rl_curves.png")
        if "confusion_matrix" in evals.get("candidate", {}):
            mlflow.log_figure(confusion_figure(evals["candidate"]), "plots/confusion_matrix.png")
        mlflow.log_dict(train_report, "reports/train_report.json")
        for step in ("validate", "scrub"):  # what the data policy left out: ids, line numbers and rules
            ref = record.datasets.get(step)
            if ref is not None and ref.stats.get("quarantined"):
                mlflow.log_text(store.read_bytes(ref, "quarantine.jsonl").decode("utf-8"),
                                f"data/quarantine_{step}.jsonl")
        if RECORD_LOSSES in store.manifest(record.model.adapter.key)["files"]:
            losses = store.read_jsonl(record.model.adapter, RECORD_LOSSES)
            mlflow.log_text("".join(json.dumps(r) + "\n" for r in losses), f"data/{RECORD_LOSSES}")
            mlflow.log_figure(record_loss_histogram(losses), "plots/record_losses.png")
        mlflow.log_dict({name: ref.stats for name, ref in record.datasets.items()}, "reports/data.json")
        mlflow.log_dict(evals, "reports/eval.json")
        samples = store.read_jsonl(record.evaluations["candidate"], "samples.jsonl")
        if samples:
            mlflow.log_table({k: [s.get(k) for s in samples] for k in ("id", "group", "reference", "prediction")},
                             "reports/eval_samples.json")
        card = model_card(cfg, record, key, wins)
        mlflow.log_text(card, "model_card.md")
        trained_dir, tokenizer_dir = Path(tmp) / "trained", Path(tmp) / "tokenizer"
        shutil.copytree(store.download(record.model.adapter), trained_dir,
                        ignore=shutil.ignore_patterns("_MANIFEST.json", "train_log.json", "train_report.json",
                                                     RECORD_LOSSES))
        tokenizer_dir.mkdir()
        base_dir = store.download(record.model.base)
        for path in base_dir.iterdir():
            if path.is_file() and is_tokenizer_file(path.name):
                shutil.copy(path, tokenizer_dir / path.name)
        task = record.datasets["tokenize"].stats.get("task", "sft")
        code_zip = package_zip(STEPS_DIR, Path(tmp) / "steps.zip")
        artifact_files = {"trained": folder_digests(trained_dir), "tokenizer": folder_digests(tokenizer_dir),
                          "code": sha256_file(code_zip)}
        agree_with_manifest(artifact_files["trained"], store, record.model.adapter, "trained")
        agree_with_manifest(artifact_files["tokenizer"], store, record.model.base, "tokenizer")
        base_files = {name: meta["sha256"] for name, meta in
                      store.manifest(record.model.base.key, record.model.base.digest)["files"].items() if "/" not in name}
        # Logged before any metric: log_model copies the run's metrics onto the model one request per metric.
        info = mlflow.pyfunc.log_model(
            name=logged_model_name(cfg.model_name),
            python_model=str(SERVING_CODE),
            artifacts={"trained": str(trained_dir), "tokenizer": str(tokenizer_dir), "code": str(code_zip)},
            # base_model_files and artifact_files: what load_context checks before it loads (serving.py)
            model_config={"base_model_uri": base_uri, "base_model_digest": record.model.base.digest,
                          "base_model_files": base_files, "artifact_files": artifact_files,
                          **served_encoding(record.datasets["tokenize"])},
            pip_requirements=serving_requirements(),
            signature=signature_for(task),
            input_example=input_example(task, store, record.datasets["tokenize"]),
        )
        record_sources(client, info, Path(tmp) / "mlmodel", {
            "trained": f"s3://{store.bucket}/{record.model.adapter.key}",
            "tokenizer": f"s3://{store.bucket}/{record.model.base.key}",
            "code": f"steps.zip of tuneline code version {code_version()}"})
        local = {**{f"artifacts/trained/{k}": v for k, v in artifact_files["trained"].items()},
                 **{f"artifacts/tokenizer/{k}": v for k, v in artifact_files["tokenizer"].items()},
                 f"artifacts/{code_zip.name}": artifact_files["code"]}
        files = logged_files(client, info.model_id, local, Path(tmp) / "logged")
        log_series(active.info.run_id, history)
        mlflow.log_metrics({f"{step}_quarantined": ref.stats["quarantined"] for step, ref in record.datasets.items()
                            if ref.stats.get("quarantined")})
        # The evaluation metrics belong to the model and the eval set: the model page lists them with the dataset.
        mlflow.log_metrics({f"{name}_{metric}": value for name, stats in evals.items()
                            for metric, value in stats.items() if isinstance(value, (int, float))},
                           model_id=info.model_id, dataset=datasets["evaluation"])
    gate = {"tuneline.metric": cfg.metric,
            "tuneline.metric_value": str(record.evaluations["candidate"].stats.get(cfg.metric, ""))}
    # The files' digests are version tags from its creation on: set before tuneline.registration=complete.
    version = mlflow.register_model(info.model_uri, cfg.model_name,
                                    tags={**tags, **gate, **files_tags(files), "tuneline.run_key": key})
    finish_version(client, cfg.model_name, version.version, card)
    log.info("register: %s v%s (@challenger), run %s", cfg.model_name, version.version, active.info.run_id)
    return RegisteredVersion(name=cfg.model_name, version=version.version, run_id=active.info.run_id, run_key=key,
                             metrics=wins)


def package_zip(package: Path, target: Path) -> Path:
    """The package's files (no bytecode) as one zip, importable from ``sys.path`` (zipimport): the served
    model's code, uploaded as one artifact instead of one request per module. The same files give the same
    bytes (sorted entries, fixed timestamps)."""
    import zipfile

    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
        for path in sorted(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                           and p.suffix != ".pyc"):
            info = zipfile.ZipInfo(str(Path(package.name) / path.relative_to(package)), date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            out.writestr(info, path.read_bytes())
    return target


def folder_digests(folder: Path) -> dict[str, str]:
    """``{posix path under folder: sha256}`` of every file under ``folder``."""
    return {path: sha256_file(file) for path, file in folder_files(folder).items()}


def agree_with_manifest(digests: dict[str, str], store: ArtifactStore, ref: ArtifactRef, what: str) -> None:
    """The files about to be registered are the artifact's of record (its verified manifest): ArtifactError if not."""
    files = store.manifest(ref.key, ref.digest)["files"]
    for name, digest in sorted(digests.items()):
        if name not in files or files[name]["sha256"] != digest:
            raise ArtifactError(f"register: {what} file {name} is not the one {ref.key}'s manifest records")


def logged_files(client: Any, model_id: str, local: dict[str, str], folder: Path) -> dict[str, str]:
    """``{path: sha256}`` of every file of the logged model: ``local`` digests for the files registered from
    this machine (weights, tokenizer, code: not downloaded again), the files MLflow generated (MLmodel,
    serving.py, environment files, input examples) downloaded and hashed."""
    listing: set[str] = set()

    def walk(path: str | None) -> None:
        for entry in client.list_logged_model_artifacts(model_id, path):
            if entry.is_dir:
                walk(entry.path)
            else:
                listing.add(entry.path)

    walk(None)
    missing = sorted(set(local) - set(listing))
    if missing:
        raise ArtifactError(f"register: the logged model {model_id} lacks {missing[0]} after upload")
    location = client.get_logged_model(model_id).artifact_location.rstrip("/")
    digests = {}
    for path in sorted(listing):
        if path in local:
            digests[path] = local[path]
            continue
        (target := folder / Path(path).parent).mkdir(parents=True, exist_ok=True)
        digests[path] = sha256_file(Path(mlflow_download(f"{location}/{path}", target)))
    return digests


def finish_version(client: Any, name: str, version: str, card: str) -> None:
    """The model card, alias ``challenger``, then the tag that marks the registration complete (last,
    like a manifest: a retry that finds a version without it finishes the job)."""
    client.update_model_version(name, version, description=card)
    move_alias(client, name, "challenger", version, "register", "new version from the pipeline")
    client.set_model_version_tag(name, version, "tuneline.registration", "complete")


HISTORY_TAG = "tuneline.alias_history."  # + time + alias: one version tag per alias move


def actor() -> str:
    """Who moves an alias: ``TUNELINE_ACTOR`` (e.g. set by a CI job), else user@host."""
    import getpass
    import os
    import socket

    return os.environ.get("TUNELINE_ACTOR") or f"{getpass.getuser()}@{socket.gethostname()}"


def move_alias(client: Any, name: str, alias: str, version: str | None, action: str, reason: str) -> None:
    """Point ``alias`` at ``version`` (None: remove it) and record the move (time, actor, action, reason, from and
    to versions) as a tag on the version it went to, or on the one it left when removed."""
    from datetime import datetime, timezone

    from mlflow.exceptions import MlflowException

    try:
        before: str | None = client.get_model_version_by_alias(name, alias).version
    except MlflowException:
        before = None
    if before == version:  # a retry of a move whose record may be missing (killed in between): record it once
        if version is None or any(json.loads(v).get("alias") == alias and json.loads(v).get("to") == version
                                  for k, v in client.get_model_version(name, version).tags.items()
                                  if k.startswith(HISTORY_TAG)):
            return
        before, reason = None, f"{reason} (recorded on retry; the earlier holder is unknown)"
    elif version is None:
        client.delete_registered_model_alias(name, alias)
    else:
        client.set_registered_model_alias(name, alias, version)
    now = datetime.now(timezone.utc)
    event = {"time": now.isoformat(timespec="microseconds"), "alias": alias, "from": before, "to": version,
             "action": action, "actor": actor(), "reason": reason[:2000]}
    client.set_model_version_tag(name, version or before, f"{HISTORY_TAG}{now:%Y%m%dT%H%M%S.%f}.{alias}",
                                 json.dumps(event, ensure_ascii=False))


def alias_history(client: Any, name: str) -> list[dict[str, Any]]:
    """Every recorded alias move of a registered model, oldest first."""
    events = [json.loads(value) for v in client.search_model_versions(f"name = '{name}'")
              for key, value in v.tags.items() if key.startswith(HISTORY_TAG)]
    return sorted(events, key=lambda e: e["time"])


def decide(cfg: RegisterConfig, candidate: float, incumbent: float, incumbent_label: str) -> tuple[bool, str]:
    """Pure promotion rule: better than the incumbent by more than ``min_improvement`` (relative)."""
    lower = LOWER_IS_BETTER[cfg.metric]
    gain = (incumbent - candidate) if lower else (candidate - incumbent)
    relative = gain / abs(incumbent) if incumbent else (float("inf") if gain > 0 else 0.0)
    direction = "lower" if lower else "higher"
    verdict = (f"{cfg.metric} {candidate:.4g} vs {incumbent_label} {incumbent:.4g} "
               f"({direction} is better; relative gain {relative:+.2%}, required > {cfg.min_improvement:.2%})")
    return relative > cfg.min_improvement, verdict


def gate_checks(cfg: RegisterConfig, candidate: EvalReport, base: EvalReport | None) -> list[tuple[bool, str]]:
    """The policy's other conditions: the smoke test, the KL ceiling of an RL policy (``max_kl``), and the
    forgetting check against the base model."""
    checks: list[tuple[bool, str]] = []
    smoke = candidate.stats.get("smoke")
    if cfg.require_smoke and smoke is not None:
        if smoke.get("passed"):
            checks.append((True, "smoke test passed"))
        else:
            failing = [p["prompt"] for p in smoke.get("prompts", []) if not p.get("passed")]
            blocks = [b["block"] for b in smoke.get("blocks", []) if not b.get("passed")]  # a masked-LM's fill-mask
            detail = (f"prompts failing: {failing}" if failing else f"fill-mask blocks failing: {blocks}" if blocks
                      else f"classes never predicted: {smoke.get('missing_classes', [])}")
            checks.append((False, f"smoke test failed ({detail})"))
    kl = candidate.stats.get("kl_to_reference")
    if cfg.max_kl is not None and kl is not None:
        checks.append((kl <= cfg.max_kl, f"KL to the base {kl:.4g} per answer token (allowed <= {cfg.max_kl:g})"))
    before = (base.stats.get("reference_perplexity") if base is not None else None)
    after = candidate.stats.get("reference_perplexity")
    if cfg.forgetting_tolerance is not None and before and after:
        growth = after / before - 1
        ok = growth <= cfg.forgetting_tolerance
        checks.append((ok, f"forgetting: reference perplexity {before:.4g} -> {after:.4g} ({growth:+.1%}, "
                           f"allowed <= {cfg.forgetting_tolerance:+.0%})"))
    return checks


def promote_model(
    cfg: RegisterConfig, version: RegisteredVersion, candidate: EvalReport, incumbent: EvalReport, incumbent_label: str,
    base: EvalReport | None = None,
) -> PromotionDecision:
    """Move ``champion`` to ``version`` when it beats the incumbent and passes the policy's other
    checks (smoke test, forgetting); record the decision either way (tag and model card)."""
    if cfg.metric not in candidate.stats:  # e.g. perplexity for text records that tokenize made masked-LM
        measured = [m for m in LOWER_IS_BETTER if m in candidate.stats]
        raise ConfigError(f"register.metric {cfg.metric!r} is not measured for task {candidate.stats.get('task')!r}; "
                          f"set it to one of {', '.join(measured)}")
    client = _client()
    with promotion_lock(cfg.model_name):
        current = find_champion(cfg)
        value, against = float(candidate.stats[cfg.metric]), float(incumbent.stats[cfg.metric])
        checks = gate_checks(cfg, candidate, base)
        now = f"champion v{current.version}" if current is not None else "base model"
        if current is not None and current.version != version.version and now != incumbent_label:
            # Another run promoted a version after this run evaluated its incumbent: compare with that one.
            other = client.get_model_version(cfg.model_name, current.version)
            mine = client.get_model_version(cfg.model_name, version.version)
            comparable = (other.tags.get("tuneline.data_digest") == mine.tags.get("tuneline.data_digest")
                          and other.tags.get("tuneline.metric") == cfg.metric
                          and other.tags.get("tuneline.metric_value", "") != "")
            if comparable:
                against, incumbent_label = float(other.tags["tuneline.metric_value"]), now
            else:
                checks.append((False, f"the champion changed to v{current.version} during this run and was measured "
                                      "on another eval set; run again to compare"))
        better, verdict = decide(cfg, value, against, incumbent_label)
        failed = [text for ok, text in checks if not ok]
        detail = "; ".join([verdict, *(text for _, text in checks)])
        if current is not None and current.version == version.version:
            promoted, reason, champion = True, f"already champion: {detail}", version.version
            challenger_leaves(client, cfg.model_name, version.version, "gate")
        elif better and not failed:
            promoted, reason, champion = True, f"promoted: {detail}", version.version
            make_champion(client, cfg.model_name, version.version, current.version if current else None, "gate",
                          reason)
        else:
            promoted = False
            reason = f"not promoted, {'champion unchanged' if current else 'no champion yet'}: {detail}"
            champion = current.version if current else None
        verify_champion(cfg, champion)
    client.set_model_version_tag(cfg.model_name, version.version, "tuneline.promotion", reason)
    description = client.get_model_version(cfg.model_name, version.version).description or ""
    client.update_model_version(cfg.model_name, version.version, description=description.rstrip() + "\n\n"
                                + promotion_section(reason, candidate, incumbent, incumbent_label, checks))
    log.info("promotion gate: %s", reason)
    return PromotionDecision(promoted=promoted, reason=reason, champion_version=champion, metric=cfg.metric,
                             candidate_value=value, incumbent_value=against, incumbent=incumbent_label)


def make_champion(client: Any, name: str, version: str, current: str | None, action: str, reason: str) -> None:
    """``champion`` to ``version``; the old champion becomes ``previous-champion``; ``challenger`` leaves the
    version (it is no longer challenging). Each move recorded (``move_alias``)."""
    if current is not None:
        move_alias(client, name, "previous-champion", current, action, f"replaced by v{version}")
    move_alias(client, name, "champion", version, action, reason)
    challenger_leaves(client, name, version, action)


def challenger_leaves(client: Any, name: str, version: str, action: str) -> None:
    """A champion is no longer a challenger: the alias is removed from it (and recorded)."""
    if str((client.get_registered_model(name).aliases or {}).get("challenger")) == str(version):
        move_alias(client, name, "challenger", None, action, f"v{version} is champion")


def promotion_section(reason: str, candidate: EvalReport, incumbent: EvalReport, label: str,
                      checks: list[tuple[bool, str]]) -> str:
    """The model card's account of the gate: the decision, each check, and the metrics compared."""
    shown = [m for m in CARD_METRICS if m in candidate.stats or m in incumbent.stats]
    lines = ["## Promotion decision", "", reason, "",
             *[f"- {'pass' if ok else 'FAIL'}: {text}" for ok, text in checks], "",
             f"| model | {' | '.join(shown)} |", "|---|" + "---|" * len(shown),
             f"| candidate | {' | '.join(str(candidate.stats.get(m, '-')) for m in shown)} |",
             f"| {label} | {' | '.join(str(incumbent.stats.get(m, '-')) for m in shown)} |"]
    return "\n".join(lines) + "\n"


def verify_champion(cfg: RegisterConfig, expected: str | None) -> None:
    """Re-read the alias after writing it: a concurrent writer that slipped past the lock shows up here."""
    from mlflow.exceptions import MlflowException

    from steps.core.errors import TransientError

    try:
        current: str | None = _client().get_model_version_by_alias(cfg.model_name, "champion").version
    except MlflowException:
        current = None
    if current != expected:
        raise TransientError(f"{cfg.model_name}: champion is v{current} after the gate set v{expected}; "
                             "another promotion interfered, retrying")


def promotion_lock(model_name: str, timeout: float = 300.0) -> Any:
    """One promotion per registered model at a time: a create-only lock object in the artifact bucket."""
    from steps.core.store import ArtifactStore

    return ArtifactStore.from_env("locks").lock(f"promote/{model_name}", timeout=timeout)


def log_datasets(record: RunRecord, store: ArtifactStore) -> dict[str, Any]:
    """``mlflow.log_input`` for the raw data and the train/eval splits, each with its S3 source and digest;
    returns the datasets by context (raw, training, evaluation)."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    tokenized, raw = record.datasets["tokenize"], record.datasets["ingest"]
    inputs = [(raw, "raw.jsonl", "raw", str(raw.stats.get("source_sha256", raw.digest))),
              (tokenized, "train.jsonl", "training", tokenized.digest),
              (tokenized, "eval.jsonl", "evaluation", tokenized.digest)]
    logged = {}
    for ref, name, context, digest in inputs:
        source = resolve_dataset_source(f"s3://{store.bucket}/{ref.key}/{name}")
        logged[context] = MetaDataset(source=source, name=f"{ref.step}/{name}", digest=digest[:32])
        mlflow.log_input(logged[context], context=context)
    return logged


TRAINING_KIND = "custom_model_development"  # the MLflow UI's model-training view (not the GenAI one)


def experiment_named(name: str, tags: dict[str, str] | None = None) -> Any:
    """The experiment called ``name``, created if missing (concurrent creators: one wins, all find it), with
    ``tags`` set. Never ``mlflow.set_experiment``: its "active experiment" is process-wide, and a registration
    in another thread would find it changed (``start_run(run_id=...)`` refuses a run of another experiment)."""
    from mlflow.exceptions import MlflowException

    client = _client()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            client.create_experiment(name, tags=tags)
        except MlflowException:  # created by a concurrent registration in the meantime
            pass
        experiment = client.get_experiment_by_name(name)
    for key, value in (tags or {}).items():
        if experiment.tags.get(key) != value:
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment


def training_experiment(name: str) -> Any:
    """The experiment, created if missing, tagged so the MLflow UI opens it as model training."""
    return experiment_named(name, {"mlflow.experimentKind": TRAINING_KIND})


def start_ms(run: PipelineRun | None) -> int | None:
    """The pipeline's start in epoch milliseconds (None: now)."""
    from datetime import datetime

    return int(datetime.fromisoformat(run.started).timestamp() * 1000) if run is not None else None


def run_page_tags(cfg: RegisterConfig, record: RunRecord, run: PipelineRun | None) -> dict[str, str]:
    """The MLflow run's description (``mlflow.note.content``) and its link to the flow run."""
    links = {} if run is None else {"tuneline.prefect_flow_run_id": run.flow_run_id,
                                    "tuneline.prefect_flow_run_name": run.flow_run_name,
                                    **({"tuneline.prefect_flow_run": run.url} if run.url else {})}
    return {"mlflow.note.content": run_description(cfg, record, run), **links}


def run_description(cfg: RegisterConfig, record: RunRecord, run: PipelineRun | None) -> str:
    d, adapter = record.datasets, record.model.adapter
    where = "" if run is None else (f" by flow run [{run.flow_run_name}]({run.url})" if run.url
                                    else f" by flow run {run.flow_run_name}")
    trained = adapter.stats if adapter is not None else {}
    return "\n".join([
        f"**{cfg.model_name}**: `{record.model.base.stats.get('source')}` fine-tuned with `{trained.get('method')}` "
        f"for task `{d['tokenize'].stats.get('task', 'sft')}`{where}.",
        "",
        f"- data: `{d['ingest'].stats.get('source')}`, {d['scrub'].stats.get('records_out')} records after scrub; "
        f"{split_summary(d['tokenize'].stats)}",
        f"- train: {trained.get('steps')} steps on {trained.get('device')}, loss {trained.get('first_loss')} -> "
        f"{trained.get('final_loss')}",
        f"- gate metric: `{cfg.metric}`; the model card (model version page) has the evaluation and decision",
    ])


def logged_model_name(model_name: str) -> str:
    """The logged model is named after the registered model (MLflow allows letters, digits, ``-_.``)."""
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "-", model_name).strip("-") or "model"


EXAMPLE_TEXT = {"classification": "An example text to classify.", "regression": "An example text to score.",
                "mlm": "The capital of France is [MASK]."}


REWARD_EXAMPLE = {"prompt": "What is the capital of France?", "response": "The capital of France is Paris."}


def served_encoding(data: DatasetRef) -> dict[str, Any]:
    """Served inputs are encoded as tokenize encoded the training rows: a reward model's ``pair_input`` (chat or
    text_pair) and ``max_seq_len``, an encoder-decoder's ``max_seq_len`` (its inputs are cut there), from the
    tokenize stats (nothing for other tasks)."""
    task = data.stats.get("task")
    if task == "seq2seq":
        return {"max_seq_len": data.stats.get("max_seq_len", 256)}
    if task != "reward":
        return {}
    return {"pair_input": data.stats.get("pair_input", "chat"), "max_seq_len": data.stats.get("max_seq_len", 256)}


def input_example(task: str, store: ArtifactStore, data: DatasetRef) -> list[Any]:
    """One input a served model answers: the first held-out prompt's last user turn, or a fixed text (a
    {prompt, response} pair for a reward model)."""
    if task == "reward":
        return [REWARD_EXAMPLE]
    if task in EXAMPLE_TEXT:
        return [EXAMPLE_TEXT[task]]
    if "eval_prompts.jsonl" in store.manifest(data.key)["files"]:
        for prompt in store.read_jsonl(data, "eval_prompts.jsonl")[:20]:
            if isinstance(prompt.get("input"), str) and prompt["input"].strip():  # a seq2seq input
                return [prompt["input"][:500]]
            turns = [m.get("content") for m in prompt.get("messages") or [] if m.get("role") == "user"]
            if turns and isinstance(turns[-1], str) and turns[-1].strip():
                return [turns[-1][:500]]
    return ["Hello! What can you do?"]


def record_sources(client: Any, info: Any, folder: Path, sources: dict[str, str]) -> None:
    """MLmodel as MLflow writes it names the local staging folders the artifacts were copied from, and the
    local path of ``serving.py``: record where they come from instead (store keys, code version)."""
    import yaml

    folder.mkdir()
    location = client.get_logged_model(info.model_id).artifact_location
    text = Path(mlflow_download(f"{location.rstrip('/')}/MLmodel", folder)).read_text()
    model = yaml.safe_load(text)
    flavor = model["flavors"]["python_function"]
    for name, entry in (flavor.get("artifacts") or {}).items():
        if name in sources:
            entry["uri"] = sources[name]
    if "model_code_path" in flavor:
        flavor["model_code_path"] = Path(flavor["model_code_path"]).name
    (folder / "MLmodel").write_text(yaml.safe_dump(model, sort_keys=False))
    client.log_model_artifact(info.model_id, str(folder / "MLmodel"))


def mlflow_download(uri: str, folder: Path) -> str:
    import mlflow

    return mlflow.artifacts.download_artifacts(uri, dst_path=str(folder))


def mlflow_ui() -> str | None:
    """The MLflow server's address without credentials (None when the tracking URI is not a server)."""
    from urllib.parse import urlsplit, urlunsplit

    import mlflow

    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    parts = urlsplit(uri)
    return urlunsplit((parts.scheme, parts.hostname + (f":{parts.port}" if parts.port else ""), parts.path.rstrip("/"),
                       "", ""))  # no user:password@ in a link


def run_artifact_url(run_id: str, path: str) -> str | None:
    """Where a browser logged in to MLflow gets one of the run's artifacts (e.g. a plot)."""
    from urllib.parse import urlencode

    ui = mlflow_ui()
    return f"{ui}/get-artifact?{urlencode({'path': path, 'run_uuid': run_id})}" if ui else None


def version_links(version: RegisteredVersion) -> dict[str, str]:
    """The MLflow UI pages of the version's run and of the version (none when the tracking URI is not a server)."""
    ui = mlflow_ui()
    if ui is None:
        return {}
    experiment = _client().get_run(version.run_id).info.experiment_id
    view = "?workflowType=machine_learning"  # the UI's model-training view (its default is the GenAI one)
    return {"MLflow run": f"{ui}/#/experiments/{experiment}/runs/{version.run_id}{view}",
            "model version": f"{ui}/#/models/{version.name}/versions/{version.version}{view}"}


def signature_for(task: str) -> Any:
    """Prompts in, answers out (with a ``max_new_tokens`` param), or texts in, labels / values / filled texts out."""
    from mlflow.models import infer_signature

    if task == "classification":
        return infer_signature(["text"], ["label"])
    if task == "regression":
        return infer_signature(["text"], [0.5])
    if task == "mlm":
        return infer_signature(["text with [MASK]"], ["filled text"])
    if task == "reward":  # scores out; inputs are plain texts or {prompt, response} dicts, which one column
        # schema cannot both describe (MLflow would drop a list of strings checked against named columns)
        from mlflow.models import ModelSignature
        from mlflow.types.schema import ColSpec, Schema

        return ModelSignature(inputs=None, outputs=Schema([ColSpec("double")]))
    # A params schema makes `predict(..., params={"max_new_tokens": n})` reach the model.
    return infer_signature(["prompt"], ["answer"], params={"max_new_tokens": 64})


def base_model_uri(base: ArtifactRef, store: ArtifactStore) -> str:
    """``runs:/<id>/base_model`` for this base digest, logging the weights once per digest."""
    import mlflow

    experiment = experiment_named(BASE_EXPERIMENT)
    found = mlflow.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`tuneline.base_digest` = '{base.digest}' and "
        "attributes.status = 'FINISHED'", output_format="list", max_results=1,
    )
    if found:
        return f"runs:/{found[0].info.run_id}/base_model"
    folder = store.download(base)
    with mlflow.start_run(experiment_id=experiment.experiment_id, run_name=f"base-{base.digest[:12]}",
                          tags={"tuneline.base_digest": base.digest, "tuneline.base_key": base.key}) as run:
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.name != "_MANIFEST.json":
                mlflow.log_artifact(str(path), "base_model")
    return f"runs:/{run.info.run_id}/base_model"


def lineage_tags(key: str, record: RunRecord) -> dict[str, str]:
    adapter = record.model.adapter
    return {
        "tuneline.code_version": code_version(),
        "tuneline.config_hash": run_key("params", record.params, []),
        "tuneline.data_digest": record.datasets["tokenize"].digest,
        "tuneline.raw_digest": str(record.datasets["ingest"].stats.get("source_sha256", "")),
        "tuneline.base_digest": record.model.base.digest,
        "tuneline.base_source": str(record.model.base.stats.get("source", "")),
        "tuneline.base_chain": json.dumps(base_chain(record.model.base)),
        **({"tuneline.parent": f"models:/{parent['model']}/{parent['version']}"}
           if (parent := record.model.base.stats.get("parent")) else {}),
        "tuneline.adapter_digest": adapter.digest if adapter else "",
        "tuneline.method": str(adapter.stats.get("method", "")) if adapter else "",
        "tuneline.model_ref": record.model.model_dump_json(),
        "tuneline.register_key": key,
    }


def base_chain(base: ArtifactRef) -> list[str]:
    """Where the base model came from, oldest first: e.g. [smollm2-135m-instruct, models:/tuneline-chat/3]."""
    return list(base.stats.get("chain") or [str(base.stats.get("source", ""))])


def log_series(run_id: str, history: list[dict[str, float]]) -> None:
    """Per-step training metrics in batches (one request per 500 points, not one per point)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    points = [Metric(name, float(value), now, int(row["step"])) for row in history for name, value in row.items()
              if name != "step" and isinstance(value, (int, float))]
    for i in range(0, len(points), 500):
        _client().log_batch(run_id, metrics=points[i : i + 500])


def new_figure(width: float, height: float, panels: int = 1) -> tuple[Any, Any]:
    """A figure and its axes (``panels`` side by side: an array of them), made without pyplot: pyplot keeps
    every figure it made until it is closed (mlflow.log_figure does not close them: a long-lived worker would
    hold them all) and its state is shared by the threads of a process (concurrent runs register at once).
    Saved through Agg."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots(1, panels)


def smoothed(values: list[float]) -> list[float]:
    """Exponential moving average, bias-corrected (as TensorBoard draws it); the weight grows with the length."""
    weight = min(0.95, 1 - 1 / max(2.0, len(values) / 10))
    out, avg = [], 0.0
    for i, value in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * value
        out.append(avg / (1 - weight**i))
    return out


def loss_curve(history: list[dict[str, float]], evals_during: list[dict[str, float]], evals: dict[str, dict]) -> Any:
    """Train loss per step (faint) and smoothed, and the eval loss: the base model's at step 0, the
    evaluations during training (early stopping), the candidate's after the last step."""
    fig, ax = new_figure(6, 3.5)
    steps, losses = [h["step"] for h in history], [h["loss"] for h in history]
    ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=1, label="train loss (per step)")
    ax.plot(steps, smoothed(losses), color="tab:blue", linewidth=2, label="train loss (smoothed)")
    before, after = evals.get("base", {}).get("eval_loss"), evals.get("candidate", {}).get("eval_loss")
    points = ([(0, before)] if before is not None else []) + [(e["step"], e["loss"]) for e in evals_during] + \
        ([(steps[-1] if steps else 0, after)] if after is not None else [])
    if points:
        ax.plot(*zip(*points), color="tab:orange", marker="o", linewidth=2, label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


RL_CURVES = (("reward", "mean reward", "tab:green"), ("kl", "KL to the reference (per token)", "tab:red"),
             ("completion_length", "completion length (tokens)", "tab:purple"))


def rl_curves(history: list[dict[str, float]]) -> Any:
    """Online RL by optimizer step, three panels, each value faint and smoothed: mean reward, KL to the
    reference (not measured when train.rl.beta is 0), completion length."""
    fig, axes = new_figure(10, 3.2, panels=len(RL_CURVES))
    for ax, (name, label, color) in zip(axes, RL_CURVES):
        steps, values = [h["step"] for h in history if name in h], [h[name] for h in history if name in h]
        ax.plot(steps, values, color=color, alpha=0.3, linewidth=1)
        ax.plot(steps, smoothed(values), color=color, linewidth=2)
        if not values:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(label)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def reward_win_rates(store: ArtifactStore, evaluations: dict[str, EvalReport]) -> dict[str, float]:
    """Online RL: the share of held-out prompts whose candidate answer got a higher reward than the base's
    (``reward_win_rate``) and the champion's (``reward_win_rate_vs_champion``) answer, ties counting half;
    with a reward-model reward, the reward model's win rate. Empty for other tasks."""
    if "mean_reward" not in evaluations["candidate"].stats:
        return {}

    def rewards(report: EvalReport) -> dict[str, float]:
        return {s["id"]: s["reward"] for s in store.read_jsonl(report, "samples.jsonl") if "reward" in s}

    mine = rewards(evaluations["candidate"])
    return {name: win_rate(mine, rewards(evaluations[role]))
            for role, name in (("base", "reward_win_rate"), ("champion", "reward_win_rate_vs_champion"))
            if role in evaluations}


def win_rate(mine: dict[str, float], theirs: dict[str, float]) -> float:
    """Share of the prompts (ids) both answered where ``mine`` is higher, ties counting half."""
    shared = [i for i in mine if i in theirs]
    score = sum(1.0 if mine[i] > theirs[i] else 0.5 if mine[i] == theirs[i] else 0.0 for i in shared)
    return round(score / max(len(shared), 1), 6)


def record_loss_histogram(losses: list[dict[str, Any]]) -> Any:
    """Histogram of the records' losses after training, train and eval overlaid (tuneline data worst lists them)."""
    fig, ax = new_figure(6, 3.5)
    values = [r["loss"] for r in losses]
    bins = 40 if values and max(values) > min(values) else 1
    for split in ("train", "eval"):
        mine = [r["loss"] for r in losses if r["split"] == split]
        if mine:
            ax.hist(mine, bins=bins, range=(min(values), max(values)), alpha=0.6, label=f"{split} ({len(mine)})")
    ax.set_xlabel("loss per record after training")
    ax.set_ylabel("records")
    ax.set_title("Per-record loss (high: hard or mislabelled; identical: duplicates)")
    ax.legend()
    fig.tight_layout()
    return fig


def confusion_figure(stats: dict[str, Any]) -> Any:
    """The candidate's confusion matrix (rows: true label, columns: predicted), counts in the cells."""
    matrix, labels = stats["confusion_matrix"], stats["labels"]
    fig, ax = new_figure(1.2 * len(labels) + 2, 1.2 * len(labels) + 1.5)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"accuracy {stats.get('accuracy')}, macro F1 {stats.get('f1_macro')}")
    fig.tight_layout()
    return fig


def model_card(cfg: RegisterConfig, record: RunRecord, key: str, wins: dict[str, float] | None = None) -> str:
    d = {name: ref.stats for name, ref in record.datasets.items()}
    e = {name: report.stats for name, report in record.evaluations.items()}
    e["candidate"] = {**e["candidate"], **(wins or {})}
    pii = d["scrub"].get("pii", {})
    shown = [m for m in CARD_METRICS if any(m in s for s in e.values())]
    lines = [
        f"# {cfg.model_name}",
        "",
        f"Fine-tuned by tuneline with method `{record.model.adapter.stats.get('method')}` for task "
        f"`{d['tokenize'].get('task', 'sft')}`.",
        "",
        "## Data",
        f"- source: `{d['ingest'].get('source')}` ({d['ingest'].get('lines')} lines, sha256 `{d['ingest'].get('source_sha256', '')[:16]}`)"
        + mixture_note(d["ingest"]),
        f"- validation: {d['validate'].get('records')} records passed {d['validate'].get('rules')} rules"
        + quarantine_note(d["validate"]),
        f"- scrub: {d['scrub'].get('records_in')} -> {d['scrub'].get('records_out')} records, "
        f"{d['scrub'].get('duplicates_removed')} duplicates removed" + quarantine_note(d["scrub"]) + ", PII replaced: "
        + (", ".join(f"{k} {v}" for k, v in pii.items()) or "none"),
        f"- tokenize: {split_summary(d['tokenize'])}",
        "",
        "## Evaluation (same eval set)",
        "| model | " + " | ".join(shown) + " |",
        "|---|" + "---|" * len(shown),
        *[f"| {name} | " + " | ".join(str(s.get(m, "-")) for m in shown) + " |" for name, s in e.items()],
        "",
        "## Lineage",
        f"- run key `{key}`, code version `{code_version()}`",
        f"- base model digest `{record.model.base.digest[:16]}`, data digest `{record.datasets['tokenize'].digest[:16]}`",
        f"- base model: `{record.model.base.stats.get('source')}` ({record.model.base.stats.get('architecture')}, "
        f"{record.model.base.stats.get('parameters', 0):,} parameters"
        + (f", Hub commit `{record.model.base.stats['revision']}`" if record.model.base.stats.get("revision") else "")
        + ")",
        "- chain: " + " -> ".join(f"`{link}`" for link in [*base_chain(record.model.base), "this version"]),
    ]
    return "\n".join(lines) + "\n"


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, list) else v
    return out


def serving_requirements() -> list[str]:
    from importlib.metadata import version

    packages = ("mlflow", "torch", "transformers", "peft", "safetensors", "bitsandbytes", "pydantic", "pyyaml")
    return [f"{pkg}=={version(pkg)}" for pkg in packages]


def mixture_note(stats: dict) -> str:
    """' (mixture: a.jsonl 75.0% = 300 of 1000 records, b.jsonl ... records, all eval)' for ingest's mixture of
    sources (a source pinned to a side says so), else ''."""
    if not stats.get("sources"):
        return ""
    return " (mixture: " + ", ".join(f"{s['source']} {s['share']:.1%} = {s['taken']} of {s['records']} records"
                                     + (f", all {s['split']}" if s.get("split") else "")
                                     for s in stats["sources"]) + ")"


def quarantine_note(stats: dict) -> str:
    """', 3 quarantined (rule: count, ...)' when validate dropped records, else ''."""
    if not stats.get("quarantined"):
        return ""
    rules = ", ".join(f"{rule}: {n}" for rule, n in stats.get("quarantine_rules", {}).items())
    return f", {stats['quarantined']} quarantined ({rules})"
