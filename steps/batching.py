"""Batches of token rows: padding, length-grouped shuffling, and exact token NLL."""

from __future__ import annotations

from typing import Any, Iterator

IGNORE = -100


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


def token_nll(net: Any, rows: list[dict[str, Any]], batch_size: int, pad_id: int, device: str,
              progress: bool = True) -> tuple[float, int]:
    """Mean negative log-likelihood per label token, summed exactly over all rows."""
    import torch
    from tqdm import tqdm

    total, count = 0.0, 0
    rows = sorted(rows, key=lambda r: len(r["input_ids"]))  # similar lengths per batch: little padding, same sum
    starts = range(0, len(rows), batch_size)
    with torch.no_grad():
        for i in tqdm(starts, desc="perplexity", unit="batch", mininterval=2, disable=not progress):
            batch = {k: v.to(device) for k, v in collate(rows[i : i + batch_size], pad_id).items()}
            # labels go in too: methods such as reft place their interventions by the prompt/answer split.
            logits = net(**batch).logits
            targets = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                ignore_index=IGNORE, reduction="sum",
            )
            total += nll.item()
            count += int((targets != IGNORE).sum())
    return total / max(count, 1), count
