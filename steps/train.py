"""Train: fine-tune the base model on the tokenized train split, resumable from the store.

One small loop for every method (``steps/methods/``: full, head, lora, qlora, reft) and
every task the tokenized data is made for (its ``task`` stat): next-token loss on answer
tokens (sft) or all tokens (cpt), cross-entropy or MSE of a new sequence head
(classification, regression), or the DPO / ORPO pair loss (preference, ``steps/preference.py``;
DPO's reference log-probabilities come from the untouched base, computed as pairs are first used).
The loop uses
AdamW / SGD / 8-bit AdamW over exactly the trainable parameters, warm-up then
linear/cosine/constant decay, gradient accumulation, clipping, optional gradient
checkpointing, a step budget (``max_steps``) or ``epochs``, and early stopping on the
eval loss. Runs on CUDA (bf16) when present and ``device="auto"``, else on CPU (fp32).

Every ``checkpoint_every`` steps the trainable weights, optimizer and scheduler state,
RNG state and data position are committed to
``<prefix>/train-checkpoints/<run_key>/step-NNNNNN/`` (safetensors + JSON, manifest
last). A retry of the same run (same config, data and code) resumes from the newest
complete checkpoint and continues exactly as if never interrupted.

Outputs: the method's weights (safetensors), ``train_log.json`` (loss and learning rate
per step) and ``train_report.json`` (parameters, tokens, throughput, memory, time, processes).

Data parallelism (``processes: N > 1``; launcher and process group in ``steps/distributed.py``):
``train_model`` runs ``torchrun --standalone --nproc_per_node N -m steps.distributed '<json>'``
(JSON references only: config, DatasetRef, ModelRef, bucket/prefix, run key; the environment is
inherited), waits, and returns the artifact rank 0 committed. Each rank runs this same loop
(``train_in_process`` with its ``Group``; one process is ``Group()``, where every group call is a
no-op, so the single-process run is unchanged):

- same global batch: every rank draws the single-process batch order; each micro-batch is split
  across the ranks (rows or packed documents ``rank::N``), so a step consumes exactly the
  single-process ``batch_size x grad_accum_steps`` rows.
- exact loss scaling: a rank's loss is the model's mean over its rows times its share of the
  micro-batch's normaliser (label tokens of the shifted labels for next-token losses, incl.
  packing and chunked loss; rows for sequence heads and DPO; ORPO's NLL by chosen tokens, its
  odds term by pairs) times N. DDP/FSDP average gradients over ranks, so the reduced gradient is
  (in exact arithmetic) the single-process gradient of the micro-batch mean. A rank with no rows
  or no label tokens in a micro-batch runs one stand-in row at weight 0 (collectives stay in step).
  Gradient accumulation skips the all-reduce until the last micro-batch (ddp ``no_sync``).
- logged loss, metrics and tokens are the sums of the ranks' shares (one all-reduce per step), so
  ``train_log.json`` reads as in one process. Clipping, optimizer and scheduler see the same
  gradients on every rank, so the weights stay identical (ddp) or consistently sharded (fsdp).
- rank 0 alone writes checkpoints and the artifact; every rank restores a checkpoint (each its own
  RNG state: the ranks' states are gathered into it). Early stopping: rank 0 evaluates (fsdp: every
  rank, its forwards are collective) and broadcasts its decision. Dropout is seeded per rank, so
  with dropout a run matches one process in distribution only.
- what matches: batches, learning rates, tokens seen, step count and early-stop step exactly; losses
  and weights up to float rounding (other padding widths, reduction order). Seen on CPU (2 gloo
  processes, AdamW 1e-3): weights within 3e-8 (lora) and 1.2e-7 (full, ddp and fsdp); logged
  losses within 1e-6; also for packing + chunked loss, classification, head, DPO, ORPO and reft.
- ``distributed: fsdp``: FSDP2 ``fully_shard`` of each transformer block and of the model (a
  collective root: every call of the model gathers what it needs); checkpoints gather whole
  tensors for rank 0 and re-shard them on restore; the artifact is rank 0's fresh copy of the
  model (on the CPU) with the gathered trained tensors. Not with qlora or ``loss_chunk_tokens``.
- ``processes`` and ``distributed`` are part of the run key: a retry resumes only with the same.
- tested on CPU in ``tests/steps/test_distributed.py`` (2 gloo processes vs one: lora resumed from
  a checkpoint under ddp, full under ddp and resumed under fsdp; about 60 s for the three torchrun
  launches on a 2-core machine, mostly process start-up and imports). nccl/CUDA is the same code
  with one GPU per rank, not exercised by the tests.
"""

