"""Augmentation of the train split: seeded, train only, roles and labels kept, stats in the manifest,
and a back-translation hook proven with tiny random seq2seq models (no network)."""

import random

import pytest

from helpers import write_jsonl
from steps.config import AugmentConfig, IngestConfig, PipelineParams, ScrubConfig, TokenizeConfig, ValidateConfig
from steps.core.errors import ConfigError
from steps.ingest import ingest_records
from steps.scrub.step import scrub_records
from steps.tokenize.augment import (
    augment_inputs,
    augment_records,
    load_translator,
    substitute_synonyms,
    swap_words,
    synonym_table,
)
from steps.tokenize.split import split_summary
from steps.tokenize.step import tokenize_dataset
from steps.validate import validate_records

QUESTIONS = ["Can you help me find a big house quickly?", "Is it hard to learn a new language when you are old?",
             "What is a good way to start a small business?", "Why is the sky bright and the sea dark?",
             "서울에서 가장 큰 공원은 어디예요?", "How do I fix a broken chair with simple tools?"]


def chats(n: int = 30) -> list[dict]:
    return [{"id": f"c{i:03d}", "messages": [
        {"role": "system", "content": "You are a kind helper."},
        {"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} Case {i}."},
        {"role": "assistant", "content": f"A big answer is easy, number {i}."},
        {"role": "user", "content": "Thank you, that is a great help."},
        {"role": "assistant", "content": "You are welcome, my friend."}]} for i in range(n)]


def test_the_same_seed_gives_the_same_copies_in_any_record_order():
    cfg = AugmentConfig(techniques=["synonym", "swap"], copies=2, probability=0.5, word_rate=0.3, seed=3)
    records = chats()
    first, stats = augment_records(records, cfg, "chat")
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    again, _ = augment_records(shuffled, cfg, "chat")
    assert sorted(map(str, first)) == sorted(map(str, again))
    assert 0 < stats["records_augmented"] < len(records)  # probability 0.5 picks some, not all
    assert stats["records_added"] == len(first) - len(records) > stats["records_augmented"]  # 2 copies mostly
    assert stats["techniques"]["synonym"] > 0 and stats["techniques"]["swap"] > 0
    assert stats["seed"] == 3 and stats["target"] == "prompt"
    other, _ = augment_records(records, cfg.model_copy(update={"seed": 4}), "chat")
    assert other != first
    # originals keep their place; each chosen one is followed by its copies
    assert [r["id"] for r in first if "#aug" not in r["id"]] == [r["id"] for r in records]
    assert all(first[i - 1]["id"].split("#")[0] == r["id"].split("#")[0]
               for i, r in enumerate(first) if "#aug" in r["id"])
    assert records == chats()  # the input is not modified


def test_prompt_target_changes_user_turns_only_and_keeps_roles():
    cfg = AugmentConfig(techniques=["synonym", "swap"], copies=1, probability=1.0, word_rate=0.5)
    records = chats(12)
    out, stats = augment_records(records, cfg, "chat")
    originals = {r["id"]: r for r in records}
    copies = [r for r in out if "#aug" in r["id"]]
    assert len(copies) == stats["records_added"] > 0
    for copy in copies:
        source = originals[copy["id"].split("#")[0]]
        assert [m["role"] for m in copy["messages"]] == [m["role"] for m in source["messages"]]
        for new, old in zip(copy["messages"], source["messages"]):
            if old["role"] != "user":
                assert new == old  # system and assistant turns (the labels) are verbatim
        assert copy["messages"] != source["messages"]
    everything, _ = augment_records(records, cfg.model_copy(update={"target": "all"}), "chat")
    assert any(new["content"] != old["content"] for copy in everything if "#aug" in copy["id"]
               for new, old in zip(copy["messages"], originals[copy["id"].split("#")[0]]["messages"])
               if old["role"] == "assistant")


def test_labels_and_answers_are_kept_for_labelled_and_preference_records():
    cfg = AugmentConfig(techniques=["synonym", "swap"], probability=1.0, word_rate=0.5)
    labelled = [{"id": f"t{i}", "text": f"the big team won a great match today {i}", "label": ["sport", "tech"][i % 2]}
                for i in range(10)]
    out, stats = augment_records(labelled, cfg, "classification")
    assert stats["records_added"] == 10
    for original, copy in zip(out[::2], out[1::2]):
        assert copy["label"] == original["label"] and copy["text"] != original["text"]
        assert copy["id"] == f"{original['id']}#aug1"
    pairs = [{"id": f"p{i}", "prompt": f"Can you help me start a small shop {i}?", "chosen": "Yes, a good plan helps.",
              "rejected": "No, it is hard."} for i in range(10)]
    out, _ = augment_records(pairs, cfg, "preference")
    for original, copy in zip(out[::2], out[1::2]):
        assert (copy["chosen"], copy["rejected"]) == (original["chosen"], original["rejected"])
        assert copy["prompt"] != original["prompt"]


