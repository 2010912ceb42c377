"""Sequence-to-sequence (seq2seq records on an encoder-decoder): tiny random T5 and BART built from their config
classes with word-level tokenizers built here; records from {input, target} and from instruction pairs, rows whose
labels are the target tokens only, the loss on them, LoRA's targets, training that beats the base on held-out
targets, generation metrics, the served model, export, and resume after SIGKILL."""

from __future__ import annotations

import random

import pytest
import torch

from helpers import write_jsonl
from steps.config import EvaluateConfig, LoraSettings, PipelineParams, TokenizeConfig, TrainConfig
from steps.core.contract import IGNORE, Task
from steps.evaluate import evaluate_model
from steps.train import methods, seq2seq
from steps.train.step import train_model

SEQ2SEQ = Task(kind="seq2seq")
EVAL = EvaluateConfig(max_records=32, batch_size=16, bleu_samples=12, max_new_tokens=12, smoke_max_new_tokens=12,
                      reference_blocks=0)
TOKENIZE = TokenizeConfig(eval_fraction=0.2, max_seq_len=32, leakage_threshold=None)
# A word-for-word "translation": a tiny model learns it in a few dozen steps.
LEXICON = {"cat": "chat", "dog": "chien", "bird": "oiseau", "eats": "mange", "sees": "voit", "fish": "poisson",
           "bread": "pain", "apple": "pomme", "the": "le", "small": "petit", "big": "grand", "old": "vieux",
           "young": "jeune"}
SPECIALS = ["<pad>", "</s>", "<s>", "<unk>"]


def pairs(n: int = 160, seed: int = 3) -> list[dict]:
    """``n`` distinct sentences (of 576) and their word-for-word translations."""
    import itertools

    adjectives, subjects, verbs = ["small", "big", "old", "young"], ["cat", "dog", "bird"], ["eats", "sees"]
    objects = ["fish", "bread", "apple", "cat", "dog", "bird"]
    sentences = [["the", a, s, v, "the", b, o] for a, s, v, b, o in
                 itertools.product(adjectives, subjects, verbs, adjectives, objects)]
    chosen = random.Random(seed).sample(sentences, n)
    return [{"id": f"pair-{i:03d}", "input": "translate: " + " ".join(words),
             "target": " ".join(LEXICON[w] for w in words)} for i, words in enumerate(chosen)]


