"""Token ids of byte-level BPE tokenizers through a cache of pre-tokens, exactly as the tokenizer.

A GPT-2-style tokenizer (``ByteLevel`` pre-tokenizer with its regex, a ``BPE`` model, no
normalizer; SmolLM2, GPT-2 and many more) encodes a text in three stages: added tokens
(``<|im_start|>``) are cut out, each remaining piece is split into pre-tokens by one regex
(`` ?\\p{L}+``, `` ?\\p{N}+``, ...), and each pre-token is turned into ids by BPE on its own.
The Rust library runs all three per text and tracks offsets; on chat data its regex stage is
most of the cost (~2.5 s per 10k conversations on one core, ``pre_tokenize_str`` alone costs
as much), and the same pre-tokens come back over and over. ``PretokenEncoder`` cuts added
tokens with one Python regex, splits pieces with the same pre-tokenizer regex in the
``regex`` module (C, ~4x faster here), and looks each pre-token's ids up in a cache filled by
the tokenizer's own BPE model (``model.tokenize``) on first sight. Short pieces between added
tokens that come back whole (a chat template's default system prompt) are cached as pieces.

Why the ids are the tokenizer's own, not an approximation:

- Stages 1 and 3 are the library's: the same added-token strings matched leftmost-longest,
  the same BPE model per pre-token (a pre-token is cached only if the Rust pre-tokenizer
  also keeps it whole).
- Stage 2 runs the same regex on another engine. Its matches depend only on each
  character's class: letter (``\\p{L}``), number (``\\p{N}``), whitespace (``\\s``) or other,
  plus fixed ASCII (contractions, the space). Engines can disagree on a class (Unicode
  versions, what ``\\s`` means); so every distinct character is classed once per process by
  the Rust pre-tokenizer itself (it joins ``"a"`` iff a letter, ``"1"`` iff a number,
  ``"!"`` iff other) and compared with the ``regex`` class; a text holding a character on
  which they differ is encoded by the tokenizer instead.
- Only configurations where those stages are the whole pipeline qualify
  (``PretokenEncoder.of``): no normalizer, ``ByteLevel`` with the regex and without an added
  prefix space, ``BPE`` without dropout or affixes, added tokens without strip/word options,
  no truncation or padding, no offset trimming; and probe texts must encode to the library's
  ids. Anything else: None, and callers use the tokenizer.

Label masks need token positions: ``encode`` also maps character positions (``bounds``: the
start and end of each assistant turn) to the index of the first token that begins at or
after them, which needs no offsets when each bound falls on a pre-token or added-token
boundary; a bound inside a pre-token returns None (that text goes to the tokenizer).
tests/steps/text/test_pretokens.py compares ids and labels with the tokenizer's on fuzzed text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import regex

# HF tokenizers' ByteLevel pre-tokenizer regex (use_regex=True): GPT-2's.
BYTE_LEVEL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LETTER, _NUMBER, _SPACE = regex.compile(r"\p{L}"), regex.compile(r"\p{N}"), regex.compile(r"\s")
_CLASS_PROBES = ("a", "1", "!")  # a character joins "a" iff letter, "1" iff number, "!" iff other
MAX_CACHE = 1 << 18             # pre-tokens cached per process (~45 MB at most); cleared when full
# Whole pieces between added tokens, up to PIECE_CHARS characters, are cached too: the first
# MAX_PIECES seen (a chat template's constant pieces, like a default system prompt, come first).
PIECE_CHARS, MAX_PIECES = 256, 4096
# A miss (a pre-token not cached yet) costs ~5 us more than the tokenizer spends on it, a hit
# saves ~1 us: past ~20% misses the cache loses. Checked per window of pre-tokens; an encoder
# over the limit (above break-even, so that a cold cache on natural text stays under it) steps
# aside for good (random identifiers, hashes, base64).
WINDOW, MAX_MISS_RATE = 200_000, 0.25

# Encoded by both ways when an encoder is built: cases where a difference would show.
PROBE_TEXTS = [
    "Hello, world! It's 2026-11-23; we've got 3.14 apples & 1,000,000 oranges.",
    "  leading\tand trailing  \n\n\n  spaces\r\n and\u00a0nbsp\u3000ideographic\u2028line ",
    "<|im_start|>user\n안녕하세요, 서울 010-1234-5678 번호요<|im_end|>\n<|im_start|>assistant\n네!<|im_end|>",
    "emoji 🙂🙂 flags 🇰🇷 zwj 👩\u200d💻 combining e\u0301 café ١٢٣ ½ Ⅻ x²",
    "code: def f(x):\n    return x**2  # comment\n\t\tdone...!!! ??? ---",
    "I'll he'd they're you've she's I'm 'quoted' ''double'' 'S 'T",
]


class PretokenEncoder:
    """See the module docstring. Not thread-safe (its caches grow as it encodes)."""

    def __init__(self, backend: Any):
        # The parts' own attributes: the tokenizer's whole JSON (vocabulary and merges) would cost
        # ~0.1 s to write and parse for each encoder.
        pre, model, post = backend.pre_tokenizer, backend.model, backend.post_processor
        added = list(backend.get_added_tokens_decoder().items())
        if backend.normalizer is not None or backend.truncation is not None or backend.padding is not None:
            raise ValueError("a normalizer, truncation or padding")
        if not (type(pre).__name__ == "ByteLevel" and pre.use_regex and not pre.add_prefix_space):
            raise ValueError(f"pre-tokenizer {type(pre).__name__!r} is not a plain ByteLevel with its regex")
        if not (type(model).__name__ == "BPE" and model.dropout is None and not model.byte_fallback
                and not model.continuing_subword_prefix and not model.end_of_word_suffix):
            raise ValueError("model is not a plain BPE")
        if post is not None and type(post).__name__ != "TemplateProcessing":
            raise ValueError(f"post-processor {type(post).__name__!r} may trim offsets")
        if any(t.lstrip or t.rstrip or t.single_word for _, t in added):
            raise ValueError("added tokens with strip or single-word options")
        self._pre, self._model = backend.pre_tokenizer, backend.model
        self._words = regex.compile(BYTE_LEVEL_PATTERN).findall
        self._added = {t.content: i for i, t in added if t.content}
        longest_first = sorted(self._added, key=len, reverse=True)
        self._cut = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")").split if self._added else None
        self._cache: dict[str, list[int]] = {}
        self._pieces: dict[str, list[int]] = {}  # short text between added tokens -> its ids
        self._chars: dict[str, bool] = {}  # character -> both regex engines class it alike
        self._unsafe: set[str] = set()
        self.words = self.misses = 0   # in the current window
        self.gave_up = False

    @classmethod
    def of(cls, backend: Any) -> PretokenEncoder | None:
        """An encoder for this Rust tokenizer (``tokenizers.Tokenizer``), or None when its
        configuration does not qualify or a probe text encodes differently."""
        try:
            encoder = cls(backend)
            encoded = [(encoder.encode(text, []), text) for text in PROBE_TEXTS]
            if any(got is not None and got[0] != backend.encode(text, add_special_tokens=False).ids
                   for got, text in encoded) or all(got is None for got, _ in encoded):
                return None
            return encoder
        except Exception:  # noqa: BLE001 - anything unexpected: use the tokenizer
            return None

    def encode(self, text: str, bounds: Sequence[int] = ()) -> tuple[list[int], list[int]] | None:
        """``backend.encode(text, add_special_tokens=False).ids``, and for each of the sorted
        character positions ``bounds`` the index of the first token beginning at or after it;
        None when this text must go to the tokenizer (see the module docstring)."""
        if self.gave_up:
            return None
        if self.words >= WINDOW:
            self.gave_up = self.misses > MAX_MISS_RATE * self.words
            self.words = self.misses = 0
        chars = set(text)
        if not chars.issubset(self._chars.keys()):
            self._learn(chars.difference(self._chars))
        if self._unsafe and not self._unsafe.isdisjoint(chars):
            return None
        cache, words_of, pieces = self._cache, self._words, self._pieces
        ids: list[int] = []
        at: list[int] = []
        b, nb = 0, len(bounds)
        pos = 0
        for i, piece in enumerate(self._cut(text) if self._cut is not None else (text,)):
            while b < nb and bounds[b] <= pos:
                if bounds[b] < pos:
                    return None  # inside the previous pre-token or added token
                at.append(len(ids))
                b += 1
            end = pos + len(piece)
            if i % 2:
                ids.append(self._added[piece])
            elif (known := pieces.get(piece)) is not None and not (b < nb and bounds[b] < end):
                ids += known  # a piece seen before, e.g. a template's default system prompt
            elif b < nb and bounds[b] < end:  # a bound inside this piece: track word starts
                words = words_of(piece)
                self.words += len(words)
                for word in words:
                    while b < nb and bounds[b] <= pos:
                        if bounds[b] < pos:
                            return None
                        at.append(len(ids))
                        b += 1
                    token_ids = cache.get(word) or self._miss(word)
                    if token_ids is None:
                        return None
                    ids += token_ids
                    pos += len(word)
                if pos != end:
                    return None
            else:
                words = words_of(piece)
                self.words += len(words)
                first = len(ids)
                for word in words:
                    token_ids = cache.get(word) or self._miss(word)
                    if token_ids is None:
                        return None
                    ids += token_ids
                if len(piece) <= PIECE_CHARS and len(pieces) < MAX_PIECES:
                    pieces[piece] = ids[first:]
            pos = end
        while b < nb:
            if bounds[b] != pos:
                return None
            at.append(len(ids))
            b += 1
        return ids, at

    def _miss(self, word: str) -> list[int] | None:
        self.misses += 1
        split = self._pre.pre_tokenize_str(word)
        if len(split) != 1:
            return None  # the Rust pre-tokenizer splits it: not one of its pre-tokens
        token_ids = [token.id for token in self._model.tokenize(split[0][0])]
        if not token_ids:
            return None
        if len(self._cache) >= MAX_CACHE:
            self._cache.clear()
        self._cache[word] = token_ids
        return token_ids

    def _learn(self, chars: set[str]) -> None:
        for ch in chars:
            try:
                rust = tuple(len(self._pre.pre_tokenize_str(probe + ch)) == 1 for probe in _CLASS_PROBES)
            except Exception:  # noqa: BLE001 - e.g. a lone surrogate: the tokenizer decides
                rust = None
            letter, number = bool(_LETTER.match(ch)), bool(_NUMBER.match(ch))
            ours = (letter, number, not (letter or number or _SPACE.match(ch)))
            self._chars[ch] = rust == ours
            if rust != ours:
                self._unsafe.add(ch)
