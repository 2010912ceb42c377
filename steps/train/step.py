"""Train: fine-tune the base model on the tokenized train split, resumable from the store.

    train_model(TrainConfig(method="lora", max_steps=60), tokenized, base_model, store)

One loop for every method (``methods/``) and task (the tokenized data's ``task`` stat); checkpoints
every ``checkpoint_every`` steps (``checkpoints.py``), resumed by a retry; ``processes > 1`` runs the
loop in N data-parallel ranks (``parallel.py``). How the loop, resume and the ranks work:
docs/DESIGN.md, "Training loop" and "Data parallelism".
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from steps.config import TrainConfig
from steps.core.contract import RECORD_LOSSES, Task
from steps.core.device import dtype_for, peak_memory_gib, pick_device, tune_allocator
from steps.core.errors import ArtifactError
from steps.core.lineage import run_key
from steps.core.progress import progress as bar
from steps.core.store import ArtifactRef, ArtifactStore, DatasetRef, ModelRef
from steps.core.study import report_eval
from steps.train import fastpath, methods, parallel, ppo, preference, rl
from steps.train.batching import batch_order, pack_order
from steps.train.checkpoints import Checkpoints
from steps.train.losses import eval_loss, loss_module, record_losses, share_of
from steps.train.parallel import SINGLE, Group
from steps.train.planner import PeakMeter, import_method_libraries, plan_memory

log = logging.getLogger(__name__)

STEP = "train"
# Building a model sets process-wide state (transformers' meta-device loading, its init switches, the seed):
# trainings in threads of one process (a sweep's parallel trials) build one at a time.
BUILDING = threading.Lock()


def train_model(cfg: TrainConfig, data: DatasetRef, model: ModelRef, store: ArtifactStore) -> ModelRef:
    """Train ``model``'s base on ``data`` (a tokenize artifact) with ``cfg``; returns the base plus the trained weights.

    Writes the method's weights (safetensors: adapter, head or full weights, ``method.json``),
    ``train_log.json`` (loss and learning rate per step), ``train_report.json`` (parameters,
    tokens, throughput, memory, time) and, with ``record_losses``, ``record_losses.jsonl`` (each
    train and eval record's loss after training). Resumes from the newest checkpoint of the same run key.
    Raises ``ConfigError`` for settings the model or machine cannot run (e.g. more processes than
    GPUs), ``ArtifactError`` when the data-parallel ranks committed nothing.
    """
    key = run_key(STEP, cfg, [data.digest, model.base.digest])
    if (done := store.lookup(STEP, key)) is not None:
        return ModelRef(base=model.base, adapter=ArtifactRef(**done.model_dump()))
    if cfg.processes > 1:
        parallel.launch(cfg, data, model, store, key)  # rank 0 of the torchrun job commits the artifact
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
    tune_allocator()
    task = Task.of_data(data.stats)
    base_dir = store.download(model.base)
    rows = store.read_jsonl(data, "train.jsonl")
    eval_rows = store.read_jsonl(data, "eval.jsonl") if cfg.early_stopping else []
    lengths = [len(r["input_ids"]) for r in rows]
    if task.kind == "rl":  # the memory of a step: every sampled completion after its prompt, in one forward
        planned = cfg.model_copy(update={"batch_size": cfg.rl.prompts_per_step * cfg.rl.group_size})
        plan = plan_memory(planned, base_dir, task, device, seq_len=max(lengths) + cfg.rl.max_new_tokens)
    else:
        plan = plan_memory(cfg, base_dir, task, device, seq_len=max(lengths))  # before loading: fits, or fails here
    fastpath.check_switches(cfg, device)
    import_method_libraries(cfg.method)
    meter = PeakMeter(device)  # from here on: the memory training takes
    meter.start()
    if plan["auto"]:
        log.info("train: batch_size auto -> %d x %d accumulation (estimate %.3f GiB of %.1f GiB)", plan["micro_batch"],
                 plan["grad_accum_steps"], plan["estimate"]["total_gib"], plan["device_gib"])
        cfg = cfg.model_copy(update={"batch_size": plan["micro_batch"], "grad_accum_steps": plan["grad_accum_steps"]})
    with BUILDING:
        torch.manual_seed(cfg.seed)
        net = methods.prepare(cfg, base_dir, device, task)
        reference = (preference.Reference(net, base_dir, device, cfg.batch_size)
                     if task.kind == "preference" and cfg.preference.loss == "dpo" else None)
    rollout = None
    if task.kind == "rl":  # online RL: sampling, rewards and the clipped loss (steps/train/rl.py)
        from transformers import AutoTokenizer

        rollout = ppo.make_rollout(net, AutoTokenizer.from_pretrained(base_dir), base_dir, cfg.rl, device,
                                   net.config.pad_token_id or 0)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(net)
    fastpath.speed_up(cfg, net)  # train.kernels, train.compile
    pad_id = net.config.pad_token_id or 0
    # The loss of this rank's share of a micro-batch, as a module: DDP all-reduces gradients of its backward.
    trainer = group.wrap(loss_module(net, task, cfg, pad_id, device, group), net)
    named = [(name, p) for name, p in net.named_parameters() if p.requires_grad]  # (after fsdp made them DTensors)
    if rollout is not None:  # ppo's value head: trained and checkpointed with the policy, not saved with it
        named += rollout.parameters()
    if group.active:  # same initial weights on every rank (seeded above); independent dropout from here on
        torch.manual_seed(cfg.seed + group.rank)
    optimizer = make_optimizer(cfg, [p for _, p in named], device)
    per_batch = cfg.rl.prompts_per_step if rollout is not None else cfg.batch_size  # rows per micro-batch
    total = cfg.max_steps or math.ceil(cfg.epochs * math.ceil(len(rows) / per_batch) / cfg.grad_accum_steps)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round((cfg.warmup_ratio or 0.0) * total)
    scheduler = get_scheduler("constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler,
                              optimizer, num_warmup_steps=warmup, num_training_steps=total)

    checkpoints = Checkpoints(store, key, cfg)
    state: dict[str, Any] = {"step": 0, "history": [], "evals": [], "tokens": 0, "seconds": 0.0,
                             "best_eval": None, "bad_evals": 0, "stopped_early": False, "resumed_from": None}
    if (latest := checkpoints.latest()) is not None:
        state = checkpoints.restore(latest, named, optimizer, scheduler, group)
        state["resumed_from"] = state["step"]
        if rollout is not None:
            rollout.load(state.get("rl", {}))
        log.info("train: resuming from checkpoint at step %d", state["step"])
    budget = cfg.tokens_per_batch or cfg.batch_size * max(lengths)
    order = pack_order(lengths, budget, cfg.seed) if cfg.packing else batch_order(lengths, per_batch, cfg.seed)
    for _ in range(state["step"] * cfg.grad_accum_steps):  # data position: skip what was trained on
        next(order)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.time() - state["seconds"]
    trainer.train()
    progress = bar(range(state["step"] + 1, total + 1), desc="train", unit="step", initial=state["step"], total=total,
                   disable=not group.main, leave=True)
    quarter = max(1, -(-total // 4))  # without a bar (not a terminal): a log line at each quarter instead
    for step in progress:
        tokens, logged = 0, {}
        for micro in range(cfg.grad_accum_steps if rollout is None else 0):
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
        if rollout is not None:  # one process (config): sample a batch of groups, then its clipped-loss update(s)
            sampled = rollout.sample([rows[i] for i in next(order)])
            tokens, logged = sampled.tokens, dict(sampled.metrics)
            for update in range(cfg.rl.iterations):
                loss, metrics = rollout.loss(sampled)
                loss.backward()
                logged |= {"loss": loss.item(), **metrics} if update == 0 else {}
                if update < cfg.rl.iterations - 1:  # the last update is the loop's own step below
                    torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
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
        if group.main and progress.disable and step % quarter == 0 and step < total:
            log.info("train: step %d of %d, loss %.3f%s", step, total, step_loss,
                     f", reward {logged['reward']:.3f}, kl {logged.get('kl', 0.0):.3f}" if "reward" in logged else "")
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
            if rollout is not None:
                state["rl"] = rollout.state()
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
        report = train_report(cfg, net, state, device, total, group.world) | memory_report(plan, meter)
        writer = store.writer(STEP, key, cfg, inputs=[data, model.base])
        writer.put_dir(out)
        if cfg.record_losses and task.kind != "rl":  # after saving: the eval-mode forwards change no weight
            sides = {"train": rows, "eval": eval_rows or store.read_jsonl(data, "eval.jsonl")}
            writer.put_jsonl(RECORD_LOSSES, record_losses(net, task, sides, cfg.batch_size, pad_id, device))
        writer.put_json("train_log.json", state["history"])
        writer.put_json("train_report.json", report)
        ref = writer.commit(stats={
            "method": cfg.method, "task": task.kind, "steps": state["step"], "first_loss": state["history"][0]["loss"],
            "final_loss": state["history"][-1]["loss"], "tokens_seen": state["tokens"],
            "tokens_per_s": report["tokens_per_s"], "trainable_params": report["trainable_params"],
            "device": device, "stopped_early": state["stopped_early"], "resumed_from": state["resumed_from"],
            **({"rl_curve": rl.curve(state["history"])} if rollout is not None else {}),
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

    net = methods.prepare(cfg, base_dir, "cpu", task).to(dtype_for(device, cfg.precision))
    params = dict(net.named_parameters())
    with torch.no_grad():
        for name, value in trained.items():
            params[name].data = value.detach().cpu()
    return net


def make_optimizer(cfg: TrainConfig, params: list[Any], device: str) -> Any:
    import torch

    from steps.train import master

    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=0.9, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    fused = cfg.fused_adamw if cfg.fused_adamw is not None else device == "cuda"
    if master.wanted(cfg, params):  # bf16 weights: the update lands on an fp32 copy (steps/train/master.py)
        return master.MasterAdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=fused)


def enable_gradient_checkpointing(net: Any) -> None:
    net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(net, "enable_input_require_grads"):  # frozen embeddings: keep a grad path into checkpointed blocks
        net.enable_input_require_grads()
    net.config.use_cache = False


def should_stop(cfg: TrainConfig, task: Task, net: Any, rows: list[dict], pad_id: int, device: str,
                state: dict) -> bool:
    """Evaluate the eval loss; count evaluations without improvement against the patience; a sweep trial's
    (``early_stopping.trial``) also stops when its study's pruner prunes it."""
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
    # A sweep trial's eval losses go to its study, whose pruner stops a bad trial here.
    pruned = es.trial is not None and report_eval(es.trial.study, es.trial.number, loss, state["step"])
    state["stopped_early"] = pruned or state["bad_evals"] >= es.patience
    return state["stopped_early"]


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


def memory_report(plan: dict[str, Any], meter: PeakMeter) -> dict[str, Any]:
    """The planner's estimate next to the measured peak, and the estimate's relative error."""
    measured = meter.peak_gib()
    estimate = plan["estimate"]["total_gib"]
    error = round(estimate / measured - 1, 3) if measured else None
    return {"memory_plan": plan, "measured_peak_gib": measured, "estimate_error": error}


def point_adapter_at_base(folder: Path, base_uri: str) -> None:
    """peft records the local temp folder as the base; record the base artifact instead."""
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base_uri
    path.write_text(json.dumps(config, indent=2))