from __future__ import annotations

import json
import logging
import math
import re
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from steps import distributed, fastpath, methods, preference
from steps.batching import IGNORE, batch_order, collate, sequence_loss, token_nll
from steps.fastpath import pack_order
from steps.config import TrainConfig
from steps.distributed import Group
from steps.errors import ArtifactError
from steps.methods.common import Task
from steps.lineage import run_key
from steps.store import ArtifactRef, ArtifactStore, DatasetRef, ModelRef

log = logging.getLogger(__name__)

STEP = "train"
CHECKPOINTS = "train-checkpoints"
SINGLE = Group()  # one process: every data-parallel call of the loop is a no-op


def train_model(cfg: TrainConfig, data: DatasetRef, model: ModelRef, store: ArtifactStore) -> ModelRef:
    key = run_key(STEP, cfg, [data.digest, model.base.digest])
    if (done := store.lookup(STEP, key)) is not None:
        return ModelRef(base=model.base, adapter=ArtifactRef(**done.model_dump()))
    if cfg.processes > 1:
        distributed.launch(cfg, data, model, store, key)  # rank 0 of the torchrun job commits the artifact
        if (done := store.lookup(STEP, key)) is None:
            raise ArtifactError(f"the {cfg.processes} training processes exited cleanly but committed no "
                                f"{STEP} artifact under {store.artifact_key(STEP, key)}")
        return ModelRef(base=model.base, adapter=ArtifactRef(**done.model_dump()))
    tuned = train_in_process(cfg, data, model, store, key)
    assert tuned is not None
    return tuned


