"""Preference tuning through the train and evaluate steps: DPO and ORPO on a tiny Llama."""

import pytest

from steps.config import EarlyStopping, EvaluateConfig, LoraSettings, PreferenceSettings, TrainConfig
from steps.evaluate import evaluate_model
from steps.train import train_model
from helpers import kind_dataset, preference_rows

EVAL = EvaluateConfig(max_records=32, bleu_samples=2, max_new_tokens=4, batch_size=8)


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
