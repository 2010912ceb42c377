"""Regex + validator PII detection and redaction for English and Korean text.

Usage::

    from steps.text.normalize import normalize_text
    from steps.text.pii import PiiEngine

    engine = PiiEngine()                      # or PiiEngine(["EMAIL", "PHONE"])
    clean = normalize_text(raw)
    redacted, counts = engine.redact(clean)   # "<EMAIL>", "<PHONE>", ... + Counter
    spans = engine.find(clean)                # [PiiMatch(entity, start, end), ...]

Every entity is found by a shape regex and then *validated* (Luhn, RRN checksum,
date, SSN ranges, ``ipaddress`` parsing, area codes, JWT header decoding, randomness
of key bodies), so dates, versions, money amounts, times, order numbers, ISBNs and
hex hashes are not redacted.  Boundaries are ASCII-based rather than ``\\b``: Python
treats Hangul as ``\\w``, and Korean text routinely glues particles to numbers
("전화번호는010-1234-5678입니다").

Entities (``ENTITIES``; ``PERSON`` is optional, see below):

* EMAIL: plain addresses (any case, plus-addressing) and obfuscated ones whose "at"
  and/or "dot" is bracketed -- ``name [at] domain [dot] com``, ``name(at)domain(dot)com``,
  ``name {AT} domain.com`` -- or Korean ``골뱅이`` / ``닷`` / ``쩜``.  Unbracketed English
  ("name at domain dot com") is *not* matched: it is ordinary prose too often.
* PHONE: US (separators required), Korean mobile / landline (``(02) 1234-5678`` too),
  international ``+CC`` numbers with 8-15 digits (``+44 20 7946 0958``,
  ``+1 (415) 555-2671``, ``+82 (0)10-1234-5678``; without separators at least 10).
  A number right after ``#`` is an order/ticket number, not a phone.
* CREDIT_CARD (Luhn, IIN 3-6), KR_RRN (checksum required, see below), US_SSN (SSA
  ranges), IP_ADDRESS (IPv4 and IPv6, parsed by ``ipaddress``; IPv6 needs a digit).
* URL_CREDENTIALS: the ``user:password`` part of ``scheme://user:password@host``; the
  scheme and host stay (``postgres://<URL_CREDENTIALS>@db:5432``).
* SECRET: AWS access key ids (AKIA/ASIA), GitHub (ghp_/gho_/ghu_/ghs_/ghr_,
  github_pat_), Slack (xox[baprs]-, webhook URLs), Stripe (sk/rk/pk_live_/_test_),
  OpenAI/Anthropic-style ``sk-...``, Google ``AIza...``, Hugging Face ``hf_...``, npm,
  GitLab and Docker tokens, JWTs, PEM private-key blocks, ``Bearer``/``Basic``
  credentials, ``curl -u user:password``, and the *value* of
  ``password=`` / ``api_key:`` / ``secret=`` / ``token=`` / ``비밀번호:`` style
  assignments (the key name stays).  Prefixed tokens must contain a digit and a letter
  (real keys do; ``ghp_xxxx...`` placeholders do not); assignment values skip
  templates (``${X}``, ``{{x}}``, ``<x>``), masks (``****``), code (``getpass()``,
  ``self.password``, ``user_password``) and special-token keys (``pad_token``).
  Bare hex strings (git SHAs, digests) and UUIDs are never secrets.
* PERSON (optional, ``PiiEngine(["PERSON", ...])``): names found by Presidio's spaCy
  NER.  presidio-analyzer and a spaCy model are not tuneline dependencies; without them
  the engine raises ``ConfigError`` at construction.

Overlaps: URL_CREDENTIALS and SECRET (context-anchored) win over anything they
overlap; otherwise the longer span wins, then the more specific entity; PERSON loses
to every structured entity.

Actions (per entity, ``PiiEngine(actions={...}, default_action=...)``):

* ``placeholder`` (default): ``<EMAIL>``.
* ``hash``: ``<EMAIL:1a2b3c4d5e6f>``, the first 12 hex digits of
  HMAC-SHA256(salt, canonical value), so one value maps to one token across the data
  set without being recoverable.  Canonical values: emails de-obfuscated and
  lower-cased; phones as E.164 (Korean ``0...`` -> ``+82...``, 10-digit US ->
  ``+1...``); cards, RRNs, SSNs as digits; IPs in ``ipaddress`` form; names case-folded;
  credentials and secrets verbatim.  The salt (>= 16 bytes) is the ``salt`` argument or
  the environment variable ``TUNELINE_PII_SALT``; it is read only when a hash action is
  in use, kept only inside an HMAC object, and never logged, returned or stored.
* ``mask``: same length and shape, every letter and digit replaced by ``*``
  (``jane.doe@example.com`` -> ``****.***@*******.***``); phones and cards keep their
  last 4 digits (``010-1234-5678`` -> ``***-****-5678``).  Masking leaks the length.

KR_RRN policy: the checksum is *required*.  Numbers issued since October 2020 have
no checksum and are therefore not detected; accepting them would make every
13-digit string with a plausible date a match, which is too noisy for training data.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hmac
import ipaddress
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import date

from steps.core.errors import ConfigError

ENTITIES: tuple[str, ...] = ("EMAIL", "PHONE", "CREDIT_CARD", "KR_RRN", "US_SSN", "IP_ADDRESS",
                             "URL_CREDENTIALS", "SECRET")
OPTIONAL_ENTITIES: tuple[str, ...] = ("PERSON",)  # needs presidio-analyzer + a spaCy model
ACTIONS: tuple[str, ...] = ("placeholder", "hash", "mask")
SALT_ENV = "TUNELINE_PII_SALT"
MIN_SALT_BYTES = 16

# Tie-break for equally long overlapping spans: most constrained validator first
# (e.g. a Luhn-valid 13-digit string that is also a checksum-valid RRN is an RRN).
_SPECIFICITY = {e: i for i, e in enumerate(
    ("URL_CREDENTIALS", "SECRET", "EMAIL", "KR_RRN", "US_SSN", "CREDIT_CARD", "IP_ADDRESS", "PHONE",
     "PERSON"))}
# Overlap tiers, before length: context-anchored entities first, NER names last.
_TIER = {"URL_CREDENTIALS": 0, "SECRET": 0, "PERSON": 2}


@dataclass(frozen=True)
class PiiMatch:
    entity: str
    start: int
    end: int


# Numeric boundaries: no ASCII letter/digit/underscore next to the match (Hangul is
# fine), and not continuing a dotted/dashed digit sequence (1.2.3.4.5, 2024-555-...).
_L = r"(?<![A-Za-z0-9_])(?<![0-9][.\-])"
_R = r"(?![A-Za-z0-9_])(?![.\-][0-9])"
# Token boundaries for secrets: "-" belongs to the token as well.
_TL = r"(?<![A-Za-z0-9_\-])"
_TR = r"(?![A-Za-z0-9_\-])"


def _rx(body: str) -> re.Pattern[str]:
    return re.compile(_L + body + _R)


def _tok(body: str) -> re.Pattern[str]:
    return re.compile(_TL + body + _TR)


# --- validators ------------------------------------------------------------------
# A validator takes the regex match and returns False to reject it, True to accept the
# whole match, or (start, end) to accept a sub-span (assignment values).

def _digits(s: str) -> str:
    return re.sub(r"\D", "", s)


def _luhn_ok(num: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(num)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _after_hash(m: re.Match[str]) -> bool:
    return m.start() > 0 and m.string[m.start() - 1] == "#"


def _email_ok(m: re.Match[str]) -> bool:
    local = m["local"]
    return (len(local) <= 64 and len(m[0]) <= 254 and ".." not in local
            and not local.startswith(".") and not local.endswith(".")
            # retina asset names (icon@2x.png) are file names, not addresses
            and not re.fullmatch(r"\d+(?:\.\d+)?x", m["host"].split(".")[0], re.I)
            and m["host"].rsplit(".", 1)[-1].lower() not in _FILE_EXTENSIONS)


_FILE_EXTENSIONS = {"png", "jpg", "jpeg", "gif", "svg", "webp", "bmp", "ico", "tif", "tiff", "avif"}
# Obfuscated addresses need a real top-level domain: a country code or a common generic one.
_CC_TLDS = set("""
    ac ad ae af ag ai al am ao aq ar as at au aw ax az ba bb bd be bf bg bh bi bj bm bn bo br bs bt bw
    by bz ca cc cd cf cg ch ci ck cl cm cn co cr cu cv cw cx cy cz de dj dk dm do dz ec ee eg er es et
    eu fi fj fk fm fo fr ga gd ge gf gg gh gi gl gm gn gp gq gr gs gt gu gw gy hk hm hn hr ht hu id ie
    il im in io iq ir is it je jm jo jp ke kg kh ki km kn kp kr kw ky kz la lb lc li lk lr ls lt lu lv
    ly ma mc md me mg mh mk ml mm mn mo mp mq mr ms mt mu mv mw mx my mz na nc ne nf ng ni nl no np nr
    nu nz om pa pe pf pg ph pk pl pm pn pr ps pt pw py qa re ro rs ru rw sa sb sc sd se sg sh si sk sl
    sm sn so sr ss st sv sx sy sz tc td tf tg th tj tk tl tm tn to tr tt tv tw tz ua ug uk us uy uz va
    vc ve vg vi vn vu wf ws ye yt za zm zw""".split())
_COMMON_TLDS = {"com", "net", "org", "edu", "gov", "mil", "int", "info", "biz", "app", "dev", "xyz",
                "site", "online", "tech", "cloud", "email", "name", "pro", "mail", "team", "page"}


def _obfuscated_email_ok(m: re.Match[str]) -> bool:
    tld = m["tld"].lower()
    obfuscated = m["at"] != "@" or re.search(r"[^A-Za-z0-9.\-]", m["dom"]) is not None
    local = m["local"]
    return (obfuscated and (tld in _CC_TLDS or tld in _COMMON_TLDS) and len(local) <= 64
            and ".." not in local and not local.startswith(".") and not local.endswith("."))


def _us_phone_ok(m: re.Match[str]) -> bool:
    # "555-123.4567" style mixed separators are more often not phones.
    return (m["pa"] is not None or m["s1"] == m["s2"]) and not _after_hash(m)


def _kr_mobile_ok(m: re.Match[str]) -> bool:
    # 010 always has a 4-digit middle
    return (m["pre"] != "010" or len(m["mid"]) == 4) and not _after_hash(m)


_KR_AREAS = {"02", "031", "032", "033", "041", "042", "043", "044",
             "051", "052", "053", "054", "055", "061", "062", "063", "064", "070"}


def _kr_landline_ok(m: re.Match[str]) -> bool:
    return m["area"] in _KR_AREAS and not _after_hash(m)


def _kr_paren_landline_ok(m: re.Match[str]) -> bool:
    return _kr_landline_ok(m) and (m[0][0] == "(") <= (m["close"] is not None)


def _intl_phone_ok(m: re.Match[str]) -> bool:
    body = m[0]
    digits = len(_digits(re.sub(r"\(0\)", "", body)))
    bare = re.fullmatch(r"\(?\+\d+", body) is not None
    return (10 if bare else 8) <= digits <= 15 and not _after_hash(m)


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
    return any(c.isdigit() for c in m[0])  # "::" and "a::b", "dead::beef" (code) are not PII


_VERSION_BEFORE = re.compile(r"(?<![A-Za-z])(?i:version|ver\.?|v\.|build|release|버전)[ \t]*[:=]?[ \t]*$")


def _ipv4_ok(m: re.Match[str]) -> bool:
    # "version 1.0.0.0", "4.0.0.0-beta": dotted versions, not addresses.
    text = m.string
    return (_ip_ok(m) and not _VERSION_BEFORE.search(text[max(0, m.start() - 12):m.start()])
            and not re.match(r"-[A-Za-z]", text[m.end():m.end() + 2]))


def _ipv6_ok(m: re.Match[str]) -> bool:
    s, e, text = m.start(), m.end(), m.string
    # Python slices such as x[1::2] or x[::3] parse as IPv6 but are code.
    slice_like = (s > 0 and text[s - 1] == "[" and e < len(text) and text[e] == "]"
                  and re.fullmatch(r"[0-9:]+", m[0]) is not None)
    return _ip_ok(m) and not slice_like


def _random_ok(body: str) -> bool:
    """Machine-generated key bodies mix letters and digits; placeholders (xxxx) do not."""
    return (any(c.isdigit() for c in body) and any(c.isalpha() for c in body)
            and len(set(body)) >= 6)


def _prefixed_ok(m: re.Match[str]) -> bool:
    return _random_ok(m["body"])


def _mixed_case_ok(m: re.Match[str]) -> bool:
    # plain "sk-" keys are base62: real ones mix cases ("sk-2024annualreport2" does not)
    body = m["body"]
    return _random_ok(body) and any(c.isupper() for c in body) and any(c.islower() for c in body)


def _aws_ok(m: re.Match[str]) -> bool:
    # ASIA... is also the start of ordinary upper-case words; demand a digit there.
    body = m["body"]
    return len(set(body)) >= 6 and (m["pfx"] == "AKIA" or any(c.isdigit() for c in body))


def _b64json(part: str) -> object:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def _jwt_ok(m: re.Match[str]) -> bool:
    try:
        header, payload = _b64json(m["h"]), _b64json(m["p"])
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return False
    return isinstance(header, dict) and isinstance(payload, dict) and ("alg" in header or "typ" in header)


def _bearer_ok(m: re.Match[str]) -> tuple[int, int] | bool:
    value = m["v"]
    if m["scheme"].lower() == "basic":
        try:
            decoded = base64.b64decode(value + "=" * (-len(value) % 4), validate=True).decode()
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return False
        return ":" in decoded and m.span("v")
    return len(value) >= 16 and _random_ok(value) and m.span("v")


def _url_credentials_ok(m: re.Match[str]) -> tuple[int, int] | bool:
    password = m["pw"]
    if password.startswith(("$", "%", "{")) or set(password) <= set("*xX•.#"):
        return False  # ${DB_PASS}, %(pw)s, {password}, *** are templates / masks
    return m.span("v")


_PASSWORD_KEYS = r"password|passwd|passphrase|pwd|pass"
_TOKEN_KEYS = (r"secret|token|api[_\-]?key|apikey|access[_\-]?key|auth[_\-]?key|private[_\-]?key"
               r"|secret[_\-]?key|credentials?")
_KEYWORDS_IN_VALUE = re.compile(r"password|passwd|secret|token|api[_\-]?key|apikey|access[_\-]?key", re.I)
# Keys that name a tokenizer's special token or a count, not a credential.
_NOT_SECRET_KEYS = re.compile(
    r"(?:^|[_\-.])(?:pad|eos|bos|unk|cls|sep|mask|start|end|special|num|max|min|next|page|csrf_?)"
    r"[_\-]?tokens?$|^(?:max|min|num)[_\-]|[A-Za-z0-9](?:pass|pwd)$", re.I)  # ... bypass, compass
_NOT_SECRET_VALUES = {"none", "null", "nil", "true", "false", "undefined", "required", "optional",
                      "str", "string", "int", "bytes", "bool", "empty", "redacted", "hidden", "secret",
                      "password", "token", "n/a", "na", "tbd", "todo", "example"}
_MASK_CHARS = set("*xX•.#_-")
_PROSE_WORDS = {"changed", "updated", "expired", "invalid", "incorrect", "reset", "unknown", "correct", "wrong",
                "forgotten", "missing", "protected", "encrypted", "needed", "enabled", "disabled", "default"}


def _key_start(text: str, end: int) -> int:
    start = end
    while start > 0 and text[start - 1].isascii() and (text[start - 1].isalnum() or text[start - 1] in "_.-"):
        start -= 1
    return start


def _assignment_ok(m: re.Match[str]) -> tuple[int, int] | bool:
    value = m["v"]
    start = _key_start(m.string, m.start("key")) if m["key"].isascii() else m.start("key")
    key = m.string[start:m.end("key")]
    if m.string[max(0, start - 2):start] == "${":
        return False  # ${PASSWORD:-default}
    password_like = re.search(r"(?:" + _PASSWORD_KEYS + "|비밀번호|비번|패스워드|암호)$", key, re.I) is not None
    quoted = m.groupdict().get("q") is not None
    if (_NOT_SECRET_KEYS.search(key) and not re.search(r"password|passwd|passphrase", key, re.I)) \
            or value.lower() in _NOT_SECRET_VALUES or set(value) <= _MASK_CHARS:
        return False
    if value.startswith(("$", "%", "{", "<", "/", "~", "@")) or "{{" in value or "}" in value:
        return False  # templates, env references, paths, decorators
    if re.fullmatch(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+", value) or re.fullmatch(r"\[[A-Z_]+\]", value):
        return False  # self.password, os.environ, [PAD]
    if re.fullmatch(r"[A-Za-z_]+", value) and _KEYWORDS_IN_VALUE.search(value):
        return False  # user_password, YOUR_API_KEY (but "secret123" is a weak password)
    sep = m.groupdict().get("sep") or ""
    symbolic = re.search(r"[^A-Za-z]", value) is not None  # a digit or a symbol
    if password_like:
        # After ":" (prose, YAML) a letters-only word is a password only when it ends the
        # line: "password: letmein" yes, "Forgot password: click here" no.
        line_end = re.match(r"[.!]?[ \t]*(?:\n|$)", m.string[m.end("v"):]) is not None
        last_word = (line_end and m.groupdict().get("is") is None and len(value) >= 6
                     and value.lower() not in _PROSE_WORDS)
        return len(value) >= 4 and (quoted or "=" in sep or symbolic or last_word) and m.span("v")
    if re.search(r"private[_\-]?key$", key, re.I) and value.startswith("-----"):
        return False  # the PEM rule takes the whole block
    return (len(value) >= 8 and (any(c.isdigit() for c in value) or len(value) >= 20)
            and (quoted or "=" in sep or symbolic) and m.span("v"))


# --- rules: (entity, gate, pattern, validator) ------------------------------------

# A rule runs only on texts where its gate succeeds: a regex search, or a tuple of
# lower-case substrings one of which the lower-cased text must contain (a cheap superset
# of what every match contains).  Most texts lack "@", "://", "akia", "eyj", ..., so most
# rules are skipped and redacting many short records stays fast.
_Gate = tuple[str, ...] | re.Pattern[str]
_Rule = tuple[str, _Gate, re.Pattern[str], Callable[[re.Match[str]], "bool | tuple[int, int]"]]

# Characters that some text of each non-word gate contains: "@", digits, ":", brackets, "_"
# and "-" of the token prefixes, and the first letters of the Korean obfuscated "at"/"dot".
_TRIGGER = re.compile(r"[@:_\-\[({<\d골닷쩜]")

_G_AT = ("@",)
_G_OBFUSCATED_AT = re.compile(r"[\[({<]\s*(?i:at|dot)\s*[\])}>]|골뱅이|닷|쩜")
# Every phone, card, RRN and SSN match is a run of at least 10 characters of digits and
# " .-()+" that starts with a digit, "(" or "+" and ends with a digit (the shortest: a bare
# 10-digit Korean mobile, "+1 2345678" with its 8 digits, "02-123-4567").
_G_DIGITS = re.compile(r"[\d(+][\d .\-()+]{8,}\d")
_G_IPV4 = re.compile(r"\d\.\d")
_G_COLON = (":",)
_G_URL = ("://",)
_G_AWS = ("akia", "asia")
_G_GITHUB = ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_")
_G_SLACK = ("xoxb-", "xoxa-", "xoxp-", "xoxr-", "xoxs-", "hooks.slack.com")
_G_STRIPE = ("_live_", "_test_")
_G_SK = ("sk-",)
_G_AIZA = ("aiza",)
_G_UNDERSCORE_TOKENS = ("hf_", "npm_", "glpat-", "dckr_pat_")
_G_USER_FLAG = ("-u",)  # -u and --user
_G_JWT = ("eyj",)
_G_PEM = ("-----begin ",)
_G_AUTH = ("bearer", "basic")
_G_KEY = ("pass", "pwd", "secret", "token", "key", "credential")
_G_KO_KEY = ("비밀번호", "비번", "패스워드", "암호")

# Card layouts get one regex each so that a group layout that fails Luhn does not
# hide a shorter/longer valid layout at the same position (finditer is greedy).
_CARD_LAYOUTS = ((4, 4, 4, 4), (4, 4, 4, 4, 3), (4, 6, 5), (4, 6, 4), (4, 4, 5))

_DOMAIN_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"
# Local parts use possessive quantifiers: their characters never include "@" or brackets,
# so backtracking into them cannot help and only costs time.
# Obfuscated "at"/"dot": bracketed English words (any case) or Korean words.
_OB_AT = r"(?:\s*[\[({<]\s*(?i:at)\s*[\])}>]\s*|\s*골뱅이\s*|@)"
_OB_DOT = r"(?:\s*[\[({<]\s*(?i:dot)\s*[\])}>]\s*|\s*(?:닷|쩜)\s*|\.)"

# Unquoted assignment value: printable ASCII without spaces, quotes, brackets or list/query
# separators; it may not end in "." or ":" (prose) and may not be followed by "(" or "["
# (calls, indexing).  Non-ASCII ends it, so Korean particles stay out ("qwer1234입니다").
_VALUE_CHARS = r"[^\s\"'`<>()\[\]{},;&\x80-\U0010ffff]"
_VALUE_END = r"[^\s\"'`<>()\[\]{},;&.:\x80-\U0010ffff]"
_UNQUOTED = (r"(?P<v>" + _VALUE_CHARS + r"{0,255}?" + _VALUE_END + r")"
             r"(?=[.:]*(?:[\s\"'`<>)\]},;&\x80-\U0010ffff]|$))")
_QUOTED = r"(?P<q>[\"'])(?P<v>[^\s\"'`]{1,256})(?P=q)"
# The regex anchors on the keyword (a lazy identifier prefix would be quadratic on long
# runs); _assignment_ok recovers the whole key name ("DB_PASSWORD") by scanning back.  The
# lookahead on the keywords' first letters makes the case-insensitive scan ~4x faster.
_KEY = (r"(?=[PpSsTtAaCc])(?P<key>(?i:" + _PASSWORD_KEYS + "|" + _TOKEN_KEYS + r"))"
        r"[\"']?(?:[ \t]*(?P<sep>:=|=>|=|:)|[ \t]+(?P<is>is)(?:[ \t]*:)?)[ \t]*")
_KO_KEY = r"(?P<key>비밀번호|비번|패스워드|암호)(?:는|은)?[ \t]*(?P<sep>:|=)?[ \t]*"

_RULES: tuple[_Rule, ...] = (
    ("EMAIL", _G_AT, re.compile(
        r"(?<![A-Za-z0-9._%+\-])(?P<local>[A-Za-z0-9._%+\-]++(?:'[A-Za-z0-9._%+\-]++)*+)@"
        r"(?P<host>(?:" + _DOMAIN_LABEL + r"\.)+[A-Za-z]{2,63})"
        r"(?![A-Za-z0-9\-])(?!\.[A-Za-z0-9])"), _email_ok),
    ("EMAIL", _G_OBFUSCATED_AT, re.compile(
        r"(?<![A-Za-z0-9._%+\-])(?P<local>[A-Za-z0-9._%+\-]++)(?P<at>" + _OB_AT + r")"
        r"(?P<dom>(?:" + _DOMAIN_LABEL + _OB_DOT + r")+)(?P<tld>[A-Za-z]{2,63})"
        r"(?![A-Za-z0-9\-])(?!\.[A-Za-z0-9])"), _obfuscated_email_ok),
    # US: (555) 123-4567, 555-123-4567, 555.123.4567, +1 555 123 4567, 1-555-123-4567.
    # Separators are required: bare 10-digit runs are too often ids/timestamps.
    ("PHONE", _G_DIGITS, _rx(r"(?:\+?1[ .\-]?)?(?:\((?P<pa>[2-9]\d\d)\) ?|[2-9]\d\d(?P<s1>[ .\-]))"
                             r"\d{3}(?P<s2>[ .\-])\d{4}"), _us_phone_ok),
    # KR mobile: 010-1234-5678 / 01012345678 (bare allowed: the 01x prefix is distinctive).
    ("PHONE", _G_DIGITS, _rx(r"(?P<pre>01[016789])(?P<s>[ .\-]?)(?P<mid>\d{3,4})(?P=s)\d{4}"), _kr_mobile_ok),
    # KR landline: 02-123-4567, 031-1234-5678 (separators required).
    ("PHONE", _G_DIGITS, _rx(r"(?P<area>0\d{1,2})(?P<s>[ .\-])\d{3,4}(?P=s)\d{4}"), _kr_landline_ok),
    # KR landline with a closing parenthesis: (02) 1234-5678, 02)1234-5678, (031)123-4567.
    ("PHONE", _G_DIGITS, _rx(r"\(?(?P<area>0\d{1,2})(?P<close>\)) ?\d{3,4}[.\-]\d{4}"),
     _kr_paren_landline_ok),
    # International: +CC or (+CC), optional "(0)" trunk or "(415)" area, then groups that
    # share one separator (+82 10-1234-5678, +44 20 7946 0958, +33 1 23 45 67 89); 8-15 digits.
    ("PHONE", _G_DIGITS, _rx(r"(?:\+[1-9]\d{0,2}|\(\+[1-9]\d{0,2}\))[ .\-]?(?:\(\d{1,4}\)[ .\-]?)?\d{1,5}"
                             r"(?:(?P<s>[ .\-]?)\d{2,8}(?:(?P=s)\d{2,8}){0,4})?"), _intl_phone_ok),
    ("CREDIT_CARD", _G_DIGITS, _rx(r"\d{13,19}"), _card_ok),
    *(("CREDIT_CARD", _G_DIGITS, _rx(r"\d{%d}(?P<s>[ \-])" % first
                                     + "(?P=s)".join(r"\d{%d}" % n for n in rest)), _card_ok)
      for first, *rest in _CARD_LAYOUTS),
    # American Express (IIN 34/37, 15 digits) in any grouping: spaces or dashes between any digits.
    ("CREDIT_CARD", _G_DIGITS, _rx(r"3[47](?:[ \-]?\d){13}"), _card_ok),
    ("KR_RRN", _G_DIGITS, _rx(r"\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])-?[1-8]\d{6}"), _rrn_ok),
    ("US_SSN", _G_DIGITS, _rx(r"(?P<a>\d{3})(?P<s>[ \-])(?P<g>\d{2})(?P=s)(?P<n>\d{4})"), _ssn_ok),
    # IPv4 may sit next to "-" (ranges such as 10.0.0.1-10.0.0.9), but never continue
    # a dotted sequence (1.2.3.4.5) or a token (v1.2.3.4).
    ("IP_ADDRESS", _G_IPV4, re.compile(r"(?<![A-Za-z0-9_])(?<![0-9]\.)\d{1,3}(?:\.\d{1,3}){3}"
                                       r"(?![A-Za-z0-9_])(?!\.[0-9])"), _ipv4_ok),
    # IPv6 candidate (full, compressed, IPv4-embedded); ipaddress does the real check.
    ("IP_ADDRESS", _G_COLON, re.compile(
        r"(?<![A-Za-z0-9_:.])(?:[0-9A-Fa-f]{0,4}:){2,7}"
        r"(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{1,4})?"
        r"(?![A-Za-z0-9_:])(?!\.[0-9])"), _ipv6_ok),
    # scheme://user:password@host -> the user:password part.
    ("URL_CREDENTIALS", _G_URL, re.compile(
        r"(?<![A-Za-z0-9+.\-])[A-Za-z][A-Za-z0-9+.\-]{1,19}://"
        r"(?P<v>[^\s/?#@:\"'<>]*:(?P<pw>[^\s/?@\"'<>]+))@(?=[A-Za-z0-9\[])"), _url_credentials_ok),
    ("SECRET", _G_AWS, _tok(r"(?P<pfx>AKIA|ASIA)(?P<body>[A-Z0-9]{16})"), _aws_ok),
    ("SECRET", _G_GITHUB, _tok(r"gh[pousr]_(?P<body>[A-Za-z0-9]{36,255})"), _prefixed_ok),
    ("SECRET", _G_GITHUB, _tok(r"github_pat_(?P<body>[A-Za-z0-9_]{22,255})"), _prefixed_ok),
    ("SECRET", _G_SLACK, _tok(r"xox[baprs]-(?P<body>[A-Za-z0-9\-]{10,250})"), _prefixed_ok),
    ("SECRET", _G_SLACK, re.compile(r"https://hooks\.slack\.com/services/"
                                    r"(?P<body>T[A-Z0-9]{6,}/B[A-Z0-9]{6,}/[A-Za-z0-9]{16,})" + _TR), _prefixed_ok),
    ("SECRET", _G_STRIPE, _tok(r"(?:sk|rk|pk)_(?:live|test)_(?P<body>[A-Za-z0-9]{16,247})"), _prefixed_ok),
    ("SECRET", _G_SK, _tok(r"sk-(?P<body>[A-Za-z0-9]{20,250})"), _mixed_case_ok),
    ("SECRET", _G_SK, _tok(r"sk-(?:proj|svcacct|admin|ant-(?:api|admin)\d\d)-(?P<body>[A-Za-z0-9_\-]{20,250})"),
     _prefixed_ok),
    ("SECRET", _G_AIZA, _tok(r"AIza(?P<body>[0-9A-Za-z_\-]{35})"), _prefixed_ok),
    ("SECRET", _G_UNDERSCORE_TOKENS, _tok(r"hf_(?P<body>[A-Za-z0-9]{30,40})"), _prefixed_ok),
    ("SECRET", _G_UNDERSCORE_TOKENS, _tok(r"(?:npm_|glpat-|dckr_pat_)(?P<body>[A-Za-z0-9_\-]{20,64})"),
     _prefixed_ok),
    # curl -u user:password / --user user:password (not docker's -u 1000:1000 uid:gid)
    ("SECRET", _G_USER_FLAG, re.compile(r"(?<!\S)(?:-u|--user)[ \t=]+[\"']?(?P<v>[^\s:\"']+:[^\s\"']+)"),
     lambda m: not re.fullmatch(r"[\d:]+", m["v"]) and m.span("v")),
    ("SECRET", _G_JWT, re.compile(r"(?<![A-Za-z0-9_\-.])(?P<h>eyJ[A-Za-z0-9_\-]{8,})\."
                                  r"(?P<p>eyJ[A-Za-z0-9_\-]{8,})\.[A-Za-z0-9_\-]*" + _TR), _jwt_ok),
    # A PEM private key up to its END line, or (cut-off text) as far as base64 lines go.
    ("SECRET", _G_PEM, re.compile(r"-----BEGIN (?P<kind>(?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?)-----"
                                  r"(?:[\s\S]*?-----END (?P=kind)-----|(?:\s*[A-Za-z0-9+/=:,\-]+)*)"),
     lambda m: True),
    ("SECRET", _G_AUTH, re.compile(r"(?<![A-Za-z0-9_])(?P<scheme>(?i:bearer|basic))[ \t]+"
                                   r"(?P<v>[A-Za-z0-9\-._~+/]{8,}=*)" + _TR), _bearer_ok),
    ("SECRET", _G_KEY, re.compile(_KEY + _QUOTED), _assignment_ok),
    ("SECRET", _G_KEY, re.compile(_KEY + _UNQUOTED), _assignment_ok),
    ("SECRET", _G_KO_KEY, re.compile(_KO_KEY + _QUOTED), _assignment_ok),
    ("SECRET", _G_KO_KEY, re.compile(_KO_KEY + _UNQUOTED), _assignment_ok),
)


# --- canonical values, masks -----------------------------------------------------

def _canonical_phone(value: str) -> str:
    if value.lstrip("( ").startswith("+"):
        return "+" + _digits(re.sub(r"\(0\)", "", value))
    digits = _digits(value)
    if digits.startswith("0"):
        return "+82" + digits[1:]  # Korean domestic format
    if len(digits) == 10:
        return "+1" + digits
    return "+" + digits


def _canonical_email(value: str) -> str:
    value = re.sub(_OB_AT, "@", value)
    value = re.sub(_OB_DOT, ".", value)
    return value.lower()


def canonical_value(entity: str, value: str) -> str:
    """The form of a value that the hash action digests: equal values in different
    layouts (``010-1234-5678`` / ``+82 10 1234 5678``) get the same token."""
    if entity == "EMAIL":
        return _canonical_email(value)
    if entity == "PHONE":
        return _canonical_phone(value)
    if entity in ("CREDIT_CARD", "KR_RRN", "US_SSN"):
        return _digits(value)
    if entity == "IP_ADDRESS":
        return str(ipaddress.ip_address(value))
    if entity == "PERSON":
        return " ".join(value.casefold().split())
    return value


def mask_value(entity: str, value: str) -> str:
    """Every letter and digit becomes ``*``; phones and cards keep their last 4 digits."""
    keep = 4 if entity in ("PHONE", "CREDIT_CARD") else 0
    positions = [i for i, c in enumerate(value) if c.isdigit()]
    kept = set(positions[-keep:]) if keep and len(positions) > keep else set()
    return "".join(c if i in kept or not c.isalnum() else "*" for i, c in enumerate(value))


def salt_from_env() -> bytes:
    """The hash salt from ``TUNELINE_PII_SALT``; ConfigError when it is missing."""
    value = os.environ.get(SALT_ENV, "")
    if not value:
        raise ConfigError(f"PII action 'hash' needs a secret salt in the environment variable {SALT_ENV} "
                          f"(at least {MIN_SALT_BYTES} characters); it is not set")
    return value.encode()


# --- optional Presidio PERSON backend --------------------------------------------

# spaCy NER models tried, best first; English is required, Korean is used when installed.
_SPACY_MODELS = {"en": ("en_core_web_lg", "en_core_web_md", "en_core_web_sm", "en_core_web_trf"),
                 "ko": ("ko_core_news_lg", "ko_core_news_md", "ko_core_news_sm")}
_HANGUL = re.compile(r"[\uac00-\ud7a3]")


def _presidio_person_finder() -> Callable[[str], list[tuple[int, int]]]:
    """A function text -> PERSON spans from Presidio; ConfigError if it cannot run."""
    try:
        import spacy
        from presidio_analyzer import AnalyzerEngine
        from presidio_analyzer.nlp_engine import NlpEngineProvider
    except ImportError as exc:
        raise ConfigError(
            "scrub.presidio_names needs presidio-analyzer and spaCy, which tuneline does not install "
            f"({exc}): pip install presidio-analyzer && python -m spacy download en_core_web_lg; "
            "or set scrub.presidio_names: false") from exc
    models = []
    for lang, names in _SPACY_MODELS.items():
        name = next((n for n in names if spacy.util.is_package(n)), None)
        if name is not None:
            models.append({"lang_code": lang, "model_name": name})
    if not any(m["lang_code"] == "en" for m in models):
        raise ConfigError(
            "scrub.presidio_names needs a spaCy English NER model and none is installed (tried "
            f"{', '.join(_SPACY_MODELS['en'])}): python -m spacy download en_core_web_lg")
    try:
        nlp = NlpEngineProvider(nlp_configuration={
            "nlp_engine_name": "spacy", "models": models,
            # Korean spaCy models label people "PS" (KLUE); English ones "PERSON".
            "ner_model_configuration": {"model_to_presidio_entity_mapping": {
                "PERSON": "PERSON", "PER": "PERSON", "PS": "PERSON"}},
        }).create_engine()
        analyzer = AnalyzerEngine(nlp_engine=nlp, supported_languages=[m["lang_code"] for m in models])
    except Exception as exc:  # an installed model that does not load
        raise ConfigError(f"scrub.presidio_names: cannot load the spaCy NER model(s) "
                          f"{[m['model_name'] for m in models]} for Presidio: {exc}") from exc
    langs = [m["lang_code"] for m in models]

    def find(text: str) -> list[tuple[int, int]]:
        spans: list[tuple[int, int]] = []
        for lang in langs:
            if lang == "ko" and not _HANGUL.search(text):
                continue
            spans += [(r.start, r.end) for r in analyzer.analyze(text=text, entities=["PERSON"], language=lang)]
        return spans

    return find


class PiiEngine:
    """Find PII spans of the selected entity types and replace them per entity action.

    ``actions`` maps an entity to ``placeholder``, ``hash`` or ``mask``; other entities
    get ``default_action``.  ``salt`` is only used by ``hash`` (default: the
    ``TUNELINE_PII_SALT`` environment variable, read only when some entity hashes);
    ``salt_id`` is then a 16-hex-digit HMAC of a constant under the salt (None without
    hashing), safe to put into cache keys and manifests."""

    def __init__(self, entities: Iterable[str] = ENTITIES, actions: Mapping[str, str] | None = None,
                 default_action: str = "placeholder", salt: bytes | None = None):
        known = ENTITIES + OPTIONAL_ENTITIES
        selected = (entities,) if isinstance(entities, str) else tuple(entities)
        actions = dict(actions or {})
        for name in (*selected, *actions):
            if name not in known:
                raise ValueError(f"unknown PII entity {name!r}; expected one of {known}")
        for action in (default_action, *actions.values()):
            if action not in ACTIONS:
                raise ValueError(f"unknown PII action {action!r}; expected one of {ACTIONS}")
        self.entities: tuple[str, ...] = tuple(e for e in known if e in selected)
        self.actions: dict[str, str] = {e: actions.get(e, default_action) for e in self.entities}
        # Rules grouped by gate (in _RULES order), so that each gate is checked once per text.
        self._groups: list[tuple[_Gate, list[tuple[str, re.Pattern[str], Callable]]]] = []
        for entity, gate, rx, ok in _RULES:
            if entity in self.entities:
                group = next((g for g in self._groups if g[0] is gate), None)
                if group is None:
                    group = (gate, [])
                    self._groups.append(group)
                group[1].append((entity, rx, ok))
        # The gates' words that hold none of the _TRIGGER characters; with _TRIGGER, a text
        # that neither matches (most chat messages) cannot pass any gate.
        words = sorted({w for gate, _ in self._groups if not isinstance(gate, re.Pattern)
                        for w in gate if _TRIGGER.search(w) is None})
        self._words = tuple(words)
        self._hmac: hmac.HMAC | None = None  # keyed with the salt; the salt itself is not kept
        self.salt_id: str | None = None
        if "hash" in self.actions.values():
            key = salt_from_env() if salt is None else bytes(salt)
            if len(key) < MIN_SALT_BYTES:
                raise ConfigError(f"PII hash salt ({SALT_ENV}) must be at least {MIN_SALT_BYTES} bytes long")
            self._hmac = hmac.new(key, digestmod="sha256")
            # A non-reversible name for the salt: artifacts hashed with different salts can
            # get different cache keys without the salt itself being stored anywhere.
            self.salt_id = hmac.new(key, b"tuneline-pii-salt-id", "sha256").hexdigest()[:16]
        self._names = _presidio_person_finder() if "PERSON" in self.entities else None

    def find(self, text: str) -> list[PiiMatch]:
        """Non-overlapping matches sorted by start; on overlaps URL_CREDENTIALS and
        SECRET win, then the longer span, then the more specific entity."""
        cands: set[PiiMatch] = set()
        if self._names is None and not self._may_match(text):
            return []
        low = text.lower()
        for gate, rules in self._groups:
            if gate is _G_DIGITS:  # every match lies inside one of the gate's runs: scan only those
                # (+2: the rules' lookaheads read two characters past a match)
                windows = [(m.start(), min(len(text), m.end() + 2)) for m in gate.finditer(text)]
            elif gate.search(text) if isinstance(gate, re.Pattern) else any(map(low.__contains__, gate)):
                windows = [(0, len(text))]
            else:
                continue
            for entity, rx, ok in rules:
                for m in (m for start, end in windows for m in rx.finditer(text, start, end)):
                    verdict = ok(m)
                    if verdict:
                        start, end = verdict if isinstance(verdict, tuple) else m.span()
                        cands.add(PiiMatch(entity, start, end))
        if self._names is not None:
            cands.update(PiiMatch("PERSON", s, e) for s, e in self._names(text) if e > s)
        chosen: list[PiiMatch] = []
        taken = bytearray(len(text))  # 1 where a chosen span already covers the char
        for c in sorted(cands, key=lambda c: (_TIER.get(c.entity, 1), c.start - c.end,
                                              _SPECIFICITY[c.entity], c.start)):
            if not any(taken[c.start:c.end]):
                taken[c.start:c.end] = b"\x01" * (c.end - c.start)
                chosen.append(c)
        return sorted(chosen, key=lambda c: c.start)

    def _may_match(self, text: str) -> bool:
        return _TRIGGER.search(text) is not None or any(map(text.lower().__contains__, self._words))

    def _candidates(self, texts: list[str]) -> Iterable[int]:
        """Indices of the texts that may pass a gate, found with one scan over all of them."""
        if self._names is not None:
            return range(len(texts))
        joined = "\n".join(texts)  # a newline is in no trigger and in no word
        low = joined.lower() if self._words else joined  # no gate words to look for: no lowering
        if len(low) != len(joined):  # lower() changed a length (e.g. "İ"): check text by text
            return [i for i, text in enumerate(texts) if self._may_match(text)]
        starts = [0]
        for text in texts[:-1]:
            starts.append(starts[-1] + len(text) + 1)
        hits: set[int] = set()

        def hit(at: int) -> int:  # mark the text holding position `at`; where the next one starts
            i = bisect.bisect_right(starts, at) - 1
            hits.add(i)
            return starts[i + 1] if i + 1 < len(starts) else len(joined)

        pos = 0
        while (m := _TRIGGER.search(joined, pos)) is not None:
            pos = hit(m.start())
        for word in self._words:  # str.find beats a regex alternation of the words
            pos = 0
            while (at := low.find(word, pos)) >= 0:
                pos = hit(at)
        return sorted(hits)

    def redact_many(self, texts: list[str]) -> tuple[list[str], dict[int, Counter]]:
        """``redact`` over many texts: the redacted texts, and per index of a text in which PII
        was found its Counter. One scan over all texts picks the few that need the per-gate
        checks; the rest come back as they are."""
        out = list(texts)
        found: dict[int, Counter] = {}
        for i in self._candidates(texts):
            out[i], counts = self.redact(texts[i])
            if counts:
                found[i] = counts
        return out, found

    def replacement(self, entity: str, value: str) -> str:
        """What one found value becomes under its entity's action."""
        action = self.actions[entity]
        if action == "mask":
            return mask_value(entity, value)
        if action == "hash":
            assert self._hmac is not None
            h = self._hmac.copy()
            h.update(canonical_value(entity, value).encode())
            return f"<{entity}:{h.hexdigest()[:12]}>"
        return f"<{entity}>"

    def redact(self, text: str) -> tuple[str, Counter]:
        """Replace every match per its action; return (text, Counter(entity -> n))."""
        parts: list[str] = []
        counts: Counter = Counter()
        pos = 0
        for m in self.find(text):
            parts += (text[pos:m.start], self.replacement(m.entity, text[m.start:m.end]))
            counts[m.entity] += 1
            pos = m.end
        parts.append(text[pos:])
        return "".join(parts), counts
