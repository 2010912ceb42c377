"""Masked-LM domain adaptation (text records on an encoder, task mlm): framed blocks with word boundaries,
dynamic 80/10/10 masking, the loss on masked positions only, every method, held-out masked accuracy and
pseudo-perplexity against the seeded base head, the served fill-mask, and resume after SIGKILL."""

from __future__ import annotations

import random

import pytest
import torch

from helpers import write_jsonl
from steps.config import (
    EvaluateConfig,
    HeadSettings,
    LoraSettings,
    MlmSettings,
    PipelineParams,
    TokenizeConfig,
    TrainConfig,
)
from steps.core.contract import IGNORE, Task
from steps.evaluate import evaluate_model
from steps.train import methods, mlm
from steps.train.step import train_model

EVAL = EvaluateConfig(max_records=32, batch_size=16, pseudo_perplexity_tokens=64)
QUICK = EvaluateConfig(max_records=8, batch_size=16, pseudo_perplexity_tokens=0)
TOKENIZE = TokenizeConfig(eval_fraction=0.25, max_seq_len=32, leakage_threshold=None)  # alike on purpose
ANIMALS, PLACES = ["cat", "dog", "bird", "horse"], ["garden", "kitchen", "river", "meadow"]


def documents(n: int = 40) -> list[dict]:
    """Repetitive English: each animal always goes to its own place, so a model can learn to fill either."""
    rng = random.Random(5)
    docs = []
    for i in range(n):
        sentences = []
        for _ in range(6):
            k = rng.randrange(len(ANIMALS))
            sentences.append(f"the {ANIMALS[k]} walks to the {PLACES[k]} every morning.")
        docs.append({"id": f"doc-{i:02d}", "text": " ".join(sentences)})
    return docs


def settings(method: str, **extra) -> TrainConfig:
    sections = {"lora": {"lora": LoraSettings(r=4, alpha=8, dropout=0.0)},
                "head": {"head": HeadSettings(trainable_layers=1)}}.get(method, {})
    return TrainConfig(**{"method": method, "max_steps": 30, "batch_size": 8, "learning_rate": 1e-2,
                          "warmup_steps": 2, "checkpoint_every": 0, "record_losses": False, **sections, **extra})


def text_dataset(store, tmp_path, model, rows: list[dict]):
    """Ingest -> validate -> scrub (no near dedup: the documents are alike on purpose) -> tokenize text records."""
    from steps.config import IngestConfig, ScrubConfig, ValidateConfig
    from steps.ingest import ingest_records
    from steps.scrub.step import scrub_records
    from steps.tokenize.step import tokenize_dataset
    from steps.validate import validate_records

    raw = ingest_records(IngestConfig(source=str(write_jsonl(tmp_path / "texts.jsonl", rows))), store)
    clean = scrub_records(ScrubConfig(near_dedup=False), validate_records(ValidateConfig(record_kind="text"), raw,
                                                                          store), store)
    return tokenize_dataset(TOKENIZE, clean, model, store)


@pytest.fixture
def texts(store, tmp_path, tiny_encoder):
    return text_dataset(store, tmp_path, tiny_encoder, documents())


def test_text_records_on_an_encoder_are_masked_lm():
    params = PipelineParams.parse({"validate": {"record_kind": "text"}, "base_model": {"source": "all-minilm-l6-v2"},
                                   "train": {"method": "full", "mlm": {"whole_word": True}}})
    assert params.task == "mlm" and params.register_.metric == "masked_accuracy"
    assert PipelineParams.parse(params.model_dump(by_alias=True)) == params
    folder = PipelineParams.parse({"validate": {"record_kind": "text"}, "base_model": {"source": "/models/any"},
                                   "register": {"metric": "masked_accuracy"}})  # an encoder or a causal LM
    assert folder.task == "cpt" and folder.register_.metric == "masked_accuracy"
    from steps.core.errors import ConfigError

    for sections, message in [
        ({"train": {"mlm": {"probability": 0.3}}}, "train.mlm settings apply to text records on an encoder"),
        ({"validate": {"record_kind": "text"}, "train": {"mlm": {"probability": 0.3}}}, "apply to text records"),
        ({"validate": {"record_kind": "text"}, "base_model": {"source": "tiny-random-bert"},
          "train": {"method": "qlora"}}, "masked-LM .* trains with full, head, lora"),
        ({"validate": {"record_kind": "text"}, "base_model": {"source": "tiny-random-bert"},
          "train": {"packing": True}}, "not masked-LM"),
        ({"validate": {"record_kind": "text"}, "base_model": {"source": "tiny-random-bert"},
          "register": {"metric": "perplexity"}}, "not measured"),
        ({"train": {"mlm": {"mask_replace_prob": 0.9, "random_replace_prob": 0.2}}}, "more than 1"),
    ]:
        with pytest.raises(ConfigError, match=message):
            PipelineParams.parse(sections)


