"""Head tuning: only lm_head (and the last N layers) train; tied input embeddings never move."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from steps.config import TrainConfig
from steps.core.errors import ArtifactError, ConfigError
from steps.train.methods import head


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("layers", [0, 1])
def test_head_trains_only_the_head_and_last_layers(base_dir, train, logits, tmp_path, layers):
    cfg = TrainConfig(method="head", head={"trainable_layers": layers})
    model = head.prepare(cfg, base_dir, "cpu")
    last_layer = {n for n, _ in model.named_parameters() if n.startswith("model.layers.1.")}  # 2-layer model
    expected = {"lm_head.weight"} | (last_layer if layers else set())
    assert trainable(model) == expected
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    head_before = model.lm_head.weight.detach().clone()

    losses = train(model)

    assert losses[-1] < losses[0]
    assert not torch.equal(model.lm_head.weight, head_before)
    changed = [n for n, p in model.named_parameters() if n in frozen and not torch.equal(p, frozen[n])]
    assert changed == []
    original_embeddings = load_file(str(base_dir / "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(model.model.embed_tokens.weight, original_embeddings)

    head.save(cfg, model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.json", "head.safetensors"]
    assert set(load_file(str(tmp_path / "head.safetensors"))) == expected
    loaded = head.load(cfg, base_dir, tmp_path, "cpu")
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)
    assert torch.equal(loaded.model.embed_tokens.weight, original_embeddings)


def test_head_load_rejects_tensors_the_base_lacks(base_dir, tmp_path):
    cfg = TrainConfig(method="head")
    head.save(cfg, head.prepare(cfg, base_dir, "cpu"), tmp_path)
    tensors = load_file(str(tmp_path / "head.safetensors"))
    save_file({**tensors, "model.layers.7.mlp.up_proj.weight": torch.zeros(2, 2)}, str(tmp_path / "head.safetensors"))
    with pytest.raises(ArtifactError, match="model.layers.7.mlp.up_proj.weight"):
        head.load(cfg, base_dir, tmp_path, "cpu")


def test_head_rejects_more_layers_than_the_base_has(base_dir):
    with pytest.raises(ConfigError, match="only 2 layers"):
        head.prepare(TrainConfig(method="head", head={"trainable_layers": 3}), base_dir, "cpu")
