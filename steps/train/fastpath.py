"""The device-independent switches of the training fast path (docs/DESIGN.md, "Training fast path"):
the check of what the device can run (``check_switches``), liger-kernel's fused kernels and regional
``torch.compile`` of the transformer blocks (``speed_up``). bf16 weights (train.precision), fused AdamW and
fp32 master weights (``master.py``) are switches too: every CUDA branch can run on the CPU, so CI runs it."""

from __future__ import annotations

import importlib.util
from typing import Any

from steps.config import TrainConfig
from steps.core.errors import ConfigError
from steps.train.methods.common import attention_for, blocks, language_model


def check_switches(cfg: TrainConfig, device: str) -> None:
    """Refuse, before anything loads, the switches ``device`` cannot train with."""
    if cfg.kernels == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            raise ConfigError("train.kernels 'liger' needs the liger-kernel package, which is not installed "
                              "(pip install liger-kernel; it is not a dependency of tuneline)")
        if device != "cuda":
            raise ConfigError(f"train.kernels 'liger' runs Triton kernels on CUDA only, not on {device!r}; "
                              "use kernels 'none' there")
    if attention_for(cfg, device) == "flex_attention" and device == "cpu":
        raise ConfigError("train.attention 'flex_attention' has no backward pass on the CPU (torch "
                          "flex_attention runs forward only there); use attention 'sdpa' or 'auto' on the CPU")


def speed_up(cfg: TrainConfig, net: Any) -> None:
    """liger-kernel's fused kernels (``train.kernels``), then ``torch.compile`` of every transformer block
    (``train.compile``): regional compilation, one graph that all the identical blocks reuse, so it compiles
    in seconds rather than once per block, and the per-document mask building stays outside the graph.
    Dynamic shapes from the start: every packed or padded micro-batch has another length."""
    if cfg.kernels == "liger":
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=language_model(net))
    if cfg.compile:
        for block in blocks(net):
            block.compile(dynamic=True)
