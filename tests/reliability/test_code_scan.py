"""Security properties that can be read from the code: no remote code, no pickles, JSON task
results, safetensors weights. A scan, so a later change cannot quietly break them."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for folder in ("steps", "flows", "bench") for p in (REPO / folder).rglob("*.py"))


def calls(name: str):
    """(path, call node) for every call of a function or method called ``name``."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called == name:
                    yield path, node


def keyword(node: ast.Call, name: str):
    return next((k.value for k in node.keywords if k.arg == name), None)


def test_the_scan_sees_the_code():
    assert len(SOURCES) > 20 and any(p.name == "train.py" for p in SOURCES)
    assert list(calls("from_pretrained"))


def test_trust_remote_code_is_never_enabled():
    for path, node in calls("from_pretrained"):
        value = keyword(node, "trust_remote_code")
        assert value is None or (isinstance(value, ast.Constant) and value.value is False), f"{path}:{node.lineno}"
    for path in SOURCES:
        assert not re.search(r"trust_remote_code\s*=\s*True", path.read_text(encoding="utf-8")), path


def test_torch_load_only_loads_weights():
    for path, node in calls("load"):
        func = node.func
        if isinstance(func, ast.Attribute) and getattr(func.value, "id", None) == "torch":
            value = keyword(node, "weights_only")
            assert isinstance(value, ast.Constant) and value.value is True, f"{path}:{node.lineno}"


def test_no_pickle_anywhere_in_the_product():
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in {"pickle", "cloudpickle", "dill", "joblib"} for n in names), path
    for path, node in calls("save_pretrained"):
        value = keyword(node, "safe_serialization")
        assert value is None or (isinstance(value, ast.Constant) and value.value is True), f"{path}:{node.lineno}"


def test_task_results_are_json():
    source = (REPO / "flows" / "tasks.py").read_text(encoding="utf-8")
    assert 'result_serializer="json"' in source
    assert "pickle" not in source
