"""Full fine-tuning: every weight trains, the whole model is saved and loads by itself."""

from __future__ import annotations

import torch

from steps.config import TrainConfig
from steps.train.methods import full


def test_full_trains_every_weight_and_reloads_the_same_model(base_dir, train, logits, tmp_path):
    cfg = TrainConfig(method="full")
    model = full.prepare(cfg, base_dir, "cpu")
    names = {n for n, _ in model.named_parameters()}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == names

    losses = train(model)
    assert losses[-1] < losses[0]

    full.save(cfg, model, tmp_path)
    assert {p.suffix for p in tmp_path.rglob("*") if p.is_file()} == {".safetensors", ".json"}
    loaded = full.load(cfg, base_dir, tmp_path, "cpu")
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)


def test_full_applies_the_dropout_override(base_dir):
    model = full.prepare(TrainConfig(method="full", dropout=0.2), base_dir, "cpu")
    assert model.config.attention_dropout == 0.2
