"""Measured figures of the reliability tests, merged into the JSON file named by
TUNELINE_RELIABILITY_REPORT (when set) for docs/RELIABILITY.md."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def record_figures(section: str, key: str, value: Any) -> None:
    """Set ``report[section][key] = value``, keeping every other section and key in the file."""
    target = os.environ.get("TUNELINE_RELIABILITY_REPORT")
    if not target:
        return
    path = Path(target)
    report = json.loads(path.read_text()) if path.is_file() and path.stat().st_size else {}
    report.setdefault(section, {})[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    staging.replace(path)
