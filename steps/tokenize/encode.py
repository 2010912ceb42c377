"""Records to token rows, per kind: chats rendered with the model's template and labelled on
assistant turns only (``encode_chat_batch``), labelled texts (``encode_labelled``), preference pairs
(``encode_pairs``), prompts for online RL (``encode_prompts``), input/target pairs for an encoder-decoder
(``encode_seq2seq``) and packed text blocks (``pack_texts``; for an
encoder framed by its special tokens, with word boundaries for masked-LM). Byte-level BPE tokenizers encode through
the pre-token cache (``pretoken_encoder``, steps/text/pretokens.py).
"""

from __future__ import annotations

import bisect
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Any

from steps.config import TokenizeConfig
from steps.core.contract import IGNORE
from steps.core.errors import ConfigError
from steps.core.progress import progress as tqdm
from steps.tokenize.template import _ChatLayout, _rendered_spans, _transparent, check_renders_tool_calls

ENCODE_BATCH = 1024  # conversations per tokenizer call

def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels that keep only assistant turns.

    The template must render each conversation prefix as a prefix of the whole; an
    assistant turn is the text between the prompt (with generation header) and the end
    of that turn, including its end-of-turn token.
    """
    return encode_chat_batch(tokenizer, [messages])[0]

def encode_chat_batch(tokenizer: Any, conversations: list[list[dict[str, str]]]
                      ) -> list[tuple[list[int], list[int]]]:
    """``encode_chat`` for many conversations: the texts are tokenized in one batch call (the
    fast tokenizer's threads), and the prompt/turn prefixes that locate the assistant spans
    come from one rendering per role sequence with placeholder contents (``_ChatLayout``)
    instead of two template renderings per assistant turn."""
    layouts: dict[tuple[str, ...], _ChatLayout] = {}
    texts: list[str] = []
    all_spans: list[list[tuple[int, int]]] = []
    # A content-transparent template (``_transparent``) renders a conversation as its layout with
    # the contents filled in: no template run for it. Other conversations are rendered in one call.
    transparent = _transparent(tokenizer)
    plans: list[tuple[_ChatLayout | None, bool]] = []  # per conversation: its layout, and whether to fill it
    for messages in conversations:
        layout = None
        if _ChatLayout.applies(messages):
            roles = tuple(m["role"] for m in messages)
            layout = layouts.get(roles) or layouts.setdefault(roles, _ChatLayout(tokenizer, roles))
        plans.append((layout, transparent and layout is not None and layout.verified))
    rest = [messages for messages, (_, fill) in zip(conversations, plans) if not fill]
    if any(m.get("tool_calls") for messages in rest for m in messages):
        check_renders_tool_calls(tokenizer)
    rendered = iter(tokenizer.apply_chat_template(rest, tokenize=False) if rest else [])
    for messages, (layout, fill) in zip(conversations, plans):
        contents = [m["content"] for m in messages] if layout is not None else []
        text = layout.fill(contents) if fill else next(rendered)
        spans = layout.spans(text, contents) if layout is not None else None
        texts.append(text)
        all_spans.append(spans if spans is not None else _rendered_spans(tokenizer, messages, text))
    results: list[tuple[list[int], list[int]] | None] = [None] * len(texts)
    if (encoder := pretoken_encoder(tokenizer)) is not None:  # steps/text/pretokens.py: same ids, cached pre-tokens
        for k, (text, spans) in enumerate(zip(texts, all_spans)):
            bounds = sorted({bound for span in spans for bound in span})
            if (encoded := encoder.encode(text, bounds)) is not None:
                ids, at = encoded
                token_at = dict(zip(bounds, at))
                labels = [IGNORE] * len(ids)
                for start, end in spans:
                    first, stop = token_at[start], token_at[end]
                    labels[first:stop] = ids[first:stop]
                results[k] = (ids, labels)
    rest = [k for k, result in enumerate(results) if result is None]
    if rest:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:  # the Rust tokenizer directly: its ids and offsets, without per-row conversion
            encodings = backend.encode_batch([texts[k] for k in rest], add_special_tokens=False)
            pairs = [(e.ids, e.offsets) for e in encodings]
        else:
            encoded = tokenizer([texts[k] for k in rest], add_special_tokens=False, return_offsets_mapping=True)
            pairs = list(zip(encoded["input_ids"], encoded["offset_mapping"]))
        for k, (ids, offsets) in zip(rest, pairs):
            results[k] = (list(ids), _labels(ids, offsets, all_spans[k]))
    return results  # type: ignore[return-value]

_ENCODERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()

def pretoken_encoder(tokenizer: Any) -> Any:
    """The tokenizer's ``PretokenEncoder`` (steps/text/pretokens.py), built once per tokenizer object
    and process, or None (then the Rust tokenizer encodes every text)."""
    try:
        if tokenizer not in _ENCODERS:
            from steps.text.pretokens import PretokenEncoder

            backend = getattr(tokenizer, "backend_tokenizer", None)
            _ENCODERS[tokenizer] = PretokenEncoder.of(backend) if backend is not None else None
        return _ENCODERS[tokenizer]
    except TypeError:  # not weak-referenceable
        return None

def _labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """The token ids whose text starts inside an assistant span; IGNORE elsewhere."""
    begins = [begin for begin, _ in offsets]
    if begins != sorted(begins):  # token starts out of order: test each token against each span
        return [token if any(start <= begin < end for start, end in spans) else IGNORE
                for token, begin in zip(ids, begins)]
    labels = [IGNORE] * len(ids)
    for start, end in spans:  # the tokens starting in [start, end) are one run
        first, stop = bisect.bisect_left(begins, start), bisect.bisect_left(begins, end)
        labels[first:stop] = ids[first:stop]
    return labels

def chat_row(record: dict[str, Any], ids: list[int], labels: list[int], cfg: TokenizeConfig
             ) -> tuple[dict[str, Any] | None, bool]:
    """The row of one encoded conversation truncated to max_seq_len (None when truncation left no
    answer token), and whether it was truncated."""
    truncated = len(ids) > cfg.max_seq_len
    if truncated:
        ids, labels = ids[: cfg.max_seq_len], labels[: cfg.max_seq_len]
    if labels.count(IGNORE) == len(labels):
        return None, truncated
    return {"id": record["id"], "input_ids": ids, "labels": labels}, truncated


@dataclass
class ChatRows:
    """What one conversation became under ``tokenize.long_conversations``: its rows (none when it was
    dropped), the messages of its eval prompt, and its outcomes: ``windowed`` (split into windows at
    turn boundaries), ``truncated`` (cut at max_seq_len), ``dropped_long`` (longer than max_seq_len
    under ``drop``), ``dropped_no_answer`` (no answer token left, after a cut or not); none: it fits."""

    rows: list[dict[str, Any]]
    prompt: dict[str, Any] | None
    outcomes: tuple[str, ...] = ()


def chat_rows(tokenizer: Any, record: dict[str, Any], ids: list[int], labels: list[int], cfg: TokenizeConfig
              ) -> ChatRows:
    """The rows of one encoded conversation: as it is when it fits max_seq_len, else by the policy
    ``cfg.long_conversations``: ``window`` (``window_rows``; a single turn longer than max_seq_len is
    truncated), ``truncate`` (its first max_seq_len tokens) or ``drop``."""
    if len(ids) > cfg.max_seq_len:
        if cfg.long_conversations == "drop":
            return ChatRows([], None, ("dropped_long",))
        if cfg.long_conversations == "window" and (windows := window_rows(tokenizer, record, cfg)) is not None:
            rows, last = windows
            return ChatRows(rows, eval_prompt({"id": record["id"], "messages": last}), ("windowed",))
    row, truncated = chat_row(record, ids, labels, cfg)
    cut = ("truncated",) if truncated else ()
    if row is None:
        return ChatRows([], None, (*cut, "dropped_no_answer"))
    return ChatRows([row], eval_prompt(record), cut)


def turn_groups(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]]]:
    """(leading system messages, groups of messages that each end with an assistant answer: a tool call and
    its results stay in the group of the answer that follows them)."""
    head = 0
    while head < len(messages) and messages[head]["role"] == "system":
        head += 1
    groups: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    for message in messages[head:]:
        current.append(message)
        if message["role"] == "assistant" and not message.get("tool_calls"):
            groups.append(current)
            current = []
    if current and groups:  # messages after the last answer (a validated chat has none): context of nothing
        groups[-1] = groups[-1] + current
    return messages[:head], groups


def window_rows(tokenizer: Any, record: dict[str, Any], cfg: TokenizeConfig
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
    """A conversation longer than max_seq_len as windows of whole turns that each fit max_seq_len and end
    with an assistant turn; the leading system messages open every window. Each window after the first
    starts with the previous window's last turn as context when it fits (its answer is masked out of
    the loss: every answer is learned once). Returns (rows, the last window's messages), or None when a
    single turn does not fit (then the conversation is truncated instead)."""
    head, groups = turn_groups(record["messages"])
    if not groups:
        return None
    cache: dict[tuple[int, int], tuple[list[int], list[int]]] = {}

    def encoded(begin: int, end: int) -> tuple[list[int], list[int]]:
        if (begin, end) not in cache:
            cache[begin, end] = encode_chat(tokenizer, head + [m for g in groups[begin:end] for m in g])
        return cache[begin, end]

    def fits(begin: int, end: int) -> bool:
        return len(encoded(begin, end)[0]) <= cfg.max_seq_len

    rows: list[dict[str, Any]] = []
    start = 0
    last: tuple[int, int] = (0, 0)
    while start < len(groups):
        context = start - 1 if start > 0 and fits(start - 1, start + 1) else start
        if not fits(context, start + 1):
            return None
        low, high = start + 1, len(groups)  # the longest window from `context` that fits: binary search
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if fits(context, middle) else (low, middle - 1)
        ids, labels = encoded(context, low)
        if context < start:  # the context turn's tokens (its rendering is a prefix of the window's) are not learned
            shown = len(encoded(context, start)[0])
            labels = [IGNORE] * shown + labels[shown:]
        if labels.count(IGNORE) < len(labels):
            rows.append({"id": record["id"], "window": len(rows), "input_ids": ids, "labels": labels})
        last = (context, low)
        start = low
    return rows, head + [m for g in groups[last[0]:last[1]] for m in g]


def eval_prompt(record: dict[str, Any]) -> dict[str, Any]:
    """An eval conversation's prompt messages and reference answer (for BLEU)."""
    return {"id": record["id"], "messages": record["messages"][:-1], "reference": record["messages"][-1]["content"]}


LONG_OUTCOMES = ("windowed", "truncated", "dropped_long", "dropped_no_answer")


def encode_chats(tokenizer: Any, sides: dict[str, list[dict]], cfg: TokenizeConfig
                 ) -> tuple[dict[str, list[dict]], list[dict], dict[str, Any]]:
    """The labelled rows of each conversation (``chat_rows``), eval prompts and stats."""
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
    prompts: list[dict[str, Any]] = []
    outcomes: Counter[str] = Counter()
    for side, records in sides.items():
        progress = tqdm(total=len(records), desc=f"tokenize {side}", unit="rec", mininterval=2)
        for start in range(0, len(records), ENCODE_BATCH):
            batch = records[start:start + ENCODE_BATCH]
            for record, (ids, labels) in zip(batch, encode_chat_batch(tokenizer, [r["messages"] for r in batch])):
                result = chat_rows(tokenizer, record, ids, labels, cfg)
                outcomes.update(result.outcomes)
                splits[side] += result.rows
                if side == "eval" and result.prompt is not None:
                    prompts.append(result.prompt)
            progress.update(len(batch))
        progress.close()
    stats = {
        "train_records": len(splits["train"]),
        "eval_records": len(splits["eval"]),
        "train_tokens": sum(len(r["input_ids"]) for r in splits["train"]),
        "trainable_tokens": sum(len(r["labels"]) - r["labels"].count(IGNORE) for r in splits["train"]),
        **{outcome: outcomes[outcome] for outcome in LONG_OUTCOMES},
    }
    return splits, prompts, stats

def encode_labelled(tokenizer: Any, sides: dict[str, list[dict]], cfg: TokenizeConfig, kind: str
                    ) -> tuple[dict[str, list[dict]], list[dict], dict[str, Any]]:
    """One row per text with its label index (classification) or value (regression)."""
    labels = sorted({r["label"] for records in sides.values() for r in records}) if kind == "classification" else []
    index = {label: i for i, label in enumerate(labels)}
    splits: dict[str, list[dict[str, Any]]] = {}
    truncated = 0
    for side, records in sides.items():
        rows = []
        for record in tqdm(records, desc=f"tokenize {side}", unit="rec", mininterval=2):
            ids = tokenizer(record["text"], verbose=False)["input_ids"]
            if len(ids) > cfg.max_seq_len:
                truncated += 1
                ids = ids[: cfg.max_seq_len - 1] + ids[-1:]  # keep the closing special token ([SEP])
            label = index[record["label"]] if kind == "classification" else float(record["label"])
            rows.append({"id": record["id"], "input_ids": ids, "label": label})
        splits[side] = rows
    stats: dict[str, Any] = {
        "train_records": len(splits["train"]), "eval_records": len(splits["eval"]),
        "train_tokens": sum(len(r["input_ids"]) for r in splits["train"]), "truncated": truncated,
    }
    if kind == "classification":
        stats["labels"] = labels
        for side, rows in splits.items():
            counts = {label: 0 for label in labels}
            for r in rows:
                counts[labels[r["label"]]] += 1
            stats[f"{side}_label_counts"] = counts
    return splits, [], stats

def encode_pairs(tokenizer: Any, sides: dict[str, list[dict]], cfg: TokenizeConfig
                 ) -> tuple[dict[str, list[dict]], list[dict], dict[str, Any]]:
    """Chosen and rejected conversations per pair, prompt-masked and truncated."""
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
    prompts: list[dict[str, Any]] = []
    truncated = dropped = 0
    for side, records in sides.items():
        for record in tqdm(records, desc=f"tokenize {side}", unit="pair", mininterval=2):
            prompt = [{"role": "user", "content": record["prompt"]}]
            encoded = []
            for answer in (record["chosen"], record["rejected"]):
                ids, labels = encode_chat(tokenizer, prompt + [{"role": "assistant", "content": answer}])
                if len(ids) > cfg.max_seq_len:
                    truncated += 1
                    ids, labels = ids[: cfg.max_seq_len], labels[: cfg.max_seq_len]
                encoded.append((ids, labels))
            if any(all(label == IGNORE for label in labels) for _, labels in encoded):
                dropped += 1
                continue
            (chosen, chosen_labels), (rejected, rejected_labels) = encoded
            splits[side].append({"id": record["id"], "input_ids": chosen, "labels": chosen_labels,
                                 "rejected_ids": rejected, "rejected_labels": rejected_labels})
            if side == "eval":
                prompts.append({"id": record["id"], "messages": prompt, "reference": record["chosen"]})
    stats = {
        "train_records": len(splits["train"]), "eval_records": len(splits["eval"]),
        "train_tokens": sum(len(r["input_ids"]) + len(r["rejected_ids"]) for r in splits["train"]),
        "truncated": truncated, "dropped_no_answer": dropped,
    }
    return splits, prompts, stats

def reward_ids(tokenizer: Any, prompt: str, answer: str, pair_input: str, max_seq_len: int) -> tuple[list[int], bool]:
    """The token ids a reward model scores for ``answer`` to ``prompt``, and whether they were cut at
    ``max_seq_len``: the conversation rendered with the chat template (``chat``, a causal LM; cut at the
    end), or the text pair ``[CLS] prompt [SEP] answer [SEP]`` (``text_pair``, an encoder; the longer
    side is cut first). The served model encodes {prompt, response} inputs the same way (serving.py)."""
    if pair_input == "chat":
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        ids, _ = encode_chat(tokenizer, messages)
        return ids[:max_seq_len], len(ids) > max_seq_len
    full = tokenizer(prompt, answer, verbose=False)["input_ids"]
    if len(full) <= max_seq_len:
        return full, False
    return tokenizer(prompt, answer, truncation="longest_first", max_length=max_seq_len)["input_ids"], True

def encode_reward_pairs(tokenizer: Any, sides: dict[str, list[dict]], cfg: TokenizeConfig, pair_input: str
                        ) -> tuple[dict[str, list[dict]], list[dict], dict[str, Any]]:
    """Reward-model rows ``{"id", "input_ids", "rejected_ids"}``: the chosen and the rejected answer, each with
    its prompt, as ``reward_ids`` encodes them (``pair_input``: chat or text_pair). A chat pair that loses
    every answer token of either side to truncation is dropped (``dropped_no_answer``)."""
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
    truncated = dropped = 0
    for side, records in sides.items():
        for record in tqdm(records, desc=f"tokenize {side}", unit="pair", mininterval=2):
            encoded = []
            for answer in (record["chosen"], record["rejected"]):
                if pair_input == "chat":  # as reward_ids, keeping the labels to see whether an answer is left
                    messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": answer}]
                    ids, labels = encode_chat(tokenizer, messages)
                    cut, ids = len(ids) > cfg.max_seq_len, ids[: cfg.max_seq_len]
                    if all(label == IGNORE for label in labels[: cfg.max_seq_len]):
                        ids = None
                else:
                    ids, cut = reward_ids(tokenizer, record["prompt"], answer, pair_input, cfg.max_seq_len)
                truncated += cut
                encoded.append(ids)
            if None in encoded:
                dropped += 1
                continue
            splits[side].append({"id": record["id"], "input_ids": encoded[0], "rejected_ids": encoded[1]})
    stats = {
        "train_records": len(splits["train"]), "eval_records": len(splits["eval"]),
        "train_tokens": sum(len(r["input_ids"]) + len(r["rejected_ids"]) for r in splits["train"]),
        "truncated": truncated, "dropped_no_answer": dropped, "pair_input": pair_input,
        "max_seq_len": cfg.max_seq_len,
    }
    return splits, [], stats

def encode_prompts(tokenizer: Any, sides: dict[str, list[dict]], cfg: TokenizeConfig
                   ) -> tuple[dict[str, list[dict]], list[dict], dict[str, Any]]:
    """Prompt records for online RL: the prompt as a user turn rendered with the chat template and the
    assistant's generation header (``add_generation_prompt``), ready to sample from; ``prompt`` (the text)
    and ``answer`` stay with the row for the reward functions. Prompts longer than ``max_seq_len`` are
    dropped (``dropped_long``): a cut prompt would lose its generation header."""
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
    prompts: list[dict[str, Any]] = []
    dropped = 0
    for side, records in sides.items():
        for record in tqdm(records, desc=f"tokenize {side}", unit="rec", mininterval=2):
            messages = [{"role": "user", "content": record["prompt"]}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            if len(ids) > cfg.max_seq_len:
                dropped += 1
                continue
            row = {"id": record["id"], "input_ids": ids, "prompt": record["prompt"]}
            if "answer" in record:
                row["answer"] = record["answer"]
            splits[side].append(row)
            if side == "eval":
                prompts.append({"id": record["id"], "messages": messages, "reference": record.get("answer", "")})
    stats = {"train_records": len(splits["train"]), "eval_records": len(splits["eval"]),
             "train_tokens": sum(len(r["input_ids"]) for r in splits["train"]), "truncated": 0,
             "dropped_long": dropped}
    return splits, prompts, stats


def encode_seq2seq(tokenizer: Any, sides: dict[str, list[dict]], cfg: TokenizeConfig
                   ) -> tuple[dict[str, list[dict]], list[dict], dict[str, Any]]:
    """Encoder-decoder rows ``{"id", "input_ids", "labels"}``: the input as the encoder reads it and the target as
    the decoder learns it (``text_target``: the model's own framing, e.g. T5's ``</s>``, BART's ``<s> ... </s>``),
    each cut at max_seq_len with its closing token kept (``truncated`` counts records cut on either side). Every
    label token is learned: the decoder's inputs are the labels shifted right (the model's
    ``decoder_start_token_id`` first). Eval prompts: ``{"id", "input", "reference"}``."""
    if tokenizer.eos_token_id is None:
        raise ConfigError("the base model's tokenizer has no EOS token to end the targets with")
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
    prompts: list[dict[str, Any]] = []
    truncated = 0
    for side, records in sides.items():
        for start in tqdm(range(0, len(records), ENCODE_BATCH), desc=f"tokenize {side}", unit="batch", mininterval=2):
            batch = records[start:start + ENCODE_BATCH]
            inputs = tokenizer([r["input"] for r in batch], verbose=False)["input_ids"]
            targets = tokenizer(text_target=[r["target"] for r in batch], verbose=False)["input_ids"]
            for record, ids, labels in zip(batch, inputs, targets):
                cut = len(ids) > cfg.max_seq_len or len(labels) > cfg.max_seq_len
                truncated += cut
                splits[side].append({"id": record["id"], "input_ids": _cut(ids, cfg.max_seq_len),
                                     "labels": _cut(labels, cfg.max_seq_len)})
                if side == "eval":
                    prompts.append({"id": record["id"], "input": record["input"], "reference": record["target"]})
    stats = {"train_records": len(splits["train"]), "eval_records": len(splits["eval"]),
             "train_tokens": sum(len(r["input_ids"]) + len(r["labels"]) for r in splits["train"]),
             "trainable_tokens": sum(len(r["labels"]) for r in splits["train"]), "truncated": truncated,
             "max_seq_len": cfg.max_seq_len}
    return splits, prompts, stats


def _cut(ids: list[int], limit: int) -> list[int]:
    """The first ``limit`` ids with the last one (the closing special token) kept."""
    return ids if len(ids) <= limit else ids[: limit - 1] + ids[-1:]


def pack_texts(tokenizer: Any, sides: dict[str, list[dict]], cfg: TokenizeConfig, encoder: bool = False
               ) -> tuple[dict[str, list[dict]], list[dict], dict[str, Any]]:
    """Blocks of exactly max_seq_len tokens per side, no eval prompts, and stats. For a causal LM the
    documents are joined by EOS and cut into blocks (labels = input_ids); for an ``encoder`` (masked-LM)
    they are joined by its separator and cut into max_seq_len - 2 tokens framed as ``[CLS] ... [SEP]``,
    each row with its tokens' ``word_ids`` (numbered within the block; None for special tokens, which are
    never masked) and no labels (train masks each batch anew)."""
    if encoder:
        check_masked_lm_tokenizer(tokenizer)
    elif tokenizer.eos_token_id is None:
        raise ConfigError("the base model's tokenizer has no EOS token to separate packed documents")
    separator = tokenizer.sep_token_id if encoder else tokenizer.eos_token_id
    body = cfg.max_seq_len - 2 if encoder else cfg.max_seq_len
    splits: dict[str, list[dict[str, Any]]] = {}
    stats: dict[str, Any] = {"mask_token_id": tokenizer.mask_token_id} if encoder else {}
    dropped = 0
    for side, records in sides.items():
        stream, words = token_stream(tokenizer, [r["text"] for r in records], f"tokenize {side}", separator, encoder)
        blocks = len(stream) // body
        dropped += len(stream) - blocks * body
        rows = []
        for n in range(blocks):
            ids = stream[n * body : (n + 1) * body]
            if encoder:
                rows.append({"id": f"block-{n}", **framed_block(tokenizer, ids, words[n * body : (n + 1) * body])})
            else:
                rows.append({"id": f"block-{n}", "input_ids": ids, "labels": ids})
        splits[side] = rows
        stats |= {f"{side}_documents": len(records), f"{side}_records": blocks,
                  f"{side}_tokens": blocks * cfg.max_seq_len}
    return splits, [], stats | {"dropped_tail_tokens": dropped}

def check_masked_lm_tokenizer(tokenizer: Any) -> None:
    """Masked-LM blocks need a fast tokenizer (word boundaries) with CLS, SEP and mask tokens."""
    missing = [name for name in ("cls_token", "sep_token", "mask_token") if getattr(tokenizer, f"{name}_id") is None]
    if missing or not tokenizer.is_fast:
        raise ConfigError("masked-LM (text records on an encoder) needs a fast tokenizer with CLS, SEP and mask "
                          f"tokens; the base model's has {'no ' + ', '.join(missing) if missing else 'no fast version'}")

def framed_block(tokenizer: Any, ids: list[int], words: list[int | None]) -> dict[str, list]:
    """``[CLS] ids [SEP]`` and its tokens' words, renumbered from 0 within the block (None: special tokens)."""
    first = min((w for w in words if w is not None), default=0)
    return {"input_ids": [tokenizer.cls_token_id, *ids, tokenizer.sep_token_id],
            "word_ids": [None, *(w - first if w is not None else None for w in words), None]}

def token_stream(tokenizer: Any, texts: list[str], desc: str, separator: int, with_words: bool = False
                 ) -> tuple[list[int], list[int | None]]:
    """The texts' token ids, without special tokens, joined by ``separator``; with ``with_words`` also each
    token's word, numbered across the texts (the fast tokenizer's ``word_ids()``; None for the separators and
    special tokens)."""
    stream: list[int] = []
    words: list[int | None] = []
    special = set(tokenizer.all_special_ids)
    seen = 0  # words of the texts before this one
    for i, text in enumerate(tqdm(texts, desc=desc, unit="doc", mininterval=2)):
        if i:
            stream.append(separator)
            words.append(None)
        # verbose=False: documents are longer than the model's context on purpose; they are cut into blocks.
        encoded = tokenizer(text, add_special_tokens=False, verbose=False)
        stream += encoded["input_ids"]
        if with_words:
            word_ids = encoded.word_ids()
            words += [None if t in special or w is None else seen + w for t, w in zip(encoded["input_ids"], word_ids)]
            seen += 1 + max((w for w in word_ids if w is not None), default=-1)
    return stream, words
