"""Preference tuning losses: DPO and ORPO on (prompt, chosen, rejected) pairs.

Rows come from the tokenize step: ``input_ids``/``labels`` hold the chosen conversation,
``rejected_ids``/``rejected_labels`` the rejected one, prompt tokens masked (-100). A batch
of B pairs runs as one forward pass over 2B sequences (chosen first, then rejected).

- DPO (Rafailov et al. 2023, sigmoid loss): with summed answer log-probabilities ``pi`` of
  the policy and ``ref`` of the frozen base,
  ``loss = -log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r)))``; implicit rewards are
  ``beta * (pi - ref)``. Reference log-probabilities come from the base model, computed
  the first time a pair is used and kept with the row (``Reference``): for LoRA/QLoRA the
  policy itself with its adapters switched off (no second model in memory), for full and head
  a frozen copy of the base.
- ORPO (Hong et al. 2024): with length-normalised log-probabilities ``p_c``, ``p_r``,
  ``log_odds = (p_c - p_r) - (log(1 - e^p_c) - log(1 - e^p_r))`` and
  ``loss = NLL(chosen) - beta * log sigmoid(log_odds)``; no reference model. The NLL covers
  the chosen answer's tokens only, as in the paper and in our SFT; TRL's ORPOTrainer also
  counts the prompt tokens there.
Both follow TRL's formulas otherwise (checked against TRL 1.16 in tests/steps/train/test_preference.py).
"""

from __future__ import annotations

from typing import Any

from steps.config import PreferenceSettings
from steps.core.contract import IGNORE
from steps.train.batching import collate


def sides(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The 2B sequences of B pairs: chosen conversations, then rejected ones."""
    return ([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
            + [{"input_ids": r["rejected_ids"], "labels": r["rejected_labels"]} for r in rows])


def sequence_logps(logits: Any, labels: Any) -> tuple[Any, Any]:
    """Summed log-probability of each sequence's label tokens, and their count."""
    import torch

    targets = labels[:, 1:]
    mask = targets != IGNORE
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = torch.gather(logp, 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1), mask.sum(-1)


def forward_logps(net: Any, rows: list[dict[str, Any]], pad_id: int, device: str) -> tuple[Any, Any, int]:
    """(summed log-probs [2B], token counts [2B], tokens in the batch) for the pairs in ``rows``."""
    batch = {k: v.to(device) for k, v in collate(sides(rows), pad_id).items()}
    logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps, counts = sequence_logps(logits, batch["labels"])
    return logps, counts, int(batch["attention_mask"].sum())


def dpo_loss(chosen: Any, rejected: Any, ref_chosen: Any, ref_rejected: Any, beta: float) -> tuple[Any, Any, Any]:
    """(mean loss, chosen rewards, rejected rewards) from summed log-probabilities."""
    import torch.nn.functional as F

    logits = (chosen - rejected) - (ref_chosen - ref_rejected)
    loss = -F.logsigmoid(beta * logits).mean()
    return loss, beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()


def log1mexp(x: Any) -> Any:
    """log(1 - e^x) for x < 0, precise near 0 as well as far below it."""
    import math

    import torch

    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(chosen_mean: Any, rejected_mean: Any, chosen_nll: Any, beta: float) -> tuple[Any, Any]:
    """(loss, log odds ratio per pair) from length-normalised log-probabilities and the chosen NLL."""
    import torch.nn.functional as F

    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    return chosen_nll - beta * F.logsigmoid(log_odds).mean(), log_odds.detach()


def pair_loss(net: Any, rows: list[dict[str, Any]], settings: PreferenceSettings, pad_id: int, device: str
              ) -> tuple[Any, int, dict[str, float]]:
    """The configured loss for a batch of pairs, its token count and batch metrics."""
    import torch

    logps, counts, tokens = forward_logps(net, rows, pad_id, device)
    n = len(rows)
    chosen, rejected = logps[:n], logps[n:]
    if settings.loss == "dpo":
        ref = torch.tensor([[r["ref_chosen"], r["ref_rejected"]] for r in rows], device=device, dtype=logps.dtype)
        loss, good, bad = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], settings.beta)
        metrics = {"reward_accuracy": (good > bad).float().mean().item(), "reward_margin": (good - bad).mean().item()}
    else:
        chosen_mean, rejected_mean = chosen / counts[:n].clamp(min=1), rejected / counts[n:].clamp(min=1)
        nll = -chosen.sum() / counts[:n].sum().clamp(min=1)
        loss, log_odds = orpo_loss(chosen_mean, rejected_mean, nll, settings.beta)
        metrics = {"log_odds": log_odds.mean().item(), "chosen_nll": nll.item()}
    return loss, tokens, metrics


class Reference:
    """DPO's frozen reference: fills ``ref_chosen`` / ``ref_rejected`` of rows that lack them."""

    def __init__(self, net: Any, base_dir: Any, device: str, batch_size: int):
        self.net, self.device, self.batch_size = net, device, batch_size
        self.frozen = None
        if not hasattr(net, "disable_adapter"):  # full or head: the weights themselves train
            from steps.train.methods.common import load_base

            self.frozen = load_base(None, base_dir, device).eval().requires_grad_(False)

    def fill(self, rows: list[dict[str, Any]], pad_id: int) -> None:
        import contextlib

        missing = [r for r in rows if "ref_chosen" not in r]
        if not missing:
            return
        if self.frozen is not None:
            reference_logps(self.frozen, missing, self.batch_size, pad_id, self.device, progress=False)
            return
        was_training = self.net.training
        self.net.eval()  # no dropout in the reference
        try:
            with self.net.disable_adapter() if hasattr(self.net, "disable_adapter") else contextlib.nullcontext():
                reference_logps(self.net, missing, self.batch_size, pad_id, self.device, progress=False)
        finally:
            self.net.train(was_training)


def reference_logps(net: Any, rows: list[dict[str, Any]], batch_size: int, pad_id: int, device: str,
                    progress: bool = True) -> None:
    """Add ``ref_chosen`` / ``ref_rejected`` (summed log-probs of the frozen base) to each row, in place."""
    import torch

    from steps.core.progress import progress as bar

    with torch.no_grad():
        for i in bar(range(0, len(rows), batch_size), desc="reference log-probs", unit="batch", disable=not progress):
            chunk = rows[i : i + batch_size]
            logps, _, _ = forward_logps(net, chunk, pad_id, device)
            for row, good, bad in zip(chunk, logps[: len(chunk)].tolist(), logps[len(chunk):].tolist()):
                row["ref_chosen"], row["ref_rejected"] = good, bad
