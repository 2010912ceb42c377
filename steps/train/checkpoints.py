"""Resumable training state in the store: every ``train.checkpoint_every`` steps the trainable
weights, optimizer and scheduler state, RNG state (every rank's) and data position, committed as
one artifact per checkpoint under ``<prefix>/train-checkpoints/<run_key>/step-NNNNNN/``
(safetensors + JSON, the manifest last: the completion marker)."""

from __future__ import annotations

import logging
import re
from typing import Any

from steps.config import TrainConfig
from steps.core.store import ArtifactRef, ArtifactStore
from steps.train.parallel import SINGLE, Group

log = logging.getLogger(__name__)

CHECKPOINTS = "train-checkpoints"


class Checkpoints:
    """Resumable training state in the store, one artifact per checkpoint (manifest = completion marker)."""

    def __init__(self, store: ArtifactStore, key: str, cfg: TrainConfig):
        self.store, self.cfg = store, cfg
        self.step_name = f"{CHECKPOINTS}/{key}"

    def latest(self) -> ArtifactRef | None:
        prefix = self.store.artifact_key(self.step_name, "")
        steps = sorted(int(m.group(1)) for k in self.store.list_keys(prefix)
                       if (m := re.search(r"/step-(\d+)/_MANIFEST\.json$", k)))
        return self.store.lookup(self.step_name, f"step-{steps[-1]:06d}") if steps else None

    def save(self, step: int, named: list, optimizer: Any, scheduler: Any, state: dict, group: Group = SINGLE) -> None:
        """Rank 0 writes (weights and optimizer state are the same on every rank); every rank must
        call this, since the RNG states of all ranks are gathered (``torch.rank1``, ... next to rank 0's)."""
        import torch
        from safetensors.torch import save as to_bytes

        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        if group.active:
            rng = {(name if r == 0 else f"{name}.rank{r}"): t for name, mine in rng.items()
                   for r, t in enumerate(group.gather(mine))}
        # fsdp: whole tensors gathered from the shards (collective: the same, sorted order on every rank; a
        # restored optimizer's state is in the order safetensors loaded it, which differs between processes)
        opt = optimizer.state_dict()
        tensors = {f"{i}.{k}": group.full(v) for i in sorted(opt["state"]) for k, v in sorted(opt["state"][i].items())
                   if torch.is_tensor(v)}
        scalars = {f"{i}.{k}": v for i, s in opt["state"].items() for k, v in s.items() if not torch.is_tensor(v)}
        weights = {n: group.full(p.detach()).cpu().contiguous() for n, p in named}
        if not group.main:
            return
        writer = self.store.writer(self.step_name, f"step-{step:06d}", self.cfg)
        writer.put_bytes("trainable.safetensors", to_bytes(weights))
        writer.put_bytes("optimizer.safetensors", to_bytes({k: v.cpu().contiguous() for k, v in tensors.items()}))
        writer.put_json("optimizer.json", {"param_groups": opt["param_groups"], "scalars": scalars})
        writer.put_json("scheduler.json", scheduler.state_dict())
        writer.put_bytes("rng.safetensors", to_bytes(rng))
        writer.put_json("progress.json", state)
        writer.commit(stats={"step": step})
        log.info("train: checkpoint at step %d committed", step)

    def restore(self, ref: ArtifactRef, named: list, optimizer: Any, scheduler: Any, group: Group = SINGLE) -> dict:
        """Every rank restores the same weights and optimizer state, and its own RNG state."""
        import torch
        from safetensors.torch import load as from_bytes

        weights = from_bytes(self.store.read_bytes(ref, "trainable.safetensors"))
        with torch.no_grad():
            for name, p in named:
                p.copy_(group.like(weights[name], p))
        meta = self.store.read_json(ref, "optimizer.json")
        state: dict[int, dict[str, Any]] = {}
        for flat, value in sorted([*from_bytes(self.store.read_bytes(ref, "optimizer.safetensors")).items(),
                                   *meta["scalars"].items()]):
            index, name = flat.split(".", 1)
            if torch.is_tensor(value):  # fsdp: sharded as its parameter is
                value = group.like(value, named[int(index)][1])
            state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        scheduler.load_state_dict(self.store.read_json(ref, "scheduler.json"))
        rng = from_bytes(self.store.read_bytes(ref, "rng.safetensors"))
        rng = {name: rng.get(f"{name}.rank{group.rank}", t) if group.rank else t
               for name, t in rng.items() if ".rank" not in name}
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        return self.store.read_json(ref, "progress.json")

    def clear(self) -> None:
        self.store.delete_prefix(self.store.artifact_key(self.step_name, ""))
