"""Kill a training process with SIGKILL mid-run; the retry resumes from the newest
complete checkpoint in the store and ends where an uninterrupted run ends."""

from __future__ import annotations

import os
import uuid

import torch
from safetensors.torch import load_file

from helpers import kill_at_first_checkpoint, sft_dataset
from steps.config import LoraSettings, TrainConfig
from steps.core.store import ArtifactStore
from steps.train.checkpoints import CHECKPOINTS
from steps.train.step import train_model

# dropout > 0 so that the RNG state must be restored too, not only weights and optimizer.
CFG = TrainConfig(max_steps=40, checkpoint_every=5, batch_size=4, learning_rate=3e-3, warmup_steps=3,
                  scheduler="cosine", lora=LoraSettings(r=4, alpha=8, dropout=0.1), seed=3)

SCRIPT = """
import json, sys
from steps.config import TrainConfig
from steps.core.store import ArtifactStore, DatasetRef, ModelRef
from steps.train.step import train_model
args = json.loads(sys.argv[1])
train_model(TrainConfig.model_validate(args["cfg"]), DatasetRef.model_validate(args["data"]),
            ModelRef.model_validate(args["model"]), ArtifactStore.from_env(args["prefix"]))
"""


def adapter(store, ref):
    return load_file(store.download(ref.adapter) / "adapter_model.safetensors")


def test_sigkill_mid_run_then_retry_matches_an_uninterrupted_run(store, tmp_path, tiny_model):
    data = sft_dataset(store, tmp_path, tiny_model)
    reference = train_model(CFG, data, tiny_model, store)
    assert reference.adapter.stats["resumed_from"] is None

    killed = ArtifactStore.from_env(f"test-{uuid.uuid4().hex[:10]}")
    args = {"cfg": CFG.model_dump(mode="json"), "data": data.model_dump(mode="json"),
            "model": tiny_model.model_dump(mode="json"), "prefix": killed.prefix}
    kill_at_first_checkpoint(SCRIPT, args, killed, os.environ.copy())

    resumed = train_model(CFG, data, tiny_model, killed)
    start = resumed.adapter.stats["resumed_from"]
    assert start is not None and 5 <= start < CFG.max_steps and start % 5 == 0

    ref_log = store.read_json(reference.adapter, "train_log.json")
    new_log = killed.read_json(resumed.adapter, "train_log.json")
    assert [h["step"] for h in new_log] == list(range(1, CFG.max_steps + 1))
    for a, b in zip(ref_log[start:], new_log[start:]):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and a["lr"] == b["lr"], (a, b)
    expected, got = adapter(store, reference), adapter(killed, resumed)
    assert expected.keys() == got.keys()
    assert all(torch.allclose(expected[k], got[k], atol=1e-6) for k in expected)
    # Checkpoints are cleared once the final artifact is committed.
    assert killed.list_keys(f"{killed.prefix}/{CHECKPOINTS}/") == []
    report = killed.read_json(resumed.adapter, "train_report.json")
    assert report["resumed_from"] == start and report["steps"] == CFG.max_steps
