"""QLoRA: LoRA adapters over a 4-bit bitsandbytes base, on CPU (and CUDA when present)."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from steps.config import TrainConfig
from steps.errors import ConfigError
from steps.methods import qlora

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def base_linears(model) -> dict[str, torch.nn.Linear]:
    """Every linear layer of the base except the (unquantized, tied) output head."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "lora_" not in n and not n.endswith("lm_head")}


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
def test_qlora_base_is_4bit_as_configured_and_only_adapters_train(base_dir, quant_type, double_quant):
    cfg = TrainConfig(method="qlora", quant={"quant_type": quant_type, "double_quant": double_quant})
    model = qlora.prepare(cfg, base_dir, "cpu")
    linears = base_linears(model)
    assert len(linears) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    for name, layer in linears.items():
        assert isinstance(layer, bnb.nn.Linear4bit), name
        assert (layer.weight.quant_type, layer.weight.quant_state.nested) == (quant_type, double_quant)
        assert layer.compute_dtype == torch.float32  # "auto" on CPU
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(names) == 2 * 4 * 2 and all(".lora_A." in n or ".lora_B." in n for n in names)


@pytest.mark.parametrize("device", DEVICES)
def test_qlora_trains_and_reloads_the_adapter(base_dir, train, logits, tmp_path, device):
    cfg = TrainConfig(method="qlora", gradient_checkpointing=True)
    model = qlora.prepare(cfg, base_dir, device)

    losses = train(model)
    assert losses[-1] < losses[0]

    qlora.save(cfg, model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    loaded = qlora.load(cfg, base_dir, tmp_path, device)
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in base_linears(loaded).values())
    tolerance = 1e-5 if device == "cpu" else 2e-2  # bfloat16 compute on CUDA
    torch.testing.assert_close(logits(loaded), logits(model), rtol=tolerance, atol=tolerance)


def test_qlora_rejects_float16_compute_on_cpu(base_dir):
    cfg = TrainConfig(method="qlora", quant={"compute_dtype": "float16"})  # device "auto" resolved to cpu
    with pytest.raises(ConfigError, match="float16 is not supported on CPU"):
        qlora.prepare(cfg, base_dir, "cpu")
