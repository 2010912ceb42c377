"""Every method on every family of bench/zoo.py without per-model code: head finds the output head
and the last block, reft the decoder layers, qlora keeps the new sequence head out of 4-bit, and
lora's default targets exist in each architecture. One training step must move only what the
method trains."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from steps.config import TrainConfig
from steps.core.contract import Task
from steps.train import methods
from steps.train.methods.common import attention_targets, blocks

sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "bench"))
import zoo  # noqa: E402

CHAT = Task(kind="sft")
TOPICS = Task(kind="classification", labels=["a", "b", "c"])


def task_of(family: str) -> Task:
    return TOPICS if family in zoo.ENCODERS else CHAT


def one_step(net, family: str) -> None:
    import torch

    ids = torch.randint(10, net.config.vocab_size, (2, 12))
    labels = torch.tensor([0, 2]) if family in zoo.ENCODERS else ids
    net(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()


@pytest.mark.parametrize("family", zoo.CAUSAL + zoo.ENCODERS)
def test_head_trains_the_head_and_the_last_block_only(tmp_path, family):
    folder = zoo.build(family, tmp_path / family, zoo.corpus())
    cfg = TrainConfig(method="head", head={"trainable_layers": 1})
    net = methods.prepare(cfg, folder, "cpu", task_of(family))
    last = blocks(net)[-1]
    in_last = {id(p) for p in last.parameters()}
    head = net.get_output_embeddings() if family in zoo.CAUSAL else None
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert id(p) in in_last or (head is not None and p is head.weight) or \
                not name.startswith(net.base_model_prefix + "."), name
    assert all(p.requires_grad for p in last.parameters())
    assert not all(p.requires_grad for p in blocks(net)[0].parameters())
    one_step(net, family)
    targets = attention_targets(TrainConfig(method="lora"), net)
    assert any(name.endswith(t) for name, _ in net.named_modules() for t in targets), targets


@pytest.mark.parametrize("family", zoo.CAUSAL)
def test_reft_finds_the_decoder_layers(tmp_path, family):
    folder = zoo.build(family, tmp_path / family, zoo.corpus())
    cfg = TrainConfig(method="reft", reft={"layers": [0, -1], "rank": 2})
    net = methods.prepare(cfg, folder, "cpu", CHAT)
    assert net.layer_indices == [0, 1]
    one_step(net, family)
    assert all(p.grad is not None for p in net.interventions.parameters())
    assert all(p.grad is None for p in net.base.parameters())


@pytest.mark.parametrize("family", ["qwen2", "modernbert"])
def test_qlora_keeps_the_new_sequence_head_in_full_precision(tmp_path, family):
    import bitsandbytes as bnb

    folder = zoo.build(family, tmp_path / family, zoo.corpus(), scale=2)
    net = methods.prepare(TrainConfig(method="qlora"), folder, "cpu", task_of(family))
    quantized = [name for name, m in net.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized
    if family in zoo.ENCODERS:
        assert not any(".classifier" in name or ".head." in name for name in quantized), quantized
    one_step(net, family)
