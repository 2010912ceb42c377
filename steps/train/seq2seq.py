"""Sequence-to-sequence training and scoring (task seq2seq: {input, target} records on an encoder-decoder such as
T5 or BART, ``AutoModelForSeq2SeqLM``).

    loss, tokens, metrics = seq2seq_loss(net, rows, pad_id, device)           # the training loop's loss
    sums, counts = target_nll(net, batch)                                     # per row: summed NLL of its targets
    answers = generate(net, tokenizer, ["translate: ..."], 64, 8, device)     # greedy targets for inputs

A row is ``{"input_ids", "labels"}`` (steps/tokenize/encode.py: ``encode_seq2seq``). The encoder reads the input;
the decoder reads the labels shifted right behind the model's ``decoder_start_token_id`` (the model does this
itself from ``labels``) and is trained on every label token: the loss is the mean cross-entropy over the
target tokens of the micro-batch, padding excluded (IGNORE).
"""

from __future__ import annotations

from typing import Any

from steps.core.contract import IGNORE


def collate(rows: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Inputs padded on the right with ``pad_id`` (and their attention mask), labels with IGNORE: the two
    sides have their own widths."""
    import torch

    def padded(seqs: list[list[int]], value: int) -> Any:
        width = max(len(s) for s in seqs)
        return torch.tensor([list(s) + [value] * (width - len(s)) for s in seqs])

    inputs = [r["input_ids"] for r in rows]
    return {"input_ids": padded(inputs, pad_id), "attention_mask": padded([[1] * len(s) for s in inputs], 0),
            "labels": padded([r["labels"] for r in rows], IGNORE)}


def seq2seq_loss(net: Any, rows: list[dict], pad_id: int, device: str) -> tuple[Any, int, dict[str, float]]:
    """(mean target-token cross-entropy, real tokens read: inputs and targets, no metrics) of one micro-batch."""
    batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
    tokens = int(batch["attention_mask"].sum()) + int((batch["labels"] != IGNORE).sum())
    return net(**batch).loss, tokens, {}


def target_nll(net: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """Per row of a collated batch: the summed NLL of its target tokens, and their count."""
    import torch

    logits = net(**batch).logits.float()
    labels = batch["labels"]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                            ignore_index=IGNORE, reduction="none").view(labels.shape)
    return nll.sum(dim=1), (labels != IGNORE).sum(dim=1)


def row_nll(net: Any, rows: list[dict], batch_size: int, pad_id: int, device: str) -> list[tuple[float, int]]:
    """(summed target NLL, target tokens) of each row, in order."""
    import torch

    out: list[tuple[float, int]] = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate(rows[i:i + batch_size], pad_id).items()}
            sums, counts = target_nll(net, batch)
            out += list(zip(sums.tolist(), counts.tolist()))
    return out


def mean_nll(net: Any, rows: list[dict], batch_size: int, pad_id: int, device: str) -> tuple[float, int]:
    """Mean NLL per target token over all rows (summed exactly), and the token count."""
    scores = row_nll(net, rows, batch_size, pad_id, device)
    total, count = sum(s for s, _ in scores), sum(c for _, c in scores)
    return total / max(count, 1), count


def generate(net: Any, tokenizer: Any, inputs: list[str], max_new_tokens: int, batch_size: int, device: str,
             max_input_tokens: int | None = None) -> list[str]:
    """Greedy targets for ``inputs`` (encoded as in training: the tokenizer's special tokens, right padding),
    decoded without special tokens. ``max_input_tokens``: inputs are cut there as tokenize cut them."""
    import torch

    tokenizer.padding_side = "right"
    answers: list[str] = []
    for i in range(0, len(inputs), batch_size):
        chunk = inputs[i:i + batch_size]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=max_input_tokens is not None,
                        max_length=max_input_tokens, return_token_type_ids=False).to(device)
        with torch.no_grad():
            out = net.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                               max_new_tokens=max_new_tokens, do_sample=False)
        answers += [s.strip() for s in tokenizer.batch_decode(out, skip_special_tokens=True)]
    return answers


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Corpus ROUGE-L x100: the mean over pairs of the F-measure of the longest common subsequence of tokens, as
    Google's rouge_score computes it (lower-cased; tokens are runs of letters and digits, the same as rouge_score's on
    ASCII text; letters of other scripts count too, where rouge_score's tokenizer drops them)."""
    scores = [_lcs_f1(_rouge_tokens(p), _rouge_tokens(r)) for p, r in zip(predictions, references)]
    return 100 * sum(scores) / max(len(scores), 1)


def _rouge_tokens(text: str) -> list[str]:
    import re

    return re.findall(r"[^\W_]+", text.lower())


def _lcs_f1(prediction: list[str], reference: list[str]) -> float:
    if not prediction or not reference:
        return 0.0
    previous = [0] * (len(reference) + 1)
    for token in prediction:
        current = [0]
        for j, other in enumerate(reference):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(prediction), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)
