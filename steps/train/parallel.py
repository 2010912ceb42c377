"""Data-parallel training: ``launch`` starts ``train.processes`` ranks under torchrun (each runs
``steps.train.rank``) and waits (``torchrun_command`` is one node's command, also for several nodes, and
``indexed_job`` the Kubernetes objects of a multi-node run); ``Group`` is a rank's process group (DDP or
FSDP2 wrapping, its share of each micro-batch, the reductions of what it logs). ``SINGLE`` (one process) makes
every group call a no-op, so single-process training runs the same loop. docs/DESIGN.md, "Data parallelism".
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from steps.core.errors import ConfigError, TunelineError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]


class DistributedError(TunelineError):
    """The data-parallel training processes failed."""


def launch(cfg: Any, data: Any, model: Any, store: Any, key: str) -> None:
    """Run ``cfg.processes`` ranks of the train step under torchrun and wait for them."""
    import torch

    if cfg.device != "cpu" and torch.cuda.is_available() and torch.cuda.device_count() < cfg.processes:
        raise ConfigError(f"train.processes is {cfg.processes}, but this machine has {torch.cuda.device_count()} "
                          "CUDA device(s): one process per GPU")
    command = torchrun_command(rank_args(cfg, data, model, store, key), cfg.processes)
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONSAFEPATH"] = "1"  # not the working directory first on sys.path (a user's ``steps`` folder)
    # torchrun would set 1 thread per rank; share this machine's cores between the ranks instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.processes)))
    log.info("train: launching %d data-parallel processes (torchrun)", cfg.processes)
    done = subprocess.run(command, env=env, check=False)
    if done.returncode != 0:
        raise DistributedError(f"torchrun with {cfg.processes} training processes failed (exit {done.returncode}); "
                               "the ranks' errors are in the log above")


def rank_args(cfg: Any, data: Any, model: Any, store: Any, key: str, cache_dir: str | None = None) -> str:
    """What every rank is given (``steps.train.rank``): references only, as JSON; ``cache_dir`` where the ranks
    run elsewhere (a container or another node: their own download folder)."""
    return json.dumps({"cfg": cfg.model_dump(mode="json"), "data": data.model_dump(mode="json"),
                       "model": model.model_dump(mode="json"), "bucket": store.bucket, "prefix": store.prefix,
                       "cache_dir": cache_dir or str(store.cache_dir), "key": key})


def torchrun_command(args: str, per_node: int, nodes: int = 1, endpoint: str | None = None, run_id: str = "tuneline",
                     local_addr: str | None = None, python: str = sys.executable) -> list[str]:
    """The torchrun command of one node: ``per_node`` ranks of ``steps.train.rank``; one node is standalone, several
    meet at ``endpoint`` (host:port, c10d rendezvous hosted by the first node to arrive). The same command is what
    each node runs by hand, in a container, or as a pod of a Kubernetes indexed Job (``indexed_job``)."""
    if nodes == 1:
        where = ["--standalone"]
    elif not endpoint:
        raise ConfigError(f"{nodes} nodes need a rendezvous endpoint (host:port) that every node can reach")
    else:
        where = ["--nnodes", str(nodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id]
        where += ["--local-addr", local_addr] if local_addr else []
    return [python, "-m", "torch.distributed.run", *where, "--nproc_per_node", str(per_node), "-m", "steps.train.rank",
            args]


def indexed_job(pod_job: dict, args: str, nodes: int, per_node: int, run_id: str, port: int = 29400) -> list[dict]:
    """A multi-node train step as Kubernetes objects, from the Job the pool's base job template renders
    (``flows.deploy.job_manifest``): a headless Service and an Indexed Job of ``nodes`` pods, completions =
    parallelism = nodes, each pod running ``torchrun_command``; pod 0 (stable DNS name through the Service's
    subdomain) hosts the c10d rendezvous. Kubeflow Trainer's ``TrainJob`` starts the same command per node."""
    import copy

    job = copy.deepcopy(pod_job)
    name = f"tuneline-train-{run_id}"
    spec = job["spec"]
    spec.update({"completionMode": "Indexed", "completions": nodes, "parallelism": nodes, "backoffLimit": 0})
    spec["template"]["spec"].pop("parallelism", None)
    spec["template"]["spec"].pop("completions", None)
    job["metadata"] = {**{k: v for k, v in job.get("metadata", {}).items() if k != "generateName"}, "name": name}
    pod = spec["template"]["spec"]
    pod["subdomain"] = name
    spec["template"].setdefault("metadata", {}).setdefault("labels", {})["tuneline/train"] = name
    endpoint = f"{name}-0.{name}:{port}"
    container = pod["containers"][0]
    container.pop("args", None)
    container["command"] = torchrun_command(args, per_node, nodes, endpoint, run_id, python="python")
    container["ports"] = [{"containerPort": port, "name": "rendezvous"}]
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": job["metadata"].get(
        "namespace", "default")}, "spec": {"clusterIP": "None", "selector": {"tuneline/train": name},
                                           "ports": [{"port": port, "name": "rendezvous"}]}}
    return [service, job]


