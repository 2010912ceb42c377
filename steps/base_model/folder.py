"""A model folder in Hugging Face layout, checked before anything loads it: which files belong to the
model, whether transformers can build its architecture without remote code, its content fingerprint
(cached by path, size and modification time, so a 7B folder is hashed once), its parameter count
(read from the safetensors headers, no weights loaded) and whether it has a language-model head.

    files = model_files(folder, origin="base_model.source '/models/qwen'")   # ConfigError if unusable
    digest = fingerprint(folder, files, cache_dir)
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

from steps.core.errors import ConfigError
from steps.core.lineage import sha256_file

# What a model folder contributes to the base model artifact; anything else (README, .git, pickled
# weights, training checkpoints) stays behind.
MODEL_PATTERNS = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json")
TOKENIZER_PATTERNS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                      "chat_template.jinja", "chat_template.json", "vocab.txt", "vocab.json", "merges.txt",
                      "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "spm.model")
PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def is_tokenizer_file(name: str) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in TOKENIZER_PATTERNS)


def model_files(folder: Path, origin: str) -> list[str]:
    """The names of the model's files in ``folder`` (config, safetensors weights, tokenizer), after
    checking that it is a folder transformers can load safely; ``ConfigError`` naming ``origin`` and
    what is wrong otherwise."""
    if not folder.is_dir():
        raise ConfigError(f"{origin}: no such folder (a Hugging Face model folder holds config.json, "
                          "*.safetensors weights and the tokenizer files)")
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    if "config.json" not in names:
        raise ConfigError(f"{origin}: no config.json; a Hugging Face model folder holds config.json, "
                          "*.safetensors weights and the tokenizer files")
    weights = [n for n in names if n.endswith(".safetensors")]
    if not weights:
        pickled = [n for n in names if any(fnmatch.fnmatch(n, p) for p in PICKLED)]
        raise ConfigError(f"{origin}: no *.safetensors weights" + (
            f"; {pickled[0]} is a pickle, which tuneline does not load (it can run code): convert it with "
            "model.save_pretrained(folder, safe_serialization=True)" if pickled else ""))
    if not any(n in names for n in ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "spiece.model")):
        raise ConfigError(f"{origin}: no tokenizer files (tokenizer.json, or vocab/merges/sentencepiece files); "
                          "save the tokenizer into the folder with tokenizer.save_pretrained(folder)")
    check_architecture(read_config(folder / "config.json", origin), origin)
    return [n for n in names if any(fnmatch.fnmatch(n, p) for p in MODEL_PATTERNS + TOKENIZER_PATTERNS)]


def read_config(path: Path, origin: str) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{origin}: {path.name} is not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{origin}: {path.name} is not a JSON object")
    return config


def check_architecture(config: dict[str, Any], origin: str) -> None:
    """Refuse what only remote code could build: ``trust_remote_code`` stays off."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if "auto_map" in config or model_type not in CONFIG_MAPPING:
        what = f"model_type {model_type!r}" if model_type else "a config without model_type"
        raise ConfigError(f"{origin}: {what} needs code shipped with the model (trust_remote_code), which tuneline "
                          "keeps off; use a model whose architecture transformers implements")


def is_causal_lm(config: dict[str, Any]) -> bool:
    """Whether the folder's model generates text: one of its ``architectures`` is a causal-LM class
    (e.g. Qwen2ForCausalLM, GPT2LMHeadModel; BertModel or ModernBertForMaskedLM are encoders). A config
    without architectures: its type has a causal-LM class and no masked-LM one (BERT has both)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if config.get("is_encoder_decoder"):
        return False
    if architectures := config.get("architectures"):
        return bool(set(architectures) & set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()))
    kind = config.get("model_type")
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def parameter_count(folder: Path) -> int:
    """Parameters in the folder's safetensors files, read from their headers (no weights loaded).
    Tied weights stored once count once."""
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for name, meta in header.items():
            if name != "__metadata__":
                count = 1
                for dim in meta["shape"]:
                    count *= dim
                total += count
    return total


def file_digest(path: Path, cache_dir: Path | None) -> str:
    """sha256 of ``path``, remembered in ``cache_dir`` by (absolute path, size, mtime): a large
    weight file is read once, not on every run."""
    stat = path.stat()
    entry = None
    if cache_dir is not None:
        name = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
        entry = cache_dir / f"{name}.json"
        try:
            known = json.loads(entry.read_text())
            if known["size"] == stat.st_size and known["mtime_ns"] == stat.st_mtime_ns:
                return str(known["sha256"])
        except (OSError, ValueError, KeyError):
            pass
    digest = sha256_file(path)
    if entry is not None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                   "sha256": digest}))
        tmp.replace(entry)
    return digest


def fingerprint(folder: Path, files: list[str], cache_dir: Path | None) -> tuple[str, dict[str, str]]:
    """The content fingerprint of the model (its files' names and digests, not its path), and the
    per-file digests."""
    digests = {name: file_digest(folder / name, cache_dir) for name in files}
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest(), digests
