"""Dedup throughput: stream N synthetic records through ``fingerprint`` + ``NearDuplicates``.

    python bench/data_dedup.py --n 10000
    python bench/data_dedup.py --n 1000000 --max-seconds 110   # stops early, reports what it did

Records are ~300 characters of pseudo-words (a share of them Korean syllables); about
``--dup-rate`` of them copy one of the last 1,000 originals with 1-3 words replaced,
one word added, or case and punctuation changed. Prints one JSON object: records,
records_per_s (fingerprint + check_and_add only, generation excluded), exact and near
duplicates found, clusters, peak_rss_mib (``resource.getrusage``, the whole process),
rss_growth_mib (peak minus the RSS before the first record) and mib_per_10k_records.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from collections import deque
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from steps.text.dedup import NearDuplicates, fingerprint  # noqa: E402


def rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def records(n: int, dup_rate: float, seed: int = 0, chars: int = 300) -> Iterator[tuple[str, str]]:
    rng = random.Random(seed)
    latin = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(20000)]
    hangul = ["".join(chr(0xAC00 + rng.randrange(11172)) for _ in range(rng.randint(1, 4)))
              for _ in range(20000)]
    recent: deque[list[str]] = deque(maxlen=1000)
    for i in range(n):
        if recent and rng.random() < dup_rate:
            words = list(rng.choice(recent))
            edit = rng.random()
            if edit < 0.6:
                for _ in range(rng.randint(1, 3)):
                    words[rng.randrange(len(words))] = rng.choice(latin)
            elif edit < 0.8:
                words.insert(rng.randrange(len(words)), rng.choice(latin))
            else:
                words = [w.upper() if rng.random() < 0.3 else w + ("," if rng.random() < 0.1 else "")
                         for w in words]
        else:
            vocab = hangul if rng.random() < 0.2 else latin
            words, size = [], 0
            while size < chars:
                words.append(rng.choice(vocab))
                size += len(words[-1]) + 1
            recent.append(words)
        yield f"r{i}", " ".join(words)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--dup-rate", type=float, default=0.2)
    ap.add_argument("--threshold", type=float, default=0.85)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop streaming after this much dedup time")
    args = ap.parse_args()

    near = NearDuplicates(args.threshold, num_perm=args.num_perm)
    seen: set[str] = set()
    exact = chars = done = 0
    rss_before = rss_mib()
    busy = 0.0
    for rid, text in records(args.n, args.dup_rate):
        t0 = time.perf_counter()
        key = fingerprint(text)
        if key in seen:
            exact += 1
        else:
            seen.add(key)
            near.check_and_add(rid, text)
        busy += time.perf_counter() - t0
        chars += len(text)
        done += 1
        if args.max_seconds is not None and busy > args.max_seconds:
            break
    report = near.report(top=3, max_ids=5)
    peak = rss_mib()
    print(json.dumps({
        "records": done,
        "requested": args.n,
        "mean_chars": round(chars / max(done, 1), 1),
        "seconds": round(busy, 2),
        "records_per_s": round(done / busy, 1),
        "exact_duplicates": exact,
        "near_duplicates": report["removed"],
        "clusters": report["clusters"],
        "kept": report["kept"],
        "lsh": [report["lsh_bands"], report["lsh_rows"]],
        "peak_rss_mib": round(peak, 1),
        "rss_growth_mib": round(peak - rss_before, 1),
        "mib_per_10k_records": round((peak - rss_before) / done * 10000, 2),
    }))


if __name__ == "__main__":
    main()
