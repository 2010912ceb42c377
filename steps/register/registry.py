"""Registry operations behind the CLI: list versions, promote one through the gate (or by
recorded override), roll the champion back, and predict from a registered model.

    tuneline models [NAME]                         # versions, aliases, gate metric, decision
    tuneline models NAME --history                 # every alias move: time, actor, action, reason
    tuneline promote NAME VERSION [--force --reason TEXT]
    tuneline rollback NAME                         # champion -> previous-champion
    tuneline predict NAME[@alias|/version] TEXT... # loads from the registry (files verified), answers or labels
    tuneline data worst RUN [--top 50]             # highest-loss and duplicated-looking records of a run

The gate compares the version's candidate metric (tag ``tuneline.metric_value``, measured
by the pipeline) with the champion's, and only when both were measured on the same eval
set (same ``tuneline.data_digest``); otherwise it refuses unless ``--force`` with a reason,
which is recorded on the version (``tuneline.promotion``, ``tuneline.override``).
"""

from __future__ import annotations

from typing import Any

from steps.config import RegisterConfig
from steps.core.errors import ConfigError
from steps.register.step import alias_history, challenger_leaves, decide, make_champion, move_alias


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


def _version(client: Any, name: str, version: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, version)
    except MlflowException as exc:
        raise ConfigError(f"{name} version {version} does not exist in the registry") from exc


