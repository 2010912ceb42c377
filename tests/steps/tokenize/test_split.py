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
