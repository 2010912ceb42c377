"""The data-path benchmark stays runnable: 300 records through validate, scrub and tokenize on
the test store, the PII and MinHash comparisons on small samples (numbers are not asserted)."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))


def test_benchmark_smoke_produces_a_row_per_stage(store, tmp_path):
    import data_speed

    rows = data_speed.measure(300, presidio_sample=20, minhash_sample=200, store=store, path_workers=("0", "2"))
    stages = {row["stage"]: row for row in rows}  # the later (2-worker) path run's rows win
    path = [row for row in rows if row["stage"] == "data path total"]
    assert [row["workers"] for row in path] == ["0 (0 processes)", "2 (2 processes)"]
    assert stages["data path: workers vs none"]["speedup"] > 0
    assert stages["input"]["records"] == 300
    for stage in ("validate", "scrub (normalize + PII + exact/near dedup)",
                  "tokenize (chat template + leakage check)", "data path total"):
        assert stages[stage]["seconds"] > 0 and stages[stage]["records"] > 0, stage
    scrub = stages["scrub (normalize + PII + exact/near dedup)"]
    assert 0 < scrub["records_out"] < 300 and scrub["pii"] > 0   # the synthetic data has repeats and PII
    ours = stages["golden: ours"]
    assert ours["gold_spans"] > 0 and 0 <= ours["recall_exact"] <= 1
    assert stages["pii: ours (PiiEngine, Presidio's six entity types, find + replace)"]["found"] > 0
    presidio = [row for row in rows if row["stage"].startswith("pii: presidio")]
    assert len(presidio) == 1 and ("skipped" in presidio[0] or presidio[0]["records"] == 20)
    minhash = [row for row in rows if row["stage"].startswith("minhash")]
    assert [row["records"] for row in minhash] == [200, 200]
    assert all(row["records_per_s"] > 0 for row in minhash)
    out = data_speed.save("-smoke", {"rows": rows}, tmp_path)
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))