def test_blocks_are_framed_with_each_tokens_word(store, texts, tiny_encoder):
    from transformers import AutoTokenizer

    from steps.tokenize.split import in_eval

    tokenizer = AutoTokenizer.from_pretrained(store.download(tiny_encoder.base))
    assert texts.stats["task"] == "mlm" and texts.stats["mask_token_id"] == tokenizer.mask_token_id
    rows = store.read_jsonl(texts, "train.jsonl")
    assert rows and all(len(r["input_ids"]) == len(r["word_ids"]) == 32 and "labels" not in r for r in rows)
    assert all(r["input_ids"][0] == tokenizer.cls_token_id and r["input_ids"][-1] == tokenizer.sep_token_id
               and r["word_ids"][0] is None and r["word_ids"][-1] is None for r in rows)
    # The bodies are the train documents in order, joined by [SEP] (special: no word); words as the tokenizer says.
    docs = [d for d in documents() if not in_eval(d["id"], TOKENIZE)]
    body = [t for r in rows for t in r["input_ids"][1:-1]]
    first = tokenizer(docs[0]["text"], add_special_tokens=False)
    n = len(first["input_ids"])
    assert body[:n] == first["input_ids"] and body[n] == tokenizer.sep_token_id
    words = rows[0]["word_ids"][1:-1]
    assert words == [w - first.word_ids()[0] for w in first.word_ids()][:30]
    separators = [i for i, t in enumerate(body) if t == tokenizer.sep_token_id]
    assert separators and all([w for r in rows for w in r["word_ids"][1:-1]][i] is None for i in separators)
    assert texts.stats["train_records"] == len(rows) and texts.stats["train_tokens"] == 32 * len(rows)


