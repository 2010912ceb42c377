import math

import pytest
import torch
from safetensors.torch import load_file

from steps.config import EvaluateConfig, LoraSettings, TrainConfig
from steps.evaluate import evaluate_model
from steps.train import train_model
from helpers import all_keys, sft_dataset

TRAIN = TrainConfig(max_steps=4, batch_size=4, learning_rate=5e-3, warmup_steps=1, lora=LoraSettings(r=4, alpha=8))


@pytest.fixture
def dataset(store, tmp_path, tiny_model):
    return sft_dataset(store, tmp_path, tiny_model)


def test_lora_changes_adapter_weights_and_leaves_the_base_untouched(store, dataset, tiny_model):
    tuned = train_model(TRAIN, dataset, tiny_model, store)
    assert tuned.base == tiny_model.base and tuned.adapter is not None
    folder = store.download(tuned.adapter)
    assert (folder / "adapter_model.safetensors").exists() and (folder / "adapter_config.json").exists()
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))
    adapter = load_file(folder / "adapter_model.safetensors")
    # peft initialises lora_B to zero: any non-zero B proves the adapter trained.
    b_weights = [w for name, w in adapter.items() if "lora_B" in name]
    assert b_weights and all(w.abs().sum() > 0 for w in b_weights)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in adapter} == {"q_proj", "k_proj", "v_proj", "o_proj"}

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = store.download(tiny_model.base)
    before = load_file(base_dir / "model.safetensors")
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), folder)
    base_after = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                  for k, v in merged.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(before[k], base_after[k]) for k in before)
    history = store.read_json(tuned.adapter, "train_log.json")
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert tuned.adapter.stats["trainable_params"] < 0.2 * sum(v.numel() for v in before.values())


def test_training_twice_reuses_the_committed_adapter(store, dataset, tiny_model):
    first = train_model(TRAIN, dataset, tiny_model, store)
    keys = all_keys(store)
    assert train_model(TRAIN, dataset, tiny_model, store) == first
    assert all_keys(store) == keys


def test_evaluate_reports_perplexity_and_bleu_for_base_and_tuned(store, dataset, tiny_model):
    cfg = EvaluateConfig(max_records=16, bleu_samples=3, max_new_tokens=6, batch_size=4)
    base = evaluate_model(cfg, tiny_model, dataset, store)
    tuned = evaluate_model(cfg, train_model(TRAIN, dataset, tiny_model, store), dataset, store)
    assert base.key != tuned.key
    for report in (base, tuned):
        assert math.isfinite(report.stats["perplexity"]) and report.stats["perplexity"] > 1
        assert report.stats["bleu_samples"] == 3 and 0 <= report.stats["bleu"] <= 100
        smoke = report.stats["smoke"]
        assert smoke["kind"] == "generation" and len(smoke["prompts"]) == 3 and smoke["seconds_per_input"] > 0
        assert report.stats["smoke_passed"] == smoke["passed"] == all(p["passed"] for p in smoke["prompts"])
        assert report.stats["reference_perplexity"] > 1
        assert len(store.read_jsonl(report, "samples.jsonl")) == 3
    # A random tiny model is near-uniform over 49k tokens; a few LoRA steps on repetitive data beat it.
    assert tuned.stats["perplexity"] < base.stats["perplexity"]
    assert base.stats["model"] == "base" and tuned.stats["model"] == "fine-tuned"


def test_degenerate_answers_are_detected():
    from steps.evaluate import degenerate

    assert degenerate([5, 6, 7, 8] * 6)
    assert not degenerate(list(range(40)))
    assert not degenerate([1, 2, 3])  # too short to judge


def test_the_gguf_tokenizer_is_converted_once_and_reused_byte_for_byte(store, tiny_model, tmp_path, monkeypatch):
    """A base model built in a new prefix takes the tokenizer from the local cache (no second
    GGUF conversion) and stores the same tokenizer files a fresh conversion writes."""
    from transformers import AutoTokenizer

    from steps.base_model import gguf_path, prepare_base_model
    from steps.config import BaseModelConfig

    assert any((store.cache_dir / "gguf-tokenizers").iterdir())  # tiny_model's build filled it
    conversions, real = [], AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        conversions.append(kwargs.get("gguf_file"))
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy)
    built = store.download(prepare_base_model(BaseModelConfig(source="tiny-random-llama"), store).base)
    assert conversions == [None]
    gguf = gguf_path()
    real(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp_path)  # a fresh conversion
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names and all((built / n).read_bytes() == (tmp_path / n).read_bytes() for n in names)