def train_in_process(cfg: TrainConfig, data: DatasetRef, model: ModelRef, store: ArtifactStore, key: str,
                     group: Group = SINGLE) -> ModelRef | None:
    """The training loop, in this process: the whole run, or rank ``group.rank`` of a data-parallel one.

    Returns the committed model on rank 0 (the only rank that writes), None on the others.
    """
    import torch
    from transformers import get_scheduler

    device = pick_device(cfg.device)
    task = Task(kind=data.stats.get("task", "sft"), labels=data.stats.get("labels", []))
    base_dir = store.download(model.base)
    rows = store.read_jsonl(data, "train.jsonl")
    eval_rows = store.read_jsonl(data, "eval.jsonl") if cfg.early_stopping else []
    torch.manual_seed(cfg.seed)
    net = methods.prepare(cfg, base_dir, device, task)
    reference = (preference.Reference(net, base_dir, device, cfg.batch_size)
                 if task.kind == "preference" and cfg.preference.loss == "dpo" else None)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(net)
    pad_id = net.config.pad_token_id or 0
    # The loss of this rank's share of a micro-batch, as a module: DDP all-reduces gradients of its backward.
    trainer = group.wrap(loss_module(net, task, cfg, pad_id, device, group), net)
    named = [(name, p) for name, p in net.named_parameters() if p.requires_grad]  # (after fsdp made them DTensors)
    if group.active:  # same initial weights on every rank (seeded above); independent dropout from here on
        torch.manual_seed(cfg.seed + group.rank)
    optimizer = make_optimizer(cfg, [p for _, p in named], device)
    total = cfg.max_steps or math.ceil(cfg.epochs * math.ceil(len(rows) / cfg.batch_size) / cfg.grad_accum_steps)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round((cfg.warmup_ratio or 0.0) * total)
    scheduler = get_scheduler("constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler,
                              optimizer, num_warmup_steps=warmup, num_training_steps=total)

    checkpoints = Checkpoints(store, key, cfg)
    state: dict[str, Any] = {"step": 0, "history": [], "evals": [], "tokens": 0, "seconds": 0.0,
                             "best_eval": None, "bad_evals": 0, "stopped_early": False, "resumed_from": None}
    if (latest := checkpoints.latest()) is not None:
        state = checkpoints.restore(latest, named, optimizer, scheduler, group)
        state["resumed_from"] = state["step"]
        log.info("train: resuming from checkpoint at step %d", state["step"])
    lengths = [len(r["input_ids"]) for r in rows]
    budget = cfg.tokens_per_batch or cfg.batch_size * max(lengths)
    order = pack_order(lengths, budget, cfg.seed) if cfg.packing else batch_order(lengths, cfg.batch_size, cfg.seed)
    for _ in range(state["step"] * cfg.grad_accum_steps):  # data position: skip what was trained on
        next(order)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.time() - state["seconds"]
    trainer.train()
    progress = tqdm(range(state["step"] + 1, total + 1), desc="train", unit="step", initial=state["step"], total=total,
                    disable=not group.main)
    for step in progress:
        tokens, logged = 0, {}
        for micro in range(cfg.grad_accum_steps):
            batch_rows = [rows[i] for i in next(order)]
            part = share_of(group, batch_rows, task, cfg, budget)
            if reference is not None:  # fsdp: every rank runs the same (collective) forwards
                reference.fill(batch_rows if group.sharded else part.rows, pad_id)
            with group.accumulating(trainer, sync=micro == cfg.grad_accum_steps - 1):
                loss, micro_tokens, micro_logged = trainer(part, budget)
                (loss / cfg.grad_accum_steps).backward()
            tokens += micro_tokens
            for name, value in micro_logged.items():
                logged[name] = logged.get(name, 0.0) + value / cfg.grad_accum_steps
        if group.active:  # every rank logged its share: the sums are the global batch's numbers
            tokens, *values = group.sum([tokens, *logged.values()])
            tokens, logged = round(tokens), dict(zip(logged, values))
        torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.max_grad_norm)
        lr = scheduler.get_last_lr()[0]  # the rate this step uses
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] = step
        state["tokens"] += tokens
        step_loss = logged.pop("loss")
        state["history"].append({"step": step, "loss": step_loss, "lr": lr, **logged})
        progress.set_postfix(loss=f"{step_loss:.3f}")
        es = cfg.early_stopping
        if es and step % es.eval_every == 0:
            stop = False
            if group.main or group.sharded:  # ddp: the other ranks wait for rank 0's decision
                if reference is not None:
                    reference.fill(eval_rows, pad_id)
                stop = should_stop(cfg, task, net, eval_rows, pad_id, device, state)
            if group.agree(stop):
                if group.main:
                    log.info("train: early stop at step %d (eval loss %.4f, best %.4f)", step,
                             state["evals"][-1]["loss"], state["best_eval"])
                break
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
            state["seconds"] = time.time() - started
            checkpoints.save(step, named, optimizer, scheduler, state, group)
    state["seconds"] = time.time() - started
    if group.sharded:  # every rank takes part in gathering the trained weights; rank 0 saves them
        trained = {name: group.full(p.detach()) for name, p in named}
        if group.main:
            net = unsharded(cfg, base_dir, device, task, trained)
    if not group.main:
        return None

    with tempfile.TemporaryDirectory(prefix="tuneline-train-") as tmp:
        out = Path(tmp)
        methods.save(cfg, net, out, task)
        if (out / "adapter_config.json").exists():
            point_adapter_at_base(out, f"s3://{store.bucket}/{model.base.key}")
        report = train_report(cfg, net, state, device, total, group.world)
        writer = store.writer(STEP, key, cfg, inputs=[data, model.base])
        writer.put_dir(out)
        writer.put_json("train_log.json", state["history"])
        writer.put_json("train_report.json", report)
        ref = writer.commit(stats={
            "method": cfg.method, "task": task.kind, "steps": state["step"], "first_loss": state["history"][0]["loss"],
            "final_loss": state["history"][-1]["loss"], "tokens_seen": state["tokens"],
            "tokens_per_s": report["tokens_per_s"], "trainable_params": report["trainable_params"],
            "device": device, "stopped_early": state["stopped_early"], "resumed_from": state["resumed_from"],
        })
    checkpoints.clear()
    log.info("train: %s, %d steps on %s, loss %.3f -> %.3f", cfg.method, state["step"], device,
             ref.stats["first_loss"], ref.stats["final_loss"])
    return ModelRef(base=model.base, adapter=ref)


def unsharded(cfg: TrainConfig, base_dir: Path, device: str, task: Task, trained: dict[str, Any]) -> Any:
    """The trained model in one piece (fsdp), on the CPU: the method's fresh model with the trained tensors.

    Only trainable tensors change in training, so the fresh model plus them is the trained model.
    Frozen weights take the dtype training used on ``device``; trained ones keep their own.
    """
    import torch

    from steps.methods.common import dtype_for

    net = methods.prepare(cfg, base_dir, "cpu", task).to(dtype_for(device))
    params = dict(net.named_parameters())
    with torch.no_grad():
        for name, value in trained.items():
            params[name].data = value.detach().cpu()
    return net


def pick_device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def make_optimizer(cfg: TrainConfig, params: list[Any], device: str) -> Any:
    import torch

    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=0.9, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=device == "cuda")