def test_synonyms_keep_case_placeholders_and_korean_and_swap_keeps_the_words():
    table = synonym_table()
    assert len(table) > 300 and "big" in table["large"]
    text = "Big HOUSE, big house <EMAIL> <PHONE:1a2b3c4d5e6f> 큰 집을 찾아요"
    out = substitute_synonyms(text, random.Random(0), 1.0)
    words = out.split()
    assert words[0] in {w.capitalize() for w in table["big"]} and words[1].rstrip(",") in {
        w.upper() for w in table["house"]}
    assert words[2] in table["big"] and words[3] in table["house"]
    assert out.endswith(" <EMAIL> <PHONE:1a2b3c4d5e6f> 큰 집을 찾아요")
    korean = "서울에서 가장 큰 공원은 어디예요?"
    assert substitute_synonyms(korean, random.Random(0), 1.0) == korean
    swapped = swap_words(korean, random.Random(0), 0.3)
    assert swapped != korean and sorted(swapped.split()) == sorted(korean.split())
    assert swap_words("alone", random.Random(0), 1.0) == "alone"


def clean_chats(store, tmp_path, rows):
    raw = ingest_records(IngestConfig(source=str(write_jsonl(tmp_path / "raw.jsonl", rows))), store)
    return scrub_records(ScrubConfig(near_dedup=False), validate_records(ValidateConfig(), raw, store), store)


def test_tokenize_augments_train_only_and_records_the_counts_in_the_manifest(store, tmp_path, tiny_model):
    clean = clean_chats(store, tmp_path, chats(40))
    plain_cfg = TokenizeConfig(eval_fraction=0.25, max_seq_len=128, leakage_threshold=None)
    plain = tokenize_dataset(plain_cfg, clean, tiny_model, store)
    cfg = plain_cfg.model_copy(update={"augment": AugmentConfig(techniques=["synonym", "swap"], copies=2,
                                                                probability=0.5, seed=1)})
    data = tokenize_dataset(cfg, clean, tiny_model, store)
    assert "augmentation" not in plain.stats
    stats = data.stats["augmentation"]
    assert stats["records_added"] > 0 and stats["techniques"]["synonym"] > 0
    assert store.read_jsonl(data, "eval.jsonl") == store.read_jsonl(plain, "eval.jsonl")  # eval untouched
    assert store.read_jsonl(data, "eval_prompts.jsonl") == store.read_jsonl(plain, "eval_prompts.jsonl")
    train = store.read_jsonl(data, "train.jsonl")
    assert data.stats["train_records"] == plain.stats["train_records"] + stats["records_added"] == len(train)
    assert sum("#aug" in r["id"] for r in train) == stats["records_added"]
    assert store.manifest(data.key)["stats"]["augmentation"] == stats
    assert f"{len(train)} (incl. {stats['records_added']} augmented) train" in split_summary(data.stats)
    assert tokenize_dataset(cfg, clean, tiny_model, store).stats == data.stats  # same seed: cached, same counts


def test_parameters_accept_augmentation_and_refuse_inconsistent_settings():
    params = PipelineParams.from_yaml("deployments/params/tiny.yaml",
                                      ["tokenize.augment.techniques=[swap]", "tokenize.augment.copies=2"])
    assert params.tokenize.augment.techniques == ["swap"] and params.tokenize.augment.copies == 2
    assert PipelineParams().tokenize.augment is None  # off by default
    for sections, message in [
        ({"augment": {"techniques": ["back_translation"]}}, "back_translation technique and the back_translation"),
        ({"augment": {"techniques": ["synonym"], "back_translation": {"translator": "m:f"}}}, "go together"),
        ({"augment": {"techniques": ["back_translation"], "back_translation": {"forward": "a"}}}, "both forward"),
        ({"augment": {"techniques": ["back_translation"],
                      "back_translation": {"forward": "a", "backward": "b", "translator": "m:f"}}}, "not both"),
        ({"augment": {"copies": 0}}, "copies"),
        ({"augment": {"techniques": ["shuffle"]}}, "techniques"),
    ]:
        with pytest.raises(ConfigError, match=message):
            PipelineParams.parse({"tokenize": sections})


