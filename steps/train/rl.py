"""Online RL on prompt records: GRPO (Shao et al. 2024) and RLOO (Ahmadian et al. 2024), as TRL 1.16's
GRPOTrainer and RLOOTrainer compute them (checked in tests/steps/train/test_rl.py); PPO builds on the same
sampling and scoring in steps/train/ppo.py (whose ``make_rollout`` picks by ``train.rl.algorithm``).

One optimizer step of the training loop (steps/train/step.py) with ``train.rl``:

1. ``Rollout.sample``: ``prompts_per_step`` prompt rows, each repeated ``group_size`` times, are sampled
   with ``generate()`` (``do_sample``, ``temperature``, ``top_k``; the KV cache on: ``use_cache=True``) from
   the policy in eval mode (no dropout); a completion ends at its first EOS (which it keeps), the
   ``completion_mask``. Sampling draws from torch's global RNG, which the checkpoints save, so a resumed run
   samples what the uninterrupted one would.
2. The completions are decoded and scored by the reward functions (steps/train/rewards.py), summed with
   their weights; ``advantages``: GRPO ``(r - mean_g) / (std_g + 1e-4)`` per group (unbiased std, as TRL's
   ``nanstd``; ``scale_rewards: false`` only centres), RLOO ``r - mean of the other completions of the group``
   (TRL's RLOOTrainer without ``normalize_advantages``).
3. Per-token log-probs (``token_logps``: logits of the completion positions divided by the temperature, as
   TRL does) of the reference model, the base: the policy with its LoRA adapters switched off (no second
   copy in memory), or a frozen copy for full/head (as DPO's reference); and, with ``iterations`` > 1, of
   the sampling policy (``old``).
4. ``clipped_loss`` (TRL's ``_compute_loss`` for loss_type grpo/dapo, token-level importance sampling):
   ``ratio = exp(logp - old)``, ``-min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A)`` per token plus
   ``beta * (exp(ref - logp) - (ref - logp) - 1)`` (the k3 KL estimator); aggregated as ``dapo`` (TRL's
   default: summed over the batch's completion tokens and divided by their count) or ``grpo`` (each
   completion's token mean, then the mean over completions). With ``iterations`` 1 (TRL's default) the
   ratio is 1 and ``old`` is the detached current log-prob, so the clip never binds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from steps.config import RlSettings
from steps.train.rewards import Reward, build_rewards, score

ADV_EPS = 1e-4  # TRL's epsilon in the advantage denominators


def group_advantages(rewards: Any, group_size: int, algorithm: str = "grpo", scale: bool = True) -> Any:
    """Advantages of ``rewards`` ([P * G], groups of G consecutive completions of one prompt)."""
    import torch

    grouped = rewards.view(-1, group_size)
    if algorithm == "rloo":
        baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
        return (grouped - baseline).reshape(-1)
    mean = grouped.mean(dim=1, keepdim=True)
    centred = grouped - mean
    if not scale:
        return centred.reshape(-1)
    std = torch.sqrt(((grouped - mean) ** 2).sum(dim=1, keepdim=True) / (group_size - 1))  # Bessel, as nanstd
    return (centred / (std + ADV_EPS)).reshape(-1)


def clipped_loss(logps: Any, old_logps: Any, ref_logps: Any | None, advantages: Any, mask: Any, beta: float,
                 epsilon: float, epsilon_high: float | None = None, loss_type: str = "dapo") -> tuple[Any, dict]:
    """(loss, metrics) of GRPO's clipped objective with the k3 KL to the reference ([B, T] tensors)."""
    import torch

    mask = mask.to(logps.dtype)
    adv = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + (epsilon_high if epsilon_high is not None else epsilon))
    per_token = -torch.min(ratio * adv, clipped * adv)
    metrics: dict[str, float] = {}
    if beta != 0.0:
        assert ref_logps is not None
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        per_token = per_token + beta * kl
        metrics["kl"] = ((kl * mask).sum() / mask.sum().clamp(min=1.0)).item()
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    else:
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    high = epsilon_high if epsilon_high is not None else epsilon
    is_clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))
    metrics["clip_ratio"] = ((is_clipped.to(mask.dtype) * mask).sum() / mask.sum().clamp(min=1.0)).item()
    return loss, metrics


def completion_mask(completion_ids: Any, stops: set[int]) -> Any:
    """1 up to and including each row's first stop token (all ones when there is none), 0 after it."""
    import torch

    is_stop = torch.zeros_like(completion_ids, dtype=torch.bool)
    for token in stops:
        is_stop |= completion_ids == token
    length = completion_ids.size(1)
    first = torch.full((completion_ids.size(0),), length, dtype=torch.long, device=completion_ids.device)
    rows = is_stop.any(dim=1)
    first[rows] = is_stop.int().argmax(dim=1)[rows]
    positions = torch.arange(length, device=completion_ids.device).expand(completion_ids.size(0), -1)
    return (positions <= first.unsqueeze(1)).long()


