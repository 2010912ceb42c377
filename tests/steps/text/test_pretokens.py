"""steps.text.pretokens: the pre-token cache gives the tokenizer's own ids and labels, or steps aside."""

import json
import random

import pytest
from tokenizers import Tokenizer

import steps.text.pretokens as pretokens
import steps.tokenize.encode as encode
from steps.text.pretokens import PretokenEncoder

# Characters from every class the pre-tokenizer regex tells apart, and the ones engines may
# class differently: Unicode whitespace, other scripts' digits, marks, emoji, format characters.
PALETTE = (list("abcXYZ") + ["é", "ß", "안", "녕", "한", "字", "ش", "ع", "д", "λ"]
           + list("0129") + ["١", "٣", "½", "²", "Ⅻ", "〇"]
           + [" ", " ", " ", "\t", "\n", "\n", "\r", "\x0b", "\x0c", "\x1c", "\x85", "\u00a0", "\u2028", "\u3000",
              "\u2009", "\u200b"]
           + list("!?.,;:'\"-_()[]{}<>|/@#$%^&*+=~`") + ["'s", "'t", "'re", "'ll", "'d", "'S"]
           + ["\u0301", "\u200d", "🙂", "👩\u200d💻", "🇰🇷", "\ufe0f", "…", "—", "€", "©"]
           + ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start", "im_end|>"])


def random_text(rng: random.Random, size: int) -> str:
    return "".join(rng.choice(PALETTE) if rng.random() < 0.4 else rng.choice([" the", " word", "s", "123", "  "])
                   for _ in range(size))


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir).backend_tokenizer


def test_fuzzed_texts_encode_to_the_tokenizers_ids(backend):
    encoder = PretokenEncoder.of(backend)
    assert encoder is not None  # SmolLM2's tokenizer qualifies
    rng = random.Random(5)
    texts = [random_text(rng, rng.randint(0, 80)) for _ in range(3000)]
    want = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    got = [encoder.encode(text) for text in texts]
    assert [g[0] if g is not None else w for g, w in zip(got, want)] == want
    assert sum(g is None for g in got) < len(texts) // 10  # stepping aside is the exception


def test_labels_equal_the_tokenizers_offsets_labels(tiny_tokenizer, monkeypatch):
    """encode_chat_batch with the encoder and without it (Rust ids and offsets): same ids and labels,
    for contents that start or end with whitespace, specials, marks and digits."""
    rng = random.Random(11)
    conversations = []
    for _ in range(400):
        turns = [{"role": "system", "content": random_text(rng, 8)}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            turns += [{"role": "user", "content": random_text(rng, rng.randint(1, 30))},
                      {"role": "assistant", "content": random_text(rng, rng.randint(1, 30))}]
        conversations.append(turns)
    assert encode.pretoken_encoder(tiny_tokenizer) is not None
    fast = encode.encode_chat_batch(tiny_tokenizer, conversations)
    monkeypatch.setattr(encode, "pretoken_encoder", lambda tokenizer: None)
    assert fast == encode.encode_chat_batch(tiny_tokenizer, conversations)


def test_bounds_map_to_tokens_or_step_aside(backend):
    encoder = PretokenEncoder.of(backend)
    hello = backend.encode("hello", add_special_tokens=False).ids
    ids, at = encoder.encode("hello world<|im_end|>", [0, 5, 11, 21])
    assert ids == backend.encode("hello world<|im_end|>", add_special_tokens=False).ids
    assert at == [0, len(hello), len(ids) - 1, len(ids)]
    assert encoder.encode("hello world", [2]) is None        # inside a pre-token
    assert encoder.encode("a<|im_end|>b", [3]) is None        # inside an added token
    assert encoder.encode("hello", [9]) is None               # past the end


def test_a_character_the_engines_class_differently_goes_to_the_tokenizer(backend, monkeypatch):
    """Fault injection: our regex engine suddenly calls 'é' not a letter. Texts holding it step
    aside (None) instead of being split differently; others still encode."""
    real = pretokens._LETTER
    monkeypatch.setattr(pretokens, "_LETTER", type("Letter", (), {"match": staticmethod(
        lambda ch: None if ch == "é" else real.match(ch))}))
    encoder = PretokenEncoder.of(backend)
    assert encoder is not None
    assert encoder.encode("un café noir") is None
    assert encoder.encode("un cafe noir")[0] == backend.encode("un cafe noir", add_special_tokens=False).ids


def test_a_small_cache_still_gives_the_same_ids(backend, monkeypatch):
    monkeypatch.setattr(pretokens, "MAX_CACHE", 8)
    encoder = PretokenEncoder.of(backend)
    rng = random.Random(2)
    texts = [random_text(rng, 40) for _ in range(300)]
    got = [encoder.encode(text) for text in texts]
    want = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    assert all(g is None or g[0] == w for g, w in zip(got, want))
    assert len(encoder._cache) <= 8


@pytest.mark.parametrize("change", ["prefix space", "normalizer", "other pre-tokenizer", "stripped added token",
                                    "trimming post-processor", "truncation"])
def test_tokenizers_it_cannot_copy_get_none(backend, change):
    spec = json.loads(backend.to_str())
    if change == "prefix space":
        spec["pre_tokenizer"]["add_prefix_space"] = True
    elif change == "normalizer":
        spec["normalizer"] = {"type": "NFC"}
    elif change == "other pre-tokenizer":
        spec["pre_tokenizer"] = {"type": "Whitespace"}
    elif change == "stripped added token":
        spec["added_tokens"][1]["lstrip"] = True
    elif change == "trimming post-processor":
        spec["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                  "use_regex": True}
    else:
        spec["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    assert PretokenEncoder.of(Tokenizer.from_str(json.dumps(spec))) is None


def test_text_that_never_repeats_makes_the_encoder_step_aside(backend, monkeypatch):
    """Random identifiers miss the cache on nearly every pre-token, where the tokenizer alone is
    faster: after one window over the miss limit the encoder answers None for good."""
    import string

    monkeypatch.setattr(pretokens, "WINDOW", 2000)
    encoder = PretokenEncoder.of(backend)
    rng = random.Random(3)
    texts = [" ".join("".join(rng.choice(string.ascii_letters) for _ in range(10)) for _ in range(50))
             for _ in range(100)]
    got = [encoder.encode(text) for text in texts]
    assert encoder.gave_up and got[-1] is None
    assert got[0] is not None and got[0][0] == backend.encode(texts[0], add_special_tokens=False).ids


def test_cached_pieces_still_map_bounds_inside_them(backend):
    """A piece between added tokens seen before is copied whole, unless a bound falls inside it."""
    encoder = PretokenEncoder.of(backend)
    text = "<|im_start|>assistant\nhello world<|im_end|>"
    assert encoder.encode(text)[0] == backend.encode(text, add_special_tokens=False).ids
    assert "assistant\nhello world" in encoder._pieces
    ids, at = encoder.encode(text, [22, 27])  # "hello", " world"
    prefix = backend.encode("<|im_start|>assistant\n", add_special_tokens=False).ids
    hello = backend.encode("hello", add_special_tokens=False).ids
    assert ids == backend.encode(text, add_special_tokens=False).ids
    assert at == [len(prefix), len(prefix) + len(hello)]
