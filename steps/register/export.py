"""Export a registered version as plain weights other inference servers load:

    tuneline export tuneline-chat@champion --format safetensors --output exports/chat   # vLLM, TGI, transformers
    tuneline export tuneline-chat@champion --format gguf --output exports/chat.gguf     # llama.cpp, Ollama

``safetensors``: the trained weights merged into the base (LoRA/QLoRA adapters folded in, full and
head weights as trained) as a Hugging Face folder: ``config.json``, ``model.safetensors``, the
tokenizer and its chat template; classifiers keep their label names (``id2label``), masked-LMs export as
their ``*ForMaskedLM`` folder, encoder-decoders as their ``*ForConditionalGeneration`` folder.
``gguf``: the same merged weights as one GGUF file (F32 or F16) for Llama-family causal LMs with a
GPT-2-style BPE tokenizer (SmolLM2, Llama 3, ...), q/k laid out as llama.cpp expects, the tokenizer
and chat template in the metadata. LoReFT versions have no plain-weight form (they edit hidden
states at run time): serve those with ``mlflow models serve``.

Every export is loaded back from the written files alone (transformers; ``gguf_file=`` for GGUF)
and compared with the registered model on a few prompts: the largest next-token logit difference
and whether greedy answers agree. The report is returned and written as ``<output>.export.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from steps.core.errors import ConfigError

log = logging.getLogger(__name__)
FORMATS = ("safetensors", "gguf")
CHECK_PROMPTS = ("What is the capital of France?", "Write one sentence about the sea.", "안녕하세요, 잘 지내세요?")
GGUF_ARCHITECTURES = {"LlamaForCausalLM": "llama"}


def export_version(spec: str, fmt: str, output: Path, dtype: str = "f32") -> dict[str, Any]:
    """Export ``spec`` (NAME, NAME@ALIAS or NAME/VERSION) to ``output`` in ``fmt``; returns the check report.
    Raises ``ConfigError`` for an unknown version, a method or architecture the format cannot hold."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: one of {', '.join(FORMATS)}")
    if dtype not in ("f32", "f16"):
        raise ConfigError(f"--dtype {dtype!r}: f32 or f16")
    with tempfile.TemporaryDirectory(prefix="tuneline-export-") as tmp:
        version_dir, base_dir = fetch_version(spec, Path(tmp))
        net, tokenizer, task = merged_model(version_dir, base_dir)
        if fmt == "safetensors":
            save_folder(net, tokenizer, task, output, dtype)
            reloaded = reload_folder(output, task)
        else:
            if not task.causal_lm:
                raise ConfigError(f"{spec} is a {task.kind} model: GGUF holds causal language models; "
                                  "use --format safetensors")
            write_gguf(net, tokenizer, output, dtype, name=spec)
            reloaded = reload_gguf(output)
        report = {"model": spec, "format": fmt, "dtype": dtype, "output": str(output), "task": task.kind,
                  **compare(net, reloaded, tokenizer, task)}
    Path(f"{output}.export.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    log.info("export: %s -> %s (%s), max logit difference %.3g, greedy answers %s", spec, output, fmt,
             report["max_logit_diff"], "agree" if report["answers_agree"] else "DIFFER")
    return report


def fetch_version(spec: str, tmp: Path) -> tuple[Path, Path]:
    """The registered version's files and its base model, downloaded through the tracking server and checked
    against the digests recorded at registration (``steps/register/verify.py``)."""
    from steps.register.verify import pyfunc_config, verified_base_dir, verified_model_dir

    version_dir = verified_model_dir(spec, tmp)
    return version_dir, verified_base_dir(pyfunc_config(version_dir), tmp)