# --- back-translation ---------------------------------------------------------------------------

def tiny_seq2seq(folder, seed):
    """A tiny random T5 with the MiniLM WordPiece tokenizer, saved like a downloaded model."""
    import torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from steps.base_model.shipped import encoder_dir

    tokenizer = AutoTokenizer.from_pretrained(encoder_dir(), local_files_only=True)
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id,
        decoder_start_token_id=tokenizer.cls_token_id))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def translation_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mt")
    return {"forward": tiny_seq2seq(root / "en-xx", 1), "backward": tiny_seq2seq(root / "xx-en", 2)}


def test_back_translation_runs_the_round_trip_through_local_models(translation_models):
    settings = {**translation_models, "max_new_tokens": 6, "batch_size": 4}
    cfg = AugmentConfig(techniques=["back_translation"], probability=1.0, back_translation=settings)
    records = chats(6)
    out, stats = augment_records(records, cfg, "chat")
    round_trip = load_translator(cfg.back_translation)
    texts = [m["content"] for r in records for m in r["messages"] if m["role"] == "user"]
    expected = [t.strip() or s for s, t in zip(texts, round_trip(texts))]
    assert expected != texts
    got = [m["content"] for r in out if "#aug" in r["id"] for m in r["messages"] if m["role"] == "user"]
    assert stats["records_added"] == stats["techniques"]["back_translation"] == len(records)
    assert got == expected  # greedy decoding: the same texts again
    assert augment_records(records, cfg, "chat") == (out, stats)
    # the models' files are part of the tokenize cache key
    digests = augment_inputs(cfg)
    assert len(digests) == 2 and digests[0] != digests[1]


def test_back_translation_with_your_own_callable(store, tmp_path, tiny_model, tiny_tokenizer, monkeypatch):
    (tmp_path / "my_mt.py").write_text("def shout(texts):\n    return [t.upper() for t in texts]\n"
                                       "def broken(texts):\n    return texts[:1]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    records = chats(4)
    cfg = AugmentConfig(techniques=["back_translation"], probability=1.0,
                        back_translation={"translator": "my_mt:shout"})
    out, stats = augment_records(records, cfg, "chat", translator=lambda texts: [f"<< {t} >>" for t in texts])
    assert out[1]["messages"][1]["content"] == f"<< {records[0]['messages'][1]['content']} >>"  # passed callable
    clean = clean_chats(store, tmp_path, chats(40))
    data = tokenize_dataset(TokenizeConfig(eval_fraction=0.25, max_seq_len=128, augment=cfg), clean, tiny_model, store)
    assert data.stats["augmentation"]["techniques"] == {"back_translation": data.stats["augmentation"]["records_added"]}
    shouted = [r for r in store.read_jsonl(data, "train.jsonl") if "#aug" in r["id"]]
    assert len(shouted) == data.stats["augmentation"]["records_added"] > 0
    assert all(" CASE " in tiny_tokenizer.decode(r["input_ids"]) for r in shouted)  # the configured callable ran
    with pytest.raises(ConfigError, match="must return a list of"):
        augment_records(records, cfg.model_copy(update={"back_translation": cfg.back_translation.model_copy(
            update={"translator": "my_mt:broken"})}), "chat")


@pytest.mark.parametrize("setting, message", [
    ({"translator": "no_such_module_xyz:fn"}, "cannot be imported"),
    ({"translator": "no-colon"}, "expected 'module:function'"),
    ({"forward": "/nonexistent/model", "backward": "/nonexistent/model"}, "not a model folder"),
    ({"forward": "package:no_such_package_xyz", "backward": "x"}, "package 'no_such_package_xyz' is not installed"),
])
def test_back_translation_that_cannot_load_is_a_config_error(setting, message):
    cfg = AugmentConfig(techniques=["back_translation"], probability=1.0, back_translation=setting)
    with pytest.raises(ConfigError, match=message):
        augment_records(chats(3), cfg, "chat")


def test_a_folder_that_is_not_a_seq2seq_model_is_a_config_error(tmp_path, translation_models):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "bert"}')
    cfg = AugmentConfig(techniques=["back_translation"], probability=1.0,
                        back_translation={"forward": str(broken), "backward": translation_models["backward"]})
    with pytest.raises(ConfigError, match=r"back_translation.forward: cannot load a seq2seq model"):
        augment_records(chats(3), cfg, "chat")
