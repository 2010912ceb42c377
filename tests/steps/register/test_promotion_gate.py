"""The promotion policy against the real MLflow server: metric, smoke test, forgetting check,
the decision in tags and model card, and concurrent promotions."""

from __future__ import annotations

import threading
import uuid

import pytest

from steps.config import RegisterConfig
from steps.core.store import ArtifactRef, EvalReport, ModelRef
from steps.register.step import RegisteredVersion, gate_checks, promote_model

pytestmark = pytest.mark.services


def report(**stats) -> EvalReport:
    return EvalReport(step="evaluate", key=uuid.uuid4().hex, digest=uuid.uuid4().hex, stats=stats)


def smoke(passed: bool) -> dict:
    return {"kind": "generation", "passed": passed,
            "prompts": [{"prompt": "Say hello.", "passed": passed}]}


def versions(name: str, values: list[float], digest: str = "data-1") -> list[RegisteredVersion]:
    from mlflow import MlflowClient

    client = MlflowClient()
    client.create_registered_model(name)
    out = []
    for value in values:
        model = ModelRef(base=ArtifactRef(step="base_model", key="b", digest="b"),
                         adapter=ArtifactRef(step="train", key=uuid.uuid4().hex, digest=uuid.uuid4().hex))
        v = client.create_model_version(name, source="s3://nowhere/model", tags={
            "tuneline.data_digest": digest, "tuneline.metric": "perplexity", "tuneline.metric_value": str(value),
            "tuneline.model_ref": model.model_dump_json()})
        client.update_model_version(name, v.version, description=f"# {name}\n")
        out.append(RegisteredVersion(name=name, version=v.version, run_id="", run_key=uuid.uuid4().hex))
    return out


def test_gate_checks_cover_smoke_and_forgetting():
    cfg = RegisterConfig(forgetting_tolerance=0.1)
    base = report(perplexity=9.0, reference_perplexity=20.0)
    fine = gate_checks(cfg, report(perplexity=5.0, smoke=smoke(True), reference_perplexity=21.0), base)
    assert all(ok for ok, _ in fine) and "forgetting" in fine[1][1]
    bad = gate_checks(cfg, report(perplexity=5.0, smoke=smoke(False), reference_perplexity=30.0), base)
    assert [ok for ok, _ in bad] == [False, False]
    assert "Say hello." in bad[0][1] and "+50.0%" in bad[1][1]
    off = RegisterConfig(require_smoke=False, forgetting_tolerance=None)
    assert gate_checks(off, report(perplexity=5.0, smoke=smoke(False), reference_perplexity=99.0), base) == []


@pytest.mark.parametrize("case", ["smoke", "forgetting", "both pass"])
def test_a_better_metric_is_not_enough(services, case):
    from mlflow import MlflowClient

    name = f"gate-{uuid.uuid4().hex[:6]}"
    (v1,) = versions(name, [5.0])
    cfg = RegisterConfig(model_name=name, forgetting_tolerance=0.2)
    base = report(perplexity=9.0, reference_perplexity=20.0)
    candidate = report(perplexity=5.0, smoke=smoke(case != "smoke"),
                       reference_perplexity=30.0 if case == "forgetting" else 21.0)
    decision = promote_model(cfg, v1, candidate, base, "base model", base)
    assert decision.promoted == (case == "both pass")
    version = MlflowClient().get_model_version(name, v1.version)
    assert version.tags["tuneline.promotion"] == decision.reason
    assert "## Promotion decision" in version.description and decision.reason in version.description
    if case == "smoke":
        assert "smoke test failed" in decision.reason
    if case == "forgetting":
        assert "- FAIL: forgetting" in version.description


def test_concurrent_promotions_leave_one_consistent_champion(services):
    from mlflow import MlflowClient

    name = f"race-{uuid.uuid4().hex[:6]}"
    worse, better = versions(name, [6.0, 5.0])
    cfg = RegisterConfig(model_name=name, require_smoke=False, forgetting_tolerance=None)
    base = report(perplexity=9.0)
    decisions = {}

    def run(version: RegisteredVersion, value: float) -> None:
        decisions[version.version] = promote_model(cfg, version, report(perplexity=value), base, "base model")

    threads = [threading.Thread(target=run, args=(worse, 6.0)), threading.Thread(target=run, args=(better, 5.0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client = MlflowClient()
    assert client.get_model_version_by_alias(name, "champion").version == better.version
    aliases = client.get_registered_model(name).aliases
    assert list(aliases).count("champion") == 1
    assert decisions[better.version].promoted
    # whichever ran second compared itself with the first one's result, not with the base model
    assert sorted(d.incumbent for d in decisions.values())[0] == "base model"
    assert sorted(d.incumbent for d in decisions.values())[1].startswith("champion v")
    if aliases.get("previous-champion") is not None:
        assert str(aliases["previous-champion"]) == worse.version
