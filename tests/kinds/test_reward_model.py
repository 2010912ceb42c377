"""Reward models (train.preference.loss 'reward') through tokenize, train, evaluate and the served pyfunc:
a scalar head on a tiny Llama (chat-rendered pairs) or a tiny BERT (text pairs), every method."""

from __future__ import annotations

import types

import pytest

from helpers import preference_rows, write_jsonl
from steps.config import EvaluateConfig, HeadSettings, LoraSettings, PipelineParams, PreferenceSettings, TrainConfig
from steps.evaluate import evaluate_model
from steps.train.step import train_model

EVAL = EvaluateConfig(max_records=64, batch_size=8)
REWARD = PreferenceSettings(loss="reward")


def reward_dataset(store, tmp_path, model, rows, max_seq_len: int = 64):
    """Ingest -> validate -> scrub -> tokenize preference records for a reward model."""
    from steps.config import IngestConfig, ScrubConfig, TokenizeConfig, ValidateConfig
    from steps.ingest import ingest_records
    from steps.scrub.step import scrub_records
    from steps.tokenize.step import tokenize_dataset
    from steps.validate import validate_records

    raw = ingest_records(IngestConfig(source=str(write_jsonl(tmp_path / "pairs.jsonl", rows))), store)
    clean = scrub_records(ScrubConfig(), validate_records(ValidateConfig(record_kind="preference"), raw, store), store)
    return tokenize_dataset(TokenizeConfig(eval_fraction=0.25, max_seq_len=max_seq_len, reward_model=True), clean,
                            model, store)


def settings(method: str, **extra) -> TrainConfig:
    sections = {"lora": {"lora": LoraSettings(r=4, alpha=8, dropout=0.0)},
                "head": {"head": HeadSettings(trainable_layers=1)}}.get(method, {})
    return TrainConfig(method=method, max_steps=extra.pop("max_steps", 20), batch_size=8, learning_rate=5e-3,
                       warmup_steps=1, checkpoint_every=0, preference=REWARD, **sections, **extra)


@pytest.fixture
def llama_pairs(store, tmp_path, tiny_model):
    return reward_dataset(store, tmp_path, tiny_model, preference_rows(48))


@pytest.fixture
def bert_pairs(store, tmp_path, tiny_encoder):
    return reward_dataset(store, tmp_path, tiny_encoder, preference_rows(48))


def test_parameters_make_a_reward_model_of_preference_records():
    params = PipelineParams.parse({"validate": {"record_kind": "preference"}, "base_model": {"source":
                                   "all-minilm-l6-v2"}, "train": {"method": "full", "preference": {"loss": "reward"}}})
    assert params.task == "reward" and params.tokenize.reward_model
    assert params.register_.metric == "reward_accuracy"
    assert PipelineParams.parse(params.model_dump(by_alias=True)) == params  # stored parameters read back the same
    from steps.core.errors import ConfigError

    with pytest.raises(ConfigError, match="trains with full, head, lora"):
        PipelineParams.parse({"validate": {"record_kind": "preference"},
                              "train": {"method": "qlora", "preference": {"loss": "reward"}}})
    with pytest.raises(ConfigError, match="not measured for a reward model"):
        PipelineParams.parse({"validate": {"record_kind": "preference"}, "register": {"metric": "pref_accuracy"},
                              "train": {"preference": {"loss": "reward"}}})
    with pytest.raises(ConfigError, match="tokenize.reward_model goes with"):
        PipelineParams.parse({"validate": {"record_kind": "preference"}, "tokenize": {"reward_model": True}})
    with pytest.raises(ConfigError, match="no beta"):
        PipelineParams.parse({"validate": {"record_kind": "preference"},
                              "train": {"preference": {"loss": "reward", "beta": 0.5}}})
    with pytest.raises(ConfigError, match="encoder"):  # DPO still needs a causal LM
        PipelineParams.parse({"validate": {"record_kind": "preference"}, "base_model": {"source": "all-minilm-l6-v2"}})


