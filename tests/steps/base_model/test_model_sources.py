"""steps/core/model_source.py and steps/base_model/{folder,remote,templates}.py: what base_model.source
accepts, the checks a model folder passes before anything loads it, the content fingerprint, the Hub's
offline error and revision resolution, S3 prefixes and chat templates."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from steps.base_model.folder import file_digest, fingerprint, is_causal_lm, model_files, parameter_count
from steps.config import BaseModelConfig, PipelineParams, TokenizeConfig
from steps.core.errors import ConfigError
from steps.core.model_source import Source, parse_source

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))


@pytest.fixture
def corpus():
    import zoo

    return zoo.corpus()


@pytest.fixture
def qwen_dir(tmp_path, corpus):
    import zoo

    return zoo.build("qwen2", tmp_path / "zoo-qwen2", corpus)


@pytest.mark.parametrize("text, expected", [
    ("tiny-random-llama", Source("shipped", "tiny-random-llama")),
    ("/models/qwen", Source("local", "/models/qwen")),
    ("./m/SmolLM2.Q4.gguf", Source("gguf", "./m/SmolLM2.Q4.gguf")),
    ("s3://models/qwen2/0.5b", Source("s3", "models", "qwen2/0.5b/")),
    ("hf:Qwen/Qwen2.5-0.5B", Source("hf", "Qwen/Qwen2.5-0.5B", "main")),
    ("hf:Qwen/Qwen2.5-0.5B@v1.0", Source("hf", "Qwen/Qwen2.5-0.5B", "v1.0")),
    ("models:/tuneline-chat@champion", Source("registry", "tuneline-chat", "champion")),
    ("models:/tuneline-chat/7", Source("registry", "tuneline-chat", "7")),
])
def test_every_documented_source_form_parses(text, expected):
    assert parse_source(text) == expected
    assert BaseModelConfig(source=text).source == text


@pytest.mark.parametrize("text", ["hf:qwen", "models:/x", "models:/x@", "s3://bucket/", "ftp://host/model", ""])
def test_a_malformed_source_is_an_error_naming_the_field(text):
    with pytest.raises(ConfigError, match="base_model.source"):
        PipelineParams.parse({"base_model": {"source": text}})


def test_a_folder_is_checked_before_anything_loads_it(qwen_dir, tmp_path):
    files = model_files(qwen_dir, "x")
    assert "config.json" in files and "model.safetensors" in files and "tokenizer.json" in files
    broken = tmp_path / "broken"
    shutil.copytree(qwen_dir, broken)
    (broken / "model.safetensors").rename(broken / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="pytorch_model.bin is a pickle"):
        model_files(broken, "base_model.source 'broken'")
    with pytest.raises(ConfigError, match="no such folder"):
        model_files(tmp_path / "nowhere", "base_model.source")
    (broken / "pytorch_model.bin").rename(broken / "model.safetensors")
    (broken / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="no tokenizer files"):
        model_files(broken, "base_model.source")


def test_remote_code_is_refused_with_a_message(qwen_dir, tmp_path):
    custom = tmp_path / "custom"
    shutil.copytree(qwen_dir, custom)
    config = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps(config | {"auto_map": {"AutoModelForCausalLM": "m.Model"}}))
    with pytest.raises(ConfigError, match="trust_remote_code"):
        model_files(custom, "base_model.source")
    (custom / "config.json").write_text(json.dumps(config | {"model_type": "my-own-arch"}))
    with pytest.raises(ConfigError, match="'my-own-arch' needs code shipped with the model"):
        model_files(custom, "base_model.source")


def test_the_fingerprint_is_by_content_and_hashes_a_file_once(qwen_dir, tmp_path, monkeypatch):
    from steps.base_model import folder as folder_module

    files = model_files(qwen_dir, "x")
    cache = tmp_path / "digests"
    first, digests = fingerprint(qwen_dir, files, cache)
    copy = tmp_path / "elsewhere"
    shutil.copytree(qwen_dir, copy)
    assert fingerprint(copy, files, cache)[0] == first  # another path, same content: same fingerprint
    hashed = []
    monkeypatch.setattr(folder_module, "sha256_file", lambda p: hashed.append(p) or "x")
    assert file_digest(copy / "model.safetensors", cache) == digests["model.safetensors"]
    assert hashed == []  # cached by (path, size, mtime)
    with open(copy / "model.safetensors", "r+b") as fh:  # same size, new content, new mtime
        fh.seek(200)
        fh.write(b"\x01\x02")
    assert file_digest(copy / "model.safetensors", cache) == "x" and len(hashed) == 1


def test_parameters_and_head_are_read_without_loading(qwen_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(qwen_dir)
    assert parameter_count(qwen_dir) == sum(p.numel() for p in model.parameters())
    assert is_causal_lm({"architectures": ["Qwen2ForCausalLM"]})
    assert not is_causal_lm({"architectures": ["BertModel"], "model_type": "bert"})
    assert not is_causal_lm({"model_type": "bert"}) and is_causal_lm({"model_type": "qwen2"})


def test_hf_offline_is_a_clear_error_that_says_what_to_do(monkeypatch, tmp_path):
    from steps.base_model.remote import fetch_hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"offline.*--local-dir DIR.*base_model.source=DIR"):
        fetch_hf(parse_source("hf:Qwen/Qwen2.5-0.5B@main"), tmp_path)


def test_hf_unreachable_hub_is_the_same_clear_error(monkeypatch, tmp_path):
    """Fault injection: the machine has no network, but HF_HUB_OFFLINE is not set."""
    import huggingface_hub

    from steps.base_model.remote import fetch_hf

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    with pytest.raises(ConfigError, match="the Hub cannot be reached"):
        fetch_hf(parse_source("hf:Qwen/Qwen2.5-0.5B"), tmp_path)


@pytest.mark.services
def test_hf_revision_is_resolved_to_a_commit_and_recorded(monkeypatch, store, qwen_dir):
    """The download itself (one huggingface_hub call) is replaced by the local folder; the token comes
    from HF_TOKEN only and is never stored."""
    import huggingface_hub

    from steps.base_model import prepare_base_model

    sha = "0123456789abcdef0123456789abcdef01234567"
    seen = {}
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")

    class Info:
        def __init__(self, revision):
            self.sha = sha if revision == "v1" else None

    def model_info(self, repo, revision=None, token=None):
        seen["info"] = (repo, revision, token)
        return Info(revision)

    def snapshot_download(repo, revision=None, token=None, allow_patterns=None, cache_dir=None):
        seen["download"] = (repo, revision, token)
        return str(qwen_dir)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    ref = prepare_base_model(BaseModelConfig(source="hf:acme/tiny-qwen@v1"), store)
    assert seen["download"] == ("acme/tiny-qwen", sha, "hf_secret_token_value")
    assert ref.base.stats["revision"] == sha and ref.base.stats["chain"] == [f"hf:acme/tiny-qwen@{sha}"]
    manifest = json.dumps(store.manifest(ref.base.key))
    assert "hf_secret_token_value" not in manifest


@pytest.mark.services
def test_local_and_s3_sources_give_the_same_artifact(store, qwen_dir):
    from steps.base_model import prepare_base_model

    local = prepare_base_model(BaseModelConfig(source=str(qwen_dir)), store)
    stats = local.base.stats
    assert stats["kind"] == "local" and stats["architecture"] == "Qwen2ForCausalLM" and stats["causal"]
    assert stats["chat_template"] == "tokenizer" and stats["parameters"] == parameter_count(qwen_dir)
    for path in sorted(qwen_dir.iterdir()):
        store.put_bytes(f"{store.prefix}/upload/qwen2/{path.name}", path.read_bytes())
    remote = prepare_base_model(BaseModelConfig(source=f"s3://{store.bucket}/{store.prefix}/upload/qwen2/"), store)
    assert remote.base.digest == local.base.digest  # keyed by content, not by where it came from
    with pytest.raises(ConfigError, match="no model files under that prefix"):
        prepare_base_model(BaseModelConfig(source=f"s3://{store.bucket}/{store.prefix}/nothing/"), store)


@pytest.mark.services
def test_a_base_without_a_chat_template_gets_one_or_a_clear_error(store, qwen_dir, tmp_path):
    from transformers import AutoTokenizer

    from helpers import sft_dataset
    from steps.base_model import prepare_base_model

    bare = tmp_path / "bare"
    shutil.copytree(qwen_dir, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    plain = prepare_base_model(BaseModelConfig(source=str(bare)), store)
    assert plain.base.stats["chat_template"] is None
    with pytest.raises(ConfigError, match="no chat template.*tokenize.chat_template"):
        sft_dataset(store, tmp_path, plain)
    templated = prepare_base_model(BaseModelConfig(source=str(bare)), store, chat_template="chatml")
    assert templated.base.stats["chat_template"] == "chatml" and templated.base.digest != plain.base.digest
    folder = store.download(templated.base)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    data = sft_dataset(store, tmp_path, templated)  # labels on the answers only: the template masks prompts
    row = store.read_jsonl(data, "train.jsonl")[0]
    assert -100 in row["labels"] and any(label != -100 for label in row["labels"])
    with pytest.raises(ConfigError, match="neither a built-in template"):
        prepare_base_model(BaseModelConfig(source=str(bare)), store, chat_template=str(tmp_path / "none.jinja"))
    assert TokenizeConfig(chat_template="llama3").chat_template == "llama3"


@pytest.mark.services
def test_an_encoder_is_refused_for_chat_records(store, tmp_path, corpus):
    import zoo
    from helpers import sft_dataset
    from steps.base_model import prepare_base_model

    encoder = prepare_base_model(BaseModelConfig(source=str(zoo.build("bert", tmp_path / "bert", corpus))), store)
    assert encoder.base.stats["causal"] is False
    with pytest.raises(ConfigError, match="is an encoder \\(BertModel\\) without a language-model head"):
        sft_dataset(store, tmp_path, encoder)


@pytest.mark.services
def test_an_unknown_registry_model_is_a_clear_error(store):
    from steps.base_model import prepare_base_model

    with pytest.raises(ConfigError, match=r"models:/no-such-model@champion'.*not in the model registry"):
        prepare_base_model(BaseModelConfig(source="models:/no-such-model@champion"), store)
    with pytest.raises(ConfigError, match=r"base_model.source '/nowhere/model': no such folder"):
        prepare_base_model(BaseModelConfig(source="/nowhere/model"), store)
