"""Scrubber memory and throughput: ``tuneline scrub`` (steps/scrub/file.py) on N records.

    python bench/data_scrub.py --n 10000 1000000

For each N: writes N synthetic chat-like records (~200 characters, a third with an email
or phone number) to a temporary JSONL file, scrubs it in a fresh process, and prints one
JSON line with records, seconds, records_per_s and the scrubbing process's peak RSS
(``VmHWM`` of that process): flat memory means the peak stays the same
while N grows 100x. Rows are appended to ``bench/results/<date>-data-scrub.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORDS = "the model answers questions about invoices orders weather travel music and 오늘 날씨 주문 배송".split()


def write_records(path: Path, n: int) -> None:
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            text = " ".join(rng.choices(WORDS, k=30))
            if i % 3 == 0:
                text += f" mail me at user{i}@example.com"
            elif i % 3 == 1:
                text += f" call 010-{1000 + i % 9000}-{2000 + i % 7000}"
            f.write(json.dumps({"id": i, "text": text, "meta": {"n": i}}, ensure_ascii=False) + "\n")


def run(n: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-scrub-") as tmp:
        source, target = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
        write_records(source, n)
        code = ("import sys; from flows.cli import main; "
                f"rc = main(['scrub', '--input', {str(source)!r}, '--output', {str(target)!r}, '--field', 'text']); "
                "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM'))); sys.exit(rc)")
        started = time.time()
        done = subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, capture_output=True, text=True)
        seconds = time.time() - started
        peak = int(done.stdout.strip().splitlines()[-1]) / 1024  # VmHWM: the scrub process's own peak, in KiB
        return {"records": n, "input_mib": round(source.stat().st_size / 2**20, 1), "seconds": round(seconds, 1),
                "records_per_s": round(n / seconds), "peak_rss_mib": round(peak, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10_000, 1_000_000])
    args = parser.parse_args()
    rows = []
    for n in sorted(args.n):
        rows.append(run(n))
        print(json.dumps(rows[-1]), flush=True)
    out = REPO / "bench" / "results" / f"{datetime.date.today().isoformat()}-data-scrub.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.node(), "python": platform.python_version(), "rows": rows},
                              indent=1) + "\n")


if __name__ == "__main__":
    main()
