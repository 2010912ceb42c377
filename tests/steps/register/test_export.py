"""steps/register/export.py: merged safetensors and GGUF exports load back and answer as the trained model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from helpers import kind_dataset, labelled_rows, sft_dataset
from steps.config import LoraSettings, TrainConfig
from steps.core.errors import ConfigError
from steps.register.export import compare, merged_model, reload_folder, reload_gguf, save_folder, write_gguf
from steps.train.step import train_model

TRAIN = TrainConfig(max_steps=3, batch_size=4, warmup_steps=0, checkpoint_every=0, learning_rate=5e-3,
                    lora=LoraSettings(r=4, alpha=8))


def version_folder(store, tuned, base, tmp_path: Path) -> tuple[Path, Path]:
    """A version as MLflow downloads it: artifacts/trained and artifacts/tokenizer; and its base."""
    version = tmp_path / "version"
    shutil.copytree(store.download(tuned.adapter), version / "artifacts" / "trained")
    base_dir = store.download(base.base)
    shutil.copytree(base_dir, version / "artifacts" / "tokenizer")
    return version, base_dir


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_chat_model_exports_to_safetensors_and_gguf_that_answer_as_it_does(store, tmp_path, tiny_model, method):
    import torch

    from steps.train import methods

    data = sft_dataset(store, tmp_path, tiny_model, n=16)
    cfg = TRAIN if method == "lora" else TRAIN.model_copy(update={"method": method, "lora": LoraSettings()})
    tuned = train_model(cfg, data, tiny_model, store)
    version, base_dir = version_folder(store, tuned, tiny_model, tmp_path)
    net, tokenizer, task = merged_model(version, base_dir)
    trained = methods.load(base_dir, version / "artifacts" / "trained", "cpu")
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():  # merging changed nothing the model computes
        assert torch.allclose(net(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-4)

    save_folder(net, tokenizer, task, tmp_path / "hf", "f32")
    assert (tmp_path / "hf" / "model.safetensors").exists() and not (tmp_path / "hf" / "adapter_config.json").exists()
    report = compare(net, reload_folder(tmp_path / "hf", task), tokenizer, task)
    assert report["max_logit_diff"] < 1e-4 and report["answers_agree"], report

    write_gguf(net, tokenizer, tmp_path / "m.gguf", "f32", name="test")
    report = compare(net, reload_gguf(tmp_path / "m.gguf"), tokenizer, task)
    assert report["max_logit_diff"] < 1e-3 and report["answers_agree"], report
    import gguf

    fields = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    assert fields["general.architecture"].contents() == "llama" and "tokenizer.chat_template" in fields


def test_a_classifier_exports_with_its_label_names_and_gguf_or_reft_are_refused(store, tmp_path, tiny_encoder,
                                                                                  tiny_model):
    data = kind_dataset(store, tmp_path, tiny_encoder, "classification", labelled_rows("classification", n=24))
    tuned = train_model(TRAIN.model_copy(update={"method": "lora"}), data, tiny_encoder, store)
    version, base_dir = version_folder(store, tuned, tiny_encoder, tmp_path)
    net, tokenizer, task = merged_model(version, base_dir)
    save_folder(net, tokenizer, task, tmp_path / "hf", "f32")
    again = reload_folder(tmp_path / "hf", task)
    assert again.config.id2label == {0: "money", 1: "sport", 2: "tech"}
    assert compare(net, again, tokenizer, task)["answers_agree"]
    with pytest.raises(ConfigError, match="GGUF export supports"):
        write_gguf(net, tokenizer, tmp_path / "c.gguf", "f32", name="c")

    (tmp_path / "r").mkdir()
    chats = sft_dataset(store, tmp_path / "r", tiny_model, n=8)
    reft = train_model(TRAIN.model_copy(update={"method": "reft", "lora": LoraSettings()}), chats, tiny_model, store)
    version, base_dir = version_folder(store, reft, tiny_model, tmp_path / "r2")
    with pytest.raises(ConfigError, match="no plain-weight form"):
        merged_model(version, base_dir)
