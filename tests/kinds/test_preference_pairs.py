"""Preference tuning through the train and evaluate steps: DPO and ORPO on a tiny Llama."""

import pytest

from helpers import kind_dataset, preference_rows
from steps.config import EarlyStopping, EvaluateConfig, LoraSettings, PreferenceSettings, TrainConfig
from steps.evaluate import evaluate_model
from steps.train.step import train_model

EVAL = EvaluateConfig(max_records=32, bleu_samples=2, max_new_tokens=4, batch_size=8, smoke_max_new_tokens=4,
                      reference_blocks=1)


@pytest.fixture
def pairs(store, tmp_path, tiny_model):
    return kind_dataset(store, tmp_path, tiny_model, "preference", preference_rows())


def settings(loss: str, **extra) -> TrainConfig:
    return TrainConfig(method="lora", lora=LoraSettings(r=4, alpha=8, dropout=0.0), max_steps=12, batch_size=4,
                       learning_rate=1e-2, warmup_steps=1, checkpoint_every=0,
                       preference=PreferenceSettings(loss=loss, beta=0.1), **extra)


def test_tokenize_masks_prompts_of_both_answers(store, pairs, tiny_tokenizer):
    assert pairs.stats["task"] == "preference"
    row = store.read_jsonl(pairs, "train.jsonl")[0]
    for ids, labels in ((row["input_ids"], row["labels"]), (row["rejected_ids"], row["rejected_labels"])):
        answer = tiny_tokenizer.decode([t for t, label in zip(ids, labels) if label != -100])
        assert "What is" not in answer  # the prompt is masked
        assert labels[0] == -100 and any(label != -100 for label in labels)
    assert row["input_ids"] != row["rejected_ids"]
    prompt = store.read_jsonl(pairs, "eval_prompts.jsonl")[0]
    assert prompt["messages"][0]["role"] == "user" and prompt["reference"]


@pytest.mark.parametrize("loss", ["dpo", "orpo"])
def test_preference_training_prefers_the_chosen_answers(store, pairs, tiny_model, loss):
    tuned = train_model(settings(loss), pairs, tiny_model, store)
    log = store.read_json(tuned.adapter, "train_log.json")
    assert log[-1]["loss"] < log[0]["loss"]
    assert ("reward_accuracy" if loss == "dpo" else "log_odds") in log[0]
    if loss == "dpo":
        assert log[0]["reward_margin"] == pytest.approx(0.0, abs=1e-4)  # LoRA starts as the reference
    base = evaluate_model(EVAL, tiny_model, pairs, store).stats
    mine = evaluate_model(EVAL, tuned, pairs, store).stats
    assert "reward_accuracy" not in base and mine["reward_beta"] == 0.1
    assert mine["logp_margin"] > base["logp_margin"]
    assert mine["pref_accuracy"] >= base["pref_accuracy"]
    assert mine["reward_margin"] > 0 and mine["reward_accuracy"] > 0.5
    assert "bleu" in mine and "perplexity" in mine


def test_dpo_early_stopping_uses_the_pair_loss(store, pairs, tiny_model):
    tuned = train_model(settings("dpo", early_stopping=EarlyStopping(eval_every=3, patience=50)), pairs, tiny_model,
                        store)
    report = store.read_json(tuned.adapter, "train_report.json")
    assert [e["step"] for e in report["evals"]] == [3, 6, 9, 12]
    assert report["evals"][-1]["loss"] < report["evals"][0]["loss"] < 0.7  # log 2 = 0.693 at the reference


def test_full_fine_tuning_dpo_uses_a_frozen_copy_as_reference(store, pairs, tiny_model):
    cfg = TrainConfig(method="full", max_steps=4, batch_size=4, learning_rate=1e-3, warmup_steps=1,
                      checkpoint_every=0, preference=PreferenceSettings(loss="dpo"))
    log = store.read_json(train_model(cfg, pairs, tiny_model, store).adapter, "train_log.json")
    assert log[0]["reward_margin"] == pytest.approx(0.0, abs=1e-4)  # the policy starts equal to the reference
    assert log[-1]["reward_margin"] > 0


def test_the_lora_reference_is_the_base_without_dropout(store, tmp_path, tiny_model):
    """With LoRA dropout on, the reference (adapters off, eval mode) still equals the plain base."""
    import torch

    from steps.train import methods, preference
    from steps.train.methods.common import load_base

    data = kind_dataset(store, tmp_path, tiny_model, "preference", preference_rows(8))
    rows = store.read_jsonl(data, "train.jsonl")[:4]
    base_dir = store.download(tiny_model.base)
    cfg = TrainConfig(method="lora", lora=LoraSettings(r=4, alpha=8, dropout=0.5),
                      preference=PreferenceSettings(loss="dpo"))
    net = methods.prepare(cfg, base_dir, "cpu")
    for name, p in net.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a trained-looking adapter must not leak into the reference
    net.train()
    preference.Reference(net, base_dir, "cpu", 2).fill(rows, 0)
    assert net.training
    plain = [dict(r) for r in rows]
    for r in plain:
        r.pop("ref_chosen"), r.pop("ref_rejected")
    preference.reference_logps(load_base(None, base_dir, "cpu").eval(), plain, 2, 0, "cpu")
    for mine, theirs in zip(rows, plain):
        assert mine["ref_chosen"] == pytest.approx(theirs["ref_chosen"], abs=1e-3)
        assert mine["ref_rejected"] == pytest.approx(theirs["ref_rejected"], abs=1e-3)
