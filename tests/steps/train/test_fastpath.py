"""The CUDA branches of the training step, run on the CPU against the plain fp32 path (steps/train/fastpath.py,
steps/train/master.py, train.precision / fused_adamw / attention / compile / gradient_checkpointing / kernels).

Tolerances: bf16 weights within 2% of the fp32 loss and gradients at cosine >= 0.99 (8-bit mantissa); fused
AdamW, gradient checkpointing and compiled blocks equal the plain path to float32 rounding (1e-5);
flex_attention's forward equals sdpa's to 1e-5. The last test runs only where CUDA is (flex_attention's
backward, compile and liger there)."""

import importlib.util
import math

import pytest
import torch

from helpers import token_documents as documents
from steps.config import TrainConfig
from steps.core.contract import CAUSAL
from steps.core.errors import ConfigError
from steps.train import fastpath, methods
from steps.train.batching import pack
from steps.train.checkpoints import Checkpoints
from steps.train.losses import batch_loss
from steps.train.master import MasterAdamW
from steps.train.step import enable_gradient_checkpointing, make_optimizer

PACKED = dict(packing=True, tokens_per_batch=4096, learning_rate=1e-3, warmup_steps=0)


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    """A tiny Llama from its config (2 layers, hidden 64 in 4 heads of 16: the narrowest flex_attention's CUDA kernels
    take; vocabulary 1024), saved once per session."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
                     ).save_pretrained(path)
    return path


def model(folder, device="cpu", **settings):
    cfg = TrainConfig(method="full", **(PACKED | settings))
    return cfg, methods.prepare(cfg, folder, device, CAUSAL).train()


def loss_and_grads(cfg, net, rows=None, device="cpu"):
    loss, _, _ = batch_loss(net, rows or documents(), CAUSAL, cfg, 0, device, 4096)
    loss.backward()
    grads = torch.cat([p.grad.float().flatten() for p in net.parameters()])
    net.zero_grad(set_to_none=True)
    return loss.detach().float(), grads


def test_bf16_weights_train_like_fp32(folder):
    cfg, plain = model(folder)
    cfg16, bf16 = model(folder, precision="bf16")
    assert next(bf16.parameters()).dtype == torch.bfloat16 and next(plain.parameters()).dtype == torch.float32
    loss, grads = loss_and_grads(cfg, plain)
    loss16, grads16 = loss_and_grads(cfg16, bf16)
    torch.testing.assert_close(loss16, loss, rtol=2e-2, atol=0)
    assert torch.nn.functional.cosine_similarity(grads16, grads, dim=0) >= 0.99
    assert 0.95 <= grads16.norm() / grads.norm() <= 1.05


def test_fused_adamw_on_the_cpu_matches_the_plain_one(folder):
    runs = []
    for fused in (True, False):
        cfg, net = model(folder, fused_adamw=fused)
        optimizer = make_optimizer(cfg, list(net.parameters()), "cpu")
        assert optimizer.defaults["fused"] is fused
        for _ in range(3):
            loss, _, _ = batch_loss(net, documents(), CAUSAL, cfg, 0, "cpu", 4096)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        runs.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    moved = runs[1] - torch.cat([p.flatten() for p in model(folder)[1].parameters()]).detach()
    assert moved.abs().max() > 1e-3  # three steps of lr 1e-3 moved the weights
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_with_packing_gives_the_same_loss_and_gradients(folder):
    cfg, plain = model(folder)
    _, checkpointed = model(folder, gradient_checkpointing=True)
    enable_gradient_checkpointing(checkpointed)
    assert checkpointed.is_gradient_checkpointing
    (a, ga), (b, gb) = loss_and_grads(cfg, plain), loss_and_grads(cfg, checkpointed)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-6)


def test_flex_attention_block_mask_matches_sdpa_and_isolates_documents(folder):
    """The CUDA default for packed rows (block mask), forward only: torch has no flex backward on the CPU."""
    cfg, sdpa = model(folder, attention="sdpa")
    _, flex = model(folder, attention="flex_attention")
    assert flex.config._attn_implementation == "flex_attention"
    rows = documents()
    changed = [dict(r) for r in rows]
    changed[2] = {**rows[2], "input_ids": [t + 1 for t in rows[2]["input_ids"]]}
    with torch.no_grad():
        torch.testing.assert_close(batch_loss(flex, rows, CAUSAL, cfg, 0, "cpu", 4096)[0],
                                   batch_loss(sdpa, rows, CAUSAL, cfg, 0, "cpu", 4096)[0], rtol=1e-5, atol=1e-5)
        a, b = (pack(x, 4096) for x in (rows, changed))
        la, lb = (flex(input_ids=x["input_ids"], position_ids=x["position_ids"], use_cache=False).logits
                  for x in (a, b))
    start = sum(len(r["input_ids"]) for r in rows[:2])
    end = start + len(rows[2]["input_ids"])
    torch.testing.assert_close(la[:, :start], lb[:, :start])
    torch.testing.assert_close(la[:, end:], lb[:, end:])  # later documents see nothing of document 2
    assert not torch.allclose(la[:, start:end], lb[:, start:end])
    with pytest.raises(ConfigError, match="flex_attention' has no backward pass on the CPU"):
        fastpath.check_switches(cfg.model_copy(update={"attention": "flex_attention"}), "cpu")
    fastpath.check_switches(cfg.model_copy(update={"attention": "flex_attention"}), "cuda")
    fastpath.check_switches(cfg, "cpu")  # auto: sdpa on the CPU


def test_compiled_blocks_give_the_same_loss_and_gradients(folder):
    cfg, plain = model(folder)
    cfg_c, compiled = model(folder, compile=True)
    fastpath.speed_up(cfg_c, compiled)
    assert all(block._compiled_call_impl is not None for block in compiled.model.layers)
    expected = loss_and_grads(cfg, plain)
    for _ in range(2):  # the second pass reuses the compiled graph
        got = loss_and_grads(cfg_c, compiled)
        torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=1e-5)


def test_master_weights_keep_tiny_updates_that_pure_bf16_loses():
    """200 AdamW steps of 1e-4 each on weights at 1.0 (bf16 spacing there: 2**-8 below, 2**-7 above)."""
    start = torch.ones(64)
    grad = torch.full((64,), 0.5)
    weights = {"fp32": start.clone(), "bf16": start.bfloat16(), "master": start.bfloat16()}
    params = {k: torch.nn.Parameter(v) for k, v in weights.items()}
    optimizers = {"fp32": torch.optim.AdamW([params["fp32"]], lr=1e-4, weight_decay=0.0),
                  "bf16": torch.optim.AdamW([params["bf16"]], lr=1e-4, weight_decay=0.0),
                  "master": MasterAdamW([params["master"]], lr=1e-4, weight_decay=0.0)}
    for _ in range(200):
        for name, p in params.items():
            p.grad = grad.to(p.dtype)
            optimizers[name].step()
    fp32 = params["fp32"].detach()
    assert torch.all(fp32 < 0.985)  # fp32 moved by ~0.02
    assert torch.equal(params["bf16"].detach(), weights["bf16"])  # pure bf16: every update rounded away
    master = optimizers["master"].state[params["master"]]["master"]
    torch.testing.assert_close(master, fp32, rtol=1e-6, atol=1e-6)  # the fp32 copy moves as fp32 does
    assert (params["master"].detach().float() - fp32).abs().max() <= 2**-9  # the model's weights: it rounded


def test_master_weights_are_the_default_for_bf16_full_fine_tuning(folder):
    cfg, net = model(folder, precision="bf16")
    assert isinstance(make_optimizer(cfg, list(net.parameters()), "cpu"), MasterAdamW)
    off = cfg.model_copy(update={"master_weights": False})
    assert type(make_optimizer(off, list(net.parameters()), "cpu")) is torch.optim.AdamW
    cfg32, net32 = model(folder)  # fp32 weights need no master copy
    assert type(make_optimizer(cfg32, list(net32.parameters()), "cpu")) is torch.optim.AdamW


def test_master_weights_resume_exactly_from_a_checkpoint(folder, store):
    cfg = TrainConfig(method="full", precision="bf16", fused_adamw=True, **PACKED)  # as on CUDA: fused

    def fresh():
        net = methods.prepare(cfg, folder, "cpu", CAUSAL).train()
        named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
        optimizer = make_optimizer(cfg, [p for _, p in named], "cpu")
        return net, named, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    def train(net, optimizer, steps, seed):
        for s in range(steps):
            loss, _, _ = batch_loss(net, documents(seed=seed + s), CAUSAL, cfg, 0, "cpu", 4096)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def masters(optimizer, named):
        return torch.cat([optimizer.state[p]["master"].flatten() for _, p in named])

    net, named, optimizer, scheduler = fresh()
    assert isinstance(optimizer, MasterAdamW) and optimizer.fused
    train(net, optimizer, 3, seed=0)
    checkpoints = Checkpoints(store, "fastpath-resume", cfg)
    checkpoints.save(3, named, optimizer, scheduler, {"step": 3})
    saved = masters(optimizer, named)
    train(net, optimizer, 3, seed=3)

    net2, named2, optimizer2, scheduler2 = fresh()
    assert checkpoints.restore(checkpoints.latest(), named2, optimizer2, scheduler2)["step"] == 3
    assert {optimizer2.state[p]["master"].dtype for _, p in named2} == {torch.float32}
    assert torch.equal(masters(optimizer2, named2), saved)  # not rounded to the weights' bf16
    train(net2, optimizer2, 3, seed=3)
    assert torch.equal(masters(optimizer2, named2), masters(optimizer, named))
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(named, named2))


def test_liger_kernels_are_refused_without_the_package_or_on_the_cpu(monkeypatch):
    cfg = TrainConfig(kernels="liger")
    if importlib.util.find_spec("liger_kernel") is None:
        with pytest.raises(ConfigError, match=r"needs the liger-kernel package.*pip install liger-kernel"):
            fastpath.check_switches(cfg, "cuda")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "liger_kernel" else None)
    with pytest.raises(ConfigError, match="Triton kernels on CUDA only, not on 'cpu'"):
        fastpath.check_switches(cfg, "cpu")
    fastpath.check_switches(cfg, "cuda")


def test_the_train_step_runs_bf16_full_fine_tuning_with_master_weights_on_the_cpu(store, tmp_path, tiny_model):
    from safetensors.torch import load_file

    from helpers import sft_dataset
    from steps.train.step import train_model

    data = sft_dataset(store, tmp_path, tiny_model, n=20)
    cfg = TrainConfig(method="full", precision="bf16", fused_adamw=True, packing=True, loss_chunk_tokens=64,
                      max_steps=3, checkpoint_every=2, record_losses=False, warmup_steps=0, learning_rate=1e-3)
    tuned = train_model(cfg, data, tiny_model, store)
    weights = load_file(store.download(tuned.adapter) / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    log = store.read_json(tuned.adapter, "train_log.json")
    assert [h["step"] for h in log] == [1, 2, 3] and all(math.isfinite(h["loss"]) for h in log)
    plan = store.read_json(tuned.adapter, "train_report.json")["memory_plan"]["estimate"]
    assert plan["optimizer_gib"] == pytest.approx(6 * plan["weights_gib"], rel=1e-3)  # 12 bytes per 2-byte weight


def test_auto_attention_takes_flex_only_for_packed_rows_on_cuda_with_heads_of_16_or_more():
    """flex_attention's CUDA kernels refuse heads narrower than 16 (seen on an H200 with 8): 'auto' falls back to the
    architecture's sdpa there, and asking for flex_attention by name is a clear error."""
    from transformers import LlamaConfig

    from steps.train.methods.common import attention_for

    wide, narrow = (LlamaConfig(hidden_size=64, num_attention_heads=n) for n in (4, 8))
    packed = TrainConfig(method="full", packing=True)
    assert attention_for(packed, "cuda", wide) == "flex_attention"
    assert attention_for(packed, "cuda", narrow) is None
    assert attention_for(packed, "cpu", wide) is None
    assert attention_for(TrainConfig(method="full"), "cuda", wide) is None
    with pytest.raises(ConfigError, match="at least 16 values; this model's are 8"):
        attention_for(TrainConfig(method="full", packing=True, attention="flex_attention"), "cuda", narrow)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: the GPU session of issue 23 runs it")
