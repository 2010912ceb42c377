"""Tests for steps.text.pii: detection, validation, redaction actions and text normalisation."""

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import re
import sys
import types
from collections import Counter
from dataclasses import FrozenInstanceError
from types import SimpleNamespace

import pytest

from steps.core.errors import ConfigError

# --- check-digit helpers (independent of the module under test) ---------------------
from steps.text.normalize import normalize_text
from steps.text.pii import ENTITIES, SALT_ENV, PiiEngine, PiiMatch

# --- check-digit helpers (independent of the module under test) ---------------------

def luhn_ok(num: str) -> bool:
    digits = [int(d) for d in reversed(num)]
    return sum(d if i % 2 == 0 else (d * 2 - 9 if d > 4 else d * 2)
               for i, d in enumerate(digits)) % 10 == 0


def card(prefix: str, length: int) -> str:
    """Luhn-valid card number: prefix, filler digits, computed check digit."""
    body = (prefix + "1234567890123456789")[: length - 1]
    return next(body + d for d in "0123456789" if luhn_ok(body + d))


def broken(num: str) -> str:
    """Same number with the last digit changed, so the Luhn check fails."""
    bad = num[:-1] + str((int(num[-1]) + 1) % 10)
    assert not luhn_ok(bad)
    return bad


def grouped(num: str, layout: tuple[int, ...], sep: str) -> str:
    out, pos = [], 0
    for n in layout:
        out.append(num[pos:pos + n])
        pos += n
    assert pos == len(num)
    return sep.join(out)


def rrn(birth: str, gender: str, serial: str, dash: bool = True) -> str:
    """Korean RRN with a computed checksum digit."""
    body = birth + gender + serial
    total = sum(int(d) * w for d, w in zip(body, (2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5)))
    num = body + str((11 - total % 11) % 10)
    return f"{num[:6]}-{num[6:]}" if dash else num


def bad_rrn(valid: str) -> str:
    return valid[:-1] + str((int(valid[-1]) + 1) % 10)


