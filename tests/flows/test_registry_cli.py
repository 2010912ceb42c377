"""`tuneline models | promote | rollback | predict` against the real MLflow server, after two runs."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from test_pipeline import dataset, tiny_params

from flows.cli import REPO, main
from helpers import invoke, serve

pytestmark = pytest.mark.services


def test_two_runs_then_manual_gate_override_rollback_and_predict(prefect_api, store, tmp_path, capsys):
    from mlflow import MlflowClient

    from flows.pipeline import finetune

    name = f"cli-{uuid.uuid4().hex[:6]}"
    first = tiny_params(dataset(tmp_path), store.prefix, name)
    assert finetune(first, return_state=True).result().decision.promoted
    worse = first.model_copy(update={"train": first.train.model_copy(update={"max_steps": 1, "learning_rate": 1e-6})})
    second = finetune(worse, return_state=True).result()
    assert not second.decision.promoted and second.version.version == "2"
    client = MlflowClient()
    champion = lambda: client.get_model_version_by_alias(name, "champion").version  # noqa: E731
    assert champion() == "1"
    # each model card explains its decision
    first_card, second_card = (client.get_model_version(name, v).description for v in ("1", "2"))
    assert "## Promotion decision" in first_card and "promoted: perplexity" in first_card
    assert "not promoted, champion unchanged: perplexity" in second_card and "champion v1" in second_card

    # registered files: weights as safetensors, metadata as JSON/YAML/text, code as source; never a pickle
    import mlflow

    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1", dst_path=str(tmp_path / "dl")))
    files = [f for f in folder.rglob("*") if f.is_file()]
    allowed = {".safetensors", ".json", ".yaml", ".yml", ".txt", ".tsv", ".md", ".jinja", ".py", ".zip", ""}
    assert files and {f.suffix for f in files} <= allowed, sorted({f.suffix for f in files})
    assert any(f.suffix == ".safetensors" for f in files)
    assert not [f for f in files if f.read_bytes()[:1] == b"\x80"]  # pickle protocol 2+ magic
    import zipfile

    for code in (f for f in files if f.suffix == ".zip"):  # the served model's code: source files only
        assert {Path(n).suffix for n in zipfile.ZipFile(code).namelist()} <= {".py", ".md", ".txt", ".tsv"}

    capsys.readouterr()
    assert main(["models", name]) == 0
    listing = capsys.readouterr().out
    assert "champion" in listing and "perplexity" in listing and "not promoted" in listing

    assert main(["promote", name, "2"]) == 2  # the gate says no: perplexity is worse than the champion's
    assert "not promoted" in capsys.readouterr().err and champion() == "1"
    assert main(["promote", name, "2", "--force"]) == 2  # an override needs a reason
    assert main(["promote", name, "2", "--force", "--reason", "canary for the new tokenizer"]) == 0
    assert champion() == "2"
    assert client.get_model_version_by_alias(name, "previous-champion").version == "1"
    assert client.get_model_version(name, "2").tags["tuneline.override"] == "canary for the new tokenizer"

    assert main(["rollback", name]) == 0
    assert champion() == "1" and "tuneline.rolled_back" in client.get_model_version(name, "2").tags
    assert main(["rollback", name]) == 2  # nothing left to roll back to

    # every alias move is on record, oldest first: who, when, why, from and to
    capsys.readouterr()
    assert main(["models", name, "--history"]) == 0
    lines = capsys.readouterr().out.splitlines()
    moves = [line.split()[2:6] for line in lines[1:]]  # alias, from, ->, to
    assert moves == [
        ["challenger", "-", "->", "v1"],            # run 1 registered
        ["champion", "-", "->", "v1"],              # run 1 passed the gate
        ["challenger", "v1", "->", "-"],            # a champion is no challenger
        ["challenger", "-", "->", "v2"],            # run 2 registered, gate said no
        ["previous-champion", "-", "->", "v1"],     # forced promotion of v2
        ["champion", "v1", "->", "v2"],
        ["challenger", "v2", "->", "-"],
        ["champion", "v2", "->", "v1"],             # rollback
        ["previous-champion", "v1", "->", "-"],
    ], lines
    actions = [line.split()[6] for line in lines[1:]]
    assert actions == ["register", "gate", "gate", "register", "force", "force", "force", "rollback", "rollback"]
    assert "canary for the new tokenizer" in lines[6]  # the forced move of champion carries the reason
    assert any(k.startswith("tuneline.alias_history.") for k in client.get_model_version(name, "2").tags)

    # predict loads from the registry in a fresh process that knows only the service endpoints
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNELINE_HOME")}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "predict", f"{name}@champion", "What is 3 times two?",
                           "--max-new-tokens", "3"], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("What is 3 times two?\t")

    # exports of the champion that other servers load: merged safetensors and GGUF, each checked by loading it back
    import json

    for fmt, target in (("safetensors", tmp_path / "export-hf"), ("gguf", tmp_path / "export.gguf")):
        capsys.readouterr()
        assert main(["export", f"{name}@champion", "--format", fmt, "--output", str(target)]) == 0
        report = json.loads(Path(f"{target}.export.json").read_text())
        assert report["answers_agree"] and report["max_logit_diff"] < 1e-3, report
        assert "greedy answers agree" in capsys.readouterr().out
    assert (tmp_path / "export-hf" / "model.safetensors").exists() and (tmp_path / "export.gguf").stat().st_size
    assert main(["export", f"{name}/99", "--format", "gguf", "--output", str(tmp_path / "x.gguf")]) == 2

    # `mlflow models serve -m models:/NAME@champion` answers POST /invocations (prompts in, answers out)
    with serve(f"models:/{name}@champion", tmp_path) as url:
        answers = invoke(url, {"inputs": ["What is 3 times two?", "Hello"], "params": {"max_new_tokens": 3}})
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert answers[0] == done.stdout.split("\t", 1)[1].strip()  # what `tuneline predict` answered (greedy)
    assert REPO.exists()
