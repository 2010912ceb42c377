"""PPO's arithmetic for RLHF on sampled completions (Ouyang et al. 2022; Ziegler et al. 2019), as TRL's
PPOTrainer computed it before its removal (trl 0.x ``ppo_trainer.py``; OpenRLHF computes the same):

- ``kl_rewards``: the per-token reward of a completion is ``-kl_coef * (logp - ref_logp)`` at every
  token (the KL penalty to the reference, the policy with its adapters off), plus the score of the
  reward model or function at the completion's last token.
- ``gae``: generalised advantage estimation over the completion tokens, backwards:
  ``delta_t = r_t + gamma * V_{t+1} - V_t``, ``A_t = delta_t + gamma * lam * A_{t+1}`` (``V`` past the last
  token is 0); returns ``A + V``; advantages whitened over the batch's tokens.
- ``policy_loss``: ``max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))`` per token, ``ratio =
  exp(logp - old_logp)``; ``value_loss``: ``0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)``;
  both averaged over completion tokens (``mask``).
- ``AdaptiveKL``: the KL coefficient moves toward a target KL (Ziegler et al. 2019):
  ``coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * steps / horizon``.

Every function takes [B, T] tensors over completion positions with a 0/1 ``mask``; checked against a
written-out computation (plain Python loops) in tests/steps/train/test_ppo.py. The training loop that
samples, scores and calls these (with a value head on the policy) is not wired yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def masked_mean(values: Any, mask: Any) -> Any:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def whiten(values: Any, mask: Any, shift_mean: bool = True) -> Any:
    """``values`` scaled to unit variance over the masked positions (and centred unless ``shift_mean`` is off)."""
    import torch

    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    count = mask.sum()
    if count > 1:  # unbiased, as TRL's masked_var
        var = var * count / (count - 1)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def kl_rewards(scores: Any, logps: Any, ref_logps: Any, mask: Any, kl_coef: float) -> tuple[Any, Any]:
    """(per-token rewards [B, T], per-token KL [B, T]): the KL penalty everywhere, the score at the last token."""
    import torch

    kl = (logps - ref_logps) * mask
    rewards = -kl_coef * kl
    lengths = mask.sum(dim=1).long()
    last = (lengths - 1).clamp(min=0)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards = rewards.clone()
    rewards[rows, last] += scores.to(rewards.dtype) * (lengths > 0).to(rewards.dtype)
    return rewards, kl


def gae(rewards: Any, values: Any, mask: Any, gamma: float = 1.0, lam: float = 0.95) -> tuple[Any, Any]:
    """(advantages, returns) [B, T]; positions outside ``mask`` hold 0 and stop the recursion."""
    import torch

    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m
        advantages[:, t] = running
        next_value = values[:, t] * m
    return advantages, advantages + values


def policy_loss(logps: Any, old_logps: Any, advantages: Any, mask: Any, epsilon: float) -> tuple[Any, dict]:
    """(loss, metrics: clip fraction, approximate KL to the sampling policy)."""
    import torch

    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(0.5 * (logps - old_logps) ** 2, mask)
    return loss, {"policy_clip_frac": float(clip_frac), "approx_kl": float(approx_kl)}


def value_loss(values: Any, old_values: Any, returns: Any, mask: Any, clip: float) -> tuple[Any, dict]:
    """(loss, metrics: value clip fraction)."""
    import torch

    clipped_values = torch.clamp(values, old_values - clip, old_values + clip)
    loss1, loss2 = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss1, loss2), mask)
    return loss, {"value_clip_frac": float(masked_mean((loss2 > loss1).float(), mask))}


@dataclass
class AdaptiveKL:
    """The KL coefficient, adapted toward ``target`` over ``horizon`` samples (Ziegler et al. 2019).

    A checkpoint stores ``value`` (``state``, ``load``), so a resumed run continues with it."""

    value: float
    target: float | None = None
    horizon: int = 10_000

    def update(self, kl: float, samples: int) -> float:
        if self.target:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * samples / self.horizon
        return self.value

    def state(self) -> dict[str, float]:
        return {"kl_coef": self.value}

    def load(self, state: dict[str, float]) -> None:
        self.value = float(state["kl_coef"])
