"""Reward model: a scalar head scores prompt + answer, trained on preference pairs (Bradley-Terry).

Rows come from the tokenize step with ``tokenize.reward_model``: ``input_ids`` is the chosen answer with
its prompt, ``rejected_ids`` the rejected one (a causal LM: the conversation rendered with the chat
template; an encoder: the text pair ``[CLS] prompt [SEP] answer [SEP]``). The model is the base with a
one-output sequence head (``AutoModelForSequenceClassification``, ``num_labels=1``): an encoder scores
its pooled ``[CLS]``, a causal LM its last token that is not the pad token (transformers' rule; the pad
id is the EOS when the config has none). A batch of B pairs runs as one forward pass over 2B
right-padded sequences (chosen first, then rejected).

    loss = -log sigmoid(r_chosen - r_rejected)  [+ center_rewards * mean((r_chosen + r_rejected)^2)]

as TRL 1.16's RewardTrainer computes it (``center_rewards`` is its ``center_rewards_coefficient``;
checked in tests/steps/train/test_reward.py). Batch metrics: ``reward_accuracy`` (share of pairs with
r_chosen > r_rejected) and ``reward_margin`` (mean r_chosen - r_rejected).
"""

from __future__ import annotations

from typing import Any

from steps.config import PreferenceSettings
from steps.train.batching import collate


def sides(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The 2B sequences of B pairs: chosen ones, then rejected ones."""
    return [{"input_ids": r["input_ids"]} for r in rows] + [{"input_ids": r["rejected_ids"]} for r in rows]


def pair_scores(net: Any, rows: list[dict[str, Any]], pad_id: int, device: str) -> tuple[Any, Any, int]:
    """(scores of the chosen sequences [B], of the rejected ones [B], tokens in the batch)."""
    batch = {k: v.to(device) for k, v in collate(sides(rows), pad_id).items()}
    scores = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float()
    n = len(rows)
    return scores[:n], scores[n:], int(batch["attention_mask"].sum())


def bradley_terry_loss(chosen: Any, rejected: Any, center_rewards: float | None = None) -> Any:
    """Mean -log sigmoid(r_chosen - r_rejected), plus the optional centring term."""
    import torch

    loss = bradley_terry_loss_per_pair(chosen, rejected).mean()
    if center_rewards is not None:
        loss = loss + center_rewards * torch.mean((chosen + rejected) ** 2)
    return loss


def bradley_terry_loss_per_pair(chosen: Any, rejected: Any) -> Any:
    """-log sigmoid(r_chosen - r_rejected) of each pair."""
    import torch.nn.functional as F

    return -F.logsigmoid(chosen - rejected)


def pair_loss(net: Any, rows: list[dict[str, Any]], settings: PreferenceSettings, pad_id: int, device: str
              ) -> tuple[Any, int, dict[str, float]]:
    """The reward loss of a batch of pairs, its token count and batch metrics."""
    chosen, rejected, tokens = pair_scores(net, rows, pad_id, device)
    loss = bradley_terry_loss(chosen, rejected, settings.center_rewards)
    margin = (chosen - rejected).detach()
    return loss, tokens, {"reward_accuracy": (margin > 0).float().mean().item(), "reward_margin": margin.mean().item()}


def score_pairs(net: Any, rows: list[dict[str, Any]], batch_size: int, pad_id: int, device: str
                ) -> tuple[list[float], list[float]]:
    """Scores of every pair's chosen and rejected sequence (no gradients)."""
    import torch

    chosen: list[float] = []
    rejected: list[float] = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            good, bad, _ = pair_scores(net, rows[i : i + batch_size], pad_id, device)
            chosen += good.tolist()
            rejected += bad.tolist()
    return chosen, rejected


def pair_metrics(chosen: list[float], rejected: list[float]) -> dict[str, float]:
    """reward_accuracy, reward_margin and the mean Bradley-Terry loss (eval_loss) of scored pairs."""
    import math

    margins = [c - r for c, r in zip(chosen, rejected)]
    n = max(len(margins), 1)
    # -log sigmoid(m) = softplus(-m), computed without overflow for large |m|
    losses = [max(-m, 0.0) + math.log1p(math.exp(-abs(m))) for m in margins]
    return {"reward_accuracy": round(sum(m > 0 for m in margins) / n, 6), "reward_margin": round(sum(margins) / n, 6),
            "eval_loss": round(sum(losses) / n, 6)}


def score_items(net: Any, tokenizer: Any, items: list[Any], pair_input: str, max_seq_len: int, device: str,
                batch_size: int = 16) -> list[float]:
    """A reward model's score of each item: a plain text as it is (the tokenizer's special tokens), or a
    (prompt, response) tuple encoded as tokenize encoded the training pairs (``reward_ids``); each cut at
    ``max_seq_len``. Used by the served model and by RL's ``model`` reward."""
    import torch

    from steps.tokenize.encode import reward_ids

    rows = []
    for item in items:
        if isinstance(item, tuple):
            ids, _ = reward_ids(tokenizer, item[0], item[1], pair_input, max_seq_len)
        else:
            ids = tokenizer(item, truncation=True, max_length=max_seq_len, verbose=False)["input_ids"]
        rows.append({"input_ids": ids})
    pad_id = net.config.pad_token_id or 0
    scores: list[float] = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = collate(rows[i : i + batch_size], pad_id)
            logits = net(input_ids=batch["input_ids"].to(device),
                         attention_mask=batch["attention_mask"].to(device)).logits
            scores += logits[:, 0].float().tolist()
    return scores
