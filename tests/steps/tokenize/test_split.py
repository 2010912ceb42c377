"""steps/tokenize/split.py: the seeded split and the summary line of a split (leakage and the gates:
tests/steps/tokenize/test_tokenize.py, which runs the step)."""

from steps.config import TokenizeConfig
from steps.tokenize.split import in_eval


def test_split_is_seeded_and_stable():
    cfg = TokenizeConfig(eval_fraction=0.2, seed=7)
    ids = [f"r{i}" for i in range(2000)]
    first = [in_eval(i, cfg) for i in ids]
    assert first == [in_eval(i, cfg) for i in ids]
    assert 0.17 < sum(first) / len(ids) < 0.23
    assert first != [in_eval(i, TokenizeConfig(eval_fraction=0.2, seed=8)) for i in ids]


def test_split_summary_names_documents_and_blocks_for_text():
    from steps.tokenize.split import split_summary

    assert split_summary({"train_documents": 9, "eval_documents": 2, "train_records": 390, "eval_records": 54}) == \
        "9 train / 2 eval documents packed into 390 / 54 blocks"
    assert split_summary({"train_records": 10, "eval_records": 2, "truncated": 1}) == \
        "10 train / 2 eval records, 1 truncated"


def test_split_summary_counts_records_pinned_by_their_source():
    from steps.tokenize.split import split_summary

    assert split_summary({"train_records": 50, "eval_records": 14, "truncated": 0,
                          "pinned": {"train": 8, "eval": 12}}) == \
        "50 train / 14 eval records, 0 truncated (8 pinned to train, 12 pinned to eval)"


def test_a_pinned_record_ignores_the_hash():
    from steps.tokenize.split import pinned_counts, pinned_stats, split_records

    cfg = TokenizeConfig(eval_fraction=0.2, seed=7)
    records = [{"id": f"r{i}"} for i in range(100)] + [{"id": f"e{i}", "split": "eval"} for i in range(30)]
    sides = split_records(records, cfg)
    assert {f"e{i}" for i in range(30)} <= {r["id"] for r in sides["eval"]}
    assert [r["id"] for r in sides["train"]] == [f"r{i}" for i in range(100) if not in_eval(f"r{i}", cfg)]
    assert pinned_stats(pinned_counts(sides)) == {"pinned": {"train": 0, "eval": 30}}
    assert pinned_stats(pinned_counts(split_records(records[:100], cfg))) == {}
