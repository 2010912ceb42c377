"""Fetching a base model that is not on this machine: from S3, the Hugging Face Hub or the MLflow
model registry, into a local folder that steps/base_model/folder.py then checks like any other.

    folder = fetch_s3(source, cache)                   # s3://bucket/prefix/, re-downloading changed files only
    folder, sha = fetch_hf(source, cache)              # hf:ORG/NAME@REV, the revision resolved to a commit
    parent = fetch_registry(source, out)               # models:/NAME@ALIAS: parent weights merged into ``out``

Credentials come from the environment only: the store's S3 keys (or TUNELINE_MODEL_S3_ENDPOINT_URL,
TUNELINE_MODEL_AWS_ACCESS_KEY_ID, TUNELINE_MODEL_AWS_SECRET_ACCESS_KEY for another S3), ``HF_TOKEN``
for the Hub, MLFLOW_TRACKING_URI for the registry. None of them is logged or stored.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from steps.base_model.folder import MODEL_PATTERNS, TOKENIZER_PATTERNS
from steps.core.errors import ConfigError
from steps.core.model_source import Source

log = logging.getLogger(__name__)

PATTERNS = MODEL_PATTERNS + TOKENIZER_PATTERNS


def wanted(name: str) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in PATTERNS)


def fetch_s3(source: Source, cache: Path) -> Path:
    """The model files directly under ``s3://bucket/prefix/`` in a local folder (cached: a file is
    downloaded again only when its ETag or size changed)."""
    from botocore.exceptions import BotoCoreError, ClientError

    from steps.core.store import s3_client

    origin = f"base_model.source 's3://{source.name}/{source.ref}'"
    endpoint = os.environ.get("TUNELINE_MODEL_S3_ENDPOINT_URL") or os.environ.get("TUNELINE_S3_ENDPOINT_URL")
    keys = (os.environ.get("TUNELINE_MODEL_AWS_ACCESS_KEY_ID"), os.environ.get("TUNELINE_MODEL_AWS_SECRET_ACCESS_KEY"))
    client = s3_client(endpoint, keys=keys if all(keys) else None)
    target = cache / "s3" / hashlib.sha256(f"{endpoint}|{source.name}/{source.ref}".encode()).hexdigest()[:32]
    target.mkdir(parents=True, exist_ok=True)
    index_path = target / ".etags.json"
    index: dict[str, list[Any]] = json.loads(index_path.read_text()) if index_path.exists() else {}
    try:
        listed: dict[str, tuple[str, int]] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=source.name, Prefix=source.ref):
            for obj in page.get("Contents", []):
                name = obj["Key"][len(source.ref):]
                if "/" not in name and wanted(name):
                    listed[name] = (obj["ETag"].strip('"'), obj["Size"])
        if not listed:
            raise ConfigError(f"{origin}: no model files under that prefix (expected config.json, *.safetensors "
                              "and tokenizer files directly under it)")
        for name, (etag, size) in sorted(listed.items()):
            path = target / name
            if index.get(name) != [etag, size] or not path.exists() or path.stat().st_size != size:
                log.info("base_model: downloading s3://%s/%s%s (%.1f MiB)", source.name, source.ref, name, size / 2**20)
                client.download_file(source.name, source.ref + name, str(path))
                index[name] = [etag, size]
    except (ClientError, BotoCoreError) as exc:
        raise ConfigError(f"{origin}: cannot read it ({exc})") from None
    for path in target.iterdir():
        if path.is_file() and path.name != index_path.name and path.name not in listed:
            path.unlink()
    index_path.write_text(json.dumps({k: v for k, v in index.items() if k in listed}))
    return target


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def offline_message(source: Source, why: str) -> str:
    return (f"base_model.source 'hf:{source.name}@{source.ref}': {why}. Download the model where the Hub is "
            f"reachable (huggingface-cli download {source.name} --revision {source.ref} --local-dir DIR) and pass "
            "base_model.source=DIR (a local folder), or upload DIR and pass s3://bucket/prefix/")


def fetch_hf(source: Source, cache: Path) -> tuple[Path, str]:
    """The repository's model files at ``source.ref`` (a branch, tag or commit), and the commit sha it
    resolved to. The token is ``HF_TOKEN`` from the environment, never a parameter."""
    if offline():
        raise ConfigError(offline_message(source, "this machine is offline (HF_HUB_OFFLINE is set)"))
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    token = os.environ.get("HF_TOKEN") or None
    try:
        sha = HfApi().model_info(source.name, revision=source.ref, token=token).sha
        folder = snapshot_download(source.name, revision=sha, token=token, allow_patterns=list(PATTERNS),
                                   cache_dir=str(cache / "hf"))
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise ConfigError(f"base_model.source 'hf:{source.name}@{source.ref}': {type(exc).__name__} (a private "
                          "repository needs HF_TOKEN in the environment)") from None
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise ConfigError(offline_message(source, f"the Hub cannot be reached ({type(exc).__name__})")) from None
    if not sha:
        raise ConfigError(f"base_model.source 'hf:{source.name}@{source.ref}': the Hub returned no commit sha")
    return Path(folder), sha


def fetch_registry(source: Source, out: Path) -> dict[str, Any]:
    """The registered tuneline model ``source`` as plain weights in ``out`` (config, safetensors,
    tokenizer) and what the lineage records of it (name, version, run, the chain of its bases).

    LoRA (and QLoRA) versions are merged: base + adapter folded into one set of weights, on which the
    new run trains a new adapter. A chain of stacked adapters would make every later version depend
    on all of its ancestors' files at serving time; merged, the parent is an ordinary base model
    whose digest the lineage records. LoReFT versions cannot be merged (the edit depends on positions)
    and are refused. Nothing from the version's code is run: the weights load with this checkout's code.
    """
    import yaml

    from steps.register.verify import verified_base_dir, verified_model_dir

    origin = f"base_model.source 'models:/{source.name}{'/' if source.version else '@'}{source.ref}'"
    version = registry_version(source, origin)
    with tempfile.TemporaryDirectory(prefix="tuneline-parent-") as tmp:
        # Every file checked against the digests recorded at registration (ArtifactError naming the file).
        local = verified_model_dir(f"{source.name}/{version.version}", Path(tmp))
        flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"].get("python_function", {})
        config = flavor.get("config") or {}
        trained, tokenizer = local / "artifacts" / "trained", local / "artifacts" / "tokenizer"
        if "base_model_uri" not in config or not trained.is_dir():
            raise ConfigError(f"{origin}: v{version.version} is not a tuneline model (no trained weights and "
                              "base model reference)")
        base = verified_base_dir(config, Path(tmp))
        method = merge_into(base, trained, tokenizer, out, origin)
    chain = json.loads(version.tags.get("tuneline.base_chain", "[]"))
    return {"model": source.name, "version": version.version, "alias": None if source.version else source.ref,
            "run_id": version.run_id, "method": method, "chain": [*chain, f"models:/{source.name}/{version.version}"]}


def registry_version(source: Source, origin: str) -> Any:
    """The registered version ``source`` names (by number or alias); ``ConfigError`` when there is none."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        return (client.get_model_version(source.name, source.ref) if source.version
                else client.get_model_version_by_alias(source.name, source.ref))
    except MlflowException as exc:
        raise ConfigError(f"{origin}: not in the model registry at {mlflow.get_tracking_uri()} "
                          f"({exc.error_code})") from None


