"""Every shipped parameter set parses, and each method's set runs through the whole flow
(on the tiny random model, a few steps) and registers a version that loads back from
the registry with the method that trained it."""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import pytest

from flows.cli import DEFAULT_PARAMS
from helpers import chat, invoke, serve, write_jsonl
from steps.config import PipelineParams

pytestmark = pytest.mark.services
PARAMS = DEFAULT_PARAMS.parent


@pytest.mark.parametrize("path", sorted(PARAMS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_parameter_set_is_valid(path: Path):
    assert PipelineParams.from_yaml(path)


@pytest.mark.parametrize("name, method", [("sft-lora", "lora"), ("sft-qlora", "qlora"), ("sft-full", "full"),
                                          ("reft", "reft")])
def test_method_parameter_set_runs_end_to_end(prefect_api, store, tmp_path, name, method):
    import mlflow
    from mlflow import MlflowClient

    from flows.pipeline import finetune

    rows = [chat(f"What is {i} times two?", f"{i} times two is {2 * i}.") for i in range(40)]
    source = write_jsonl(tmp_path / "chats.jsonl", rows)
    model_name = f"{name}-{uuid.uuid4().hex[:6]}"
    overrides = [f"ingest.source={source}", f"artifacts_prefix={store.prefix}", f"register.model_name={model_name}",
                 "base_model.source=tiny-random-llama", "train.max_steps=3", "train.checkpoint_every=2",
                 "evaluate.max_records=8", "evaluate.bleu_samples=2", "evaluate.max_new_tokens=4",
                 "evaluate.smoke_max_new_tokens=4",  # a random model never stops: 3 prompts x 64 tokens otherwise
                 "evaluate.reference_blocks=1"]
    if method == "reft":  # the tiny model has 2 layers
        overrides.append("train.reft.layers=[0, -1]")
    params = PipelineParams.from_yaml(PARAMS / f"{name}.yaml", overrides)
    state = finetune(params, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary.record.model.adapter.stats["method"] == method
    version = MlflowClient().get_model_version(model_name, summary.version.version)
    assert version.tags["tuneline.method"] == method
    answers = mlflow.pyfunc.load_model(f"models:/{model_name}/{version.version}").predict(
        ["What is 2 times two?"], params={"max_new_tokens": 3})
    assert len(answers) == 1 and isinstance(answers[0], str)


def text_documents(n: int) -> list[dict]:
    return [{"id": f"bill-{i:02d}", "text": f"제{i}조 이 법은 공포한 날부터 시행한다. Article {i}: the committee "
             f"reviews bill {i} and records {3 * i} votes before the plenary session."} for i in range(n)]


@pytest.mark.parametrize("name", ["cpt"])
def test_text_parameter_set_runs_end_to_end(prefect_api, store, tmp_path, name):
    from mlflow import MlflowClient

    from flows.pipeline import finetune

    source = write_jsonl(tmp_path / "texts.jsonl", text_documents(40))
    model_name = f"{name}-{uuid.uuid4().hex[:6]}"
    overrides = [f"ingest.source={source}", f"artifacts_prefix={store.prefix}", f"register.model_name={model_name}",
                 "base_model.source=tiny-random-llama", "tokenize.max_seq_len=64", "train.max_steps=3",
                 "train.checkpoint_every=2", "evaluate.max_records=8", "evaluate.smoke_max_new_tokens=4",
                 "evaluate.reference_blocks=1"]
    params = PipelineParams.from_yaml(PARAMS / f"{name}.yaml", overrides)
    assert params.validate_.record_kind == "text" and params.evaluate.bleu_samples == 0
    state = finetune(params, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    data = summary.record.datasets["tokenize"].stats
    assert data["train_documents"] + data["eval_documents"] == 40 and data["train_records"] > 0
    for report in summary.record.evaluations.values():
        assert report.stats["perplexity"] > 0 and "bleu" not in report.stats
    version = MlflowClient().get_model_version(model_name, summary.version.version)
    assert version.tags["tuneline.data_digest"] == summary.record.datasets["tokenize"].digest


@pytest.mark.parametrize("name, kind", [("classify", "classification"), ("dpo", "preference"),
                                        ("orpo", "preference")])
def test_task_parameter_set_runs_end_to_end(prefect_api, store, tmp_path, name, kind):
    """Classification on a tiny BERT and DPO / ORPO on the tiny Llama, through the whole flow and
    back out of the registry in the task's own terms (labels, or answers)."""
    import mlflow
    from mlflow import MlflowClient

    from flows.pipeline import finetune
    from helpers import labelled_rows, preference_rows

    rows = labelled_rows("classification") if kind == "classification" else preference_rows()
    source = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    model_name = f"{name}-{uuid.uuid4().hex[:6]}"
    overrides = [f"ingest.source={source}", f"artifacts_prefix={store.prefix}", f"register.model_name={model_name}",
                 "train.max_steps=3", "train.checkpoint_every=2", "tokenize.max_seq_len=64", "evaluate.max_records=8",
                 "evaluate.bleu_samples=2", "evaluate.max_new_tokens=4", "evaluate.smoke_max_new_tokens=4",
                 "evaluate.reference_blocks=1"]
    if kind == "classification":
        overrides += ["base_model.source=tiny-random-bert", "validate.labels=[money, sport, tech]"]
    else:
        overrides += ["base_model.source=tiny-random-llama"]
    params = PipelineParams.from_yaml(PARAMS / f"{name}.yaml", overrides)
    state = finetune(params, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    candidate = summary.record.evaluations["candidate"].stats
    assert summary.decision.metric == params.register_.metric and params.register_.metric in candidate
    card = MlflowClient().get_model_version(model_name, summary.version.version).description
    assert f"task `{summary.record.datasets['tokenize'].stats['task']}`" in card
    model = mlflow.pyfunc.load_model(f"models:/{model_name}/{summary.version.version}")
    if kind == "classification":
        texts = ["the team scored a goal", "the bank made a profit"]
        assert set(model.predict(texts)) <= {"money", "sport", "tech"}
        with serve(f"models:/{model_name}/{summary.version.version}", tmp_path) as url:  # `mlflow models serve`
            assert invoke(url, {"inputs": texts}) == list(model.predict(texts))
        run = MlflowClient().get_model_version(model_name, summary.version.version).run_id
        assert "plots/confusion_matrix.png" in {a.path for a in MlflowClient().list_artifacts(run, "plots")}
    else:
        assert isinstance(model.predict(["What is 2 plus 2?"], params={"max_new_tokens": 3})[0], str)


def test_reward_parameter_set_runs_end_to_end_then_rewards_ppo(prefect_api, store, tmp_path):
    """reward.yaml on a tiny BERT: a reward model through the whole flow, gated on held-out reward_accuracy,
    whose registered pyfunc scores {prompt, response} pairs and plain texts, from the registry and over REST;
    then ppo.yaml on the tiny Llama scores its samples with that reward model (``ppo_with_reward_model``)."""
    import mlflow
    from mlflow import MlflowClient

    from flows.pipeline import finetune
    from helpers import preference_rows

    source = write_jsonl(tmp_path / "pairs.jsonl", preference_rows())
    model_name = f"reward-{uuid.uuid4().hex[:6]}"
    overrides = [f"ingest.source={source}", f"artifacts_prefix={store.prefix}", f"register.model_name={model_name}",
                 "base_model.source=tiny-random-bert", "train.max_steps=12", "train.learning_rate=5e-3",
                 "train.checkpoint_every=5", "tokenize.max_seq_len=64", "evaluate.max_records=16"]
    params = PipelineParams.from_yaml(PARAMS / "reward.yaml", overrides)
    assert params.task == "reward" and params.tokenize.reward_model
    state = finetune(params, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary.record.datasets["tokenize"].stats["task"] == "reward"
    base, candidate = (summary.record.evaluations[role].stats for role in ("base", "candidate"))
    assert summary.decision.metric == "reward_accuracy"
    assert candidate["reward_accuracy"] > base["reward_accuracy"] and summary.decision.promoted
    uri = f"models:/{model_name}/{summary.version.version}"
    assert "task `reward`" in MlflowClient().get_model_version(model_name, summary.version.version).description
    model = mlflow.pyfunc.load_model(uri)
    pairs = [{"prompt": "What is 3 plus 3?", "response": "3 plus 3 is 6."},
             {"prompt": "What is 3 plus 3?", "response": "I think it is 13, maybe."}]
    scores = list(model.predict(pairs))
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores) and scores[0] > scores[1]
    assert len(model.predict(["a plain text"])) == 1
    with serve(uri, tmp_path) as url:  # `mlflow models serve`: the same scores over REST
        assert invoke(url, {"inputs": pairs}) == pytest.approx(scores, abs=1e-5)
    ppo_with_reward_model(store, tmp_path, model_name, summary.version.version, model)


def test_mlm_parameter_set_adapts_an_encoder_a_classifier_then_continues_from(prefect_api, store, tmp_path):
    """mlm.yaml on a tiny BERT (labelled texts read as text records): masked-LM through the whole flow, gated on
    held-out masked_accuracy, a registered model that fills [MASK]; then classify.yaml from its registry URI: the
    merged encoder (with the base's pooler, which masked-LM leaves out) gets a classifier, and lineage names it."""
    import json

    import mlflow
    import torch
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    from flows.pipeline import finetune
    from helpers import labelled_rows
    from steps.core.errors import ConfigError
    from steps.register.export import export_version

    source = write_jsonl(tmp_path / "labelled.jsonl", labelled_rows("classification"))
    parent = f"mlm-{uuid.uuid4().hex[:6]}"
    common = [f"ingest.source={source}", f"artifacts_prefix={store.prefix}", "train.checkpoint_every=5",
              "evaluate.max_records=16", "tokenize.eval_fraction=0.25"]
    params = PipelineParams.from_yaml(PARAMS / "mlm.yaml", [
        *common, f"register.model_name={parent}", "base_model.source=tiny-random-bert", "tokenize.max_seq_len=16",
        "train.max_steps=12", "train.learning_rate=1e-2", "evaluate.pseudo_perplexity_tokens=16"])
    assert params.task == "mlm" and params.register_.metric == "masked_accuracy"
    state = finetune(params, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary.record.datasets["tokenize"].stats["task"] == "mlm"
    base, candidate = (summary.record.evaluations[role].stats for role in ("base", "candidate"))
    assert candidate["masked_accuracy"] > base["masked_accuracy"] and candidate["pseudo_perplexity"] > 0
    assert summary.decision.metric == "masked_accuracy" and summary.decision.promoted
    parent_uri = f"models:/{parent}/{summary.version.version}"
    filled = mlflow.pyfunc.load_model(parent_uri).predict(["the team scored a [MASK]"])
    assert filled[0].startswith("the team scored a") and "[MASK]" not in filled[0]
    assert predicted_in_fresh_process(tmp_path, f"{parent}@champion", "the team scored a [MASK]") == filled[0]
    exported = export_version(f"{parent}/{summary.version.version}", "safetensors", tmp_path / "export")
    assert exported["task"] == "mlm" and exported["answers_agree"] and exported["max_logit_diff"] < 1e-4
    with pytest.raises(ConfigError, match="GGUF holds causal language models"):
        export_version(f"{parent}/{summary.version.version}", "gguf", tmp_path / "export.gguf")

    child = f"classify-{uuid.uuid4().hex[:6]}"
    params = PipelineParams.from_yaml(PARAMS / "classify.yaml", [
        *common, f"register.model_name={child}", f"base_model.source=models:/{parent}@champion",
        "validate.labels=[money, sport, tech]", "tokenize.max_seq_len=64", "train.max_steps=3"])
    state = finetune(params, return_state=True)
    assert state.is_completed(), state.message
    continued = state.result()
    adapted = continued.record.model.base
    assert adapted.stats["kind"] == "registry" and adapted.stats["parent"]["version"] == summary.version.version
    assert adapted.stats["architecture"] == "BertForMaskedLM" and adapted.stats["causal"] is False
    weights = load_file(store.download(adapted) / "model.safetensors")
    original = load_file(store.download(summary.record.model.base) / "model.safetensors")
    assert torch.equal(weights["bert.pooler.dense.weight"], original["pooler.dense.weight"])
    version = MlflowClient().get_model_version(child, continued.version.version)
    assert version.tags["tuneline.parent"] == parent_uri
    assert json.loads(version.tags["tuneline.base_chain"]) == ["tiny-random-bert", parent_uri]
    assert "f1_macro" in continued.record.evaluations["candidate"].stats
    assert set(mlflow.pyfunc.load_model(f"models:/{child}/{continued.version.version}").predict(
        ["the team scored a goal"])) <= {"money", "sport", "tech"}


def rl_run_page_shows_curves_kl_and_win_rate(summary, flow_run_id) -> None:
    """MLflow: KL, win rate, curves PNG, card; Prefect: the curves image artifact (the PNG, fetched as a browser
    logged in to MLflow would) and the curve table on the Train page."""
    import os

    import requests
    from mlflow import MlflowClient

    from flows.pages import artifact_key
    from helpers import flow_run_page
    from steps.register.report import render_summary

    evals = summary.record.evaluations
    assert evals["base"].stats["kl_to_reference"] == 0.0 and math.isfinite(evals["candidate"].stats["kl_to_reference"])
    client = MlflowClient()
    run = client.get_run(summary.version.run_id)
    assert {"candidate_kl_to_reference", "candidate_reward_win_rate", "base_kl_to_reference"} <= run.data.metrics.keys()
    assert 0.0 <= run.data.metrics["candidate_reward_win_rate"] <= 1.0
    assert summary.version.metrics["reward_win_rate"] == run.data.metrics["candidate_reward_win_rate"]
    assert f"reward_win_rate {summary.version.metrics['reward_win_rate']} (fine-tuned)" in render_summary(summary, {})
    assert "plots/rl_curves.png" in {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    card = client.get_model_version(summary.version.name, summary.version.version).description
    assert "reward_win_rate" in card and "kl_to_reference" in card
    page = flow_run_page(flow_run_id)["artifacts"]
    assert "**rl curve**" in page[artifact_key(summary.version.name, "train")]
    url = page[artifact_key(summary.version.name, "rl-curves")]
    assert "get-artifact" in url and "@" not in url  # no credentials in the link
    auth = (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"])
    image = requests.get(url, auth=auth, timeout=30)
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")


def ppo_with_reward_model(store, tmp_path, reward_name: str, reward_version: str, reward_model) -> None:
    """ppo.yaml with the reward model as champion: the run pins the alias to its version, every sampled
    completion and every held-out answer is scored by it (the same numbers as its registered pyfunc)."""
    import mlflow
    from mlflow import MlflowClient

    from flows.pipeline import finetune
    from helpers import preference_rows

    prompts = [{"id": r["id"], "prompt": r["prompt"]} for r in preference_rows()]
    model_name = f"ppo-{uuid.uuid4().hex[:6]}"
    overrides = [f"ingest.source={write_jsonl(tmp_path / 'prompts.jsonl', prompts)}", f"artifacts_prefix={store.prefix}",
                 f"register.model_name={model_name}", "base_model.source=tiny-random-llama", "train.max_steps=3",
                 "train.checkpoint_every=2", "train.rl.prompts_per_step=2", "train.rl.max_new_tokens=4",
                 f"train.rl.rewards=[{{function: model, model: 'models:/{reward_name}@champion'}}]",
                 "scrub.near_dedup=false", "tokenize.leakage_threshold=null",  # the prompts differ in digits only
                 "tokenize.eval_fraction=0.2", "evaluate.reward_prompts=4", "evaluate.max_new_tokens=4",
                 "evaluate.smoke_max_new_tokens=4", "evaluate.reference_blocks=1", "register.require_smoke=false",
                 "register.forgetting_tolerance=null", "register.max_kl=1000"]
    params = PipelineParams.from_yaml(PARAMS / "ppo.yaml", overrides)
    assert params.train.rl.algorithm == "ppo" and params.evaluate.rewards[0].model.endswith("@champion")
    state = finetune(params, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    pinned = f"models:/{reward_name}/{reward_version}"
    assert summary.record.params["train"]["rl"]["rewards"][0]["model"] == pinned
    assert summary.record.params["evaluate"]["rewards"][0]["model"] == pinned
    log = store.read_json(summary.record.model.adapter, "train_log.json")
    assert len(log) == 3 and all({"reward", "kl", "kl_coef", "value_loss", "reward_model"} <= r.keys() for r in log)
    candidate = summary.record.evaluations["candidate"]
    samples = store.read_jsonl(candidate, "samples.jsonl")
    asked = [{"prompt": next(p["prompt"] for p in prompts if p["id"] == s["id"]), "response": s["prediction"]}
             for s in samples]
    assert [s["reward"] for s in samples] == pytest.approx(list(reward_model.predict(asked)), abs=1e-4)
    assert "KL to the base" in summary.decision.reason and "allowed <= 1000" in summary.decision.reason
    rl_run_page_shows_curves_kl_and_win_rate(summary, state.state_details.flow_run_id)
    run = MlflowClient().get_run(summary.version.run_id)
    assert pinned in str(run.data.params)
    answer = mlflow.pyfunc.load_model(f"models:/{model_name}/{summary.version.version}").predict(["Hello?"])[0]
    assert isinstance(answer, str)


def test_grpo_parameter_set_runs_end_to_end(prefect_api, store, tmp_path):
    """grpo.yaml on the tiny Llama: prompt records from the arithmetic source, GRPO steps logged with their
    rewards, gated on held-out mean_reward, and a registered model that answers prompts."""
    import mlflow

    from flows.pipeline import finetune

    model_name = f"grpo-{uuid.uuid4().hex[:6]}"
    overrides = [f"artifacts_prefix={store.prefix}", f"register.model_name={model_name}", "ingest.source=arithmetic:40,0,9",
                 "base_model.source=tiny-random-llama", "train.max_steps=3", "train.checkpoint_every=2",
                 "train.rl.prompts_per_step=2", "train.rl.group_size=2", "train.rl.max_new_tokens=4",
                 "evaluate.reward_prompts=4", "evaluate.max_new_tokens=4", "evaluate.smoke_max_new_tokens=4",
                 "evaluate.reference_blocks=1", "register.require_smoke=false", "register.forgetting_tolerance=null"]
    params = PipelineParams.from_yaml(PARAMS / "grpo.yaml", overrides)
    assert params.task == "rl" and [r.function for r in params.evaluate.rewards] == [
        r.function for r in params.train.rl.rewards]
    state = finetune(params, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary.record.datasets["tokenize"].stats["task"] == "rl"
    assert summary.decision.metric == "mean_reward"
    for role in ("base", "candidate"):
        assert 0.0 <= summary.record.evaluations[role].stats["mean_reward"] <= 2.0
    log = store.read_json(summary.record.model.adapter, "train_log.json")
    assert len(log) == 3 and all({"reward", "kl", "completion_length"} <= row.keys() for row in log)
    assert [w["steps"] for w in summary.record.model.adapter.stats["rl_curve"]] == ["1-1", "2-2", "3-3"]
    rl_run_page_shows_curves_kl_and_win_rate(summary, state.state_details.flow_run_id)
    model = mlflow.pyfunc.load_model(f"models:/{model_name}/{summary.version.version}")
    assert isinstance(model.predict(["What is 2 + 2? Answer with the number only."], params={"max_new_tokens": 3})[0],
                      str)


def test_seq2seq_parameter_set_fails_resumes_promotes_and_predicts(prefect_api, store, tmp_path, monkeypatch, capsys):
    """seq2seq.yaml on the shipped tiny T5 with instruction pairs (alpaca records read as seq2seq): the flow fails
    in training after a checkpoint, `tuneline run --resume` finishes it from there, the version is gated on the
    target perplexity with BLEU/chrF/ROUGE-L measured, and `tuneline predict` answers from a fresh process."""
    from flows.cli import main
    from flows.pipeline import finetune
    from helpers import die_after_checkpoint
    from steps.train import step as train

    words = ["cat", "dog", "bird", "fish", "bread", "apple", "tree", "house", "river", "garden"]
    rows = [{"id": f"p{i}", "instruction": "Repeat the words backwards.", "input": f"{a} {b} {c}",
             "output": f"{c} {b} {a}"} for i, (a, b, c) in enumerate(zip(words * 6, words[3:] * 6 + words[:3] * 6,
                                                                         words[7:] * 6 + words[:7] * 6))]
    model_name = f"seq2seq-{uuid.uuid4().hex[:6]}"
    params = PipelineParams.from_yaml(PARAMS / "seq2seq.yaml", [
        f"ingest.source={write_jsonl(tmp_path / 'pairs.jsonl', rows)}", "ingest.format=alpaca",
        f"artifacts_prefix={store.prefix}", f"register.model_name={model_name}", "train.max_steps=6",
        "train.checkpoint_every=2", "train.batch_size=8", "scrub.near_dedup=false", "tokenize.leakage_threshold=null",
        "tokenize.eval_fraction=0.2", "evaluate.max_records=16", "evaluate.bleu_samples=4", "evaluate.max_new_tokens=6",
        "evaluate.smoke_max_new_tokens=6"])
    assert params.task == "seq2seq" and params.register_.metric == "perplexity"
    original = die_after_checkpoint(monkeypatch, 4)  # the step dies after its 2nd checkpoint
    failed = finetune(params, return_state=True)
    assert failed.is_failed()
    monkeypatch.setattr(train.Checkpoints, "save", original)
    capsys.readouterr()
    assert main(["run", "--resume", str(failed.state_details.flow_run_id)]) == 0
    from mlflow import MlflowClient

    versions = MlflowClient().search_model_versions(f"name = '{model_name}'")
    assert len(versions) == 1 and MlflowClient().get_model_version_by_alias(model_name, "champion").version == "1"
    run = MlflowClient().get_run(versions[0].run_id)
    assert {"candidate_rouge_l", "candidate_bleu", "candidate_chrf", "candidate_perplexity"} <= run.data.metrics.keys()
    trained = [k for k in store.list_keys(f"{store.prefix}/train/") if k.endswith("_MANIFEST.json")]
    assert len(trained) == 1
    import json

    stats = json.loads(store.get_bytes(trained[0]))["stats"]
    assert stats["resumed_from"] == 4 and stats["steps"] == 6
    assert isinstance(predicted_in_fresh_process(tmp_path, f"{model_name}@champion", "cat dog bird", "5"), str)


def predicted_in_fresh_process(tmp_path, spec: str, text: str, max_new_tokens: str = "8") -> str:
    """`tuneline predict SPEC TEXT` in a new process that knows only the service endpoints: the answer."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNELINE_HOME")}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "predict", spec, text, "--max-new-tokens",
                           max_new_tokens], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    asked, _, answer = done.stdout.rstrip("\n").partition("\t")
    assert asked == text
    return answer
