"""steps/train/batching.py: padded batches in length-grouped order, and padding-free packed rows with
per-document attention in token-budget order (the training fast path on CPU)."""

import pytest
import torch

from helpers import token_documents as documents
from steps.config import LoraSettings, TrainConfig
from steps.core.contract import IGNORE
from steps.train import batching
from steps.train.batching import batch_order, collate
from steps.train.methods.common import load_base


def test_packed_and_unpacked_documents_have_the_same_loss(base_dir):
    net = load_base(None, base_dir, "cpu").eval()
    rows = documents()
    with torch.no_grad():
        alone = torch.stack([per_document_loss(net(**{k: v for k, v in collate([r], 0).items() if k != "labels"}).logits,
                                               torch.tensor([r["labels"]]))[0] for r in rows])
        packed = batching.pack(rows, budget=10_000)
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
        a, b = (batching.pack(x, 10_000) for x in (rows, changed))
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
    packed = batching.pack(documents(), 10_000)
    with torch.no_grad():
        plain = net(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=True).logits
        isolated = net(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                       **batching.PACKED_FORWARD).logits
    assert not torch.allclose(plain, isolated)


def test_pack_order_respects_the_budget_and_is_deterministic():
    lengths = [(i * 37) % 120 + 5 for i in range(300)]
    first, again = batching.pack_order(lengths, 256, seed=3), batching.pack_order(lengths, 256, seed=3)
    packs = [next(first) for _ in range(200)]
    assert packs == [next(again) for _ in range(200)]
    assert all(sum(lengths[j] for j in p) <= 256 for p in packs)
    epoch = [j for p in packs for j in p][: len(lengths)]
    fill = sum(lengths) / (256 * len({tuple(p) for p in packs[: len(packs) // 2]}))
    assert sorted(set(j for p in packs for j in p)) == list(range(300)) and fill > 0.5, (len(epoch), fill)


def test_the_train_step_runs_the_fast_path(store, tmp_path, tiny_model):
    from helpers import sft_dataset
    from steps.train.step import train_model

    data = sft_dataset(store, tmp_path, tiny_model)
    cfg = TrainConfig(method="lora", lora=LoraSettings(r=4, alpha=8, dropout=0.0), max_steps=6, batch_size=4,
                      learning_rate=5e-3, warmup_steps=1, packing=True, tokens_per_batch=256, loss_chunk_tokens=64,
                      checkpoint_every=3)
    tuned = train_model(cfg, data, tiny_model, store)
    log = store.read_json(tuned.adapter, "train_log.json")
    assert len(log) == 6 and log[-1]["loss"] < log[0]["loss"]
    rows = store.read_jsonl(data, "train.jsonl")
    # every micro-batch is a padding-free pack of whole rows within the budget: tokens seen = packed row lengths
    order = batching.pack_order([len(r["input_ids"]) for r in rows], 256, cfg.seed)
    expected = sum(min(256, sum(len(rows[i]["input_ids"]) for i in next(order))) for _ in range(6))
    assert tuned.adapter.stats["tokens_seen"] == expected


def test_packing_is_refused_where_it_does_not_apply():
    from steps.config import PipelineParams
    from steps.core.errors import ConfigError

    with pytest.raises(ConfigError, match="packing"):
        PipelineParams.parse({"validate": {"record_kind": "preference"}, "train": {"packing": True}})
    with pytest.raises(ValueError, match="tokens_per_batch"):
        TrainConfig(tokens_per_batch=512)
    with pytest.raises(ValueError, match="reft"):
        TrainConfig(method="reft", packing=True)


def per_document_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of each row (labels -100 skipped)."""
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE,
                                            reduction="none")
    return nll.sum(-1)


def test_collate_pads_right_or_left_and_ignores_padding_in_the_labels():
    rows = [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8]}]
    right, left = collate(rows, pad_id=0), collate(rows, pad_id=0, left=True)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]] and left["attention_mask"].tolist()[1] == [0, 0, 1]
    labelled = collate([{"input_ids": [1, 2], "label": 2}, {"input_ids": [3], "label": 0}], pad_id=0)
    assert labelled["labels"].tolist() == [2, 0] and labelled["labels"].dtype == torch.long
    assert collate([{"input_ids": [1], "label": 0.5}], 0)["labels"].dtype == torch.float32


def test_batch_order_is_seeded_covers_every_row_and_groups_similar_lengths():
    lengths = [(i * 37) % 200 + 1 for i in range(400)]
    first, again, other = batch_order(lengths, 8, seed=1), batch_order(lengths, 8, seed=1), batch_order(lengths, 8, 2)
    epoch = [next(first) for _ in range(50)]
    assert epoch == [next(again) for _ in range(50)] and epoch != [next(other) for _ in range(50)]
    assert sorted(i for b in epoch for i in b) == list(range(400))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in epoch) / len(epoch)
    assert spread < 20  # batches drawn from length-sorted pools: little padding

