"""Tests for steps.text.dedup: exact fingerprints, MinHash near duplicates, cluster report, leakage."""

import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasketch import MinHash

from steps.text.dedup import (
    NearDuplicates,
    SortedRuns,
    affine32_permutations,
    exact_form,
    fingerprint,
    leakage,
    near_form,
)

REPO = Path(__file__).resolve().parents[3]

BASE = ("The committee reviewed the annual budget on Tuesday and agreed to move the "
        "library renovation forward by six months. Members asked the city engineer for a "
        "revised cost estimate, a schedule for the roof repairs, and a plan to keep the "
        "reading rooms open during construction. A public hearing is planned for March.")

KO = ("서울시는 내년부터 대중교통 요금을 단계적으로 인상한다고 밝혔다. 시는 버스와 지하철 운영 "
      "적자가 누적되어 요금 조정이 불가피하다고 설명했으며, 저소득층과 청소년에게는 할인 혜택을 "
      "확대할 계획이라고 덧붙였다. 시민들의 의견을 듣기 위한 공청회는 다음 달 중순에 시청 "
      "대회의실에서 열리며, 온라인으로도 참여할 수 있다. 최종 인상 폭은 공청회 결과와 시의회 "
      "심의를 거쳐 올해 말에 확정될 예정이다.")


def shingles(text: str, k: int = 5) -> set[str]:
    s = near_form(text)
    return {s[i:i + k] for i in range(len(s) - k + 1)} if len(s) >= k else {s}


def jaccard(a: str, b: str) -> float:
    """True Jaccard similarity of the two texts' shingle sets (what MinHash estimates)."""
    x, y = shingles(a), shingles(b)
    return len(x & y) / len(x | y)


def words(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
            for _ in range(n)]


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(words(rng, 50)) for _ in range(n)]


# --- exact fingerprint -------------------------------------------------------------

def test_fingerprint_collapses_whitespace_case_and_unicode_variants():
    key = fingerprint("Hello world, this is a test.")
    for variant in ("hello   WORLD,\tthis is a test.", "  Hello world,\nthis  is a test.  ",
                    "Hello\u200b world, this is a test.", "Ｈｅｌｌｏ world, this is a test.",
                    "HELLO WORLD, THIS IS A TEST.", "Hello\u00a0world, this is a test."):
        assert fingerprint(variant) == key, variant
    assert exact_form("  Hello\r\n\r\n  World ") == "hello world"
    assert len(key) == 64 and int(key, 16) >= 0


def test_fingerprint_keeps_punctuation_and_content():
    assert fingerprint("pi is 3.14") != fingerprint("pi is 314")
    assert fingerprint("Hello, world") != fingerprint("Hello world")
    assert fingerprint("Hello world") != fingerprint("Hello world!")
    assert fingerprint("안녕하세요") == fingerprint(" 안녕하세요 ") != fingerprint("안녕히 가세요")


def test_near_form_turns_punctuation_into_spaces():
    assert near_form("Hello, World!! (again)") == "hello world again"
    assert near_form("state-of-the-art") == "state of the art"
    assert near_form("price: $5 + <EMAIL>") == "price $5 + <email>"   # symbols are kept
    assert near_form("서울시는, 「대중교통」 요금을…") == "서울시는 대중교통 요금을"


# --- MinHash signatures ----------------------------------------------------------

M64, MASK = 0x9E3779B97F4A7C15, (1 << 64) - 1


def reference_hash32(shingle: str) -> int:
    """The shingle hash written out with Python ints (independent of the numpy code)."""
    h = len(shingle)
    for ch in shingle:
        h = (h * M64 + ord(ch)) & MASK
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & MASK
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & MASK
    h ^= h >> 33
    return h >> 32


@pytest.mark.parametrize("num_perm,seed", [(128, 1), (64, 7), (256, 123), (2, 0)])
def test_affine32_permutations_are_datasketchs(num_perm, seed):
    """Our copy of datasketch's permutation parameters (so steps.text.dedup need not import it)."""
    a, b = affine32_permutations(num_perm, seed)
    want_a, want_b = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
    assert a.dtype == b.dtype == np.uint32
    assert np.array_equal(a, want_a) and np.array_equal(b, want_b)


