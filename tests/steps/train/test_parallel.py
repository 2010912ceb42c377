"""Data-parallel training (train.processes = 2: torchrun over gloo on CPU, DDP or FSDP) trains the
same weights as one process on the same global batches, also when it resumes from a checkpoint."""

from __future__ import annotations

import uuid

import pytest
import torch
from safetensors.torch import load_file

from helpers import assert_same_training, sft_dataset, weights
from steps.config import LoraSettings, TrainConfig
from steps.core.contract import IGNORE, Task
from steps.core.lineage import run_key
from steps.train import step as train
from steps.train.checkpoints import CHECKPOINTS
from steps.train.losses import share_of
from steps.train.parallel import Group
from steps.train.step import STEP, train_model

# batch_size 5 over 2 ranks: uneven shares (3 and 2 rows, different label-token counts) in every
# micro-batch; 2 micro-batches per step (the first without gradient all-reduce).
BASE = dict(batch_size=5, grad_accum_steps=2, learning_rate=1e-3, warmup_steps=1, seed=5, checkpoint_every=2)


@pytest.fixture(scope="module")
def shared(services, tiny_model, tmp_path_factory):
    """One store and one small SFT dataset for the module (the expensive part is the processes, not this)."""
    from steps.core.store import ArtifactStore

    store = ArtifactStore.from_env(prefix=f"test-{uuid.uuid4().hex[:10]}")
    return store, sft_dataset(store, tmp_path_factory.mktemp("ddp"), tiny_model, n=30)


def keep_checkpoints(monkeypatch):
    """The in-process (single) run leaves its checkpoints in the store (the torchrun ranks are not patched)."""
    monkeypatch.setattr(train.Checkpoints, "clear", lambda self: None)


def plant(store, data, tiny_model, source: TrainConfig, target: TrainConfig, step: int) -> None:
    """Copy the single run's checkpoint at ``step`` to where the data-parallel run looks for its own."""
    keys = [run_key(STEP, c, [data.digest, tiny_model.base.digest]) for c in (source, target)]
    files = store.list_keys(f"{store.prefix}/{CHECKPOINTS}/{keys[0]}/step-{step:06d}/")
    files.sort(key=lambda k: k.endswith("_MANIFEST.json"))  # the manifest last, as a writer commits
    assert files and files[-1].endswith("_MANIFEST.json")
    for k in files:
        store.put_bytes(k.replace(keys[0], keys[1]), store.get_bytes(k))


def test_full_fine_tuning_on_two_processes_matches_one_ddp_and_fsdp(shared, tiny_model, monkeypatch):
    store, data = shared
    one = TrainConfig(method="full", max_steps=6, **BASE)
    keep_checkpoints(monkeypatch)
    single = train_model(one, data, tiny_model, store)
    ddp = train_model(one.model_copy(update={"processes": 2}), data, tiny_model, store)
    assert_same_training(store, single, ddp, "full")
    # FSDP, resumed from the single run's step-2 checkpoint: every rank loads its shards of the weights and
    # of the optimizer state; at step 4 the ranks gather theirs for rank 0's checkpoint.
    sharded = one.model_copy(update={"processes": 2, "distributed": "fsdp"})
    plant(store, data, tiny_model, one, sharded, step=2)
    fsdp = train_model(sharded, data, tiny_model, store)
    assert_same_training(store, single, fsdp, "full", resumed_from=2)
    assert store.read_json(fsdp.adapter, "train_report.json")["distributed"] == "fsdp"
    base = load_file(store.download(tiny_model.base) / "model.safetensors")
    trained = weights(store, single, "full")
    assert max((trained[k] - base[k]).abs().max().item() for k in base) > 1e-3  # the comparison is not vacuous


def test_lora_on_two_processes_resumes_a_checkpoint_and_matches_one(shared, tiny_model, monkeypatch):
    store, data = shared
    one = TrainConfig(method="lora", max_steps=6, lora=LoraSettings(r=4, alpha=8, dropout=0.0), **BASE)
    two = one.model_copy(update={"processes": 2})
    keep_checkpoints(monkeypatch)
    single = train_model(one, data, tiny_model, store)
    # Both ranks restore the planted step-2 checkpoint and go on from step 3 (rank 0 checkpoints step 4
    # on the way, gathering both ranks' RNG states).
    plant(store, data, tiny_model, one, two, step=2)
    double = train_model(two, data, tiny_model, store)
    assert_same_training(store, single, double, "lora", resumed_from=2)
    trained = weights(store, single, "lora")  # B starts at zero: it moved, so the comparison is not vacuous
    assert max(v.abs().max().item() for k, v in trained.items() if "lora_B" in k) > 1e-4


def rows(n: int, answer: int = 3) -> list[dict]:
    """Rows of 4 + i tokens whose last ``answer`` tokens are the labels (``answer`` label tokens after the shift)."""
    out = []
    for i in range(n):
        ids = list(range(10, 14 + i))
        out.append({"input_ids": ids, "labels": [IGNORE] * (len(ids) - answer) + ids[-answer:]})
    return out


@pytest.mark.parametrize("kind", ["sft", "classification"])
def test_shares_split_the_micro_batch_and_its_loss_normaliser(kind):
    cfg, task = TrainConfig(), Task(kind=kind, labels=["a", "b"] if kind == "classification" else [])
    batch = [{**r, "label": 0} if kind == "classification" else r for r in rows(5)]
    if kind == "sft":
        batch[1]["labels"] = [IGNORE] * 5  # a row without answer tokens weighs nothing
    parts = [share_of(Group(rank=r, world=2), batch, task, cfg, budget=64) for r in range(2)]
    assert [len(p.rows) for p in parts] == [3, 2] and parts[0].rows == batch[0::2] and parts[1].rows == batch[1::2]
    assert sum(p.unit_share for p in parts) == pytest.approx(1.0) and sum(p.row_share for p in parts) == 1.0
    if kind == "sft":  # 3 label tokens per row (the shift drops none: the answer is at the end), row 1 has none
        assert parts[1].unit_share == pytest.approx(3 / 12)
    else:
        assert parts[0].unit_share == pytest.approx(3 / 5)


def test_a_rank_without_rows_runs_a_stand_in_row_at_weight_zero():
    batch = rows(1)
    part = share_of(Group(rank=1, world=2), batch, Task(), TrainConfig(), budget=64)
    assert part.rows == batch and part.unit_share == part.row_share == 0.0 and part.tokens == 0
    assert share_of(Group(), batch, Task(), TrainConfig(), budget=64).rows == batch  # one process: all of it


def test_processes_must_be_positive_and_fsdp_refuses_what_it_cannot_shard():
    with pytest.raises(ValueError):
        TrainConfig(processes=0)
    for bad in (dict(method="qlora"), dict(loss_chunk_tokens=64)):
        with pytest.raises(ValueError, match="fsdp"):
            TrainConfig(processes=2, distributed="fsdp", **bad)
    assert TrainConfig().processes == 1 and TrainConfig().distributed == "ddp" and torch.distributed.is_available()