def synthetic_words(rows: int = 64, width: int = 256, seed: int = 0) -> torch.Tensor:
    """Word ids as blocks have them: -1 at [CLS], [SEP] and trailing padding, words of 1 to 4 pieces."""
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        length = rng.randrange(width // 2, width - 1)
        words, word = [-1], 0
        while len(words) < length - 1:
            words += [word] * rng.randint(1, 4)
            word += 1
            if rng.random() < 0.05:
                words.append(-1)  # a [SEP] between documents
        out.append((words[:length - 1] + [-1] * (width - length + 1))[:width])
    return torch.tensor(out)


def test_dynamic_masking_is_15_percent_80_10_10_never_special():
    words = synthetic_words()
    ids = torch.randint(1000, 2000, words.shape)
    torch.manual_seed(0)
    inputs, labels = mlm.mask_tokens(ids, words, MlmSettings(), mask_token_id=103, vocab_size=30522)
    chosen = labels != IGNORE
    maskable = words >= 0
    assert not (chosen & ~maskable).any()  # special tokens and padding never
    assert abs(chosen.sum() / maskable.sum() - 0.15) < 0.01
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(inputs[~chosen], ids[~chosen])
    masked = (inputs == 103) & chosen
    changed = chosen & (inputs != ids)
    n = chosen.sum()
    assert abs(masked.sum() / n - 0.8) < 0.02
    assert abs((changed & ~masked).sum() / n - 0.1) < 0.02  # random tokens (rarely the original id)
    assert abs((~changed).logical_and(chosen).sum() / n - 0.1) < 0.02
    # torch's global RNG: the same state masks the same way (what a checkpoint restores).
    torch.manual_seed(0)
    again, _ = mlm.mask_tokens(ids, words, MlmSettings(), mask_token_id=103, vocab_size=30522)
    assert torch.equal(again, inputs)


def test_whole_word_masking_chooses_every_piece_of_a_word():
    words = synthetic_words(seed=1)
    chosen = mlm.choose(words, 0.15, True, torch.Generator().manual_seed(3))
    assert not (chosen & (words < 0)).any()
    for row, picks in zip(words.tolist(), chosen.tolist()):
        by_word: dict[int, set[bool]] = {}
        for w, p in zip(row, picks):
            if w >= 0:
                by_word.setdefault(w, set()).add(p)
        assert all(len(v) == 1 for v in by_word.values())  # a word is chosen whole or not at all
    assert abs(chosen.sum() / (words >= 0).sum() - 0.15) < 0.02
    assert (chosen != mlm.choose(words, 0.15, False, torch.Generator().manual_seed(3))).any()


def test_the_loss_counts_the_masked_positions_only(store, texts, tiny_encoder):
    net = methods.prepare(settings("full"), store.download(tiny_encoder.base), "cpu", Task.of_data(texts.stats))
    net.eval()  # no dropout: the forward is a function of the inputs
    rows = store.read_jsonl(texts, "train.jsonl")[:4]
    torch.manual_seed(7)
    loss, tokens, metrics = mlm.masked_loss(net, rows, MlmSettings(), Task.of_data(texts.stats), 0, "cpu")
    torch.manual_seed(7)
    ids = torch.tensor([r["input_ids"] for r in rows])
    inputs, labels = mlm.mask_tokens(ids, mlm.word_tensor(rows, 32), MlmSettings(), 103, net.config.vocab_size)
    logits = net(input_ids=inputs).logits
    chosen = labels != IGNORE
    expected = torch.nn.functional.cross_entropy(logits[chosen], labels[chosen])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and tokens == 4 * 32
    right = (logits[chosen].argmax(-1) == labels[chosen]).float().mean()
    assert metrics["masked_accuracy"] == pytest.approx(float(right))
    # Pseudo-perplexity: each token masked in turn, scored with the rest of its block visible.
    total, count = mlm.pseudo_nll(net, rows[:1], 5, 103, 2, "cpu")
    positions = [t for t, w in enumerate(rows[0]["word_ids"]) if w is not None][:5]
    expected = 0.0
    for t in positions:
        masked = ids[:1].clone()
        masked[0, t] = 103
        expected -= float(torch.log_softmax(net(input_ids=masked).logits[0, t], -1)[ids[0, t]])
    assert count == 5 and total == pytest.approx(expected, rel=1e-5)


def test_training_beats_the_base_on_held_out_masked_tokens(store, texts, tiny_encoder):
    tuned = train_model(settings("full"), texts, tiny_encoder, store)
    before = evaluate_model(EVAL, tiny_encoder, texts, store).stats
    after = evaluate_model(EVAL, tuned, texts, store).stats
    log = store.read_json(tuned.adapter, "train_log.json")
    assert log[-1]["loss"] < log[0]["loss"] and "masked_accuracy" in log[0]
    assert before["task"] == after["task"] == "mlm" and after["masked_tokens"] == before["masked_tokens"] > 50
    assert after["masked_accuracy"] > before["masked_accuracy"] and after["masked_accuracy"] >= 0.1
    assert after["eval_loss"] < before["eval_loss"] and after["pseudo_perplexity"] < before["pseudo_perplexity"]
    assert after["pseudo_perplexity_tokens"] == 64 and "perplexity" not in after and "reference_perplexity" not in after
    assert after["smoke"]["kind"] == "fill_mask" and after["smoke_passed"]
    assert all(p["finite"] and p["predicted"] for p in after["smoke"]["blocks"])


def test_the_base_evaluation_scores_the_head_training_starts_from(store, texts, tiny_encoder):
    """tiny-random-bert, like all-MiniLM-L6-v2, was saved without a masked-LM head: it is seeded on its own."""
    base = evaluate_model(EVAL, tiny_encoder, texts, store).stats
    rows = store.read_jsonl(texts, "eval.jsonl")[:EVAL.max_records]
    for seed in (0, 42):
        torch.manual_seed(seed)
        net = methods.prepare(settings("full", seed=seed), store.download(tiny_encoder.base), "cpu",
                              Task.of_data(texts.stats)).eval()
        scores = mlm.masked_scores(net, rows, 103, 16, 0, "cpu")
        assert sum(s[2] for s in scores) / sum(s[1] for s in scores) == pytest.approx(base["masked_accuracy"], abs=1e-6)
        assert sum(s[0] for s in scores) / sum(s[1] for s in scores) == pytest.approx(base["eval_loss"], abs=1e-4)


@pytest.mark.parametrize("method", ["full", "head", "lora"])
def test_every_method_trains_a_masked_lm_that_reloads(store, texts, tiny_encoder, method):
    from safetensors.torch import load_file

    tuned = train_model(settings(method, max_steps=6, record_losses=method == "full"), texts, tiny_encoder, store)
    folder, base_dir = store.download(tuned.adapter), store.download(tiny_encoder.base)
    assert methods.task_of(folder) == Task(kind="mlm", mask_token_id=103)
    report = store.read_json(tuned.adapter, "train_report.json")
    assert (report["trainable_params"] < report["total_params"] / 2) == (method != "full")
    net = methods.load(base_dir, folder, "cpu")
    rows = store.read_jsonl(texts, "eval.jsonl")[:QUICK.max_records]
    scores = mlm.masked_scores(net, rows, 103, 16, 0, "cpu")
    candidate = evaluate_model(QUICK, tuned, texts, store).stats
    base = evaluate_model(QUICK, tiny_encoder, texts, store).stats
    accuracy = sum(s[2] for s in scores) / sum(s[1] for s in scores)
    assert accuracy == pytest.approx(candidate["masked_accuracy"], abs=1e-6)
    assert candidate["eval_loss"] != base["eval_loss"]  # the trained weights were applied
    embeddings = load_file(base_dir / "model.safetensors")["embeddings.word_embeddings.weight"]
    same = torch.equal(net.get_input_embeddings().weight.detach(), embeddings)
    assert same == (method != "full")  # the head's output projection is tied to the embeddings: lora/head leave both
    assert net.get_output_embeddings().weight.data_ptr() == net.get_input_embeddings().weight.data_ptr()
    if method == "head":
        names = set(load_file(folder / "head.safetensors"))
        assert {"cls.predictions.transform.dense.weight", "cls.predictions.bias"} <= names
        assert all(n.startswith(("cls.predictions.", "bert.encoder.layer.1.")) for n in names)
    if method == "lora":
        names = set(load_file(folder / "adapter_model.safetensors"))
        assert any("transform.dense" in n for n in names) and any("lora_A" in n for n in names)
        assert not any("word_embeddings" in n or "decoder" in n for n in names)
    if method == "full":  # record losses: each block's NLL on its fixed masked positions
        losses = store.read_jsonl(tuned.adapter, "record_losses.jsonl")
        evals = {r["id"]: r for r in losses if r["split"] == "eval"}
        assert evals[rows[0]["id"]]["tokens"] == scores[0][1]
        assert evals[rows[0]["id"]]["loss"] == pytest.approx(scores[0][0] / scores[0][1], abs=1e-5)


def test_sigkill_mid_run_then_retry_masks_and_ends_like_an_uninterrupted_run(store, texts, tiny_encoder):
    """The masks come from torch's global RNG, which the checkpoint saves (with dropout's)."""
    from helpers import killed_and_resumed

    cfg = settings("full", max_steps=12, checkpoint_every=3, mlm=MlmSettings(whole_word=True), seed=5)
    (expected, reference), (got, resumed), start = killed_and_resumed(cfg, texts, tiny_encoder, store)
    assert start is not None and 3 <= start < 12
    for a, b in zip(expected[start:], got[start:]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["masked_accuracy"] == b["masked_accuracy"]
    weights = [reference, resumed]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-6) for k in weights[0])


def test_the_served_model_fills_the_mask_tokens(store, texts, tiny_encoder):
    import types

    from steps.register.serving import ChatAdapterModel

    tuned = train_model(settings("lora", max_steps=4), texts, tiny_encoder, store)
    base_dir = store.download(tiny_encoder.base)
    served = ChatAdapterModel()
    served.load_context(types.SimpleNamespace(model_config={"base_model_uri": str(base_dir)}, artifacts={
        "trained": str(store.download(tuned.adapter)), "tokenizer": str(base_dir)}))
    texts_in = ["the cat walks to the [MASK] every morning.", "the [MASK] walks to the river every [MASK].", "no mask"]
    filled = served.predict(None, texts_in)
    net = methods.load(base_dir, store.download(tuned.adapter), "cpu")
    ids = served.tokenizer(texts_in[0], return_tensors="pt")["input_ids"]
    at = int((ids[0] == 103).nonzero())
    top = served.tokenizer.decode([int(net(input_ids=ids).logits[0, at].argmax())])
    assert filled[0] == f"the cat walks to the {top} every morning."
    assert "[MASK]" not in filled[1] and filled[1].startswith("the ") and filled[2] == "no mask"
