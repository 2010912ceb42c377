"""The training fast path on CPU: packing with per-document attention, token budgets, chunked loss."""

import pytest
import torch

from steps import fastpath
from steps.batching import IGNORE, collate
from steps.config import LoraSettings, TrainConfig
from steps.methods import lora
from steps.methods.common import load_base


@pytest.fixture(scope="module")
def base_dir(services, tiny_model):
    from steps.store import ArtifactStore

    return ArtifactStore.from_env("shared").download(tiny_model.base)


def documents(n: int = 5, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 6 + 3 * i
        ids = torch.randint(5, 1000, (length,), generator=g).tolist()
        labels = [IGNORE] * 3 + ids[3:]  # a masked prompt, as in SFT rows
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def per_document_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of each row (labels -100 skipped)."""
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE,
                                            reduction="none")
    return nll.sum(-1)


def test_packed_and_unpacked_documents_have_the_same_loss(base_dir):
    net = load_base(None, base_dir, "cpu").eval()
    rows = documents()
    with torch.no_grad():
        alone = torch.stack([per_document_loss(net(**{k: v for k, v in collate([r], 0).items() if k != "labels"}).logits,
                                               torch.tensor([r["labels"]]))[0] for r in rows])
        packed = fastpath.pack(rows, budget=10_000)
        logits = net(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
    labels = packed["labels"]
    starts = [0]
    for r in rows:
        starts.append(starts[-1] + len(r["input_ids"]))
    together = torch.stack([per_document_loss(logits[:, a:b], labels[:, a:b])[0] for a, b in zip(starts, starts[1:])])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)
    # and the mean loss of the packed row is the mean over the same label tokens
    with torch.no_grad():
        mean = net(**packed, use_cache=False).loss
    count = sum(sum(t != IGNORE for t in r["labels"][1:]) for r in rows)
    torch.testing.assert_close(mean, alone.sum() / count, rtol=1e-4, atol=1e-4)


def test_no_document_attends_to_another(base_dir):
    net = load_base(None, base_dir, "cpu").eval()
    rows = documents()
    changed = [dict(r) for r in rows]
    changed[2] = {**rows[2], "input_ids": [t + 1 for t in rows[2]["input_ids"]]}
    with torch.no_grad():
        a, b = (fastpath.pack(x, 10_000) for x in (rows, changed))
        la = net(input_ids=a["input_ids"], position_ids=a["position_ids"], use_cache=False).logits
        lb = net(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
    start = sum(len(r["input_ids"]) for r in rows[:2])
    end = start + len(rows[2]["input_ids"])
    torch.testing.assert_close(la[:, :start], lb[:, :start])
    torch.testing.assert_close(la[:, end:], lb[:, end:])  # later documents see nothing of document 2
    assert not torch.allclose(la[:, start:end], lb[:, start:end])


def test_with_a_kv_cache_transformers_would_mix_documents(base_dir):
    """Why PACKED_FORWARD exists: the packed-sequence detection only runs without a cache."""
    net = load_base(None, base_dir, "cpu").eval()
    packed = fastpath.pack(documents(), 10_000)
    with torch.no_grad():
        plain = net(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=True).logits
        isolated = net(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                       **fastpath.PACKED_FORWARD).logits
    assert not torch.allclose(plain, isolated)


def test_pack_order_respects_the_budget_and_is_deterministic():
    lengths = [(i * 37) % 120 + 5 for i in range(300)]
    first, again = fastpath.pack_order(lengths, 256, seed=3), fastpath.pack_order(lengths, 256, seed=3)
    packs = [next(first) for _ in range(200)]
    assert packs == [next(again) for _ in range(200)]
    assert all(sum(lengths[j] for j in p) <= 256 for p in packs)
    epoch = [j for p in packs for j in p][: len(lengths)]
    fill = sum(lengths) / (256 * len({tuple(p) for p in packs[: len(packs) // 2]}))
    assert sorted(set(j for p in packs for j in p)) == list(range(300)) and fill > 0.5, (len(epoch), fill)


def test_fast_path_gives_the_plain_path_gradients(base_dir):
    """LoRA on packed rows with the chunked loss == LoRA on padded rows with the model's loss."""
    cfg = TrainConfig(method="lora", lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    rows = documents()
    grads = []
    for fast in (False, True):
        torch.manual_seed(0)
        net = lora.prepare(cfg, base_dir, "cpu")
        for name, p in net.named_parameters():  # B starts at zero: give it values so A gets gradients too
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
        if fast:
            loss = fastpath.chunked_loss(net, fastpath.pack(rows, 10_000), chunk_tokens=7)
        else:
            loss = net(**collate(rows, 0)).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_chunked_loss_equals_the_model_loss_without_packing(base_dir):
    net = load_base(None, base_dir, "cpu").eval()
    batch = collate(documents(), 0)
    with torch.no_grad():
        torch.testing.assert_close(fastpath.chunked_loss(net, batch, 5), net(**batch).loss, rtol=1e-5, atol=1e-5)


def test_the_train_step_runs_the_fast_path(store, tmp_path, tiny_model):
    from helpers import sft_dataset
    from steps.train import train_model

    data = sft_dataset(store, tmp_path, tiny_model)
    cfg = TrainConfig(method="lora", lora=LoraSettings(r=4, alpha=8, dropout=0.0), max_steps=6, batch_size=4,
                      learning_rate=5e-3, warmup_steps=1, packing=True, tokens_per_batch=256, loss_chunk_tokens=64,
                      checkpoint_every=3)
    tuned = train_model(cfg, data, tiny_model, store)
    log = store.read_json(tuned.adapter, "train_log.json")
    assert len(log) == 6 and log[-1]["loss"] < log[0]["loss"]
    rows = store.read_jsonl(data, "train.jsonl")
    # every micro-batch is a padding-free pack of whole rows within the budget: tokens seen = packed row lengths
    order = fastpath.pack_order([len(r["input_ids"]) for r in rows], 256, cfg.seed)
    expected = sum(min(256, sum(len(rows[i]["input_ids"]) for i in next(order))) for _ in range(6))
    assert tuned.adapter.stats["tokens_seen"] == expected


def test_packing_is_refused_where_it_does_not_apply():
    from steps.config import PipelineParams
    from steps.errors import ConfigError

    with pytest.raises(ConfigError, match="packing"):
        PipelineParams.parse({"validate": {"record_kind": "preference"}, "train": {"packing": True}})
    with pytest.raises(ValueError, match="tokens_per_batch"):
        TrainConfig(tokens_per_batch=512)
    with pytest.raises(ValueError, match="reft"):
        TrainConfig(method="reft", packing=True)