@dataclass(frozen=True)
class Group:
    """This process's place among the data-parallel ranks; ``Group()`` is a single process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""
    strategy: str = "ddp"  # or "fsdp"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def sharded(self) -> bool:
        """FSDP: weights, gradients and optimizer state are DTensors sharded over the ranks, and every
        forward of the model is collective (all ranks must run the same forwards, e.g. evaluations)."""
        return self.active and self.strategy == "fsdp"

    @classmethod
    def start(cls, device: str, strategy: str = "ddp") -> Group:
        """Join the torchrun process group (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_* from the environment)."""
        import torch
        import torch.distributed as dist

        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        if device == "cuda":
            torch.cuda.set_device(local)  # "cuda" then means this rank's GPU everywhere in the loop
            dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        else:
            dist.init_process_group("gloo")
        return cls(rank=rank, world=world, local_rank=local, backend=dist.get_backend(), strategy=strategy)

    def stop(self) -> None:
        import torch.distributed as dist

        if self.active and dist.is_initialized():
            dist.destroy_process_group()

    def _device(self) -> Any:
        import torch

        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def wrap(self, module: Any, net: Any) -> Any:
        """The data-parallel form of ``module`` (whose forward computes the loss with its submodule ``net``).

        ddp: DistributedDataParallel over ``module``. fsdp: ``net`` itself is sharded in place
        (FSDP2 ``fully_shard``: each transformer block, then the whole model as the root unit, so
        that any call of ``net`` gathers what it needs; its parameters become DTensors, so take
        them from ``net`` again afterwards) and ``module`` is returned as is. One process: identity.
        Ranks load the same weights with the same seed; the trainable ones are broadcast from rank
        0 anyway (not the frozen base: no need to ship a whole base model between processes).
        """
        if not self.active:
            return module
        import torch
        import torch.distributed as dist

        with torch.no_grad():
            for p in net.parameters():
                if p.requires_grad:
                    dist.broadcast(p.data, src=0)
        if self.sharded:
            from torch.distributed.fsdp import fully_shard

            for block in blocks(net):
                fully_shard(block)
            fully_shard(net)
            return module
        from torch.nn.parallel import DistributedDataParallel

        # device_ids=None: the module is already on this rank's device, and inputs (rows) are not tensors.
        return DistributedDataParallel(module, device_ids=None, init_sync=False, forward_sync_buffers=False)

    @contextlib.contextmanager
    def accumulating(self, model: Any, sync: bool) -> Iterator[None]:
        """No gradient all-reduce for this backward unless ``sync`` (the last micro-batch of a step)."""
        # (fsdp reduce-scatters every micro-batch: accumulating unsharded gradients would cost their memory)
        with (model.no_sync() if self.active and not self.sharded and not sync else contextlib.nullcontext()):
            yield

    def full(self, tensor: Any) -> Any:
        """The whole tensor of a sharded one (collective: every rank must ask, in the same order)."""
        return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor

    def like(self, value: Any, param: Any) -> Any:
        """``value`` (a whole tensor, the same on every rank) sharded as ``param`` is, when it is a DTensor
        of the same shape; else ``value`` itself."""
        if not hasattr(param, "device_mesh") or tuple(value.shape) != tuple(param.shape):
            return value
        from torch.distributed.tensor import distribute_tensor

        # src_data_rank=None: every rank holds the same whole tensor and keeps its own shard (no communication).
        # Its own dtype: the fp32 master copy of a bf16 weight (steps/train/master.py) stays fp32.
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the ranks (float64)."""
        if not self.active:
            return list(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return t.tolist()

    def agree(self, flag: bool) -> bool:
        """Rank 0's decision, on every rank (so that no rank leaves the loop alone)."""
        if not self.active:
            return flag
        import torch
        import torch.distributed as dist

        t = torch.tensor([int(flag)], device=self._device())
        dist.broadcast(t, src=0)
        return bool(t.item())

    def gather(self, tensor: Any) -> list[Any]:
        """Every rank's copy of a same-shape tensor (on CPU), in rank order."""
        if not self.active:
            return [tensor]
        import torch.distributed as dist

        local = tensor.to(self._device())
        out = [local.clone() for _ in range(self.world)]
        dist.all_gather(out, local)
        return [t.cpu() for t in out]


def blocks(net: Any) -> list[Any]:
    """The transformer blocks of a model (the classes its transformers models name in ``_no_split_modules``)."""
    names = {name for m in net.modules() for name in (getattr(m, "_no_split_modules", None) or [])}
    return [m for m in net.modules() if type(m).__name__ in names]



SINGLE = Group()  # one process: every data-parallel call of the loop is a no-op
