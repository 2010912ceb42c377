"""Data-path speed: validate + scrub (PII, dedup) + tokenize on synthetic chat records.

    python bench/data_speed.py                      # 100k records: stages, PII vs Presidio, golden recall
    python bench/data_speed.py --n 500 --presidio-sample 50 --minhash-sample 200   # smoke size
    python bench/data_speed.py --rss 10000 1000000  # peak RSS of the whole data path per N

What one run measures, all on the same records and in the same process:

- ``path``: the pipeline's own steps (``validate_records``, ``scrub_records``,
  ``tokenize_dataset`` with the SmolLM2 tokenizer of the ``tiny-random-llama`` base model)
  through a real S3 store: SeaweedFS started on free ports for the run, or the store of
  ``TUNELINE_BUCKET`` when set. Seconds, records/s and MB/s (input JSONL bytes) per step.
- ``pii``: our engine (``normalize_text`` + ``PiiEngine.redact`` on every message) over all
  records, and Presidio's pattern recognizers (email, phone, card, SSN, IP, Korean RRN;
  ``spacy.blank("en")``, so no NER model) on the first ``--presidio-sample`` records only:
  Presidio is too slow to run on all of them, so its time for all records is *scaled* from
  the sample, and the output says so. Throughput ratio.
- ``golden``: recall of both engines on ``tests/data/pii_golden.jsonl`` over the entities
  Presidio covers (span-exact and any-overlap), and look-alikes damaged: negative lines
  (no gold span) on which an engine reports something.
- ``minhash``: datasketch (``MinHash.update_batch`` + ``MinHashLSH``, the usual recipe)
  against ours (``steps.text.dedup.NearDuplicates``) on the first ``--minhash-sample`` records'
  text, same threshold and permutations.

``--rss N ...`` runs only the ``path`` part, once per N, each in a fresh process, and
reports that process's peak RSS (``VmHWM``): flat memory means the peak stays about the
same while N grows 100x. Results go to ``bench/results/<date>-data-speed.json``.

Presidio is optional (``pip install -e .[bench]``); without it the ``pii`` and
``golden`` rows say so and everything else runs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

GOLDEN = REPO / "tests" / "data" / "pii_golden.jsonl"
# Presidio entity -> ours, for the entities both engines cover.
PRESIDIO_ENTITIES = {"EMAIL_ADDRESS": "EMAIL", "PHONE_NUMBER": "PHONE", "CREDIT_CARD": "CREDIT_CARD",
                     "US_SSN": "US_SSN", "IP_ADDRESS": "IP_ADDRESS", "KR_RRN": "KR_RRN"}

# --- synthetic chat records ----------------------------------------------------------

_EN = ("the order shipped yesterday and should arrive before friday please check the tracking page "
       "thanks for the quick answer could you explain how the model handles long documents in detail "
       "our team meets every monday to review the budget and plan the next release of the service "
       "i would like to change my delivery address and update the payment method on my account").split()
_KO = ("오늘 날씨 주문 배송 확인 부탁드립니다 감사합니다 내일 회의 일정 변경 가능 할까요 결제 방법 "
       "계정 정보 수정 고객센터 답변 기다리겠습니다 모델 학습 데이터 정리 했어요").split()


def _pii(rng: random.Random, i: int) -> str:
    """One PII value in a phrase (what a chat user types), varied by i."""
    kind = rng.randrange(8)
    if kind == 0:
        return f"my email is user{i}.name@example{i % 97}.com"
    if kind == 1:
        return f"call me at 010-{1000 + i % 9000}-{1000 + (i * 7) % 9000}"
    if kind == 2:
        return f"연락처는 010{1000 + i % 9000}{1000 + (i * 3) % 9000}입니다"
    if kind == 3:
        return f"phone ({200 + i % 700}) 555-{1000 + i % 9000}"
    if kind == 4:
        return "card 4111 1111 1111 1111 expires 09/27"
    if kind == 5:
        return f"the server is at 10.{i % 256}.{(i // 256) % 256}.7"
    if kind == 6:
        return f"ssn {100 + i % 600:03d}-{10 + i % 89:02d}-{1000 + i % 9000:04d}"
    return "주민번호 900101-1234568"


def _look_alike(rng: random.Random, i: int) -> str:
    """Text that resembles PII but is not: dates, versions, amounts, order numbers."""
    return rng.choice([f"order #{100000 + i} from 2024-05-{1 + i % 28:02d}", f"version 1.{i % 20}.3.4",
                       f"total $1,{i % 1000:03d}.50 at 12:30:45", f"ISBN 978-3-16-148410-{i % 10}"])


def _sentence(rng: random.Random, words: list[str], n: int) -> str:
    return " ".join(rng.choices(words, k=n))


def synthetic_chats(n: int, seed: int = 0) -> Iterator[dict[str, Any]]:
    """n chat records of ~500 bytes of JSON: 2 or 4 messages, a fifth Korean; ~12% carry a PII
    value, ~5% a look-alike; ~4% repeat an earlier record exactly and ~3% with a small edit."""
    rng = random.Random(seed)
    recent: list[list[dict[str, str]]] = []
    for i in range(n):
        r = rng.random()
        if recent and r < 0.04:
            messages = rng.choice(recent)
        elif recent and r < 0.07:
            messages = [dict(m) for m in rng.choice(recent)]
            messages[-1]["content"] += " " + rng.choice(_EN)
        else:
            words = _KO if rng.random() < 0.2 else _EN
            turns = 2 if rng.random() < 0.7 else 4
            messages = [{"role": ("user", "assistant")[t % 2],
                         "content": _sentence(rng, words, rng.randint(24, 40) if turns == 2 else rng.randint(12, 20))}
                        for t in range(turns)]
            if rng.random() < 0.12:
                messages[0]["content"] += " " + _pii(rng, i)
            elif rng.random() < 0.05:
                messages[1]["content"] += " " + _look_alike(rng, i)
            if len(recent) < 2000:
                recent.append(messages)
            else:
                recent[rng.randrange(2000)] = messages
        yield {"id": f"r{i}", "messages": messages}


def write_jsonl(path: Path, n: int, seed: int = 0) -> int:
    """Write n records; returns the file size in bytes."""
    with path.open("w", encoding="utf-8") as f:
        for record in synthetic_chats(n, seed):
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path.stat().st_size


# --- store: SeaweedFS on free ports, or the one in the environment --------------------

@contextmanager
def s3_store() -> Iterator[Any]:
    from steps.core.store import ArtifactStore

    if os.environ.get("TUNELINE_BUCKET"):
        yield ArtifactStore.from_env(prefix=f"bench-{uuid.uuid4().hex[:8]}")
        return
    from services import stack as services
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import free_weed_base  # the test suite's port picker

    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
        cfg = services.ServiceConfig(state_dir=Path(tmp), s3_port=free_weed_base(20000), bucket="bench")
        spec = services._specs(cfg, prefect=False)["s3"]  # S3 only: no MLflow for a data bench
        (Path(tmp) / "logs").mkdir()
        services._spawn(cfg, spec)
        try:
            services._wait_healthy(cfg, spec)
            services._ensure_bucket(cfg)
            os.environ.update(services.client_env(cfg))
            yield ArtifactStore.from_env(prefix=f"bench-{uuid.uuid4().hex[:8]}")
        finally:
            services.down(cfg)


# --- the data path ---------------------------------------------------------------------

class _WorkerRss:
    """The largest RSS any worker process (``python -m steps.core.workers``) of this one reached,
    sampled every 0.1 s (ru_maxrss of children would count the forked parent's pages)."""

    def __init__(self) -> None:
        import threading

        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(0.1):
            for child in me.children(recursive=True):
                try:
                    if "steps.core.workers" in child.cmdline():
                        self.peak_mib = max(self.peak_mib, child.memory_info().rss / 2**20)
                except psutil.Error:
                    pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def _row(stage: str, records: int, seconds: float, nbytes: int, **extra: Any) -> dict[str, Any]:
    return {"stage": stage, "records": records, "seconds": round(seconds, 2),
            "records_per_s": round(records / seconds) if seconds else None,
            "mb_per_s": round(nbytes / 1e6 / seconds, 2) if seconds else None, **extra}


def run_path(store: Any, raw: Path, n: int, workers: str = "auto") -> list[dict[str, Any]]:
    """Upload raw JSONL as an ingest artifact, then time validate, scrub and tokenize with
    ``TUNELINE_DATA_WORKERS=workers``, under a fresh prefix (nothing comes from the cache).
    Every row says the setting and the number of workers it meant (``workers``)."""
    from steps.base_model import prepare_base_model
    from steps.config import BaseModelConfig, ScrubConfig, TokenizeConfig, ValidateConfig
    from steps.core.contract import RAW_FILE
    from steps.core.store import ArtifactStore, DatasetRef
    from steps.core.workers import ENV, worker_count
    from steps.scrub.step import scrub_records
    from steps.tokenize.step import tokenize_dataset
    from steps.validate import validate_records

    saved = os.environ.get(ENV)
    os.environ[ENV] = workers
    store = ArtifactStore(store.client, store.bucket, f"{store.prefix}-w{workers}-{uuid.uuid4().hex[:6]}")
    setting = {"workers": f"{workers} ({worker_count(n)} processes)"}
    watch = _WorkerRss()
    try:
        model = prepare_base_model(BaseModelConfig(source="tiny-random-llama"), store)
        store.download(model.base)
        writer = store.writer("ingest", uuid.uuid4().hex, {"source": str(raw)})
        writer.put_file(RAW_FILE, raw)
        ingested = DatasetRef(**writer.commit(stats={"source": str(raw), "lines": n}).model_dump())
        nbytes = raw.stat().st_size
        t = time.perf_counter()
        import great_expectations  # noqa: F401  (a cold import costs seconds, once per process)

        rows = [{"stage": "validate: Great Expectations import, once per process (not in the total)",
                 "seconds": round(time.perf_counter() - t, 2)}]
        t = time.perf_counter()
        validated = validate_records(ValidateConfig(), ingested, store)
        rows.append(_row("validate", n, time.perf_counter() - t, nbytes, **setting))
        t = time.perf_counter()
        scrubbed = scrub_records(ScrubConfig(), validated, store)
        rows.append(_row("scrub (normalize + PII + exact/near dedup)", n, time.perf_counter() - t, nbytes,
                         records_out=scrubbed.stats["records_out"],
                         near_duplicates=scrubbed.stats["near_duplicates_removed"],
                         pii=sum(scrubbed.stats["pii"].values()), **setting))
        t = time.perf_counter()
        tokenized = tokenize_dataset(TokenizeConfig(max_truncated_share=1.0), scrubbed, model, store)
        rows.append(_row("tokenize (chat template + leakage check)", scrubbed.stats["records_out"],
                         time.perf_counter() - t, nbytes, train_records=tokenized.stats["train_records"],
                         leakage_checked_by=tokenized.stats.get("leakage_checked_by"), **setting))
        total = sum(r["seconds"] for r in rows[1:])
        rows.append(_row("data path total", n, total, nbytes, **setting,
                         peak_rss_mib_largest_worker=round(watch.peak_mib, 1)))
        return rows
    finally:
        watch.stop()
        if saved is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = saved


# --- PII: ours vs Presidio -------------------------------------------------------------

def presidio_analyzer() -> Any | None:
    """Presidio's pattern recognizers on a blank spaCy pipeline, or None when not installed."""
    try:
        import spacy
        import tldextract
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
        from presidio_analyzer.nlp_engine import SpacyNlpEngine
        from presidio_analyzer.predefined_recognizers import (
            CreditCardRecognizer,
            EmailRecognizer,
            IpRecognizer,
            KrRrnRecognizer,
            PhoneRecognizer,
            UsSsnRecognizer,
        )
    except ImportError:
        return None
    # tldextract would try to download the public suffix list; use its bundled snapshot.
    tldextract.tldextract.TLD_EXTRACTOR = tldextract.TLDExtract(suffix_list_urls=())
    nlp = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": "blank"}])
    nlp.nlp = {"en": spacy.blank("en")}
    registry = RecognizerRegistry(supported_languages=["en"])
    for recognizer in (EmailRecognizer(), PhoneRecognizer(), CreditCardRecognizer(), UsSsnRecognizer(),
                       IpRecognizer(), KrRrnRecognizer(supported_language="en")):
        registry.add_recognizer(recognizer)
    analyzer = AnalyzerEngine(nlp_engine=nlp, registry=registry, supported_languages=["en"])

    def find(text: str) -> list[tuple[str, int, int]]:
        return [(PRESIDIO_ENTITIES[r.entity_type], r.start, r.end)
                for r in analyzer.analyze(text=text, language="en", entities=list(PRESIDIO_ENTITIES))]

    return find


def contents(records: list[dict[str, Any]]) -> list[str]:
    return [m["content"] for r in records for m in r["messages"]]


def run_pii(records: list[dict[str, Any]], presidio: Callable | None, sample: int) -> list[dict[str, Any]]:
    from steps.text.normalize import normalize_text
    from steps.text.pii import PiiEngine

    texts = contents(records)
    nbytes = sum(len(t.encode()) for t in texts)
    engine = PiiEngine()
    t = time.perf_counter()
    normal = [normalize_text(text) for text in texts]
    rows = [_row("normalize_text (scrub's normalization, before PII)", len(records), time.perf_counter() - t, nbytes)]
    t = time.perf_counter()
    if hasattr(engine, "redact_many"):  # the batch call the scrub step makes
        found = sum(sum(c.values()) for c in engine.redact_many(normal)[1].values())
    else:  # older engines: one text at a time
        found = sum(sum(engine.redact(text)[1].values()) for text in normal)
    ours = _row("pii: ours (PiiEngine, all entities, find + replace)", len(records), time.perf_counter() - t,
                nbytes, found=found)
    rows.append(ours)
    # The same six entity types as the Presidio recognizers below: the like-for-like comparison.
    same = PiiEngine(sorted(set(PRESIDIO_ENTITIES.values())))
    t = time.perf_counter()
    found = sum(sum(c.values()) for c in same.redact_many(normal)[1].values())
    like = _row("pii: ours (PiiEngine, Presidio's six entity types, find + replace)", len(records),
                time.perf_counter() - t, nbytes, found=found)
    rows.append(like)
    if presidio is None:
        rows.append({"stage": "pii: presidio", "skipped": "presidio-analyzer not installed (pip install -e .[bench])"})
        return rows
    part = records[:sample]
    part_texts = contents(part)
    part_bytes = sum(len(t.encode()) for t in part_texts)
    t = time.perf_counter()
    hits = sum(len(presidio(text)) for text in part_texts)
    seconds = time.perf_counter() - t
    scaled = seconds * len(records) / len(part)
    rows.append(_row(f"pii: presidio pattern recognizers (sample of {len(part)}, scaled)", len(part), seconds,
                     part_bytes, found_in_sample=hits, scaled_seconds_all_records=round(scaled, 1)))
    theirs = rows[-1]["records_per_s"]
    note = f"presidio timed on {len(part)} records and scaled to {len(records)}"
    rows.append({"stage": "pii: ours vs presidio", "throughput_ratio": round(ours["records_per_s"] / theirs, 1),
                 "note": f"ours with all entity types; {note}"})
    rows.append({"stage": "pii: ours vs presidio, same six entity types",
                 "throughput_ratio": round(like["records_per_s"] / theirs, 1), "note": note})
    return rows


def golden_scores(find: Callable[[str], list[tuple[str, int, int]]], entities: set[str]) -> dict[str, Any]:
    """Recall over gold spans of ``entities`` (exact and any-overlap) and look-alikes damaged."""
    rows = [json.loads(line) for line in GOLDEN.read_text(encoding="utf-8").splitlines() if line.strip()]
    gold_n = exact = overlap = negatives = damaged = 0
    per_entity: dict[str, list[int]] = {e: [0, 0] for e in sorted(entities)}
    for row in rows:
        pred = [p for p in find(row["text"]) if p[0] in entities]
        if not row["spans"]:
            negatives += 1
            damaged += bool(pred)
        for s in row["spans"]:
            if s["entity"] not in entities:
                continue
            gold_n += 1
            hit = (s["entity"], s["start"], s["end"]) in pred
            exact += hit
            overlap += any(e == s["entity"] and a < s["end"] and s["start"] < b for e, a, b in pred)
            per_entity[s["entity"]][0] += 1
            per_entity[s["entity"]][1] += hit
    return {"gold_spans": gold_n, "recall_exact": round(exact / gold_n, 4), "recall_overlap": round(overlap / gold_n, 4),
            "negative_lines": negatives, "look_alikes_damaged": damaged,
            "recall_exact_per_entity": {e: round(h / g, 4) if g else None for e, (g, h) in per_entity.items()}}


def run_golden(presidio: Callable | None) -> list[dict[str, Any]]:
    from steps.text.pii import PiiEngine

    engine = PiiEngine()
    entities = set(PRESIDIO_ENTITIES.values())
    rows = [{"stage": "golden: ours", **golden_scores(
        lambda text: [(m.entity, m.start, m.end) for m in engine.find(text)], entities)}]
    if presidio is None:
        rows.append({"stage": "golden: presidio", "skipped": "presidio-analyzer not installed"})
    else:
        rows.append({"stage": "golden: presidio", **golden_scores(presidio, entities)})
    return rows


# --- MinHash: datasketch vs ours ----------------------------------------------------------

def run_minhash(records: list[dict[str, Any]], sample: int) -> list[dict[str, Any]]:
    from datasketch import MinHash, MinHashLSH

    from steps.text.dedup import NearDuplicates, near_form, record_text

    texts = [record_text(r) for r in records[:sample]]
    nbytes = sum(len(t.encode()) for t in texts)
    t = time.perf_counter()
    lsh = MinHashLSH(threshold=0.85, num_perm=128)
    dups = 0
    for i, text in enumerate(texts):
        s = near_form(text)
        m = MinHash(num_perm=128)
        m.update_batch([s[j:j + 5].encode() for j in range(max(len(s) - 4, 1))])
        if lsh.query(m):
            dups += 1
        else:
            lsh.insert(i, m)
    base = _row("minhash: datasketch MinHash + MinHashLSH", len(texts), time.perf_counter() - t, nbytes,
                near_duplicates=dups)
    near = NearDuplicates(0.85, 128)
    t = time.perf_counter()
    if hasattr(near, "check_and_add_many"):  # the batch call the scrub step makes, 10k at a time
        for k in range(0, len(texts), 10_000):
            near.check_and_add_many([str(i) for i in range(k, k + len(texts[k:k + 10_000]))], texts[k:k + 10_000])
    else:
        for i, text in enumerate(texts):
            near.check_and_add(str(i), text)
    ours = _row("minhash: ours (NearDuplicates)", len(texts), time.perf_counter() - t, nbytes,
                near_duplicates=near.removed)
    ours["speedup_vs_datasketch"] = round(base["seconds"] / ours["seconds"], 1) if ours["seconds"] else None
    return [base, ours]


# --- main --------------------------------------------------------------------------------

def measure(n: int, presidio_sample: int, minhash_sample: int, store: Any | None = None,
            path_workers: tuple[str, ...] = ("0", "auto")) -> list[dict[str, Any]]:
    """Every row of one run on n records (a store is started when none is given). The data
    path runs once per ``TUNELINE_DATA_WORKERS`` setting, one after the other on the same
    input; the last row compares the last setting with the first."""
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        raw = Path(tmp) / "raw.jsonl"
        size = write_jsonl(raw, n)
        rows: list[dict[str, Any]] = [{"stage": "input", "records": n, "mb": round(size / 1e6, 1),
                                       "bytes_per_record": round(size / n)}]
        with (contextlib.nullcontext(store) if store is not None else s3_store()) as target:
            totals = []
            for workers in path_workers:
                rows += run_path(target, raw, n, workers)
                totals.append(rows[-1])
        if len(totals) > 1:
            rows.append({"stage": "data path: workers vs none", "baseline": totals[0]["workers"],
                         "measured": totals[-1]["workers"],
                         "speedup": round(totals[0]["seconds"] / totals[-1]["seconds"], 2)})
    records = list(synthetic_chats(n))
    presidio = presidio_analyzer()
    rows += run_pii(records, presidio, min(presidio_sample, n))
    rows += run_golden(presidio)
    rows += run_minhash(records, min(minhash_sample, n))
    return rows


def path_rss(n: int) -> dict[str, Any]:
    """The data path on n records in this process; its peak RSS."""
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        raw = Path(tmp) / "raw.jsonl"
        size = write_jsonl(raw, n)
        with s3_store() as store:
            rows = run_path(store, raw, n)
    return {"records": n, "input_mb": round(size / 1e6, 1), "seconds": rows[-1]["seconds"],
            "workers": rows[-1]["workers"], "stages": {r["stage"]: r["seconds"] for r in rows[1:-1]},
            "peak_rss_mib": round(_vm_hwm_mib(), 1),
            "peak_rss_mib_largest_worker": rows[-1]["peak_rss_mib_largest_worker"]}


def save(kind: str, payload: dict[str, Any], out_dir: Path) -> Path:
    out = out_dir / f"{datetime.date.today().isoformat()}-data-speed{kind}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.node(), "cpus": os.cpu_count(),
                               "python": platform.python_version(), **payload}, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--presidio-sample", type=int, default=3000)
    ap.add_argument("--minhash-sample", type=int, default=10_000)
    ap.add_argument("--rss", type=int, nargs="+", help="only the data path, once per N in a fresh process")
    ap.add_argument("--path-rss-child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    if args.path_rss_child:
        print(json.dumps(path_rss(args.path_rss_child)), flush=True)
        return []
    if args.rss:
        rows = []
        for n in sorted(args.rss):
            done = subprocess.run([sys.executable, __file__, "--path-rss-child", str(n)], check=True,
                                  capture_output=True, text=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
        save("-rss", {"rows": rows}, args.out)
        return rows
    rows = measure(args.n, args.presidio_sample, args.minhash_sample)
    for row in rows:
        print(json.dumps(row, ensure_ascii=False), flush=True)
    save("", {"rows": rows}, args.out)
    return rows


if __name__ == "__main__":
    main()