def test_data_steps_do_not_import_datasketch():
    """datasketch (and scipy behind it) cost ~1 s per worker process: only the bench and
    ``minhash`` (a LeanMinHash for callers who want one) import it."""
    code = "import sys, steps.text.dedup, steps.scrub.step, steps.tokenize.step; print('datasketch' in sys.modules, 'scipy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("text", [BASE, KO, "ok", "", "abcde", "x" * 3 + "y" * 20000,
                                  " ".join(corpus(1, seed=3) * 40)])
def test_signature_is_datasketch_minhash(text):
    """Bit-for-bit datasketch MinHash(affine32).update_batch over the shingles, incl. short,
    empty and very long (chunked) texts."""
    near = NearDuplicates(num_perm=64, seed=7)
    s = near_form(text)
    items = [s[i:i + 5] for i in range(len(s) - 4)] if len(s) >= 5 else [s]
    ref = MinHash(num_perm=64, seed=7, hashfunc=reference_hash32)
    ref.update_batch(items)
    sig = near.signature(text)
    assert sig.dtype == np.uint32 and np.array_equal(sig, ref.hashvalues)
    lean = near.minhash(text)
    assert lean.scheme == "affine32" and lean.jaccard(ref) == 1.0


def test_estimate_tracks_true_jaccard():
    rng = random.Random(5)
    near = NearDuplicates(num_perm=256)
    base = words(rng, 60)
    for keep in (60, 50, 40, 30):
        other = " ".join(base[:keep] + words(rng, 60 - keep))
        est = near.minhash(" ".join(base)).jaccard(near.minhash(other))
        assert abs(est - jaccard(" ".join(base), other)) < 0.1


# --- near duplicates --------------------------------------------------------------

def test_near_duplicates_are_found_at_0_8():
    variants = {
        "word_changed": BASE.replace("Tuesday", "Wednesday"),
        "words_changed": BASE.replace("six months", "five weeks").replace("roof", "wall"),
        "word_added": BASE.replace("public hearing", "second public hearing"),
        "punct_case": BASE.upper().replace(",", "").replace(".", "!"),
        "whitespace": BASE.replace(" ", "  ").replace(". ", ".\n\n"),
    }
    for name, text in variants.items():
        assert jaccard(BASE, text) >= 0.85, name     # comfortably above the threshold
        near = NearDuplicates(threshold=0.8)
        assert near.check_and_add("base", BASE) is None
        assert near.check_and_add(name, text) == "base", name


def test_different_texts_are_not_duplicates():
    near = NearDuplicates(threshold=0.8)
    texts = corpus(200) + [BASE, KO, "The weather was sunny and warm all week in the valley."]
    assert [near.check_and_add(f"r{i}", t) for i, t in enumerate(texts)] == [None] * len(texts)
    report = near.report()
    assert report["kept"] == len(texts) and report["removed"] == 0 and report["clusters"] == 0


def test_korean_near_duplicates_are_found():
    edited = (KO.replace("인상한다고", "올린다고").replace("누적되어", "누적돼")
              .replace("다음 달", "다음달"))
    other = ("부산 해운대 해수욕장이 다음 달 1일 개장한다. 구청은 안전요원을 작년보다 늘리고 "
             "야간 개장 시간도 연장하기로 했으며, 피서객을 위한 무료 셔틀버스를 운행한다.")
    assert jaccard(KO, edited) >= 0.85
    near = NearDuplicates(threshold=0.8)
    assert near.check_and_add("ko", KO) is None
    assert near.check_and_add("ko-other", other) is None
    assert near.check_and_add("ko-edit", edited) == "ko"
    assert near.check_and_add("ko-punct", KO.replace(".", "!").replace(",", "")) == "ko"


