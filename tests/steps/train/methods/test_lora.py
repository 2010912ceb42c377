"""LoRA: only adapter weights train; rsLoRA and DoRA switches reach peft; the adapter reloads."""

from __future__ import annotations

import math

import pytest
import torch

from steps.config import TrainConfig
from steps.train.methods import lora


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_lora_trains_only_adapters_and_reloads_them(base_dir, train, logits, tmp_path):
    cfg = TrainConfig(method="lora", merge_weights=True)
    model = lora.prepare(cfg, base_dir, "cpu")
    names = trainable(model)
    # lora_A and lora_B on 4 attention projections in each of the 2 layers
    assert len(names) == 2 * 4 * 2 and all(".lora_A." in n or ".lora_B." in n for n in names)

    losses = train(model)
    assert losses[-1] < losses[0]
    trained = logits(model)

    lora.save(cfg, model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "merged" / "model.safetensors").is_file()
    assert {p.suffix for p in tmp_path.rglob("*") if p.is_file()} == {".safetensors", ".json"}
    torch.testing.assert_close(logits(lora.load(cfg, base_dir, tmp_path, "cpu")), trained, rtol=1e-5, atol=1e-5)
    from steps.train.methods.common import load_base

    torch.testing.assert_close(logits(load_base(None, tmp_path / "merged", "cpu")), trained, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("use_rslora, use_dora", [(True, False), (False, True), (True, True)])
def test_lora_switches_reach_peft(base_dir, train, use_rslora, use_dora):
    cfg = TrainConfig(method="lora", lora={"r": 4, "alpha": 8, "use_rslora": use_rslora, "use_dora": use_dora})
    model = lora.prepare(cfg, base_dir, "cpu")
    peft_cfg = model.peft_config["default"]
    assert (peft_cfg.use_rslora, peft_cfg.use_dora) == (use_rslora, use_dora)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == pytest.approx(8 / math.sqrt(4) if use_rslora else 8 / 4)
    names = trainable(model)
    magnitudes = {n for n in names if "lora_magnitude_vector" in n}
    assert len(magnitudes) == (2 * 4 if use_dora else 0)
    assert all("lora_" in n for n in names)
    if use_dora:
        losses = train(model, steps=4)
        assert losses[-1] < losses[0]


def test_an_adapter_folder_without_method_json_loads_as_lora(tmp_path, base_dir):
    """Train artifacts written before method.json existed are plain peft LoRA adapters."""
    from steps.config import TrainConfig
    from steps.train import methods

    cfg = TrainConfig(method="lora")
    model = methods.prepare(cfg, base_dir, "cpu")
    methods.save(cfg, model, tmp_path / "trained")
    (tmp_path / "trained" / methods.METHOD_FILE).unlink()
    loaded = methods.load(base_dir, tmp_path / "trained", "cpu")
    assert type(loaded).__name__ == "PeftModelForCausalLM" and not loaded.training
