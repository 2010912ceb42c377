"""Text normalization before PII detection and deduplication (scrub, ``tuneline scrub``):

    from steps.text.normalize import normalize_text
    clean = normalize_text(raw)   # line breaks, control characters, NFKC, noise runs, spaces; idempotent
"""

from __future__ import annotations

import re
import unicodedata

# Hangul compatibility jamo (U+3131-U+318E: ㅋ, ㅠ, ...) as typed in chat. NFKC maps them to
# conjoining jamo that then fuse with their neighbours ("ㅋㅠ" -> "큐"), so they skip NFKC.
_COMPAT_JAMO = re.compile(r"([\u3131-\u318e]+)")
_LINE_BREAKS = re.compile(r"\r\n?|[\u2028\u2029\x0b\x0c\x85]")
# Characters whose runs are chat noise: sentence punctuation, Korean laughter/crying jamo
# and symbols/emoji (So) -- but not the structural "-=_*#/\|+`<>" of
# Markdown, code and PEM armour, whose runs mean something.
_NOISE_PUNCT = set("!?.,~^;:")
_NOISE_JAMO = set("ㅋㅎㅠㅜㅡㅗㅇ")  # compatibility jamo, which normalize_text keeps out of NFKC
# An emoji with its skin-tone modifier / variation selector counts as one character. Only
# noise punctuation and non-ASCII characters can start a run that changes (_collapse_run
# keeps every other run as it is), so the pattern tries the back-reference only there.
_RUN = re.compile(r"([!?.,~^;:\x80-\U0010ffff][\U0001F3FB-\U0001F3FF\uFE0E\uFE0F]?)\1{3,}")
_LINE_BREAK_CHARS = re.compile(r"[\r\u2028\u2029\x0b\x0c\x85]")
_SPACE_RUNS = re.compile(r"[ \t]{2,}|\t")
_TRAILING_SPACES = re.compile(r" +\n")
_BLANK_LINES = re.compile(r"\n{3,}")


def _printable(text: str) -> bool:
    """No control, format, surrogate or non-ASCII space characters (besides \\n and \\t)."""
    return text.replace("\n", " ").replace("\t", " ").isprintable()


def _collapse_run(m: re.Match[str]) -> str:
    ch = m[1][0]
    if ch in _NOISE_PUNCT or ch in _NOISE_JAMO or unicodedata.category(ch) == "So":
        return m[1] * 3
    return m[0]


def normalize_text(text: str) -> str:
    """Convert \\r\\n, \\r, \\v, \\f, NEL and U+2028/2029 to \\n; remove control/format
    characters except \\n and \\t (this covers zero-width chars and BOMs, category Cf);
    Unicode NFKC, except for Hangul compatibility jamo such as ㅋ/ㅠ, which NFKC would fuse
    into syllables ("ㅋㅠ" -> "큐"); collapse runs of 4+ identical noise characters to 3
    ("!!!!!!" -> "!!!", "😂😂😂😂😂" -> "😂😂😂", "ㅋㅋㅋㅋㅋ" -> "ㅋㅋㅋ"; noise = ``! ? . , ~ ^ ; :``,
    the jamo ㅋ ㅎ ㅠ ㅜ ㅡ ㅗ ㅇ and symbols/emoji with their skin-tone modifier, but not the
    structural ``- = _ * # / | + ` < >`` of Markdown, code and PEM armour); turn other
    Unicode spaces into " "; collapse runs of spaces/tabs to one space; strip trailing
    spaces on each line; collapse 3+ newlines to 2; strip the whole string.  Idempotent."""
    # Controls go before NFKC, so that characters they separated compose in one pass.
    # Each pass runs only where it can change something: plain ASCII prose skips most of them.
    if _LINE_BREAK_CHARS.search(text):
        text = _LINE_BREAKS.sub("\n", text)
    if not _printable(text):
        text = "".join(ch for ch in text
                       if ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cf", "Cs"))
    if not text.isascii():  # ASCII is already NFKC
        text = "".join(part if i % 2 else unicodedata.normalize("NFKC", part)
                       for i, part in enumerate(_COMPAT_JAMO.split(text)))
    text = _RUN.sub(_collapse_run, text)
    if not _printable(text):
        text = "".join(" " if unicodedata.category(ch) == "Zs" else ch for ch in text)
    text = _SPACE_RUNS.sub(" ", text)
    if " \n" in text:
        text = _TRAILING_SPACES.sub("\n", text)
    if "\n\n\n" in text:
        text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()
