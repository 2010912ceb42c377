"""LoReFT: only the interventions train, they edit the first/last prompt positions (on real
tokens, left or right padded), the base stays bit-identical, and save/load reproduces logits."""

from __future__ import annotations

import pytest
import torch

from steps.config import TrainConfig
from steps.core.errors import ConfigError
from steps.train.methods import reft
from steps.train.methods.common import load_base

CFG = TrainConfig(method="reft", reft={"layers": [0, -1], "rank": 4, "first_positions": 2, "last_positions": 2})
PROMPT = 5  # tokens of each row's prompt in the fixed batch


@pytest.fixture(scope="session")
def batch(batch):
    """The shared batch with a prompt: reft edits prompt positions, so labels skip the first tokens."""
    return {**batch, "labels": batch["labels"].clone().index_fill_(1, torch.arange(PROMPT), -100)}


def mask_rows(attention_mask, labels=None, first=2, last=2) -> list[list[int]]:
    labels = None if labels is None else torch.tensor(labels)
    return reft.intervention_mask(torch.tensor(attention_mask), labels, first, last).int().tolist()


def test_only_the_interventions_train(base_dir):
    model = reft.prepare(CFG, base_dir, "cpu")
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith("interventions.") for n in trainable)
    hidden, rank = model.config.hidden_size, CFG.reft.rank
    assert sum(trainable.values()) == 2 * (2 * rank * hidden + rank)


def test_training_lowers_the_loss_and_leaves_the_base_bit_identical(base_dir, train):
    model = reft.prepare(CFG, base_dir, "cpu")
    before = {k: v.clone() for k, v in model.base.state_dict().items()}
    # torch's AdamW decays weights by default (0.01): the rotation must stay orthonormal under decay
    losses = train(model, steps=10)
    assert losses[-1] < losses[0] - 0.05
    assert all(torch.equal(v, before[k]) for k, v in model.base.state_dict().items())
    for intervention in model.interventions:
        r = intervention.rotate.weight
        torch.testing.assert_close(r @ r.T, torch.eye(CFG.reft.rank), rtol=0, atol=1e-5)


def test_mask_right_padded_rows_with_labels():
    # prompts of 6 and 3 real tokens; row 1 is right-padded
    attention = [[1] * 8, [1] * 5 + [0] * 3]
    labels = [[-100] * 6 + [7, 8], [-100] * 3 + [4, 5] + [-100] * 3]
    assert mask_rows(attention, labels) == [[1, 1, 0, 0, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]


def test_mask_left_padded_rows_without_labels_use_all_real_tokens():
    attention = [[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9]
    assert mask_rows(attention, first=1, last=2) == [[0, 0, 0, 1, 0, 0, 0, 1, 1], [1, 0, 0, 0, 0, 0, 0, 1, 1]]


def test_mask_short_prompts_overlap_and_rows_without_prompt_get_nothing():
    attention = [[1, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 0]]
    labels = [[-100, -100, 3, 4], [-100, -100, -100, 5], [1, 2, 3, -100]]
    assert mask_rows(attention, labels, first=3, last=3) == [[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert mask_rows(attention, labels, first=0, last=0) == [[0] * 4] * 3


def test_the_edit_reaches_only_intervened_positions_and_later_ones(base_dir):
    cfg = TrainConfig(method="reft", reft={"layers": [0], "first_positions": 0, "last_positions": 2})
    model = reft.prepare(cfg, base_dir, "cpu").eval()
    base = load_base(None, base_dir, "cpu").eval()
    ids = torch.arange(100, 110).unsqueeze(0)
    labels = ids.clone().index_fill_(1, torch.arange(6), -100)  # prompt 0..5: edits at 4 and 5
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        edited, plain = model(**inputs, labels=labels).logits, base(**inputs).logits
    assert torch.equal(edited[0, :4], plain[0, :4])
    assert all((edited[0, t] - plain[0, t]).abs().max() > 1e-4 for t in range(4, 10))


def test_positions_follow_real_tokens_under_left_and_right_padding(base_dir, tiny_tokenizer):
    model = reft.prepare(CFG, base_dir, "cpu").eval()
    texts = ["Hi", "Tell me a story about a dragon."]
    alone = [tiny_tokenizer(t, return_tensors="pt") for t in texts]
    with torch.no_grad():
        expected = [model(**enc).logits[0] for enc in alone]
        for side in ("left", "right"):
            enc = tiny_tokenizer(texts, padding=True, padding_side=side, return_tensors="pt")
            assert enc["attention_mask"][0, 0 if side == "left" else -1] == 0
            logits = model(**enc).logits
            for row, want in enumerate(expected):
                real = enc["attention_mask"][row].bool()
                torch.testing.assert_close(logits[row][real], want, rtol=1e-4, atol=1e-4)


def test_save_load_reproduces_logits_and_generate_edits_only_the_prefill(base_dir, train, logits, tiny_tokenizer,
                                                                         tmp_path):
    model = reft.prepare(CFG, base_dir, "cpu")
    train(model, steps=3)
    reft.save(CFG, model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"reft.safetensors", "reft.json"}
    loaded = reft.load(CFG, base_dir, tmp_path, "cpu").eval()
    assert torch.equal(logits(loaded), logits(model))

    texts = ["What is two plus two?", "Hello"]
    enc = tiny_tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
    assert enc["attention_mask"][1, 0] == 0
    out = loaded.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
    assert out.shape == (2, enc["input_ids"].shape[1] + 5)
    # each row as generated alone: an intervened prefill, then plain base decoding from its cache
    base = load_base(None, base_dir, "cpu").eval()
    for row, text in enumerate(texts):
        ids = tiny_tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            step = loaded(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
            tokens = [int(step.logits[0, -1].argmax())]
            for _ in range(4):
                seen = ids.shape[1] + len(tokens)
                step = base(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=step.past_key_values,
                            attention_mask=torch.ones(1, seen, dtype=torch.long), use_cache=True)
                tokens.append(int(step.logits[0, -1].argmax()))
        assert out[row, -5:].tolist() == tokens


def test_gradient_checkpointing_gives_the_same_gradients(base_dir, batch):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same initial interventions
        model = reft.prepare(CFG, base_dir, "cpu")
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(**batch).loss.backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain)


def test_a_layer_the_model_lacks_is_a_config_error(base_dir):
    cfg = TrainConfig(method="reft", reft={"layers": [0, -3]})
    with pytest.raises(ConfigError, match="layer -3 does not exist; the base model has 2 layers"):
        reft.prepare(cfg, base_dir, "cpu")