def _alias(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def list_versions(name: str | None = None) -> list[dict[str, Any]]:
    """One row per version (newest first): aliases, method, task, gate metric and value, decision."""
    client = _client()
    names = [name] if name else sorted(m.name for m in client.search_registered_models())
    rows = []
    for model in names:
        aliases: dict[str, list[str]] = {}
        for alias, version in (client.get_registered_model(model).aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for v in sorted(client.search_model_versions(f"name = '{model}'"), key=lambda v: -int(v.version)):
            rows.append({"name": model, "version": v.version, "aliases": sorted(aliases.get(v.version, [])),
                         "method": v.tags.get("tuneline.method", ""), "metric": v.tags.get("tuneline.metric", ""),
                         "value": v.tags.get("tuneline.metric_value", ""),
                         "decision": v.tags.get("tuneline.promotion", "")})
    return rows


def promote(name: str, version: str, force: bool = False, reason: str | None = None) -> str:
    """Move ``champion`` to the version when it passes the gate against the champion (or when forced)."""
    if force and not reason:
        raise ConfigError("--force needs --reason TEXT: an override is recorded with its reason")
    from steps.register.step import promotion_lock

    with promotion_lock(name):
        return _promote(name, version, force, reason)


def _promote(name: str, version: str, force: bool, reason: str | None) -> str:
    client = _client()
    candidate = _version(client, name, version)
    champion = _alias(client, name, "champion")
    if champion is not None and champion.version == candidate.version:
        challenger_leaves(client, name, version, "promote")
        return f"{name} v{version} is already champion"
    metric = candidate.tags.get("tuneline.metric")
    if force:
        verdict = f"promoted by override: {reason}"
        client.set_model_version_tag(name, version, "tuneline.override", reason)
    elif champion is None:
        raise ConfigError(f"{name} has no champion to compare with; use --force --reason TEXT to set one")
    elif not metric or metric != champion.tags.get("tuneline.metric"):
        raise ConfigError(f"{name} v{version} and champion v{champion.version} were not gated on the same metric")
    elif candidate.tags.get("tuneline.data_digest") != champion.tags.get("tuneline.data_digest"):
        raise ConfigError(f"{name} v{version} and champion v{champion.version} were evaluated on different eval "
                          "sets: their metrics are not comparable (run the pipeline, or --force --reason TEXT)")
    else:
        better, detail = decide(RegisterConfig(model_name=name, metric=metric),
                                float(candidate.tags["tuneline.metric_value"]),
                                float(champion.tags["tuneline.metric_value"]), f"champion v{champion.version}")
        if not better:
            client.set_model_version_tag(name, version, "tuneline.promotion", f"not promoted (manual gate): {detail}")
            raise ConfigError(f"not promoted: {detail}")
        verdict = f"promoted (manual gate): {detail}"
    make_champion(client, name, version, champion.version if champion is not None else None,
                  "force" if force else "promote", verdict)
    client.set_model_version_tag(name, version, "tuneline.promotion", verdict)
    return f"{name} v{version} is champion: {verdict}"


def rollback(name: str) -> str:
    """``champion`` back to ``previous-champion``; the rolled-back version is tagged and loses the alias."""
    from steps.register.step import promotion_lock

    client = _client()
    with promotion_lock(name):
        return _rollback(client, name)


def _rollback(client: Any, name: str) -> str:
    champion, previous = _alias(client, name, "champion"), _alias(client, name, "previous-champion")
    if champion is None or previous is None:
        raise ConfigError(f"{name} has no champion and previous-champion to roll back between")
    move_alias(client, name, "champion", previous.version, "rollback", f"v{champion.version} rolled back")
    move_alias(client, name, "previous-champion", None, "rollback", f"v{previous.version} is champion again")
    client.set_model_version_tag(name, champion.version, "tuneline.rolled_back", f"replaced by v{previous.version}")
    client.set_model_version_tag(name, previous.version, "tuneline.promotion",
                                 f"champion again: rollback from v{champion.version}")
    return f"{name}: champion is v{previous.version} again (v{champion.version} rolled back)"


def history(name: str) -> list[dict[str, Any]]:
    """Every alias move of ``name`` (register, gate, promote, force, rollback), oldest first."""
    client = _client()
    if not client.search_model_versions(f"name = '{name}'", max_results=1):
        raise ConfigError(f"no registered model {name!r}")
    return alias_history(client, name)


def history_lines(events: list[dict[str, Any]]) -> list[str]:
    """``tuneline models NAME --history``: one line per alias move."""
    lines = [f"{'time (UTC)':<23} {'alias':<17} {'move':<11} {'action':<8} {'actor':<24} reason"]
    for e in events:
        move = f"v{e['from'] or '-'} -> v{e['to'] or '-'}".replace("v-", "-")
        lines.append(f"{e['time'][:23].replace('T', ' '):<23} {e['alias']:<17} {move:<11} {e['action']:<8} "
                     f"{e['actor'][:24]:<24} {e['reason']}")
    return lines if events else ["no alias moves recorded"]


def model_uri(spec: str) -> str:
    """NAME (the champion), NAME@alias or NAME/version as a models:/ URI."""
    if "@" in spec or "/" in spec:
        return f"models:/{spec}"
    return f"models:/{spec}@champion"


def predict(spec: str, inputs: list[str], max_new_tokens: int = 64) -> list[Any]:
    """Answers of the version, loaded from a local copy whose files match the digests recorded at registration
    (``verify.verified_model_dir``: ArtifactError naming the file otherwise), never from ``models:/`` directly."""
    import tempfile
    from pathlib import Path

    import mlflow

    from steps.register.verify import verified_model_dir

    with tempfile.TemporaryDirectory(prefix="tuneline-predict-") as tmp:
        model = mlflow.pyfunc.load_model(str(verified_model_dir(spec, Path(tmp))))
        params = {"max_new_tokens": max_new_tokens} if model.metadata.get_params_schema() is not None else None
        return list(model.predict(inputs, params=params))


def record_losses(run: str) -> tuple[str, list[dict[str, Any]]]:
    """The per-record losses (train's ``record_losses.jsonl``) of an MLflow run, given by its run id or by a
    model version (``NAME/VERSION``, ``NAME@ALIAS``); returns (the run id, the records)."""
    import json
    import tempfile

    from mlflow.exceptions import MlflowException

    from steps.core.contract import RECORD_LOSSES

    client = _client()
    run_id = run
    if "@" in run or "/" in run:
        name, sep, ref = run.partition("@") if "@" in run else run.partition("/")
        found = _alias(client, name, ref) if sep == "@" else _version(client, name, ref)
        if found is None:
            raise ConfigError(f"{name} has no version with alias {ref!r}")
        run_id = found.run_id
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run_id, f"data/{RECORD_LOSSES}", tmp)
            with open(path, encoding="utf-8") as fh:
                return run_id, [json.loads(line) for line in fh if line.strip()]
    except MlflowException as exc:
        raise ConfigError(f"run {run!r} has no per-record losses (data/{RECORD_LOSSES}): is it a tuneline run "
                          "trained with train.record_losses on?") from exc


def worst_records(losses: list[dict[str, Any]], top: int) -> dict[str, Any]:
    """The ``top`` highest-loss records, and the duplicated-looking ones: records with the same token count
    and the same loss to 4 decimals (the same tokens give the same loss, up to the float noise of different
    batch shapes; different texts rarely do)."""
    groups: dict[tuple[int, float], list[dict[str, Any]]] = {}
    for r in losses:
        groups.setdefault((r["tokens"], round(r["loss"], 4)), []).append(r)
    duplicates = sorted((g for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), -g[0]["loss"]))
    return {"records": len(losses), "splits": {s: sum(r["split"] == s for r in losses) for s in ("train", "eval")},
            "highest": sorted(losses, key=lambda r: -r["loss"])[:top], "duplicates": duplicates[:top]}


def worst_lines(run_id: str, found: dict[str, Any]) -> list[str]:
    """``tuneline data worst``'s text: the highest-loss records, then the groups of duplicated-looking ones."""
    splits = ", ".join(f"{n} {split}" for split, n in found["splits"].items())
    lines = [f"run {run_id}: {found['records']} records ({splits}); highest loss after training:",
             f"{'rank':>4}  {'id':<40} {'split':<5} {'loss':>9} {'tokens':>6}"]
    lines += [f"{rank:>4}  {r['id']:<40} {r['split']:<5} {r['loss']:>9.4f} {r['tokens']:>6}"
              for rank, r in enumerate(found["highest"], start=1)]
    if not found["duplicates"]:
        return [*lines, "no duplicated-looking records"]
    lines.append("duplicated-looking (same tokens and loss: likely the same text):")
    for group in found["duplicates"]:
        ids = ", ".join(f"{r['id']} ({r['split']})" for r in group)
        lines.append(f"  loss {group[0]['loss']:.4f}, {group[0]['tokens']} tokens: {ids}")
    return lines
