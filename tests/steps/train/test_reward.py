"""The reward model's Bradley-Terry loss (steps/train/reward.py), checked against TRL 1.16's RewardTrainer.

TRL's code is called, not re-typed: ``RewardTrainer.compute_loss`` runs on a bare instance
(``object.__new__``) given only the attributes it reads, once on given scores (a stand-in model
returning them) and once end to end on a tiny random Llama sequence classifier, batch as TRL's
collator builds it (chosen sequences, then rejected ones, right-padded).
"""

from __future__ import annotations

import copy
import os
import types
from collections import defaultdict

import pytest
import torch
from torch.testing import assert_close

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from trl.trainer.reward_trainer import RewardTrainer  # noqa: E402

from steps.config import PreferenceSettings  # noqa: E402
from steps.train.batching import collate  # noqa: E402
from steps.train.reward import bradley_terry_loss, pair_loss, pair_metrics, sides  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

VOCAB = 64
ACCELERATOR = types.SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t)


def trl_reward(center: float | None, model) -> RewardTrainer:
    """A bare RewardTrainer with the attributes ``compute_loss`` reads."""
    trainer = object.__new__(RewardTrainer)
    vars(trainer).update(model=model, accelerator=ACCELERATOR, args=types.SimpleNamespace(
        center_rewards_coefficient=center), _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    return trainer


class GivenScores(torch.nn.Module):
    """Stands in for a sequence classifier: returns the given scores as its one-output logits."""

    def __init__(self, scores: torch.Tensor):
        super().__init__()
        self.scores = scores

    def forward(self, **_: object) -> types.SimpleNamespace:
        return types.SimpleNamespace(logits=self.scores.unsqueeze(-1))


@pytest.mark.parametrize("center", [None, 0.01, 0.5])
def test_bradley_terry_loss_and_gradients_match_trl(center):
    g = torch.Generator().manual_seed(7)
    chosen, rejected = (torch.randn(6, generator=g) * 3 for _ in range(2))
    ours_c, ours_r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    ours = bradley_terry_loss(ours_c, ours_r, center)
    ours.backward()
    scores = torch.cat([chosen, rejected]).requires_grad_()
    model = GivenScores(scores).train()
    trainer = trl_reward(center, model)
    theirs = trainer.compute_loss(model, {"input_ids": torch.ones(12, 2, dtype=torch.long),
                                          "attention_mask": torch.ones(12, 2, dtype=torch.long)})
    theirs.backward()
    assert_close(ours, theirs)
    assert_close(torch.cat([ours_c.grad, ours_r.grad]), scores.grad)
    # Our evaluation metrics are TRL's logged accuracy and margin, and the loss without the centring term.
    metrics = pair_metrics(chosen.tolist(), rejected.tolist())
    assert metrics["reward_accuracy"] == pytest.approx(trainer._metrics["train"]["accuracy"][0], abs=1e-6)
    assert metrics["reward_margin"] == pytest.approx(trainer._metrics["train"]["margin"][0], abs=1e-5)
    assert metrics["eval_loss"] == pytest.approx(bradley_terry_loss(chosen, rejected).item(), abs=1e-5)


def tiny_scorer(seed: int):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                         num_labels=1)
    return LlamaForSequenceClassification(config)


def pairs(n: int, seed: int = 0) -> list[dict]:
    """Pairs with a shared prompt and answers of different lengths (so batches pad); no pad id inside."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda k: torch.randint(1, VOCAB, (k,), generator=g).tolist()  # noqa: E731
    rows = []
    for i in range(n):
        prompt = draw(3 + i % 3)
        rows.append({"input_ids": prompt + draw(2 + i % 4), "rejected_ids": prompt + draw(5 - i % 3)})
    return rows


@pytest.mark.parametrize("center", [None, 0.05])
def test_pair_loss_matches_trl_on_a_tiny_llama_scorer(center):
    rows = pairs(5)
    ours_model = tiny_scorer(3).train()
    theirs_model = copy.deepcopy(ours_model)
    loss, tokens, metrics = pair_loss(ours_model, rows, PreferenceSettings(loss="reward", center_rewards=center), 0,
                                      "cpu")
    loss.backward()
    batch = collate(sides(rows), 0)  # TRL's collator: chosen then rejected, right-padded with the pad id
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    trainer = trl_reward(center, theirs_model)
    theirs = trainer.compute_loss(theirs_model, inputs)
    theirs.backward()
    assert_close(loss, theirs)
    for (name, mine), (_, their) in zip(ours_model.named_parameters(), theirs_model.named_parameters()):
        assert_close(mine.grad, their.grad, msg=name)
    assert tokens == int(batch["attention_mask"].sum())
    assert metrics["reward_accuracy"] == pytest.approx(trainer._metrics["train"]["accuracy"][0])
    assert metrics["reward_margin"] == pytest.approx(trainer._metrics["train"]["margin"][0], abs=1e-6)
