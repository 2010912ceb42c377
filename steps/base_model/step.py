"""Base model step: the model a run starts from, as a plain Hugging Face folder (config, safetensors
weights, tokenizer with its chat template) in the store, keyed by its content.

    prepare_base_model(BaseModelConfig(source="/models/qwen2-0.5b"), store, chat_template=None)

Sources (steps/core/model_source.py): shipped names, local folders, .gguf files, ``s3://`` prefixes,
``hf:`` repositories and ``models:/`` registry versions. Every folder is checked (safetensors only, no
remote code) before anything loads it; docs/DESIGN.md, "Base models", says why each choice.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from steps.base_model.folder import (
    file_digest,
    fingerprint,
    is_causal_lm,
    model_files,
    parameter_count,
    read_config,
)
from steps.base_model.remote import fetch_hf, fetch_registry, fetch_s3, registry_version
from steps.base_model.shipped import build_from_gguf, build_shipped, shipped_origin
from steps.base_model.templates import apply_template, resolve_template
from steps.config import BaseModelConfig
from steps.core.errors import ConfigError
from steps.core.lineage import run_key
from steps.core.model_source import Source, parse_source
from steps.core.store import ArtifactRef, ArtifactStore, ModelRef

log = logging.getLogger(__name__)

STEP = "base_model"


def prepare_base_model(cfg: BaseModelConfig, store: ArtifactStore, chat_template: str | None = None) -> ModelRef:
    """The base model ``cfg.source`` as a Hugging Face folder artifact, with ``chat_template``
    (``tokenize.chat_template``) written into its tokenizer when given.

    The key is the model's content (file digests; for a registry version, its trained weights' digests),
    not its path, so an unchanged 7B folder is neither hashed (digests cached by path, size and mtime) nor
    uploaded twice. Stats: source, kind, architecture, parameters, whether it is a causal LM or an
    encoder-decoder, the chat
    template, the Hub commit (hf:) or the parent version and base chain (models:/). Raises ``ConfigError``
    naming ``base_model.source`` for a missing or unusable model (no safetensors, no tokenizer, remote code,
    offline Hub, unknown registry version).
    """
    source = parse_source(cfg.source)
    template = resolve_template(chat_template) if chat_template else None
    settings = {"template": template[0] if template else None}
    origin = f"base_model.source {cfg.source!r}"
    digests_cache = store.cache_dir / "fingerprints"
    provenance: dict[str, Any] = {"source": cfg.source, "kind": source.kind, "chain": [cfg.source]}
    with tempfile.TemporaryDirectory(prefix="tuneline-base-") as tmp:
        staging = Path(tmp) / "model"
        staging.mkdir()
        if source.kind in ("shipped", "gguf"):
            built = shipped_origin(source.name) if source.kind == "shipped" else Path(source.name).expanduser()
            if not built.is_file():
                raise ConfigError(f"{origin}: no such file")
            seed = cfg.seed if source.name.startswith("tiny-") else None
            built_digest = file_digest(built, digests_cache)
            key = run_key(STEP, settings | {"shipped": source.name if source.kind == "shipped" else None, "seed": seed},
                          [built_digest])
            if (done := store.lookup(STEP, key)) is not None:
                return ModelRef(base=ArtifactRef(**done.model_dump()))
            cache = store.cache_dir / "gguf-tokenizers" / built_digest[:32] if built.suffix == ".gguf" else None
            if source.kind == "shipped":
                build_shipped(source.name, cfg.seed, staging, cache)
            else:
                build_from_gguf(built, staging, cache)
            files, digests = model_files(staging, origin), None
        elif source.kind == "registry":
            key, parent_digest = registry_key(source, settings, origin)
            if (done := store.lookup(STEP, key)) is not None:
                return ModelRef(base=ArtifactRef(**done.model_dump()))
            parent = fetch_registry(source, staging)
            provenance |= {"parent": {k: v for k, v in parent.items() if k != "chain"}, "chain": parent["chain"],
                           "parent_digest": parent_digest}
            files, digests = model_files(staging, origin), None
        else:
            if source.kind == "local":
                folder = Path(source.name).expanduser()
            elif source.kind == "s3":
                folder = fetch_s3(source, store.cache_dir / "model-sources")
            else:
                folder, sha = fetch_hf(source, store.cache_dir / "model-sources")
                provenance |= {"revision": sha, "chain": [f"hf:{source.name}@{sha}"]}
            files = model_files(folder, origin)
            content, digests = fingerprint(folder, files, digests_cache)
            key = run_key(STEP, settings, [content, provenance.get("revision", "")])
            if (done := store.lookup(STEP, key)) is not None:
                return ModelRef(base=ArtifactRef(**done.model_dump()))
            stage(folder, files, staging)
        if template is not None:  # rewrites tokenizer files and generation_config.json; weights keep their digests
            apply_template(staging, *template)
            files = model_files(staging, origin)
            digests = {n: d for n, d in (digests or {}).items() if n.endswith(".safetensors")}
        stats = describe(staging, origin) | provenance | {"chat_template": template[1] if template else
                                                          ("tokenizer" if has_template(staging) else None)}
        writer = store.writer(STEP, key, cfg)
        for name in files:
            writer.put_file(name, staging / name, sha256=(digests or {}).get(name))
        done = writer.commit(stats=stats)
    log.info("base_model: %s (%s, %s parameters)", cfg.source, stats["architecture"], f"{stats['parameters']:,}")
    return ModelRef(base=ArtifactRef(**done.model_dump()))


def registry_key(source: Source, settings: dict[str, Any], origin: str) -> tuple[str, str]:
    """The artifact key of a registry version (its name, number and trained-model digest), read from the
    registry without downloading it."""
    version = registry_version(source, origin)
    ref = version.tags.get("tuneline.model_ref")
    if ref is None:
        raise ConfigError(f"{origin}: v{version.version} was not registered by tuneline (no tuneline.model_ref tag)")
    digest = ModelRef.model_validate_json(ref).digest
    return run_key(STEP, settings | {"registry": source.name, "version": version.version}, [digest]), digest


def stage(folder: Path, files: list[str], staging: Path) -> None:
    """The model's files in ``staging``: weights linked (no copy of a large model), the small
    tokenizer and config files copied (a chat template may rewrite them)."""
    for name in files:
        if name.endswith(".safetensors"):
            (staging / name).symlink_to((folder / name).resolve())
        else:
            shutil.copyfile(folder / name, staging / name)


def has_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").exists():
        return True
    path = folder / "tokenizer_config.json"
    return path.exists() and bool(json.loads(path.read_text()).get("chat_template"))


def describe(folder: Path, origin: str) -> dict[str, Any]:
    config = read_config(folder / "config.json", origin)
    return {"architecture": (config.get("architectures") or [config.get("model_type")])[0],
            "model_type": config.get("model_type"), "causal": is_causal_lm(config),
            "seq2seq": bool(config.get("is_encoder_decoder")),
            "parameters": parameter_count(folder)}