def enable_gradient_checkpointing(net: Any) -> None:
    net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(net, "enable_input_require_grads"):  # frozen embeddings: keep a grad path into checkpointed blocks
        net.enable_input_require_grads()
    net.config.use_cache = False


def batch_loss(net: Any, rows: list[dict], task: Task, cfg: TrainConfig, pad_id: int, device: str,
               budget: int = 0) -> tuple[Any, int, dict[str, float]]:
    """(loss, real tokens in the batch, extra metrics) of one micro-batch, as the task defines the loss."""
    if task.kind == "preference":
        return preference.pair_loss(net, rows, cfg.preference, pad_id, device)
    if cfg.packing:
        batch = {k: v.to(device) for k, v in fastpath.pack(rows, budget).items()}
        tokens = batch["input_ids"].numel()
    else:
        batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
        tokens = int(batch["attention_mask"].sum())
    if cfg.loss_chunk_tokens:
        return fastpath.chunked_loss(net, batch, cfg.loss_chunk_tokens), tokens, {}
    return net(**batch, **fastpath.PACKED_FORWARD).loss, tokens, {}


@dataclass(frozen=True)
class Share:
    """This rank's part of one micro-batch and its weights in the micro-batch's loss.

    ``unit_share``: its share of the loss normaliser (label tokens, or rows/pairs for per-row
    losses); ``row_share``: its share of the rows. A rank with nothing to normalise runs one row
    of the micro-batch at weight 0 (``tokens`` then says what it really holds), so that every
    rank still runs a forward and backward and the gradient all-reduce stays in step.
    """

    rows: list[dict]
    unit_share: float = 1.0
    row_share: float = 1.0
    tokens: int | None = None


def share_of(group: Group, rows: list[dict], task: Task, cfg: TrainConfig, budget: int) -> Share:
    """Rows ``rank::world`` of the global micro-batch, weighted so that the ranks' losses sum to its loss."""
    if not group.active:
        return Share(rows)
    units = [loss_units(r, task, cfg, budget) for r in rows]
    mine = list(range(group.rank, len(rows), group.world))
    total, local = sum(units), sum(units[i] for i in mine)
    if not mine or (local == 0 and not orpo(task, cfg)):  # (ORPO's token mean is clamped: no NaN on 0 tokens)
        stand_in = max(range(len(rows)), key=lambda i: units[i])
        return Share([rows[stand_in]], 0.0, 0.0, tokens=row_tokens([rows[i] for i in mine], task, cfg, budget))
    return Share([rows[i] for i in mine], local / total if total else 0.0, len(mine) / len(rows))


def orpo(task: Task, cfg: TrainConfig) -> bool:
    return task.kind == "preference" and cfg.preference.loss == "orpo"


def loss_units(row: dict, task: Task, cfg: TrainConfig, budget: int) -> int:
    """What the task's loss of a micro-batch averages over, in this row: label tokens (the model's
    shifted next-token labels; for ORPO's NLL, the chosen answer's), or 1 (per-row and per-pair losses)."""
    if task.sequence_head or (task.kind == "preference" and not orpo(task, cfg)):
        return 1
    labels = row.get("labels", row["input_ids"])
    if cfg.packing and task.kind != "preference":
        labels = labels[:budget]  # pack() truncates a document longer than the budget
    return sum(1 for t in labels[1:] if t != IGNORE)


def row_tokens(rows: list[dict], task: Task, cfg: TrainConfig, budget: int) -> int:
    """The real tokens ``batch_loss`` would count for these rows."""
    if task.kind == "preference":
        return sum(len(r["input_ids"]) + len(r["rejected_ids"]) for r in rows)
    n = sum(len(r["input_ids"]) for r in rows)
    return min(n, budget) if cfg.packing else n


def loss_module(net: Any, task: Task, cfg: TrainConfig, pad_id: int, device: str, group: Group) -> Any:
    """A module whose forward is the loss of this rank's share of a micro-batch (what DDP wraps).

    One process: ``batch_loss`` as it is. Data-parallel: the share's loss in the micro-batch
    mean, times ``world`` (DDP averages gradients over the ranks), so that the all-reduced
    gradient is exactly the gradient of the single-process mean over the whole micro-batch.
    Logged values (loss, metrics) are the share's part of the micro-batch's value; summed over
    the ranks they are the micro-batch's.
    """
    import torch

    class ShardLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, share: Share, budget: int) -> tuple[Any, int, dict[str, float]]:
            if not group.active:
                loss, tokens, metrics = batch_loss(self.net, share.rows, task, cfg, pad_id, device, budget)
                return loss, tokens, {"loss": loss.item(), **metrics}
            if orpo(task, cfg):  # token-mean NLL plus pair-mean odds term: each part gets its own share
                nll, odds, log_odds, tokens = orpo_parts(self.net, share.rows, cfg, pad_id, device)
                loss = nll * share.unit_share + odds * share.row_share
                logged = {"log_odds": log_odds * share.row_share, "chosen_nll": nll.item() * share.unit_share}
            else:
                loss, tokens, metrics = batch_loss(self.net, share.rows, task, cfg, pad_id, device, budget)
                loss = loss * share.unit_share
                logged = {name: value * share.unit_share for name, value in metrics.items()}
            tokens = share.tokens if share.tokens is not None else tokens
            return loss * group.world, tokens, {"loss": loss.item(), **logged}

    return ShardLoss()


