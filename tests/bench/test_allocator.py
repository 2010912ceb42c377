"""The allocator benchmark stays runnable: a smoke of two steps per variant (numbers are not asserted)."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))


def test_allocator_benchmark_smoke_writes_both_variants(tmp_path):
    import allocator

    out = tmp_path / "allocator.json"
    result = allocator.main(["--steps", "2", "--rounds", "1", "--batch", "2", "--seq", "16", "--out", str(out)])
    (row,) = result["rounds"]
    assert row["plain"]["tuned"] is False and row["tuned"]["tuned"] is (sys.platform.startswith("linux"))
    assert row["cpu_ratio"] > 0 and json.loads(out.read_text()) == result
