"""Data-parallel training (train.processes = 2: torchrun, DDP over gloo on CPU) trains the same
weights as one process on the same global batches."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from steps.config import LoraSettings, TrainConfig
from steps.train import CHECKPOINTS, train_model
from helpers import sft_dataset

# batch_size 5 over 2 ranks: uneven shares (3 and 2 rows, different label-token counts) every micro-batch.
BASE = dict(max_steps=4, batch_size=5, grad_accum_steps=2, learning_rate=1e-3, warmup_steps=1, seed=5,
            checkpoint_every=2)
WEIGHTS = {"lora": "adapter_model.safetensors", "full": "model.safetensors"}


def weights(store, ref, method):
    return load_file(store.download(ref.adapter) / WEIGHTS[method])


@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_processes_train_the_weights_of_one(store, tmp_path, tiny_model, method):
    data = sft_dataset(store, tmp_path, tiny_model, n=30)
    extra = {"lora": LoraSettings(r=4, alpha=8, dropout=0.0)} if method == "lora" else {}
    one = TrainConfig(method=method, **BASE, **extra)
    single = train_model(one, data, tiny_model, store)
    double = train_model(one.model_copy(update={"processes": 2}), data, tiny_model, store)

    report = store.read_json(double.adapter, "train_report.json")
    assert report["processes"] == 2 and report["steps"] == 4
    assert store.read_json(single.adapter, "train_report.json")["processes"] == 1
    assert double.adapter.stats["tokens_seen"] == single.adapter.stats["tokens_seen"]
    a, b = store.read_json(single.adapter, "train_log.json"), store.read_json(double.adapter, "train_log.json")
    assert [h["lr"] for h in a] == [h["lr"] for h in b]
    assert all(abs(x["loss"] - y["loss"]) < 1e-5 for x, y in zip(a, b)), (a, b)
    expected, got = weights(store, single, method), weights(store, double, method)
    assert expected.keys() == got.keys()
    worst = max((expected[k] - got[k]).abs().max().item() for k in expected)
    moved = max((expected[k] - weights_before(store, tiny_model, k, method, expected[k])).abs().max().item()
                for k in expected)
    assert moved > 1e-3, "training did not move the weights: the comparison would prove nothing"
    assert worst < 1e-5, f"largest difference {worst:.2e}"
    assert store.list_keys(f"{store.prefix}/{CHECKPOINTS}/") == []  # rank 0 cleared its checkpoints


def weights_before(store, tiny_model, name, method, like):
    """The untrained value of a trained tensor (LoRA B starts at zero; full starts at the base)."""
    if method == "lora":
        return torch.zeros_like(like) if "lora_B" in name else like  # A is random: compare B only
    from steps.store import ArtifactStore

    base = load_file(ArtifactStore.from_env("shared").download(tiny_model.base) / "model.safetensors")
    return base[name]
