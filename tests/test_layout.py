"""The layout's rules (docs/DESIGN.md, "Layout"): no import cycle among the modules of ``steps``,
no step importing another step's module for a constant, no Prefect in ``steps``, and a short
docstring on every module and step entry point."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ROOT / "steps"
# The modules of each step: importing a constant across these borders is what core/contract.py is for.
STEP_OF = {"steps.ingest": "ingest", "steps.validate": "validate", "steps.base_model": "base_model",
           "steps.evaluate": "evaluate", "steps.scrub": "scrub", "steps.tokenize": "tokenize", "steps.train": "train",
           "steps.register": "register"}
ENTRY_POINTS = {"ingest/step.py": "ingest_records", "validate.py": "validate_records",
                "base_model/step.py": "prepare_base_model",
                "evaluate.py": "evaluate_model", "scrub/step.py": "scrub_records", "tokenize/step.py": "tokenize_dataset",
                "train/step.py": "train_model", "register/step.py": "register_model"}


def modules() -> dict[str, Path]:
    found = {}
    for path in STEPS.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(module, names) for every import of a steps module in ``path``, at any depth (function-level too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("steps"):
            submodules = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known]
            out += [(m, []) for m in submodules]
            out.append((node.module, [a.name for a in node.names if f"{node.module}.{a.name}" not in known]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("steps")]
    return out


def step_of(module: str) -> str | None:
    return next((step for prefix, step in STEP_OF.items() if module == prefix or module.startswith(prefix + ".")), None)


def test_no_import_cycle_among_steps_modules():
    known = modules()
    graph = {name: {m for m, _ in imports(path, known) if m in known and m != name} for name, path in known.items()}
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert cycles == [], [" -> ".join(c) for c in cycles]


def test_no_step_imports_another_step_for_a_constant():
    known = modules()
    found = []
    for name, path in known.items():
        mine = step_of(name)
        for module, names in imports(path, known):
            theirs = step_of(module)
            constants = [n for n in names if re.fullmatch(r"_?[A-Z][A-Z0-9_]*", n)]
            if theirs is not None and theirs != mine and constants:
                found.append(f"{name} imports {constants} from {module}")
    assert found == []


def test_steps_never_import_prefect():
    offenders = [str(p.relative_to(ROOT)) for p in STEPS.rglob("*.py")
                 if re.search(r"^\s*(from|import) prefect\b", p.read_text(), re.M)]
    assert offenders == []


def test_every_module_and_step_entry_point_has_a_docstring():
    missing = [str(p.relative_to(ROOT)) for p in [*STEPS.rglob("*.py"), *(ROOT / "flows").rglob("*.py"),
                                                  *(ROOT / "services").rglob("*.py")]
               if p.read_text().strip() and ast.get_docstring(ast.parse(p.read_text())) is None]
    for file, function in ENTRY_POINTS.items():
        tree = ast.parse((STEPS / file).read_text())
        node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
        if ast.get_docstring(node) is None:
            missing.append(f"steps/{file}:{function}")
    assert missing == []