@pytest.mark.parametrize("settings", [{}, {"compile": True}, {"kernels": "liger"}], ids=["flex", "compile", "liger"])
def test_on_cuda_the_default_fast_path_trains_like_sdpa(folder, settings):
    """CUDA's defaults for packed rows (bf16 weights, flex_attention's block mask, fused AdamW, fp32 master weights)
    plus compile or liger, against sdpa in bf16: the loss within 2%, gradients at cosine >= 0.99, and a step that
    moves the weights."""
    if settings.get("kernels") == "liger" and importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger-kernel is not installed")
    cfg, sdpa = model(folder, "cuda", attention="sdpa")
    cfg_fast, fast = model(folder, "cuda", **settings)
    fastpath.check_switches(cfg_fast, "cuda")
    fastpath.speed_up(cfg_fast, fast)
    assert fast.config._attn_implementation == "flex_attention" and next(fast.parameters()).dtype == torch.bfloat16
    loss, grads = loss_and_grads(cfg, sdpa, device="cuda")
    loss_fast, _ = loss_and_grads(cfg_fast, fast, device="cuda")  # the first pass compiles
    loss_fast, grads_fast = loss_and_grads(cfg_fast, fast, device="cuda")
    torch.testing.assert_close(loss_fast, loss, rtol=2e-2, atol=0)
    assert torch.nn.functional.cosine_similarity(grads_fast, grads, dim=0) >= 0.99
    optimizer = make_optimizer(cfg_fast, list(fast.parameters()), "cuda")
    assert isinstance(optimizer, MasterAdamW) and optimizer.fused
    before = [p.detach().clone() for p in fast.parameters()]
    batch_loss(fast, documents(), CAUSAL, cfg_fast, 0, "cuda", 4096)[0].backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, fast.parameters()))
