"""Regex + validator PII detection and redaction for English and Korean text.

Usage::

    from steps.pii import PiiEngine, normalize_text

    engine = PiiEngine()                      # or PiiEngine(["EMAIL", "PHONE"])
    clean = normalize_text(raw)
    redacted, counts = engine.redact(clean)   # "<EMAIL>", "<PHONE>", ... + Counter
    spans = engine.find(clean)                # [PiiMatch(entity, start, end), ...]

Every entity is found by a shape regex and then *validated* (Luhn, RRN checksum,
date, SSN ranges, ``ipaddress`` parsing, area codes), so dates, versions, money
amounts, times and order numbers are not redacted.  Boundaries are ASCII-based
rather than ``\\b``: Python treats Hangul as ``\\w``, and Korean text routinely glues
particles to numbers ("전화번호는010-1234-5678입니다").

KR_RRN policy: the checksum is *required*.  Numbers issued since October 2020 have
no checksum and are therefore not detected; accepting them would make every
13-digit string with a plausible date a match, which is too noisy for training data.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date

ENTITIES: tuple[str, ...] = ("EMAIL", "PHONE", "CREDIT_CARD", "KR_RRN", "US_SSN", "IP_ADDRESS")

# Tie-break for equally long overlapping spans: most constrained validator first
# (e.g. a Luhn-valid 13-digit string that is also a checksum-valid RRN is an RRN).
_SPECIFICITY = {e: i for i, e in enumerate(
    ("EMAIL", "KR_RRN", "US_SSN", "CREDIT_CARD", "IP_ADDRESS", "PHONE"))}


@dataclass(frozen=True)
class PiiMatch:
    entity: str
    start: int
    end: int


# Numeric boundaries: no ASCII letter/digit/underscore next to the match (Hangul is
# fine), and not continuing a dotted/dashed digit sequence (1.2.3.4.5, 2024-555-...).
_L = r"(?<![A-Za-z0-9_])(?<![0-9][.\-])"
_R = r"(?![A-Za-z0-9_])(?![.\-][0-9])"
_SEP = r"[ .\-]"


def _rx(body: str) -> re.Pattern[str]:
    return re.compile(_L + body + _R)


# --- validators ------------------------------------------------------------------

def _digits(s: str) -> str:
    return re.sub(r"\D", "", s)


def _luhn_ok(num: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(num)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _email_ok(m: re.Match[str]) -> bool:
    local = m["local"]
    return (len(local) <= 64 and len(m[0]) <= 254 and ".." not in local
            and not local.startswith(".") and not local.endswith("."))


def _us_phone_ok(m: re.Match[str]) -> bool:
    # "555-123.4567" style mixed separators are more often not phones.
    return m["pa"] is not None or m["s1"] == m["s2"]


def _kr_mobile_ok(m: re.Match[str]) -> bool:
    return m["pre"] != "010" or len(m["mid"]) == 4  # 010 always has a 4-digit middle


_KR_AREAS = {"02", "031", "032", "033", "041", "042", "043", "044",
             "051", "052", "053", "054", "055", "061", "062", "063", "064", "070"}


def _kr_landline_ok(m: re.Match[str]) -> bool:
    return m["area"] in _KR_AREAS


def _card_ok(m: re.Match[str]) -> bool:
    num = _digits(m[0])
    return 13 <= len(num) <= 19 and num[0] in "3456" and _luhn_ok(num)


def _rrn_ok(m: re.Match[str]) -> bool:
    num = _digits(m[0])
    century = {"1": 1900, "2": 1900, "5": 1900, "6": 1900}.get(num[6], 2000)  # 3,4,7,8
    try:
        date(century + int(num[:2]), int(num[2:4]), int(num[4:6]))
    except ValueError:
        return False
    total = sum(int(d) * w for d, w in zip(num[:12], (2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5)))
    return (11 - total % 11) % 10 == int(num[12])


def _ssn_ok(m: re.Match[str]) -> bool:
    area = int(m["a"])
    return area != 0 and area != 666 and area < 900 and m["g"] != "00" and m["n"] != "0000"


def _ip_ok(m: re.Match[str]) -> bool:
    try:
        ipaddress.ip_address(m[0])  # rejects octets > 255, leading zeros, times like 12:30:45
    except ValueError:
        return False
    return any(c.isalnum() for c in m[0])  # "::" alone is valid but never PII


# --- rules: (entity, pattern, validator) ------------------------------------------

_Rule = tuple[str, re.Pattern[str], Callable[[re.Match[str]], bool]]

# Card layouts get one regex each so that a group layout that fails Luhn does not
# hide a shorter/longer valid layout at the same position (finditer is greedy).
_CARD_LAYOUTS = ((4, 4, 4, 4), (4, 4, 4, 4, 3), (4, 6, 5), (4, 6, 4), (4, 4, 5))

_RULES: tuple[_Rule, ...] = (
    ("EMAIL", re.compile(
        r"(?<![A-Za-z0-9._%+\-])(?P<local>[A-Za-z0-9._%+\-]+)@"
        r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
        r"(?![A-Za-z0-9\-])(?!\.[A-Za-z0-9])"), _email_ok),
    # US: (555) 123-4567, 555-123-4567, 555.123.4567, +1 555 123 4567, 1-555-123-4567.
    # Separators are required: bare 10-digit runs are too often ids/timestamps.
    ("PHONE", _rx(r"(?:\+?1[ .\-]?)?(?:\((?P<pa>[2-9]\d\d)\) ?|[2-9]\d\d(?P<s1>[ .\-]))"
                  r"\d{3}(?P<s2>[ .\-])\d{4}"), _us_phone_ok),
    # KR mobile: 010-1234-5678 / 01012345678 (bare allowed: the 01x prefix is distinctive).
    ("PHONE", _rx(r"(?P<pre>01[016789])(?P<s>[ .\-]?)(?P<mid>\d{3,4})(?P=s)\d{4}"), _kr_mobile_ok),
    # KR landline: 02-123-4567, 031-1234-5678 (separators required).
    ("PHONE", _rx(r"(?P<area>0\d{1,2})(?P<s>[ .\-])\d{3,4}(?P=s)\d{4}"), _kr_landline_ok),
    # International (+82 10-1234-5678, +82-2-1234-5678, +44 20 7946 0958): 8-15 digits.
    ("PHONE", _rx(r"\+[1-9](?:[ .\-]?\d){7,14}"), lambda m: True),
    ("CREDIT_CARD", _rx(r"\d{13,19}"), _card_ok),
    *(("CREDIT_CARD", _rx(r"\d{%d}(?P<s>[ \-])" % first
                          + "(?P=s)".join(r"\d{%d}" % n for n in rest)), _card_ok)
      for first, *rest in _CARD_LAYOUTS),
    ("KR_RRN", _rx(r"\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])-?[1-8]\d{6}"), _rrn_ok),
    ("US_SSN", _rx(r"(?P<a>\d{3})(?P<s>[ \-])(?P<g>\d{2})(?P=s)(?P<n>\d{4})"), _ssn_ok),
    # IPv4 may sit next to "-" (ranges such as 10.0.0.1-10.0.0.9), but never continue
    # a dotted sequence (1.2.3.4.5) or a token (v1.2.3.4).
    ("IP_ADDRESS", re.compile(r"(?<![A-Za-z0-9_])(?<![0-9]\.)\d{1,3}(?:\.\d{1,3}){3}"
                              r"(?![A-Za-z0-9_])(?!\.[0-9])"), _ip_ok),
    # IPv6 candidate (full, compressed, IPv4-embedded); ipaddress does the real check.
    ("IP_ADDRESS", re.compile(
        r"(?<![A-Za-z0-9_:.])(?:[0-9A-Fa-f]{0,4}:){2,7}"
        r"(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{1,4})?"
        r"(?![A-Za-z0-9_:])(?!\.[0-9])"), _ip_ok),
)


class PiiEngine:
    """Find and redact PII spans of the selected entity types."""

    def __init__(self, entities: Iterable[str] = ENTITIES):
        selected = (entities,) if isinstance(entities, str) else tuple(entities)
        for name in selected:
            if name not in ENTITIES:
                raise ValueError(f"unknown PII entity {name!r}; expected one of {ENTITIES}")
        self.entities: tuple[str, ...] = tuple(e for e in ENTITIES if e in selected)
        self._rules = [r for r in _RULES if r[0] in self.entities]

    def find(self, text: str) -> list[PiiMatch]:
        """Non-overlapping matches sorted by start; overlaps keep the longer span,
        then the more specific entity."""
        cands = {PiiMatch(entity, m.start(), m.end())
                 for entity, rx, ok in self._rules for m in rx.finditer(text) if ok(m)}
        chosen: list[PiiMatch] = []
        taken = bytearray(len(text))  # 1 where a chosen span already covers the char
        for c in sorted(cands, key=lambda c: (c.start - c.end, _SPECIFICITY[c.entity], c.start)):
            if not any(taken[c.start:c.end]):
                taken[c.start:c.end] = b"\x01" * (c.end - c.start)
                chosen.append(c)
        return sorted(chosen, key=lambda c: c.start)

    def redact(self, text: str) -> tuple[str, Counter]:
        """Replace every match with "<ENTITY>"; return (text, Counter(entity -> n))."""
        parts: list[str] = []
        counts: Counter = Counter()
        pos = 0
        for m in self.find(text):
            parts += (text[pos:m.start], f"<{m.entity}>")
            counts[m.entity] += 1
            pos = m.end
        parts.append(text[pos:])
        return "".join(parts), counts


_LINE_BREAKS = re.compile(r"\r\n?|[\u2028\u2029]")


def normalize_text(text: str) -> str:
    """Unicode NFKC; remove control/format characters except \\n and \\t (this covers
    zero-width chars and BOMs, category Cf); convert \\r\\n and \\r to \\n; collapse
    runs of spaces/tabs to one space; strip trailing spaces on each line; collapse
    3+ newlines to 2; strip the whole string."""
    text = _LINE_BREAKS.sub("\n", unicodedata.normalize("NFKC", text))
    text = "".join(ch for ch in text
                   if ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cf", "Cs"))
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" +\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()