def test_threshold_is_respected():
    rng = random.Random(11)
    base = words(rng, 60)
    a = " ".join(base)
    b = " ".join(base[:45] + words(rng, 15))
    assert 0.55 <= jaccard(a, b) <= 0.65
    strict = NearDuplicates(threshold=0.85)
    strict.check_and_add("a", a)
    assert strict.check_and_add("b", b) is None
    loose = NearDuplicates(threshold=0.5)
    loose.check_and_add("a", a)
    assert loose.check_and_add("b", b) == "a"


def test_matches_are_verified_and_none_means_no_kept_record_qualifies():
    """Every reported match has an estimated Jaccard >= threshold; every None has no kept record
    at or above it (brute force over all kept signatures)."""
    rng = random.Random(3)
    docs = corpus(60, seed=4)
    stream = []
    for i in range(300):
        doc = rng.choice(docs).split()
        for _ in range(rng.randint(0, 6)):
            doc[rng.randrange(len(doc))] = "zz" + str(rng.randrange(10 ** 4))
        stream.append((f"s{i}", " ".join(doc)))
    near = NearDuplicates(threshold=0.8)
    kept: dict[str, object] = {}
    found = 0
    for rid, text in stream:
        mh = near.minhash(text)
        match = near.check_and_add(rid, text)
        best = max((mh.jaccard(k) for k in kept.values()), default=0.0)
        if match is None:
            assert best < 0.8
            kept[rid] = mh
        else:
            found += 1
            assert mh.jaccard(kept[match]) >= 0.8 and mh.jaccard(kept[match]) == best
    assert 80 < found < 220, found   # the stream really mixes both outcomes


def test_short_texts_are_one_shingle():
    near = NearDuplicates(shingle=5)
    assert near.check_and_add("a", "ok") is None
    assert near.check_and_add("b", "OK!") == "a"
    assert near.check_and_add("c", "no") is None
    assert near.check_and_add("d", "") is None
    assert near.check_and_add("e", "  ...  ") == "d"     # empty after normalization
    assert near.check_and_add("f", "네") is None


def test_parameters_are_validated():
    for kwargs in ({"threshold": 0.0}, {"threshold": 1.5}, {"num_perm": 1}, {"shingle": 0}):
        with pytest.raises(ValueError):
            NearDuplicates(**kwargs)


# --- determinism and report -------------------------------------------------------

def run_stream(seed: int = 1) -> tuple[list, dict]:
    rng = random.Random(9)
    docs = corpus(40, seed=9)
    near = NearDuplicates(threshold=0.8, seed=seed)
    out = []
    for i in range(200):
        doc = rng.choice(docs).split()
        for _ in range(rng.randint(0, 8)):
            doc[rng.randrange(len(doc))] = rng.choice(docs).split()[0]
        out.append(near.check_and_add(f"r{i}", " ".join(doc)))
    return out, near.report()


def test_deterministic_for_seed_and_order():
    assert run_stream() == run_stream()
    assert NearDuplicates(seed=2).signature(BASE).tolist() != NearDuplicates(seed=1).signature(BASE).tolist()


def test_deterministic_across_hash_seeds():
    """LSH candidates come back as a set; results must not depend on PYTHONHASHSEED."""
    code = ("import json, sys; sys.path.insert(0, 'tests/steps/text'); sys.path.insert(0, '.');"
            "from test_dedup import run_stream; print(json.dumps(run_stream()))")
    outs = []
    for hash_seed in ("0", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                             text=True, check=True, timeout=120)
        outs.append(json.loads(res.stdout))
    assert outs[0] == outs[1] == json.loads(json.dumps(list(run_stream())))


def test_report_clusters_and_no_raw_text():
    canary = "CANARY-q7x9"
    near = NearDuplicates(threshold=0.8)
    docs = corpus(5, seed=21)
    ids = []
    for c, doc in enumerate(docs):
        for copy in range(c + 1):                            # cluster sizes 1, 2, 3, 4, 5
            rid = f"d{c}-{copy}"
            ids.append(rid)
            near.check_and_add(rid, f"{canary} {doc} {'x' * copy}")
    near.check_and_add("lonely", f"{canary} " + " ".join(corpus(1, seed=99)))
    report = near.report(top=2, max_ids=3)
    assert canary not in json.dumps(report)
    assert canary.encode() not in pickle.dumps(near)            # no text kept anywhere
    assert report["records"] == 16 and report["kept"] == 6 and report["removed"] == 10
    assert report["clusters"] == 4
    assert report["cluster_sizes"] == {"2": 1, "3": 1, "4": 1, "5": 1}
    assert report["largest"] == [{"size": 5, "ids": ["d4-0", "d4-1", "d4-2"]},
                                 {"size": 4, "ids": ["d3-0", "d3-1", "d3-2"]}]
    assert json.loads(json.dumps(report)) == report


