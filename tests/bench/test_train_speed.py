"""The speed benchmark stays runnable: a CPU smoke on the tiny shape (numbers are not asserted)."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))


def test_benchmark_smoke_writes_comparable_rows(tmp_path):
    import train_speed

    rows = train_speed.main(["--shape", "tiny", "--steps", "2", "--warmup", "1", "--batch-size", "4",
                             "--budget", "512", "--chunk", "128", "--median", "40", "--out", str(tmp_path),
                             "--only", "baseline_lora", "ours_lora_packed_chunked",
                             "ours_lora_packed_chunked_baseline_tokens"])
    assert [r["name"] for r in rows] == ["baseline_lora", "ours_lora_packed_chunked",
                                         "ours_lora_packed_chunked_baseline_tokens"]
    assert all("error" not in r and r["tokens_per_s"] > 0 for r in rows), rows
    assert rows[0]["speedup_vs_baseline"] == 1.0 and "speedup_vs_baseline" in rows[1]
    # the same-tokens variant uses the baseline's real tokens per step as its budget (within one pack's slack)
    assert rows[2]["tokens_per_step"] <= rows[0]["tokens_per_step"] + 1
    (report,) = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert report["device"] and report["versions"]["torch"] and report["rows"] == rows