def b64url(obj: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


JWT = (f"{b64url({'alg': 'HS256', 'typ': 'JWT'})}.{b64url({'sub': '1234567890', 'name': 'Jane Doe'})}"
       ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c")
PEM = ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7bq9Xk2L0nV3pQ8sW4tY1uZ6rA9cE2fG5hJ8kL1mN4o\n"
       "P7qR0sT3uV6wX9yZ2aB5cD8eF1gH4iJ7kL0mN3oP6qR9sT2uV5wX8yZ1aB4c==\n-----END RSA PRIVATE KEY-----")
GHP = "ghp_" + "aB3dE5fG7hI9jK1lM3nO5pQ7rS9tU1vW3xY5"

VISA16 = card("4111", 16)
MC16 = card("5500", 16)
AMEX15 = card("3782", 15)
DISC16 = card("6011", 16)
VISA13 = card("4222", 13)
VISA19 = card("4000", 19)
DINERS14 = card("3056", 14)
MC2_16 = card("2223", 16)  # 2-series IIN: outside the accepted 3-6 leading digits


def hits(text: str, engine: PiiEngine | None = None) -> list[tuple[str, str]]:
    return [(m.entity, text[m.start:m.end]) for m in (engine or PiiEngine()).find(text)]


# --- positives ---------------------------------------------------------------------

POSITIVES = [
    # EMAIL
    ("Contact john.doe@example.com for details.", "EMAIL", "john.doe@example.com"),
    ("Send to JANE.DOE+newsletter@Mail.Example.CO.UK today", "EMAIL",
     "JANE.DOE+newsletter@Mail.Example.CO.UK"),
    ("reply to first.last+tag+more@gmail.com, thanks", "EMAIL", "first.last+tag+more@gmail.com"),
    ("<user_name%x@host-1.io>", "EMAIL", "user_name%x@host-1.io"),
    ("이메일은 hong.gildong@naver.com 입니다.", "EMAIL", "hong.gildong@naver.com"),
    ("메일주소:kim_01@korea.ac.kr로 보내주세요", "EMAIL", "kim_01@korea.ac.kr"),
    ("문의는admin@sub.domain.co.kr입니다", "EMAIL", "admin@sub.domain.co.kr"),
    ("Email: a.b-c@d.e.fg.", "EMAIL", "a.b-c@d.e.fg"),
    # PHONE: US
    ("Call (555) 123-4567 now", "PHONE", "(555) 123-4567"),
    ("phone: 555-123-4567.", "PHONE", "555-123-4567"),
    ("fax 555.123.4567", "PHONE", "555.123.4567"),
    ("intl +1 555 123 4567 ok", "PHONE", "+1 555 123 4567"),
    ("dial 1-555-123-4567 please", "PHONE", "1-555-123-4567"),
    # PHONE: Korean mobile / landline / +82 / international
    ("전화번호는010-1234-5678입니다", "PHONE", "010-1234-5678"),
    ("휴대폰 01012345678 로 연락 주세요", "PHONE", "01012345678"),
    ("구형 번호 011-123-4567 입니다", "PHONE", "011-123-4567"),
    ("My old number was 016 1234 5678.", "PHONE", "016 1234 5678"),
    ("서울 사무실 02-123-4567", "PHONE", "02-123-4567"),
    ("본사: 02-1234-5678로 연락", "PHONE", "02-1234-5678"),
    ("경기 031-123-4567", "PHONE", "031-123-4567"),
    ("Busan office 051-987-6543", "PHONE", "051-987-6543"),
    ("해외에서는 +82 10-1234-5678 로", "PHONE", "+82 10-1234-5678"),
    ("Seoul HQ: +82-2-1234-5678.", "PHONE", "+82-2-1234-5678"),
    ("London +44 20 7946 0958.", "PHONE", "+44 20 7946 0958"),
    ("Tokyo +81-3-1234-5678", "PHONE", "+81-3-1234-5678"),
    # CREDIT_CARD (generated, Luhn-valid)
    (f"Visa {grouped(VISA16, (4, 4, 4, 4), ' ')} exp 12/27", "CREDIT_CARD",
     grouped(VISA16, (4, 4, 4, 4), " ")),
    (f"카드번호 {grouped(MC16, (4, 4, 4, 4), '-')}로 결제했습니다", "CREDIT_CARD",
     grouped(MC16, (4, 4, 4, 4), "-")),
    (f"Amex {grouped(AMEX15, (4, 6, 5), ' ')}", "CREDIT_CARD", grouped(AMEX15, (4, 6, 5), " ")),
    (f"amex:{grouped(AMEX15, (4, 6, 5), '-')}.", "CREDIT_CARD", grouped(AMEX15, (4, 6, 5), "-")),
    (f"Discover {DISC16} on file", "CREDIT_CARD", DISC16),
    (f"카드{VISA13}사용", "CREDIT_CARD", VISA13),
    (f"19-digit {VISA19}", "CREDIT_CARD", VISA19),
    (f"Diners {grouped(DINERS14, (4, 6, 4), ' ')} ok", "CREDIT_CARD",
     grouped(DINERS14, (4, 6, 4), " ")),
    (f"{grouped(VISA19, (4, 4, 4, 4, 3), ' ')} 끝", "CREDIT_CARD",
     grouped(VISA19, (4, 4, 4, 4, 3), " ")),
    # American Express in other groupings than 4-6-5 (spaces or dashes, even mixed)
    (f"amex {grouped(AMEX15, (4, 4, 4, 3), '-')} exp", "CREDIT_CARD", grouped(AMEX15, (4, 4, 4, 3), "-")),
    (f"card {grouped(AMEX15, (3, 4, 4, 4), ' ')}.", "CREDIT_CARD", grouped(AMEX15, (3, 4, 4, 4), " ")),
    (f"AX:{grouped(AMEX15, (5, 5, 5), ' ')}", "CREDIT_CARD", grouped(AMEX15, (5, 5, 5), " ")),
    (f"아멕스 {AMEX15[:4]}-{AMEX15[4:10]} {AMEX15[10:]}", "CREDIT_CARD", f"{AMEX15[:4]}-{AMEX15[4:10]} {AMEX15[10:]}"),
    # KR_RRN (generated checksums): 1900s, 2000s, foreigners, leap day, no dash
    (f"주민등록번호: {rrn('900101', '1', '23456')}", "KR_RRN", rrn("900101", "1", "23456")),
    (f"주민등록번호는{rrn('851231', '2', '05512')}입니다", "KR_RRN", rrn("851231", "2", "05512")),
    (f"RRN {rrn('010315', '3', '11111')} on the form", "KR_RRN", rrn("010315", "3", "11111")),
    (f"resident no. {rrn('120704', '4', '98765')}.", "KR_RRN", rrn("120704", "4", "98765")),
    (f"외국인등록번호 {rrn('770607', '5', '43210')}", "KR_RRN", rrn("770607", "5", "43210")),
    (f"외국인 {rrn('050505', '8', '00001')}", "KR_RRN", rrn("050505", "8", "00001")),
    (f"born on leap day {rrn('000229', '3', '22222')}", "KR_RRN", rrn("000229", "3", "22222")),
    (f"번호 {rrn('880808', '1', '13579', dash=False)} 확인", "KR_RRN",
     rrn("880808", "1", "13579", dash=False)),
    # US_SSN
    ("My SSN is 123-45-6789.", "US_SSN", "123-45-6789"),
    ("SSN 078 05 1120 on file", "US_SSN", "078 05 1120"),
    ("사회보장번호 219-09-9999입니다", "US_SSN", "219-09-9999"),
    ("ssn:665-12-3456", "US_SSN", "665-12-3456"),
    ("area 899: 899-99-0001", "US_SSN", "899-99-0001"),
    ("lowest 001-01-0001 is valid", "US_SSN", "001-01-0001"),
    ("미국 SSN은 457-55-5462 입니다", "US_SSN", "457-55-5462"),
    ("(667-01-2345)", "US_SSN", "667-01-2345"),
    # IP_ADDRESS: IPv4 + IPv6
    ("server at 192.168.0.1, port 22", "IP_ADDRESS", "192.168.0.1"),
    ("서버 10.0.0.255에 접속", "IP_ADDRESS", "10.0.0.255"),
    ("IP는 172.16.254.1입니다", "IP_ADDRESS", "172.16.254.1"),
    ("broadcast 255.255.255.255.", "IP_ADDRESS", "255.255.255.255"),
    ("ping 2001:db8::1 now", "IP_ADDRESS", "2001:db8::1"),
    ("link-local fe80::1ff:fe23:4567:890a.", "IP_ADDRESS", "fe80::1ff:fe23:4567:890a"),
    ("loopback ::1 only", "IP_ADDRESS", "::1"),
    ("주소는 2001:0db8:85a3:0000:0000:8a2e:0370:7334 입니다", "IP_ADDRESS",
     "2001:0db8:85a3:0000:0000:8a2e:0370:7334"),
    ("mapped ::ffff:192.0.2.1 here", "IP_ADDRESS", "::ffff:192.0.2.1"),
    # EMAIL: obfuscated (bracketed at/dot, Korean 골뱅이/닷), apostrophes
    ("write to john [at] example [dot] com please", "EMAIL", "john [at] example [dot] com"),
    ("jane(at)mail(dot)co(dot)kr 로 보내주세요", "EMAIL", "jane(at)mail(dot)co(dot)kr"),
    ("KIM [AT] naver [DOT] com", "EMAIL", "KIM [AT] naver [DOT] com"),
    ("메일은 hong 골뱅이 naver 닷 com 으로", "EMAIL", "hong 골뱅이 naver 닷 com"),
    ("choi@gmail [dot] com!", "EMAIL", "choi@gmail [dot] com"),
    ("Write to john.o'reilly@example.com today.", "EMAIL", "john.o'reilly@example.com"),
    # PHONE: more international / Korean layouts
    ("call +1 (415) 555-2671 now", "PHONE", "+1 (415) 555-2671"),
    ("해외: +82 (0)10-1234-5678", "PHONE", "+82 (0)10-1234-5678"),
    ("(+82) 10-1234-5678 (해외)", "PHONE", "(+82) 10-1234-5678"),
    ("Paris +33 1 23 45 67 89.", "PHONE", "+33 1 23 45 67 89"),
    ("tel:+14155552671", "PHONE", "+14155552671"),
    ("서울 (02) 1234-5678 대표", "PHONE", "(02) 1234-5678"),
    ("+44 20 7946 0958 2 times", "PHONE", "+44 20 7946 0958"),  # a lone trailing digit is not a group
    # URL_CREDENTIALS: the user:password part only; scheme and host stay
    ("DATABASE_URL=postgres://admin:s3cret@db.example.com:5432/app", "URL_CREDENTIALS", "admin:s3cret"),
    ("redis://:p4ssw0rd@localhost:6379/0", "URL_CREDENTIALS", ":p4ssw0rd"),
    ("https://alice:pw@mail.example.com/x", "URL_CREDENTIALS", "alice:pw"),  # not the email pw@mail...
    ("git clone https://user:ghtoken123@github.com/org/repo.git", "URL_CREDENTIALS", "user:ghtoken123"),
    ("mongodb+srv://app_user:Zx8vB2nQ@cluster0.ab1cd.mongodb.net/test", "URL_CREDENTIALS", "app_user:Zx8vB2nQ"),
    ("ftp://anonymous:guest123@ftp.example.org 접속", "URL_CREDENTIALS", "anonymous:guest123"),
    ("연결 문자열: mysql://root:Xy7!pq#1@localhost/db", "URL_CREDENTIALS", "root:Xy7!pq#1"),
    ("amqps://guest:guest@mq.internal", "URL_CREDENTIALS", "guest:guest"),
    # SECRET: key formats, JWT, PEM, auth headers, assignment values (the key stays)
    ("aws_access_key_id AKIAIOSFODNN7EXAMPLE", "SECRET", "AKIAIOSFODNN7EXAMPLE"),
    (f"export GITHUB_TOKEN={GHP}", "SECRET", GHP),
    ("slack xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx ok", "SECRET",
     "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"),
    ("stripe.api_key = sk_live_4eC39HqLyjWDarjtT1zdp7dc", "SECRET", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
    ("키는 sk-proj-abcDEF123ghiJKL456mnoPQR789stu입니다", "SECRET", "sk-proj-abcDEF123ghiJKL456mnoPQR789stu"),
    ("key=AIzaSyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q", "SECRET", "AIzaSyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q"),
    (f"Authorization: Bearer {JWT}", "SECRET", JWT),
    (f"the key:\n{PEM}\nkeep it safe", "SECRET", PEM),
    ("Authorization: Basic dXNlcjpwYXNzd29yZA==", "SECRET", "dXNlcjpwYXNzd29yZA=="),
    ("password=hunter2.", "SECRET", "hunter2"),
    ('"password": "letmein"', "SECRET", "letmein"),
    ("DB_PASSWORD=s3cr3t!", "SECRET", "s3cr3t!"),
    ("api_key: abc123def456ghi789", "SECRET", "abc123def456ghi789"),
    ("my password is hunter2", "SECRET", "hunter2"),
    ("비밀번호: qwer1234!", "SECRET", "qwer1234!"),
    ("비밀번호는 abcd1234입니다", "SECRET", "abcd1234"),
    ("curl -u admin:hunter2 https://api.example.com", "SECRET", "admin:hunter2"),
]


@pytest.mark.parametrize("text,entity,value", POSITIVES)
def test_positive(text, entity, value):
    assert hits(text) == [(entity, value)]


def test_every_entity_has_at_least_eight_positives():
    counts = Counter(entity for _, entity, _ in POSITIVES)
    assert all(counts[e] >= 8 for e in ENTITIES), counts


# --- negatives ---------------------------------------------------------------------

NEGATIVES = [
    # Luhn-invalid / implausible cards
    broken(VISA16),
    grouped(broken(MC16), (4, 4, 4, 4), " "),
    grouped(broken(AMEX15), (4, 6, 5), "-"),
    f"카드 {broken(DISC16)} 결제",
    "1234567812345678",
    MC2_16,
    # dates, times, versions
    "2024-01-15", "2024.01.15", "15/01/2024", "on 01/15/2024 at noon",
    "12:30:45", "오후 3:45:00에 만나요", "10:30", "v1.2.3", "10.0.19045", "v1.2.3.4",
    "release 2.3.4.5.6", "1.2.3.4.5",
    # amounts, order numbers, years, ids
    "1,234,567.89", "12,000원", "₩1,500,000", "$1,234.56", "Order #12345",
    "주문번호 12345678", "in 2024 and 1999", "timestamp 1700000000", "ISBN 978-3-16-148410-0",
    "+1 234", "1234-5678",
    # phones glued to longer digit runs / alphanumeric tokens
    "010-1234-56789", "ABC010-1234-5678", "x555-123-4567",
    # RRN: bad checksum, bad date, bad gender digit
    bad_rrn(rrn("900101", "1", "23456")),
    f"주민번호 {bad_rrn(rrn('851231', '2', '05512'))}",
    rrn("901301", "1", "23456"), rrn("900230", "2", "12345"), rrn("900101", "9", "23456"),
    # SSN ranges; bare nine digits
    "SSN 000-12-3456", "666-12-3456", "900-12-3456", "123-00-4567", "123-45-0000",
    "123456789", "123-45 6789",
    # IPs
    "999.1.1.1", "256.1.1.1", "01.02.03.04", "a1:b2:c3:d4:e5:f6", "std::vector",
    # emails
    "user@localhost", "@example.com", "a..b@example.com",
    "icon@2x.png", "npm i lodash@4.17.21", "name at domain dot com", "meet [at] noon [dot] ok",
    "The meeting is (at) the office.",
    # phones: order/ticket numbers, too few digits, hotline-like
    "Order #415-555-2671", "ticket #010-1234-5678", "score +12345678 points", "02-12-3456",
    # IP look-alikes: code slices and namespaces, version contexts
    "x[1::2] and y[::3]", "a::b", "use std::io::Read;", "version 1.0.0.0", "Release 4.0.0.0-beta",
    # URL look-alikes
    "https://example.com:8080/path", "postgres://user:${DB_PASS}@db/app", "mysql://root:****@localhost/db",
    "https://twitter.com/@jane", "docker run -u 1000:1000 alpine",
    # secret look-alikes: placeholders, code, special tokens, hashes, public material
    "ghp_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", "AKIAXXXXXXXXXXXXXXXX", "ASIANDEVELOPMENTBANK",
    "sk-learn-compatible-estimator-class", "sk-2024annualreportfinalv2xx", "password = getpass()",
    "password = os.environ['DB_PASSWORD']", "password = self.password", "password=${DB_PASSWORD}",
    "password: ${PASSWORD:-default}", "password=********", "token=<your-token>", "pad_token = '[PAD]'",
    "eos_token: </s>", "max_tokens=512", "api_key=YOUR_API_KEY", "Forgot password: click here",
    "The password is strong", "def login(user: str, password: str) -> bool:", "비밀번호는 8자 이상이어야 합니다",
    "token_type=bearer", "Basic authentication", "commit 3f786850e387550fdab836ed7e6dc881de23001b",
    "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "uuid 123e4567-e89b-12d3-a456-426614174000", "eyJhbGciOiJIUzI1NiJ9",
    "-----BEGIN CERTIFICATE-----\nMIIBkTCB+wIJAKHBfpegPjMCMA0GCSqGSIb3DQEBBQUAMBEx\n-----END CERTIFICATE-----",
    "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 user@host",
]


@pytest.mark.parametrize("text", NEGATIVES)
def test_negative(text):
    assert hits(text) == []


def test_luhn_invalid_card_is_not_reported_as_anything_else():
    text = f"card {grouped(broken(VISA16), (4, 4, 4, 4), '-')} and {broken(VISA16)}"
    assert PiiEngine().find(text) == []


# --- overlaps, ordering, selection -------------------------------------------------

def test_longer_span_wins_over_nested_match():
    text = "mail 010-1234-5678@example.com"
    assert hits(text) == [("EMAIL", "010-1234-5678@example.com")]


def test_matches_are_sorted_and_non_overlapping():
    text = "b@x.io 10.0.0.1 a@y.io 010-1234-5678 123-45-6789"
    found = PiiEngine().find(text)
    assert [m.entity for m in found] == ["EMAIL", "IP_ADDRESS", "EMAIL", "PHONE", "US_SSN"]
    assert all(a.end <= b.start for a, b in zip(found, found[1:]))


def test_ip_range_and_dotted_sequence():
    assert hits("10.0.0.1-10.0.0.5") == [("IP_ADDRESS", "10.0.0.1"), ("IP_ADDRESS", "10.0.0.5")]


def test_pii_match_is_frozen():
    m = PiiMatch("EMAIL", 0, 3)
    with pytest.raises(FrozenInstanceError):
        m.start = 1  # type: ignore[misc]


def test_entity_subset():
    text = "a@b.com 010-1234-5678"
    assert hits(text, PiiEngine(["PHONE"])) == [("PHONE", "010-1234-5678")]
    assert PiiEngine(["EMAIL"]).redact(text) == ("<EMAIL> 010-1234-5678", Counter(EMAIL=1))


def test_unknown_entity_raises():
    with pytest.raises(ValueError, match="PERSON_NAME"):
        PiiEngine(["EMAIL", "PERSON_NAME"])


def test_context_anchored_entities_win_overlaps():
    # The email candidate "pw@mail.example.com" overlaps the URL credentials and loses; the host stays.
    assert PiiEngine().redact("https://alice:pw@mail.example.com/x")[0] == "https://<URL_CREDENTIALS>@mail.example.com/x"
    text = "http://admin:admin123@192.168.0.10/cgi-bin"
    assert hits(text) == [("URL_CREDENTIALS", "admin:admin123"), ("IP_ADDRESS", "192.168.0.10")]
    # an assignment value that looks like a phone is still the secret
    assert hits("password=010-1234-5678") == [("SECRET", "010-1234-5678")]


def test_assignment_keeps_key_and_multiline_pem_is_one_span():
    assert PiiEngine().redact("DB_PASSWORD=s3cr3t! psql -h db") == ("DB_PASSWORD=<SECRET> psql -h db",
                                                                     Counter(SECRET=1))
    out, counts = PiiEngine().redact(f"key:\n{PEM}\nend")
    assert out == "key:\n<SECRET>\nend" and counts == Counter(SECRET=1)


# --- actions -----------------------------------------------------------------------

SALT = b"pytest-salt-7f3a9c1e5b2d4068"


def token(entity: str, canonical: str, salt: bytes = SALT) -> str:
    return f"<{entity}:{hmac.new(salt, canonical.encode(), hashlib.sha256).hexdigest()[:12]}>"


def test_default_action_is_placeholder():
    engine = PiiEngine()
    assert engine.actions == {e: "placeholder" for e in ENTITIES}
    assert engine.redact("mail a@b.com")[0] == "mail <EMAIL>"


@pytest.mark.parametrize("text,masked", [
    ("call 010-1234-5678 now", "call ***-****-5678 now"),
    ("phone +82 10-1234-5678", "phone +** **-****-5678"),
    (f"card {grouped(VISA16, (4, 4, 4, 4), ' ')}", f"card **** **** **** {VISA16[-4:]}"),
    ("mail jane.doe@example.com!", "mail ****.***@*******.***!"),
    ("ip 192.168.0.1", "ip ***.***.*.*"),
    (f"rrn {rrn('900101', '1', '23456')}", "rrn ******-*******"),
    ("ssn 123-45-6789", "ssn ***-**-****"),
    ("DB_PASSWORD=s3cr3t!", "DB_PASSWORD=******!"),
    ("postgres://admin:s3cret@db", "postgres://*****:******@db"),
])
def test_mask_keeps_shape(text, masked):
    out, counts = PiiEngine(default_action="mask").redact(text)
    assert out == masked and len(out) == len(text) and sum(counts.values()) == 1


def test_hash_is_hmac_of_canonical_value():
    engine = PiiEngine(default_action="hash", salt=SALT)
    assert engine.redact("mail John.Doe@Example.com")[0] == f"mail {token('EMAIL', 'john.doe@example.com')}"
    assert engine.redact("ip 2001:0db8::0001")[0] == f"ip {token('IP_ADDRESS', '2001:db8::1')}"
    assert engine.redact(f"card {grouped(VISA16, (4, 4, 4, 4), '-')}")[0] == f"card {token('CREDIT_CARD', VISA16)}"
    assert re.fullmatch(r"<SECRET:[0-9a-f]{12}>", engine.redact("password=hunter2")[0].split("=")[1])


def test_hash_is_deterministic_and_layout_independent():
    a, b = PiiEngine(default_action="hash", salt=SALT), PiiEngine(default_action="hash", salt=SALT)
    text = "John <john@example.com>, 010-1234-5678, JOHN [at] example [dot] com, +82 10 1234 5678"
    out = a.redact(text)[0]
    assert out == b.redact(text)[0] == a.redact(text)[0]
    emails, phones = re.findall(r"<EMAIL:\w+>", out), re.findall(r"<PHONE:\w+>", out)
    assert len(emails) == len(phones) == 2 and len(set(emails)) == len(set(phones)) == 1
    assert phones[0] == token("PHONE", "+821012345678")
    other = PiiEngine(default_action="hash", salt=b"another-salt-0123456789").redact(text)[0]
    assert other != out and set(re.findall(r"<EMAIL:\w+>", other)).isdisjoint(emails)


def test_hash_salt_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(SALT_ENV, SALT.decode())
    assert PiiEngine(default_action="hash").redact("a@b.com")[0] == token("EMAIL", "a@b.com")


def test_salt_id_names_the_salt_without_revealing_it():
    a, b = PiiEngine(default_action="hash", salt=SALT), PiiEngine(actions={"EMAIL": "hash"}, salt=SALT)
    assert a.salt_id == b.salt_id and re.fullmatch(r"[0-9a-f]{16}", a.salt_id)
    assert PiiEngine(default_action="hash", salt=b"another-salt-0123456789").salt_id != a.salt_id
    assert PiiEngine(salt=SALT).salt_id is None  # no hash action


def test_hash_without_salt_is_a_config_error_naming_the_variable(monkeypatch):
    monkeypatch.delenv(SALT_ENV, raising=False)
    with pytest.raises(ConfigError, match=SALT_ENV):
        PiiEngine(actions={"EMAIL": "hash"})
    monkeypatch.setenv(SALT_ENV, "")
    with pytest.raises(ConfigError, match=SALT_ENV):
        PiiEngine(default_action="hash")
    PiiEngine(actions={"EMAIL": "mask"})  # no hash action: the salt is not needed, not read


def test_short_salt_is_rejected_without_echoing_it(monkeypatch):
    monkeypatch.setenv(SALT_ENV, "tiny-salt")
    with pytest.raises(ConfigError, match="at least 16") as info:
        PiiEngine(default_action="hash")
    assert "tiny-salt" not in str(info.value)


def test_salt_never_appears_in_output_or_engine_state(monkeypatch, caplog):
    secret = "ZZ-salt-must-not-leak-31337"
    monkeypatch.setenv(SALT_ENV, secret)
    caplog.set_level(logging.DEBUG)
    engine = PiiEngine(default_action="hash")
    outputs = [engine.redact(t)[0] for t in ("a@b.com", "010-1234-5678", "password=hunter2", "nothing here")]
    assert all(secret not in out for out in outputs) and outputs[3] == "nothing here"
    state = repr(engine) + repr(vars(engine)) + caplog.text
    assert secret not in state and secret.encode().hex() not in state
    assert not any(isinstance(v, (bytes, str)) and secret in str(v) for v in vars(engine).values())


def test_per_entity_actions_and_validation():
    engine = PiiEngine(actions={"EMAIL": "hash", "PHONE": "mask"}, salt=SALT)
    out, counts = engine.redact("a@b.com 010-1234-5678 123-45-6789")
    assert out == f"{token('EMAIL', 'a@b.com')} ***-****-5678 <US_SSN>"
    assert counts == Counter(EMAIL=1, PHONE=1, US_SSN=1)
    with pytest.raises(ValueError, match="blur"):
        PiiEngine(default_action="blur")
    with pytest.raises(ValueError, match="NAME"):
        PiiEngine(actions={"NAME": "mask"})


# --- scrub step wiring (an in-memory store stands in for S3) -----------------------

class MemoryStore:
    def __init__(self, records):
        self.records, self.rows, self.stats, self.config = records, None, None, None

    def lookup(self, step, key):
        return None

    def manifest(self, key):  # the raw file validate names (key "raw"), and validate's artifact: no quarantine
        return {"digest": "d-raw", "files": {}}

    def iter_lines(self, ref, name):
        assert ref.key == "raw"
        yield from (json.dumps(record).encode() for record in self.records)

    def writer(self, step, key, config, inputs=()):
        self.config = config
        return self

    @contextlib.contextmanager
    def jsonl_file(self, name):
        self.rows = []
        yield SimpleNamespace(write_many=self.rows.extend,
                              write_lines=lambda lines: self.rows.extend(json.loads(line) for line in lines))

    def commit(self, stats=None):
        from steps.core.store import DatasetRef
        self.stats = stats
        return DatasetRef(step="scrub", key="k", digest="d", stats=stats)


def test_scrub_step_applies_configured_actions(monkeypatch, caplog):
    from steps.config import ScrubConfig
    from steps.core.store import DatasetRef
    from steps.scrub.step import scrub_records

    secret = "scrub-step-salt-0123456789"
    monkeypatch.setenv(SALT_ENV, secret)
    caplog.set_level(logging.DEBUG)
    store = MemoryStore([{"id": "a", "text": "mail Kim@Naver.com or 010-1234-5678, password=hunter2"}])
    source = DatasetRef(step="validate", key="v", digest="d0",
                        stats={"record_kind": "text", "raw": {"key": "raw", "digest": "d-raw"}})
    cfg = ScrubConfig(pii_action="mask", pii_actions={"EMAIL": "hash"}, near_dedup=False)
    scrub_records(cfg, source, store)
    assert store.rows == [{"id": "a", "text": f"mail {token('EMAIL', 'kim@naver.com', secret.encode())} "
                                             "or ***-****-5678, password=*******"}]
    assert store.stats["pii"] == {e: int(e in ("EMAIL", "PHONE", "SECRET")) for e in ENTITIES}
    everything = json.dumps([store.rows, store.stats, cfg.model_dump()]) + caplog.text
    assert secret not in everything
    monkeypatch.delenv(SALT_ENV)
    with pytest.raises(ConfigError, match=SALT_ENV):
        scrub_records(cfg, source, MemoryStore(store.records))


def test_scrub_config_pii_fields():
    from steps.config import PipelineParams, ScrubConfig

    cfg = ScrubConfig()
    assert list(cfg.pii_entities) == list(ENTITIES) and cfg.pii_action == "placeholder" and cfg.pii_actions == {}
    assert not cfg.presidio_names
    assert ScrubConfig(presidio_names=True).pii_entities[-1] == "PERSON"
    with pytest.raises(ValueError, match="presidio_names"):
        ScrubConfig(pii_entities=["EMAIL", "PERSON"])
    with pytest.raises(ValueError, match="PHONE"):
        ScrubConfig(pii_entities=["EMAIL"], pii_actions={"PHONE": "hash"})
    with pytest.raises(ConfigError, match="pii_action"):
        PipelineParams.parse({"scrub": {"pii_action": "blur"}})
    assert PipelineParams.parse({"scrub": {"pii_actions": {"EMAIL": "hash"}}}).scrub.pii_actions == {"EMAIL": "hash"}


# --- optional Presidio PERSON backend ------------------------------------------------

def fake_presidio(monkeypatch, installed=(), spans=()):
    """Stand-ins for presidio_analyzer and spaCy; `installed` are the spaCy packages present."""
    seen = {}

    class Provider:
        def __init__(self, nlp_configuration):
            seen["config"] = nlp_configuration

        def create_engine(self):
            return "nlp"

    class Analyzer:
        def __init__(self, nlp_engine, supported_languages):
            seen["languages"] = supported_languages

        def analyze(self, text, entities, language):
            assert entities == ["PERSON"]
            seen.setdefault("calls", []).append(language)
            return [types.SimpleNamespace(start=s, end=e, score=0.85, entity_type="PERSON") for s, e in spans]

    presidio = types.ModuleType("presidio_analyzer")
    presidio.AnalyzerEngine = Analyzer
    nlp_engine = types.ModuleType("presidio_analyzer.nlp_engine")
    nlp_engine.NlpEngineProvider = Provider
    spacy = types.ModuleType("spacy")
    spacy.util = types.SimpleNamespace(is_package=lambda name: name in installed)
    for name, module in (("presidio_analyzer", presidio), ("presidio_analyzer.nlp_engine", nlp_engine),
                         ("spacy", spacy)):
        monkeypatch.setitem(sys.modules, name, module)
    return seen


def test_person_without_presidio_is_a_clear_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "presidio_analyzer", None)  # import fails even where it is installed
    with pytest.raises(ConfigError, match="presidio-analyzer.*pip install"):
        PiiEngine(["EMAIL", "PERSON"])
    PiiEngine(["EMAIL"])  # off by default: nothing is imported


def test_person_without_spacy_model_is_a_clear_config_error(monkeypatch):
    fake_presidio(monkeypatch, installed=())
    with pytest.raises(ConfigError, match="spaCy English NER model.*spacy download"):
        PiiEngine(["PERSON"])


def test_person_names_through_presidio(monkeypatch):
    text = "Jane Doe <jane@example.com> met 김철수"
    # the second span overlaps the email: structured entities win over NER names
    seen = fake_presidio(monkeypatch, installed=("en_core_web_sm",), spans=[(0, 8), (5, 20)])
    out, counts = PiiEngine(["EMAIL", "PERSON"]).redact(text)
    assert out == "<PERSON> <<EMAIL>> met 김철수" and counts == Counter(PERSON=1, EMAIL=1)
    assert seen["config"]["models"] == [{"lang_code": "en", "model_name": "en_core_web_sm"}]
    assert seen["languages"] == ["en"]
    fake_presidio(monkeypatch, installed=("en_core_web_sm",), spans=[(0, 8)])
    hashed = PiiEngine(["PERSON"], default_action="hash", salt=SALT).redact("Jane Doe <x>")[0]
    assert hashed == f"{token('PERSON', 'jane doe')} <x>"


def test_presidio_uses_a_korean_model_for_hangul_text_when_installed(monkeypatch):
    seen = fake_presidio(monkeypatch, installed=("en_core_web_lg", "ko_core_news_sm"), spans=[(0, 3)])
    engine = PiiEngine(["PERSON"])
    assert seen["languages"] == ["en", "ko"]
    assert seen["config"]["ner_model_configuration"]["model_to_presidio_entity_mapping"]["PS"] == "PERSON"
    engine.find("Bob is here")
    assert seen["calls"] == ["en"]
    assert engine.redact("김철수 씨")[0] == "<PERSON> 씨" and seen["calls"] == ["en", "en", "ko"]


# --- redaction ---------------------------------------------------------------------

def test_redact_english():
    text = "Email john@example.com or call (555) 123-4567; SSN 123-45-6789, IP 8.8.8.8."
    out, counts = PiiEngine().redact(text)
    assert out == "Email <EMAIL> or call <PHONE>; SSN <US_SSN>, IP <IP_ADDRESS>."
    assert counts == Counter(EMAIL=1, PHONE=1, US_SSN=1, IP_ADDRESS=1)


def test_redact_korean_all_entities():
    card_no = grouped(VISA16, (4, 4, 4, 4), "-")
    rrn_no = rrn("900101", "1", "23456")
    text = (f"홍길동의 전화번호는010-1234-5678이고 사무실은 02-123-4567입니다. "
            f"주민등록번호는{rrn_no}, 카드는 {card_no}, 메일은 hong@naver.com, "
            f"접속 IP는 192.168.0.1 또는 2001:db8::1입니다.")
    out, counts = PiiEngine().redact(text)
    assert out == ("홍길동의 전화번호는<PHONE>이고 사무실은 <PHONE>입니다. "
                   "주민등록번호는<KR_RRN>, 카드는 <CREDIT_CARD>, 메일은 <EMAIL>, "
                   "접속 IP는 <IP_ADDRESS> 또는 <IP_ADDRESS>입니다.")
    assert counts == Counter(PHONE=2, KR_RRN=1, CREDIT_CARD=1, EMAIL=1, IP_ADDRESS=2)


def test_redact_leaves_non_pii_untouched():
    text = "Order #12345 shipped 2024-01-15 12:30:45 for 12,000원 (v1.2.3)."
    assert PiiEngine().redact(text) == (text, Counter())


def test_redact_empty():
    assert PiiEngine().redact("") == ("", Counter())


# --- normalize_text, then detection ------------------------------------------------


def test_normalized_pem_is_still_one_secret():
    clean = normalize_text("key:\r\n" + PEM.replace("\n", "\r\n") + "  \r\n")
    assert hits(clean) == [("SECRET", PEM)]


def test_normalize_is_idempotent_and_enables_detection():
    raw = "  전화：０１０－１２３４－５６７８\u200b  \r\n\r\n\r\n끝 "
    once = normalize_text(raw)
    assert normalize_text(once) == once
    assert PiiEngine().redact(once) == ("전화:<PHONE>\n\n끝", Counter(PHONE=1))
