"""AdamW with an fp32 master copy of bf16 weights (train.master_weights): full and head fine-tuning with bf16
weights keep the small updates of a long run that pure bf16 rounds away (docs/DESIGN.md, "Training fast path")."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.adamw import adamw

from steps.config import TrainConfig


def wanted(cfg: TrainConfig, params: list[Any]) -> bool:
    """Whether the optimizer keeps fp32 master weights: ``train.master_weights`` with adamw, and some trained
    weight in bf16 (full and head fine-tuning with bf16 weights; LoRA adapters are fp32 already)."""
    return cfg.master_weights and cfg.optimizer == "adamw" and any(p.dtype == torch.bfloat16 for p in params)


class MasterAdamW(torch.optim.Optimizer):
    """AdamW over low-precision (bf16) parameters that updates an fp32 master copy of each.

    bf16 holds 8 significant bits: an update smaller than half the spacing of bf16 numbers around a
    weight (0.2-0.4% of it) rounds away, so pure bf16 training loses the many small updates of a long
    run. Here the moments and the master weights are fp32 (per-parameter state ``master``, ``exp_avg``,
    ``exp_avg_sq``, ``step``: 12 bytes per weight, saved with the optimizer's state in checkpoints) and
    the model's bf16 weights are the master rounded after each step. The update is torch's own AdamW
    (functional ``adamw``; fused where asked).
    """

    def __init__(self, params: Any, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, fused: bool = False):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.fused = fused

    def step(self, closure: Any = None) -> None:
        with torch.no_grad():
            for group in self.param_groups:
                params = [p for p in group["params"] if p.grad is not None]
                for p in params:
                    if not self.state[p]:
                        self.state[p].update(self._fresh_state(p))
                states = [self.state[p] for p in params]
                beta1, beta2 = group["betas"]
                adamw([s["master"] for s in states], [p.grad.float() for p in params],
                      [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
                      [s["step"] for s in states], fused=self.fused, foreach=None if self.fused else False,
                      amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                      eps=group["eps"], maximize=False)
                for p, s in zip(params, states):
                    p.copy_(s["master"])

    def _fresh_state(self, p: Any) -> dict[str, Any]:
        master = p.detach().float().clone()
        step = torch.zeros((), dtype=torch.float32, device=p.device if self.fused else "cpu")
        return {"step": step, "master": master, "exp_avg": torch.zeros_like(master),
                "exp_avg_sq": torch.zeros_like(master)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``Optimizer.load_state_dict``, which would cast the fp32 state to the parameters' bf16:
        the master weights and moments are put back in fp32, exactly as saved."""
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            p = params[int(index)]
            for name in ("master", "exp_avg", "exp_avg_sq"):
                self.state[p][name] = saved[name].to(device=p.device, dtype=torch.float32).clone()
            if not self.fused:
                self.state[p]["step"] = self.state[p]["step"].cpu()