def test_tokenize_keeps_each_answer_with_its_prompt(store, llama_pairs, bert_pairs, tiny_tokenizer, tiny_encoder):
    from transformers import AutoTokenizer

    assert llama_pairs.stats["task"] == "reward" and llama_pairs.stats["pair_input"] == "chat"
    record = {r["id"]: r for r in preference_rows(48)}
    row = store.read_jsonl(llama_pairs, "train.jsonl")[0]
    assert set(row) == {"id", "input_ids", "rejected_ids"}
    for ids, answer in ((row["input_ids"], record[row["id"]]["chosen"]),
                        (row["rejected_ids"], record[row["id"]]["rejected"])):
        text = tiny_tokenizer.apply_chat_template([{"role": "user", "content": record[row["id"]]["prompt"]},
                                                   {"role": "assistant", "content": answer}], tokenize=False)
        assert ids == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]  # the whole conversation
    assert bert_pairs.stats["task"] == "reward" and bert_pairs.stats["pair_input"] == "text_pair"
    bert = AutoTokenizer.from_pretrained(store.download(tiny_encoder.base))
    row = store.read_jsonl(bert_pairs, "train.jsonl")[0]
    pair = record[row["id"]]
    assert row["input_ids"] == bert(pair["prompt"], pair["chosen"])["input_ids"]
    assert bert.decode(row["rejected_ids"]).startswith(f"[CLS] {pair['prompt'].lower()} [SEP]")


def test_an_encoder_for_dpo_is_still_refused_at_tokenize(store, tmp_path, tiny_encoder):
    from helpers import kind_dataset
    from steps.core.errors import ConfigError

    with pytest.raises(ConfigError, match="encoder"):
        kind_dataset(store, tmp_path, tiny_encoder, "preference", preference_rows(8))


@pytest.mark.parametrize("base", ["llama", "bert"])
def test_training_beats_the_untrained_head_on_held_out_pairs(store, request, base):
    model = request.getfixturevalue("tiny_model" if base == "llama" else "tiny_encoder")
    data = request.getfixturevalue(f"{base}_pairs")
    tuned = train_model(settings("full" if base == "bert" else "lora"), data, model, store)
    log = store.read_json(tuned.adapter, "train_log.json")
    assert log[-1]["loss"] < log[0]["loss"] and "reward_accuracy" in log[0]
    before = evaluate_model(EVAL, model, data, store).stats
    after = evaluate_model(EVAL, tuned, data, store).stats
    assert before["task"] == after["task"] == "reward" and after["eval_records"] >= 8
    assert after["reward_accuracy"] > before["reward_accuracy"]
    assert after["reward_accuracy"] >= 0.9 and after["reward_margin"] > before["reward_margin"]
    assert after["eval_loss"] < before["eval_loss"]
    assert after["smoke_passed"] and "perplexity" not in after and "bleu" not in after


def test_the_base_evaluation_scores_the_head_training_starts_from(store, llama_pairs, tiny_model):
    """Whatever train.seed, the untrained head is seeded on its own: the base row is training's start."""
    import torch

    from steps.core.contract import Task
    from steps.train import methods, reward

    base = evaluate_model(EVAL, tiny_model, llama_pairs, store).stats
    rows = store.read_jsonl(llama_pairs, "eval.jsonl")
    for seed in (0, 42):
        torch.manual_seed(seed)
        net = methods.prepare(settings("full", seed=seed), store.download(tiny_model.base), "cpu",
                              Task(kind="reward")).eval()
        start = reward.pair_metrics(*reward.score_pairs(net, rows, 8, net.config.pad_token_id, "cpu"))
        assert start == {k: base[k] for k in start}


@pytest.mark.parametrize("method", ["full", "head", "lora"])
def test_every_method_trains_a_reward_model_that_reloads(store, llama_pairs, tiny_model, method):
    from steps.train import methods, reward

    tuned = train_model(settings(method, max_steps=6), llama_pairs, tiny_model, store)
    folder, base_dir = store.download(tuned.adapter), store.download(tiny_model.base)
    assert methods.task_of(folder).kind == "reward"
    report = store.read_json(tuned.adapter, "train_report.json")
    if method != "full":
        assert report["trainable_params"] < report["total_params"] / 2
    net = methods.load(base_dir, folder, "cpu")
    assert net.config.num_labels == 1
    rows = store.read_jsonl(llama_pairs, "eval.jsonl")
    loaded = reward.score_pairs(net, rows, 8, net.config.pad_token_id, "cpu")
    candidate = evaluate_model(EVAL, tuned, llama_pairs, store).stats
    base = evaluate_model(EVAL, tiny_model, llama_pairs, store).stats
    assert reward.pair_metrics(*loaded) == {k: candidate[k] for k in ("reward_accuracy", "reward_margin", "eval_loss")}
    assert candidate["reward_margin"] != base["reward_margin"]  # the trained weights were applied
    losses = store.read_jsonl(tuned.adapter, "record_losses.jsonl")
    assert {r["split"] for r in losses} == {"train", "eval"} and all(r["loss"] >= 0 for r in losses)


