"""steps/train/step.py: the training loop: what trains, reuse of a committed run, the hyperparameters
(epochs, optimizers, early stopping, gradient checkpointing) and the train report."""

import math

import pytest
import torch
from safetensors.torch import load_file

from helpers import all_keys, sft_dataset
from steps.config import EarlyStopping, LoraSettings, TrainConfig
from steps.train.step import train_model

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)
TRAIN = TrainConfig(max_steps=4, batch_size=4, learning_rate=5e-3, warmup_steps=1, lora=LoraSettings(r=4, alpha=8))


@pytest.fixture
def dataset(store, tmp_path, tiny_model):
    return sft_dataset(store, tmp_path, tiny_model)


def test_lora_changes_adapter_weights_and_leaves_the_base_untouched(store, dataset, tiny_model):
    tuned = train_model(TRAIN, dataset, tiny_model, store)
    assert tuned.base == tiny_model.base and tuned.adapter is not None
    folder = store.download(tuned.adapter)
    assert (folder / "adapter_model.safetensors").exists() and (folder / "adapter_config.json").exists()
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))
    adapter = load_file(folder / "adapter_model.safetensors")
    # peft initialises lora_B to zero: any non-zero B proves the adapter trained.
    b_weights = [w for name, w in adapter.items() if "lora_B" in name]
    assert b_weights and all(w.abs().sum() > 0 for w in b_weights)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in adapter} == {"q_proj", "k_proj", "v_proj", "o_proj"}

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = store.download(tiny_model.base)
    before = load_file(base_dir / "model.safetensors")
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), folder)
    base_after = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                  for k, v in merged.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(before[k], base_after[k]) for k in before)
    history = store.read_json(tuned.adapter, "train_log.json")
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert tuned.adapter.stats["trainable_params"] < 0.2 * sum(v.numel() for v in before.values())


def test_training_twice_reuses_the_committed_adapter(store, dataset, tiny_model):
    first = train_model(TRAIN, dataset, tiny_model, store)
    keys = all_keys(store)
    assert train_model(TRAIN, dataset, tiny_model, store) == first
    assert all_keys(store) == keys



def test_epochs_set_the_step_count_and_the_report_says_what_ran(store, dataset, tiny_model):
    cfg = TrainConfig(epochs=1, batch_size=8, warmup_ratio=0.25, lora=LORA, checkpoint_every=0)
    tuned = train_model(cfg, dataset, tiny_model, store)
    expected = math.ceil(dataset.stats["train_records"] / 8)
    report = store.read_json(tuned.adapter, "train_report.json")
    assert report["steps"] == report["planned_steps"] == expected
    assert report["trainable_params"] < report["total_params"] and report["tokens_seen"] > 0
    assert report["tokens_per_s"] > 0 and report["peak_memory_gib"] > 0 and report["wall_seconds"] > 0
    lrs = [h["lr"] for h in store.read_json(tuned.adapter, "train_log.json")]
    assert lrs[0] < max(lrs)  # warm-up


@pytest.mark.parametrize("optimizer", ["sgd", "adamw_8bit"])
def test_other_optimizers_train(store, dataset, tiny_model, optimizer):
    cfg = TrainConfig(max_steps=6, batch_size=8, optimizer=optimizer, learning_rate=5e-2 if optimizer == "sgd" else 5e-3,
                      lora=LORA, checkpoint_every=0, warmup_steps=0)
    log = store.read_json(train_model(cfg, dataset, tiny_model, store).adapter, "train_log.json")
    assert len(log) == 6 and all(math.isfinite(h["loss"]) for h in log)


def test_early_stopping_stops_when_the_eval_loss_stops_improving(store, dataset, tiny_model):
    # A learning rate far too high makes the eval loss worse at once: patience 1 stops at the 2nd evaluation.
    cfg = TrainConfig(max_steps=50, batch_size=8, optimizer="sgd", learning_rate=1.0, warmup_steps=0, lora=LORA,
                      early_stopping=EarlyStopping(eval_every=1, patience=1), checkpoint_every=0)
    tuned = train_model(cfg, dataset, tiny_model, store)
    report = store.read_json(tuned.adapter, "train_report.json")
    assert report["stopped_early"] and report["steps"] < 50
    assert [e["step"] for e in report["evals"]] == list(range(1, report["steps"] + 1))


def test_gradient_checkpointing_gives_the_same_first_step(store, dataset, tiny_model):
    plain = TrainConfig(max_steps=2, batch_size=8, lora=LORA, checkpoint_every=0)
    ckpt = plain.model_copy(update={"gradient_checkpointing": True})
    a = store.read_json(train_model(plain, dataset, tiny_model, store).adapter, "train_log.json")
    b = store.read_json(train_model(ckpt, dataset, tiny_model, store).adapter, "train_log.json")
    assert abs(a[0]["loss"] - b[0]["loss"]) < 1e-5 and abs(a[1]["loss"] - b[1]["loss"]) < 1e-4