def orpo_parts(net: Any, rows: list[dict], cfg: TrainConfig, pad_id: int, device: str) -> tuple[Any, Any, float, int]:
    """ORPO's two terms separately (``preference.pair_loss`` adds them): the chosen answers' NLL
    (mean per token), the odds-ratio term (mean per pair), the mean log odds and the token count."""
    import torch

    logps, counts, tokens = preference.forward_logps(net, rows, pad_id, device)
    n = len(rows)
    chosen, rejected = logps[:n], logps[n:]
    chosen_mean, rejected_mean = chosen / counts[:n].clamp(min=1), rejected / counts[n:].clamp(min=1)
    nll = -chosen.sum() / counts[:n].sum().clamp(min=1)
    odds, log_odds = preference.orpo_loss(chosen_mean, rejected_mean, torch.zeros_like(nll), cfg.preference.beta)
    return nll, odds, log_odds.mean().item(), tokens


def eval_loss(cfg: TrainConfig, task: Task, net: Any, rows: list[dict], pad_id: int, device: str) -> float:
    """Mean eval loss in the training objective's own terms (token NLL, sequence loss or pair loss)."""
    import torch

    if task.sequence_head:
        return sequence_loss(net, rows, cfg.batch_size, pad_id, device)
    if task.kind == "preference":
        total = 0.0
        with torch.no_grad():
            for i in range(0, len(rows), cfg.batch_size):
                chunk = rows[i : i + cfg.batch_size]
                total += preference.pair_loss(net, chunk, cfg.preference, pad_id, device)[0].item() * len(chunk)
        return total / max(len(rows), 1)
    return token_nll(net, rows, cfg.batch_size, pad_id, device, progress=False)[0]


def should_stop(cfg: TrainConfig, task: Task, net: Any, rows: list[dict], pad_id: int, device: str,
                state: dict) -> bool:
    """Evaluate the eval loss; count evaluations without improvement against the patience."""
    es = cfg.early_stopping
    assert es is not None
    net.eval()
    loss = eval_loss(cfg, task, net, rows, pad_id, device)
    net.train()
    state["evals"].append({"step": state["step"], "loss": loss})
    if state["best_eval"] is None or loss < state["best_eval"] - es.min_delta:
        state["best_eval"], state["bad_evals"] = loss, 0
    else:
        state["bad_evals"] += 1
    state["stopped_early"] = state["bad_evals"] >= es.patience
    return state["stopped_early"]


def peak_memory_gib(device: str) -> float:
    """Peak memory so far: CUDA max allocated, or the process's max RSS on CPU."""
    import torch

    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return round(peak / 2**30, 3)


def train_report(cfg: TrainConfig, net: Any, state: dict, device: str, planned: int, processes: int = 1
                 ) -> dict[str, Any]:
    return {
        "method": cfg.method,
        "device": device,
        "processes": processes,
        "distributed": cfg.distributed if processes > 1 else None,
        "trainable_params": sum(p.numel() for p in net.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in net.parameters()),
        "steps": state["step"],
        "planned_steps": planned,
        "tokens_seen": state["tokens"],
        "tokens_per_s": round(state["tokens"] / max(state["seconds"], 1e-9), 1),
        "wall_seconds": round(state["seconds"], 2),
        "peak_memory_gib": peak_memory_gib(device),
        "peak_memory_kind": ("cuda max allocated" if device == "cuda" else "process max RSS")
                            + (" (rank 0)" if processes > 1 else ""),
        "stopped_early": state["stopped_early"],
        "resumed_from": state["resumed_from"],
        "evals": state["evals"],
    }


def point_adapter_at_base(folder: Path, base_uri: str) -> None:
    """peft records the local temp folder as the base; record the base artifact instead."""
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base_uri
    path.write_text(json.dumps(config, indent=2))


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
