"""Masked-LM domain adaptation (task mlm: text records on an encoder base).

    inputs, labels = mask_tokens(ids, words, train.mlm, mask_token_id, vocab_size)   # one micro-batch, drawn anew
    loss, tokens, metrics = masked_loss(net, rows, train.mlm, task, pad_id, device)   # the training loop's loss
    scores = masked_scores(net, rows, mask_token_id, batch_size, pad_id, device)      # fixed masks: eval, early stop

Dynamic masking: each micro-batch chooses ``probability`` of its tokens from torch's global RNG (a checkpoint
saves its state, so a resumed run masks exactly as an uninterrupted one); special tokens (``word_ids`` None:
[CLS], the [SEP] between documents, [UNK]) and padding are never chosen. Of the chosen tokens,
``mask_replace_prob`` become the mask token, ``random_replace_prob`` a random token and the rest stay; with
``whole_word`` all pieces of a word share one draw. The loss is the cross-entropy on the chosen positions only,
and only they go through the output head (``chosen_logits``): with a 30k vocabulary, projecting every position
costs about as much as the whole encoder (MiniLM: 49 of 92 GFLOP per 2,048 tokens).

Evaluation masks each row with its own seeded generator (``fixed_mask``): ``EVAL_PROBABILITY`` of its tokens, all
replaced by the mask token, the same positions for every model, batch size and order. Pseudo-perplexity masks
each token in turn (``pseudo_nll``).
"""

from __future__ import annotations

import zlib
from typing import Any

from steps.config import MlmSettings
from steps.core.contract import IGNORE, Task
from steps.train.batching import collate
from steps.train.methods.common import language_model

EVAL_PROBABILITY = 0.15  # share of a held-out block's tokens masked for masked_accuracy
EVAL_SEED = 0


def word_tensor(rows: list[dict], width: int) -> Any:
    """The rows' ``word_ids`` padded to ``width``: -1 for special tokens and padding (never masked)."""
    import torch

    return torch.tensor([[-1 if w is None else w for w in r["word_ids"]] + [-1] * (width - len(r["word_ids"]))
                         for r in rows])


def choose(words: Any, probability: float, whole_word: bool, generator: Any = None) -> Any:
    """Which positions to predict: each maskable token (word id >= 0) with ``probability``; with ``whole_word``
    every piece of a word takes the draw of its first piece, so a word is chosen whole or not at all."""
    import torch

    maskable = words >= 0
    draws = torch.rand(words.shape, generator=generator)
    if whole_word:
        previous = torch.cat([torch.full_like(words[:, :1], -1), words[:, :-1]], dim=1)
        starts = maskable & (words != previous)
        positions = torch.arange(words.size(1)).expand_as(words)
        first = torch.where(starts, positions, 0).cummax(dim=1).values  # each position's word start
        draws = draws.gather(1, first)
    return maskable & (draws < probability)


def mask_tokens(input_ids: Any, words: Any, settings: MlmSettings, mask_token_id: int, vocab_size: int,
                generator: Any = None) -> tuple[Any, Any]:
    """(inputs, labels) of one micro-batch: the chosen positions (``choose``) replaced 80/10/10 (``settings``),
    labels the original ids there and IGNORE elsewhere. ``generator`` None: torch's global RNG."""
    import torch

    chosen = choose(words, settings.probability, settings.whole_word, generator)
    how = torch.rand(input_ids.shape, generator=generator)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator)
    masked = chosen & (how < settings.mask_replace_prob)
    randomised = chosen & ~masked & (how < settings.mask_replace_prob + settings.random_replace_prob)
    inputs = torch.where(masked, mask_token_id, torch.where(randomised, random_ids, input_ids))
    return inputs, torch.where(chosen, input_ids, IGNORE)


def masked_loss(net: Any, rows: list[dict], settings: MlmSettings, task: Task, pad_id: int, device: str
                ) -> tuple[Any, int, dict[str, float]]:
    """(mean cross-entropy on the chosen positions, real tokens, {"masked_accuracy"}) of one micro-batch, masked
    anew from torch's global RNG."""
    batch = collate([{"input_ids": r["input_ids"]} for r in rows], pad_id)
    words = word_tensor(rows, batch["input_ids"].size(1))
    assert task.mask_token_id is not None, "masked-LM data records its mask token (tokenize)"
    inputs, labels = mask_tokens(batch["input_ids"], words, settings, task.mask_token_id, net.config.vocab_size)
    chosen = labels != IGNORE
    logits = chosen_logits(net, inputs, batch["attention_mask"], chosen, device)
    loss, correct, count = chosen_loss(logits, labels[chosen].to(device))
    return loss / max(count, 1), int(batch["attention_mask"].sum()), {"masked_accuracy": correct / max(count, 1)}