def token_logps(net: Any, prompt_ids: Any, prompt_mask: Any, completion_ids: Any, completion_mask: Any,
                temperature: float = 1.0, hidden: bool = False) -> Any:
    """Per-token log-probabilities [B, C] of the completion tokens under ``net`` (positions follow the
    attention mask, so left padding does not shift them); with ``hidden``, also the last hidden states
    [B, C, H] at the positions that predict them (what PPO's value head reads), from the same forward."""
    import torch

    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention = torch.cat([prompt_mask, completion_mask], dim=1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    width = completion_ids.size(1)
    out = net(input_ids=ids, attention_mask=attention, position_ids=positions, logits_to_keep=width + 1,
              use_cache=False, output_hidden_states=hidden)
    logits = out.logits[:, :-1].float() / temperature
    logps = torch.gather(torch.log_softmax(logits, dim=-1), 2, completion_ids.unsqueeze(-1)).squeeze(-1)
    return (logps, out.hidden_states[-1][:, -(width + 1):-1]) if hidden else logps


def left_padded(rows: list[dict[str, Any]], pad_id: int, device: str) -> tuple[Any, Any]:
    """(input_ids, attention_mask) of the rows' prompts, padded on the left."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = [[pad_id] * (width - len(r["input_ids"])) + list(r["input_ids"]) for r in rows]
    mask = [[0] * (width - len(r["input_ids"])) + [1] * len(r["input_ids"]) for r in rows]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def stop_tokens(net: Any, tokenizer: Any) -> set[int]:
    eos = net.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    stops.discard(None)
    return stops


def generate(net: Any, prompt_ids: Any, prompt_mask: Any, pad_id: int, max_new_tokens: int, sample: bool,
             temperature: float = 1.0, top_k: int = 0) -> Any:
    """The new tokens [B, <= max_new_tokens] of each prompt; sampled or greedy, with the KV cache."""
    import torch

    options: dict[str, Any] = {"do_sample": sample}
    if sample:
        options |= {"temperature": temperature, "top_k": top_k, "top_p": 1.0}
    with torch.no_grad():
        out = net.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens,
                           pad_token_id=pad_id, use_cache=True, **options)
    return out[:, prompt_ids.size(1):]


def decode(tokenizer: Any, completion_ids: Any, mask: Any) -> list[str]:
    return [tokenizer.decode(ids[: int(m.sum())].tolist(), skip_special_tokens=True)
            for ids, m in zip(completion_ids, mask)]


@dataclass
class Batch:
    """One sampled generation batch: what the clipped loss of its step(s) needs."""

    prompt_ids: Any
    prompt_mask: Any
    completion_ids: Any
    completion_mask: Any
    advantages: Any  # grpo/rloo: one per completion [B]; ppo: one per token [B, C]
    ref_logps: Any | None
    old_logps: Any | None
    metrics: dict[str, float]
    tokens: int
    old_values: Any | None = None  # ppo: the value head's estimates when sampled [B, C]
    returns: Any | None = None  # ppo: GAE returns [B, C]

    @property
    def tensors(self) -> tuple[Any, Any, Any, Any]:
        return self.prompt_ids, self.prompt_mask, self.completion_ids, self.completion_mask


@dataclass
class Sampled:
    """Completions of a batch of prompts (each repeated ``group_size`` times) and their rewards."""

    group: list[dict[str, Any]]
    tensors: tuple[Any, Any, Any, Any]  # prompt_ids, prompt_mask, completion_ids, completion_mask
    rewards: Any  # [B] weighted sums
    per_function: dict[str, list[float]]

    def metrics(self, group_size: int) -> dict[str, float]:
        grouped = self.rewards.view(-1, group_size)
        return {"reward": self.rewards.mean().item(),
                "reward_std": grouped.std(dim=1).mean().item() if group_size > 1 else 0.0,
                "completion_length": self.tensors[3].sum(-1).float().mean().item(),
                **{f"reward_{name}": sum(v) / len(v) for name, v in self.per_function.items()}}

    @property
    def tokens(self) -> int:
        return int(self.tensors[1].sum() + self.tensors[3].sum())


class Rollout:
    """Samples groups, scores them and computes the loss of GRPO/RLOO for the training loop."""

    def __init__(self, net: Any, tokenizer: Any, base_dir: Any, settings: RlSettings, device: str, pad_id: int,
                 rewards: list[Reward] | None = None):
        self.net, self.tokenizer, self.settings, self.device, self.pad_id = net, tokenizer, settings, device, pad_id
        self.rewards = rewards if rewards is not None else build_rewards(settings.rewards, device)
        self.stops = stop_tokens(net, tokenizer)
        self.frozen = None
        if settings.beta != 0.0 and not hasattr(net, "disable_adapter"):  # full or head: a frozen copy of the base
            from steps.train.methods.common import load_base

            self.frozen = load_base(None, base_dir, device).eval().requires_grad_(False)

    def parameters(self) -> list[tuple[str, Any]]:
        """Trainable tensors of the algorithm besides the policy's (checkpointed with them): none here."""
        return []

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the algorithm besides tensors and RNG (JSON): nothing here."""
        return {}

    def load(self, state: dict[str, Any]) -> None:
        pass

    def reference_logps(self, *tensors: Any) -> Any:
        import contextlib

        import torch

        with torch.no_grad():
            if self.frozen is not None:
                return token_logps(self.frozen, *tensors, temperature=self.settings.temperature)
            with self.net.disable_adapter() if hasattr(self.net, "disable_adapter") else contextlib.nullcontext():
                return token_logps(self.net, *tensors, temperature=self.settings.temperature)

    def generate_and_score(self, rows: list[dict[str, Any]]) -> Sampled:
        """Each row's prompt ``group_size`` times, its sampled completions and their rewards (in eval mode:
        the caller computes what else it needs from the same completions before training resumes)."""
        import torch

        s = self.settings
        group = [r for r in rows for _ in range(s.group_size)]
        prompt_ids, prompt_mask = left_padded(group, self.pad_id, self.device)
        completion_ids = generate(self.net, prompt_ids, prompt_mask, self.pad_id, s.max_new_tokens, True,
                                  s.temperature, s.top_k)
        mask = completion_mask(completion_ids, self.stops)
        texts = decode(self.tokenizer, completion_ids, mask)
        total, per_function = score(self.rewards, [r["prompt"] for r in group], texts, group)
        rewards = torch.tensor(total, dtype=torch.float32, device=self.device)
        return Sampled(group, (prompt_ids, prompt_mask, completion_ids, mask), rewards, per_function)

    def sample(self, rows: list[dict[str, Any]]) -> Batch:
        import torch

        s = self.settings
        was_training = self.net.training
        self.net.eval()  # no dropout while sampling and scoring the reference
        try:
            sampled = self.generate_and_score(rows)
            advantages = group_advantages(sampled.rewards, s.group_size, s.algorithm, s.scale_rewards)
            ref = self.reference_logps(*sampled.tensors) if s.beta != 0.0 else None
            old = None
            if s.iterations > 1:
                with torch.no_grad():
                    old = token_logps(self.net, *sampled.tensors, temperature=s.temperature)
        finally:
            self.net.train(was_training)
        return Batch(*sampled.tensors, advantages, ref, old, sampled.metrics(s.group_size), sampled.tokens)

    def loss(self, batch: Batch) -> tuple[Any, dict[str, float]]:
        s = self.settings
        logps = token_logps(self.net, *batch.tensors, temperature=s.temperature)
        old = batch.old_logps if batch.old_logps is not None else logps.detach()
        return clipped_loss(logps, old, batch.ref_logps, batch.advantages, batch.completion_mask, s.beta, s.epsilon,
                            s.epsilon_high, s.loss_type)


def curve(history: list[dict[str, Any]], points: int = 10) -> list[dict[str, float]]:
    """The run's reward, KL and completion length as up to ``points`` windows of steps (their means): the
    train step's page shows them as a table (the register step draws every step in plots/rl_curves.png)."""
    size = max(1, -(-len(history) // points))
    out = []
    for i in range(0, len(history), size):
        window = history[i : i + size]
        out.append({"steps": f"{window[0]['step']}-{window[-1]['step']}",
                    **{name: round(sum(h.get(name, 0.0) for h in window) / len(window), 4)
                       for name in ("reward", "kl", "completion_length")}})
    return out


def greedy_rewards(net: Any, tokenizer: Any, rows: list[dict[str, Any]], rewards: list[Reward], max_new_tokens: int,
                   batch_size: int, pad_id: int, device: str, reference: Any = None
                   ) -> tuple[list[float], list[str], float | None]:
    """Each prompt row's greedy answer (KV cache on), its weighted reward and, given the ``reference`` model
    (a frozen copy, or None: for LoRA pass ``net`` itself, scored with its adapters off), the mean KL to it
    per answer token, ``mean(logp_policy - logp_reference)`` over the answers' tokens (the evaluation's
    ``kl_to_reference``; None when ``reference`` is not given)."""
    import contextlib

    import torch

    stops = stop_tokens(net, tokenizer)
    answers: list[str] = []
    kl_sum, tokens = 0.0, 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        ids, mask = left_padded(chunk, pad_id, device)
        completion = generate(net, ids, mask, pad_id, max_new_tokens, sample=False)
        done = completion_mask(completion, stops)
        answers += decode(tokenizer, completion, done)
        if reference is not None:
            tensors = (ids, mask, completion, done)
            adapters_off = net.disable_adapter() if reference is net else contextlib.nullcontext()
            with torch.no_grad():
                policy = token_logps(net, *tensors)
                with adapters_off:
                    ref = token_logps(reference, *tensors)
            kl_sum += float(((policy - ref) * done).sum())
            tokens += int(done.sum())
    total, _ = score(rewards, [r["prompt"] for r in rows], answers, rows)
    return total, answers, (kl_sum / max(tokens, 1) if reference is not None else None)