# --- leakage ----------------------------------------------------------------------

def test_leakage_finds_eval_rows_copying_train_rows():
    train_docs = corpus(80, seed=31)
    train = [(f"t{i}", d) for i, d in enumerate(train_docs)]
    near_copy = train_docs[7].split()
    near_copy[10] = "changed"
    evaluation = [(f"e{i}", d) for i, d in enumerate(corpus(20, seed=32))]
    evaluation.insert(5, ("e-near", " ".join(near_copy)))
    evaluation.append(("e-exact", train_docs[3].upper() + "!"))
    evaluation.append(("e-ko", KO))
    pairs = leakage(iter(train), iter(evaluation), 0.8)
    assert pairs == [("e-near", "t7"), ("e-exact", "t3")]
    assert leakage(train, [("e", BASE)], 0.8) == []
    # duplicates inside train are all indexed: a match with a later train copy still counts
    longer = BASE + " Extra sentence here."
    assert leakage([("a", BASE), ("b", longer)], [("e", longer.upper())], threshold=0.99) == [("e", "b")]


# --- compact state ------------------------------------------------------------------

def test_sorted_runs_find_every_match_earliest_first_with_bounded_merges():
    rng = np.random.default_rng(3)
    runs = SortedRuns(np.uint64, max_run=64)
    added: list[tuple[int, int]] = []
    for batch in range(40):
        keys = rng.integers(0, 50, size=int(rng.integers(1, 12)), dtype=np.uint64)
        values = np.arange(len(added), len(added) + len(keys), dtype=np.uint32)
        runs.add(keys, values)
        added += list(zip(keys.tolist(), values.tolist()))
    assert len(runs) == len(added) and max(len(k) for k, _ in runs._runs) <= 64
    queries = np.array([7, 99, 7, 0, 49], dtype=np.uint64)
    positions, values = runs.find(queries)
    expected = [(p, v) for p, q in enumerate(queries.tolist()) for k, v in added if k == q]
    assert list(zip(positions.tolist(), values.tolist())) == expected  # every match, in the order added


def test_signatures_beyond_a_block_come_back_from_the_file_not_memory():
    near = NearDuplicates(num_perm=16)
    rng = np.random.default_rng(5)
    sigs = rng.integers(0, 2**32, size=(3 * 4096 + 17, 16), dtype=np.uint32)
    for i, sig in enumerate(sigs):
        near._store(f"r{i}", sig)
    assert near._sigs._on_disk == 3 * 4096 and near._sigs._tail.shape[0] == 4096  # 3 blocks went to the file
    for row in (0, 4095, 4096, 3 * 4096 - 1, 3 * 4096, len(sigs) - 1):
        assert np.array_equal(near._sigs[row], sigs[row]) and near._ids[row] == f"r{row}"
    near.close()


def test_many_kept_records_stay_small_in_memory_and_duplicates_are_still_found():
    near = NearDuplicates()
    docs = corpus(9000, seed=8)
    assert near.check_and_add_many([f"d{i}" for i in range(len(docs))], docs) == [None] * len(docs)
    copy = docs[123].split()
    copy[4] = "changed"
    assert near.check_and_add("copy", " ".join(copy)) == "d123"  # its signature is read back from the file
    per_record = (near._bands.nbytes + len(near._ids._bytes) + near._ids._ends.itemsize * len(near._ids)) / 9000
    assert per_record < 130, per_record  # 14 bands x 8 bytes + the id (the signatures are on disk)
    near.close()
