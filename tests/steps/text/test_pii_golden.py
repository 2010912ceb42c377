"""Golden-set evaluation of steps.text.pii: per-entity precision and recall.

tests/data/pii_golden.jsonl holds one JSON object per line::

    {"id": "g0001", "lang": "en" | "ko", "text": "...",
     "spans": [{"entity": "EMAIL", "start": 10, "end": 30, "value": "john@example.com"}, ...]}

Spans were annotated where the values were inserted (a deterministic generator plus
hand-written lines), never by running the engine.  Lines without spans are negatives:
look-alikes such as Luhn-invalid cards, dates, amounts, versions, ISBNs, order numbers,
hashes, code and placeholders.  Annotation conventions follow steps/text/pii.py: for
URL_CREDENTIALS the span is ``user:password`` only; for ``key=value`` secrets it is the
value only; a PEM block is one span from BEGIN to END.

Scoring is **span-exact**: a prediction is a true positive only when entity, start and
end all equal a gold span; anything else counts as a false positive (and the gold span it
missed as a false negative), so a span that is one character off costs both precision and
recall.  Overlap-based scores (any overlap with a gold span of the same entity) are printed
alongside for information.  Run with ``pytest -s`` to see the table; nothing is written.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from steps.text.pii import ENTITIES, PiiEngine

GOLDEN = Path(__file__).resolve().parents[2] / "data" / "pii_golden.jsonl"
MIN_RECALL = 0.99
MIN_PRECISION = 0.98


def load() -> list[dict]:
    return [json.loads(line) for line in GOLDEN.read_text(encoding="utf-8").splitlines() if line.strip()]


ROWS = load()


def evaluate(engine: PiiEngine) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Per entity: gold, predicted, exact tp / precision / recall, overlap precision / recall;
    plus a description of every error."""
    tp, fp, fn, gold_n, pred_n = Counter(), Counter(), Counter(), Counter(), Counter()
    ov_pred, ov_gold = Counter(), Counter()  # predictions / gold spans with any same-entity overlap
    errors: list[str] = []
    for row in ROWS:
        text = row["text"]
        gold = {(s["entity"], s["start"], s["end"]) for s in row["spans"]}
        pred = {(m.entity, m.start, m.end) for m in engine.find(text)}
        for e, *_ in gold:
            gold_n[e] += 1
        for e, *_ in pred:
            pred_n[e] += 1
        for e, s, t in gold & pred:
            tp[e] += 1
        for e, s, t in pred - gold:
            fp[e] += 1
            errors.append(f"FP {row['id']} {e} {text[s:t]!r} in {text[:80]!r}")
        for e, s, t in gold - pred:
            fn[e] += 1
            errors.append(f"FN {row['id']} {e} {text[s:t]!r} in {text[:80]!r}")

        def overlaps(a, b):
            return a[0] == b[0] and a[1] < b[2] and b[1] < a[2]

        ov_pred.update(p[0] for p in pred if any(overlaps(p, g) for g in gold))
        ov_gold.update(g[0] for g in gold if any(overlaps(g, p) for p in pred))
    table = {}
    for e in ENTITIES:
        table[e] = {
            "gold": gold_n[e], "pred": pred_n[e], "tp": tp[e], "fp": fp[e], "fn": fn[e],
            "precision": tp[e] / pred_n[e] if pred_n[e] else 1.0,
            "recall": tp[e] / gold_n[e] if gold_n[e] else 1.0,
            "overlap_precision": ov_pred[e] / pred_n[e] if pred_n[e] else 1.0,
            "overlap_recall": ov_gold[e] / gold_n[e] if gold_n[e] else 1.0,
        }
    return table, errors


def render(table: dict[str, dict[str, float]]) -> str:
    lines = [f"{'entity':<16}{'gold':>6}{'pred':>6}{'tp':>6}{'fp':>5}{'fn':>5}"
             f"{'precision':>11}{'recall':>8}{'ov.prec':>9}{'ov.rec':>8}"]
    for e, r in table.items():
        lines.append(f"{e:<16}{r['gold']:>6}{r['pred']:>6}{r['tp']:>6}{r['fp']:>5}{r['fn']:>5}"
                     f"{r['precision']:>11.4f}{r['recall']:>8.4f}{r['overlap_precision']:>9.4f}"
                     f"{r['overlap_recall']:>8.4f}")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def scores():
    return evaluate(PiiEngine())


def test_golden_file_is_well_formed():
    assert len(ROWS) >= 400
    assert len({r["id"] for r in ROWS}) == len(ROWS) and len({r["text"] for r in ROWS}) == len(ROWS)
    assert {r["lang"] for r in ROWS} == {"en", "ko"}
    assert sum(r["lang"] == "ko" for r in ROWS) >= 150
    for row in ROWS:
        spans = sorted(row["spans"], key=lambda s: s["start"])
        for s in spans:
            assert s["entity"] in ENTITIES, row["id"]
            assert row["text"][s["start"]:s["end"]] == s["value"], row["id"]
        assert all(a["end"] <= b["start"] for a, b in zip(spans, spans[1:])), row["id"]


def test_golden_set_covers_every_entity_and_many_negatives():
    per_entity = Counter(s["entity"] for r in ROWS for s in r["spans"])
    assert all(per_entity[e] >= 40 for e in ENTITIES), per_entity
    assert sum(not r["spans"] for r in ROWS) >= 250  # look-alike negatives


def test_precision_and_recall_per_entity(scores):
    table, errors = scores
    report = render(table) + "\n" + "\n".join(errors)
    print("\nPII golden set, span-exact (ov. = any same-entity overlap):\n" + report)
    low_recall = {e: r["recall"] for e, r in table.items() if r["recall"] < MIN_RECALL}
    low_precision = {e: r["precision"] for e, r in table.items() if r["precision"] < MIN_PRECISION}
    assert not low_recall and not low_precision, report


def test_redaction_leaves_no_detected_value_and_mask_keeps_length():
    placeholder, mask = PiiEngine(), PiiEngine(default_action="mask")
    for row in ROWS:
        out, counts = placeholder.redact(row["text"])
        found = [row["text"][m.start:m.end] for m in placeholder.find(row["text"])]
        assert sum(counts.values()) == len(found)
        assert all(v not in out for v in found if len(v) >= 6), row["id"]
        assert len(mask.redact(row["text"])[0]) == len(row["text"]), row["id"]


def test_hash_action_is_stable_over_the_golden_set():
    salt = b"golden-set-salt-0123456789"
    a, b = PiiEngine(default_action="hash", salt=salt), PiiEngine(default_action="hash", salt=salt)
    outputs = [a.redact(r["text"])[0] for r in ROWS]
    assert outputs == [b.redact(r["text"])[0] for r in ROWS]
    assert not any(salt.decode() in out for out in outputs)
