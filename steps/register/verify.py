"""Tamper evidence for registered versions: every file's sha256 is recorded on the version at registration
(tag ``tuneline.files_sha256``), and a version is used only from a local folder whose files match them.

    with tempfile.TemporaryDirectory() as tmp:
        folder = verified_model_dir("tuneline-chat@champion", Path(tmp))   # ArtifactError naming the file
        model = mlflow.pyfunc.load_model(str(folder))

``tuneline predict``, ``tuneline export`` and ``tuneline serve`` load this way, never from ``models:/`` directly;
the pyfunc's ``load_context`` checks the base model it downloads against ``base_model_files`` in its config
(the config is in MLmodel, itself covered by the tag). What this cannot see: someone able to rewrite the
version's tags as well as its files (docs/RELIABILITY.md, "Tamper evidence").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from steps.core.errors import ArtifactError, ConfigError
from steps.core.lineage import sha256_file

FILES_TAG = "tuneline.files_sha256"
CLIENT_WRITTEN = "registered_model_meta"  # mlflow.store.artifact.models_artifact_repo.REGISTERED_MODEL_META_FILE_NAME
PARTS = "parts:"  # FILES_TAG's value when the JSON is split over FILES_TAG.1 .. FILES_TAG.N


def tag_limit() -> int:
    """MLflow's longest model-version tag value (100,000 characters in MLflow 3)."""
    from mlflow.utils import validation

    return int(getattr(validation, "MAX_MODEL_REGISTRY_TAG_VALUE_LENGTH", 5000))


def files_tags(digests: dict[str, str], limit: int | None = None) -> dict[str, str]:
    """``{path: sha256}`` as version tags: one compact JSON tag, or numbered parts when it is too long."""
    text = json.dumps(dict(sorted(digests.items())), separators=(",", ":"))
    limit = limit or tag_limit()
    if len(text) <= limit:
        return {FILES_TAG: text}
    parts = [text[i : i + limit] for i in range(0, len(text), limit)]
    return {FILES_TAG: f"{PARTS}{len(parts)}", **{f"{FILES_TAG}.{n}": part for n, part in enumerate(parts, 1)}}


def recorded_files(tags: dict[str, str]) -> dict[str, str] | None:
    """The ``{path: sha256}`` recorded on a version (``files_tags``), or None when it has none."""
    value = tags.get(FILES_TAG)
    if value is None:
        return None
    if value.startswith(PARTS):
        value = "".join(tags.get(f"{FILES_TAG}.{n}", "") for n in range(1, int(value[len(PARTS):]) + 1))
    try:
        files = json.loads(value)
    except ValueError as exc:
        raise ArtifactError(f"the {FILES_TAG} tag is not valid JSON: {exc}") from exc
    if not isinstance(files, dict):
        raise ArtifactError(f"the {FILES_TAG} tag is not a JSON object")
    return files


def folder_files(folder: Path) -> dict[str, Path]:
    """Every file under ``folder`` by its posix path relative to it."""
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def check_files(folder: Path, expected: dict[str, str], what: str) -> None:
    """``folder`` holds exactly the files of ``expected`` with those sha256; ArtifactError naming ``what`` and
    the first file missing, extra or different otherwise (size-free: every file is hashed)."""
    found = folder_files(folder)
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ArtifactError(f"{what}: file {missing[0]} is missing ({len(missing)} missing)")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise ArtifactError(f"{what}: file {extra[0]} was not registered ({len(extra)} unexpected)")
    for name in sorted(expected):
        if sha256_file(found[name]) != expected[name]:
            raise ArtifactError(f"{what}: file {name} differs from the sha256 recorded at registration")


def resolve(spec: str) -> Any:
    """NAME (its champion), NAME@alias or NAME/version as the model version; ConfigError if there is none."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    if "@" in spec:
        name, _, alias = spec.partition("@")
    elif "/" in spec:
        name, _, number = spec.partition("/")
        try:
            return client.get_model_version(name, number)
        except MlflowException as exc:
            raise ConfigError(f"{spec}: no such registered model version ({exc.error_code})") from exc
    else:
        name, alias = spec, "champion"
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        raise ConfigError(f"{spec}: no such registered model version ({exc.error_code})") from exc


def verified_model_dir(spec: str, dst: Path) -> Path:
    """The version's files downloaded under ``dst`` and checked against the digests recorded at registration.

    Raises ``ConfigError`` for an unknown version and ``ArtifactError`` naming the model, version and file when
    a file is missing, extra or different, or when the version has no digests (registered before tuneline
    recorded them: re-register it, since nothing says its files are the ones registered)."""
    import mlflow

    version = resolve(spec)
    what = f"{version.name} version {version.version}"
    expected = recorded_files(version.tags)
    if expected is None:
        raise ArtifactError(f"{what} has no {FILES_TAG} tag: it was registered before tuneline recorded file "
                            "digests, so its files cannot be checked; register it again (tuneline run) to use it")
    (dst / "version").mkdir(parents=True, exist_ok=True)
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{version.name}/{version.version}",
                                                     dst_path=str(dst / "version")))
    # Written by the MLflow client on every models:/ download (name and version, overwriting any such file the
    # server held): not a registered file, and nothing tuneline loads reads it.
    (folder / CLIENT_WRITTEN).unlink(missing_ok=True)
    check_files(folder, expected, what)
    return folder


def pyfunc_config(folder: Path) -> dict[str, Any]:
    """The pyfunc's ``model_config`` in a (verified) version folder's MLmodel."""
    import yaml

    return yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"].get("config") or {}


def verified_base_dir(config: dict[str, Any], dst: Path) -> Path:
    """The base model named by a verified version's config, downloaded and checked against ``base_model_files``."""
    import mlflow

    base = Path(mlflow.artifacts.download_artifacts(config["base_model_uri"], dst_path=str(dst / "base")))
    if "base_model_files" in config:
        check_files(base, config["base_model_files"], f"base model {config['base_model_uri']}")
    return base
