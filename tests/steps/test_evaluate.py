"""steps/evaluate.py: the task's metrics, the smoke test and forgetting, for a base model and a trained one
(classification, regression and preference metrics: tests/kinds/)."""

import math

from helpers import sft_dataset
from steps.config import EvaluateConfig, LoraSettings, TrainConfig
from steps.evaluate import evaluate_model
from steps.train.step import train_model

TRAIN = TrainConfig(max_steps=4, batch_size=4, learning_rate=5e-3, warmup_steps=1, lora=LoraSettings(r=4, alpha=8))


def test_evaluate_reports_perplexity_and_bleu_for_base_and_tuned(store, tmp_path, tiny_model):
    dataset = sft_dataset(store, tmp_path, tiny_model)
    cfg = EvaluateConfig(max_records=16, bleu_samples=3, max_new_tokens=6, batch_size=4)
    base = evaluate_model(cfg, tiny_model, dataset, store)
    tuned = evaluate_model(cfg, train_model(TRAIN, dataset, tiny_model, store), dataset, store)
    assert base.key != tuned.key
    for report in (base, tuned):
        assert math.isfinite(report.stats["perplexity"]) and report.stats["perplexity"] > 1
        assert report.stats["bleu_samples"] == 3 and 0 <= report.stats["bleu"] <= 100
        smoke = report.stats["smoke"]
        assert smoke["kind"] == "generation" and len(smoke["prompts"]) == 3 and smoke["seconds_per_input"] > 0
        assert report.stats["smoke_passed"] == smoke["passed"] == all(p["passed"] for p in smoke["prompts"])
        assert report.stats["reference_perplexity"] > 1
        assert len(store.read_jsonl(report, "samples.jsonl")) == 3
    # A random tiny model is near-uniform over 49k tokens; a few LoRA steps on repetitive data beat it.
    assert tuned.stats["perplexity"] < base.stats["perplexity"]
    assert base.stats["model"] == "base" and tuned.stats["model"] == "fine-tuned"


def test_degenerate_answers_are_detected():
    from steps.evaluate import degenerate

    assert degenerate([5, 6, 7, 8] * 6)
    assert not degenerate(list(range(40)))
    assert not degenerate([1, 2, 3])  # too short to judge


def test_an_evaluation_is_an_artifact_computed_once(store, tmp_path, tiny_model):
    dataset = sft_dataset(store, tmp_path, tiny_model, n=16)
    cfg = EvaluateConfig(max_records=4, bleu_samples=0, smoke_prompts=["hi"], smoke_max_new_tokens=2, reference_blocks=0)
    first = evaluate_model(cfg, tiny_model, dataset, store)
    keys = store.list_keys(store.prefix + "/evaluate/")
    assert evaluate_model(cfg, tiny_model, dataset, store) == first
    assert store.list_keys(store.prefix + "/evaluate/") == keys
    assert store.read_json(first, "metrics.json") == first.stats and "bleu" not in first.stats


def test_generation_samples_are_taken_from_every_language_in_turn():
    from steps.evaluate import prompt_group, script_of, stratified

    def prompt(i, text, **extra):
        return {"id": str(i), "messages": [{"role": "user", "content": text}], **extra}

    english = [prompt(i, f"What is {i} plus {i}?") for i in range(6)]
    korean = [prompt(10 + i, f"{i} 더하기 {i}는 무엇입니까?") for i in range(3)]
    assert [script_of(t) for t in ("Hello 123", "안녕하세요", "Привет", "こんにちは", "中文字", "...")] == \
        ["latin", "hangul", "cyrillic", "kana", "cjk", "none"]
    picked = stratified(english + korean, 4)
    assert [p["id"] for p in picked] == ["0", "10", "1", "11"]  # in turn, file order within a language
    assert [prompt_group(p) for p in stratified(english + korean, 9)].count("hangul") == 3
    assert stratified(english, 3) == english[:3]  # one language: as before
    assert prompt_group(prompt(0, "x", category="billing")) == "billing"  # a record's own category wins
