"""Security properties that can be read from the code: no remote code, no pickles (torch.load only
with weights_only=True, no torch.save, no unsafe YAML/numpy/pandas loaders, models-from-code
pyfuncs), JSON task results, safetensors weights, no secret handed to a log or print call. A scan,
so a later change cannot quietly break them; tests/reliability/test_security.py checks the same
properties at run time, on what a real pipeline run stored and logged."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for folder in ("steps", "flows", "services", "bench") for p in (REPO / folder).rglob("*.py"))


@functools.cache
def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def calls(name: str):
    """(path, call node) for every call of a function or method called ``name``."""
    for path in SOURCES:
        for node in ast.walk(tree(path)):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called == name:
                    yield path, node


def keyword(node: ast.Call, name: str):
    return next((k.value for k in node.keywords if k.arg == name), None)


def test_the_scan_sees_the_code():
    assert len(SOURCES) > 20 and any(p.parts[-2:] == ("train", "step.py") for p in SOURCES)
    assert list(calls("from_pretrained"))


def is_false(value: ast.AST | None) -> bool:
    return isinstance(value, ast.Constant) and value.value is False


def test_trust_remote_code_is_never_enabled():
    for path, node in calls("from_pretrained"):
        value = keyword(node, "trust_remote_code")
        assert value is None or is_false(value), f"{path}:{node.lineno}"
    for path in SOURCES:
        assert not re.search(r"trust_remote_code\s*=\s*True", path.read_text(encoding="utf-8")), path
        for node in ast.walk(tree(path)):
            # Any call (pipeline(), AutoConfig, a helper) and any kwargs dict may carry it: only a literal False.
            if isinstance(node, ast.Call):
                found = [k.value for k in node.keywords if k.arg == "trust_remote_code"]
            elif isinstance(node, ast.Dict):
                found = [v for k, v in zip(node.keys, node.values)
                         if isinstance(k, ast.Constant) and k.value == "trust_remote_code"]
            else:
                continue
            assert all(is_false(v) for v in found), f"{path}:{node.lineno}: trust_remote_code must be a literal False"


def dotted(func: ast.AST) -> str:
    """``torch.serialization.load`` for that attribute chain; ``load`` for a bare name."""
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def imported_names(tree: ast.AST, module: str) -> set[str]:
    """Local names bound by ``from <module>[.x] import name [as alias]``."""
    return {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            and (node.module or "").split(".")[0] == module for a in node.names}


def test_torch_load_only_loads_weights():
    for path in SOURCES:
        module = tree(path)
        # `from torch import load` would hide the call from a scan for `torch.load`: refuse the import.
        assert not {"load", "serialization"} & imported_names(module, "torch"), f"{path}: import torch.load by name"
        for node in ast.walk(module):
            if isinstance(node, ast.Call) and dotted(node.func) in ("torch.load", "torch.serialization.load"):
                value = keyword(node, "weights_only")
                assert isinstance(value, ast.Constant) and value.value is True, f"{path}:{node.lineno}"


def test_weights_are_written_only_as_safetensors():
    """torch.save writes a pickle: the product stores tensors with safetensors (save_file / save_pretrained)."""
    for path in SOURCES:
        module = tree(path)
        assert "save" not in imported_names(module, "torch"), path
        for node in ast.walk(module):
            if isinstance(node, ast.Call):
                assert dotted(node.func) not in ("torch.save", "torch.serialization.save"), f"{path}:{node.lineno}"
    assert list(calls("save_file")) or list(calls("save_pretrained"))  # the scan sees how weights are written


def test_no_unsafe_deserializers():
    """Other ways to execute stored bytes: full YAML loaders, numpy/pandas pickles, a pickled pyfunc."""
    for path in SOURCES:
        for node in ast.walk(tree(path)):
            if not isinstance(node, ast.Call):
                continue
            name, where = dotted(node.func), f"{path}:{node.lineno}"
            assert name not in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"), where
            assert not name.endswith("read_pickle") and not name.endswith("jit.load"), where
            allow = keyword(node, "allow_pickle")
            assert allow is None or is_false(allow), where
            if name.endswith("pyfunc.log_model"):
                # Models-from-code: a path to the model's source; an instance would be cloudpickled.
                model = keyword(node, "python_model")
                assert model is not None, where
                assert not isinstance(model, ast.Call) or dotted(model.func) in ("str", "os.fspath"), where


SECRET_WORDS = re.compile(r"secret|password|passwd|credential|token", re.IGNORECASE)
LOG_CALLS = {"print", "debug", "info", "warning", "warn", "error", "exception", "critical", "log", "echo"}


def test_secrets_are_not_passed_to_log_or_print_calls():
    """A log or print call may not mention a variable, attribute or key named like a secret."""
    for path in SOURCES:
        for node in ast.walk(tree(path)):
            if not isinstance(node, ast.Call) or dotted(node.func).rsplit(".", 1)[-1] not in LOG_CALLS:
                continue
            for arg in [*node.args, *(k.value for k in node.keywords)]:
                for part in ast.walk(arg):
                    name = (part.id if isinstance(part, ast.Name) else part.attr if isinstance(part, ast.Attribute)
                            else part.value if isinstance(part, ast.Subscript) is False and isinstance(part, ast.Constant)
                            and isinstance(part.value, str) and len(part.value) < 40 and part.value.isidentifier()
                            else None)
                    assert not (name and SECRET_WORDS.search(name)), f"{path}:{node.lineno}: logs {name!r}"


def test_no_pickle_anywhere_in_the_product():
    for path in SOURCES:
        for node in ast.walk(tree(path)):
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
    # Every task or flow that persists its result says JSON (Prefect's default serializer is pickle).
    persisted = 0
    for path in sorted((REPO / "flows").rglob("*.py")):
        for node in ast.walk(tree(path)):
            if (isinstance(node, ast.Call) and dotted(node.func) in ("task", "flow", "prefect.task", "prefect.flow")
                    and {k.arg for k in node.keywords} & {"persist_result", "result_storage", "cache_policy"}):
                persist = keyword(node, "persist_result")
                if isinstance(persist, ast.Constant) and persist.value is False:
                    continue
                serializer = keyword(node, "result_serializer")
                assert isinstance(serializer, ast.Constant) and serializer.value == "json", f"{path}:{node.lineno}"
                persisted += persist is not None
    assert persisted >= 1  # the scan found the persisting step tasks
