"""Worker processes of the data steps (steps/core/workers.py): same bytes out with or without them,
errors that cross the process boundary keep their type and message, a dead worker is an error,
and tokenize's leakage check is skipped only where scrub's near dedup already rules leakage out."""

import json
import random
import uuid

import pytest

from helpers import chat, write_jsonl
from steps.config import IngestConfig, ScrubConfig, TokenizeConfig, ValidateConfig
from steps.core.contract import RECORDS_FILE
from steps.core.errors import ConfigError
from steps.core.store import ArtifactStore
from steps.core.workers import ENV, ChunkWorkers, worker_count
from steps.ingest import ingest_records
from steps.scrub.step import scrub_records
from steps.text.dedup import leakage, record_text
from steps.tokenize.split import in_eval
from steps.tokenize.step import tokenize_dataset
from steps.validate import validate_records

WORDS = ("order shipped friday tracking page budget release model documents answer delivery address payment "
         "account team monday review plan service explain").split()


def varied_rows(n: int, seed: int = 3) -> list[dict]:
    """Chats with PII, Korean, exact repeats and near copies (one word changed)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        user = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30)))
        if i % 7 == 0:
            user += f" mail me at user{i}@example.com or call 010-{1000 + i}-5678"
        if i % 5 == 0:
            user += " 배송 확인 부탁드립니다"
        rows.append(chat(user, " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))), id=f"r{i}"))
    for i in range(0, n, 9):  # near copies and exact repeats of earlier rows
        near = json.loads(json.dumps(rows[i]))
        near["id"] = f"near{i}"
        near["messages"][1]["content"] += " thanks"
        rows.append(near)
        rows.append(dict(rows[i], id=f"copy{i}"))
    return rows


def run_data_steps(tmp_path, model, rows, workers, monkeypatch, tokenize_cfg):
    monkeypatch.setenv(ENV, workers)
    store = ArtifactStore.from_env(prefix=f"test-{uuid.uuid4().hex[:10]}")
    raw = ingest_records(IngestConfig(source=str(write_jsonl(tmp_path / f"raw-{workers}.jsonl", rows))), store)
    clean = scrub_records(ScrubConfig(), validate_records(ValidateConfig(), raw, store), store)
    tokens = tokenize_dataset(tokenize_cfg, clean, model, store)

    def files(ref):
        return {name: meta["sha256"] for name, meta in store.manifest(ref.key)["files"].items()}

    return files(clean), clean.stats, files(tokens), tokens.stats


@pytest.mark.parametrize("leakage_threshold", [0.85, 0.8])  # ruled out by scrub / checked here on signatures
def test_two_workers_write_the_same_bytes_as_none(services, tiny_model, tmp_path, monkeypatch, leakage_threshold):
    # Records without ids (named by their line numbers, which the workers get with the raw lines) and
    # one invalid record that validate quarantines (scrub's workers skip its line).
    unnamed = [{"messages": chat(f"question {n} about the {WORDS[n]}", "an answer")["messages"]} for n in range(3)]
    rows = varied_rows(300) + unnamed + [chat("", "an empty question", id="bad")]
    cfg = TokenizeConfig(max_seq_len=64, eval_fraction=0.3, leakage_threshold=leakage_threshold, max_truncated_share=1.0)
    here = run_data_steps(tmp_path, tiny_model, rows, "0", monkeypatch, cfg)
    workers = run_data_steps(tmp_path, tiny_model, rows, "2", monkeypatch, cfg)
    assert workers == here
    scrub_stats, token_stats = here[1], here[3]
    assert scrub_stats["records_in"] == len(rows) - 1
    assert scrub_stats["pii"]["EMAIL"] > 0 and scrub_stats["near_duplicates_removed"] > 0
    assert scrub_stats["duplicates_removed"] > scrub_stats["near_duplicates_removed"]
    assert token_stats["leakage_checked_by"] == ("scrub" if leakage_threshold == 0.85 else "tokenize")


def test_scrub_near_dedup_leaves_no_leakage_for_tokenize_to_find(store, tmp_path):
    """The reason tokenize may skip its check: on scrub's output, the check finds nothing,
    while on the same records before scrub it finds the near copies across the split."""
    cfg = TokenizeConfig(eval_fraction=0.3)
    rows = varied_rows(400, seed=11)
    for i in range(0, 400, 3):  # more near copies, landing on both sides of the split
        near = json.loads(json.dumps(rows[i]))
        near["id"] = f"n2-{i}"
        near["messages"][0]["content"] = near["messages"][0]["content"].replace(" ", "  ", 1) + " ok"
        rows.append(near)

    def leaked(records):
        train = [(r["id"], record_text(r)) for r in records if not in_eval(r["id"], cfg)]
        evals = [(r["id"], record_text(r)) for r in records if in_eval(r["id"], cfg)]
        return leakage(train, evals, threshold=cfg.leakage_threshold)

    assert len(leaked(rows)) >= 10
    raw = ingest_records(IngestConfig(source=str(write_jsonl(tmp_path / "raw.jsonl", rows))), store)
    clean = scrub_records(ScrubConfig(), validate_records(ValidateConfig(), raw, store), store)
    assert leaked(store.read_jsonl(clean, RECORDS_FILE)) == []


def test_tokenize_checks_leakage_itself_when_scrub_did_not_cover_it(store, tmp_path, tiny_model):
    rows = [chat(f"question {i} about the moon and the sun", f"answer {i}", id=f"r{i}") for i in range(40)]
    raw = ingest_records(IngestConfig(source=str(write_jsonl(tmp_path / "raw.jsonl", rows))), store)
    validated = validate_records(ValidateConfig(), raw, store)
    cfg = TokenizeConfig(max_seq_len=64, eval_fraction=0.3)
    for scrub, checked_by in [(ScrubConfig(), "scrub"), (ScrubConfig(near_dedup=False), "tokenize"),
                              (ScrubConfig(near_threshold=0.9), "tokenize"),
                              (ScrubConfig(minhash_permutations=64), "tokenize")]:
        tokens = tokenize_dataset(cfg, scrub_records(scrub, validated, store), tiny_model, store)
        assert tokens.stats["leakage_checked_by"] == checked_by, scrub
    off = tokenize_dataset(cfg.model_copy(update={"leakage_threshold": None}),
                           scrub_records(ScrubConfig(), validated, store), tiny_model, store)
    assert off.stats["leakage_checked_by"] is None


def test_worker_count_from_the_environment(monkeypatch):
    monkeypatch.setenv(ENV, "3")
    assert worker_count(10) == 3
    monkeypatch.setenv(ENV, "0")
    assert worker_count(10**7) == 0
    monkeypatch.setenv(ENV, "auto")
    assert worker_count(100) == 0  # small inputs stay in the step's process
    monkeypatch.setenv(ENV, "many")
    with pytest.raises(ConfigError, match="TUNELINE_DATA_WORKERS='many'"):
        worker_count(10)


def test_a_worker_error_keeps_its_type_and_message(monkeypatch):
    monkeypatch.delenv("TUNELINE_PII_SALT", raising=False)
    config = {"scrub": ScrubConfig(pii_action="hash").model_dump(mode="json"), "kind": "chat"}
    line = b"1\t" + json.dumps({"id": "a", "messages": chat("hi", "there")["messages"]}).encode()
    with pytest.raises(ConfigError, match="TUNELINE_PII_SALT"):
        with ChunkWorkers("scrub", config, 1) as pool:
            list(pool.map([line]))


def test_workers_import_the_project_whatever_the_working_directory(tmp_path, monkeypatch):
    """A folder named ``steps`` in the working directory (a user's own project) does not shadow ours."""
    decoy = tmp_path / "steps"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise SystemExit(3)\n")
    monkeypatch.chdir(tmp_path)
    config = {"scrub": ScrubConfig(near_dedup=False).model_dump(mode="json"), "kind": "chat"}
    line = b"1\t" + json.dumps({"id": "a", "messages": chat("hi", "there")["messages"]}).encode()
    with ChunkWorkers("scrub", config, 1) as pool:
        assert len(list(pool.map([line]))) == 1


def test_a_dead_worker_is_an_error_naming_its_exit_code():
    config = {"scrub": ScrubConfig().model_dump(mode="json"), "kind": "chat"}
    with pytest.raises(RuntimeError, match="exited with code -9"):
        with ChunkWorkers("scrub", config, 1) as pool:
            pool.workers[0].proc.kill()
            list(pool.map([b'1\t{"id": "a", "messages": []}']))


def test_chunks_are_shared_evenly_between_workers():
    """Chunk sizes depend on the input size only (so outputs cannot depend on the worker count)
    and come in multiples of 12 chunks: an even share for 1, 2, 3, 4 or 6 workers."""
    from steps.core.workers import SHARES, balanced_chunk

    assert balanced_chunk(92_837, 10_000) == 7_737          # 12 chunks
    assert balanced_chunk(1_000_000, 10_000) == 9_260       # 108 chunks
    assert balanced_chunk(0, 10_000) == 10_000              # size unknown
    assert balanced_chunk(300, 10_000) == 1_000             # small inputs: chunks of 1,000 or more
    for records in (20_000, 20_001, 92_837, 1_000_003):
        size = balanced_chunk(records, 10_000)
        chunks = -(-records // size)
        assert size <= 10_000 and chunks == SHARES * -(-records // (10_000 * SHARES))


def test_answers_carry_lines_outside_the_json_head():
    """pack/unpack: lists of JSON lines travel as one newline-joined block (not escaped inside the
    head), None as an empty line, next to the head and the signature arrays."""
    import numpy as np

    from steps.core.workers import pack, unpack

    sigs = np.arange(12, dtype=np.uint32).reshape(3, 4)
    lines = {"train": ['{"a": "x\\ny"}', '{"b": "\u2028 안녕"}'], "eval": [None, '{"c": 1}', None], "none": []}
    head, got = unpack(pack({"n": 3}, [sigs], lines), 4)
    assert head == {"n": 3, **lines}
    assert np.array_equal(got, sigs)
    head, got = unpack(pack({"n": 0}, [], {"only": [None]}), 4)
    assert head == {"n": 0, "only": [None]} and got.shape == (0, 4)
    assert unpack(pack({}, []), 1)[0] == {}
