"""Classification and regression on an encoder: tokenize, train with every method, evaluate, reload."""

import json

import pytest

from helpers import kind_dataset, labelled_rows
from steps.config import EvaluateConfig, HeadSettings, LoraSettings, TrainConfig
from steps.evaluate import evaluate_model
from steps.train import methods
from steps.train.step import train_model

EVAL = EvaluateConfig(max_records=64, batch_size=8)


def cfg(method: str, **extra) -> TrainConfig:
    settings = {"lora": {"lora": LoraSettings(r=4, alpha=8, dropout=0.0)},
                "qlora": {"lora": LoraSettings(r=4, alpha=8, dropout=0.0)},
                "head": {"head": HeadSettings(trainable_layers=1)}}.get(method, {})
    return TrainConfig(**{"method": method, "max_steps": 30, "batch_size": 8, "learning_rate": 5e-3,
                          "warmup_steps": 2, "checkpoint_every": 0, **settings, **extra})


@pytest.fixture
def classes(store, tmp_path, tiny_encoder):
    return kind_dataset(store, tmp_path, tiny_encoder, "classification", labelled_rows("classification"))


def test_tokenize_gives_label_indices_and_class_counts(store, classes):
    stats = classes.stats
    assert stats["task"] == "classification" and stats["labels"] == ["money", "sport", "tech"]
    rows = store.read_jsonl(classes, "train.jsonl")
    assert {r["label"] for r in rows} <= {0, 1, 2}
    assert sum(stats["train_label_counts"].values()) == stats["train_records"] == len(rows)
    assert all(r["input_ids"][0] == 101 and r["input_ids"][-1] == 102 for r in rows)  # [CLS] ... [SEP]


@pytest.mark.parametrize("method", ["full", "lora", "head", "qlora"])
def test_every_method_trains_a_classifier_that_reloads(store, classes, tiny_encoder, method):
    tuned = train_model(cfg(method), classes, tiny_encoder, store)
    log = store.read_json(tuned.adapter, "train_log.json")
    first, last = sum(h["loss"] for h in log[:5]) / 5, sum(h["loss"] for h in log[-5:]) / 5
    assert last < first, (method, first, last)
    folder = store.download(tuned.adapter)
    meta = json.loads((folder / "method.json").read_text())
    assert meta["task"] == {"kind": "classification", "labels": ["money", "sport", "tech"]}
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))
    report = evaluate_model(EVAL, tuned, classes, store).stats
    assert set(report["per_class"]) == {"money", "sport", "tech"}
    assert len(report["confusion_matrix"]) == 3 and sum(map(sum, report["confusion_matrix"])) == report["eval_records"]
    assert 0 <= report["f1_macro"] <= 1 and 0 <= report["accuracy"] <= 1
    # The reloaded model predicts what the evaluation measured, in a fresh load.
    net = methods.load(store.download(tiny_encoder.base), folder, "cpu")
    assert net.config.id2label[0] == "money"
    again = evaluate_model(EVAL, tuned, classes, store)
    assert again.stats == report


def test_a_trained_classifier_beats_the_untrained_head(store, classes, tiny_encoder):
    tuned = train_model(cfg("full", max_steps=40), classes, tiny_encoder, store)
    base = evaluate_model(EVAL, tiny_encoder, classes, store).stats
    mine = evaluate_model(EVAL, tuned, classes, store).stats
    assert mine["accuracy"] > base["accuracy"] and mine["eval_loss"] < base["eval_loss"]
    assert mine["accuracy"] >= 0.8, mine
    assert mine["smoke"]["kind"] == "classification" and mine["smoke"]["probe"] > 0
    assert mine["smoke_passed"] == (not mine["smoke"]["missing_classes"])
    assert mine["smoke_passed"]  # a good classifier predicts every class on the balanced probe
    assert "reference_perplexity" not in mine


def test_head_method_trains_only_the_classifier_and_last_block(store, classes, tiny_encoder):
    tuned = train_model(cfg("head"), classes, tiny_encoder, store)
    from safetensors.torch import load_file

    names = set(load_file(store.download(tuned.adapter) / "head.safetensors"))
    assert {"classifier.weight", "classifier.bias"} <= names
    assert all(n.startswith("classifier.") or n.startswith("bert.encoder.layer.1.") for n in names)


def test_regression_learns_the_target(store, tmp_path, tiny_encoder):
    data = kind_dataset(store, tmp_path, tiny_encoder, "regression", labelled_rows("regression", n=80))
    assert data.stats["task"] == "regression" and "labels" not in data.stats
    rows = store.read_jsonl(data, "train.jsonl")
    assert all(isinstance(r["label"], float) for r in rows)
    tuned = train_model(cfg("full", max_steps=60), data, tiny_encoder, store)
    base = evaluate_model(EVAL, tiny_encoder, data, store).stats
    mine = evaluate_model(EVAL, tuned, data, store).stats
    assert {"mse", "mae", "r2"} <= set(mine)
    assert mine["mse"] < base["mse"]
    net = methods.load(store.download(tiny_encoder.base), store.download(tuned.adapter), "cpu")
    assert net.config.num_labels == 1 and net.config.problem_type == "regression"
