"""Tamper evidence of registered versions (steps/register/verify.py) against the real MLflow server: files
replaced through MLflow's artifact API are refused by `tuneline predict`, `tuneline serve` and the pyfunc's
own load_context, naming the file, and the replaced code never runs."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from helpers import sft_dataset

pytestmark = pytest.mark.services

EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("the inserted code ran")
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class Evil(PythonModel):
    def predict(self, context, model_input, params=None):
        return ["pwned"]


set_model(Evil())
"""


def registered(store, tmp_path, tiny_model):
    import steps.config as c
    from steps.evaluate import evaluate_model
    from steps.register.step import RunRecord, register_model
    from steps.train.step import train_model

    data = sft_dataset(store, tmp_path, tiny_model, n=12)
    tuned = train_model(c.TrainConfig(max_steps=2, batch_size=4, warmup_steps=0, checkpoint_every=0,
                                      lora=c.LoraSettings(r=4, alpha=8)), data, tiny_model, store)
    candidate = evaluate_model(c.EvaluateConfig(max_records=2, bleu_samples=1, max_new_tokens=2, smoke_max_new_tokens=2,
                                                reference_blocks=0), tuned, data, store)
    record = RunRecord(params={}, datasets={name: data for name in ("ingest", "validate", "scrub", "tokenize")},
                       model=tuned, evaluations={"candidate": candidate})
    return register_model(c.RegisterConfig(model_name=f"tamper-{uuid.uuid4().hex[:6]}"), record, store), tuned


def test_files_replaced_through_mlflow_are_refused_naming_the_file(store, tmp_path, tiny_model, capsys):
    import mlflow
    from mlflow import MlflowClient

    from flows.cli import main
    from steps.base_model.remote import fetch_registry
    from steps.core.errors import ArtifactError
    from steps.core.model_source import parse_source
    from steps.register.registry import predict
    from steps.register.verify import FILES_TAG, recorded_files

    version, tuned = registered(store, tmp_path, tiny_model)
    spec = f"{version.name}/{version.version}"
    client = MlflowClient()
    mv = client.get_model_version(version.name, version.version)
    assert mv.tags["tuneline.registration"] == "complete"
    files = recorded_files(mv.tags)
    trained = {name: meta["sha256"] for name, meta in store.manifest(tuned.adapter.key)["files"].items()}
    weights = sorted(p for p in files if p.startswith("artifacts/trained/") and p.endswith(".safetensors"))
    assert weights and all(files[p] == trained[p.removeprefix("artifacts/trained/")] for p in weights)
    assert {"MLmodel", "serving.py", "requirements.txt", "artifacts/steps.zip"} <= set(files), sorted(files)
    assert any(p.startswith("artifacts/tokenizer/") for p in files)
    assert len(predict(spec, ["What is 1 plus 1?"], max_new_tokens=2)) == 1  # intact: verified and answered

    model_id = mv.model_id or mv.source.removeprefix("models:/")  # the logged model: models:/m-...
    original = Path(mlflow.artifacts.download_artifacts(f"models:/{spec}/serving.py", dst_path=str(tmp_path / "orig")))
    marker = tmp_path / "inserted-code-ran"
    evil = tmp_path / "evil" / "serving.py"
    evil.parent.mkdir()
    evil.write_text(EVIL.format(marker=str(marker)))
    client.log_model_artifact(model_id, str(evil))  # the attack: replace serving.py through MLflow's artifact API
    with pytest.raises(ArtifactError, match=f"{version.name} version {version.version}: file serving.py differs"):
        predict(spec, ["hi"])
    capsys.readouterr()
    assert main(["predict", spec, "hi"]) == 2
    assert "file serving.py differs from the sha256 recorded at registration" in capsys.readouterr().err
    assert main(["serve", spec, "--port", "1"]) == 2  # refused before any server starts
    assert "serving.py" in capsys.readouterr().err
    assert not marker.exists()  # the inserted code never ran

    client.log_model_artifact(model_id, str(original))  # put back: verified again
    assert len(predict(spec, ["hi"], max_new_tokens=1)) == 1
    original_weight = Path(mlflow.artifacts.download_artifacts(f"models:/{spec}/{weights[0]}",
                                                               dst_path=str(tmp_path / "w0"))).read_bytes()
    weight = tmp_path / "w" / Path(weights[0]).name
    weight.parent.mkdir()
    weight.write_bytes(original_weight[:-8] + b"\x01" * 8)  # the same size, other numbers
    client.log_model_artifact(model_id, str(weight), artifact_path=str(Path(weights[0]).parent))
    with pytest.raises(ArtifactError, match=f"file {weights[0]} differs"):
        predict(spec, ["hi"])
    with pytest.raises(ArtifactError, match=f"file {weights[0]} differs"):  # nor the base of a new run
        fetch_registry(parse_source(f"models:/{spec}"), tmp_path / "parent")
    # Loaded straight from models:/ (as `mlflow models serve -m models:/...` does), the unchanged serving.py
    # checks its own artifacts against the digests in its config before loading them.
    with pytest.raises(Exception, match=f"model artifact trained/{Path(weights[0]).name} differs"):
        mlflow.pyfunc.load_model(f"models:/{spec}")

    # A version without recorded digests (registered before they were) is refused, saying so.
    bare = client.create_model_version(version.name, source=mv.source, run_id=mv.run_id, model_id=model_id,
                                       tags={k: v for k, v in mv.tags.items() if not k.startswith(FILES_TAG)})
    with pytest.raises(ArtifactError, match="registered before tuneline recorded file digests"):
        predict(f"{version.name}/{bare.version}", ["hi"])


def test_a_replaced_base_model_file_is_refused_by_the_loader(store, tmp_path, tiny_model):
    """The base model is fetched by the pyfunc from its own MLflow run: checked against the digests in the
    version's (verified) config."""
    import mlflow
    import yaml
    from mlflow import MlflowClient

    from steps.core.errors import ArtifactError
    from steps.register.registry import predict

    version, _ = registered(store, tmp_path, tiny_model)
    spec = f"{version.name}/{version.version}"
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{spec}/MLmodel", dst_path=str(tmp_path / "m")))
    config = yaml.safe_load(folder.read_text())["flavors"]["python_function"]["config"]
    run_id = config["base_model_uri"].split("/")[1]
    original = Path(mlflow.artifacts.download_artifacts(f"{config['base_model_uri']}/config.json",
                                                        dst_path=str(tmp_path / "orig")))
    changed = tmp_path / "changed" / "config.json"
    changed.parent.mkdir()
    changed.write_text(json.dumps({**json.loads(original.read_text()), "note": "replaced"}))
    client = MlflowClient()
    client.log_artifact(run_id, str(changed), "base_model")
    try:
        with pytest.raises(ArtifactError, match="base model runs:/.*: file config.json differs"):
            predict(spec, ["hi"])
    finally:  # the base run is shared by every version of this base in the session
        client.log_artifact(run_id, str(original), "base_model")
    assert len(predict(spec, ["hi"], max_new_tokens=1)) == 1
