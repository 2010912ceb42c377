"""Tests for steps.pii: detection, validation, redaction and text normalisation."""

from collections import Counter
from dataclasses import FrozenInstanceError

import pytest

from steps.pii import ENTITIES, PiiEngine, PiiMatch, normalize_text


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


# --- normalize_text ----------------------------------------------------------------

def test_normalize_fullwidth_to_ascii():
    assert normalize_text("ｔｅｌ：０１０－１２３４－５６７８") == "tel:010-1234-5678"


def test_normalize_removes_control_and_zero_width():
    assert normalize_text("a\x00b\x07c\u200bd\ufeffe\u200df\x1bg") == "abcdefg"


def test_normalize_newlines_and_whitespace():
    assert normalize_text("a\r\nb\rc") == "a\nb\nc"
    assert normalize_text("  a \t\t b   \n\n\n\n c  ") == "a b\n\n c"
    assert normalize_text("line one   \nline two\t\n") == "line one\nline two"
    assert normalize_text("x\u3000\u00a0y") == "x y"  # ideographic / no-break spaces


def test_normalize_preserves_korean():
    assert normalize_text("안녕하세요,   세계!\n\n\n\n반갑습니다.") == "안녕하세요, 세계!\n\n반갑습니다."
    assert normalize_text("\u1112\u1161\u11ab\u1100\u1173\u11af") == "한글"  # jamo -> syllables


def test_normalize_is_idempotent_and_enables_detection():
    raw = "  전화：０１０－１２３４－５６７８\u200b  \r\n\r\n\r\n끝 "
    once = normalize_text(raw)
    assert normalize_text(once) == once
    assert PiiEngine().redact(once) == ("전화:<PHONE>\n\n끝", Counter(PHONE=1))