def merged_model(version_dir: Path, base_dir: Path) -> tuple[Any, Any, Any]:
    """The trained model in plain form on CPU (adapters merged), its tokenizer and task."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from steps.train import methods
    from steps.train.methods.common import load_base

    trained = version_dir / "artifacts" / "trained"
    task = methods.task_of(trained)
    cfg = methods.train_config_of(trained)
    method = cfg.method if cfg is not None else "lora"
    if method == "reft":
        raise ConfigError("a LoReFT version edits hidden states at run time and has no plain-weight form; "
                          "serve it with `mlflow models serve -m models:/NAME@ALIAS`")
    if method == "qlora":  # the adapter over the full-precision base: what a server without bitsandbytes runs
        net = PeftModel.from_pretrained(load_base(None, base_dir, "cpu", task), trained)
    else:
        net = methods.load(base_dir, trained, "cpu")
    if isinstance(net, PeftModel):
        net = net.merge_and_unload()
    net = net.float().eval()
    tokenizer = AutoTokenizer.from_pretrained(version_dir / "artifacts" / "tokenizer")
    if task.sequence_head and task.labels:
        net.config.id2label = dict(enumerate(task.labels))
        net.config.label2id = {label: i for i, label in enumerate(task.labels)}
    return net, tokenizer, task


def save_folder(net: Any, tokenizer: Any, task: Any, output: Path, dtype: str) -> None:
    """A Hugging Face folder (safetensors), replaced only when complete."""
    import torch

    staging = output.with_name(output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    copy = net.to(torch.float16) if dtype == "f16" else net
    copy.save_pretrained(staging, safe_serialization=True)
    if dtype == "f16":
        net.float()
    tokenizer.save_pretrained(staging)
    shutil.rmtree(output, ignore_errors=True)
    staging.rename(output)


def reload_folder(folder: Path, task: Any) -> Any:
    from steps.train.methods.common import task_head

    auto, _ = task_head(task)
    return auto.from_pretrained(folder, trust_remote_code=False).float().eval()


def gguf_tensor_name(name: str, names: Any) -> str:
    mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise ConfigError(f"GGUF export: no llama.cpp name for tensor {name!r}")
    return mapped


def permute_qk(weight: Any, heads: int) -> Any:
    """llama.cpp's rotary layout for q and k rows (convert_hf_to_gguf.py ``LlamaModel.permute``)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def write_gguf(net: Any, tokenizer: Any, output: Path, dtype: str, name: str) -> None:
    """One GGUF file: llama metadata, the tokenizer (GPT-2 BPE), the chat template, the weights."""
    import gguf
    import numpy as np

    config = net.config
    arch = GGUF_ARCHITECTURES.get((config.architectures or [type(net).__name__])[0], None)
    if arch is None:
        raise ConfigError(f"GGUF export supports {', '.join(GGUF_ARCHITECTURES)} models, not "
                          f"{(config.architectures or [type(net).__name__])[0]}; use --format safetensors")
    tokens, types, merges = bpe_vocabulary(tokenizer)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    staging = output.with_name(output.name + ".partial")
    writer = gguf.GGUFWriter(str(staging), arch)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or 10000.0))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(len(tokens))
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                       ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if value is not None:
            getattr(writer, {"unk": "add_unk_token_id"}.get(key, f"add_{key}_token_id"))(int(value))
    writer.add_add_bos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    state = net.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}  # llama.cpp ties output to token_embd
    for key, tensor in state.items():
        data = tensor.detach().float().numpy()
        if key.endswith("self_attn.q_proj.weight"):
            data = permute_qk(data, heads)
        elif key.endswith("self_attn.k_proj.weight"):
            data = permute_qk(data, kv_heads)
        if dtype == "f16" and data.ndim > 1:
            data = data.astype(np.float16)
        writer.add_tensor(gguf_tensor_name(key, names), data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    staging.replace(output)


def bpe_vocabulary(tokenizer: Any) -> tuple[list[str], list[int], list[str]]:
    """Tokens by id, their GGUF types (normal, control for special tokens, user-defined for other added
    tokens) and the BPE merges, read from the fast tokenizer's ``tokenizer.json``."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE" or spec.get("pre_tokenizer", {}) is None:
        raise ConfigError(f"GGUF export supports GPT-2-style BPE tokenizers, not {spec['model']['type']}; "
                          "use --format safetensors")
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    for token, index in vocab.items():
        tokens[index] = token
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    types = [int(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED) if i in added
             else int(gguf.TokenType.NORMAL) for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return tokens, types, merges


def reload_gguf(path: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def compare(reference: Any, exported: Any, tokenizer: Any, task: Any) -> dict[str, Any]:
    """The export against the registered model on CHECK_PROMPTS: largest logit difference (last position),
    and the greedy answers (8 tokens) or predicted labels of both."""
    import torch

    diffs, mine, theirs = [], [], []
    for prompt in CHECK_PROMPTS:
        if task.kind == "seq2seq":  # the input as the encoder reads it; logits of the decoder's first step
            enc = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)
            start = reference.generation_config.decoder_start_token_id
            enc["decoder_input_ids"] = torch.tensor([[start if start is not None else tokenizer.pad_token_id]])
        elif not task.causal_lm:  # a sequence head or a masked-LM: the text with its special tokens
            enc = tokenizer(prompt, return_tensors="pt")
        else:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True) if tokenizer.chat_template else prompt
            enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            a, b = reference(**enc).logits[:, -1].float(), exported(**enc).logits[:, -1].float()
            diffs.append(float((a - b).abs().max()))
            if task.kind == "seq2seq":
                inputs = {k: v for k, v in enc.items() if k != "decoder_input_ids"}
                for net, out in ((reference, mine), (exported, theirs)):
                    ids = net.generate(**inputs, max_new_tokens=8, do_sample=False)
                    out.append(tokenizer.decode(ids[0], skip_special_tokens=True))
            elif not task.causal_lm:
                mine.append(int(a.argmax()))
                theirs.append(int(b.argmax()))
            else:
                for net, out in ((reference, mine), (exported, theirs)):
                    ids = net.generate(**enc, max_new_tokens=8, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
                    out.append(tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return {"max_logit_diff": max(diffs), "answers_agree": mine == theirs, "prompts": list(CHECK_PROMPTS),
            "registered_answers": mine, "exported_answers": theirs}
