"""The losses of the training loop: one micro-batch's loss as the task defines it (``batch_loss``), the
chunked output projection + cross-entropy (``chunked_loss``, train.loss_chunk_tokens), the eval losses
(token NLL, sequence loss, pair loss,
masked-LM loss on fixed masks, seq2seq target NLL), and the exact weighting of a data-parallel rank's share of a
micro-batch (``share_of``, ``loss_module``; docs/DESIGN.md, "Data parallelism")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from steps.config import TrainConfig
from steps.core.contract import IGNORE, Task
from steps.train import mlm, preference, reward, seq2seq
from steps.train.batching import PACKED_FORWARD, collate, pack
from steps.train.methods.common import language_model
from steps.train.parallel import Group


def batch_loss(net: Any, rows: list[dict], task: Task, cfg: TrainConfig, pad_id: int, device: str,
               budget: int = 0) -> tuple[Any, int, dict[str, float]]:
    """(loss, real tokens in the batch, extra metrics) of one micro-batch, as the task defines the loss."""
    if task.kind == "preference":
        return preference.pair_loss(net, rows, cfg.preference, pad_id, device)
    if task.kind == "reward":
        return reward.pair_loss(net, rows, cfg.preference, pad_id, device)
    if task.kind == "mlm":
        return mlm.masked_loss(net, rows, cfg.mlm, task, pad_id, device)
    if task.kind == "seq2seq":
        return seq2seq.seq2seq_loss(net, rows, pad_id, device)
    if cfg.packing:
        batch = {k: v.to(device) for k, v in pack(rows, budget).items()}
        tokens = batch["input_ids"].numel()
    else:
        batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
        tokens = int(batch["attention_mask"].sum())
    if cfg.loss_chunk_tokens:
        return chunked_loss(net, batch, cfg.loss_chunk_tokens), tokens, {}
    return net(**batch, **PACKED_FORWARD).loss, tokens, {}


def chunked_loss(net: Any, batch: dict[str, Any], chunk_tokens: int) -> Any:
    """Mean next-token cross-entropy over label positions, computed chunk by chunk."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    lm = language_model(net)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = lm.get_decoder()(**inputs, **PACKED_FORWARD).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    hidden, targets = hidden[:, :-1][keep], targets[keep]
    weight = lm.get_output_embeddings().weight
    head = head_transform(lm.config)

    def piece(h: Any, t: Any, w: Any) -> Any:
        return F.cross_entropy(head((h @ w.t()).float()), t, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_tokens):
        end = start + chunk_tokens
        total = total + checkpoint(piece, hidden[start:end], targets[start:end], weight, use_reentrant=False)
    return total / max(targets.numel(), 1)


def head_transform(config: Any) -> Any:
    """What the model's own head does to the projected logits (``chunked_loss`` projects by itself):
    Gemma 2/3's final soft-capping, Cohere's ``logit_scale``, Granite's ``logits_scaling``."""
    import torch

    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None) if config.model_type.startswith("cohere") else None
    divide = getattr(config, "logits_scaling", None) if config.model_type.startswith("granite") else None

    def transform(logits: Any) -> Any:
        if scale is not None:
            logits = logits * scale
        if divide is not None:
            logits = logits / divide
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


def token_nll(net: Any, rows: list[dict[str, Any]], batch_size: int, pad_id: int, device: str,
              progress: bool = True) -> tuple[float, int]:
    """Mean negative log-likelihood per label token, summed exactly over all rows."""
    import torch

    from steps.core.progress import progress as bar

    total, count = 0.0, 0
    rows = sorted(rows, key=lambda r: len(r["input_ids"]))  # similar lengths per batch: little padding, same sum
    starts = range(0, len(rows), batch_size)
    with torch.no_grad():
        for i in bar(starts, desc="perplexity", unit="batch", disable=not progress):
            batch = {k: v.to(device) for k, v in collate(rows[i : i + batch_size], pad_id).items()}
            sums, counts = label_nll(net, batch)
            total += float(sums.sum())
            count += int(counts.sum())
    return total / max(count, 1), count


