"""The training fast path for causal-LM tasks (SFT, continued pretraining):

- **padding-free packing with per-document attention** (``train.packing``): a micro-batch is
  one row of whole documents (rows of the tokenized data) concatenated up to
  ``train.tokens_per_batch`` tokens, with no padding. ``position_ids`` restart at 0 for each
  document and no attention mask is passed, so transformers builds a per-document causal
  mask (``masking_utils.find_packed_sequence_indices``): a block mask with ``flex_attention``
  (the default on CUDA), a dense boolean mask with ``sdpa``/``eager``. The forward pass must
  run with ``use_cache=False``: with a KV cache transformers skips the packed-sequence
  detection and documents silently attend to each other (``PACKED_FORWARD``). Documents never attend
  to each other, and the first label of every document is ignored, so each document's loss
  is exactly its loss alone (tested).
- **token-budget batching** (``pack_order``): rows are shuffled, length-sorted inside pools and
  packed first-fit into budgets, deterministic for the seed (a resumed run skips exactly the
  packs it trained on).
- **chunked linear + cross-entropy** (``train.loss_chunk_tokens``): the output projection and
  the loss run over chunks of label positions under activation checkpointing, so full fp32
  logits ``[tokens, vocab]`` are never materialised (with a 128k vocabulary they dominate
  memory); positions without a label skip the projection entirely.
"""

from __future__ import annotations

from typing import Any, Iterator

from steps.batching import IGNORE

PACKED_FORWARD = {"use_cache": False}


def pack_order(lengths: list[int], budget: int, seed: int) -> Iterator[list[int]]:
    """Endless shuffled packs (row indices) whose lengths sum to at most ``budget``.

    Rows longer than the budget form a pack of their own (and are truncated by ``pack``).
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(lengths), generator=generator).tolist()
        packs: list[list[int]] = []
        pool = max(64, 50 * max(1, budget // max(1, sum(lengths) // max(1, len(lengths)))))
        for start in range(0, len(order), pool):
            chunk = sorted(order[start : start + pool], key=lambda j: -lengths[j])
            bins: list[list[int]] = []
            room: list[int] = []
            for j in chunk:  # first fit, longest first: few, full packs
                for b, free in enumerate(room):
                    if lengths[j] <= free:
                        bins[b].append(j)
                        room[b] -= lengths[j]
                        break
                else:
                    bins.append([j])
                    room.append(budget - lengths[j])
            packs += bins
        for p in torch.randperm(len(packs), generator=generator).tolist():
            yield packs[p]


def pack(rows: list[dict[str, Any]], budget: int) -> dict[str, Any]:
    """One padding-free row: ``input_ids``, ``labels`` and per-document ``position_ids`` ([1, T])."""
    import torch

    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for r in rows:
        doc = list(r["input_ids"])[: budget - len(ids)]
        if not doc:
            break
        target = list(r.get("labels", r["input_ids"]))[: len(doc)]
        target[0] = IGNORE  # nothing in this document predicts its first token
        ids += doc
        labels += target
        positions += range(len(doc))
    as_row = lambda seq: torch.tensor([seq])  # noqa: E731
    return {"input_ids": as_row(ids), "labels": as_row(labels), "position_ids": as_row(positions)}


def language_model(net: Any) -> Any:
    """The causal LM inside a training wrapper (peft), sharing its modules."""
    return net.get_base_model() if hasattr(net, "get_base_model") else net


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

    def piece(h: Any, t: Any, w: Any) -> Any:
        return F.cross_entropy((h @ w.t()).float(), t, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_tokens):
        end = start + chunk_tokens
        total = total + checkpoint(piece, hidden[start:end], targets[start:end], weight, use_reentrant=False)
    return total / max(targets.numel(), 1)
