"""steps/text/normalize.py: line breaks, control characters, NFKC (but chat jamo), noise runs and spaces;
idempotent (with PII detection after it: tests/steps/text/test_pii.py)."""

import pytest

from steps.text.normalize import normalize_text


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


@pytest.mark.parametrize("raw,clean", [
    ("wow!!!!!!!", "wow!!!"), ("what??????", "what???"), ("ok!!!", "ok!!!"), ("hmm......", "hmm..."),
    ("좋아요~~~~~", "좋아요~~~"), ("ㅋㅋㅋㅋㅋㅋㅋ", "ㅋㅋㅋ"), ("ㅠㅠㅠㅠ", "ㅠㅠㅠ"), ("😂😂😂😂😂", "😂😂😂"),
    ("👍🏻👍🏻👍🏻👍🏻👍🏻", "👍🏻👍🏻👍🏻"), ("！！！！", "!!!"), ("헐!!!!!!ㅋㅋㅋㅋㅋ", "헐!!!ㅋㅋㅋ"),
    ("!!\u200b!!", "!!!"),
])
def test_normalize_collapses_noise_runs_to_three(raw, clean):
    assert normalize_text(raw) == clean


@pytest.mark.parametrize("text", [
    "-----BEGIN RSA PRIVATE KEY-----", "Title\n=====", "| --- | --- |", "****", "#####", "a____b", "////",
    "1000000", "aaaaaa", "ㅋㅋㅋ", "ㅋㅠ",
])
def test_normalize_keeps_structural_runs_and_chat_jamo(text):
    assert normalize_text(text) == text


def test_normalize_other_breaks_and_spaces():
    assert normalize_text("a\x0bb\x0cc\x85d\u2028e") == "a\nb\nc\nd\ne"
    assert normalize_text("a\u1680b\u2009c\u202fd") == "a b c d"
    assert normalize_text("\u110f\u200b\u1161") == "카"  # separated jamo compose in one pass


def test_normalize_is_idempotent_on_noisy_input():
    import random

    alphabet = list("ab !?.~-=*#\n\t\r\x0b\x0c\x85\u2028\u200b\u200d\ufeff\x00\u00a0\u3000") + [
        "😂", "👍", "\U0001F3FB", "\ufe0f", "ㅋ", "ㅠ", "\u1100", "\u1161", "\u11ab", "가", "ｔ", "０", "①", "ﬁ"]
    rng = random.Random(0)
    for _ in range(3000):
        once = normalize_text("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))))
        assert normalize_text(once) == once