def merge_into(base: Path, trained: Path, tokenizer: Path, out: Path, origin: str) -> str:
    """Save the trained model (base with its trained weights folded in) and its tokenizer to ``out``."""
    from transformers import AutoTokenizer

    from steps.train import methods

    meta = json.loads((trained / methods.METHOD_FILE).read_text()) if (trained / methods.METHOD_FILE).exists() else {}
    method = meta.get("method", "lora")
    if method == "reft":
        raise ConfigError(f"{origin}: a LoReFT version cannot be continued from (its interventions depend on "
                          "positions and cannot be merged into weights); continue from its base instead")
    if method == "qlora":  # the adapter of a 4-bit base, folded into the unquantized weights
        meta["method"] = "lora"
        (trained / methods.METHOD_FILE).write_text(json.dumps(meta))
    model = methods.load(base, trained, "cpu")
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload(safe_merge=True)
    if methods.task_of(trained).kind == "mlm":
        keep_backbone_modules(model, base)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)
    return method


def keep_backbone_modules(model: Any, base: Path) -> None:
    """Give a masked-LM model back the backbone modules its class leaves out (BERT's pooler) with the base's
    weights: masked-LM training never used them, and a classifier built on the adapted encoder does."""
    from transformers import AutoModel

    backbone = AutoModel.from_pretrained(base, trust_remote_code=False)
    for name, module in backbone.named_children():
        if getattr(model.base_model, name, None) is None:
            setattr(model.base_model, name, module)
