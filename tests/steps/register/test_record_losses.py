"""Per-record losses for data curation: train stores each train and eval record's loss (ids, never contents),
register logs them and a histogram to the MLflow run, and ``tuneline data worst`` lists the highest-loss
and duplicated-looking records by id."""

import pytest

from helpers import chat, write_jsonl

pytestmark = pytest.mark.services


def test_record_losses_reach_mlflow_and_tuneline_data_worst(store, tmp_path, tiny_model, capsys):
    from mlflow import MlflowClient

    import steps.config as c
    from flows.cli import main
    from steps.core.contract import RECORD_LOSSES
    from steps.evaluate import evaluate_model
    from steps.ingest import ingest_records
    from steps.register.step import RunRecord, register_model
    from steps.scrub.step import scrub_records
    from steps.tokenize.step import tokenize_dataset
    from steps.train.step import train_model
    from steps.validate import validate_records

    rows = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.", id=f"r{i}") for i in range(30)]
    rows += [dict(rows[0], id="copy-of-r0"), chat("zq xv kw pj?", "Jx qz vw kp yb zt.", id="odd-one")]
    raw = ingest_records(c.IngestConfig(source=str(write_jsonl(tmp_path / "raw.jsonl", rows))), store)
    clean = scrub_records(c.ScrubConfig(dedup=False, near_dedup=False), validate_records(c.ValidateConfig(), raw, store),
                          store)
    data = tokenize_dataset(c.TokenizeConfig(eval_fraction=0.2, max_seq_len=64, leakage_threshold=None), clean,
                            tiny_model, store)
    tuned = train_model(c.TrainConfig(method="lora", max_steps=4, batch_size=4, learning_rate=1e-3, warmup_steps=0,
                                    checkpoint_every=0), data, tiny_model, store)
    losses = store.read_jsonl(tuned.adapter, RECORD_LOSSES)
    assert {r["id"] for r in losses} == {r["id"] for r in rows}
    assert {r["split"] for r in losses} == {"train", "eval"} and all(r["tokens"] > 0 for r in losses)
    assert [r["loss"] for r in losses] == sorted((r["loss"] for r in losses), reverse=True)
    assert set(losses[0]) == {"id", "split", "loss", "tokens"}  # ids and numbers, never contents
    copies = [r for r in losses if r["id"] in ("r0", "copy-of-r0")]
    assert abs(copies[0]["loss"] - copies[1]["loss"]) < 1e-4  # the same tokens: the same loss (float noise aside)

    candidate = evaluate_model(c.EvaluateConfig(max_records=4, bleu_samples=1, max_new_tokens=2, smoke_max_new_tokens=2,
                                              reference_blocks=0), tuned, data, store)
    record = RunRecord(params={}, datasets={"ingest": raw, "validate": clean, "scrub": clean, "tokenize": data},
                       model=tuned, evaluations={"candidate": candidate})
    version = register_model(c.RegisterConfig(model_name="record-losses-test"), record, store)
    artifacts = {a.path for a in MlflowClient().list_artifacts(version.run_id, "plots")}
    assert "plots/record_losses.png" in artifacts

    assert main(["data", "worst", f"record-losses-test/{version.version}", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert f"run {version.run_id}: {len(rows)} records" in out
    listed = [line.split()[1] for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert listed == [r["id"] for r in losses[:3]]
    assert "duplicated-looking" in out and "r0 (" in out and "copy-of-r0 (" in out
    assert main(["data", "worst", "no-such-run-id"]) == 2
