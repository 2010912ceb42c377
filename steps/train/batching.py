"""Batches of token rows: padded micro-batches in length-grouped order (``collate``, ``batch_order``), or
padding-free packed rows of whole documents in token-budget order (``pack``, ``pack_order``; train.packing).

A packed row restarts ``position_ids`` at 0 for every document and passes no attention mask, so
transformers builds a per-document causal mask; its forward must run with ``PACKED_FORWARD``
(docs/DESIGN.md, "Training fast path")."""

from __future__ import annotations

from typing import Any, Iterator

from steps.core.contract import IGNORE


def collate(rows: list[dict[str, Any]], pad_id: int, left: bool = False) -> dict[str, Any]:
    """Pad rows to the longest one; labels are IGNORE on padding.

    Rows with a sequence ``label`` (classification index or regression value) get one
    label per row instead of one per token.
    """
    import torch

    if "label" in rows[0]:
        batch = collate([{"input_ids": r["input_ids"]} for r in rows], pad_id, left)
        values = [r["label"] for r in rows]
        batch["labels"] = torch.tensor(values, dtype=torch.float32 if isinstance(values[0], float) else torch.long)
        return batch

    width = max(len(r["input_ids"]) for r in rows)
    ids, labels, mask = [], [], []
    for r in rows:
        pad = width - len(r["input_ids"])
        fill = lambda seq, value: ([value] * pad + seq) if left else (seq + [value] * pad)  # noqa: E731
        ids.append(fill(list(r["input_ids"]), pad_id))
        labels.append(fill(list(r.get("labels", r["input_ids"])), IGNORE))
        mask.append(fill([1] * len(r["input_ids"]), 0))
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


def batch_order(lengths: list[int], batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless shuffled batches (row indices) of similar lengths, the same for the same seed.

    Rows are shuffled, cut into pools of 50 batches, sorted by length inside each pool, and
    the resulting batches shuffled again: order stays random, padding mostly disappears.
    Deterministic, so a resumed run skips exactly the batches it already trained on.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    pool = 50 * batch_size
    while True:
        order = torch.randperm(len(lengths), generator=generator).tolist()
        batches: list[list[int]] = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start : start + pool], key=lambda j: lengths[j])
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[b]

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