def served(store, tuned, base, data):
    from steps.register.serving import ChatAdapterModel
    from steps.register.step import served_encoding

    base_dir = store.download(base.base)
    context = types.SimpleNamespace(model_config={"base_model_uri": str(base_dir), **served_encoding(data)},
                                    artifacts={"trained": str(store.download(tuned.adapter)), "tokenizer": str(base_dir)})
    model = ChatAdapterModel()
    model.load_context(context)
    return model


@pytest.mark.parametrize("base", ["llama", "bert"])
def test_the_served_model_scores_texts_and_pairs_as_in_training(store, request, base):
    import pandas as pd

    from steps.train import methods, reward

    model = request.getfixturevalue("tiny_model" if base == "llama" else "tiny_encoder")
    data = request.getfixturevalue(f"{base}_pairs")
    tuned = train_model(settings("lora", max_steps=4), data, model, store)
    served_model = served(store, tuned, model, data)
    pairs = {r["id"]: r for r in preference_rows(48)}
    rows = store.read_jsonl(data, "eval.jsonl")[:3]
    inputs = [{"prompt": pairs[r["id"]]["prompt"], "response": pairs[r["id"]]["chosen"]} for r in rows]
    scores = served_model.predict(None, inputs)
    assert len(scores) == 3 and all(isinstance(s, float) for s in scores)
    # The same numbers as the trained model loaded by its method on the tokenized rows.
    net = methods.load(store.download(model.base), store.download(tuned.adapter), "cpu")
    chosen, _ = reward.score_pairs(net, rows, 8, net.config.pad_token_id, "cpu")
    assert scores == pytest.approx(chosen, abs=1e-5)
    assert served_model.predict(None, pd.DataFrame(inputs)) == pytest.approx(scores, abs=1e-6)
    assert served_model.predict(None, {"prompt": [i["prompt"] for i in inputs],
                                       "response": [i["response"] for i in inputs]}) == pytest.approx(scores, abs=1e-6)
    texts = served_model.predict(None, ["a plain text to score", "another one"])
    assert len(texts) == 2 and all(isinstance(s, float) for s in texts)
    assert served_model.predict(None, [{"text": "a plain text to score"}]) == pytest.approx(texts[:1], abs=1e-6)
    with pytest.raises(ValueError, match="prompt"):
        served_model.predict(None, [{"question": "?"}])


def test_early_stopping_and_record_losses_use_the_pair_loss(store, bert_pairs, tiny_encoder):
    import math

    from steps.config import EarlyStopping
    from steps.train import methods, reward

    tuned = train_model(settings("full", max_steps=12, early_stopping=EarlyStopping(eval_every=4, patience=50)),
                        bert_pairs, tiny_encoder, store)
    evals = store.read_json(tuned.adapter, "train_report.json")["evals"]
    assert [e["step"] for e in evals] == [4, 8, 12] and evals[-1]["loss"] < evals[0]["loss"]
    net = methods.load(store.download(tiny_encoder.base), store.download(tuned.adapter), "cpu")
    rows = store.read_jsonl(bert_pairs, "eval.jsonl")
    good, bad = reward.score_pairs(net, rows, 8, net.config.pad_token_id, "cpu")
    assert evals[-1]["loss"] == pytest.approx(reward.pair_metrics(good, bad)["eval_loss"], abs=1e-5)
    losses = {r["id"]: r["loss"] for r in store.read_jsonl(tuned.adapter, "record_losses.jsonl") if r["split"] == "eval"}
    for row, c, r in zip(rows, good, bad):  # each pair's -log sigmoid(r_chosen - r_rejected)
        assert losses[row["id"]] == pytest.approx(math.log1p(math.exp(-(c - r))), abs=1e-4)
