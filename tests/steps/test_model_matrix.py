"""Architecture matrix: tiny random models of the common families, built from their config classes with
their own BPE tokenizers (bench/zoo.py), go through the steps with no per-model code: base model from
a local folder, tokenize, train with lora (every family) and full (one family per model layout), evaluate,
register, and answer ``predict`` from a fresh process. Causal families train on chat records, encoders on
classification records. The memory planner's estimate and the measured peak land in each train report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from helpers import chat, labelled_rows, write_jsonl

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import zoo  # noqa: E402

pytestmark = pytest.mark.services

PREDICT = """
import json, sys
import mlflow
for uri, inputs in json.loads(sys.argv[1]):
    print(json.dumps([uri, mlflow.pyfunc.load_model(uri).predict(inputs, params=None)]))
"""


def prepared(store, tmp_path, family: str, corpus: list[str]):
    """Base model from the family's local folder, and the steps' datasets up to tokenize."""
    from steps.base_model import prepare_base_model
    from steps.config import BaseModelConfig, IngestConfig, ScrubConfig, TokenizeConfig, ValidateConfig
    from steps.core.store import ArtifactStore
    from steps.ingest import ingest_records
    from steps.scrub.step import scrub_records
    from steps.tokenize.step import tokenize_dataset
    from steps.validate import validate_records

    base = prepare_base_model(BaseModelConfig(source=str(zoo.build(family, tmp_path / family, corpus))), store)
    kind = "classification" if family in zoo.ENCODERS else "chat"
    rows = (labelled_rows("classification", n=24) if kind == "classification"
            else [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(24)])
    shared = ArtifactStore.from_env("matrix-data")  # the same records for every family: validated once
    path = Path(tempfile.gettempdir()) / f"tuneline-matrix-{kind}.jsonl"  # same path, same key
    staged = write_jsonl(path.with_name(f"{path.name}.{os.getpid()}"), rows)
    os.replace(staged, path)  # whole: the other half's worker may be reading it
    raw = ingest_records(IngestConfig(source=str(path)), shared)
    validated = validate_records(ValidateConfig(record_kind=kind), raw, shared)
    clean = scrub_records(ScrubConfig(), validated, shared)
    data = tokenize_dataset(TokenizeConfig(eval_fraction=0.25, max_seq_len=48), clean, base, shared)
    return base, {"ingest": raw, "validate": validated, "scrub": clean, "tokenize": data}


def trained_and_registered(store, tmp_path, family: str) -> list[list]:
    """``methods_for(family)`` on ``family``: trained, evaluated and registered; returns [model URI, inputs] per
    version."""
    from steps.config import EvaluateConfig, RegisterConfig
    from steps.evaluate import evaluate_model
    from steps.register.step import RunRecord, register_model

    base, datasets = prepared(store, tmp_path, family, zoo.corpus())
    data = datasets["tokenize"]
    assert base.base.stats["causal"] == (family in zoo.CAUSAL)
    evaluate = EvaluateConfig(max_records=6, bleu_samples=2, max_new_tokens=3, smoke_max_new_tokens=3,
                              reference_blocks=0)
    name = f"matrix-{family}-{uuid.uuid4().hex[:6]}"
    calls = []
    for method in methods_for(family):
        tuned = train_model_for(method, data, base, store)
        assert tuned.adapter.stats["steps"] == 3
        report = store.read_json(tuned.adapter, "train_report.json")
        assert report["memory_plan"]["estimate"]["total_gib"] > 0 and report["measured_peak_gib"] is not None
        candidate = evaluate_model(evaluate, tuned, data, store)
        metric = "f1_macro" if family in zoo.ENCODERS else "perplexity"
        assert candidate.stats[metric] >= 0
        record = RunRecord(params={"family": family, "method": method}, datasets=datasets, model=tuned,
                           evaluations={"candidate": candidate})
        version = register_model(RegisterConfig(model_name=name, metric=metric), record, store)
        inputs = ["sport match goal team"] if family in zoo.ENCODERS else ["What is 2 plus 2?"]
        calls.append([f"models:/{name}/{version.version}", inputs])
    return calls


@pytest.fixture(scope="class")
def matrix(services, tmp_path_factory, request):
    """Every selected family of the class through the steps (errors kept per family), then one fresh process that
    loads every registered version from the registry and predicts (one process per class: its start-up is paid
    once; the two classes run side by side on two workers, tests/conftest.py CLASS_UNITS)."""
    import traceback

    from steps.core.store import ArtifactStore

    store = ArtifactStore.from_env(f"test-matrix-{uuid.uuid4().hex[:8]}")
    selected = {item.callspec.params["family"] for item in request.session.items
                if item.cls is request.cls and hasattr(item, "callspec")}
    results: dict[str, dict] = {}
    for family in [f for f in FAMILIES if f in selected]:
        try:
            results[family] = {"calls": trained_and_registered(store, tmp_path_factory.mktemp(family), family)}
        except Exception:  # noqa: BLE001 - reported by that family's test
            results[family] = {"error": traceback.format_exc()}
    calls = [call for r in results.values() for call in r.get("calls", [])]
    out = subprocess.run([sys.executable, "-c", PREDICT, json.dumps(calls)], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    answers = dict(tuple(json.loads(line)) for line in out.stdout.splitlines() if line.startswith("["))
    for r in results.values():
        r["answers"] = [answers.get(uri) for uri, _ in r.get("calls", [])]
    return {"families": results, "predict_stderr": out.stderr[-3000:] if out.returncode else ""}


FAMILIES = zoo.CAUSAL + zoo.ENCODERS
# lora picks its target modules per architecture (ATTENTION_TARGETS, peft's defaults, every backbone linear layer),
# so it runs on every family. full trains and saves the whole model with no per-architecture code: it runs on one
# family of each kind of layout it meets (tied Llama-style decoder, untied lm_head, Gemma's scaled embeddings and
# sliding window, GPT-2's Conv1D, a BERT classifier head, ModernBERT's own head), split across the two halves.
FULL_FAMILIES = ("llama", "phi3", "gemma3", "gpt2", "bert", "modernbert")
HALVES = (FAMILIES[::2], FAMILIES[1::2])  # interleaved: causal families and encoders in both


def methods_for(family: str) -> tuple[str, ...]:
    return ("lora", "full") if family in FULL_FAMILIES else ("lora",)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Each half's test runs for the families of its class."""
    if "family" in metafunc.fixturenames and metafunc.cls is not None:
        metafunc.parametrize("family", metafunc.cls.families)


class MatrixHalf:
    families: tuple[str, ...] = ()

    def test_every_family_trains_evaluates_registers_and_serves(self, matrix, family):
        trains_evaluates_registers_and_serves(matrix, family)


class TestFirstHalf(MatrixHalf):
    families = HALVES[0]


class TestSecondHalf(MatrixHalf):
    families = HALVES[1]


def trains_evaluates_registers_and_serves(matrix, family: str) -> None:
    result = matrix["families"][family]
    assert "error" not in result, result.get("error")
    assert len(result["calls"]) == len(methods_for(family)) and all(result["answers"]), matrix["predict_stderr"]
    for answer in result["answers"]:
        assert len(answer) == 1
        if family in zoo.ENCODERS:
            assert answer[0] in {"money", "sport", "tech"}
        else:
            assert isinstance(answer[0], str)


def train_model_for(method: str, data, base, store):
    from steps.config import TrainConfig
    from steps.train.step import train_model

    return train_model(TrainConfig(method=method, max_steps=3, batch_size=4, warmup_steps=0, learning_rate=1e-3,
                                   checkpoint_every=0), data, base, store)
