"""The speed benchmark stays runnable: a CPU smoke on the tiny shape (numbers are not asserted), our variants
with the CUDA dtype (``--precision bf16``: bf16 weights, fp32 master weights for full fine-tuning). Not in
the smoke: the compile variant (~45 CPU-s of inductor; tests/steps/train/test_fastpath.py compiles once),
flex_attention (no backward on the CPU) and liger (CUDA only)."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))


def test_benchmark_smoke_writes_comparable_rows(tmp_path):
    import train_speed

    rows = train_speed.main(["--shape", "tiny", "--steps", "2", "--warmup", "1", "--batch-size", "4",
                             "--budget", "512", "--chunk", "128", "--median", "40", "--out", str(tmp_path),
                             "--precision", "bf16", "--only", "baseline_lora", "ours_lora_packed_chunked",
                             "ours_lora_packed_chunked_baseline_tokens", "ours_full_packed_chunked"])
    assert [r["name"] for r in rows] == ["baseline_lora", "ours_lora_packed_chunked",
                                         "ours_lora_packed_chunked_baseline_tokens", "ours_full_packed_chunked"]
    assert all("error" not in r and r["tokens_per_s"] > 0 for r in rows), rows
    assert rows[0]["speedup_vs_baseline"] == 1.0 and "speedup_vs_baseline" in rows[1]
    # the same-tokens variant uses the baseline's real tokens per step as its budget (within one pack's slack)
    assert rows[2]["tokens_per_step"] <= rows[0]["tokens_per_step"] + 1
    (report,) = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert report["device"] and report["versions"]["torch"] and report["rows"] == rows
    assert report["settings"]["precision"] == "bf16"
