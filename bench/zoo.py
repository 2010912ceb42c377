"""Tiny random models of the common families, built from their transformers config classes (nothing
downloaded), each with its own byte-level BPE tokenizer trained on a given text and, for causal models,
a ChatML template. Used by the architecture matrix test and by ``bench/memory_plan.py``.

    folder = build("qwen2", tmp_path / "qwen2", texts)   # a Hugging Face folder: config, safetensors, tokenizer
    python bench/zoo.py qwen2 /tmp/tiny-qwen2             # the same from the command line (shipped corpus)
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

CAUSAL = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox", "olmo")
ENCODERS = ("bert", "roberta", "deberta_v2", "modernbert")
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SPECIALS_CAUSAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
SPECIALS_ENCODER = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def shape(scale: int) -> dict[str, int]:
    """hidden, intermediate, layers, heads, kv heads of a model ``scale`` times the tiny one."""
    return dict(hidden=32 * scale, intermediate=64 * scale, layers=2, heads=4, kv=2)


def config_for(family: str, vocab: int, ids: dict[str, int], scale: int = 1) -> Any:
    """The config of a tiny ``family`` model for a vocabulary of ``vocab`` tokens with special ``ids``."""
    import transformers as t

    s = shape(scale)
    common = dict(vocab_size=vocab, hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                  num_hidden_layers=s["layers"], num_attention_heads=s["heads"], max_position_embeddings=512,
                  pad_token_id=ids["pad"])
    decoder = common | dict(num_key_value_heads=s["kv"], bos_token_id=ids.get("bos"), eos_token_id=ids.get("eos"),
                            tie_word_embeddings=True)
    head_dim = s["hidden"] // s["heads"]
    if family == "llama":
        return t.LlamaConfig(**decoder)
    if family == "qwen2":
        return t.Qwen2Config(**decoder)
    if family == "qwen3":
        return t.Qwen3Config(**decoder, head_dim=head_dim)
    if family == "mistral":
        return t.MistralConfig(**decoder, sliding_window=None)
    if family == "gemma2":
        return t.Gemma2Config(**decoder, head_dim=head_dim, sliding_window=64)
    if family == "gemma3":
        return t.Gemma3TextConfig(**decoder, head_dim=head_dim, sliding_window=64)
    if family == "phi3":
        return t.Phi3Config(**{**decoder, "tie_word_embeddings": False})
    if family == "olmo":
        return t.OlmoConfig(**decoder)
    if family == "gpt2":
        return t.GPT2Config(vocab_size=vocab, n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"],
                            n_inner=s["intermediate"], n_positions=512, bos_token_id=ids["bos"],
                            eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    if family == "gpt_neox":
        return t.GPTNeoXConfig(**decoder)
    encoder = common | dict(type_vocab_size=2)
    if family == "bert":
        return t.BertConfig(**encoder)
    if family == "roberta":
        return t.RobertaConfig(**encoder, bos_token_id=ids["cls"], eos_token_id=ids["sep"])
    if family == "deberta_v2":
        return t.DebertaV2Config(**encoder, relative_attention=True, position_buckets=32,
                                 pos_att_type=["p2c", "c2p"])
    if family == "modernbert":
        return t.ModernBertConfig(**{k: v for k, v in common.items()}, global_attn_every_n_layers=2,
                                  local_attention=64, cls_token_id=ids["cls"], sep_token_id=ids["sep"],
                                  bos_token_id=ids["cls"], eos_token_id=ids["sep"])
    raise ValueError(f"unknown family {family!r} (known: {', '.join(CAUSAL + ENCODERS)})")


def tokenizer_for(family: str, texts: list[str], vocab: int = 600) -> Any:
    """A byte-level BPE trained on ``texts``: ChatML specials and template for causal families,
    [CLS] ... [SEP] framing for encoders."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    encoder = family in ENCODERS
    specials = SPECIALS_ENCODER if encoder else SPECIALS_CAUSAL
    bpe = Tokenizer(models.BPE(unk_token="[UNK]" if encoder else None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if encoder:
        bpe.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", bpe.token_to_id("[CLS]")), ("[SEP]", bpe.token_to_id("[SEP]"))])
        return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                       sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                        pad_token="<pad>", additional_special_tokens=["<|im_start|>"],
                                        model_max_length=512)
    tokenizer.chat_template = CHATML
    return tokenizer


def build(family: str, out: Path, texts: list[str], scale: int = 1, seed: int = 0) -> Path:
    """Write a tiny random ``family`` model with its own tokenizer to ``out``; returns ``out``."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    tokenizer = tokenizer_for(family, texts)
    if family in ENCODERS:
        ids = {"pad": tokenizer.pad_token_id, "cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id}
    else:
        ids = {"pad": tokenizer.pad_token_id, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}
    config = config_for(family, len(tokenizer), ids, scale)
    torch.manual_seed(seed)
    model = (AutoModel if family in ENCODERS else AutoModelForCausalLM).from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    if family not in ENCODERS:
        model.generation_config.pad_token_id = ids["pad"]
        model.generation_config.eos_token_id = ids["eos"]
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@functools.lru_cache(maxsize=1)
def corpus() -> list[str]:
    """Short English and Korean texts for the tokenizers (the chatterbot-corpus package's conversations)."""
    import json

    from steps.ingest.corpora import chatterbot_jsonl

    lines = chatterbot_jsonl(["english", "korean"]).decode("utf-8").splitlines()
    return [m["content"] for line in lines for m in json.loads(line)["messages"]][:600]


if __name__ == "__main__":
    print(build(sys.argv[1], Path(sys.argv[2]), corpus()))
