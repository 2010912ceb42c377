"""The training loop's hyperparameters: epochs, warm-up ratio, optimizers, early stopping,
gradient checkpointing, and the train report."""

from __future__ import annotations

import math

import pytest

from steps.config import EarlyStopping, LoraSettings, TrainConfig
from steps.train import train_model
from helpers import sft_dataset

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)


@pytest.fixture
def data(store, tmp_path, tiny_model):
    return sft_dataset(store, tmp_path, tiny_model)


def test_epochs_set_the_step_count_and_the_report_says_what_ran(store, data, tiny_model):
    cfg = TrainConfig(epochs=1, batch_size=8, warmup_ratio=0.25, lora=LORA, checkpoint_every=0)
    tuned = train_model(cfg, data, tiny_model, store)
    expected = math.ceil(data.stats["train_records"] / 8)
    report = store.read_json(tuned.adapter, "train_report.json")
    assert report["steps"] == report["planned_steps"] == expected
    assert report["trainable_params"] < report["total_params"] and report["tokens_seen"] > 0
    assert report["tokens_per_s"] > 0 and report["peak_memory_gib"] > 0 and report["wall_seconds"] > 0
    lrs = [h["lr"] for h in store.read_json(tuned.adapter, "train_log.json")]
    assert lrs[0] < max(lrs)  # warm-up


@pytest.mark.parametrize("optimizer", ["sgd", "adamw_8bit"])
def test_other_optimizers_train(store, data, tiny_model, optimizer):
    cfg = TrainConfig(max_steps=6, batch_size=8, optimizer=optimizer, learning_rate=5e-2 if optimizer == "sgd" else 5e-3,
                      lora=LORA, checkpoint_every=0, warmup_steps=0)
    log = store.read_json(train_model(cfg, data, tiny_model, store).adapter, "train_log.json")
    assert len(log) == 6 and all(math.isfinite(h["loss"]) for h in log)


def test_early_stopping_stops_when_the_eval_loss_stops_improving(store, data, tiny_model):
    # A learning rate far too high makes the eval loss worse at once: patience 1 stops at the 2nd evaluation.
    cfg = TrainConfig(max_steps=50, batch_size=8, optimizer="sgd", learning_rate=1.0, warmup_steps=0, lora=LORA,
                      early_stopping=EarlyStopping(eval_every=1, patience=1), checkpoint_every=0)
    tuned = train_model(cfg, data, tiny_model, store)
    report = store.read_json(tuned.adapter, "train_report.json")
    assert report["stopped_early"] and report["steps"] < 50
    assert [e["step"] for e in report["evals"]] == list(range(1, report["steps"] + 1))


def test_gradient_checkpointing_gives_the_same_first_step(store, data, tiny_model):
    plain = TrainConfig(max_steps=2, batch_size=8, lora=LORA, checkpoint_every=0)
    ckpt = plain.model_copy(update={"gradient_checkpointing": True})
    a = store.read_json(train_model(plain, data, tiny_model, store).adapter, "train_log.json")
    b = store.read_json(train_model(ckpt, data, tiny_model, store).adapter, "train_log.json")
    assert abs(a[0]["loss"] - b[0]["loss"]) < 1e-5 and abs(a[1]["loss"] - b[1]["loss"]) < 1e-4
