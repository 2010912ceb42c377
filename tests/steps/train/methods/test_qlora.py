"""QLoRA: LoRA adapters over a 4-bit bitsandbytes base, on CPU (and CUDA when present)."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch

from steps.config import TrainConfig
from steps.core.contract import Task
from steps.core.errors import ConfigError
from steps.train.methods import qlora

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


@pytest.fixture(scope="session")
def encoder_dir(tiny_encoder) -> Path:
    from steps.core.store import ArtifactStore

    return ArtifactStore.from_env("shared").download(tiny_encoder.base)


def test_qlora_runs_the_same_path_on_a_cpu_with_avx512_bf16(encoder_dir, monkeypatch):
    """bitsandbytes asks the CPU once per layer (``has_avx512bf16`` when a Linear4bit is built); where
    the answer is yes, an eval forward under no_grad repacks the weight for a bf16 kernel, which fails
    on layers narrower than the 64-value quantization block (the tiny BERT is 32 wide) and would leave
    packed weights behind for training. Emulated here on any CPU by answering yes."""
    task = Task(kind="classification", labels=["a", "b", "c"])
    cfg = TrainConfig(method="qlora")
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102], [101, 7592, 2088, 102, 0, 0]])
    mask = (ids != 0).long()

    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    # The root cause, as bitsandbytes 0.50 has it: a layer that believes the CPU has AVX512-BF16.
    bare = bnb.nn.Linear4bit(32, 32, compute_dtype=torch.float32).to("cpu").eval()
    assert bare.support_avx512bf16_for_cpu
    with pytest.raises(RuntimeError, match=r"shape '\[32, 0\]' is invalid"), torch.no_grad():
        bare(torch.randn(2, 32))

    torch.manual_seed(0)
    emulated = qlora.prepare(cfg, encoder_dir, "cpu", task)
    monkeypatch.undo()
    torch.manual_seed(0)
    plain = qlora.prepare(cfg, encoder_dir, "cpu", task)

    layers = [m for m in emulated.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    emulated.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(emulated(input_ids=ids, attention_mask=mask).logits,
                                   plain(input_ids=ids, attention_mask=mask).logits)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    # Training after an evaluation (early stopping) gets the same gradients as on any other CPU.
    for model in (emulated, plain):
        model.train()
        torch.manual_seed(1)  # the same dropout masks
        model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2])).loss.backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert any(n for n in grads if "layer.0." in n and "lora_B" in n)
    for name, p in emulated.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], msg=name)
