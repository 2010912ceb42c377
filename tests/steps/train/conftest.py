"""Fixtures of the train tests: ``base_dir``, the tiny base model's folder (session-wide)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def base_dir(tiny_model_dir) -> Path:
    return tiny_model_dir