def label_nll(net: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """Per row of a causal LM batch: the summed next-token NLL of its label tokens, and their count.

    The output projection runs only at the positions where some row has a label (``logits_to_keep``:
    the model's own head, so soft-capping or logit scaling still apply), not over the whole sequence:
    with a 49k vocabulary it was most of the cost on a small model (a tiny Llama's record losses of 50
    rows: 2.4 -> 0.5 CPU-s, same values). A model without ``logits_to_keep``, or one that reads the
    labels (reft), gets every position's logits."""
    import torch

    targets = batch["labels"][:, 1:]
    inputs = forward_inputs(net, batch)
    if keeps_logits(net):
        positions = (targets != IGNORE).any(dim=0).nonzero()[:, 0]
        if not len(positions):
            zeros = torch.zeros(len(targets), device=targets.device)
            return zeros, zeros.long()
        logits = net(**inputs, logits_to_keep=positions).logits
        targets = targets[:, positions]
    else:
        logits = net(**inputs).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(  # flat (N, vocab): the fast kernel
        logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE, reduction="none",
    ).view(targets.shape)
    return nll.sum(dim=1), (targets != IGNORE).sum(dim=1)


def keeps_logits(net: Any) -> bool:
    """Whether ``net``'s forward takes ``logits_to_keep`` (positions whose logits it computes) and does
    not read the labels itself."""
    import inspect

    if getattr(net, "reads_labels", False):
        return False
    return "logits_to_keep" in inspect.signature(language_model(net).forward).parameters


def forward_inputs(net: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """The batch for a forward whose logits the caller scores itself: without labels (the model would compute
    a loss over the whole vocabulary again, about as costly as the forward), except for a model that reads
    them (reft places its interventions by the prompt/answer split)."""
    return batch if getattr(net, "reads_labels", False) else {k: v for k, v in batch.items() if k != "labels"}


def record_losses(net: Any, task: Task, sides: dict[str, list[dict]], batch_size: int, pad_id: int, device: str
                  ) -> list[dict[str, Any]]:
    """Per record of each side: ``{"id", "split", "loss", "tokens"}``, the mean loss the trained model
    gives it (token NLL of its label tokens, over all its rows: a windowed conversation is one record;
    a sequence head's cross-entropy or squared error; a preference pair's chosen answer; a reward model's pair
    loss; a masked-LM block's fixed masked positions; a seq2seq record's target tokens). Highest first."""
    import torch

    from steps.core.progress import progress as bar

    sums: dict[tuple[str, str], list[float]] = {}
    net.eval()
    # A forward over every record: on the shipped 135M model and 2 CPU cores about as long as 60 steps of
    # training (the default run's 1,380 records: ~4.5 min), hence the progress bar.
    progress = bar(total=sum(len(rows) for rows in sides.values()), desc="record losses", unit="rec")
    with torch.no_grad(), progress:
        for side, rows in sides.items():
            if task.kind == "reward":  # a pair's Bradley-Terry loss -log sigmoid(r_chosen - r_rejected)
                for i in range(0, len(rows), batch_size):
                    chunk = rows[i:i + batch_size]
                    progress.update(len(chunk))
                    good, bad, _ = reward.pair_scores(net, chunk, pad_id, device)
                    for row, value in zip(chunk, reward.bradley_terry_loss_per_pair(good, bad).tolist()):
                        sums[(side, str(row["id"]))] = [value, 1]
                continue
            if task.kind == "mlm":  # a block's NLL on its fixed masked positions (mlm.fixed_mask)
                assert task.mask_token_id is not None
                scores = mlm.masked_scores(net, rows, task.mask_token_id, batch_size, pad_id, device)
                progress.update(len(rows))
                for row, (total, count, _) in zip(rows, scores):
                    sums[(side, str(row["id"]))] = [total, count]
                continue
            if task.kind == "seq2seq":
                progress.update(len(rows))
                for row, (total, count) in zip(rows, seq2seq.row_nll(net, rows, batch_size, pad_id, device)):
                    sums[(side, str(row["id"]))] = [total, count]
                continue
            rows = sorted(rows, key=lambda r: len(r["input_ids"]))  # similar lengths per batch: little padding
            for i in range(0, len(rows), batch_size):
                chunk = rows[i:i + batch_size]
                progress.update(len(chunk))
                batch = {k: v.to(device) for k, v in collate([_as_single(r) for r in chunk], pad_id).items()}
                if task.sequence_head:
                    logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
                    labels = batch["labels"]
                    if task.kind == "regression":
                        losses = (logits.squeeze(-1) - labels) ** 2
                    else:
                        losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
                    per_row = [(float(v), 1) for v in losses.tolist()]
                else:
                    nll_sums, counts = label_nll(net, batch)
                    per_row = list(zip(nll_sums.tolist(), counts.tolist()))
                for row, (total, count) in zip(chunk, per_row):
                    entry = sums.setdefault((side, str(row["id"])), [0.0, 0])
                    entry[0] += total
                    entry[1] += int(count)
    out = [{"id": record_id, "split": side, "loss": round(total / max(count, 1), 6), "tokens": count}
           for (side, record_id), (total, count) in sums.items()]
    return sorted(out, key=lambda r: -r["loss"])


def _as_single(row: dict) -> dict:
    """A row as ``collate`` takes it: a preference pair's chosen conversation only."""
    return {k: v for k, v in row.items() if k in ("input_ids", "labels", "label")}


def sequence_loss(net: Any, rows: list[dict[str, Any]], batch_size: int, pad_id: int, device: str) -> float:
    """Mean loss per row of a sequence-head model (cross-entropy or MSE), summed exactly over all rows."""
    import torch

    total = 0.0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
            total += net(**batch).loss.item() * len(chunk)
    return total / max(len(rows), 1)


def eval_loss(cfg: TrainConfig, task: Task, net: Any, rows: list[dict], pad_id: int, device: str) -> float:
    """Mean eval loss in the training objective's own terms (token NLL, sequence loss, pair loss, or the NLL of
    the fixed masked positions)."""
    import torch

    if task.kind == "reward":
        return reward.pair_metrics(*reward.score_pairs(net, rows, cfg.batch_size, pad_id, device))["eval_loss"]
    if task.kind == "mlm":
        assert task.mask_token_id is not None
        scores = mlm.masked_scores(net, rows, task.mask_token_id, cfg.batch_size, pad_id, device)
        return sum(s[0] for s in scores) / max(sum(s[1] for s in scores), 1)
    if task.sequence_head:
        return sequence_loss(net, rows, cfg.batch_size, pad_id, device)
    if task.kind == "seq2seq":
        return seq2seq.mean_nll(net, rows, cfg.batch_size, pad_id, device)[0]
    if task.kind == "preference":
        total = 0.0
        with torch.no_grad():
            for i in range(0, len(rows), cfg.batch_size):
                chunk = rows[i : i + cfg.batch_size]
                total += preference.pair_loss(net, chunk, cfg.preference, pad_id, device)[0].item() * len(chunk)
        return total / max(len(rows), 1)
    return token_nll(net, rows, cfg.batch_size, pad_id, device, progress=False)[0]


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
    if task.kind == "seq2seq":  # the decoder learns every target token (no shift within the row)
        return sum(1 for t in labels if t != IGNORE)
    if cfg.packing and task.kind != "preference":
        labels = labels[:budget]  # pack() truncates a document longer than the budget
    return sum(1 for t in labels[1:] if t != IGNORE)


def row_tokens(rows: list[dict], task: Task, cfg: TrainConfig, budget: int) -> int:
    """The real tokens ``batch_loss`` would count for these rows."""
    if task.kind in ("preference", "reward"):
        return sum(len(r["input_ids"]) + len(r["rejected_ids"]) for r in rows)
    if task.kind == "seq2seq":
        return sum(len(r["input_ids"]) + len(r["labels"]) for r in rows)
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