def chosen_logits(net: Any, input_ids: Any, attention_mask: Any, chosen: Any, device: str) -> Any:
    """The logits [chosen positions, vocab] of a forward in which the head sees only the ``chosen`` positions'
    hidden states (a forward hook on the backbone keeps them; heads are position-wise). ``chosen`` is a CPU
    tensor: its indices are found there, so selecting them does not wait for the device."""
    index = chosen.flatten().nonzero()[:, 0].to(device)

    def keep(module: Any, args: Any, output: Any) -> Any:
        output["last_hidden_state"] = output["last_hidden_state"].flatten(0, 1).index_select(0, index)[None]
        return output

    hook = language_model(net).base_model.register_forward_hook(keep)
    try:
        return net(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits[0]
    finally:
        hook.remove()


def chosen_loss(logits: Any, targets: Any) -> tuple[Any, int, int]:
    """(summed cross-entropy, right predictions, count) of the chosen positions' logits against their tokens."""
    import torch

    logits = logits.float()
    loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    return loss, int((logits.argmax(-1) == targets).sum()), len(targets)


def fixed_mask(row: dict, probability: float = EVAL_PROBABILITY, seed: int = EVAL_SEED) -> list[bool]:
    """The positions of ``row`` that evaluation masks: drawn from a generator seeded by the row's id, so every
    model is scored on the same positions wherever the row stands."""
    import torch

    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{row['id']}".encode()))
    words = word_tensor([row], len(row["input_ids"]))
    return choose(words, probability, False, generator)[0].tolist()


def masked_scores(net: Any, rows: list[dict], mask_token_id: int, batch_size: int, pad_id: int, device: str
                  ) -> list[tuple[float, int, int]]:
    """Per row: (summed NLL of its ``fixed_mask`` positions, their count, how many the model predicts right),
    each masked position replaced by the mask token."""
    import torch

    scores: list[tuple[float, int, int]] = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            batch = collate([{"input_ids": r["input_ids"]} for r in chunk], pad_id)
            width = batch["input_ids"].size(1)
            chosen = torch.tensor([fixed_mask(r) + [False] * (width - len(r["input_ids"])) for r in chunk])
            inputs = torch.where(chosen, mask_token_id, batch["input_ids"])
            logits = chosen_logits(net, inputs, batch["attention_mask"], chosen, device)
            targets = batch["input_ids"][chosen].to(device)
            sizes = chosen.sum(dim=1).tolist()  # the chosen positions come row by row
            for row_logits, row_targets in zip(logits.split(sizes), targets.split(sizes)):
                loss, correct, count = chosen_loss(row_logits, row_targets)
                scores.append((float(loss), count, correct))
    return scores


def pseudo_nll(net: Any, rows: list[dict], max_tokens: int, mask_token_id: int, batch_size: int, device: str
               ) -> tuple[float, int]:
    """(summed NLL, tokens) of the first ``max_tokens`` maskable tokens of ``rows``, each predicted with itself
    masked and the rest of its block visible (pseudo-log-likelihood; one forward per token)."""
    import torch

    positions = [(i, t) for i, r in enumerate(rows) for t, w in enumerate(r["word_ids"]) if w is not None]
    positions = positions[:max_tokens]
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(positions), batch_size):
            chunk = positions[start:start + batch_size]
            ids = torch.tensor([rows[i]["input_ids"] for i, _ in chunk])  # the blocks of a dataset are one length
            chosen = torch.zeros_like(ids, dtype=torch.bool)
            chosen[torch.arange(len(chunk)), torch.tensor([t for _, t in chunk])] = True
            logits = chosen_logits(net, torch.where(chosen, mask_token_id, ids), torch.ones_like(ids), chosen, device)
            total += float(chosen_loss(logits, ids[chosen].to(device))[0])
    return total, len(positions)