def build_model(arch: str, folder):
    """A two-layer random T5 or BART from its config class, with a word-level tokenizer of the pairs' words: T5
    closes a sequence with ``</s>`` and starts the decoder with ``<pad>``; BART frames it as ``<s> ... </s>``
    and starts the decoder with ``</s>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        GenerationConfig,
        PreTrainedTokenizerFast,
        T5Config,
        T5ForConditionalGeneration,
    )

    words = sorted({"translate", ":", *LEXICON, *LEXICON.values()})
    vocab = {token: i for i, token in enumerate(SPECIALS + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    template = "$A </s>" if arch == "t5" else "<s> $A </s>"
    backend.post_processor = processors.TemplateProcessing(single=template, special_tokens=[
        ("</s>", vocab["</s>"]), ("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        bos_token="<s>", unk_token="<unk>")
    torch.manual_seed(0)
    ids = dict(vocab_size=len(vocab), pad_token_id=vocab["<pad>"], eos_token_id=vocab["</s>"])
    if arch == "t5":
        config = T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, decoder_start_token_id=0, **ids)
        model = T5ForConditionalGeneration(config)
    else:
        config = BartConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                            max_position_embeddings=64, bos_token_id=vocab["<s>"], decoder_start_token_id=vocab["</s>"],
                            forced_eos_token_id=vocab["</s>"], **ids)
        model = BartForConditionalGeneration(config)
    model.generation_config = GenerationConfig.from_model_config(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", params=["t5", "bart"])
def encoder_decoder(request, services, tmp_path_factory):
    from steps.base_model import prepare_base_model
    from steps.config import BaseModelConfig
    from steps.core.store import ArtifactStore

    folder = build_model(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, prepare_base_model(BaseModelConfig(source=str(folder)), ArtifactStore.from_env("shared"))


def dataset(store, tmp_path, model, rows: list[dict]):
    """Ingest -> validate -> scrub -> tokenize seq2seq records."""
    from steps.config import IngestConfig, ScrubConfig, ValidateConfig
    from steps.ingest import ingest_records
    from steps.scrub.step import scrub_records
    from steps.tokenize.step import tokenize_dataset
    from steps.validate import validate_records

    raw = ingest_records(IngestConfig(source=str(write_jsonl(tmp_path / "pairs.jsonl", rows))), store)
    validated = validate_records(ValidateConfig(record_kind="seq2seq"), raw, store)
    return tokenize_dataset(TOKENIZE, scrub_records(ScrubConfig(near_dedup=False), validated, store), model, store)


@pytest.fixture
def data(store, tmp_path, encoder_decoder):
    return dataset(store, tmp_path, encoder_decoder[1], pairs())


def settings(method: str, **extra) -> TrainConfig:
    lora = {"lora": LoraSettings(r=8, alpha=16, dropout=0.0)} if method == "lora" else {}
    return TrainConfig(**{"method": method, "max_steps": 40, "batch_size": 16, "learning_rate": 1e-2,
                          "warmup_steps": 2, "checkpoint_every": 0, "record_losses": False, **lora, **extra})


def test_seq2seq_records_go_with_an_encoder_decoder():
    from steps.core.errors import ConfigError

    params = PipelineParams.parse({"validate": {"record_kind": "seq2seq"}, "base_model": {"source": "tiny-random-t5"}})
    assert params.task == "seq2seq" and params.register_.metric == "perplexity"
    assert PipelineParams.parse({"validate": {"record_kind": "seq2seq"}, "base_model": {"source": "/models/t5"},
                                 "register": {"metric": "rouge_l"}}).register_.metric == "rouge_l"
    for wrong in ({"validate": {"record_kind": "seq2seq"}},  # the default base is a causal LM
                  {"base_model": {"source": "tiny-random-t5"}},  # chat records on an encoder-decoder
                  {"validate": {"record_kind": "seq2seq"}, "base_model": {"source": "tiny-random-t5"},
                   "train": {"method": "reft"}}):
        with pytest.raises(ConfigError):
            PipelineParams.parse(wrong)


def test_formats_and_instruction_pairs_read_as_seq2seq_records():
    from steps.core.records import record_form
    from steps.ingest.formats import formats_of

    assert formats_of({"input": "a", "target": "b"}) == {"seq2seq"}
    assert formats_of({"instruction": "a", "input": "b", "output": "c"}) == {"alpaca"}
    assert record_form({"input": "a", "target": "b"}, "seq2seq", 1) == {"id": "line-1", "input": "a", "target": "b"}
    alpaca = {"id": "x", "instruction": "Translate.", "input": "the cat", "output": "le chat", "system": "Be brief."}
    assert record_form(alpaca, "seq2seq", 1) == {"id": "x", "input": "Be brief.\n\nTranslate.\n\nthe cat",
                                                 "target": "le chat"}
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                         {"role": "user", "content": "how are you?"}, {"role": "assistant", "content": "fine"}]}
    expected = "user: hi\nassistant: hello\nuser: how are you?"
    assert record_form(chat, "seq2seq", 7) == {"id": "line-7", "input": expected,
                                               "target": "fine"}


def test_invalid_pairs_are_quarantined_by_rule(store, tmp_path):
    from helpers import validate_stats
    from steps.config import IngestConfig, ValidateConfig
    from steps.ingest import ingest_records
    from steps.validate import validate_records

    rows = pairs(200) + [{"id": "blank", "input": "a", "target": "  "}, {"id": "number", "input": 5, "target": "b"},
                         {"id": "chat", "messages": [{"role": "user", "content": "q"},
                                                     {"role": "assistant", "content": "a"}]}]
    raw = ingest_records(IngestConfig(source=str(write_jsonl(tmp_path / "p.jsonl", rows)), format="seq2seq"), store)
    validated = validate_records(ValidateConfig(record_kind="seq2seq", max_invalid_share=0.02), raw, store)
    stats = validate_stats(validated)
    assert stats["records"] == 201 and stats["quarantined"] == 2
    assert stats["quarantine_rules"] == {"target is not empty or blank": 1, "input is a string (not null)": 1}


def test_rows_learn_the_target_tokens_only(store, data, encoder_decoder):
    from transformers import AutoTokenizer

    arch, model = encoder_decoder
    tokenizer = AutoTokenizer.from_pretrained(store.download(model.base))
    assert data.stats["task"] == "seq2seq" and data.stats["eval_records"] > 0
    row = store.read_jsonl(data, "train.jsonl")[0]
    record = next(p for p in pairs() if p["id"] == row["id"])
    words = [tokenizer.convert_tokens_to_ids(w) for w in record["target"].split()]
    frame = ([] if arch == "t5" else [tokenizer.bos_token_id])
    assert row["labels"] == frame + words + [tokenizer.eos_token_id]
    assert tokenizer.decode(row["input_ids"], skip_special_tokens=True) == record["input"].replace(":", " :")
    prompt = store.read_jsonl(data, "eval_prompts.jsonl")[0]
    assert set(prompt) == {"id", "input", "reference"}


def test_the_loss_is_the_mean_over_target_tokens(store, data, encoder_decoder):
    """The batch loss is the cross-entropy of the decoder's predictions at the label positions (padding out),
    averaged over every target token of the micro-batch."""
    net = methods.prepare(settings("full"), store.download(encoder_decoder[1].base), "cpu", SEQ2SEQ).eval()
    rows = store.read_jsonl(data, "train.jsonl")[:4]
    rows[0] = {**rows[0], "labels": rows[0]["labels"][:3]}  # rows of different target lengths
    with torch.no_grad():
        loss, tokens, _ = seq2seq.seq2seq_loss(net, rows, 0, "cpu")
        sums, counts = zip(*seq2seq.row_nll(net, rows, 1, 0, "cpu"))  # one row at a time: no padding at all
    assert counts == tuple(len(r["labels"]) for r in rows)
    assert float(loss) == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
    assert tokens == sum(len(r["input_ids"]) + len(r["labels"]) for r in rows)


def test_lora_finds_the_attention_projections_of_each_architecture(store, encoder_decoder):
    arch, model = encoder_decoder
    net = methods.prepare(settings("lora"), store.download(model.base), "cpu", SEQ2SEQ)
    trained = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name, p in net.named_parameters() if p.requires_grad}
    assert trained == ({"q", "v"} if arch == "t5" else {"q_proj", "v_proj"})
    assert type(net).__name__ == "PeftModelForSeq2SeqLM"


@pytest.mark.parametrize("method", ["full", "lora"])
def test_training_beats_the_base_on_held_out_targets_and_reloads(store, data, encoder_decoder, method):
    arch, model = encoder_decoder
    tuned = train_model(settings(method), data, model, store)
    base, after = evaluate_model(EVAL, model, data, store), evaluate_model(EVAL, tuned, data, store)
    assert after.stats["perplexity"] < (0.5 if method == "full" else 0.9) * base.stats["perplexity"]
    for stats in (base.stats, after.stats):
        assert {"bleu", "chrf", "rouge_l", "eval_loss"} <= stats.keys() and stats["bleu_samples"] == 12
        assert stats["smoke"]["kind"] == "generation" and "reference_perplexity" not in stats
    assert after.stats["rouge_l"] > base.stats["rouge_l"]
    samples = store.read_jsonl(after, "samples.jsonl")
    assert len(samples) == 12 and all(s["prediction"] is not None for s in samples)
    # The trained weights reload into the same model: the same greedy targets.
    net = methods.load(store.download(model.base), store.download(tuned.adapter), "cpu")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(store.download(model.base))
    inputs = [p["input"] for p in store.read_jsonl(data, "eval_prompts.jsonl")[:12]]
    assert seq2seq.generate(net, tokenizer, inputs, EVAL.max_new_tokens, 16, "cpu") == [s["prediction"]
                                                                                       for s in samples]


def test_the_served_model_generates_and_exports(store, data, encoder_decoder, tmp_path):
    import types

    from steps.register.export import compare, merged_model, reload_folder, save_folder
    from steps.register.serving import ChatAdapterModel

    arch, model = encoder_decoder
    tuned = train_model(settings("lora", max_steps=30), data, model, store)
    base_dir = store.download(model.base)
    served = ChatAdapterModel()
    served.load_context(types.SimpleNamespace(model_config={"base_model_uri": str(base_dir), "max_seq_len": 32},
                                              artifacts={"trained": str(store.download(tuned.adapter)),
                                                         "tokenizer": str(base_dir)}))
    inputs = ["translate: the small cat eats the fish", "translate: the big dog sees the bread"]
    answers = served.predict(None, inputs)
    assert answers == seq2seq.generate(served.model, served.tokenizer, inputs, 64, 2, "cpu")
    assert all(isinstance(a, str) for a in answers) and any(answers)
    # export: the adapter merged into a plain *ForConditionalGeneration folder that answers the same
    version = tmp_path / "version"
    (version / "artifacts").mkdir(parents=True)
    (version / "artifacts" / "trained").symlink_to(store.download(tuned.adapter))
    (version / "artifacts" / "tokenizer").symlink_to(base_dir)
    net, tokenizer, task = merged_model(version, base_dir)
    save_folder(net, tokenizer, task, tmp_path / "export", "f32")
    report = compare(net, reload_folder(tmp_path / "export", task), tokenizer, task)
    assert report["max_logit_diff"] < 1e-4 and report["answers_agree"]


@pytest.mark.parametrize("encoder_decoder", ["t5"], indirect=True)  # one architecture: the loop's code path is one
def test_sigkill_mid_run_then_retry_ends_like_an_uninterrupted_run(store, data, encoder_decoder):
    from helpers import killed_and_resumed

    cfg = settings("full", max_steps=12, checkpoint_every=3, seed=5, dropout=0.1)
    (expected, reference), (got, resumed), start = killed_and_resumed(cfg, data, encoder_decoder[1], store)
    assert start is not None and 3 <= start < 12
    assert [a["loss"] for a in expected[start:]] == pytest.approx([b["loss"] for b in got[start:]], abs=1e-5)
    weights = [reference, resumed]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-6) for k in weights[0])


def test_rouge_l_is_the_lcs_f_measure():
    assert seq2seq.rouge_l(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(500 / 6)
    assert seq2seq.rouge_l(["a b", ""], ["a b", "x"]) == pytest.approx(50.0)
    assert seq2seq.rouge_l(["Hello, WORLD!"], ["hello world"]) == pytest.approx(100.0)
    assert seq2seq.rouge_l(["안녕 하세요"], ["안녕 친구"]) == pytest.approx(50.0)
    assert IGNORE not in seq2seq.collate([{"input_ids": [5, 6], "labels": [7]}], 0)["input_ids"].tolist()[0]
