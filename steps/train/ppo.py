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
written-out computation (plain Python loops) in tests/steps/train/test_ppo.py.

``PpoRollout`` is ``train.rl.algorithm: ppo`` in the one training loop (steps/train/step.py): per step it
samples ``prompts_per_step`` x ``group_size`` completions (steps/train/rl.py), scores them (a reward
function or a registered reward model), computes the sampling policy's log-probs and values, the
reference's log-probs, the KL-in-reward and GAE, then takes ``iterations`` clipped updates of the policy
and the value head (``loss = policy_loss + value_coef * value_loss``). The value head is a linear layer on
the policy's last hidden state (shared trunk, as TRL's ``AutoModelForCausalLMWithValueHead``), zero at
start; it is trained and checkpointed with the policy's tensors but not saved with the model. A
checkpoint also keeps the adaptive KL coefficient (``state``), so a resumed run continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from steps.config import RlSettings
from steps.train.rl import Batch, Rollout, token_logps


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
    return loss, {"policy_clip_frac": clip_frac.item(), "approx_kl": approx_kl.item()}


def value_loss(values: Any, old_values: Any, returns: Any, mask: Any, clip: float) -> tuple[Any, dict]:
    """(loss, metrics: value clip fraction)."""
    import torch

    clipped_values = torch.clamp(values, old_values - clip, old_values + clip)
    loss1, loss2 = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss1, loss2), mask)
    return loss, {"value_clip_frac": masked_mean((loss2 > loss1).float(), mask).item()}


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


class PpoRollout(Rollout):
    """PPO for the training loop: samples and scores like GRPO, then the value head, KL-in-reward and GAE."""

    def __init__(self, net: Any, tokenizer: Any, base_dir: Any, settings: RlSettings, device: str, pad_id: int,
                 rewards: Any = None):
        import torch

        super().__init__(net, tokenizer, base_dir, settings, device, pad_id, rewards)
        hidden = net.config.get_text_config().hidden_size  # the width of the last hidden state
        self.value_head = torch.nn.Linear(hidden, 1, device=device, dtype=torch.float32)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)
        self.value_head.train()
        self.kl = AdaptiveKL(settings.beta, settings.kl_target, settings.kl_horizon)

    def parameters(self) -> list[tuple[str, Any]]:
        return [(f"value_head.{name}", p) for name, p in self.value_head.named_parameters()]

    def state(self) -> dict[str, Any]:
        return self.kl.state()

    def load(self, state: dict[str, Any]) -> None:
        if state:
            self.kl.load(state)

    def logps_and_values(self, tensors: tuple[Any, Any, Any, Any]) -> tuple[Any, Any]:
        logps, hidden = token_logps(self.net, *tensors, temperature=self.settings.temperature, hidden=True)
        return logps, self.value_head(hidden.float()).squeeze(-1)

    def sample(self, rows: list[dict[str, Any]]) -> Batch:
        import torch

        s = self.settings
        was_training = self.net.training
        self.net.eval()  # no dropout while sampling and computing the old log-probs and values
        try:
            sampled = self.generate_and_score(rows)
            mask = sampled.tensors[3].float()
            with torch.no_grad():
                old_logps, old_values = self.logps_and_values(sampled.tensors)
            ref = self.reference_logps(*sampled.tensors)
        finally:
            self.net.train(was_training)
        coef = self.kl.value
        rewards, kl = kl_rewards(sampled.rewards, old_logps, ref, mask, coef)
        advantages, returns = gae(rewards, old_values * mask, mask, s.gamma, s.lam)
        advantages = whiten(advantages, mask) * mask
        sequence_kl = kl.sum(dim=1).mean().item()
        self.kl.update(sequence_kl, len(sampled.group))  # the next batch's coefficient
        metrics = sampled.metrics(s.group_size) | {
            "kl": float(masked_mean(kl, mask)), "kl_per_completion": sequence_kl, "kl_coef": coef,
            "value": float(masked_mean(old_values, mask)), "return": float(masked_mean(returns, mask))}
        return Batch(*sampled.tensors, advantages, ref, old_logps, metrics, sampled.tokens, old_values, returns)

    def loss(self, batch: Batch) -> tuple[Any, dict[str, float]]:
        s = self.settings
        mask = batch.completion_mask.float()
        logps, values = self.logps_and_values(batch.tensors)
        p_loss, p_metrics = policy_loss(logps, batch.old_logps, batch.advantages, mask, s.epsilon)
        v_loss, v_metrics = value_loss(values, batch.old_values, batch.returns, mask, s.value_clip)
        loss = p_loss + s.value_coef * v_loss
        return loss, {"policy_loss": p_loss.item(), "value_loss": v_loss.item(), **p_metrics, **v_metrics}


def make_rollout(net: Any, tokenizer: Any, base_dir: Any, settings: RlSettings, device: str, pad_id: int) -> Rollout:
    """The rollout of ``settings.algorithm``: PPO's (here), or GRPO/RLOO's (steps/train/rl.py)."""
    cls = PpoRollout if settings.algorithm == "ppo" else Rollout
    return cls(net, tokenizer, base_dir, settings, device, pad_id)
