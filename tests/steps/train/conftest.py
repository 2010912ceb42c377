"""Fixtures of the train tests: the tiny base model's folder (session-wide)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def base_dir(tiny_model) -> Path:
    from steps.core.store import ArtifactStore

    return ArtifactStore.from_env("shared").download(tiny_model.base)
